"""Packaging and layout (issue 7, items 11 and 13): the library is torch-only and importable
without the harness; the package accepts a range of torch versions, the machine pin lives apart."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import psiopt

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "psiopt" / "optim"


#: optional extras a library module may import, inside its functions only (``psiopt[gpu]``)
OPTIONAL = {"triton"}


def imported_modules(path: Path, top_level: bool = False) -> set[str]:
    """Modules ``path`` imports (anywhere, or in its module body only)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_library_imports_torch_and_the_standard_library_only():
    files = sorted(LIBRARY.glob("*.py"))
    assert {f.stem for f in files} >= {"geometry", "base", "discovery", "registry", "diagnostics",
                                       "quotient", "sphere", "euclidean", "baselines"}
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top == "torch" or top in sys.stdlib_module_names or top in OPTIONAL, \
                f"{path.name} imports {name}"
        lazy = {n for n in imported_modules(path, top_level=True) if n.split(".")[0] in OPTIONAL}
        assert not lazy, f"{path.name} imports the optional {lazy} when it is imported"


def test_importing_psiopt_does_not_load_the_harness():
    code = ("import sys, psiopt; "
            "assert not [m for m in sys.modules if m.startswith('psiopt.experiments')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diagnostics_do_not_branch_on_optimizer_classes():
    """No optimizer class is named in the code (each states its own factor: ``scheduling_beta``)."""
    tree = ast.parse((LIBRARY / "diagnostics.py").read_text())
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    identifiers |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    identifiers |= {a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    for a in n.names}
    classes = {spec.cls.__name__ for spec in psiopt.REGISTRY.values()} | {"ScaleInvariantOptimizer"}
    assert "scheduling_beta" in identifiers and not identifiers & classes


def test_package_declares_a_torch_range_and_the_machine_pin_lives_apart():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.6"]  # param_names in optimizer groups: torch 2.6
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins == ["torch==2.13.0"]
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "numpy" in " ".join(project["optional-dependencies"]["harness"])
