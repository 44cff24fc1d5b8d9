"""Training a language model on the user's own files, as a user runs it: `jaxnv data prepare`,
then `jaxnv train code_lm data.path=...` on the prepared corpus or straight on JSONL files.
Exact resume after SIGKILL, several processes, the tokenizer kept with the run, one-line errors."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from jaxnv.cli import main

TINY = [
    "model.num_layers=1",
    "model.embed_dim=32",
    "model.num_heads=2",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.eval_every=0",
    "logging.log_every=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "logging.mfu=false",
    "optimizer.warmup_steps=0",
]


def _modules(n=24) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return (
        sorted(glob.glob(os.path.join(root, "json", "*.py")))[:n]
        + sorted(glob.glob(os.path.join(root, "email", "*.py")))[: n // 2]
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Python modules as JSONL (4 files), and their `jaxnv data prepare` (bytes tokenizer)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [open(p, encoding="utf-8").read() for p in _modules()]
    for part in range(4):
        with open(root / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            for t in texts[part::4]:
                f.write(json.dumps({"text": t}) + "\n")
    prepared = str(root / "prepared")
    code = main(["data", "prepare", "--input", str(root / "*.jsonl"), "--out", prepared])
    assert code == 0
    return {"jsonl": str(root / "*.jsonl"), "prepared": prepared, "texts": texts}


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxnv.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _errors(capsys) -> list[str]:
    """The error lines the command printed (warnings aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]


def _train_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def test_prepare_writes_what_the_tokenizer_encodes(corpus):
    from jaxnv.data.lm import PreparedCorpus

    prepared = PreparedCorpus(corpus["prepared"])
    got = sorted(bytes(prepared.doc(i).astype(np.uint8)).decode() for i in range(len(prepared)))
    assert got == sorted(corpus["texts"])  # bytes tokenizer: ids are the UTF-8 bytes


def _kill_at_random_step(workdir, args, steps) -> int:
    """Start a run, SIGKILL it once a checkpoint past a random step exists; the killed step."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "train", "code_lm", "--workdir", workdir, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = random.Random(os.getpid()).randrange(4, steps - 4)
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
            done = [int(n) for n in names if n.isdigit()]  # committed steps only
            if any(s >= target for s in done):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(done)
            time.sleep(0.01)
        raise AssertionError(f"the run ended before step {target}: {proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["prepared", "jsonl"])
def test_a_run_killed_at_a_random_step_resumes_bit_for_bit(corpus, tmp_path, source):
    steps = 16
    args = [
        *TINY,
        f"data.path={corpus[source]}",
        f"train.steps={steps}",
        "checkpoint.every=1",
        "data.eval_fraction=0.25",
        "data.packing=true",
    ]
    straight = str(tmp_path / "straight")
    proc = _cli("train", "code_lm", "--workdir", straight, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = str(tmp_path / "killed")
    at = _kill_at_random_step(killed, args, steps)
    assert 0 < at < steps
    proc = _cli("train", "code_lm", "--workdir", killed, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step {at}" in proc.stdout
    expected, got = _train_rows(straight), _train_rows(killed)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit for bit
    assert [r["accuracy"] for r in got] == [r["accuracy"] for r in expected]


@pytest.mark.slow
def test_two_processes_give_the_one_process_curve_on_a_prepared_corpus(corpus, tmp_path):
    from jaxnv import apply_overrides
    from jaxnv.experiment import load_experiment
    from jaxnv.train import train

    args = [*TINY, f"data.path={corpus['prepared']}", "train.steps=8", "data.packing=true"]
    workdir = str(tmp_path / "mp")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launch = [sys.executable, "-m", "jaxnv.cli", "launch", "-n", "2", "--cpu-devices", "4", "--"]
    cmd = [*launch, "train", "code_lm", "--workdir", workdir, *args, "mesh.data=8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    exp = load_experiment("code_lm")
    exp.config = apply_overrides(exp.config, args)
    exp.summarize = None
    import jax

    single = train(exp, devices=jax.devices()[:1])
    expected = [r["loss"] for r in single.history if r["split"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in _train_rows(workdir)], expected, rtol=1e-5)


def test_the_tokenizer_is_kept_with_the_run_and_another_is_refused(corpus, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    args = [*TINY, f"data.path={corpus['jsonl']}", "train.steps=2", "data.eval_fraction=0"]
    assert main(["train", "code_lm", "--workdir", workdir, *args, "data.tokenizer=bytes"]) == 0
    from jaxnv.data.tokenizers import load_saved

    assert load_saved(os.path.join(workdir, "tokenizer")).encode("é") == list("é".encode())
    before = sorted(os.listdir(workdir))
    code = main(
        ["train", "code_lm", "--workdir", workdir, *args, "data.tokenizer=bpe:300", "train.steps=4"]
    )
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and "another tokenizer" in err[0], err
    assert sorted(os.listdir(workdir)) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vocab_size=100", "smaller than the tokenizer's vocabulary (257 ids)"),
        ("model.max_seq_len=16", "exceeds model.max_seq_len=16"),
        ("data.path=/nonexistent/*.jsonl", "no file matches"),
        ("data.tokenizer=bpe:300", "is not the tokenizer"),  # the corpus was prepared with bytes
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, capsys, override, message):
    workdir = str(tmp_path / "bad")
    args = [*TINY, f"data.path={corpus['prepared']}", "train.steps=2", override]
    code = main(["train", "code_lm", "--workdir", workdir, *args])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_data_prepare_on_a_glob_that_matches_nothing_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["data", "prepare", "--input", str(tmp_path / "none*.jsonl"), "--out", str(out)])
    err = _errors(capsys)
    assert code == 2 and len(err) == 1 and "no file matches" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_a_stream_read_by_two_processes_resumes_exactly(tmp_path):
    """Each process streams its own files; both positions go into the checkpoint and come back."""
    rng = random.Random(0)  # short documents of mixed lengths: the processes end up at
    for part in range(4):  # different documents and offsets of their own files
        lines = [
            json.dumps({"text": f"doc {part}-{i}: " + "x = 1\n" * rng.randrange(2, 40)}) + "\n"
            for i in range(60)
        ]
        (tmp_path / f"part{part}.jsonl").write_text("".join(lines))
    args = [
        *TINY,
        f"data.path={tmp_path}/part*.jsonl",
        "data.eval_fraction=0",
        "optimizer.schedule=constant",  # the same curve whatever train.steps says
        "checkpoint.every=4",
        "mesh.data=8",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launch = [sys.executable, "-m", "jaxnv.cli", "launch", "-n", "2", "--cpu-devices", "4", "--"]

    def run(workdir, steps):
        cmd = [*launch, "train", "code_lm", "--workdir", workdir, *args, f"train.steps={steps}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:]
        return proc.stdout

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(straight, 12)
    run(split, 8)
    assert "resuming from step 8" in run(split, 12)
    expected, got = _train_rows(straight), _train_rows(split)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
