"""The import graph of ``src/leansam`` (function-level imports included, scripts/import_graph.py):
no cycles, no module importing from a layer above its own, and ARCHITECTURE.md's diagram current."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
ig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ig)
import_graph = ig.import_graph


def test_layers_never_import_upwards():
    graph = import_graph()
    assert len(graph) > 50 and all(m in graph for m in ("leansam.cli", "leansam.registry"))
    upward = ig.upward_imports(graph)
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles = ig.find_cycles(import_graph())
    assert not cycles, "\n".join(cycles)


def test_the_checker_finds_function_level_upward_imports_and_cycles(tmp_path):
    """The two tests above can fail: in a small fake package, a function-level import of the CLI
    by the registry is found as an upward import and, with the CLI importing the registry, as a
    cycle."""
    pkg = tmp_path / "leansam"
    (pkg / "modeling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling" / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("def f():\n    from .cli import main\n")
    (pkg / "cli.py").write_text("from .registry import f\n")
    graph = import_graph(tmp_path)
    assert graph["leansam.registry"] == {"leansam.cli"}
    assert ig.upward_imports(graph) == [
        "leansam.registry (core) imports leansam.cli (applications)"
    ]
    assert ig.find_cycles(graph) == ["leansam.cli -> leansam.registry -> leansam.cli"]


def test_architecture_md_shows_the_current_graph():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
