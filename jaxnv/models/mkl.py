"""The transformer's float32 matmuls through Intel MKL (`model.matmul=mkl`), on the CPU.

XLA FFI calls (`mkl_sgemm.cc`, beside this file) run the projections as `cblas_sgemm`, whose
gradient is two more sgemm calls with the transposes given to MKL as flags rather than copied,
and attention's per-head products (`causal_attention`) as `cblas_sgemm_batch` calls that read
(B, T, heads, H) tensors in place. The library is built once with the system C++ compiler
against jaxlib's FFI headers and cached under `$XDG_CACHE_HOME/jaxnv/ffi` (else
`~/.cache/jaxnv/ffi`). Needs: the CPU backend, float32 compute, one device,
`pip install "jaxnv[mkl]"` and a C++ compiler; the choice is made once and printed at start-up,
like the attention kernel.

    y = matmul(x, w, contract=1)   # x (..., D) @ w (D, F...): one sgemm over all leading rows
    o = causal_attention(q, k, v)  # q (B, T, N, H), k and v (B, S, K, H)
"""

from __future__ import annotations

import ctypes
import difflib
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

MATMULS = ("xla", "mkl")
TARGET, HEADS = "jaxnv_mkl_sgemm", "jaxnv_mkl_heads"
SOURCE = pathlib.Path(__file__).with_name("mkl_sgemm.cc")
FIX = "or use model.matmul=xla"


class MatmulUnavailable(RuntimeError):
    """model.matmul=mkl cannot run on this machine; the message names the fix."""


def _mkl_library() -> pathlib.Path:
    """The path of libmkl_rt from the installed `mkl` wheel."""
    try:
        files = importlib.metadata.distribution("mkl").files or []
    except importlib.metadata.PackageNotFoundError:
        raise MatmulUnavailable(
            'model.matmul=mkl needs Intel MKL: pip install "jaxnv[mkl]" (x86-64), ' + FIX
        ) from None
    found = sorted(f for f in files if f.name.startswith("libmkl_rt.so"))
    if not found:
        raise MatmulUnavailable(f"the mkl package has no libmkl_rt.so: reinstall it, {FIX}")
    return pathlib.Path(found[0].locate()).resolve()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def availability() -> str:
    """One line for `jaxnv info`: whether model.matmul=mkl can run here, or what it lacks (it
    checks the backend, the wheel and a compiler; it builds nothing)."""
    if jax.default_backend() != "cpu":
        return f"not here (it runs on the CPU backend; this one is {jax.default_backend()})"
    try:
        mkl = _mkl_library()
    except MatmulUnavailable as e:
        return f"not available: {e}"
    if _compiler() is None:
        return "not available: no C++ compiler to build its FFI call (apt-get install g++)"
    return f"available (float32, one device; {mkl.name} from mkl {_mkl_version()})"


def _mkl_version() -> str:
    return importlib.metadata.version("mkl")


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxnv" / "ffi"


def _build(mkl: pathlib.Path) -> pathlib.Path:
    """The compiled FFI library for this source, jaxlib and MKL (built on first use)."""
    import jaxlib

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + f"{jaxlib.__version__} {mkl}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"mkl_sgemm-{key}.so"
    if target.exists():
        return target
    compiler = _compiler()
    if compiler is None:
        raise MatmulUnavailable(
            "model.matmul=mkl builds a small XLA FFI library once and needs a C++ compiler: "
            f"install one (apt-get install g++) or set CXX, {FIX}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MatmulUnavailable(
            f"cannot create {target.parent} ({e.strerror}): set XDG_CACHE_HOME to a writable "
            f"folder, {FIX}"
        ) from None
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = pathlib.Path(tmp) / target.name
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{mkl.parent}", f"-l:{mkl.name}",
               f"-Wl,-rpath,{mkl.parent}", "-o", str(out)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            lines = done.stderr.splitlines()
            first = next((ln for ln in lines if "error" in ln), " ".join(done.stderr.split()))
            raise MatmulUnavailable(
                f"building the MKL matmul failed ({first.strip()[:200]}): {FIX}"
            )
        os.replace(out, target)  # atomic: concurrent processes build the same file
    return target


@functools.cache
def load() -> str:
    """Build (once) and register the FFI target; its name. Raises MatmulUnavailable."""
    mkl = _mkl_library()
    # MKL's OpenMP threads otherwise spin ~200 ms after each call, starving XLA's own threads
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        library = ctypes.CDLL(str(_build(mkl)))
    except OSError as e:  # e.g. a library MKL needs is missing
        raise MatmulUnavailable(f"loading the MKL matmul failed ({e}): {FIX}") from None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxnvMklSgemm), platform="cpu")
    jax.ffi.register_ffi_target(HEADS, jax.ffi.pycapsule(library.JaxnvMklHeads), platform="cpu")
    return TARGET


def choose_matmul(requested: str, dtype, on: str | None = None):
    """`(kernel, reason)`: the transformer's matmuls ("xla" or "mkl") for `requested` (xla | mkl)
    and `dtype` compute on platform `on` (default: this backend). One device only: a training
    run on a mesh of several refuses "mkl" (jaxnv/train/run.py).

    "mkl" that cannot run is a one-line ValueError naming the fix (building the library on first
    use, so a missing wheel or compiler shows here, at start-up).
    """
    if requested not in MATMULS:
        close = difflib.get_close_matches(str(requested), MATMULS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model.matmul={requested!r}: use one of {', '.join(MATMULS)}{hint}")
    if requested == "xla":
        return "xla", "XLA's dot (model.matmul=xla)"
    on = on or jax.default_backend()
    dtype = jnp.dtype(dtype)
    if on != "cpu":
        why_not = f"it runs on the CPU backend; this one is {on}"
    elif dtype != jnp.float32:
        why_not = f"it computes in float32, not {dtype.name} (precision=fp32)"
    else:
        why_not = None
    if why_not:
        raise ValueError(f"model.matmul=mkl cannot run here: {why_not}; use model.matmul=xla")
    try:
        load()
    except MatmulUnavailable as e:
        raise ValueError(str(e)) from None
    return "mkl", "Intel MKL's sgemm for the projections and attention, XLA FFI calls, float32"


def _sgemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for 2-D float32 a, b (op: transpose where asked) in one FFI call."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(
        load(), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="expand_dims"
    )
    return call(a, b, trans_a=np.bool_(trans_a), trans_b=np.bool_(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot(a, b, trans_b: bool):
    """a (M, K) @ b (K, N), or @ b.T for b (N, K) with trans_b."""
    return _sgemm(a, b, trans_b=trans_b)


def _dot_fwd(a, b, trans_b):
    return _sgemm(a, b, trans_b=trans_b), (a, b)


def _dot_bwd(trans_b, residuals, g):
    a, b = residuals
    if trans_b:  # c = a @ b.T: da = g @ b, db = g.T @ a
        return _sgemm(g, b), _sgemm(g, a, trans_a=True)
    return _sgemm(g, b, trans_b=True), _sgemm(a, g, trans_a=True)  # da = g @ b.T, db = a.T @ g


_dot.defvjp(_dot_fwd, _dot_bwd)


def matmul(x: jax.Array, w: jax.Array, contract: int = 1, *, transpose_w: bool = False):
    """x's last `contract` axes against w's first `contract` (`transpose_w`: w's last, w being
    (out..., in...)), through MKL's sgemm: (..., in...) -> (..., out...). float32 only."""
    lead, ins = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    outs = w.shape[: w.ndim - contract] if transpose_w else w.shape[contract:]
    k, n = int(np.prod(ins)), int(np.prod(outs))
    w2 = w.reshape(n, k) if transpose_w else w.reshape(k, n)
    return _dot(x.reshape(-1, k), w2, transpose_w).reshape(*lead, *outs)


def _heads(a, b, mode: int, shape):
    """Attention's per-head products (mkl_sgemm.cc: Heads) in one batched MKL call."""
    load()
    call = jax.ffi.ffi_call(
        HEADS, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential"
    )
    return call(a, b, mode=np.int32(mode))


def _causal_probs(q, k):
    """softmax(q k^T / sqrt(H)) under the causal mask, (B, N, T, S), float32."""
    B, T, N, H = q.shape
    S = k.shape[1]
    scores = _heads(q, k, 0, (B, N, T, S)) * (1.0 / np.sqrt(H))
    causal = jnp.tril(jnp.ones((T, S), bool), S - T)  # query t sees keys <= t (+ S - T)
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


@jax.custom_vjp
def causal_attention(q, k, v):
    """Causal attention of q (B, T, N, H) over k, v (B, S, K, H), N a multiple of K (query head
    n reads kv head n // (N // K)): (B, T, N, H), float32, its products through MKL."""
    return _heads(_causal_probs(q, k), v, 1, q.shape)


def _attention_fwd(q, k, v):
    probs = _causal_probs(q, k)
    return _heads(probs, v, 1, q.shape), (q, k, v, probs)


def _attention_bwd(residuals, d_out):
    q, k, v, probs = residuals
    B, T, N, H = q.shape
    d_probs = _heads(d_out, v, 0, probs.shape)  # dO V^T
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, -1, keepdims=True)) / np.sqrt(H)
    dq = _heads(d_scores, k, 1, q.shape)  # dS K
    dk = _heads(d_scores, q, 2, k.shape)  # dS^T Q, summed over each kv head's query heads
    dv = _heads(probs, d_out, 2, v.shape)  # P^T dO, likewise
    return dq, dk, dv


causal_attention.defvjp(_attention_fwd, _attention_bwd)
