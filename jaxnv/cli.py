"""The `jaxnv` command line: `train`, `eval`, `export`, `predict`, `info`.

    jaxnv train EXPERIMENT [--workdir DIR] [KEY=VALUE ...]
    jaxnv eval EXPERIMENT --workdir DIR [KEY=VALUE ...]
    jaxnv export EXPERIMENT --workdir DIR --out PATH [KEY=VALUE ...]
    jaxnv predict PATH --input INPUT.npy [--output OUT.npy]
    jaxnv launch -n N [--cpu-devices K] -- train EXPERIMENT ...
    jaxnv bench [NAME [--quick] [--repeats R] [--record] ...]
    jaxnv data prepare --input GLOB --out DIR [--tokenizer bytes|PATH|bpe:N] [--workers N]
    jaxnv generate (WORKDIR | HF_DIR) --prompt TEXT [--max-tokens N] [--temperature T] ...
    jaxnv export-hf WORKDIR --out DIR      # a Hugging Face directory transformers loads
    jaxnv serve (WORKDIR | HF_DIR) [--host 127.0.0.1] [--port N] [--slots K] [--max-len L] ...
    jaxnv info

`eval`, `export` and a resume (`train` on a workdir with checkpoints) start from the workdir's
`config.json`, the config it was trained with; KEY=VALUE overrides apply on top, and on a resume
one warning line names those that change the run.

An error in the user's own code (an experiment file or a module it imports, its model, loss or
data) prints the traceback of the user's frames only, then `jaxnv: error: Type: message` (exit
1); a mistake in the configuration, a path, the data's shapes or the command line is one line
naming the fix (exit 2). `jaxnv --traceback ...` or `JAXNV_TRACEBACK=full` prints every frame.

`JAXNV_CPU_DEVICES=N` simulates N CPU devices (set before JAX starts).

This module holds the parser, `main` and the tool commands (`launch`, `bench`, `info`); the
experiment commands (`train`, `eval`, `export`, `predict`) are in cli_experiment.py, and the
language-model ones (`data`, `generate`, `export-hf`, `serve`) in cli_text.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxnv.cli_experiment import (  # noqa: F401 (workdir_config: re-exported)
    cmd_eval,
    cmd_export,
    cmd_predict,
    cmd_train,
    workdir_config,
)
from jaxnv.cli_text import add_text_commands
from jaxnv.errors import report_error
from jaxnv.parallel import xla_flags


def _setup_devices() -> None:
    """Apply JAXNV_CPU_DEVICES before jax is imported."""
    n = os.environ.get("JAXNV_CPU_DEVICES")
    if n:
        if not n.isdigit() or int(n) < 1:
            sys.exit(f"jaxnv: JAXNV_CPU_DEVICES={n!r} must be a positive integer")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cmd_launch(args) -> int:
    from jaxnv.parallel.distributed import launch

    rest = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not rest:
        raise ValueError("launch needs a command: jaxnv launch -n 2 -- train EXPERIMENT ...")
    return launch(rest, args.num_processes, args.cpu_devices)


def benchmarks_dir() -> str:
    """The benchmarks/ folder: $JAXNV_BENCHMARKS, else ./benchmarks, else the source checkout's."""
    candidates = [os.environ.get("JAXNV_BENCHMARKS", ""), "benchmarks"]
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "_common.py")):
            return os.path.abspath(path)
    raise FileNotFoundError(
        "no benchmarks/ folder found: run from a jaxnv checkout or set JAXNV_BENCHMARKS=DIR"
    )


def cmd_bench(args) -> int:
    """Run benchmarks/NAME.py with the arguments after NAME; it prints its table.

    The table is appended to benchmarks/RESULTS.md only with `--record` (`--no-append`, the old
    opt-out, is accepted and changes nothing).
    """
    import runpy

    folder = benchmarks_dir()
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")
    if not args.name:
        usage = "run one with `jaxnv bench NAME [--quick] [--record]`"
        print(f"jaxnv: benchmarks ({usage}): " + ", ".join(names))
        return 0
    name = args.name.removesuffix(".py")
    if name not in names:
        import difflib

        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(f"no benchmark {name!r}: {hint}choose one of {', '.join(names)}")
    path = os.path.join(folder, name + ".py")
    sys.path.insert(0, folder)  # the scripts import their sibling _common
    saved, sys.argv = sys.argv, [path, *args.bench_args]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def cmd_info(args) -> int:
    from jaxnv.info import info_lines

    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxnv", description="JAX functional training framework")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, print the whole traceback, jaxnv's and JAX's frames included "
        "(also JAXNV_TRACEBACK=full)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an experiment (a name in experiments/ or a .py path)")
    p.add_argument("experiment")
    p.add_argument("--workdir", help="where config.json, metrics.jsonl, tensorboard/ go")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the step for the mesh, print shardings and memory, and exit",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="e.g. train.steps=100 (a resume: on top of the workdir's config.json)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a workdir")
    p.add_argument("experiment")
    p.add_argument("--workdir", required=True, help="a workdir written by `jaxnv train`")
    p.add_argument("--step", help="latest (default), best (checkpoint.keep_best) or a step")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="on top of the workdir's config.json, e.g. train.eval_batch_size=64",
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="export the newest checkpoint's predict (jax.export)")
    p.add_argument("experiment")
    p.add_argument("--workdir", required=True, help="a workdir written by `jaxnv train`")
    p.add_argument("--out", required=True, help="the export directory to create (not overwritten)")
    p.add_argument(
        "--platforms", default="cpu,cuda", help="comma-separated jax.export platforms (cpu,cuda)"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="on top of the workdir's config.json"
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("predict", help="run an export on an .npy input (no experiment code)")
    p.add_argument("path", help="an export directory written by `jaxnv export`")
    p.add_argument("--input", required=True, help="a .npy array (batch first)")
    p.add_argument("--output", help="where to np.save the predictions (.npy; not overwritten)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("launch", help="run a jaxnv command in N local processes (jax.distributed)")
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--cpu-devices", type=int, default=0, help="simulated CPU devices per process")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (no NAME: list them); prints its table",
        description="Run a benchmark script; its table is printed, and appended to "
        "benchmarks/RESULTS.md only with --record.",
    )
    p.add_argument("name", nargs="?", help="a script in benchmarks/, e.g. overhead")
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="the script's options, e.g. --quick, --repeats R, --record (append to RESULTS.md)",
    )
    p.set_defaults(func=cmd_bench)
    add_text_commands(sub)  # data, generate, export-hf, serve: jaxnv/cli_text.py
    p = sub.add_parser("info", help="backend, devices, the auto precision and versions")
    p.set_defaults(func=cmd_info)
    for name in ("train", "eval", "export", "predict", "generate", "serve", "info"):  # after it too
        sub.choices[name].add_argument(
            "--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxnv` script."""
    parser = build_parser()
    # argparse stops filling a `nargs="*"` positional at the first option, so KEY=VALUE items
    # after `--workdir DIR` come back as extras: they are overrides too (the documented order).
    args, extra = parser.parse_known_args(argv)
    takes_overrides = args.command in ("train", "eval", "export")
    if extra and (not takes_overrides or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    full = args.traceback or os.environ.get("JAXNV_TRACEBACK", "").lower() == "full"
    if full and "jax" not in sys.modules:
        os.environ.setdefault("JAX_TRACEBACK_FILTERING", "off")  # JAX's own frames too
    _setup_devices()
    try:  # XLA's GPU flags for collective/compute overlap, before JAX starts its backend
        xla_flags.prepare()
    except ValueError as err:
        sys.exit(f"jaxnv: {err}")
    joined = False
    if args.command != "launch":
        from jaxnv.parallel import distributed

        joined = distributed.initialize()  # a multi-process run, when the environment says so
    if args.command in ("train", "eval", "export", "serve"):
        from jaxnv.train.compilation import enable_compilation_cache

        enable_compilation_cache()  # $JAXNV_COMPILATION_CACHE, else ~/.cache/jaxnv/xla; "off"
    try:
        code = args.func(args)
    except SystemExit as err:
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
    except BaseException as err:  # noqa: BLE001 - every kind is reported by report_error
        code = report_error(err, command=args.command, full=full, joined=joined)
        if code is None:
            raise
    if joined and code:
        # a failed process must not wait in jax.distributed's shutdown barrier for peers that
        # are still training: leave now so that `launch` (or the cluster) stops the rest
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
