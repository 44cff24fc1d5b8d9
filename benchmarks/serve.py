"""Serving: continuous batching against the same requests served one at a time.

Run:  jaxnv bench serve [--slots 16] [--requests 64] [--quick] [--record] [--url URL --model M]

Starts `jaxnv serve` in a subprocess on 127.0.0.1 (a random Llama-style model, 4 layers x 256,
byte-level BPE, saved as a Hugging Face directory in a temporary folder) unless `--url` names a
running server. A load generator then sends the same mixed requests (prompts of 8-120 tokens,
8-96 new tokens, greedy, streamed) twice: by `--slots` concurrent clients, and by one client one
request at a time. Reported per phase: generated tokens/s, time to first token and inter-token
latency p50/p99 (client side), and the throughput ratio (target: >= 4x with 16 slots). Bounded:
every request has a timeout and the whole run a deadline (`--deadline` s).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import parser, report


def _model_dir(root: str, quick: bool) -> str:
    from flax import nnx

    from jaxnv.data.tokenizers import train_bpe
    from jaxnv.hf import save
    from jaxnv.models.transformer import Transformer

    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 8], 512)
    dims = dict(num_layers=2, embed_dim=64) if quick else dict(num_layers=4, embed_dim=256)
    model = Transformer(tok.vocab_size, num_heads=4, max_seq_len=256, rngs=nnx.Rngs(0), **dims)
    return str(save(model, os.path.join(root, "model"), tokenizer=tok.tok))


def _start(path: str, slots: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "jaxnv.cli", "serve", path, "--port", "0", "--slots",
           str(slots), "--max-len", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"jaxnv serve did not start: {line}{proc.stdout.read()[-2000:]}")
    return proc, line.split("listening on ")[1].split()[0]


async def _one(client, url, model, prompt, n, deadline):
    """Stream one greedy request; (token arrival times, start time)."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "return_token_ids": True}  # fmt: skip
    start, arrivals = time.perf_counter(), []
    timeout = max(1.0, deadline - time.monotonic())
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                arrivals += [now] * len(json.loads(line[6:])["choices"][0]["token_ids"])
    return start, arrivals


async def _phase(url, model, requests, clients: int, deadline: float):
    """Serve `requests` with `clients` concurrent clients; (seconds, [(start, arrivals)])."""
    import httpx

    todo = list(enumerate(requests))
    done: dict[int, tuple] = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:

        async def worker():
            while todo:
                i, (prompt, n) = todo.pop(0)
                done[i] = await _one(client, url, model, prompt, n, deadline)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start, [done[i] for i in range(len(requests))]


def _stats(seconds: float, results) -> dict:
    tokens = sum(len(a) for _, a in results)
    ttft = [a[0] - s for s, a in results if a]
    itl = [b - a for _, arr in results for a, b in zip(arr, arr[1:], strict=False)]
    ms = lambda xs, q: 1000 * float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return dict(tokens=tokens, rate=tokens / seconds, ttft=(ms(ttft, 50), ms(ttft, 99)),
                itl=(ms(itl, 50), ms(itl, 99)))  # fmt: skip


def main() -> None:
    p = parser(__doc__, repeats=1)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--model", default="model", help="the model name the server answers to")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole run")
    args = p.parse_args()
    slots, count = (4, 12) if args.quick else (args.slots, args.requests)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(1, 256, int(rng.integers(8, 121))).tolist(), int(rng.integers(8, 97)))
                for _ in range(count)]  # fmt: skip
    deadline = time.monotonic() + args.deadline
    with tempfile.TemporaryDirectory() as root:
        proc, url = (None, args.url) if args.url else _start(_model_dir(root, args.quick), slots)
        try:
            warm = requests[: min(slots, count)]  # first connections, first buckets
            asyncio.run(_phase(url, args.model, warm, slots, deadline))
            phases = {}
            for _ in range(args.repeats):  # interleaved: drift hits both alike
                for name, clients in (("one at a time", 1), (f"{slots} concurrent", slots)):
                    secs, res = asyncio.run(_phase(url, args.model, requests, clients, deadline))
                    stats = _stats(secs, res)
                    if name not in phases or stats["rate"] > phases[name]["rate"]:
                        phases[name] = stats
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    base = phases["one at a time"]["rate"]
    rows = []
    for name, s in phases.items():
        ratio = s["rate"] / base
        verdict = "" if name == "one at a time" else (" (holds)" if ratio >= 4 else " (misses)")
        ttft, itl = "{:.1f} / {:.1f}".format(*s["ttft"]), "{:.2f} / {:.2f}".format(*s["itl"])
        rows.append((name, count, s["tokens"], f"{s['rate']:,.0f}", ttft, itl,
                     f"{ratio:.2f}x{verdict}"))  # fmt: skip
    header = ("clients", "requests", "tokens", "tokens/s", "TTFT p50 / p99 ms",
              "inter-token p50 / p99 ms", "throughput ratio (target >= 4x)")  # fmt: skip
    what = "quick: 2x64 model, 4 slots" if args.quick else f"4x256 model, {slots} slots"
    report("serve.py", header, rows, args, notes=f"{what}; best of the repeats.")


if __name__ == "__main__":
    main()
