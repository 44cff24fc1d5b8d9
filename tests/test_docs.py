"""Every runnable Python block in README.md and docs/*.md runs without errors.

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
- Blocks in other languages (``bash``, no tag, ...) are not run here.

Test ids are ``FILE:N``, where N counts the ``python`` blocks of FILE from 1 (``notest`` ones
included, so marking a block does not renumber the others).
"""

from __future__ import annotations

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
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} (line {block.line}) ran past {TIMEOUT_S} s")
    assert proc.returncode == 0, (
        f"{block.id} (line {block.line}) exited with {proc.returncode}\n"
        f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
        f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
    )
