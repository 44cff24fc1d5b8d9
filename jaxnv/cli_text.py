"""The language-model commands of `jaxnv`: `data prepare`, `generate`, `export-hf`, `serve`.

    jaxnv data prepare --input GLOB --out DIR [--tokenizer bytes|PATH|bpe:N] [--workers N]
    jaxnv generate (WORKDIR | HF_DIR) --prompt TEXT [--max-tokens N] [--temperature T] ...
    jaxnv export-hf WORKDIR --out DIR
    jaxnv serve (WORKDIR | HF_DIR) [--host 127.0.0.1] [--port N] [--slots K] ...

Each imports what it needs when it runs, so `jaxnv --help` stays fast.
"""

from __future__ import annotations

import argparse
import os


def _step(text: str | None) -> int | str | None:
    return int(text) if text and text.isdigit() else text


def cmd_generate(args) -> int:
    import jax

    from jaxnv.serve.loading import load_lm

    step = _step(args.step)
    lm = load_lm(args.path, step=step, experiment=args.experiment)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.temperature > 0:
        sampling["rng"] = jax.random.key(args.seed)
    texts = lm.complete(args.prompt, args.max_tokens, stop=tuple(args.stop), **sampling)
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(prompt + text, flush=True)
    return 0


def cmd_export_hf(args) -> int:
    from flax import nnx

    from jaxnv.hf import save
    from jaxnv.models import lora
    from jaxnv.serve.loading import load_lm

    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{args.workdir!r} holds no checkpoints/: give a workdir written by `jaxnv train`"
        )
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise FileExistsError(f"--out {args.out!r} already exists and is not empty: pick a new one")
    step = _step(args.step)
    lm = load_lm(args.workdir, step=step, experiment=args.experiment)
    model = nnx.merge(lm.graphdef, lm.params, lm.model_state)
    if lora.has_lora(model):
        model = lora.merge(model)  # adapters folded into the base weights
    tok = os.path.join(args.workdir, "tokenizer")
    hf_tokenizer = tok if os.path.isfile(os.path.join(tok, "tokenizer.json")) else None
    out = save(model, args.out, tokenizer=hf_tokenizer)
    note = "" if hf_tokenizer else f" (no tokenizer: the run's {lm.tokenizer.kind} has no HF form)"
    print(f"jaxnv: exported {lm.source} to {out}{note}", flush=True)
    return 0


def cmd_serve(args) -> int:
    import ipaddress
    import sys

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from jaxnv.serve.server import serve
    except ImportError as e:
        if (e.name or "").partition(".")[0] in ("fastapi", "uvicorn", "prometheus_client"):
            msg = "jaxnv serve needs the serve extra: pip install 'jaxnv[serve]'"
            raise ValueError(msg) from None
        raise
    from jaxnv.serve.loading import load_lm

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(
                f"--api-key-env {args.api_key_env}: that environment variable is unset or empty: "
                "export the key in it"
            )
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if api_key is None and not loopback:
        print(f"jaxnv serve: warning: listening on {args.host} without an API key: anyone who can "
              f"reach port {args.port} can use the model; set --api-key-env VAR",
              file=sys.stderr, flush=True)  # fmt: skip
    step = _step(args.step)
    lm = load_lm(args.path, step=step, experiment=args.experiment)
    return serve(lm, host=args.host, port=args.port, slots=args.slots, max_len=args.max_len,
                 api_key=api_key, model_name=args.model_name, max_queue=args.max_queue,
                 drain_timeout=args.drain_timeout,
                 log=lambda line: print(line, flush=True))  # fmt: skip


def cmd_data(args) -> int:
    from jaxnv.data.prepare import main as prepare_main

    prepare_main(args.data_args)  # prints its one-line summary
    return 0


def add_text_commands(sub) -> None:
    """Add the language-model subcommands to the `jaxnv` parser's subparsers."""
    p = sub.add_parser(
        "data",
        help="tokenize a corpus once: jaxnv data prepare --input GLOB --out DIR [--tokenizer ...]",
    )
    p.add_argument("action", choices=("prepare",))
    p.add_argument(
        "data_args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="--input GLOB --out DIR [--tokenizer bytes|PATH|bpe:N] [--format F] [--field F] "
        "[--workers N] (jaxnv data prepare --help)",
    )
    p.set_defaults(func=cmd_data)
    p = sub.add_parser(
        "generate", help="continue a text prompt with a trained workdir or a Hugging Face model"
    )
    p.add_argument("path", help="a workdir (trained on text files) or a Hugging Face model dir")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", help="of a workdir: latest (default), best or a step")
    p.add_argument("--experiment", help="the experiment whose make_model built the workdir's model")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser(
        "export-hf", help="write a workdir's model as a Hugging Face directory (safetensors)"
    )
    p.add_argument("workdir", help="a workdir trained on text (a transformer)")
    p.add_argument("--out", required=True, help="the directory to create (not overwritten)")
    p.add_argument("--step", help="latest (default), best or a step")
    p.add_argument("--experiment", help="the experiment whose make_model built the workdir's model")
    p.set_defaults(func=cmd_export_hf)
    p = sub.add_parser("serve", help="an OpenAI-compatible completions server")
    p.add_argument("path", help="a workdir (trained on text files) or a Hugging Face model dir")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--slots", type=int, default=8, help="requests decoded at once")
    p.add_argument("--max-len", type=int, default=None, help="prompt + new tokens (the context)")
    p.add_argument("--api-key-env", help="an environment variable holding the API key")
    p.add_argument("--model-name", help="the name clients send (default: the directory's)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument("--step", help="of a workdir: latest (default), best or a step")
    p.add_argument("--experiment", help="the experiment whose make_model built the workdir's model")
    p.set_defaults(func=cmd_serve)
