"""Export a trained model's `predict` with `jax.export`; load and run it without the model's code.

    export_workdir(load_experiment("house_prices"), "runs/house", "exports/house")
    predictor = load("exports/house")   # needs jax and numpy only: no experiment, no model code
    y = predictor(x)                    # numpy (B, 4) float32 in, numpy (B, 1) float32 out

A data set that standardizes its arrays declares it in `info["preprocessing"]`; the export then
compiles that in, so it takes raw inputs (house_prices: m2, rooms, years, km) and returns raw
outputs (k$).

An export is a directory (written to a temporary sibling, then renamed into place):

    OUT/
      manifest.json       format version, versions, input/output shapes (batch dim null), dtypes,
                          platforms, policy, config, every array's shape/dtype, sha256 of the others
      predict.jaxexport   `Exported.serialize()`: StableHLO of predict(params, model_state, x)
      params.npz          params and model state, one array per leaf, keyed "params/hidden/0/kernel"

No pickle anywhere: the function is a flatbuffer, the arrays are `.npz` read with
`allow_pickle=False`, the rest is JSON. The batch dimension is symbolic (`b`), so any batch size
runs the same artifact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnv import __version__

FORMAT = "jaxnv-export"
FORMAT_VERSION = 1
MANIFEST, FUNCTION, ARRAYS = "manifest.json", "predict.jaxexport", "params.npz"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for, on any machine
PREPROCESSING = {"input_mean", "input_std", "output_mean", "output_std"}


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """`{"prefix/a/0/b": leaf}` for a nested dict (keys may be str or int, as NNX makes them)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if any("/" in k for k in keys):
            raise ValueError(f"key path {keys} contains '/': rename that attribute to export it")
        flat["/".join([prefix, *keys])] = leaf
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `_flatten` with string keys: `{"a/0/b": v}` -> `{"a": {"0": {"b": v}}}`."""
    tree: dict[str, Any] = {}
    for key, leaf in flat.items():
        *parents, last = key.split("/")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = leaf
    return tree


def _dims(shape) -> list[int | str | None]:
    """A shape for JSON: ints stay, the batch dim `b` becomes null, other symbolic dims strings."""
    return [d if isinstance(d, int) else (None if str(d) == "b" else str(d)) for d in shape]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _refuse_existing(path: str) -> None:
    if os.path.exists(path):
        raise FileExistsError(
            f"export {path!r} already exists: pass a new --out path or remove the old export"
        )


def _check_platforms(platforms) -> None:
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(
            f"unknown export platforms {unknown or '(none)'}: use some of {', '.join(PLATFORMS)} "
            "(cuda for NVIDIA GPUs)"
        )


def export_predict(
    graphdef: nnx.GraphDef,
    params: dict,
    model_state: dict,
    policy,
    example_input,
    path: str,
    *,
    platforms: tuple[str, ...] = ("cpu", "cuda"),
    config: dict | None = None,
    meta: dict | None = None,
    preprocessing: dict | None = None,
) -> str:
    """Serialize `predict(params, model_state, x) = model(x)` (eval mode) to the directory `path`.

    `preprocessing` (the data set's `info["preprocessing"]`: `input_mean`, `input_std`,
    `output_mean`, `output_std`, each optional) is compiled into the function and recorded in the
    manifest: the export then takes inputs in their raw units and returns outputs in theirs.

    `example_input` (e.g. `data.eval["x"][:1]`) gives the per-example shape and dtype; its batch
    dimension becomes symbolic. Params are stored in their own (param) dtype and cast to the
    policy's compute dtype inside the function, as in the train step. `config` and `meta` (JSON
    values, e.g. the experiment and step) go into the manifest. Returns `path`; an existing
    `path` is never overwritten.
    """
    _refuse_existing(path)
    _check_platforms(platforms)
    x = np.asarray(example_input)
    if x.ndim < 1:
        raise ValueError(f"example input has shape {x.shape}: it needs a leading batch dimension")
    pre = {k: np.asarray(v, np.float32) for k, v in (preprocessing or {}).items()}
    if set(pre) - PREPROCESSING or ("input_mean" in pre) != ("input_std" in pre):
        raise ValueError(
            f"preprocessing keys {sorted(pre)}: give input_mean with input_std and/or "
            "output_mean with output_std"
        )
    flat = {**_flatten(params, "params"), **_flatten(model_state, "model_state")}
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
    # jax.export serializes dicts with string keys only; NNX lists have int keys. The function
    # takes the string-keyed trees (rebuilt from the .npz keys) and restores the real ones inside.
    treedef, order = jax.tree.structure((params, model_state)), list(arrays)

    def predict(params_s, model_state_s, x):
        by_key = {**_flatten(params_s, "params"), **_flatten(model_state_s, "model_state")}
        p, s = jax.tree.unflatten(treedef, [by_key[k] for k in order])
        model = nnx.merge(graphdef, policy.cast_to_compute(p), s)
        model.eval()  # NNX's eval mode: no dropout, BatchNorm on its running statistics
        b = {k: v[None] for k, v in pre.items()}  # (1, ...): broadcast over the batch dim
        if "input_mean" in pre:
            x = ((x - b["input_mean"]) / b["input_std"]).astype(x.dtype)
        y = model(x)
        if "output_mean" in pre:
            y = (y * b["output_std"] + b["output_mean"]).astype(y.dtype)
        return y

    specs = _nest({k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in arrays.items()})
    x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, ...", like=x.shape), x.dtype)
    exported = jax.export.export(jax.jit(predict), platforms=tuple(platforms))(
        specs.get("params", {}), specs.get("model_state", {}), x_spec
    )
    (out,) = exported.out_avals  # predict returns one array
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxnv_version": __version__,
        "jax_version": jax.__version__,
        "input": {"shape": _dims(x_spec.shape), "dtype": x.dtype.name},
        "output": {"shape": _dims(out.shape), "dtype": np.dtype(out.dtype).name},
        "batch_dim": "b",
        "platforms": list(exported.platforms),
        "policy": str(policy),
        "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()},
        "config": config,
        "meta": meta or {},
        # compiled into predict: inputs and outputs are in these raw units
        "preprocessing": {k: v.tolist() for k, v in pre.items()},
    }
    parent, base = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # a sibling, so the rename below stays on one file system
    try:
        with open(os.path.join(tmp, FUNCTION), "wb") as f:
            f.write(exported.serialize())
        # non-numpy dtypes (bfloat16) are stored as same-width unsigned ints; the manifest says
        savable = {
            k: a.view(f"u{a.itemsize}") if a.dtype.kind == "V" else a for k, a in arrays.items()
        }
        np.savez(os.path.join(tmp, ARRAYS), **savable)
        manifest["sha256"] = {n: _sha256(os.path.join(tmp, n)) for n in (FUNCTION, ARRAYS)}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=str)
        _refuse_existing(path)  # a concurrent export may have finished meanwhile
        os.rename(tmp, path)  # atomic: readers see no export or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class Predictor:
    """`predictor(x) -> y` for an export directory: numpy in, numpy out; no model code needed.

    `manifest` is the export's manifest; `exported` the deserialized `jax.export.Exported`, called
    as `exported.call(predictor.params, predictor.model_state, x)` (string-keyed nested dicts).
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise FileNotFoundError(f"no export at {path!r} (no {MANIFEST}): run `jaxnv export`")
        self.manifest = self._read_manifest()
        m = self.manifest
        for name in (FUNCTION, ARRAYS):
            file = os.path.join(path, name)
            if not os.path.isfile(file) or _sha256(file) != m["sha256"][name]:
                self._corrupt(f"{name} is missing or its sha256 differs from the manifest")
        with open(os.path.join(path, FUNCTION), "rb") as f:
            serialized = bytearray(f.read())
        try:
            self.exported = jax.export.deserialize(serialized)
        except Exception as err:  # noqa: BLE001 - the hash matched: a jax version problem
            raise ValueError(
                f"export at {path!r} (jax {m.get('jax_version')}) cannot be read by jax "
                f"{jax.__version__}: {str(err).splitlines()[0] if str(err) else type(err)}"
            ) from None
        with np.load(os.path.join(path, ARRAYS), allow_pickle=False) as z:
            flat = {k: z[k].view(jnp.dtype(m["arrays"][k]["dtype"])) for k in z.files}
        arrays = _nest(jax.device_put(flat))
        self.params, self.model_state = arrays.get("params", {}), arrays.get("model_state", {})
        self._fn = jax.jit(self.exported.call)
        self.input_shape = tuple(m["input"]["shape"])  # None for the batch dimension
        self.input_dtype = jnp.dtype(m["input"]["dtype"])

    def _corrupt(self, why: str):
        raise ValueError(f"export at {self.path!r} is corrupt: {why}; re-export it")

    def _read_manifest(self) -> dict:
        try:
            with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._corrupt(f"{MANIFEST} is not JSON ({err})")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            self._corrupt(f"{MANIFEST} is not a {FORMAT} manifest")
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"export at {self.path!r} has format version {m.get('format_version')}, this "
                f"jaxnv {__version__} reads version {FORMAT_VERSION}: use a matching jaxnv"
            )
        missing = {"input", "platforms", "arrays", "sha256"} - set(m)
        if missing:
            self._corrupt(f"{MANIFEST} lacks {', '.join(sorted(missing))}")
        backend = jax.default_backend()
        names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
        if not set(names) & set(m["platforms"]):
            raise ValueError(
                f"export at {self.path!r} was made for {', '.join(m['platforms'])}, not "
                f"{backend}: export again with platforms including {names[0]}"
            )
        return m

    def check(self, x: np.ndarray) -> None:
        """One-line ValueError when `x` has the wrong rank, per-example shape or dtype."""
        want = self.input_shape
        ok = x.ndim == len(want) and all(
            w is None or w == d for w, d in zip(want, x.shape, strict=True)
        )
        if not ok or x.shape[0] < 1 or x.dtype != self.input_dtype:
            dims = ", ".join("batch" if d is None else str(d) for d in want)
            expected = f"({dims}{',' if len(want) == 1 else ''}) {self.input_dtype.name}"
            fix = (
                "pass that shape (any batch size >= 1)"
                if not ok or x.shape[0] < 1
                else f"cast it with .astype('{self.input_dtype.name}')"
            )
            raise ValueError(
                f"input has shape {x.shape} {x.dtype.name}; this export takes {expected}: {fix}"
            )

    def __call__(self, x) -> np.ndarray:
        """Predictions for the batch `x` (any batch size >= 1), as a numpy array."""
        x = np.asarray(x)
        self.check(x)
        return np.asarray(self._fn(self.params, self.model_state, x))


def load(path: str) -> Predictor:
    """The export at `path` as a `Predictor`, after checking its format version and hashes."""
    return Predictor(path)


def _raw_example(data):
    """One held-out example in the units the export takes (raw, when the data set standardized)."""
    x = np.asarray(data.eval["x"][:1])
    pre = data.info.get("preprocessing") or {}
    if "input_mean" in pre:
        x = (x * np.asarray(pre["input_std"]) + np.asarray(pre["input_mean"])).astype(x.dtype)
    return x


def export_workdir(
    exp, workdir: str, out: str, *, platforms: tuple[str, ...] = ("cpu", "cuda")
) -> str:
    """Export the newest checkpoint of `workdir` (trained from `exp`) to `out`.

    The example input is the first held-out example; the manifest records the config, the
    experiment's name and the checkpoint's step.
    """
    from jaxnv import config as config_lib  # the shell, imported here: `load` needs none of it
    from jaxnv.checkpoint.manager import Checkpointer
    from jaxnv.train.loop import build

    _refuse_existing(out)  # these checks come before the minutes of building and restoring
    _check_platforms(platforms)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):  # checked here: the Checkpointer would create it
        raise FileNotFoundError(
            f"no checkpoints in {workdir!r}: train first (jaxnv train {exp.name} --workdir DIR)"
        )
    if getattr(exp.config.model, "matmul", "xla") != "xla":  # MKL's FFI call does not export:
        exp = copy.copy(exp)  # the same weights through XLA's own dot, for every platform
        exp.config = config_lib.apply_overrides(exp.config, ["model.matmul=xla"])
    run = build(exp, abstract=True)  # shapes and shardings: the restore makes the only copy
    ckpt = Checkpointer(directory)
    try:
        state, _ = ckpt.restore(run.state)
    finally:
        ckpt.close()
    step = int(jax.device_get(state.step))
    return export_predict(
        run.graphdef,
        state.params,
        state.model_state,
        run.policy,
        _raw_example(run.data),
        out,
        preprocessing=run.data.info.get("preprocessing"),
        config=config_lib.to_dict(run.cfg),
        platforms=platforms,
        meta={"experiment": exp.name, "step": step},
    )
