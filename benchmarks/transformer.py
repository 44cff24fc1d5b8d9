"""A small GPT's train step: jaxnv vs hand-written JAX + optax vs PyTorch (eager, compiled); MFU.

Run:  jaxnv bench transformer [--sizes 4x256,4x512] [--repeats 5] [--compile] [--record]
      jaxnv bench transformer --profile 30 --sizes 4x256    # where jaxnv's step spends its time

The same decoder-only model in all three (RMSNorm pre-norm blocks, RoPE, causal softmax
attention, gated MLP, tied embeddings, vocabulary 128, sequence 128, batch 16, fp32, AdamW at a
constant rate), started from the same weights: the hand-written JAX and PyTorch models are loaded
with jaxnv's initial params and must reproduce its first loss (checked, to 1e-4). PyTorch runs
in a paired process, interleaved round by round (in one process the two runtimes' thread pools
slow each other down several times). Columns:
step time (median over `repeats` interleaved rounds), tokens/s, speed relative to PyTorch eager,
and MFU: model FLOPs per step over step time over the peak matmul FLOP/s of the same framework
(a 2048 x 2048 fp32 matmul timed in the same run). Model FLOPs are the 6N + 12LTD formula, the
same for every contender, cross-checked against XLA's cost analysis of jaxnv's step.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import interleave, parser, report, time_steps, timed

from jaxnv.core.losses import softmax_ce_loss
from jaxnv.core.optim import OptimizerConfig, make_optimizer
from jaxnv.core.precision import get_policy
from jaxnv.core.state import abstract_model, init_state, stacked_paths
from jaxnv.core.step import batch_spec_of, make_train_step
from jaxnv.models import Transformer
from jaxnv.models.transformer import flops_per_token
from jaxnv.train.profiling import measure_peak_flops, op_profile, step_flops

VOCAB, LR, WD, EPS = 128, 1e-3, 0.1, 1e-6


def parse_size(text: str) -> tuple[int, int]:
    layers, width = text.lower().split("x")
    return int(layers), int(width)


# ----------------------------------------------------------------------------------- plain JAX
def per_layer(params):
    """jaxnv's params with the stacked blocks ((L, ...) per param) as a list of L layers' dicts,
    the form the hand-written models below read."""
    blocks = params["blocks"]
    L = jax.tree.leaves(blocks)[0].shape[0]
    return {**params, "blocks": [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(L)]}


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def rope(x):  # (B, T, N, H), rotate-half form
    T, H = x.shape[1], x.shape[-1]
    inv_freq = 10000.0 ** (-jnp.arange(H // 2, dtype=jnp.float32) / (H // 2))
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def plain_loss(params, batch, act):
    x = params["embedding"][batch["x"]]  # (B, T, D)
    for i in range(len(params["blocks"])):
        p = params["blocks"][i]
        h = rms_norm(x, p["attn_norm"]["scale"])
        a = p["attn"]
        # wqkv (D, K, G + 2, H) with K = N kv heads, G = 1: q, k, v at 0, 1, 2 of axis 2
        wq, wk, wv = (a["wqkv"][:, :, i] for i in range(3))  # (D, N, H) each
        q = rope(jnp.einsum("btd,dnh->btnh", h, wq))
        k = rope(jnp.einsum("btd,dnh->btnh", h, wk))
        v = jnp.einsum("btd,dnh->btnh", h, wv)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + jnp.einsum("btnh,nhd->btd", y, a["wo"])
        h = rms_norm(x, p["mlp_norm"]["scale"])
        m = p["mlp"]
        g = act(h @ m["w_gate_up"][:, 0]) * (h @ m["w_gate_up"][:, 1])
        x = x + g @ m["w_down"]
    x = rms_norm(x, params["final_norm"]["scale"])
    logits = x @ params["embedding"].T  # (B, T, V)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_plain_step(tx, act):
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(plain_loss)(params, batch, act)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


# ------------------------------------------------------------------------------------- PyTorch
def make_torch(params, batch, act_name, compile_it):
    """A PyTorch model holding copies of `params`: its step closure and its first loss."""
    import torch
    import torch.nn.functional as F

    acts = {"silu": F.silu, "gelu": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
    acts["relu2"] = lambda t: torch.square(F.relu(t))
    act = acts[act_name]
    to_t = lambda a: torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)))  # noqa: E731

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            D = params["embedding"].shape[1]
            self.emb = to_t(params["embedding"])
            self.blocks = torch.nn.ModuleList()
            for i in range(len(params["blocks"])):
                p, blk = params["blocks"][i], torch.nn.Module()
                blk.n1, blk.n2 = to_t(p["attn_norm"]["scale"]), to_t(p["mlp_norm"]["scale"])
                N, _, H = p["attn"]["wqkv"].shape[1:]  # (D, N, 3, H): q, k, v per head
                blk.wqkv = to_t(np.reshape(p["attn"]["wqkv"], (D, N * 3 * H)))  # (D, N3H)
                blk.wo = to_t(np.reshape(p["attn"]["wo"], (N * H, D)))
                blk.wg = to_t(p["mlp"]["w_gate_up"][:, 0])
                blk.wu = to_t(p["mlp"]["w_gate_up"][:, 1])
                blk.wd = to_t(p["mlp"]["w_down"])
                blk.heads = N
                self.blocks.append(blk)
            self.nf = to_t(params["final_norm"]["scale"])

        @staticmethod
        def norm(x, s):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * s

        def forward(self, tokens, targets):
            B, T = tokens.shape
            x = self.emb[tokens]
            for blk in self.blocks:
                N = blk.heads
                h = self.norm(x, blk.n1) @ blk.wqkv  # (B, T, N3H)
                q, k, v = h.view(B, T, N, 3, -1).permute(3, 0, 2, 1, 4)  # (B, N, T, H) each
                H = q.shape[-1]
                inv = 10000.0 ** (-torch.arange(H // 2, dtype=torch.float32) / (H // 2))
                ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
                cos, sin = torch.cos(ang), torch.sin(ang)

                def rot(t, cos=cos, sin=sin):
                    t1, t2 = t.chunk(2, dim=-1)
                    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

                y = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
                x = x + y.transpose(1, 2).reshape(B, T, -1) @ blk.wo
                h = self.norm(x, blk.n2)
                x = x + (act(h @ blk.wg) * (h @ blk.wu)) @ blk.wd
            logits = self.norm(x, self.nf) @ self.emb.T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    model = GPT()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, eps=1e-8, foreach=True)
    tokens = torch.from_numpy(np.asarray(batch["x"]).astype(np.int64))
    targets = torch.from_numpy(np.asarray(batch["y"]).astype(np.int64))
    forward = torch.compile(model) if compile_it else model

    def step():
        loss = forward(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    with torch.no_grad():
        first = float(model(tokens, targets))
    return step, first


def torch_peak(n: int) -> float:
    import torch

    a = torch.ones(n, n)
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(5))
    return 2.0 * n**3 / best


def xla_peak(n: int) -> float:
    return measure_peak_flops(jnp.float32, n=n, repeats=5)


# ----------------------------------------------------------------------------------- the bench
def make_jaxnv(layers, width, batch_size, seq, act):
    """jaxnv's GPT (64-wide heads), its train step, initial state and a random token batch."""
    policy = get_policy("fp32")
    cfg = OptimizerConfig(name="adamw", learning_rate=LR, weight_decay=WD, schedule="constant")
    model_fn = lambda r: Transformer(  # noqa: E731
        VOCAB, num_layers=layers, num_heads=max(1, width // 64), embed_dim=width,
        max_seq_len=seq, activation=act, policy=policy, rngs=r,
    )  # fmt: skip
    tx = make_optimizer(cfg, 10_000, stacked=stacked_paths(abstract_model(model_fn)))
    graphdef, state = init_state(model_fn, tx, policy, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(batch_size, seq + 1))
    batch = {"x": jnp.asarray(tokens[:, :-1], jnp.int32), "y": jnp.asarray(tokens[:, 1:])}
    batch["y"] = batch["y"].astype(jnp.int32)
    step = make_train_step(graphdef, softmax_ce_loss, tx, policy, batch_spec=batch_spec_of(batch))
    return graphdef, state, step, batch


def bench_size(layers, width, batch_size, seq, act, repeats, steps, compile_it, peak_n):
    graphdef, state, step, batch = make_jaxnv(layers, width, batch_size, seq, act)
    params = per_layer(jax.tree.map(np.asarray, state.params))
    act_fn = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu}.get(act)
    act_fn = act_fn or (lambda t: jnp.square(jax.nn.relu(t)))
    matrices = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    plain_tx = optax.adamw(LR, weight_decay=WD, mask=matrices)
    plain_params = jax.tree.map(jnp.asarray, params)
    plain_state = (plain_params, plain_tx.init(plain_params))
    plain = make_plain_step(plain_tx, act_fn)

    flops_hlo = step_flops(step.fn, state, batch)
    flops_formula = flops_per_token(VOCAB, seq_len=seq, num_layers=layers, embed_dim=width)
    flops_formula *= batch_size * seq
    first = {"plain": float(jax.jit(plain_loss, static_argnums=2)(plain_params, batch, act_fn))}

    holder = {"jaxnv": state, "plain": plain_state}

    def runner(name, fn):
        def run():
            holder[name], seconds = time_steps(fn, holder[name], batch, steps)
            return seconds

        return run

    run_jaxnv, run_plain = runner("jaxnv", step), runner("plain", plain)

    # jaxnv's own first loss, from its eval path on the initial params (before any step runs)
    first["jaxnv"] = nnx_loss(graphdef, state, batch)
    contenders = {"jaxnv": run_jaxnv, "plain JAX": run_plain}
    torch_runs = {"torch eager": False, **({"torch.compile": True} if compile_it else {})}
    peaks = {"xla": xla_peak(peak_n)}
    workers = []
    for name, comp in torch_runs.items():
        worker = TorchWorker(params, batch, act, comp, peak_n)
        if worker.first is None:
            break
        workers.append(worker)
        first[name] = worker.first
        contenders[name] = lambda worker=worker: worker.run(steps)
        peaks["torch"] = worker.peak()
    for name, value in first.items():
        if not math.isclose(value, first["jaxnv"], rel_tol=1e-4):
            raise AssertionError(f"{name} starts at loss {value}, jaxnv at {first['jaxnv']}")
    # a short untimed pause before each round: the other runtime's worker threads may still be
    # spinning (waiting for work) just after its round, and would steal the first part of it
    settle = {k: (lambda fn=fn: (time.sleep(0.3), fn())[1]) for k, fn in contenders.items()}
    times = interleave(settle, repeats)
    peaks["xla"] = max(peaks["xla"], xla_peak(peak_n))  # best of before and after, same run
    for worker in workers:
        peaks["torch"] = max(peaks["torch"], worker.peak())
        worker.close()
    return times, peaks, flops_hlo, flops_formula


class TorchWorker:
    """The PyTorch contender in a paired process, driven round by round over a pipe.

    In one process, XLA's and PyTorch's thread pools fight over the cores (measured: both
    steps several times slower than alone), so PyTorch runs next door and waits, blocked on
    its pipe, while JAX runs. `first` is None when torch is not installed.
    """

    def __init__(self, params, batch, act, compile_it, peak_n):
        import subprocess
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        path = os.path.join(self.dir.name, "model.npz")
        leaves = jax.tree_util.tree_leaves_with_path(params)
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
        np.savez(path, **flat, tokens_x=np.asarray(batch["x"]), tokens_y=np.asarray(batch["y"]))
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", path, act]
        cmd += ["1" if compile_it else "0", str(peak_n)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise RuntimeError(f"the PyTorch worker failed to start (exit {self.proc.wait()})")
        self.first = None if reply == "no-torch" else float(reply)

    def _ask(self, line: str) -> float:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def run(self, steps: int) -> float:
        return self._ask(f"run {steps}")

    def peak(self) -> float:
        return self._ask("peak")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.dir.cleanup()


def torch_worker(path, act, compile_it, peak_n):
    """The far side of `TorchWorker`: build the model, print its first loss, then serve."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("no-torch", flush=True)
        return
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    batch = {"x": arrays.pop("tokens_x"), "y": arrays.pop("tokens_y")}
    params = _unflatten(arrays)
    step, first = make_torch(params, batch, act, compile_it == "1")
    print(first, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            steps = int(cmd[1])
            start = time.perf_counter()
            for _ in range(steps):
                step()
            print((time.perf_counter() - start) / steps, flush=True)
        elif cmd[0] == "peak":
            print(torch_peak(int(peak_n)), flush=True)


def _unflatten(flat):
    """{"['blocks'][0]['attn']['wqkv']": array, ...} -> the nested dict (int keys for blocks)."""
    import re

    out = {}
    for key, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in re.findall(r"\['?([^\]']+)'?\]", key)]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def print_profile(layers, width, batch_size, seq, act, top):
    """The `top` most expensive XLA ops (and op kinds) of jaxnv's step, in ms per step."""
    _, state, step, batch = make_jaxnv(layers, width, batch_size, seq, act)
    rows = op_profile(step.fn, state, batch, steps=3, top=top, carry=True)
    total = sum(ms for name, ms, _ in rows if name.startswith("[category]"))
    print(f"\nper-op profile of jaxnv's step, {layers}x{width} {act}: {total:.1f} ms in ops")
    for name, ms, what in rows:
        print(f"{ms:9.2f} ms {ms / total:6.1%}  {name:36} {what[:100]}")


def nnx_loss(graphdef, state, batch) -> float:
    """jaxnv's loss on `batch` at the params of `state` (no dropout, no step taken)."""
    from flax import nnx

    model = nnx.merge(graphdef, state.params, state.model_state)
    return float(jax.jit(lambda m, b: softmax_ce_loss(m, b, None)[0])(model, batch))


def main():
    if sys.argv[1:2] == ["--torch-worker"]:
        return torch_worker(*sys.argv[2:6])
    p = parser(__doc__, repeats=5)
    p.add_argument("--sizes", default="4x256,4x512", help="LAYERSxWIDTH, comma-separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--activation", default="silu", choices=("silu", "gelu", "relu", "relu2"))
    p.add_argument("--compile", action="store_true", help="add torch.compile (slow to compile)")
    p.add_argument("--profile", type=int, default=0, metavar="TOP", help="print the TOP ops")
    args = p.parse_args()
    sizes, batch, seq, steps, peak_n = args.sizes, args.batch, args.seq, args.steps, 2048
    if args.quick:
        sizes, batch, seq, steps, peak_n, args.repeats = "1x64", 2, 32, 1, 256, 1
    if args.profile:
        layers, width = parse_size(sizes.split(",")[0])
        print_profile(layers, width, batch, seq, args.activation, args.profile)
    rows = []
    for size in sizes.split(","):
        layers, width = parse_size(size)
        times, peaks, f_hlo, f_formula = bench_size(
            layers, width, batch, seq, args.activation, args.repeats, steps, args.compile, peak_n
        )
        tokens = batch * seq
        ref = times.get("torch eager")
        for name, dt in times.items():
            peak = peaks["torch" if name.startswith("torch") else "xla"]
            rows.append(
                (
                    f"{size} {args.activation}",
                    name,
                    f"{dt * 1e3:.1f} ms",
                    f"{tokens / dt:,.0f}",
                    f"{ref / dt:.2f}" if ref else "n/a",
                    f"{dt / times['plain JAX']:.3f}",
                    f"{f_formula / dt / peak:.1%} of {peak / 1e9:.0f} GF/s",
                )
            )
        print(
            f"{size}: FLOPs/step {f_hlo / 1e9:.2f} G (XLA cost analysis) vs "
            f"{f_formula / 1e9:.2f} G (6N + 12LTD formula), ratio {f_hlo / f_formula:.3f}",
            flush=True,
        )
    header = ("model", "contender", "step", "tokens/s", "x torch eager", "/ plain JAX", "MFU")
    report("transformer.py", header, rows, args, f"Batch {batch} x {seq}, fp32, AdamW.")


if __name__ == "__main__":
    main()
