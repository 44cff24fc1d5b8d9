"""The model-zoo experiments reach their stated results (CPU, end to end through `train`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.train import train

QUIET = ["logging.progress=false", "logging.mfu=false"]


def _train(name, *overrides):
    exp = load_experiment(name)
    exp.config = apply_overrides(exp.config, [*QUIET, *overrides])
    return exp, train(exp)


@pytest.mark.slow
def test_digits_cnn_default_config_reaches_98_percent():
    """Default config (600 steps, ~15 s here): accuracy >= 0.98 on the fixed 360-image split."""
    _, result = _train("digits_cnn")
    assert result.eval_metrics["accuracy"] >= 0.98
    assert len(result.data.eval["y"]) == 360  # the whole test split, none dropped


@pytest.mark.slow
def test_sequence_lstm_beats_the_memoryless_baseline():
    """A shortened run (600 steps) gets the adding problem's mse far below the 1/6 baseline."""
    _, result = _train("sequence_lstm", "train.steps=600", "train.eval_every=0")
    baseline = result.data.info["baseline_mse"]
    assert result.eval_metrics["loss"] < 0.1 * baseline


@pytest.mark.slow
def test_char_gpt_learns_below_unigram_entropy_and_samples_corpus_characters():
    """A small char_gpt (2 x 64, 150 steps, ~20 s here) falls below 85% of the unigram entropy."""
    exp, result = _train(
        "char_gpt",
        "train.steps=150",
        "train.eval_every=0",
        "model.embed_dim=64",
        "model.num_layers=2",
        "data.seq_len=64",
        "optimizer.warmup_steps=20",
    )
    entropy = result.data.info["unigram_entropy"]
    assert result.eval_metrics["loss"] < 0.85 * entropy, (result.eval_metrics, entropy)
    module = __import__("jaxnv_experiment_char_gpt")
    text = module.sample(result, prompt="def ", n=40, temperature=0.8)
    assert text.startswith("def ") and len(text) == 44
    assert set(text) <= set(result.data.info["vocab"])
    greedy = module.sample(result, prompt="def ", n=40, temperature=0.0)
    assert greedy == module.sample(result, prompt="def ", n=40, temperature=0.0, seed=1)
    assert "sample" in result.summary and np.isfinite(result.summary["unigram_entropy"])


@pytest.mark.slow
def test_char_gpt_shorter_than_its_warmup_runs_with_one_warning_line(tmp_path):
    """`jaxnv train char_gpt train.steps=20`: the 50-step warmup is clamped to 2, said once."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "train", "char_gpt", "train.steps=20"]
    proc = subprocess.run(
        [*cmd, "--workdir", str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
    warnings = [line for line in lines if "warning" in line.lower()]
    assert warnings == [
        "jaxnv: warning: optimizer.warmup_steps=50 does not fit a schedule of 20 steps: "
        "warming up over 2 steps (10% of them) instead"
    ]
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 20
