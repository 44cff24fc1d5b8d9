"""Import directions: the functional core does no I/O, and every import points down the layers."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxnv"
# Bottom to top. A module may import its own part and any part below it, never one above.
LAYERS = [
    "hostmem",  # a process setting applied on `import jaxnv`; imports nothing of jaxnv
    "core",
    "models",
    "data",
    "parallel",
    "checkpoint",
    "hf",  # jaxnv.hf: the public face of checkpoint/hf.py
    "config",
    "experiment",
    "train",
    "serve",
    "info",
    "errors",
    "cli_experiment",  # train, eval, export, predict: the commands cli.py's parser dispatches to
    "cli_text",  # the language-model subcommands, added to the parser by cli.py
    "cli",
]
RANK = {name: i for i, name in enumerate(LAYERS)}
IO_MODULES = {"os", "io", "shutil", "subprocess", "tqdm", "tensorboardX", "grain", "pickle"}


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported by `path`, leaving out `if TYPE_CHECKING:` blocks (annotations only)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "jaxnv":  # `from jaxnv import x`: x is the part
                names |= {f"jaxnv.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                names.add(node.module)
    return names


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )


def test_every_part_has_a_layer():
    parts = {_part(p) for p in _modules()}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = _part(path)
    for name in _runtime_imports(path):
        if not name.startswith("jaxnv."):
            continue
        target = name.split(".")[1]
        assert target in RANK, f"{path.name} imports {name}, which has no layer"
        assert RANK[target] <= RANK[own], f"{path.relative_to(PACKAGE)} ({own}) imports {name}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_other_part_and_no_io(path):
    imported = _runtime_imports(path)
    others = {n for n in imported if n.startswith("jaxnv.") and n.split(".")[1] != "core"}
    io = {n for n in imported if n.split(".")[0] in IO_MODULES}
    assert not others, f"core/{path.name} imports {others}"
    assert not io, f"core/{path.name} imports I/O modules {io}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_only_the_core(path):
    parts = {n.split(".")[1] for n in _runtime_imports(path) if n.startswith("jaxnv.")}
    assert parts <= {"core", "models"}, f"models/{path.name} imports {parts}"


def test_nothing_imports_the_cli():
    for path in _modules():
        if _part(path) != "cli":
            assert "jaxnv.cli" not in _runtime_imports(path), path


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\nfrom jaxnv.train import loop\n"
        "if TYPE_CHECKING:\n    from jaxnv.cli import main\n"
    )
    assert _runtime_imports(bad) == {"typing", "jaxnv.train"}


def test_no_pickle_anywhere():
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, f
