"""The `jaxnv` command line: `train`, `eval`, `info`.

    jaxnv train EXPERIMENT [--workdir DIR] [KEY=VALUE ...]
    jaxnv eval EXPERIMENT --workdir DIR [KEY=VALUE ...]
    jaxnv info

`JAXNV_CPU_DEVICES=N` simulates N CPU devices (set before JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _setup_devices() -> None:
    """Apply JAXNV_CPU_DEVICES before jax is imported."""
    n = os.environ.get("JAXNV_CPU_DEVICES")
    if n:
        if not n.isdigit() or int(n) < 1:
            sys.exit(f"jaxnv: JAXNV_CPU_DEVICES={n!r} must be a positive integer")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cmd_train(args) -> int:
    from jaxnv import config as config_lib
    from jaxnv.experiment import load_experiment
    from jaxnv.train import train

    exp = load_experiment(args.experiment)
    exp.config = config_lib.validate(config_lib.apply_overrides(exp.config, args.overrides))
    if args.print_config:
        print(json.dumps(config_lib.to_dict(exp.config), indent=2))
        return 0
    workdir = args.workdir or os.path.join("runs", exp.name, time.strftime("%Y%m%d-%H%M%S"))
    print(f"jaxnv: training {exp.name} in {workdir}", flush=True)
    result = train(exp, workdir=workdir)
    print("jaxnv: summary " + json.dumps(result.summary, default=float))
    return 0


def cmd_eval(args) -> int:
    from jaxnv import config as config_lib
    from jaxnv.experiment import load_experiment
    from jaxnv.train import evaluate_workdir

    exp = load_experiment(args.experiment)
    exp.config = config_lib.validate(config_lib.apply_overrides(exp.config, args.overrides))
    step, metrics = evaluate_workdir(exp, args.workdir)
    print(json.dumps({"step": step, "split": "eval", **metrics}))
    return 0


def cmd_info(args) -> int:
    from jaxnv.info import info_lines

    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxnv", description="JAX functional training framework")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an experiment (a name in experiments/ or a .py path)")
    p.add_argument("experiment")
    p.add_argument("--workdir", help="where config.json, metrics.jsonl, tensorboard/ go")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.steps=100")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a workdir")
    p.add_argument("experiment")
    p.add_argument("--workdir", required=True, help="a workdir written by `jaxnv train`")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.eval_batch_size=64"
    )
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("info", help="backend, devices, the auto precision and versions")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxnv` script."""
    parser = build_parser()
    # argparse stops filling a `nargs="*"` positional at the first option, so KEY=VALUE items
    # after `--workdir DIR` come back as extras: they are overrides too (the documented order).
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("train", "eval") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_devices()
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"jaxnv: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
