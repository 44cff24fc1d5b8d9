"""End to end: each experiment in experiments/ trained once, checked against numpy references.

The runs are shared across the tests of this module (one `train` per experiment).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnv import config as config_lib
from jaxnv.core.losses import bce_loss, mse_loss
from jaxnv.core.optim import make_optimizer
from jaxnv.core.state import init_state
from jaxnv.core.step import make_eval_step
from jaxnv.experiment import available_experiments, load_experiment
from jaxnv.train import Callback, evaluate, train

EXPERIMENTS = ("house_prices", "binary_classification", "mlp_regression")


def _load(name, *overrides):
    exp = load_experiment(name)
    exp.config = config_lib.apply_overrides(exp.config, ["logging.progress=false", *overrides])
    return exp


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`run(name) -> (exp, result, workdir)`, training each experiment at most once."""
    cache = {}

    def get(name):
        if name not in cache:
            exp = _load(name)
            workdir = tmp_path_factory.mktemp(name) / "run"
            cache[name] = (exp, train(exp, workdir=str(workdir)), workdir)
        return cache[name]

    return get


def _params(params) -> dict:
    """Params (an nnx.State or the plain dict a jitted init returns) as numpy float64."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return jax.tree.map(lambda p: np.asarray(p, np.float64), params)


def _np_relu_mlp(params, x):
    h = np.asarray(x, np.float64)  # (B, F)
    for i in range(len(params["hidden"])):
        h = np.maximum(h @ params["hidden"][i]["kernel"] + params["hidden"][i]["bias"], 0)
    return h @ params["head"]["kernel"] + params["head"]["bias"]  # (B, out)


def _rows(workdir):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_experiments_are_discoverable():
    assert set(EXPERIMENTS) <= set(available_experiments())


def test_load_experiment_by_name_fills_the_defaults():
    exp = load_experiment("binary_classification")
    assert exp.name == "binary_classification"
    assert exp.config.train.loss == "bce" and exp.resolved_loss_fn() is bce_loss
    assert exp.summarize is None  # the file defines none
    assert load_experiment("house_prices").summarize is not None  # this one does


def test_load_experiment_from_a_py_path(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(
        textwrap.dedent(
            """
            from jaxnv.config import Config, TrainConfig

            def config():
                return Config(train=TrainConfig(steps=3, loss="mse"))

            def summarize(result):
                return {"tiny": True}
            """
        )
    )
    exp = load_experiment(str(path))
    assert exp.name == "tiny" and exp.config.train.steps == 3
    assert exp.summarize(None) == {"tiny": True}
    assert exp.loss_fn is None and exp.resolved_loss_fn() is mse_loss


def test_load_experiment_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'house_prices'"):
        load_experiment("house_price")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_experiment(str(tmp_path / "missing.py"))
    path = tmp_path / "noconfig.py"
    path.write_text("X = 1\n")
    with pytest.raises(ValueError, match="defines no config"):
        load_experiment(str(path))


def test_house_prices_recovers_generating_weights(run):
    """The trained kernel is within 0.01 (standardized units) of np.linalg.lstsq on the same train
    split, and within 5 standard errors of the generating `info["weights"]`, where
    SE_j = noise * sqrt([(A^T A)^-1]_jj), A = [x_train, 1] (the sampling std of least squares
    under the data's Gaussian noise). The bias is held to the same two bounds around 0.
    """
    exp, result, _ = run("house_prices")
    data, noise = result.data, exp.config.data.noise
    p = _params(result.state.params)["dense"]
    learned = np.r_[p["kernel"][:, 0], p["bias"]]
    a = np.c_[data.train["x"].astype(np.float64), np.ones(len(data.train["x"]))]
    lstsq, *_ = np.linalg.lstsq(a, data.train["y"][:, 0].astype(np.float64), rcond=None)
    np.testing.assert_array_less(np.abs(learned - lstsq), 0.01)
    se = noise * np.sqrt(np.diag(np.linalg.inv(a.T @ a)))
    truth = np.r_[data.info["weights"], data.info["bias"]]
    np.testing.assert_array_less(np.abs(learned - truth), 5 * se)
    # The final eval mse sits at the noise floor (noise**2), as the experiment's docstring says:
    # within 5 SE of a mean of 200 squared N(0, noise) draws (SE = noise**2 sqrt(2 / n)) plus the
    # few-SE coefficient error (each of the 4 weights and the bias adds at most (5 SE)**2 on
    # unit-variance features).
    n_eval = len(data.eval["y"])
    floor_tol = 5 * noise**2 * np.sqrt(2 / n_eval) + 5 * (5 * se.max()) ** 2
    assert abs(result.eval_metrics["loss"] - noise**2) < floor_tol


def test_house_prices_eval_loss_matches_numpy(run):
    """`evaluate`'s example-weighted mean over batches (last one partial) equals numpy's mse."""
    _, result, _ = run("house_prices")
    p = _params(result.state.params)["dense"]
    ev = result.data.eval
    pred = ev["x"].astype(np.float64) @ p["kernel"] + p["bias"]
    want = np.mean((pred - ev["y"]) ** 2)
    np.testing.assert_allclose(result.eval_metrics["loss"], want, rtol=1e-5)
    # Again with batches that do not divide the 200 eval examples (64 + 64 + 64 + 8).
    step = make_eval_step(result.graphdef, _load("house_prices").resolved_loss_fn(), result.policy)
    got = evaluate(step, result.state, ev, batch_size=64)
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)


def test_binary_classification_accuracy(run):
    """Held-out accuracy >= 0.95, recomputed in numpy float64 from the trained params.

    The numpy forward may flip an example whose logit is within float32 rounding of 0, so the
    reported accuracy must match it to within 2 examples.
    """
    _, result, _ = run("binary_classification")
    ev = result.data.eval
    logits = _np_relu_mlp(_params(result.state.params), ev["x"])[:, 0]
    labels = ev["y"][:, 0]
    acc = np.mean((logits > 0) == (labels > 0.5))
    assert acc >= 0.95
    assert abs(result.eval_metrics["accuracy"] - acc) <= 2 / len(labels)
    # The reported loss is the binary cross-entropy of those logits, over all 500 eval examples
    # (eval_batch_size 256: one full batch and one partial).
    bce = np.mean(np.logaddexp(0, logits) - labels * logits)
    np.testing.assert_allclose(result.eval_metrics["loss"], bce, rtol=1e-5)


def test_mlp_regression_learns(run):
    """Eval mse ends <= 0.06 and below 10% of the eval mse of the initial params (about the
    targets' variance, 1 + noise**2); both losses are also recomputed in numpy float64.
    """
    exp, result, _ = run("mlp_regression")
    cfg, data, policy = exp.config, result.data, result.policy
    ev = data.eval

    def np_mse(params):
        return np.mean((_np_relu_mlp(_params(params), ev["x"]) - ev["y"]) ** 2)

    # The state `train` starts from: same model function, optimizer and seed.
    graphdef, state0 = init_state(
        lambda rngs: exp.make_model(cfg, data, policy, rngs),
        make_optimizer(cfg.optimizer, cfg.train.steps),
        policy,
        jax.random.PRNGKey(cfg.train.seed),
    )
    eval_step = make_eval_step(graphdef, exp.resolved_loss_fn(), policy)
    initial = evaluate(eval_step, state0, ev, cfg.train.eval_batch_size)["loss"]
    np.testing.assert_allclose(initial, np_mse(state0.params), rtol=1e-5)
    final = result.eval_metrics["loss"]
    np.testing.assert_allclose(final, np_mse(result.state.params), rtol=1e-5)
    assert final <= 0.06
    assert final < 0.1 * initial
    assert final < 0.1 * np.var(ev["y"])
    evals = [row["loss"] for row in result.history if row["split"] == "eval"]
    assert len(evals) == cfg.train.steps // cfg.train.eval_every
    assert all(b < a for a, b in zip(evals, evals[1:], strict=False))  # improves at every eval


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_workdir_contents(run, name):
    exp, result, workdir = run(name)
    cfg = exp.config
    assert sorted(os.listdir(workdir)) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "tensorboard",
    ]

    with open(workdir / "config.json", encoding="utf-8") as f:
        assert config_lib.from_dict(json.load(f)) == cfg

    rows = _rows(workdir)
    assert rows == result.history  # what was written is what the run reports
    for row in rows:
        assert isinstance(row["step"], int) and row["split"] in ("train", "eval")
        assert isinstance(row["loss"], float) and math.isfinite(row["loss"])
    for split, every in (("train", cfg.logging.log_every), ("eval", cfg.train.eval_every)):
        steps = [r["step"] for r in rows if r["split"] == split]
        assert all(b > a for a, b in zip(steps, steps[1:], strict=False))
        assert steps[-1] == cfg.train.steps
        assert steps == list(range(every, cfg.train.steps + 1, every))  # these configs divide
    train_keys = set(next(r for r in rows if r["split"] == "train"))
    assert {"loss", "grad_norm", "learning_rate", "steps_per_sec"} <= train_keys
    last_eval = [r for r in rows if r["split"] == "eval"][-1]
    assert {k: v for k, v in last_eval.items() if k not in ("step", "split")} == pytest.approx(
        result.eval_metrics, rel=1e-12
    )

    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    blob = events[0].read_bytes()
    assert b"train/loss" in blob and b"eval/loss" in blob  # scalar tags are stored verbatim

    with open(workdir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["experiment"] == name
    assert summary["steps"] == cfg.train.steps
    assert summary["eval_loss"] == pytest.approx(last_eval["loss"], rel=1e-12)
    assert summary["params"] == sum(np.size(p) for p in jax.tree.leaves(result.state.params))


def test_house_prices_summary_reports_raw_weights(run):
    """The experiment's `summarize` converts the learned kernel to k$ per unit."""
    _, result, workdir = run("house_prices")
    info = result.data.info
    kernel = _params(result.state.params)["dense"]["kernel"][:, 0]
    raw = kernel * info["price_std"] / info["feature_std"]
    with open(workdir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    for name, w, true in zip(info["features"], raw, info["raw_weights"], strict=True):
        assert summary[name] == f"{w:.3f} (true {true:.3f})"


def test_train_again_on_a_finished_workdir_changes_nothing(run):
    exp, first, workdir = run("house_prices")
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    again = train(_load("house_prices"), workdir=str(workdir))
    assert again.summary["resumed_from"] == exp.config.train.steps
    assert "already trained" in again.summary["note"]
    np.testing.assert_allclose(again.eval_metrics["loss"], first.eval_metrics["loss"], rtol=1e-6)
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after == before  # nothing on disk lost or appended
    assert len(list((workdir / "tensorboard").iterdir())) == 1  # no second event file


def test_callbacks_see_every_logged_row_without_a_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Recorder(Callback):
        def __init__(self):
            self.rows, self.ends = [], []

        def on_log(self, step, split, scalars, state):
            self.rows.append({"step": step, "split": split, **scalars})

        def on_end(self, result):
            self.ends.append(result)

    rec = Recorder()
    exp = _load("house_prices", "train.steps=20", "train.eval_every=10", "logging.log_every=5")
    result = train(exp, callbacks=[rec])
    assert rec.rows == result.history
    assert [(r["step"], r["split"]) for r in rec.rows] == [
        (5, "train"),
        (10, "train"),
        (10, "eval"),
        (15, "train"),
        (20, "train"),
        (20, "eval"),
    ]
    assert rec.ends == [result]
    assert int(result.state.step) == 20
    assert os.listdir(tmp_path) == []  # no workdir: nothing written


def test_accumulate_steps_schedule_spans_the_updates_that_happen(tmp_path):
    """With optimizer.accumulate_steps=4 the cosine schedule is sized in optimizer updates."""
    exp = _load("house_prices")
    exp.config = config_lib.apply_overrides(
        exp.config,
        [
            "train.steps=40",
            "optimizer.accumulate_steps=4",
            "logging.mfu=false",
            "logging.log_every=4",
        ],
    )
    result = train(exp)
    rates = [r["learning_rate"] for r in result.history if r["split"] == "train"]
    peak = exp.config.optimizer.learning_rate
    assert rates[-1] < 0.1 * peak  # the cosine reached its end, not a quarter of the way


# ---- the typed model section of every experiment --------------------------------------------

# Written out by hand: each experiment's model and the keys `--print-config` shows for it.
LINEAR = {"name", "use_bias"}
MLP = {"name", "features", "activation", "dropout", "use_bias"}
TRANSFORMER_SWITCHES = {  # the architecture keys (Llama, Qwen2, GPT-2 layouts) and init_from
    "num_kv_heads", "head_dim", "position", "rope_theta", "rope_scaling", "rope_scaling_factor",
    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "norm", "norm_eps",
    "mlp", "qkv_bias", "out_bias", "mlp_bias", "attention", "matmul", "init_from",
}  # fmt: skip
MODEL_SECTIONS = {
    "house_prices": ("linear", LINEAR),
    "binary_classification": ("mlp", MLP),
    "mlp_regression": ("mlp", MLP),
    "digits_cnn": ("cnn", {"name", "features", "blocks_per_stage", "norm", "dropout"}),
    "sequence_lstm": ("lstm", {"name", "features", "vocab_size", "embed_dim"}),
    "char_gpt": (
        "transformer",
        {
            "name",
            "vocab_size",
            "num_layers",
            "num_heads",
            "embed_dim",
            "mlp_dim",
            "max_seq_len",
            "activation",
            "tie_embeddings",
            "remat",
            "dropout",
        }
        | TRANSFORMER_SWITCHES,
    ),
}
MODEL_SECTIONS["code_lm"] = MODEL_SECTIONS["char_gpt"]  # the same transformer section
MODEL_SECTIONS["finetune_lm"] = MODEL_SECTIONS["char_gpt"]


def test_every_experiment_has_its_model_section_written_down():
    assert set(MODEL_SECTIONS) == set(available_experiments())


@pytest.mark.parametrize("name", sorted(MODEL_SECTIONS))
def test_print_config_shows_only_the_models_fields(name):
    """What `--print-config` prints (`json.dumps(to_dict(cfg))`) holds the model's fields only."""
    model, keys = MODEL_SECTIONS[name]
    cfg = load_experiment(name).config
    printed = json.loads(json.dumps(config_lib.to_dict(cfg), indent=2))
    assert printed["model"]["name"] == model
    assert set(printed["model"]) == keys
    assert {k for k in config_lib.all_keys(cfg) if k.startswith("model.")} == {
        f"model.{k}" for k in keys
    }


@pytest.mark.parametrize("name", sorted(MODEL_SECTIONS))
def test_every_experiments_config_round_trips_through_json(name):
    cfg = load_experiment(name).config
    back = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg))))
    assert back == cfg and type(back.model) is type(cfg.model)
    # ... also when read on top of another experiment's config
    other = load_experiment("char_gpt" if name != "char_gpt" else "house_prices").config
    assert config_lib.from_dict(config_lib.to_dict(cfg), base=other) == cfg


def _cli(args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxnv.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_model_name_on_the_command_line_switches_the_printed_section(tmp_path):
    proc = _cli(
        ["train", "house_prices", "--print-config", "model.features=8", "model.name=mlp"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == {
        "name": "mlp",
        "features": [8],
        "activation": "relu",
        "dropout": 0.0,
        "use_bias": True,
    }
    proc = _cli(["train", "char_gpt", "--print-config", "model.features=8"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "jaxnv: error: unknown config key 'model.features' for model.name=transformer: "
        "did you mean 'model.embed_dim'?"
    )
    assert os.listdir(tmp_path) == []


def test_a_switched_model_is_the_one_built():
    from jaxnv.train import build

    exp = _load("house_prices", "model.name=mlp", "model.features=8")
    params = build(exp, abstract=True).state.params
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    assert set(params) == {"hidden", "head"} and params["hidden"][0]["kernel"].shape == (4, 8)
