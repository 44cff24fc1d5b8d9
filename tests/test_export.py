"""Export: `predict` serialized with jax.export beside its params, run without the model's code."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnv import cli
from jaxnv import config as config_lib
from jaxnv.config import DataConfig
from jaxnv.data import make_dataset
from jaxnv.experiment import load_experiment
from jaxnv.serve.export import export_predict, export_workdir, load
from jaxnv.train import train

QUIET = ["logging.progress=false", "logging.mfu=false", "logging.tensorboard=false"]
RUNS = {  # name -> (experiment, overrides): a linear model, an MLP (int-keyed layers), bf16
    "house": ("house_prices", ["train.steps=20"]),
    "mlp": ("binary_classification", ["train.steps=20", "optimizer.warmup_steps=5"]),
    "mlp_bf16": (
        "binary_classification",
        ["train.steps=10", "optimizer.warmup_steps=5", "precision.policy=bf16"],
    ),
}
BATCHES = (1, 7, 64)


def _experiment(name):
    exp_name, overrides = RUNS[name]
    exp = load_experiment(exp_name)
    exp.config = config_lib.validate(config_lib.apply_overrides(exp.config, overrides + QUIET))
    return exp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run trained into a workdir and exported; the in-process model's predictions."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in RUNS:
        exp = _experiment(name)
        result = train(exp, workdir=str(root / name))
        s, policy = result.state, result.policy
        model = nnx.merge(result.graphdef, policy.cast_to_compute(s.params), s.model_state)
        x = np.asarray(result.data.eval["x"][: max(BATCHES)])
        path = export_workdir(exp, str(root / name), str(root / f"{name}.export"))
        jitted = jax.jit(lambda p, ms, x, g=result.graphdef: nnx.merge(g, p, ms)(x, None))
        eager = np.asarray(model(x, None))  # the model as the experiment code runs it
        fn = np.asarray(jitted(policy.cast_to_compute(s.params), s.model_state, x))
        pre = result.data.info.get("preprocessing")
        if pre:  # the export takes raw features and returns raw outputs (house_prices: k$)
            x = (x * pre["input_std"] + pre["input_mean"]).astype(np.float32)
            eager = eager * np.float32(pre["output_std"][0]) + np.float32(pre["output_mean"][0])
            fn = fn * np.float32(pre["output_std"][0]) + np.float32(pre["output_mean"][0])
        out[name] = {
            "exp": exp,
            "workdir": str(root / name),
            "path": path,
            "x": x,
            "eager": eager,
            "jit": fn,
            "policy": policy,
            "model": (result.graphdef, s.params, s.model_state),
        }
    return out


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_manifest_describes_the_artifact(runs):
    r = runs["house"]
    assert sorted(os.listdir(r["path"])) == ["manifest.json", "params.npz", "predict.jaxexport"]
    m = json.loads(open(os.path.join(r["path"], "manifest.json"), encoding="utf-8").read())
    assert m["format_version"] == 1 and m["platforms"] == ["cpu", "cuda"]
    assert m["input"] == {"shape": [None, 4], "dtype": "float32"}
    assert m["output"] == {"shape": [None, 1], "dtype": "float32"}
    assert m["meta"] == {"experiment": "house_prices", "step": 20}
    assert config_lib.from_dict(m["config"]) == r["exp"].config
    assert set(m["arrays"]) == {"params/dense/kernel", "params/dense/bias"}
    assert set(m["sha256"]) == {"params.npz", "predict.jaxexport"}
    assert load(r["path"]).manifest == m
    leftovers = [n for n in os.listdir(os.path.dirname(r["path"])) if ".tmp-" in n]
    assert leftovers == []  # written to a temporary sibling and renamed


def test_fresh_process_runs_the_export_without_experiment_code(runs, tmp_path):
    """A new interpreter runs each export, first with jax + numpy alone, then via jaxnv's loader."""
    jobs = []
    for name, r in runs.items():
        for b in BATCHES:  # one artifact, any batch size: the batch dimension is symbolic
            np.save(tmp_path / f"{name}_{b}.npy", r["x"][:b], allow_pickle=False)
            jobs.append((r["path"], str(tmp_path / f"{name}_{b}.npy"), str(tmp_path / name)))
    script = """
import json, sys
import numpy as np
from jax import export

def nest(flat):  # "params/hidden/0/kernel" -> {"params": {"hidden": {"0": {"kernel": ...}}}}
    tree = {}
    for key, value in flat.items():
        *parents, last = key.split("/")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return tree

jobs = json.loads(sys.argv[1])
for path, x_file, out in jobs:  # the format, read with jax + numpy only
    with open(f"{path}/predict.jaxexport", "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    with np.load(f"{path}/params.npz", allow_pickle=False) as z:
        tree = nest({k: z[k] for k in z.files})
    x = np.load(x_file, allow_pickle=False)
    y = exported.call(tree["params"], tree.get("model_state", {}), x)
    np.save(f"{out}_{len(x)}_raw.npy", np.asarray(y), allow_pickle=False)
assert not [m for m in sys.modules if m.startswith("jaxnv")], "jaxnv was imported"

from jaxnv.serve.export import load
for path, x_file, out in jobs:
    x = np.load(x_file, allow_pickle=False)
    np.save(f"{out}_{len(x)}.npy", load(path)(x), allow_pickle=False)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("jaxnv"))))
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(jobs)],
        cwd=tmp_path,  # no ./experiments here
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.splitlines()[-1])
    for part in ("jaxnv_experiment_", "jaxnv.experiment", "jaxnv.models", "jaxnv.train"):
        assert not [m for m in imported if m.startswith(part)], imported
    for name, r in runs.items():
        for b in BATCHES:
            for suffix in ("_raw", ""):
                y = np.load(tmp_path / f"{name}_{b}{suffix}.npy", allow_pickle=False)
                assert y.shape == (b, 1) and y.dtype == np.float32
                np.testing.assert_allclose(y, r["jit"][:b], rtol=1e-6, atol=1e-6)
                if name != "mlp_bf16":  # fp32: equal to the eager model of the experiment code
                    np.testing.assert_allclose(y, r["eager"][:b], rtol=1e-6, atol=1e-6)


def test_bf16_export_computes_in_bf16(runs):
    r = runs["mlp_bf16"]
    predictor = load(r["path"])
    assert predictor.manifest["policy"] == "params=float32,compute=bfloat16,output=float32"
    assert "bf16" in predictor.exported.mlir_module()  # the matmuls run in bfloat16
    assert predictor.params["hidden"]["0"]["kernel"].dtype == np.float32  # fp32 masters stored
    y = predictor(r["x"])
    np.testing.assert_allclose(y, r["jit"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, r["eager"], rtol=2e-2, atol=2e-2)  # op-by-op bf16 rounding


def test_never_overwrites_an_export(runs):
    r = runs["house"]
    before = {n: open(os.path.join(r["path"], n), "rb").read() for n in os.listdir(r["path"])}
    with pytest.raises(FileExistsError) as err:
        export_workdir(r["exp"], r["workdir"], r["path"])
    assert "already exists" in _one_line(err) and "--out" in str(err.value)
    with pytest.raises(FileExistsError):
        export_predict(None, {}, {}, r["policy"], r["x"][:1], r["path"])
    after = {n: open(os.path.join(r["path"], n), "rb").read() for n in os.listdir(r["path"])}
    assert after == before


@pytest.mark.parametrize("name", ["params.npz", "predict.jaxexport"])
def test_corrupt_files_are_detected(runs, tmp_path, name):
    path = shutil.copytree(runs["house"]["path"], tmp_path / "copy")
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        load(str(path))
    msg = _one_line(err)
    assert "is corrupt" in msg and name in msg and "re-export it" in msg
    (path / name).unlink()
    with pytest.raises(ValueError, match="is corrupt"):
        load(str(path))


def test_unreadable_manifest_and_missing_export(runs, tmp_path):
    path = shutil.copytree(runs["house"]["path"], tmp_path / "copy")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError) as err:
        load(str(path))
    assert "is corrupt" in _one_line(err)
    with pytest.raises(FileNotFoundError, match="no export at"):
        load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("shape", "dtype", "fix"),
    [
        ((3, 5), np.float32, "pass that shape"),
        ((4,), np.float32, "pass that shape"),
        ((3, 4, 1), np.float32, "pass that shape"),
        ((0, 4), np.float32, "pass that shape"),
        ((3, 4), np.float64, "astype('float32')"),
        ((3, 4), np.int32, "astype('float32')"),
    ],
)
def test_wrong_input_is_refused_in_one_line(runs, shape, dtype, fix):
    predictor = load(runs["house"]["path"])
    with pytest.raises(ValueError) as err:
        predictor(np.zeros(shape, dtype))
    msg = _one_line(err)
    assert "this export takes (batch, 4) float32" in msg and fix in msg


def test_exported_function_itself_refuses_wrong_shapes(runs):
    predictor = load(runs["house"]["path"])
    x = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="Shape mismatch"):
        predictor.exported.call(predictor.params, predictor.model_state, x)


def test_cli_export_then_predict(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)  # main() would set XLA_FLAGS
    r, out = runs["house"], str(tmp_path / "cli.export")
    argv = ["export", "house_prices", "--workdir", r["workdir"], "--out", out]
    overrides = RUNS["house"][1] + QUIET
    assert cli.main([*argv, *overrides]) == 0
    assert f"to {out}: input (batch, 4) float32 -> output (batch, 1) float32" in (
        capsys.readouterr().out
    )
    assert cli.main([*argv, *overrides]) == 2  # the export exists: refused in one line
    assert "jaxnv: error: export" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", r["x"][:7], allow_pickle=False)
    proc = subprocess.run(  # a fresh process, as other people's scripts will run it
        [sys.executable, "-m", "jaxnv.cli", "predict", out, "--input", "x.npy"]
        + ["--output", "y.npy"],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "predicted (7, 1) float32 from input (7, 4) float32" in proc.stdout
    y = np.load(tmp_path / "y.npy", allow_pickle=False)
    np.testing.assert_allclose(y, r["eager"][:7], rtol=1e-6, atol=1e-6)
    np.save(tmp_path / "bad.npy", r["x"][:7, :3], allow_pickle=False)
    predict = ["predict", out, "--input", str(tmp_path / "bad.npy")]
    assert cli.main(predict) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "jaxnv: error: input has shape (7, 3) float32; this export takes (batch, 4) float32: "
        "pass that shape (any batch size >= 1)"
    ]
    y_path = str(tmp_path / "y.npy")
    assert cli.main([*predict[:3], str(tmp_path / "x.npy"), "--output", y_path]) == 2
    assert "already exists" in capsys.readouterr().err  # predictions are not overwritten either


def test_export_of_a_workdir_without_checkpoints_is_refused(tmp_path):
    exp = _experiment("house")
    with pytest.raises(FileNotFoundError, match="no checkpoints in") as err:
        export_workdir(exp, str(tmp_path / "empty"), str(tmp_path / "out"))
    _one_line(err)
    assert os.listdir(tmp_path) == []  # nothing created


def test_platforms_are_checked(runs, tmp_path):
    r = runs["house"]
    with pytest.raises(ValueError) as err:
        export_predict(*r["model"], r["policy"], r["x"][:1], str(tmp_path / "a"), platforms=["gpu"])
    assert "unknown export platforms ['gpu']" in _one_line(err) and "cuda" in str(err.value)
    # cuda lowers on this CPU-only machine, but a CPU cannot run it: refused at load, in one line
    path = export_predict(
        *r["model"], r["policy"], r["x"][:1], str(tmp_path / "b"), platforms=["cuda"]
    )
    with pytest.raises(ValueError) as err:
        load(path)
    assert "was made for cuda, not cpu" in _one_line(err)


def test_house_export_takes_raw_features_and_records_how(runs):
    """The data set's standardization is compiled in: raw features (m2, rooms, years, km) in,
    prices in k$ out, and the manifest says so."""
    predictor = load(runs["house"]["path"])
    info = make_dataset(DataConfig(name="house_prices")).info
    pre = predictor.manifest["preprocessing"]
    np.testing.assert_allclose(pre["input_mean"], info["feature_mean"])
    np.testing.assert_allclose(pre["output_std"], [info["price_std"]])
    graphdef, params, model_state = runs["house"]["model"]
    model = nnx.merge(graphdef, params, model_state)
    raw = np.array([[120.0, 3.0, 20.0, 5.0], [60.0, 1.0, 70.0, 25.0]], np.float32)
    standardized = (raw - info["feature_mean"]) / info["feature_std"]
    price = np.asarray(model(standardized.astype(np.float32))) * info["price_std"]
    np.testing.assert_allclose(predictor(raw), price + info["price_mean"], rtol=1e-5, atol=1e-3)
