"""The package's layering (docs/ARCHITECTURE.md): every import runs downward, stage code lives in its
folder, and every method is registered."""

import ast
from pathlib import Path

import onnxadmm

PACKAGE = Path(onnxadmm.__file__).parent

#: Bottom to top. A module may import from its own layer or any layer below it, never above.
LAYERS = [
    {"errors", "config"},
    {"onnxio"},
    {"algorithms"},
    {"analysis"},
    {"bridge"},
    {"calib"},
    {"cost"},
    {"export"},
    {"plan"},
    {"solve"},
    {"finetune"},
    {"report"},
    {"quantize"},
    {"methods"},
    {"validation"},
    {"budget"},
    {"api", "cli", "__init__", "__main__"},
]
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "api.py", "cli.py", "config.py", "errors.py"}


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports(path: Path):
    """(imported top-level part of onnxadmm, line) for every relative import in ``path``."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for top-level modules
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > depth:
                continue
            package = list(path.relative_to(PACKAGE).parts[:depth - up])
            target = package + (node.module.split(".") if node.module else [])
            if target:
                yield target[0].removesuffix(".py"), node.lineno
            else:  # from . import x (package root): each name is a top-level module
                for alias in node.names:
                    yield alias.name, node.lineno


def test_every_import_runs_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for target, line in _imports(path):
            if target == "__version__" or target == own:
                continue
            if _layer(target) > _layer(own):
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_stage_code_at_the_top_level():
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top <= TOP_LEVEL_MODULES, f"stage code at the package top level: {sorted(top - TOP_LEVEL_MODULES)}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set().union(*LAYERS), f"folders missing from the layering: {folders - set().union(*LAYERS)}"


def test_api_has_no_method_dispatch():
    source = (PACKAGE / "api.py").read_text()
    assert len(source.splitlines()) < 200
    assert "config.method ==" not in source and "config.method in" not in source


def test_every_method_is_registered():
    from onnxadmm.config import METHODS
    from onnxadmm.methods import REGISTRY, CompressionMethod

    assert set(REGISTRY) == set(METHODS) - {"auto"}  # auto is the search over the registered methods
    for name, method in REGISTRY.items():
        assert isinstance(method, CompressionMethod) and method.name == name
