"""The layers of loramux point one way: each package imports only from the layers below it (the order is in the
docstring of loramux/__init__.py), the core imports no torch, nothing in loramux/ or loadtests/ imports tests, and
loramux/ imports no loadtests.

Every `import` and `from ... import` counts, at the top of a module or inside a function (a lazy import is still a
dependency). `python tests/test_layers.py` lists every backward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom first. A module belongs to the layer of its longest prefix; `loramux` alone is the package's __init__.py.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("loramux", "loramux.core"),
    ("loramux.registry",),
    ("loramux.server",),
    ("loramux.adapters", "loramux.cluster", "loramux.cli"),
)
CORE = "loramux.core"
TESTS = "tests"
LOADTESTS = "loadtests"

Edge = tuple[str, str]  # (importing module, imported module)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(root: Path, package: str) -> dict[str, Path]:
    """module name -> file, for every module of `package` under `root`."""
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def imported_modules(tree: ast.AST, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules `tree` imports, wherever the import statement is. `from a import b` names module `a.b` where
    that is a module of the tree (`from loramux.core import paths`), else `a`; relative imports are resolved."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def import_edges(root: Path, packages: tuple[str, ...]) -> list[Edge]:
    """Every (importer, imported) pair among the modules of `packages` under `root`."""
    files = {name: path for package in packages for name, path in python_files(root, package).items()}
    known = set(files)
    edges = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for target in sorted(imported_modules(tree, name, path.name == "__init__.py", known)):
            edges.append((name, target))
    return edges


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the module's layer; None for a module of no layer (outside loramux, or new)."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "loramux" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def backward_edges(root: Path = ROOT) -> list[str]:
    """Each import of a higher layer by a lower one, each loramux module in no layer, each import of tests from
    loramux/ or loadtests/ and of loadtests from loramux/, as `importer -> imported`."""
    found = [f"{name}: in no layer of LAYERS" for name in python_files(root, "loramux") if layer_of(name) is None]
    for importer, imported in import_edges(root, ("loramux", "loadtests")):
        if imported == TESTS or imported.startswith(TESTS + "."):
            found.append(f"{importer} -> {imported} (nothing imports tests)")
            continue
        if importer.startswith("loramux") and imported.split(".")[0] == LOADTESTS:
            found.append(f"{importer} -> {imported} (the package does not import loadtests)")
            continue
        source, target = layer_of(importer), layer_of(imported)
        if source is not None and target is not None and target > source:
            found.append(f"{importer} -> {imported} (layer {source + 1} imports layer {target + 1})")
    return sorted(found)


def test_no_layer_imports_a_higher_one_and_nothing_imports_tests():
    assert backward_edges() == []


def test_the_package_docstring_lists_the_layers_in_order():
    import loramux

    doc = loramux.__doc__ or ""
    named = [f"`{prefix}`" for prefixes in LAYERS for prefix in prefixes if prefix != "loramux"]
    positions = [doc.find(name) for name in named]
    assert -1 not in positions, f"loramux/__init__.py does not name every layer: {named}"
    assert positions == sorted(positions)


def test_the_core_imports_no_torch():
    code = (
        "import importlib, pkgutil, sys, loramux.core as core\n"
        "for module in pkgutil.walk_packages(core.__path__, 'loramux.core.'):\n"
        "    importlib.import_module(module.name)\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('loramux.core.'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) == len(python_files(ROOT, "loramux/core")) - 1  # every module but the package itself


def test_the_check_finds_backward_edges_lazy_and_relative_imports_and_imports_of_tests(tmp_path):
    files = {
        "loramux/__init__.py": "",
        "loramux/cli.py": "from loramux.server import app\n",
        "loramux/core/__init__.py": "",
        "loramux/core/paths.py": "import os\nfrom loadtests import tiny_model\n",
        "loramux/core/spec.py": "from . import paths\n\n\ndef late():\n    from ..registry import store\n",
        "loramux/registry/__init__.py": "",
        "loramux/registry/store.py": "from loramux.core import paths\nfrom loramux import __version__\n",
        "loramux/server/__init__.py": "",
        "loramux/server/app.py": "import loramux.registry.store\nimport tests.conftest\n",
        "loramux/stray.py": "",
        "loadtests/__init__.py": "",
        "loadtests/tiny_model.py": "",
        "loadtests/bench.py": "from tests.conftest import make\nfrom loramux.adapters import merge\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert backward_edges(tmp_path) == [
        "loadtests.bench -> tests.conftest (nothing imports tests)",
        "loramux.core.paths -> loadtests.tiny_model (the package does not import loadtests)",
        "loramux.core.spec -> loramux.registry.store (layer 1 imports layer 2)",
        "loramux.server.app -> tests.conftest (nothing imports tests)",
        "loramux.stray: in no layer of LAYERS",
    ]


if __name__ == "__main__":
    offenders = backward_edges()
    print("\n".join(offenders) or "none")
    sys.exit(1 if offenders else 0)
