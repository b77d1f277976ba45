"""The import graph of ``src/leansam`` by layer, as a Mermaid diagram (ARCHITECTURE.md).

    python scripts/import_graph.py            # print the diagram
    python scripts/import_graph.py --check    # exit 1 if ARCHITECTURE.md's diagram is stale
    python scripts/import_graph.py --write    # update the diagram in ARCHITECTURE.md

Every import counts, function-level ones included; modules are collapsed to their top-level
module or package (``leansam.quant.wrap`` -> ``quant``). ``tests/test_architecture.py`` uses
:func:`import_graph` and :data:`LAYERS` to forbid cycles and upward imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

#: layer of each module, by dotted-name prefix (longest match wins); a module may import its own
#: layer and those below it
LAYERS = {
    # core: what a SAM user could vendor (torch, numpy, pillow only)
    "leansam.errors": 0,
    "leansam.version": 0,
    "leansam.configs": 0,
    "leansam.transforms": 0,
    "leansam.io": 0,
    "leansam.prompts": 0,
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
    # the public package namespace (``import leansam``) re-exports features
    "leansam": 2,
    # applications
    "leansam.segment": 3,
    "leansam.label": 3,
    "leansam.demo": 3,
    "leansam.bench": 3,
    "leansam.service": 3,
    "leansam.cli": 3,
}
NAMES = {0: "core", 1: "features", 2: "package namespace", 3: "applications"}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the leansam modules it imports anywhere in its file."""
    files = {}
    for path in (src / "leansam").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
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


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle a depth-first search meets, as ``a -> b -> a`` strings."""
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:  # grey: on the current path
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
    return cycles


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a layer above the importer's."""
    return sorted(
        f"{m} ({NAMES[layer(m)]}) imports {t} ({NAMES[layer(t)]})"
        for m, targets in graph.items()
        for t in targets
        if layer(t) > layer(m)
    )


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "leansam"


def mermaid(graph: dict[str, set[str]]) -> str:
    """Top-level modules / packages grouped by layer, an arrow per import between them (imports
    of ``errors``, which nearly every module makes, left out)."""
    units = {_unit(m): layer(m) for m in graph}
    pairs = {(_unit(m), _unit(t)) for m, ts in graph.items() for t in ts}
    edges = sorted((a, b) for a, b in pairs if a != b and b != "errors")
    lines = ["```mermaid", "flowchart TB"]
    for lay in sorted(NAMES, reverse=True):
        members = sorted(u for u, v in units.items() if v == lay)
        lines.append(f'  subgraph L{lay}["{NAMES[lay]}"]')
        lines += [f"    {u.replace('leansam', 'pkg')}[{u}]" for u in members]
        lines.append("  end")
    lines += [
        f"  {a.replace('leansam', 'pkg')} --> {b.replace('leansam', 'pkg')}" for a, b in edges
    ]
    lines.append("```")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- import graph: begin -->\n", "<!-- import graph: end -->\n"


def main(argv: list[str]) -> int:
    diagram = mermaid(import_graph())
    if "--check" not in argv and "--write" not in argv:
        print(diagram, end="")
        return 0
    path = REPO / "ARCHITECTURE.md"
    text = path.read_text()
    if BEGIN not in text or END not in text:
        print(f"{path} has no import-graph markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    if "--write" in argv:
        if current != diagram:
            path.write_text(head + BEGIN + diagram + END + tail)
        return 0
    if current != diagram:
        print(
            "ARCHITECTURE.md's import graph is stale: python scripts/import_graph.py --write",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
