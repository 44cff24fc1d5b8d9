"""Writes notebooks/02_mixed_precision, 03_language_model, 04_distributed and
05_your_own_model.ipynb (no outputs).

Run:  .venv/bin/python notebooks/make_notebooks.py
The notebooks are stored without outputs; `tests/test_notebooks.py` executes them, and their cells
`assert` the key results. Edit the cells here and regenerate rather than editing the .ipynb files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def _cell(kind: str, text: str, name: str, i: int):
    text = text.strip("\n")
    cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
    cell.id = hashlib.sha1(f"{name}:{i}".encode()).hexdigest()[:8]  # stable ids: quiet diffs
    return cell


def md(text: str) -> tuple[str, str]:
    return "md", text


def code(text: str) -> tuple[str, str]:
    return "code", text


def write(name: str, cells: list[tuple[str, str]]) -> Path:
    nb = new_notebook(metadata={"kernelspec": KERNEL})
    nb.cells = [_cell(kind, text, name, i) for i, (kind, text) in enumerate(cells)]
    nbformat.validate(nb)
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------------------------
# 02: mixed precision
# --------------------------------------------------------------------------------------------

MIXED_PRECISION = [
    md("""
# Mixed precision: fp32, bf16 and fp16 with dynamic loss scaling

The same MLP on the two-moons data (`binary_classification`) trained three times, changing only
`precision.policy`. We compare the loss curves, watch the fp16 loss scale move, and then force an
overflow to see a step skipped and the scale come down.
This notebook runs in the test suite (`tests/test_notebooks.py`); it takes about 20 s on a 2-core
CPU. On the CPU, bf16 and fp16 are *emulated* and no faster than fp32 (that is why
`Policy.auto()` picks fp32 here); the point is that the numbers come out the same.
"""),
    code("""
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # headless; use `%matplotlib inline` when exploring
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from jaxnv import apply_overrides
from jaxnv.core.precision import Policy, get_policy, make_loss_scale
from jaxnv.experiment import load_experiment
from jaxnv.train import Callback, train

notebook_start = time.perf_counter()
"""),
    md("""
## What each policy keeps in which dtype

A `Policy` has three dtypes. **params**: how the master weights are stored; the optimizer state
(Adam moments) follows them. **compute**: the dtype the params and activations are cast to for
the forward and backward pass, so the matmuls run in it. **output**: what the model returns;
losses, norms and softmax are computed in fp32 whatever the policy.

| preset | params + optimizer state | forward/backward matmuls | outputs, loss | loss scaling |
| --- | --- | --- | --- | --- |
| `fp32` | float32 | float32 | float32 | none |
| `bf16` | float32 | bfloat16 | float32 | none: bf16 has fp32's exponent range |
| `fp16` | float32 | float16 | float32 | dynamic |

The cast to the compute dtype happens *inside* the differentiated function, so gradients arrive
in fp32 and the update is applied to fp32 master weights: small updates are not rounded away.
"""),
    code("""
for name in ("fp32", "bf16", "fp16"):
    p = get_policy(name)
    print(f"{name}: {p}   loss scale: {p.default_loss_scale}")
    assert p.param_dtype == jnp.float32 and p.output_dtype == jnp.float32

auto = Policy.auto()
print(f"\\nauto: {auto}\\n  reason: {auto.reason}")

# Any jmp-style string works too; short keys and dtype names are accepted.
jmp = get_policy("params=float32,compute=bfloat16,output=float32")
print(f"jmp string: {jmp}")
assert jmp == get_policy("p=f32,c=bf16") == get_policy("bf16")  # output defaults to float32
half_out = get_policy("p=f32,c=f16,o=f16")
print(f"half outputs: {half_out}, loss scale {half_out.default_loss_scale}")
assert half_out.default_loss_scale == "dynamic"
"""),
    md("""
## Why fp16 needs a loss scale and bf16 does not

bf16 keeps fp32's 8 exponent bits and gives up mantissa (about 3 significant digits); fp16 keeps
more mantissa but only 5 exponent bits, so it overflows above 65504 and flushes small values to
zero. Small gradients are exactly what underflows. Multiplying the loss by a scale `S` before
the backward pass shifts every gradient up by `S`; dividing by `S` in fp32 afterwards undoes it.
"""),
    code("""
for dt in (jnp.float32, jnp.bfloat16, jnp.float16):
    fi = jnp.finfo(dt)
    print(
        f"{jnp.dtype(dt).name:9} max {float(fi.max):.3g}  smallest subnormal "
        f"{float(fi.smallest_subnormal):.3g}  eps {float(fi.eps):.3g}"
    )

grad = 1e-8  # a typical tiny gradient entry
print("1e-8 in fp16:", float(jnp.float16(grad)), "  in bf16:", float(jnp.bfloat16(grad)))
print(
    "1e-8 * 2**15 in fp16, then unscaled in fp32:",
    float(jnp.float16(grad * 2**15).astype(jnp.float32) / 2**15),
)
with np.errstate(over="ignore"):  # numpy warns about the very overflow we want to show
    too_big = float(jnp.float16(70000.0))
print("70000 in fp16:", too_big)
assert float(jnp.float16(grad)) == 0.0 and float(jnp.bfloat16(grad)) > 0
assert abs(float(jnp.float16(grad * 2**15).astype(jnp.float32) / 2**15) - grad) < 1e-3 * grad
assert np.isinf(too_big)
"""),
    md("""
## Train the same model three times

Only `precision.policy` changes. `precision.growth_interval=50` (default 2000) lets the fp16 loss
scale grow often enough to see it move in a short run; it has no effect on fp32 and bf16, which
use no loss scale. Every run has the same seed, so the same initial weights and batches.
"""),
    code("""
COMMON = [
    "logging.progress=false",
    "logging.mfu=false",
    "logging.log_every=5",
    "train.eval_every=100",
    "precision.growth_interval=50",
]
results = {}
for name in ("fp32", "bf16", "fp16"):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, [*COMMON, f"precision.policy={name}"])
    results[name] = train(exp)

for name, r in results.items():
    dtypes = {str(x.dtype) for x in jax.tree.leaves(r.state.params)}
    print(
        f"{name}: eval loss {r.eval_metrics['loss']:.4f}  accuracy "
        f"{r.eval_metrics['accuracy']:.3f}  param dtypes {dtypes}  {r.seconds:.1f} s"
    )
    assert dtypes == {"float32"}  # master weights stay fp32 under every policy
"""),
    code("""
def rows(r, split):
    return [row for row in r.history if row["split"] == split]


fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
for ax, (name, r) in zip(axes, results.items(), strict=True):
    tr, ev = rows(r, "train"), rows(r, "eval")
    ax.plot([x["step"] for x in tr], [x["loss"] for x in tr], label="train", lw=1)
    ax.plot([x["step"] for x in ev], [x["loss"] for x in ev], "o-", label="eval")
    ax.set_title(f"{name}\\n{r.policy}", fontsize=9)
    ax.set(xlabel="step", yscale="log")
    ax.legend()
axes[0].set_ylabel("binary cross-entropy")
fig.tight_layout()
fig.savefig("/tmp/jaxnv_mixed_precision_loss.png", dpi=80)
plt.close(fig)
display(Image("/tmp/jaxnv_mixed_precision_loss.png"))
"""),
    md("""
## Same result in every precision?

Measured on the 2-core CPU after 600 steps: eval losses 0.0480 (fp32), 0.0466 (bf16, 3.1 %
apart) and 0.0484 (fp16, 0.8 % apart); all three reach 97.8 % accuracy. bf16's 8-bit mantissa
rounds each matmul more coarsely than fp16's 11 bits, so it drifts further from fp32, but the
drift is noise around the same minimum, not a bias. We assert within **10 % relative** of fp32:
three times the measured gap, and still tight enough to catch a broken cast or a loss scale that
is not undone (those change the loss by far more).
"""),
    code("""
TOLERANCE = 0.10  # relative to fp32; measured: bf16 3.1 %, fp16 0.8 %
ref = results["fp32"].eval_metrics["loss"]
for name in ("bf16", "fp16"):
    loss = results[name].eval_metrics["loss"]
    rel = abs(loss - ref) / ref
    print(f"{name}: eval loss {loss:.4f} vs fp32 {ref:.4f}: {100 * rel:.2f} % apart")
    assert rel < TOLERANCE, (name, loss, ref)
for r in results.values():
    assert r.eval_metrics["accuracy"] > 0.95
"""),
    md("""
## The fp16 loss scale over time

Every train row of the history carries `loss_scale` (the scale used in that window) and
`grads_finite` (the fraction of steps in the window whose gradients were all finite), both
averaged over the `log_every=5` steps of the window. The scale starts at
`precision.init_scale = 2**15`, doubles after 50 finite steps in a row, and halves whenever a step
overflows; that step is skipped. The result is a sawtooth just below the largest scale the
gradients tolerate.
"""),
    code("""
tr16 = rows(results["fp16"], "train")
steps = [x["step"] for x in tr16]
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
ax1.plot(steps, [x["loss_scale"] for x in tr16], drawstyle="steps-post")
ax1.set(yscale="log", ylabel="loss scale", title="fp16 dynamic loss scale (window means)")
ax1.set_yticks([2.0**k for k in range(15, 21)], [f"$2^{{{k}}}$" for k in range(15, 21)])
ax2.plot(steps, [x["grads_finite"] for x in tr16], "o", ms=3)
ax2.set(xlabel="step", ylabel="grads_finite", ylim=(-0.05, 1.05))
fig.tight_layout()
fig.savefig("/tmp/jaxnv_mixed_precision_scale.png", dpi=80)
plt.close(fig)
display(Image("/tmp/jaxnv_mixed_precision_scale.png"))

skipped = sum(round((1 - x["grads_finite"]) * 5) for x in tr16)
final_scale = float(results["fp16"].state.loss_scale.loss_scale)
print(
    f"overflowing (skipped) steps: {skipped} of {len(tr16) * 5}; "
    f"final scale 2**{np.log2(final_scale):.0f}"
)
assert max(x["loss_scale"] for x in tr16) > 2.0**15  # it grew
assert skipped < 0.05 * len(tr16) * 5  # overflows are rare
for r in (results["fp32"], results["bf16"]):
    assert {x["loss_scale"] for x in rows(r, "train")} == {1.0}  # no scaling outside fp16
"""),
    md("""
## Forcing an overflow

Start fp16 at an absurd loss scale. The scale is capped at `2**24`, and `train` refuses more
with a one-line error. At `2**24` the scaled gradients of the first steps exceed fp16's 65504: each
such step is skipped, leaving params and optimizer state bit-identical, and the scale halves until
the gradients fit. `log_every=1` gives one history row per step, and a `Callback` copies the
params after each step so we can check they did not move.
"""),
    code("""
try:  # what train() builds from precision.init_scale=2**30
    make_loss_scale("dynamic", init_scale=2.0**30)
except ValueError as e:
    print("2**30 is refused:", e)
else:
    raise AssertionError("expected init_scale=2**30 to be refused")


class ParamSnapshots(Callback):
    def __init__(self, upto):
        self.upto, self.params = upto, {}

    def on_log(self, step, split, scalars, state):
        if split == "train" and step <= self.upto:
            self.params[step] = jax.device_get(state.params)  # a host copy


snaps = ParamSnapshots(upto=12)
exp = load_experiment("binary_classification")
exp.config = apply_overrides(
    exp.config,
    [
        "logging.progress=false",
        "logging.mfu=false",
        "logging.log_every=1",
        "train.steps=100",
        "train.eval_every=0",
        "precision.policy=fp16",
        f"precision.init_scale={2.0**24}",
    ],
)
blown = train(exp, callbacks=[snaps])
first = [x for x in blown.history if x["split"] == "train"][:10]
for x in first:
    print(
        f"step {x['step']:3}  loss scale 2**{np.log2(x['loss_scale']):.0f}  "
        f"grads_finite {x['grads_finite']:.0f}  loss {x['loss']:.4f}"
    )
"""),
    code("""
overflowed = [x["step"] for x in first if x["grads_finite"] == 0]
print("skipped steps:", overflowed)
assert overflowed and overflowed[0] == 1  # the very first step overflows
assert overflowed == list(range(1, len(overflowed) + 1))  # ... then a run of skips, then none


def same(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


last_skip = overflowed[-1]
# every skipped step leaves the params bit-identical; once steps are finite they move
# (not necessarily on the very first one: the warmup schedule starts at learning rate 0)
assert all(same(snaps.params[1], snaps.params[s]) for s in overflowed)
assert not same(snaps.params[last_skip], snaps.params[snaps.upto])
scales = [x["loss_scale"] for x in first]
assert scales[0] == 2.0**24 and scales[last_skip] == 2.0**24 / 2 ** len(overflowed)
assert all(np.isfinite(x).all() for x in jax.tree.leaves(blown.state.params))
final = float(blown.state.loss_scale.loss_scale)
assert final < 2.0**24  # the scale came down and stayed down
print(
    f"{len(overflowed)} skipped steps, scale 2**24 -> 2**{np.log2(final):.0f}; params finite; "
    f"eval loss after 100 steps {blown.eval_metrics['loss']:.4f}"
)
print(f"notebook ran in {time.perf_counter() - notebook_start:.1f} s")
"""),
]


# --------------------------------------------------------------------------------------------
# 03: language model
# --------------------------------------------------------------------------------------------

LANGUAGE_MODEL = [
    md("""
# A small character-level language model

Train a small `char_gpt` (a pre-norm transformer with RoPE) on the text of Python's own help
topics, compare its loss with the corpus's unigram entropy, and sample from it at several
temperatures. This notebook runs in the test suite (`tests/test_notebooks.py`); it takes about a
minute on a 2-core CPU. For a better model run
`jaxnv train char_gpt train.steps=3000 model.embed_dim=256`.
"""),
    code("""
import re
import sys
import time

import matplotlib

matplotlib.use("Agg")  # headless; use `%matplotlib inline` when exploring
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from jaxnv import apply_overrides
from jaxnv.data import text_corpus
from jaxnv.experiment import load_experiment
from jaxnv.train import train

notebook_start = time.perf_counter()
exp = load_experiment("char_gpt")
char_gpt = sys.modules["jaxnv_experiment_char_gpt"]  # the experiment module: sample(), PROMPT
exp.config = apply_overrides(
    exp.config,
    [
        "logging.progress=false",
        "logging.mfu=false",
        "train.steps=300",
        "train.batch_size=16",
        "train.eval_every=50",
        "model.embed_dim=64",
        "model.num_layers=2",
        "data.seq_len=128",  # also the longest prompt + sample the model accepts
    ],
)
result = train(exp)
{k: v for k, v in result.summary.items() if k != "sample"}
"""),
    md("""
## Loss against the unigram entropy

The losses are cross-entropies in nats per character. A model that ignores context and predicts
each character by its frequency alone scores the corpus's **unigram entropy**,
`result.data.info["unigram_entropy"]` (about 3.25 nats); anything below that line is the model
using context. A uniform guess over the vocabulary would score log(vocab size).
"""),
    code("""
info = result.data.info
entropy = info["unigram_entropy"]
train_rows = [r for r in result.history if r["split"] == "train"]
eval_rows = [r for r in result.history if r["split"] == "eval"]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-", label="eval")
ax.axhline(entropy, color="gray", ls="--", label=f"unigram entropy {entropy:.2f}")
ax.axhline(
    np.log(len(info["vocab"])),
    color="gray",
    ls=":",
    label=f"uniform over {len(info['vocab'])} chars",
)
ax.set(xlabel="step", ylabel="cross-entropy (nats / char)", title="char_gpt")
ax.legend(loc="center right")
fig.tight_layout()
fig.savefig("/tmp/jaxnv_language_model_loss.png", dpi=80)
plt.close(fig)
display(Image("/tmp/jaxnv_language_model_loss.png"))

eval_loss = result.eval_metrics["loss"]
accuracy = result.eval_metrics["accuracy"]
print(
    f"eval loss {eval_loss:.3f} nats/char vs unigram entropy {entropy:.3f}: "
    f"{entropy - eval_loss:.2f} nats below (perplexity {np.exp(eval_loss):.1f} vs "
    f"{np.exp(entropy):.1f}), next-char accuracy {accuracy:.3f}"
)
# Measured: about 1.72 against 3.25. Require at least 1 nat below the unigram line.
assert eval_loss < entropy - 1.0
"""),
    md("""
## Sampling

`char_gpt.sample(result, prompt, n, temperature)` continues the prompt by `n` characters using a
KV cache (top-k 20). Temperature 0 is greedy: always the most likely character. Prompt plus sample
must fit in `model.max_seq_len` (here `data.seq_len` = 128).
"""),
    code("""
vocab = info["vocab"]
PROMPT, N = "The for statement", 100
warm = char_gpt.sample(result, PROMPT, N, temperature=0.8, seed=0)
greedy = char_gpt.sample(result, PROMPT, N, temperature=0.0)
print("temperature 0.8:\\n" + warm + "\\n")
print("greedy:\\n" + greedy)
for text in (warm, greedy):
    assert text.startswith(PROMPT) and len(text) == len(PROMPT) + N
    assert set(text) <= set(vocab), set(text) - set(vocab)
# greedy ignores the seed; sampling does not
assert char_gpt.sample(result, PROMPT, N, temperature=0.0, seed=1) == greedy
assert char_gpt.sample(result, PROMPT, N, temperature=0.8, seed=1) != warm
"""),
    md("""
## How temperature changes the samples

The logits are divided by the temperature before the softmax. Low temperatures sharpen the
distribution towards the greedy choice (safe, repetitive); high ones flatten it (varied, less
word-like). As a rough measure of "word-likeness" we count the share of the sampled words that
occur in the training corpus, averaged over a few seeds.
"""),
    code("""
corpus_words = set(re.findall(r"[A-Za-z]+", text_corpus()))


def word_share(text):
    words = re.findall(r"[A-Za-z]+", text[len(PROMPT) :])
    return sum(w in corpus_words for w in words) / max(1, len(words))


shares = {}
for t in (0.0, 0.5, 0.8, 1.0, 1.5):
    texts = [char_gpt.sample(result, PROMPT, N, temperature=t, seed=s) for s in range(4)]
    shares[t] = np.mean([word_share(x) for x in texts])
    distinct = len(set(texts))
    print(
        f"--- temperature {t}: {100 * shares[t]:.0f} % corpus words, "
        f"{distinct} distinct sample(s) of 4"
    )
    print(texts[0][len(PROMPT) :].replace("\\n", " / ")[:100])
    assert all(set(x) <= set(vocab) and len(x) == len(PROMPT) + N for x in texts)
    assert distinct == (1 if t == 0 else 4)
# measured: 100 % greedy, 83 % at 0.5, 55 % at 0.8, 49 % at 1.0, 25 % at 1.5
assert shares[0.5] > shares[1.5] + 0.2
print(f"\\nnotebook ran in {time.perf_counter() - notebook_start:.1f} s")
"""),
]


# --------------------------------------------------------------------------------------------
# 04: distributed
# --------------------------------------------------------------------------------------------

DISTRIBUTED = [
    md("""
# Distributed training on 8 simulated devices

One small MLP (`binary_classification`, two hidden layers of 64) trained for 30 steps on one
device and on 8 devices under each sharding preset: `dp`, `fsdp`, `tp` and `fsdp+tp`. Only the
`mesh.*` keys change. We check that the loss curves agree, look at where each param lives and how
many bytes each device holds, and read a dry run that compiles the step without training. This
notebook runs in the test suite (`tests/test_notebooks.py`); it takes about 30 s on a 2-core CPU.
"""),
    md("""
JAX fixes its device count when it first starts a backend, so the 8 CPU devices are requested
before anything else runs. From the shell, `JAXNV_CPU_DEVICES=8 jaxnv train ...` does the same.
On a machine with 8 GPUs, delete the two `jax.config` lines; nothing else changes.
"""),
    code("""
import time

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)  # = XLA_FLAGS=--xla_force_host_platform_device_count=8
notebook_start = time.perf_counter()
"""),
    code("""
import re

import matplotlib

matplotlib.use("Agg")  # headless; use `%matplotlib inline` when exploring
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from jax.sharding import PartitionSpec as P

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import format_table
from jaxnv.parallel.report import dry_run, per_device_bytes
from jaxnv.train import build, train

print(jax.devices())
assert len(jax.devices()) == 8
"""),
    md("""
## One experiment, five meshes

`experiment(rules, data, fsdp, tensor)` loads the experiment with the shared overrides and the mesh
keys. The global batch (64 rows) is the same on every mesh and is split over `data` × `fsdp`.
`log_every=1` gives one history row per step, so the curves can be compared step by step.
"""),
    code("""
COMMON = [
    "model.features=64,64",
    "train.steps=30",
    "train.eval_every=0",
    "optimizer.warmup_steps=5",
    "logging.log_every=1",
    "logging.progress=false",
    "logging.mfu=false",
]
MESHES = {  # preset: (data, fsdp, tensor); each uses all 8 devices
    "dp": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tp": (2, 1, 4),
    "fsdp+tp": (2, 2, 2),
}


def experiment(rules="dp", data=-1, fsdp=1, tensor=1, extra=()):
    exp = load_experiment("binary_classification")
    mesh = [f"mesh.rules={rules}", f"mesh.data={data}", f"mesh.fsdp={fsdp}"]
    exp.config = apply_overrides(exp.config, [*COMMON, *mesh, f"mesh.tensor={tensor}", *extra])
    return exp


results = {"1 device": train(experiment(), devices=jax.devices()[:1])}
for rules, shape in MESHES.items():
    results[rules] = train(experiment(rules, *shape))
for name, r in results.items():
    mesh = dict(r.state.params["head"]["kernel"].sharding.mesh.shape)
    print(f"{name:8}  mesh {mesh}  eval loss {r.eval_metrics['loss']:.6f}  {r.seconds:.1f} s")
"""),
    md("""
## The loss curves lie on top of each other

Left: the five curves, each in its own line style; they coincide, so you see one line. Right:
each 8-device curve's relative distance from the 1-device curve. What remains is float32 rounding,
because sums are reduced in a different order across devices; a missing point means the two
losses were bitwise equal. We assert 1e-5 relative, as `tests/test_parallel.py` does.
"""),
    code("""
def losses(r):
    return np.array([row["loss"] for row in r.history if row["split"] == "train"])


ref = losses(results["1 device"])
steps = np.arange(1, len(ref) + 1)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
styles = ["-", "--", ":", "-.", (0, (1, 3))]
for i, ((name, r), ls) in enumerate(zip(results.items(), styles, strict=True)):
    ax1.plot(steps, losses(r), ls=ls, lw=2, color=f"C{i}", label=name)
    if name != "1 device":
        rel = np.abs(losses(r) - ref) / np.abs(ref)
        rel = np.where(rel > 0, rel, np.nan)  # log scale: bitwise-equal steps are left out
        ax2.plot(steps, rel, ls=ls, marker="o", ms=3, color=f"C{i}", label=name)
ax2.axhline(1e-5, color="gray", ls="--", label="asserted bound 1e-5")
ax1.set(xlabel="step", ylabel="train loss (binary cross-entropy)", title="loss per step")
ax2.set(xlabel="step", ylabel="relative difference", yscale="log", title="vs 1 device")
ax1.legend()
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig("/tmp/jaxnv_distributed_loss.png", dpi=80)
plt.close(fig)
display(Image("/tmp/jaxnv_distributed_loss.png"))

for name, r in list(results.items())[1:]:
    worst = np.max(np.abs(losses(r) - ref) / np.abs(ref))
    print(f"{name:8} max relative difference from 1 device: {worst:.1e}")
    assert len(losses(r)) == 30
    np.testing.assert_allclose(losses(r), ref, rtol=1e-5)
    params = jax.device_get(r.state.params)  # gathered from the shards to the host
    single = jax.device_get(results["1 device"].state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # same trained params
"""),
    md("""
## Where one kernel lives

`jax.debug.visualize_array_sharding` draws a 2-D array's blocks and the devices that hold each.
The 64×64 kernel `hidden/1/kernel` has the logical names (`mlp`, `embed`). `dp` keeps it whole on
all 8 devices. `fsdp` splits its `embed` columns 8 ways. `tp` splits its `mlp` rows 4 ways, with
each block on the 2 `data` replicas. `fsdp+tp` splits both, 2 × 2.
"""),
    code("""
EXPECTED = {
    "dp": P(None, None),
    "fsdp": P(None, "fsdp"),
    "tp": P("tensor", None),
    "fsdp+tp": P("tensor", "fsdp"),
}
for rules in MESHES:
    state = results[rules].state
    kernel = state.params["hidden"][1]["kernel"]
    block = kernel.addressable_shards[0].data.shape
    print(f"{rules}: {kernel.shape} as {kernel.sharding.spec}, one block {block}")
    jax.debug.visualize_array_sharding(kernel)
    assert kernel.sharding.spec == EXPECTED[rules]
    # Adam's moments of this kernel are split the same way (ZeRO shards optimizer state too)
    mu = state.opt_state["optimizer"][0].mu["hidden"][1]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
"""),
    md("""
## The per-param table

`build(exp, abstract=True)` makes the same plan that `train` uses without allocating anything, and
`format_table` lists every param's shape, logical names and `PartitionSpec` under `fsdp`.
`hidden/0/kernel` stays whole: its `embed` dim is the 2 input features, which do not split 8 ways.
`hidden/0/bias` is named `mlp`, which the `fsdp` rules do not map to any mesh axis.
"""),
    code("""
plan = build(experiment("fsdp", *MESHES["fsdp"]), abstract=True).plan
print(format_table(plan))
specs = {path: spec for path, _, _, spec in plan.table}
assert specs["hidden/1/kernel"] == P(None, "fsdp") and specs["head/kernel"] == P("fsdp", None)
assert specs["hidden/0/kernel"] == P(None, None)  # 2 input features: not divisible by 8
"""),
    md("""
## Bytes per device: dp against fsdp

`per_device_bytes` adds up the blocks one device holds. Under `dp` every device keeps all the
params and both Adam moments. Under `fsdp` (ZeRO-3) each device keeps 1/8 of every param that
splits, plus the params that stay whole. For this model that comes to about 1/6 rather than
1/8, because of the small first layer; the wide model below gets to 1/8.
"""),
    code("""
held = {}  # preset: (params, optimizer state) bytes on one device
for rules in ("dp", "fsdp"):
    state = results[rules].state
    held[rules] = per_device_bytes(state.params), per_device_bytes(state.opt_state)
for rules, (params, opt) in held.items():
    print(f"{rules:4}: params {params:6,} B, optimizer state {opt:6,} B per device")
ratio = held["fsdp"][0] / held["dp"][0]
opt_ratio = held["fsdp"][1] / held["dp"][1]
print(f"fsdp / dp: params {ratio:.3f}, optimizer state {opt_ratio:.3f} (1/8 = 0.125)")

# exactly: params with an fsdp split hold 1/8 per device, the others stay whole (float32)
expected = sum(
    4 * int(np.prod(shape)) // (8 if "fsdp" in spec else 1) for *_, shape, spec in plan.table
)
assert held["fsdp"][0] == expected, (held["fsdp"][0], expected)
assert 1 / 8 <= ratio < 0.2 and abs(opt_ratio - ratio) < 0.01
"""),
    md("""
## A dry run: will it fit, and what moves?

An abstract build allocates nothing, so we can ask about a model far bigger than the one we
trained: the same MLP with two hidden layers of 2048 (4.2 M params, 16 MiB). `dry_run` compiles
the train step for the mesh. It prints the per-param table, the params and optimizer state per
device, the bytes the step moves in collectives (read from the compiled HLO) next to the textbook
minimum, and XLA's per-device memory analysis.
"""),
    code("""
reports, wide = {}, {}
for rules, shape in MESHES.items():
    run = build(experiment(rules, *shape, extra=["model.features=2048,2048"]), abstract=True)
    wide[rules] = per_device_bytes(run.state.params)
    reports[rules] = dry_run(run)
    print(reports[rules], end="\\n\\n")
"""),
    md("""
What to look at: params per device fall from 16 MiB under `dp` to 2 MiB under `fsdp` (1/8 within
1 %), and the peak memory falls with them. `dp` all-reduces every gradient each step. `fsdp`
moves far less than its textbook minimum, which assumes the weights are gathered: with only 64 rows
a step, XLA's partitioner gathers the activations instead (a 0.50 MiB buffer: 64 × 2048 float32).
"""),
    code(r"""
def mib(pattern, text):
    return float(re.search(pattern, text).group(1))


print(f"{'preset':8} {'params':>10} {'collectives':>12} {'peak':>10}   (MiB per device)")
for rules, text in reports.items():
    moved = mib(r"collectives per step per device: ([\d.]+) MiB", text)
    peak = mib(r"about ([\d.]+) MiB at peak", text)
    print(f"{rules:8} {wide[rules] / 2**20:10.2f} {moved:12.2f} {peak:10.2f}")

print(f"fsdp / dp params per device: {wide['fsdp'] / wide['dp']:.4f}")
assert abs(wide["fsdp"] / wide["dp"] - 1 / 8) < 0.002  # about 1/8 once the wide layers dominate
assert wide["dp"] > 16 * 2**20  # every device holds the whole 16 MiB
dp_moved = mib(r"collectives per step per device: ([\d.]+) MiB", reports["dp"])
assert dp_moved >= 0.99 * wide["dp"] / 2**20  # dp all-reduces every gradient
peaks = {k: mib(r"about ([\d.]+) MiB at peak", v) for k, v in reports.items()}
assert peaks["fsdp"] < peaks["dp"] / 4
print(f"\nnotebook ran in {time.perf_counter() - notebook_start:.1f} s")
"""),
]


# --------------------------------------------------------------------------------------------
# 05: your own model, data and loop
# --------------------------------------------------------------------------------------------

YOUR_OWN_MODEL = [
    md("""
# Bring your own model, data and loop

You have written your own Flax NNX model and your own loss, and your data comes from a plain
Python generator. `jaxnv.fit` gives you jaxnv's training loop for them without its config system:
compiled steps, evaluation, logging to `metrics.jsonl`, checkpoints and resuming.

The task is a toy tagging problem on padded sequences: every real token gets a label that depends
on the token and the one before it. This notebook runs in the test suite
(`tests/test_notebooks.py`); it takes about 15 s on a 2-core CPU.
"""),
    code("""
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # headless; use `%matplotlib inline` when exploring
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from IPython.display import Image, display

import jaxnv
from jaxnv import losses

notebook_start = time.perf_counter()
tmp = tempfile.TemporaryDirectory(prefix="jaxnv_own_model_")  # everything is written in here
workdir = os.path.join(tmp.name, "run")
"""),
    md("""
## The data: padded sequences from a generator

Each example is a sequence of up to 12 tokens from a vocabulary of 24; shorter sequences are
padded with 0, and `mask` marks the real tokens. The label of a token is
`(token + previous token) % 5`, so the model has to combine two positions.

Training data is a plain generator that never ends: `fit` takes one batch from it per step.
Evaluation data is a list of batches, because it is read again at every evaluation.
"""),
    code("""
VOCAB, CLASSES, SEQ = 24, 5, 12


def make_batch(rng, size):
    lengths = rng.integers(3, SEQ + 1, size=size)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    tokens = np.where(mask, rng.integers(1, VOCAB, size=(size, SEQ)), 0).astype(np.int32)
    previous = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    labels = np.where(mask, (tokens + previous) % CLASSES, 0).astype(np.int32)
    return {"tokens": tokens, "labels": labels, "mask": mask.astype(np.float32)}


def batches(seed=0, size=32):
    rng = np.random.default_rng(seed)
    while True:
        yield make_batch(rng, size)


eval_rng = np.random.default_rng(1234)
eval_data = [make_batch(eval_rng, 64) for _ in range(4)]

example = next(batches())
print({k: (v.shape, v.dtype.name) for k, v in example.items()})
print("tokens:", example["tokens"][0])
print("labels:", example["labels"][0])
print("mask:  ", example["mask"][0].astype(int))
real = sum(b["mask"].sum() for b in eval_data)
print(f"eval: {len(eval_data)} batches, {int(real)} real tokens of {4 * 64 * SEQ}")
"""),
    md("""
## The model: plain Flax NNX

An ordinary NNX module: it embeds each token and the one before it, then a hidden layer with
`BatchNorm` and `Dropout`, and a linear layer to the 5 classes. `fit` switches the model between
training mode (dropout on, batch statistics) and evaluation mode (no dropout, running
statistics) for you. The padded positions are left out of the batch statistics by passing the
mask to `BatchNorm`. `momentum=0.9` lets the running statistics catch up within a short run
(the default 0.99 needs many hundreds of steps).
"""),
    code("""
class Tagger(nnx.Module):
    def __init__(self, rngs, vocab=VOCAB, dim=16, hidden=64, classes=CLASSES, dropout=0.1):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.hidden = nnx.Linear(2 * dim, hidden, rngs=rngs)
        self.norm = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, tokens, mask):
        e = self.embed(tokens)  # (batch, seq, dim)
        previous = jnp.pad(e, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # the token before, 0 at the start
        h = self.hidden(jnp.concatenate([e, previous], axis=-1))
        h = self.norm(h, mask=mask[..., None] > 0)  # statistics over real tokens only
        return self.out(self.drop(jax.nn.relu(h)))  # (batch, seq, classes) logits


model = Tagger(nnx.Rngs(0))
print(model(example["tokens"], example["mask"]).shape)
"""),
    md("""
## The loss: a mean over real tokens only

`loss_fn(model, batch, rng)` returns the loss and a dict of extra metrics. The cross-entropy is
computed per token (`reduction="none"`), and `jaxnv.weighted_mean(per_token, mask)` turns it into
a `Weighted(total, weight)`: the sum over real tokens and how many there are. The loop divides
one by the other, so the loss is an exact mean over tokens, even when it adds up batches with
different numbers of real tokens (in evaluation, across devices or micro-batches). The accuracy is
reported next to it.
"""),
    code("""
def loss_fn(model, batch, rng):
    logits = model(batch["tokens"], batch["mask"])
    per_token = losses.softmax_cross_entropy(logits, batch["labels"], reduction="none")
    accuracy = losses.accuracy(logits, batch["labels"], mask=batch["mask"])
    return jaxnv.weighted_mean(per_token, batch["mask"]), {"accuracy": accuracy}


probe = Tagger(nnx.Rngs(1))  # a throwaway copy: calling a model in training mode updates it
probe.eval()
loss, aux = loss_fn(probe, example, None)
print(loss)
print(f"mean {float(loss.total / loss.weight):.3f}, accuracy {float(aux['accuracy']):.3f}")
assert float(loss.weight) == example["mask"].sum()

# what sits in the padding does not change the loss
scrambled = dict(example, tokens=np.where(example["mask"] > 0, example["tokens"], 7))
assert np.isclose(float(loss_fn(probe, scrambled, None)[0].total), float(loss.total), rtol=1e-6)
"""),
    md("""
## A custom evaluator

The loop evaluates `loss_fn` on the eval data. For anything else, pass `evaluators`: functions
`fn(model, eval_data) -> dict` that get the model in evaluation mode. This one counts the right
predictions over all real tokens by hand and the sequences that are right at every token.
"""),
    code("""
def tagging_accuracy(model, data):
    right = tokens = whole = sequences = 0.0
    for batch in data:
        pred = jnp.argmax(model(batch["tokens"], batch["mask"]), axis=-1)
        correct = (pred == batch["labels"]) | (batch["mask"] == 0)  # padding counts as right
        right += float(jnp.sum(correct * batch["mask"]))
        tokens += float(jnp.sum(batch["mask"]))
        whole += float(jnp.sum(jnp.all(correct, axis=-1)))
        sequences += len(batch["tokens"])
    return {"token_accuracy": right / tokens, "sequence_accuracy": whole / sequences}
"""),
    md("""
## Train

`fit` runs 150 steps of AdamW, logs the mean of every 10 steps, evaluates every 50 and saves a
checkpoint every 50 into `workdir`. A generator's position cannot be saved in a checkpoint, so
`on_resume="skip"` says what to do when we resume later: start a fresh generator and skip the
batches already used. A `Callback` can watch the run; this one notes the checkpoints (others stop
a run early, like `jaxnv.EarlyStopping`).
"""),
    code("""
class SavedSteps(jaxnv.Callback):
    def __init__(self):
        self.steps = []

    def on_save(self, step, directory):
        self.steps.append(step)


def train(steps, callbacks=()):
    return jaxnv.fit(
        model,
        loss_fn,
        batches(),
        steps=steps,
        optimizer=optax.adamw(3e-3),
        eval_data=eval_data,
        evaluators={"acc": tagging_accuracy},
        workdir=workdir,
        checkpoint_every=50,
        eval_every=50,
        log_every=10,
        on_resume="skip",
        callbacks=callbacks,
        progress=False,
    )


saved = SavedSteps()
first = train(150, [saved])
print("checkpoints at", saved.steps)
print("last train window:", {k: round(v, 4) for k, v in first.train_metrics.items()})
print("final evaluation: ", {k: round(v, 4) for k, v in first.eval_metrics.items()})

train_rows = [r for r in first.history if r["split"] == "train"]
assert saved.steps == [50, 100, 150]
assert [r["step"] for r in train_rows] == list(range(10, 151, 10))
assert first.eval_metrics["loss"] < train_rows[0]["loss"]  # it learned
"""),
    md("""
## Resume with more steps

Calling `fit` again on the same `workdir` with `steps=300` picks up the checkpoint at step 150:
weights, optimizer state, random keys and BatchNorm statistics. The fresh generator is
fast-forwarded by 150 batches, so steps 151 to 300 see the same batches as one uninterrupted run
would. The new result's history starts after the checkpoint, and `metrics.jsonl` holds the whole
run once.
"""),
    code("""
second = train(300)
train_rows = [r for r in second.history if r["split"] == "train"]
print("resumed from step", second.summary["resumed_from"])
print("first rows of the resumed run:", [(r["step"], round(r["loss"], 4)) for r in train_rows[:3]])

with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
logged = [r["step"] for r in rows if r["split"] == "train"]
print(f"metrics.jsonl: {len(rows)} rows, train steps {logged[0]}..{logged[-1]}")

assert second.summary["resumed_from"] == 150
assert [r["step"] for r in train_rows] == list(range(160, 301, 10))  # continues after 150
assert logged == list(range(10, 301, 10))  # no gaps and no duplicates
assert [r["step"] for r in rows if r["split"] == "eval"] == [50, 100, 150, 200, 250, 300]
"""),
    md("""
The proof that resuming lost nothing: the same 300 steps in one go, in a second workdir, log the
same numbers.
"""),
    code("""
straight = jaxnv.fit(
    model,
    loss_fn,
    batches(),
    steps=300,
    optimizer=optax.adamw(3e-3),
    eval_data=eval_data,
    workdir=os.path.join(tmp.name, "straight"),
    eval_every=50,
    log_every=10,
    progress=False,
)
resumed = [r["loss"] for r in rows if r["split"] == "train"]
in_one_go = [r["loss"] for r in straight.history if r["split"] == "train"]
print(f"largest difference in train loss: {np.max(np.abs(np.subtract(resumed, in_one_go))):.1e}")
np.testing.assert_allclose(resumed, in_one_go, rtol=1e-6)
np.testing.assert_allclose(second.eval_metrics["loss"], straight.eval_metrics["loss"], rtol=1e-6)
"""),
    md("""
## The evaluator's numbers

The custom metrics appear in every evaluation next to the loss. The token accuracy counted by
hand agrees with the `accuracy` that `loss_fn` reports, because the loop weights each eval batch
by its number of real tokens. Guessing would get 1 in 5 tokens right.
"""),
    code("""
m = second.eval_metrics
print({k: round(v, 4) for k, v in m.items()})
for key in ("token_accuracy", "sequence_accuracy"):
    assert 0.0 <= m[key] <= 1.0
assert m["token_accuracy"] > 0.9 > 1 / CLASSES  # far above chance
assert abs(m["token_accuracy"] - m["accuracy"]) < 1e-5
assert m["loss"] < first.eval_metrics["loss"]  # more steps, lower eval loss
"""),
    md("""
## Predict with the trained model

`result.model` is your `Tagger` with the trained weights, already in evaluation mode: no dropout,
and BatchNorm uses its running statistics, so the same input always gives the same output.
Switched to training mode, dropout makes two calls differ.
"""),
    code("""
trained = second.model
batch = eval_data[0]
pred = jnp.argmax(trained(batch["tokens"], batch["mask"]), axis=-1)
n = int(batch["mask"][0].sum())
print("tokens:   ", batch["tokens"][0, :n])
print("predicted:", np.asarray(pred[0, :n]))
print("labels:   ", batch["labels"][0, :n])

once = trained(batch["tokens"], batch["mask"])
again = trained(batch["tokens"], batch["mask"])
assert np.array_equal(np.asarray(once), np.asarray(again))  # eval mode: deterministic
assert np.array_equal(np.asarray(pred[0, :n]), batch["labels"][0, :n])

trained.train()  # only to show the difference; this also updates the BatchNorm statistics
assert not np.allclose(
    np.asarray(trained(batch["tokens"], batch["mask"])),
    np.asarray(trained(batch["tokens"], batch["mask"])),
)
"""),
    md("""
## Loss curves from `metrics.jsonl`

Every logged row is one JSON line in `<workdir>/metrics.jsonl`: the train rows are means over 10
steps, the eval rows the loss on the whole eval set. Any tool can read it; here, matplotlib.
The dotted line marks where the second `fit` resumed.
"""),
    code("""
train_curve = np.array([(r["step"], r["loss"]) for r in rows if r["split"] == "train"])
eval_curve = np.array([(r["step"], r["loss"]) for r in rows if r["split"] == "eval"])

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(train_curve[:, 0], train_curve[:, 1], label="train (mean of 10 steps)")
ax.plot(eval_curve[:, 0], eval_curve[:, 1], "o-", label="eval")
ax.axvline(150, color="gray", ls=":", label="resumed")
ax.set(xlabel="step", ylabel="cross-entropy per real token", yscale="log")
ax.legend()
fig.tight_layout()
png = os.path.join(tmp.name, "loss.png")
fig.savefig(png, dpi=80)
plt.close(fig)
display(Image(png))

assert eval_curve[-1, 1] < train_curve[0, 1]  # eval loss ends below the first logged loss
assert eval_curve[-1, 1] < eval_curve[0, 1]
"""),
    md("""
## Clean up

The workdir held the run's `config.json`, `metrics.jsonl`, `summary.json`, TensorBoard events and
checkpoints; in your own runs, keep it to resume or to evaluate later.
"""),
    code("""
print(sorted(os.listdir(workdir)))
tmp.cleanup()
print(f"notebook ran in {time.perf_counter() - notebook_start:.1f} s")
"""),
]


if __name__ == "__main__":
    for name, cells in (
        ("02_mixed_precision", MIXED_PRECISION),
        ("03_language_model", LANGUAGE_MODEL),
        ("04_distributed", DISTRIBUTED),
        ("05_your_own_model", YOUR_OWN_MODEL),
    ):
        print("wrote", write(name, cells))
