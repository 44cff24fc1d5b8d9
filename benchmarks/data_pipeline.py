"""The input pipeline's tokens/s against what the train step consumes, side by side; prepare's MB/s.

Run:  jaxnv bench data_pipeline [--mb 4] [--repeats 5] [--record]

Data: Python's own standard library (`sysconfig.get_paths()["stdlib"]`, its .py files in sorted
order up to `--mb` MB), prepared with `jaxnv.data.prepare.prepare` twice, with the bytes tokenizer
and with a BPE of `--bpe` ids trained on the same files, plus a Parquet copy of the same documents.
Pipelines, each at batch 16 x 128 and 16 x 512 and per tokenizer: `WindowBatches` and
`PackedBatches` (jaxnv.data.lm) read through `iterate(start, stop)` with its prefetch threads and
`put=jax.device_put`, as the training loop reads them; and the streamed, packed Parquet dataset
(`stream_dataset(..., packing=True)`, tokenizing as it reads) through `IterableBatches.iterate`,
as the loop reads a stream. Against them: jaxnv's own train step (fp32, AdamW) of the char_gpt-size
model (4 layers x 128 wide, 4 heads, for 16 x 128) and of a 4 x 512 GPT (8 heads, for 16 x 512),
whose vocabulary is the tokenizer's. Every contender returns tokens/s; the rounds are interleaved
(pipelines and steps alike) and figures are medians. The ratio pipeline / step should be >= 20x:
the input pipeline must never be what a run waits for. `prepare` (in this process, its batch
encode on the library's threads) is timed in MB/s of text against the tokenizer's own
`encode_batch` over the same documents.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import interleave, parser, report, time_steps

from jaxnv.core.losses import softmax_ce_loss
from jaxnv.core.optim import OptimizerConfig, make_optimizer
from jaxnv.core.precision import get_policy
from jaxnv.core.state import init_state
from jaxnv.core.step import batch_spec_of, make_train_step
from jaxnv.data.files import read_documents
from jaxnv.data.lm import PackedBatches, PreparedCorpus, WindowBatches
from jaxnv.data.pipeline import IterableBatches
from jaxnv.data.prepare import prepare
from jaxnv.data.streaming import stream_dataset
from jaxnv.data.tokenizers import load_saved, load_tokenizer
from jaxnv.models import Transformer

TARGET = 20.0  # pipeline tokens/s over step tokens/s
_RUNS = itertools.count()  # every `prepare` writes into a new directory


def stdlib_files(megabytes: float) -> list[str]:
    """The stdlib's .py files (site-packages left out) in sorted order, up to `megabytes` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or not p.is_file():
            continue
        files.append(str(p))
        total += p.stat().st_size
        if total >= megabytes * 1e6:
            break
    return files


def write_parquet(docs: list[str], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), path, row_group_size=256)


# ----------------------------------------------------------------------------------- contenders
def step_rate(layers, width, heads, vocab, batch_size, seq, steps):
    """A tokens/s callable: `steps` of jaxnv's train step on a fixed random batch."""
    policy = get_policy("fp32")
    cfg = OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.1, schedule="constant")
    tx = make_optimizer(cfg, 10_000)
    model_fn = lambda r: Transformer(  # noqa: E731
        vocab, num_layers=layers, num_heads=heads, embed_dim=width, max_seq_len=seq,
        policy=policy, rngs=r,
    )  # fmt: skip
    graphdef, state = init_state(model_fn, tx, policy, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, vocab, size=(batch_size, seq + 1))
    batch = {
        "x": jnp.asarray(tokens[:, :-1], jnp.int32),
        "y": jnp.asarray(tokens[:, 1:], jnp.int32),
    }
    step = make_train_step(graphdef, softmax_ce_loss, tx, policy, batch_spec=batch_spec_of(batch))
    holder = {"state": state}

    def run() -> float:
        holder["state"], seconds = time_steps(step, holder["state"], batch, steps)
        return batch_size * seq / seconds

    return run


def iterate_rate(batches, steps):
    """A tokens/s callable: the next `steps` steps of `batches.iterate`, copied to the device."""
    at = {"step": 0}

    def run() -> float:
        start, n, last = time.perf_counter(), 0, None
        first = at["step"]
        at["step"] += steps
        for last in batches.iterate(first, first + steps, put=jax.device_put):
            n += int(last["x"].size)
        jax.block_until_ready(last)
        return n / (time.perf_counter() - start)

    return run


def prepare_rate(paths, tok, workdir):
    """An MB/s callable: `prepare` of `paths` with `tok` into a new directory."""

    def run() -> float:
        out = os.path.join(workdir, f"prepare-{next(_RUNS)}")
        start = time.perf_counter()
        manifest = prepare(paths, out, tokenizer=tok, format="text", progress=False)
        return manifest["text_bytes"] / 1e6 / (time.perf_counter() - start)

    return run


def encode_rate(docs, tok):
    """An MB/s callable: the tokenizer's own `encode_batch` over `docs`."""
    nbytes = sum(len(d.encode()) for d in docs)

    def run() -> float:
        start = time.perf_counter()
        tok.encode_batch(docs)
        return nbytes / 1e6 / (time.perf_counter() - start)

    return run


# ----------------------------------------------------------------------------------- the bench
def main():
    p = parser(__doc__, repeats=5)
    p.add_argument("--mb", type=float, default=4.0, help="MB of stdlib .py text to prepare")
    p.add_argument("--bpe", type=int, default=4096, help="vocabulary of the trained BPE")
    args = p.parse_args()
    # (batch, seq, layers, width, heads, pipeline steps a round, train steps a round)
    shapes = [(16, 128, 4, 128, 4, 200, 5), (16, 512, 4, 512, 8, 60, 1)]
    megabytes, bpe = args.mb, args.bpe
    if args.quick:
        shapes, megabytes, bpe, args.repeats = [(2, 32, 1, 32, 2, 4, 1)], 0.1, 320, 1

    paths = stdlib_files(megabytes)
    docs = [d for d in read_documents(paths, "text") if d]
    workdir = tempfile.mkdtemp(prefix="jaxnv-bench-data-")
    parquet = os.path.join(workdir, "docs.parquet")
    write_parquet(docs, parquet)
    start = time.perf_counter()
    prepare(paths, os.path.join(workdir, "bpe"), tokenizer=f"bpe:{bpe}", progress=False)
    trained = time.perf_counter() - start
    toks = {"bytes": load_tokenizer("bytes"), f"bpe:{bpe}": load_saved(f"{workdir}/bpe/tokenizer")}
    prepare(paths, os.path.join(workdir, "bytes"), tokenizer="bytes", progress=False)
    corpora = {name: PreparedCorpus(os.path.join(workdir, name.split(":")[0])) for name in toks}
    text_mb = sum(len(d.encode()) for d in docs) / 1e6
    print(
        f"{len(paths)} stdlib files, {len(docs)} documents, {text_mb:.2f} MB; tokens: "
        + ", ".join(f"{k} {int(c.lengths.sum()):,}" for k, c in corpora.items())
        + f"; bpe:{bpe} trained and prepared in {trained:.1f} s",
        file=sys.stderr,
        flush=True,
    )

    rows = []
    for batch, seq, layers, width, heads, steps, train_steps in shapes:
        contenders = {}
        for name, tok in toks.items():
            corpus = corpora[name]
            ids = np.arange(len(corpus))
            model = f"{layers}x{width} step, vocab {tok.vocab_size}"
            contenders[(name, model)] = step_rate(
                layers, width, heads, tok.vocab_size, batch, seq, train_steps
            )
            window = WindowBatches(corpus, ids, seq_len=seq, batch_size=batch, seed=0)
            packed = PackedBatches(corpus, ids, seq_len=seq, batch_size=batch, seed=0)
            stream = stream_dataset(
                [parquet], "parquet", "text", tok, seq, batch, packing=True, seed=0
            )
            contenders[(name, "WindowBatches")] = iterate_rate(window, steps)
            contenders[(name, "PackedBatches")] = iterate_rate(packed, steps)
            contenders[(name, "stream parquet, packed")] = iterate_rate(
                IterableBatches(stream), steps
            )
        rates = interleave(contenders, args.repeats)
        for name in toks:
            model = next(k for (t, k) in rates if t == name and "step" in k)
            consumed = rates[(name, model)]
            rows.append((f"{model} ({name})", f"{batch} x {seq}", f"{consumed:,.0f}", "-", "-"))
            for what in ("WindowBatches", "PackedBatches", "stream parquet, packed"):
                ratio = rates[(name, what)] / consumed
                verdict = "holds" if ratio >= TARGET else f"below {TARGET:.0f}x"
                rows.append(
                    (
                        f"{what} ({name})",
                        f"{batch} x {seq}",
                        f"{rates[(name, what)]:,.0f}",
                        f"{layers}x{width} step",
                        f"{ratio:,.1f}x ({verdict})",
                    )
                )

    contenders = {}
    for name, tok in toks.items():
        contenders[(name, "prepare")] = prepare_rate(paths, tok, workdir)
        contenders[(name, "encode_batch")] = encode_rate(docs, tok)
    rates = interleave(contenders, max(1, min(args.repeats, 3)))
    for name in toks:
        prep, enc = rates[(name, "prepare")], rates[(name, "encode_batch")]
        rows.append(
            (
                f"prepare ({name}), MB/s",
                "-",
                f"{prep:.2f}",
                f"encode_batch {enc:.2f} MB/s",
                f"{prep / enc:.2f}x",
            )
        )

    shutil.rmtree(workdir, ignore_errors=True)
    header = ("case", "batch", "tokens/s (prepare: MB/s)", "against", "ratio (target >= 20x)")
    notes = (
        f"{text_mb:.1f} MB of stdlib .py text, {len(docs)} documents; step fp32 AdamW on a "
        "random x/y batch; pipelines copy each batch to the device."
    )
    report("data_pipeline.py", header, rows, args, notes)


if __name__ == "__main__":
    main()
