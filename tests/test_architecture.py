"""The import graph of ``src/leansam`` (function-level imports included): no cycles, and no module
imports from a layer above its own (ARCHITECTURE.md; STYLE.md "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: layer of each module, by dotted-name prefix (longest match wins); 0 = core
LAYERS = {
    # core: what a SAM user could vendor (torch, numpy, pillow only)
    "leansam.errors": 0,
    "leansam.version": 0,
    "leansam.configs": 0,
    "leansam.transforms": 0,
    "leansam.io": 0,
    "leansam.progress": 0,
    "leansam.provenance": 0,
    "leansam.distributed": 0,
    "leansam.modeling": 0,
    "leansam.checkpoint": 0,
    "leansam.registry": 0,
    "leansam.pretrained": 0,
    # features
    "leansam.predictor": 1,
    "leansam.runtime": 1,
    "leansam.export": 1,
    "leansam.amg": 1,
    "leansam.loading": 1,
    "leansam.quant": 1,
    "leansam.eval": 1,
    "leansam.train": 1,
    "leansam.data": 1,
    # the public package namespace re-exports features
    "leansam": 2,
    # applications
    "leansam.segment": 3,
    "leansam.demo": 3,
    "leansam.bench": 3,
    "leansam.service": 3,
    "leansam.cli": 3,
}
NAMES = {0: "core", 1: "features", 2: "package namespace", 3: "applications"}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def import_graph() -> dict[str, set[str]]:
    """Module -> the leansam modules it imports anywhere in its file."""
    files = {}
    for path in (SRC / "leansam").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in files else module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


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


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    """The two tests above can fail: a function-level upward import and a cycle are found."""
    pkg = tmp_path / "leansam"
    (pkg / "modeling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "modeling" / "__init__.py").write_text("")
    (pkg / "registry.py").write_text("def f():\n    from .cli import main\n")
    (pkg / "cli.py").write_text("from .registry import f\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    graph = import_graph()
    assert graph["leansam.registry"] == {"leansam.cli"} and layer("leansam.registry") == 0
    assert graph["leansam.cli"] == {"leansam.registry"}
