"""The functional core never imports the shell (data, I/O, loop, CLI)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxnv"
CORE = [
    "config",
    "precision",
    "losses",
    "optim",
    "parallel",
    "models",
    "state",
    "step",
    "shardmap",
    "tasks",
]
SHELL = {
    "data",
    "writers",
    "experiment",
    "train",
    "cli",
    "info",
    "checkpoint",
    "export",
    "distributed",
    "preemption",
    "profiling",
    "report",
}
IO_MODULES = {"os", "io", "shutil", "subprocess", "tqdm", "tensorboardX", "grain", "pickle"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(module: str) -> list[Path]:
    path = PACKAGE / module
    return sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_not_import_the_shell(module):
    for f in _files(module):
        imported = _imports(f)
        shell = {n for n in imported if n.startswith("jaxnv.") and n.split(".")[1] in SHELL}
        io = {n for n in imported if n.split(".")[0] in IO_MODULES}
        assert not shell, f"{f.name} imports shell modules {shell}"
        assert not io, f"{f.name} imports I/O modules {io}"


def test_no_pickle_anywhere():
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, f
