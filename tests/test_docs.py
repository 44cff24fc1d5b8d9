"""Every runnable Python block and marked shell block in README.md and docs/*.md runs cleanly.

Conventions for the markdown:

- A fenced block whose info string is ``python`` (or ``py`` / ``python3``) is runnable. Each one
  runs in a fresh ``python`` process, with a temporary directory as its working directory and
  ``JAX_PLATFORMS=cpu`` (the rest of the environment, including the 8 simulated CPU devices set
  by conftest.py, is inherited). It passes when the process exits with status 0, so a block
  checks its own results with ``assert``.
- A block that is shown but not meant to run (a signature, an excerpt, a pseudo-code sketch) is
  marked ``notest`` in its info string: ```` ```python notest ````. It is reported as skipped.
- A block runs alone, unless its first line is ``# continues``: then the block(s) before it in
  the same file are prepended, back to the nearest runnable block that does not itself start with
  ``# continues``. ``notest`` blocks are never prepended.
- A ``bash`` (or ``sh``) block runs only when marked ``test`` in its info string:
  ```` ```bash test ````. Keep those cheap (``jaxnv info``, a 20-step run). Each runs alone as
  ``bash -e -o pipefail`` in a temporary working directory, with the bin directory of the
  interpreter running the tests (the repository's ``.venv/bin`` under ``make test``) and
  ``.venv/bin`` first on ``PATH`` (so ``jaxnv`` is this checkout's), ``JAX_PLATFORMS=cpu`` and
  ``JAXNV_DOC_STEPS=20`` (a block can write ``train.steps=${JAXNV_DOC_STEPS:-300}`` to run
  shorter here than it reads). It passes when it exits with status 0.
- Other blocks (unmarked ``bash``, no tag, ...) are not run.

Test ids are ``FILE:N``, where N counts the ``python`` blocks of FILE from 1 (``notest`` ones
included, so marking a block does not renumber the others), and ``FILE:bashN`` for shell blocks,
where N counts all the ``bash``/``sh`` blocks of FILE.

Figures the README quotes that a test can check are checked here too: the experiments it names
and the run time it quotes for each (against the ``Time:`` line of the experiment's docstring).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_TAGS = {"python", "py", "python3"}
SHELL_TAGS = {"bash", "sh"}
SHELL_MARK = "test"  # ```bash test: run this shell block
DOC_STEPS = "20"  # $JAXNV_DOC_STEPS in shell blocks
CONTINUES = "# continues"
TIMEOUT_S = 300
TAIL_LINES = 40

# CommonMark fences: up to 3 spaces of indentation, then 3+ backticks or tildes.
_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    file: str  # path relative to the repository root
    index: int  # 1-based, among the python blocks of the file
    line: int  # 1-based line of the opening fence
    code: str
    runnable: bool

    @property
    def id(self) -> str:
        return f"{self.file}:{self.index}"

    @property
    def continues(self) -> bool:
        lines = self.code.lstrip("\n").splitlines()
        return bool(lines) and lines[0].strip() == CONTINUES


def _fenced_blocks(text: str):
    """Yields (line, info, code) for each fenced code block in ``text``."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not close.match(lines[j]):
            # remove up to the fence's own indentation from each content line
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        yield i + 1, info, "\n".join(body) + "\n"
        i = j + 1  # an unclosed fence runs to the end of the file


def parse_blocks(text: str, file: str) -> list[Block]:
    """The python-tagged blocks of the markdown ``text`` of ``file``, in order."""
    blocks = []
    for line, info, code in _fenced_blocks(text):
        words = info.split()
        if not words or words[0].lower() not in PYTHON_TAGS:
            continue
        blocks.append(
            Block(
                file=file,
                index=len(blocks) + 1,
                line=line,
                code=code,
                runnable="notest" not in (w.lower() for w in words[1:]),
            )
        )
    return blocks


def collect_blocks(path: Path) -> list[Block]:
    return parse_blocks(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


@dataclass(frozen=True)
class ShellBlock:
    file: str  # path relative to the repository root
    index: int  # 1-based, among all the bash/sh blocks of the file (marked or not)
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:bash{self.index}"


def parse_shell_blocks(text: str, file: str) -> list[ShellBlock]:
    """The shell blocks of the markdown ``text`` marked to run (```` ```bash test ````)."""
    blocks, index = [], 0
    for line, info, code in _fenced_blocks(text):
        words = info.lower().split()
        if not words or words[0] not in SHELL_TAGS:
            continue
        index += 1
        if SHELL_MARK in words[1:]:
            blocks.append(ShellBlock(file=file, index=index, line=line, code=code))
    return blocks


def collect_shell_blocks(path: Path) -> list[ShellBlock]:
    return parse_shell_blocks(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def script_for(block: Block, blocks: list[Block]) -> str:
    """The source to run for ``block``: itself, after its predecessors if it ``# continues``."""
    chain = [block]
    prev = [b for b in blocks if b.runnable and b.index < block.index]
    while chain[0].continues and prev:
        chain.insert(0, prev.pop())
    return "\n".join(f"# --- {b.id} (line {b.line}) ---\n{b.code}" for b in chain)


BLOCKS = {path: collect_blocks(path) for path in DOCS if path.exists()}
PARAMS = [
    pytest.param(
        block,
        blocks,
        id=block.id,
        marks=() if block.runnable else pytest.mark.skip(reason="marked `python notest`"),
    )
    for blocks in BLOCKS.values()
    for block in blocks
]


SHELL_BLOCKS = [b for path in DOCS if path.exists() for b in collect_shell_blocks(path)]


def _run_block(block, cmd, cwd, env) -> None:
    """Run one block's script; fail with its id, line and output tails unless it exits 0."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} (line {block.line}) ran past {TIMEOUT_S} s")
    assert proc.returncode == 0, (
        f"{block.id} (line {block.line}) exited with {proc.returncode}\n"
        f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
        f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
    )


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def test_readme_has_python_blocks():
    """Guards the parser: if it silently found nothing, every doc test would vanish."""
    blocks = collect_blocks(ROOT / "README.md")
    assert [b for b in blocks if b.runnable], "no runnable ```python block found in README.md"


def test_parser_handles_conventions():
    text = (
        "```python\na = 1\n```\n"
        "```bash\nexit 1\n```\n"
        "```python notest\nraise SystemExit(1)\n```\n"
        "1. item\n   ```python\n   # continues\n   assert a == 1\n   ```\n"
        "````python\n```\nb = 2\n````\n"
    )
    blocks = parse_blocks(text, "x.md")
    assert [b.runnable for b in blocks] == [True, False, True, True]
    assert parse_shell_blocks(text, "x.md") == []  # an unmarked bash block never runs
    assert blocks[2].code == "# continues\nassert a == 1\n"
    assert blocks[3].code == "```\nb = 2\n"
    script = script_for(blocks[2], blocks)
    assert "a = 1" in script and "raise SystemExit" not in script
    assert script_for(blocks[0], blocks).count("# ---") == 1


@pytest.mark.parametrize("block, blocks", PARAMS)
def test_doc_block_runs(block: Block, blocks: list[Block], tmp_path):
    script = tmp_path / f"{block.file.replace('/', '_')}_{block.index}.py"
    script.write_text(script_for(block, blocks), encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    _run_block(block, [sys.executable, str(script)], tmp_path, env)


def test_readme_has_shell_blocks():
    """Guards the shell parser the same way: the README marks at least one block to run."""
    assert collect_shell_blocks(ROOT / "README.md"), "no ```bash test block found in README.md"


def test_shell_parser_runs_only_marked_blocks():
    text = (
        "```bash\nexit 1\n```\n"
        "```bash test\njaxnv info\n```\n"
        "```python\na = 1\n```\n"
        "```sh test\necho hi\n```\n"
        "```console\n$ exit 1\n```\n"
    )
    blocks = parse_shell_blocks(text, "x.md")
    assert [(b.id, b.line, b.code) for b in blocks] == [
        ("x.md:bash2", 4, "jaxnv info\n"),
        ("x.md:bash3", 10, "echo hi\n"),
    ]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_doc_shell_block_runs(block: ShellBlock, tmp_path):
    script = tmp_path / f"{block.file.replace('/', '_')}_bash{block.index}.sh"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXNV_DOC_STEPS=DOC_STEPS)
    bins = [str(Path(sys.executable).parent), str(ROOT / ".venv" / "bin"), env.get("PATH")]
    env["PATH"] = os.pathsep.join(dict.fromkeys(filter(None, bins)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    work = tmp_path / "cwd"
    work.mkdir()
    _run_block(block, ["bash", "-e", "-o", "pipefail", str(script)], work, env)


EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem[0] != "_")
# `jaxnv train NAME ...   # what it does, ~15 s` (a line of the README's quickstart)
QUOTED_TIME = re.compile(r"jaxnv train (\w+)\b.*#.*~(\d+(?:\.\d+)?) ?(s|min)\s*$")
DOCSTRING_TIME = re.compile(r"^Time:\s+about (\d+(?:\.\d+)?) ?(s|min)\b", re.MULTILINE)


def test_readme_names_every_experiment():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert EXPERIMENTS
    for name in EXPERIMENTS:
        assert f"jaxnv train {name}" in readme, f"the README's quickstart does not run {name}"
        assert f"`{name}`" in readme, f"the README's list of experiment names lacks `{name}`"


def test_readme_run_times_match_the_experiments_docstrings():
    quoted = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if m := QUOTED_TIME.search(line):
            quoted.setdefault(m[1], (m[2], m[3]))
    assert quoted, "no `jaxnv train NAME  # ..., ~N s` line found in README.md"
    for name, (value, unit) in quoted.items():
        path = ROOT / "experiments" / f"{name}.py"
        assert path.is_file(), f"README.md times an experiment that does not exist: {name}"
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if stated := DOCSTRING_TIME.search(doc):  # a docstring without a Time: line is not checked
            assert (float(value), unit) == (float(stated[1]), stated[2]), (
                f"README.md says {name} takes ~{value} {unit}; "
                f"its docstring says about {stated[1]} {stated[2]}"
            )


DISTRIBUTED_ROWS = {  # the mesh column of docs/distributed.md's table -> its overrides
    "`fsdp`, data 2 × fsdp 4": ["mesh.rules=fsdp", "mesh.data=2", "mesh.fsdp=4"],
    "`tp`, data 2 × tensor 4": ["mesh.rules=tp", "mesh.data=2", "mesh.tensor=4"],
    "`fsdp+tp`, fsdp 4 × tensor 2": ["mesh.rules=fsdp+tp", "mesh.fsdp=4", "mesh.tensor=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(DISTRIBUTED_ROWS))
def test_distributed_md_collective_figures_match_the_compiled_step(row):
    """The bytes docs/distributed.md quotes are the ones the dry run reports today."""
    import jax

    from jaxnv import apply_overrides
    from jaxnv.experiment import load_experiment
    from jaxnv.parallel.report import compile_step, format_report
    from jaxnv.train import build

    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row} |"))
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(exp.config, DISTRIBUTED_ROWS[row])
    run = build(exp, jax.devices()[:8], abstract=True)
    report = format_report(run, compile_step(run))
    sent = re.search(r"collectives per step per device: ([\d.]+ MiB) sent", report).group(1)
    gpu = re.search(r"reduce-scatters on GPU, ([\d.]+ MiB) sent there", report)
    assert cells[2] == sent, report
    assert cells[3] == (gpu.group(1) if gpu else sent), report
