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
NAMES, import_graph, layer = ig.NAMES, ig.import_graph, ig.layer


def test_layers_never_import_upwards():
    graph = import_graph()
    assert len(graph) > 50 and all(m in graph for m in ("leansam.cli", "leansam.registry"))
    upward = sorted(
        f"{m} ({NAMES[layer(m)]}) imports {t} ({NAMES[layer(t)]})"
        for m, targets in graph.items()
        for t in targets
        if layer(t) > layer(m)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:  # depth-first search; grey = on the path
        state[m] = "grey"
        for t in sorted(graph[m]):
            if state.get(t) == "grey":
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "black"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The two tests above can fail: a function-level upward import and a cycle are found."""
    pkg = tmp_path / "leansam"
    (pkg / "modeling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling" / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("def f():\n    from .cli import main\n")
    (pkg / "cli.py").write_text("from .registry import f\n")
    graph = import_graph(tmp_path)
    assert graph["leansam.registry"] == {"leansam.cli"} and layer("leansam.registry") == 0
    assert graph["leansam.cli"] == {"leansam.registry"}


def test_architecture_md_shows_the_current_graph():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_graph.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
