"""The experiment commands of `jaxnv`: `train`, `eval`, `export`, and `predict` (an export's).

    jaxnv train EXPERIMENT [--workdir DIR] [KEY=VALUE ...]
    jaxnv eval EXPERIMENT --workdir DIR [--step latest|best|N] [KEY=VALUE ...]
    jaxnv export EXPERIMENT --workdir DIR --out PATH [KEY=VALUE ...]
    jaxnv predict PATH --input INPUT.npy [--output OUT.npy]

cli.py defines their arguments and dispatches to them. Each imports what it needs when it runs,
so `jaxnv --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time

_STARTED = time.perf_counter()  # the command's start, for its wall time in the summary


def cmd_train(args) -> int:
    from jaxnv import config as config_lib
    from jaxnv.experiment import load_experiment
    from jaxnv.train.loop import train

    exp = load_experiment(args.experiment)
    # a resume goes on from the run's own config.json; a new run (or one stopped before its
    # first checkpoint) starts from the experiment's
    resume = args.workdir if args.workdir and _has_checkpoints(args.workdir) else None
    exp.config, changed = workdir_config(exp.config, resume, args.overrides)
    if args.print_config:
        print(json.dumps(config_lib.to_dict(exp.config), indent=2))
        return 0
    if args.dry_run:
        from jaxnv.parallel.report import dry_run
        from jaxnv.train.loop import build

        print(dry_run(build(exp, abstract=True)))
        return 0
    import jax

    workdir = args.workdir
    if workdir is None:
        stamp = time.time()
        if jax.process_count() > 1:  # every process must pick the same directory
            import numpy as np
            from jax.experimental import multihost_utils

            # int32 halves: a float broadcast is float32 (x64 off) and would round to 128 s
            hi, lo = divmod(int(stamp), 2**16)
            hi, lo = multihost_utils.broadcast_one_to_all(np.array([hi, lo], np.int32))
            stamp = int(hi) * 2**16 + int(lo)
        name = time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))
        workdir = os.path.join("runs", exp.name, name)
    primary = jax.process_index() == 0
    if primary and changed:
        print(
            f"jaxnv: warning: resuming {workdir} with changes to its config.json: "
            f"{'; '.join(changed)} (the run goes on differently from how its checkpoints were "
            "trained)",
            file=sys.stderr,
            flush=True,
        )
    if primary:
        print(f"jaxnv: training {exp.name} in {workdir}", flush=True)
    result = train(exp, workdir=workdir)
    if primary:  # the command's wall time, imports and start-up included
        print(_human_summary(result.summary, workdir, time.perf_counter() - _STARTED), flush=True)
    return 0


_SUMMARY_KEYS = {  # shown in the first line, or not at all (all of them are in summary.json)
    "experiment", "steps", "resumed_from", "params", "precision", "seconds", "flops_per_step",
    "nonfinite_skipped", "rollbacks", "best_step", "note",
}  # fmt: skip


def _human_summary(summary: dict, workdir: str, seconds: float) -> str:
    """A few lines for people: what ran, the final eval metrics, the experiment's own lines, and
    where the files are (the whole summary is in summary.json)."""
    resumed = summary.get("resumed_from") or 0
    head = f"jaxnv: done in {seconds:.1f} s: {summary.get('experiment')}, step {summary['steps']}"
    head += f" (resumed from {resumed})" if resumed else ""
    evals = {k[5:]: v for k, v in summary.items() if k.startswith("eval_")}
    if evals:
        head += "; eval " + ", ".join(f"{k}={v:.4g}" for k, v in evals.items())
    lines = [head]
    if summary.get("note"):
        lines.append(f"  {summary['note']}")
    for k, v in summary.items():
        if k not in _SUMMARY_KEYS and not k.startswith(("eval_", "best_")):
            lines.append(f"  {k}: {v}")
    lines.append(f"jaxnv: files in {workdir}: config.json, metrics.jsonl, summary.json, ...")
    return "\n".join(lines)


# Keys whose change on resume leaves the trained trajectory as it was: what is logged, evaluated
# or kept, and how the state is laid out over the devices.
_RESUME_NEUTRAL = ("logging.", "checkpoint.", "mesh.", "train.eval_every", "train.eval_batch_size")


def _has_checkpoints(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds a committed step (orbax names it by its number)."""
    try:
        return any(n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
    except OSError:
        return False


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def workdir_config(base, workdir: str | None, overrides: list[str]):
    """`(config, changes)`: `workdir/config.json` (the run's own config, written by training) on
    top of the experiment's `base`, then `overrides` on top of that; without a workdir or its
    config.json, `base` with the overrides. `changes` names each key, outside `_RESUME_NEUTRAL`,
    whose value the overrides change from the workdir's config, as `key old -> new`."""
    from jaxnv import config as config_lib

    path = os.path.join(workdir, "config.json") if workdir else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = config_lib.from_dict(json.load(f), base=base)
        except ValueError as err:  # ConfigError, JSONDecodeError
            raise config_lib.ConfigError(
                f"{path} does not load as a config ({str(err).splitlines()[0]}): fix that file "
                "or pass the run's overrides with another --workdir"
            ) from err
    else:
        saved = None
    cfg = config_lib.validate(config_lib.apply_overrides(saved or base, overrides))
    if saved is None:
        return cfg, []
    before, after = _flat(config_lib.to_dict(saved)), _flat(config_lib.to_dict(cfg))
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new and not key.startswith(_RESUME_NEUTRAL):
            changes.append(f"{key} {json.dumps(old)} -> {json.dumps(new)}")
    return cfg, changes


def cmd_eval(args) -> int:
    from jaxnv.experiment import load_experiment
    from jaxnv.train.loop import evaluate_workdir

    exp = load_experiment(args.experiment)
    exp.config, _ = workdir_config(exp.config, args.workdir, args.overrides)
    step, metrics = evaluate_workdir(exp, args.workdir, step=_step_arg(args.step))
    print(json.dumps({"step": step, "split": "eval", **metrics}))
    return 0


def _step_arg(text: str | None) -> int | str | None:
    """`--step`: latest | best | an int."""
    if text is None or text in ("latest", "best"):
        return text
    if not text.isdigit():
        raise ValueError(f"--step {text!r}: use latest, best or a step number")
    return int(text)


def cmd_export(args) -> int:
    from jaxnv.experiment import load_experiment
    from jaxnv.serve.export import MANIFEST, export_workdir

    exp = load_experiment(args.experiment)
    exp.config, _ = workdir_config(exp.config, args.workdir, args.overrides)
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    out = export_workdir(exp, args.workdir, args.out, platforms=platforms)
    with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
        m = json.load(f)
    print(
        f"jaxnv: exported {exp.name} step {m['meta']['step']} to {out}: input "
        f"{_shape(m['input'])} -> output {_shape(m['output'])} on {', '.join(m['platforms'])}"
    )
    return 0


def _shape(spec: dict) -> str:
    dims = ", ".join("batch" if d is None else str(d) for d in spec["shape"])
    return f"({dims}) {spec['dtype']}"


def cmd_predict(args) -> int:
    import numpy as np

    from jaxnv.serve.export import load

    if args.output and os.path.exists(args.output):
        raise FileExistsError(f"--output {args.output!r} already exists: pass a new path")
    x = np.load(args.input, allow_pickle=False)
    if not isinstance(x, np.ndarray):
        raise ValueError(f"--input {args.input!r} is an .npz archive: pass one array as .npy")
    y = load(args.path)(x)
    if y.dtype.kind == "V":  # bfloat16 & co. are not numpy dtypes: np.save would write raw bytes
        y = y.astype(np.float32)
    if args.output:
        with open(args.output, "xb") as f:  # exactly this name (np.save adds .npy to a path)
            np.save(f, y, allow_pickle=False)
    else:
        print(np.array2string(y, threshold=20))
    written = f", written to {args.output}" if args.output else ""
    print(f"jaxnv: predicted {y.shape} {y.dtype.name} from input {x.shape} {x.dtype.name}{written}")
    return 0
