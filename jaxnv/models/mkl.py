"""The transformer's float32 matmuls through Intel MKL (`model.matmul=mkl`), on the CPU.

XLA FFI calls (`mkl_sgemm.cc`, beside this file) run the projections as `cblas_sgemm`, whose
gradient is two more sgemm calls with the transposes given to MKL as flags rather than copied,
and causal self-attention (`packed_causal_attention`) as one fused call each way: RoPE, the
products and the softmax straight from the packed q/k/v projection, with the gradient written
back packed; and the gated MLP's silu(gate) * up (`silu_gate`). All split their work over
XLA's own intra-op threads, one single-threaded MKL call per thread. The library is built once
with the system C++ compiler against jaxlib's FFI headers and cached under
`$XDG_CACHE_HOME/jaxnv/ffi` (else `~/.cache/jaxnv/ffi`). Needs: the CPU backend, float32
compute, one device, `pip install "jaxnv[mkl]"` and a C++ compiler; the choice is made once and
printed at start-up, like the attention kernel.

    y = matmul(x, w, contract=1)               # x (..., D) @ w (D, F...): one sgemm
    o = packed_causal_attention(qkv, cos, sin)  # qkv (B, T, K, G+2, H) -> (B, T, K*G, H)
    h = silu_gate(gate_up)                      # (..., 2, F) -> (..., F)
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
TARGET = "jaxnv_mkl_sgemm"
ATTENTION, ATTENTION_GRAD = "jaxnv_mkl_attention", "jaxnv_mkl_attention_grad"
GATE, GATE_GRAD = "jaxnv_mkl_silu_gate", "jaxnv_mkl_silu_gate_grad"
SOURCE = pathlib.Path(__file__).with_name("mkl_sgemm.cc")
FIX = "or use model.matmul=xla"
# -fopenmp-simd: the `omp simd` loops vectorise; no OpenMP runtime is linked
FLAGS = ("-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")


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
    stamp = f"{jaxlib.__version__} {mkl} {' '.join(FLAGS)}".encode()
    key = hashlib.sha256(source + stamp).hexdigest()[:16]
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
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{mkl.parent}",
               f"-l:{mkl.name}", f"-Wl,-rpath,{mkl.parent}", "-o", str(out)]  # fmt: skip
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
    try:
        library = ctypes.CDLL(str(_build(mkl)))
    except OSError as e:  # e.g. a library MKL needs is missing
        raise MatmulUnavailable(f"loading the MKL matmul failed ({e}): {FIX}") from None
    targets = {TARGET: "JaxnvMklSgemm", ATTENTION: "JaxnvMklAttention",
               ATTENTION_GRAD: "JaxnvMklAttentionGrad", GATE: "JaxnvMklSiluGate",
               GATE_GRAD: "JaxnvMklSiluGateGrad"}  # fmt: skip
    for name, symbol in targets.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
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
    return "mkl", "Intel MKL for the projections, attention and SiLU gate, XLA FFI calls, float32"


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


def _tables(qkv, cos, sin):
    """RoPE tables as the FFI call takes them, (1 or B, T, H/2) float32 (dummies without)."""
    if cos is None:
        dummy = jnp.zeros((1, 1, 1), jnp.float32)
        return dummy, dummy
    shape = (cos.shape[0] if cos.ndim == 3 else 1, qkv.shape[1], qkv.shape[-1] // 2)
    return (jnp.broadcast_to(t, shape).astype(jnp.float32) for t in (cos, sin))


def _attention_call(qkv, cos, sin, rope: bool):
    B, T, K, G2, H = qkv.shape
    load()
    out = (
        jax.ShapeDtypeStruct((B, T, K * (G2 - 2), H), jnp.float32),
        jax.ShapeDtypeStruct((B, K * (G2 - 2), T, T), jnp.float32),
    )
    call = jax.ffi.ffi_call(ATTENTION, out, vmap_method="sequential")
    return call(qkv, cos, sin, rope=np.bool_(rope))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _packed(qkv, cos, sin, rope):
    return _attention_call(qkv, cos, sin, rope)[0]


def _packed_fwd(qkv, cos, sin, rope):
    y, probs = _attention_call(qkv, cos, sin, rope)
    return y, (qkv, cos, sin, probs)


def _packed_bwd(rope, residuals, dy):
    qkv, cos, sin, probs = residuals
    call = jax.ffi.ffi_call(
        ATTENTION_GRAD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32), vmap_method="sequential"
    )
    dqkv = call(qkv, cos, sin, probs, dy.astype(jnp.float32), rope=np.bool_(rope))
    return dqkv, jnp.zeros_like(cos), jnp.zeros_like(sin)


_packed.defvjp(_packed_fwd, _packed_bwd)


def packed_causal_attention(qkv, cos=None, sin=None):
    """Causal self-attention from the packed projection qkv (B, T, K, G+2, H), float32: for kv
    head k, slots 0..G-1 hold its query heads (head n = k * G + g), slot G its key, slot G+1 its
    value. With RoPE tables cos, sin ((T, H/2) or (B, T, H/2)), queries and keys are rotated
    first (rotate-half, as `apply_rope`). Returns (B, T, K * G, H); one fused MKL call each way."""
    rope = cos is not None
    cos, sin = _tables(qkv, cos, sin)
    return _packed(qkv.astype(jnp.float32), cos, sin, rope)


@jax.custom_vjp
def silu_gate(gate_up):
    """silu(gate) * up from gate_up (..., 2, F), float32: (..., F), one MKL-backed pass each
    way; the gradient comes back packed as (..., 2, F)."""
    load()
    shape = jax.ShapeDtypeStruct(gate_up.shape[:-2] + gate_up.shape[-1:], jnp.float32)
    return jax.ffi.ffi_call(GATE, shape, vmap_method="broadcast_all")(gate_up)


def _silu_gate_fwd(gate_up):
    return silu_gate(gate_up), gate_up


def _silu_gate_bwd(gate_up, d_hidden):
    shape = jax.ShapeDtypeStruct(gate_up.shape, jnp.float32)
    call = jax.ffi.ffi_call(GATE_GRAD, shape, vmap_method="broadcast_all")
    return (call(gate_up, d_hidden.astype(jnp.float32)),)


silu_gate.defvjp(_silu_gate_fwd, _silu_gate_bwd)
