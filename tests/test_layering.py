"""The package's import direction: the command line application (finegates/app) builds on the
library and compaction, which never import it, and fg_kernels never imports finegates."""

import ast
from pathlib import Path

import fg_kernels
import finegates

PKG = Path(finegates.__file__).resolve().parent


def _imports(path: Path, package: str):
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def _package_of(path: Path, root: Path, name: str) -> str:
    return ".".join([name, *path.parent.relative_to(root).parts])


def test_nothing_outside_the_app_imports_it():
    offenders = []
    for path in PKG.rglob("*.py"):
        if "app" in path.relative_to(PKG).parts or path.name == "__main__.py":
            continue
        for mod in _imports(path, _package_of(path, PKG, "finegates")):
            if mod == "finegates.app" or mod.startswith("finegates.app."):
                offenders.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not offenders, offenders


def test_fg_kernels_does_not_import_finegates():
    root = Path(fg_kernels.__file__).resolve().parent
    offenders = [f"{p.relative_to(root)} imports {m}" for p in root.rglob("*.py")
                 for m in _imports(p, _package_of(p, root, "fg_kernels")) if m.split(".")[0] == "finegates"]
    assert not offenders, offenders


def test_the_import_check_sees_relative_imports():
    """The check itself: the app's relative import of the library resolves to its absolute name."""
    cli = PKG / "app" / "cli.py"
    assert "finegates.loss" in set(_imports(cli, "finegates.app"))
    assert "finegates.app.run_dir" in set(_imports(cli, "finegates.app"))
