"""Many processes through JAX's own runtime (`jax.distributed`), and a local launcher for testing.

    jaxnv.parallel.distributed.initialize()  # before any other JAX call; a no-op for one process

Explicit settings come from `JAXNV_COORDINATOR` (host:port), `JAXNV_NUM_PROCESSES` and
`JAXNV_PROCESS_ID` (what `jaxnv launch` and the Kubernetes manifest in deploy/k8s set); without
them, a launcher that JAX's own cluster detection knows (SLURM's `srun`, Open MPI's `mpirun`, a
Kubernetes JobSet, ...) supplies the coordinator, the process count and this process's index.
Either way one line on stderr says what was joined. `jaxnv launch -n N -- train ...` starts N
local processes on loopback for CPU testing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

# Detection runs only when one of these says a launcher started us: probing every cluster kind
# on every single-process run would import the kubernetes client or query metadata servers.
CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME")
# JAX's detectors (jax/_src/clusters), by the names people know their launchers by
_LAUNCHERS = {
    "OmpiCluster": "Open MPI",
    "SlurmCluster": "SLURM",
    "K8sCluster": "Kubernetes",
    "GkeTpuCluster": "GKE TPU",
    "GceTpuCluster": "Cloud TPU",
}
_initialized = False


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A multi-process run as this process sees it."""

    launcher: str  # "SLURM", "Open MPI", "Kubernetes", "JAXNV_COORDINATOR", ...
    coordinator: str  # host:port that process 0 serves and every process dials
    num_processes: int
    process_id: int
    explicit: bool = False  # from JAXNV_* variables, not from JAX's detection


def _explicit() -> Cluster | None:
    coordinator = os.environ.get("JAXNV_COORDINATOR")
    if not coordinator:
        return None
    try:
        num = int(os.environ["JAXNV_NUM_PROCESSES"])
        pid = int(os.environ["JAXNV_PROCESS_ID"])
    except (KeyError, ValueError):
        raise ValueError(
            "JAXNV_COORDINATOR is set but JAXNV_NUM_PROCESSES / JAXNV_PROCESS_ID are missing "
            "or not integers: set all three"
        ) from None
    if not 0 <= pid < num:
        raise ValueError(
            f"JAXNV_PROCESS_ID={pid} is not in [0, JAXNV_NUM_PROCESSES={num}): number the "
            "processes 0 .. N-1"
        )
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ  # the deploy/k8s manifest sets JAXNV_*
    launcher = "Kubernetes (JAXNV_COORDINATOR)" if in_pod else "JAXNV_COORDINATOR"
    return Cluster(launcher, coordinator, num, pid, explicit=True)


def detect() -> Cluster | None:
    """The multi-process run the environment describes, or None for a single process.

    JAXNV_* variables win; otherwise JAX's own detectors (the ones `jax.distributed.initialize()`
    runs, in its order) read the launcher's variables, e.g. SLURM_STEP_NODELIST's first host and a
    port from SLURM_JOB_ID, or the `mpirun` address in OMPI_MCA_orte_hnp_uri.
    JAX_COORDINATOR_ADDRESS / JAX_COORDINATOR_PORT override the coordinator, as in JAX.
    """
    explicit = _explicit()
    if explicit or not any(k in os.environ for k in CLUSTER_HINTS):
        return explicit
    from jax._src import clusters  # JAX's detectors; no public API lists them

    env = next(
        (e for e in clusters.ClusterEnv._cluster_types
         if not e.opt_in_only_method and e.is_env_present()),
        None,
    )  # fmt: skip
    if env is None and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        # Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_hnp_uri: N lone runs would share one workdir
        raise ValueError(
            f"mpirun started {os.environ['OMPI_COMM_WORLD_SIZE']} ranks but JAX's Open MPI "
            "detection needs OMPI_MCA_orte_hnp_uri (Open MPI 4): set JAXNV_COORDINATOR=host:port, "
            "JAXNV_NUM_PROCESSES=$OMPI_COMM_WORLD_SIZE and JAXNV_PROCESS_ID=$OMPI_COMM_WORLD_RANK"
        )
    if env is None:  # e.g. a shell inside `salloc` (SLURM_JOB_ID but no srun step): one process
        return None
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or env.get_coordinator_address(
        timeout_secs=300, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT")
    )
    launcher = _LAUNCHERS.get(env.__name__, env.__name__)
    return Cluster(launcher, coordinator, env.get_process_count(), env.get_process_id())


def initialize() -> bool:
    """Join the multi-process run described by the environment; True if one was joined.

    Prints one line to stderr, e.g. `jaxnv: joined 2 processes via Open MPI (this is process 0),
    coordinator 127.0.0.1:63521`. A detected run of one process (`srun -n 1`) joins nothing.
    """
    global _initialized
    if _initialized:
        return True
    cluster = detect()
    if cluster is None or (cluster.num_processes == 1 and not cluster.explicit):
        return False
    # CPU devices talk through gloo; the setting is ignored by GPU and TPU backends
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        cluster.coordinator,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        # explicit settings must not wake JAX's detectors (in a pod, K8s detection warns or
        # queries the API server); detected ones still let JAX pick each process's GPU from
        # its local rank (SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK)
        cluster_detection_method="deactivate" if cluster.explicit else None,
    )
    print(
        f"jaxnv: joined {cluster.num_processes} processes via {cluster.launcher} (this is "
        f"process {cluster.process_id}), coordinator {cluster.coordinator}",
        file=sys.stderr,
        flush=True,
    )
    _initialized = True
    return True


def is_primary() -> bool:
    """True on the process that writes logs and metrics (process 0)."""
    return jax.process_index() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gloo's connection reports, one per process pair and collective group: noise, not news. gloo
# writes each in pieces from several threads, so reports interleave at any piece boundary and
# a report's last number can land on a line of its own: a line made only of the reports' words
# and numbers is chatter, whatever their order, and so is a bare number right after chatter.
_CHATTER_WORDS = frozenset(
    "[Gloo] Rank is connected to peer ranks. ranks Expected number of :".split()
)


def is_chatter(line: str) -> bool:
    """Whether `line` holds only (pieces of) gloo's "Rank i is connected to n peer ranks"."""
    words = line.replace("[Gloo]", " [Gloo] ").split()  # a report can start mid-number
    if not any(w in _CHATTER_WORDS for w in words):
        return False
    return all(w in _CHATTER_WORDS or w.isdigit() for w in words)


def drop_chatter(lines):
    """`lines` without gloo's connection reports (see `is_chatter`)."""
    after_chatter = False
    for line in lines:
        if is_chatter(line) or (after_chatter and line.strip().isdigit()):
            after_chatter = True
            continue
        after_chatter = False
        yield line


def _stream(proc: subprocess.Popen, prefix: str) -> None:
    for line in drop_chatter(iter(proc.stdout.readline, "")):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def launch(args: list[str], num_processes: int, cpu_devices: int = 0, grace: float = 10.0) -> int:
    """Run `jaxnv ARGS` in `num_processes` local processes joined by `jax.distributed`.

    Output is streamed with a `[i]` prefix. If any process fails, the others are stopped
    (SIGTERM, then SIGKILL after `grace` seconds) and its exit code is returned. SIGTERM or
    SIGINT to the launcher is forwarded to every process (which then save and exit 75).
    """
    if num_processes < 1:
        raise ValueError(f"launch -n must be >= 1, got {num_processes}")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(
            JAXNV_COORDINATOR=f"127.0.0.1:{port}",
            JAXNV_NUM_PROCESSES=str(num_processes),
            JAXNV_PROCESS_ID=str(i),
            PYTHONUNBUFFERED="1",
        )
        if cpu_devices:  # each process's device count comes from JAXNV_CPU_DEVICES alone
            env["JAXNV_CPU_DEVICES"] = str(cpu_devices)
            flags = env.get("XLA_FLAGS", "").split()
            kept = [f for f in flags if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(kept)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxnv.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        thread = threading.Thread(target=_stream, args=(proc, f"[{i}] "), daemon=True)
        thread.start()
        threads.append(thread)
        procs.append(proc)

    def forward(signum, frame):  # a signal to the launcher goes to every process
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for p in procs:  # one died (or we are leaving): stop the rest in bounded time
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in threads:
            t.join(timeout=1.0)  # the last lines of output
    print(f"jaxnv launch: a process exited with {failed}; stopped the others", file=sys.stderr)
    return failed if failed > 0 else 1
