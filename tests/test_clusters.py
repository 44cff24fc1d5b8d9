"""The launchers clusters already have: JAX's detection of SLURM and Open MPI, real `mpirun`
ranks, the environment `srun` sets, and the deploy/ templates (sbatch, Kubernetes Indexed Job)."""

import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxnv import apply_overrides
from jaxnv.checkpoint import Checkpointer
from jaxnv.checkpoint.preemption import EXIT_PREEMPTED
from jaxnv.experiment import load_experiment
from jaxnv.parallel import distributed
from jaxnv.train import train

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "logging.progress=false",
    "logging.mfu=false",
    "model.features=32,32",
    "train.steps=40",
    "train.eval_every=0",
    "logging.log_every=1",
    "optimizer.warmup_steps=5",
]
MESH = ["mesh.rules=fsdp", "mesh.data=2", "mesh.fsdp=4"]  # 8 devices: 2 processes x 4, or 1 x 8
LAUNCH_VARS = ("JAXNV_", "SLURM_", "OMPI_", "PMIX_", "JOB", "KUBERNETES_", "JAX_COORDINATOR")
MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="Open MPI's mpirun (.ci/run installs it)")


def _jaxnv() -> list[str]:
    script = Path(sys.executable).parent / "jaxnv"  # what `srun jaxnv` / `mpirun jaxnv` run
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxnv.cli"]


def _env(**extra) -> dict:
    """The test's environment without its 8-device XLA_FLAGS or any launcher's variables."""
    env = {
        k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(LAUNCH_VARS)
    }
    env.update(PYTHONUNBUFFERED="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


def _mpirun(n: int) -> list[str]:
    # oob_tcp_if_include lo: the launcher's address in OMPI_MCA_orte_hnp_uri (and so JAX's
    # coordinator) is 127.0.0.1; --oversubscribe: more ranks than this machine's cores
    return [MPIRUN, "-n", str(n), "--oversubscribe", "--mca", "oob_tcp_if_include", "lo"]


def _train_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def single_curve():
    """The loss curve of the same run in this process on one device (no mesh keys)."""
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, ARGS)
    result = train(exp, devices=jax.devices()[:1])
    return [r["loss"] for r in result.history if r["split"] == "train"]


def _check_curve(workdir, expected):
    rows = _train_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 41))  # one writer, no gaps
    np.testing.assert_allclose([r["loss"] for r in rows], expected, rtol=1e-5)


# ---- detection: what JAX's own detectors read, read the same way by jaxnv ----


def _clear_launchers(monkeypatch):
    for k in list(os.environ):
        if k.startswith(LAUNCH_VARS):
            monkeypatch.delenv(k)


def _jax_detects():
    from jax._src import clusters

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 1)


def test_slurm_detection_matches_jax(monkeypatch):
    _clear_launchers(monkeypatch)
    srun = {  # task 3 of 4 on the second of two nodes, as srun sets them
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_NODELIST": "gpu[007-008],login1",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_NODES": "2",
    }
    for k, v in srun.items():
        monkeypatch.setenv(k, v)
    found = distributed.detect()
    # the first node of the step, and a port from the job id in [61440, 65535]
    assert found == distributed.Cluster("SLURM", f"gpu007:{61440 + 1234 % 4096}", 4, 3)
    coordinator, num, pid, local_ids = _jax_detects()
    assert (found.coordinator, found.num_processes, found.process_id) == (coordinator, num, pid)
    assert local_ids == [1]  # JAX gives the task the GPU numbered by its SLURM_LOCALID
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "7000")  # JAX's override, honoured the same
    assert distributed.detect().coordinator == "gpu007:7000" == _jax_detects()[0]


def test_open_mpi_detection_matches_jax(monkeypatch):
    _clear_launchers(monkeypatch)
    mpirun = {
        "OMPI_MCA_orte_hnp_uri": "1970798592.0;tcp://127.0.0.1:35451",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    }
    for k, v in mpirun.items():
        monkeypatch.setenv(k, v)
    found = distributed.detect()
    port = 1970798592 // 4096 % 4096 + 61440  # from the job id, as JAX picks it
    assert found == distributed.Cluster("Open MPI", f"127.0.0.1:{port}", 2, 1)
    assert _jax_detects()[:3] == (found.coordinator, 2, 1)


def test_partial_or_explicit_environments(monkeypatch):
    _clear_launchers(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "99")  # a shell inside `salloc`: no srun step
    assert distributed.detect() is None
    monkeypatch.setenv("JAXNV_COORDINATOR", "10.0.0.1:1234")  # explicit settings win
    monkeypatch.setenv("JAXNV_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXNV_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAXNV_PROCESS_ID=2 is not in \[0, .*number the"):
        distributed.detect()
    monkeypatch.setenv("JAXNV_PROCESS_ID", "1")
    assert distributed.detect() == distributed.Cluster(
        "JAXNV_COORDINATOR", "10.0.0.1:1234", 2, 1, explicit=True
    )
    for k in ("SLURM_JOB_ID", "JAXNV_COORDINATOR"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # Open MPI 5: ranks, but no ORTE address
    with pytest.raises(ValueError, match="started 2 ranks .* set JAXNV_COORDINATOR=host:port"):
        distributed.detect()


def test_initialize_joins_what_it_detects_and_says_so(monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(update=lambda *a: calls.append(("config", *a))),
        distributed=types.SimpleNamespace(initialize=lambda *a, **k: calls.append((a, k))),
    )
    monkeypatch.setattr(distributed, "jax", fake)
    monkeypatch.setattr(distributed, "_initialized", False)
    cluster = distributed.Cluster("Open MPI", "127.0.0.1:62000", 2, 1)
    monkeypatch.setattr(distributed, "detect", lambda: cluster)
    assert distributed.initialize() is True
    assert calls == [
        ("config", "jax_cpu_collectives_implementation", "gloo"),
        (("127.0.0.1:62000",), dict(num_processes=2, process_id=1, cluster_detection_method=None)),
    ]
    assert capsys.readouterr().err == (
        "jaxnv: joined 2 processes via Open MPI (this is process 1), coordinator 127.0.0.1:62000\n"
    )
    monkeypatch.setattr(distributed, "_initialized", False)
    calls.clear()
    one = distributed.Cluster("SLURM", "n1:62000", 1, 0)  # `srun -n 1`: nothing to join
    monkeypatch.setattr(distributed, "detect", lambda: one)
    assert distributed.initialize() is False and calls == []


# ---- real launchers: mpirun ranks and srun's environment, against one process ----


@needs_mpirun
@pytest.mark.slow
def test_mpirun_two_ranks_reproduce_the_single_process_curve(tmp_path, single_curve):
    workdir = tmp_path / "mpi"
    cmd = [*_mpirun(2), *_jaxnv(), "train", "binary_classification", "--workdir", str(workdir)]
    proc = subprocess.run(
        [*cmd, *ARGS, *MESH],
        env=_env(JAXNV_CPU_DEVICES="4"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for i in range(2):
        joined = f"jaxnv: joined 2 processes via Open MPI (this is process {i}), coordinator "
        assert f"{joined}127.0.0.1:" in out
    _check_curve(workdir, single_curve)


def _slurm_job_id() -> tuple[int, int]:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on 127.0.0.1 now."""
    for _ in range(50):
        job = random.randrange(10**5, 10**7)
        port = 61440 + job % 4096
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise AssertionError("no free port in 61440..65535")


# what `srun -N1 -n2` sets for both tasks (besides SLURM_PROCID and SLURM_LOCALID)
SRUN_STEP = """SLURM_JOB_ID={job} SLURM_JOBID={job} SLURM_STEP_ID=0 SLURM_STEPID=0 SLURM_NODEID=0
SLURM_NTASKS=2 SLURM_NPROCS=2 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_NUM_NODES=1 SLURM_NNODES=1
SLURM_JOB_NODELIST=127.0.0.1 SLURM_STEP_NODELIST=127.0.0.1 SLURM_NODELIST=127.0.0.1
SLURM_TASKS_PER_NODE=2"""


@pytest.mark.slow
def test_the_environment_srun_sets_reproduces_the_single_process_curve(tmp_path, single_curve):
    job, port = _slurm_job_id()
    workdir = tmp_path / "slurm"
    procs = []
    for i in range(2):  # task i of `srun -N1 -n2 jaxnv train ...`
        env = _env(JAXNV_CPU_DEVICES="4", SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
        env.update(kv.split("=") for kv in SRUN_STEP.format(job=job).split())
        out = open(tmp_path / f"task{i}.log", "w+", encoding="utf-8")
        cmd = [*_jaxnv(), "train", "binary_classification", "--workdir", str(workdir), *ARGS, *MESH]
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), out))
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"task{i}.log").read_text(encoding="utf-8") for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    for i, log in enumerate(logs):
        joined = f"jaxnv: joined 2 processes via SLURM (this is process {i}), coordinator "
        assert f"{joined}127.0.0.1:{port}" in log
    _check_curve(workdir, single_curve)


def _ranks(tag: str) -> dict[int, int]:
    """{rank: pid} of the live processes whose environment carries `tag` (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"OMPI_COMM_WORLD_RANK=")]
        if f"JAXNV_TEST_TAG={tag}".encode() in env and rank:
            found[int(rank[0].split(b"=")[1])] = int(pid)
    return found


def _steps(workdir) -> tuple[int, int]:
    """(last logged train step, newest committed checkpoint) read from the files as they are."""
    try:
        logged = max((r["step"] for r in _train_rows(workdir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half-written
        logged = 0
    ckpts = Path(workdir, "checkpoints")
    # orbax renames a step's temporary directory to the bare number only once it is complete
    saved = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    return logged, max(saved, default=0)


@needs_mpirun
@pytest.mark.slow
def test_a_dead_rank_ends_the_mpirun_job_and_a_smaller_restart_resumes(tmp_path, single_curve):
    workdir, every, tag = tmp_path / "w", 10, uuid.uuid4().hex
    cmd = [*_mpirun(2), *_jaxnv(), "train", "binary_classification", "--workdir", str(workdir)]
    cmd += [*ARGS, *MESH, f"checkpoint.every={every}"]
    log = open(tmp_path / "mpirun.log", "w", encoding="utf-8")
    env = _env(JAXNV_CPU_DEVICES="4", JAXNV_TEST_TAG=tag)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # kill rank 1 mid-way between two saves, once the earlier one is committed: an async
        # save in flight is not a checkpoint yet, so this is the moment the claim is about
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "mpirun.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never got between two saves"
            logged, saved = _steps(workdir)
            if logged > every and saved == logged // every * every and logged % every <= 7:
                break
            time.sleep(0.02)
        os.kill(_ranks(tag)[1], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"mpirun ended {took:.1f} s after the kill")
    assert code != 0 and took < 60, f"exit {code} after {took:.1f} s"
    assert _ranks(tag) == {}  # rank 0 went down with the job
    logged, saved = _steps(workdir)
    assert Checkpointer(str(workdir / "checkpoints")).latest_step() == saved
    print(f"last logged step {logged}, newest checkpoint {saved}")
    assert every <= saved and logged - saved <= every, (logged, saved)

    # restart on half the processes (one rank of 8 devices, same mesh): resumes from `saved`
    proc = subprocess.run(
        [*_mpirun(1), *cmd[len(_mpirun(2)) :]],
        env=_env(JAXNV_CPU_DEVICES="8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resuming from step {saved}" in proc.stdout + proc.stderr
    assert "joined" not in proc.stderr  # one rank joins nothing
    _check_curve(workdir, single_curve)  # rows before `saved` from 2 ranks, after from 1


# ---- deploy/: the sbatch template and the Kubernetes manifest ----

SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
MANIFEST = ROOT / "deploy" / "k8s" / "train.yaml"


def test_sbatch_template_runs_srun_and_requeues_a_preempted_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("srun", EXIT_PREEMPTED), ("scontrol", 0)):  # record, then exit
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\nexit {code}\n')
        script.chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77")
    cmd = ["bash", str(SBATCH), "char_gpt", "/shared/runs/a", "mesh.rules=fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 jaxnv train char_gpt --workdir /shared/runs/a mesh.rules=fsdp",
        "scontrol requeue 77",
    ]
    sbatch = [ln.split()[1] for ln in SBATCH.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "--signal=TERM@120" in sbatch and "--requeue" in sbatch


K8S_VALUES = {
    "NAME": "char-gpt",
    "IMAGE": "registry.example.com/jaxnv:latest",
    "EXPERIMENT": "char_gpt",
    "NUM_PROCESSES": "4",
    "GPUS_PER_PROCESS": "8",
    "RUNS_PVC": "jaxnv-runs",
}


def _render() -> list[dict]:
    """The manifest as `envsubst` renders it (string.Template: the same ${VAR} syntax)."""
    template = string.Template(MANIFEST.read_text(encoding="utf-8"))
    assert set(template.get_identifiers()) == set(K8S_VALUES)
    text = template.substitute(K8S_VALUES)
    assert "$" not in text.split("apiVersion:", 1)[1]  # nothing left unrendered
    return list(yaml.safe_load_all(text))


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_k8s_manifest_validates_against_the_kubernetes_schema(version):
    import kubernetes_validate  # bundles the published JSON schemas: no cluster, no network

    docs = _render()
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:  # strict: an unknown or misspelled field is an error too
        kubernetes_validate.validate(doc, version, strict=True)
    docs[1]["spec"]["completionmode"] = "Indexed"  # the validator does catch a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="completionmode"):
        kubernetes_validate.validate(docs[1], version, strict=True)


def test_k8s_manifest_wires_the_env_jaxnv_reads(monkeypatch):
    service, job = _render()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    n = int(env["JAXNV_NUM_PROCESSES"]["value"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == n
    # headless, resolvable before Ready, selecting exactly this Job's pods, named as their subdomain
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pod["subdomain"] == service["metadata"]["name"]
    # process 0's pod is <job>-0 (Indexed Job hostnames), reached on the Service's port
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    assert container["ports"][0]["containerPort"] == port
    host = f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert env["JAXNV_COORDINATOR"]["value"] == f"{host}:{port}"
    assert len(f"{job['metadata']['name']}-{n - 1}") <= 63  # a pod hostname is one DNS label
    index = env["JAXNV_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # preempted pods (exit 75) are replaced and resume; anything else fails the whole Job
    (preempted,) = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert preempted["action"] == "Ignore" and preempted["onExitCodes"]["values"] == [75]
    assert EXIT_PREEMPTED == 75 and spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    # the workdir is on the shared claim every pod mounts
    workdir = container["command"][container["command"].index("--workdir") + 1]
    (mount,) = container["volumeMounts"]
    assert workdir.startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == K8S_VALUES["RUNS_PVC"]
    # what pod 2 then sees, as jaxnv reads it (the kubelet fills in the annotation)
    _clear_launchers(monkeypatch)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("JAXNV_COORDINATOR", env["JAXNV_COORDINATOR"]["value"])
    monkeypatch.setenv("JAXNV_NUM_PROCESSES", env["JAXNV_NUM_PROCESSES"]["value"])
    monkeypatch.setenv("JAXNV_PROCESS_ID", "2")
    assert distributed.detect() == distributed.Cluster(
        "Kubernetes (JAXNV_COORDINATOR)", "char-gpt-0.char-gpt:55527", 4, 2, explicit=True
    )
