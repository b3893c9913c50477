"""The import graph of the llmcls package, function-level imports included (they hide cycles from Python, not
from a reader), and its cycles. ``python scripts/import_graph.py [SRC_DIR]`` prints both; the tests assert that
there is no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(src: Path) -> dict[str, set[str]]:
    """Edges module -> llmcls modules it imports anywhere in its body (package ``__init__`` modules that are only
    parents of an imported module are not counted)."""
    mods = {module_name(p, src): p for p in (src / "llmcls").rglob("*.py")}
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for n in names:
                # the longest prefix that is a module of the package: `from llmcls import dist` is llmcls.dist
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and n != "llmcls":
                    out[m].add(n)
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src"
    g = graph(src)
    for m in sorted(g):
        print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
    found = cycles(g)
    print(f"\ncycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
