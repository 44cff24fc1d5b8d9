"""Many processes through JAX's own runtime (`jax.distributed`), and a local launcher for testing.

    jaxnv.parallel.distributed.initialize()  # before any other JAX call; a no-op for one process

Explicit settings come from `JAXNV_COORDINATOR` (host:port), `JAXNV_NUM_PROCESSES` and
`JAXNV_PROCESS_ID`; without them, clusters that JAX auto-detects (SLURM, Open MPI, Kubernetes
jobsets, ...) are joined with `jax.distributed.initialize()`'s own detection.
`jaxnv launch -n N -- train ...` starts N local processes on loopback for CPU testing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME")
_initialized = False


def initialize() -> bool:
    """Join the multi-process run described by the environment; True if one was joined."""
    global _initialized
    if _initialized:
        return True
    coordinator = os.environ.get("JAXNV_COORDINATOR")
    if coordinator:
        try:
            num = int(os.environ["JAXNV_NUM_PROCESSES"])
            pid = int(os.environ["JAXNV_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError(
                "JAXNV_COORDINATOR is set but JAXNV_NUM_PROCESSES / JAXNV_PROCESS_ID are missing "
                "or not integers: set all three"
            ) from None
        # CPU devices talk through gloo; the setting is ignored by GPU and TPU backends
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    elif any(k in os.environ for k in CLUSTER_HINTS):
        jax.distributed.initialize()  # JAX's own cluster auto-detection
    else:
        return False
    _initialized = True
    return True


def is_primary() -> bool:
    """True on the process that writes logs and metrics (process 0)."""
    return jax.process_index() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gloo's connection reports, one per process pair and collective group: noise, not news
_CHATTER = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def _stream(proc: subprocess.Popen, prefix: str) -> None:
    for line in iter(proc.stdout.readline, ""):
        if _CHATTER.match(line):
            continue
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
