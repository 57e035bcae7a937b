"""The import direction of docs/architecture.md, enforced: every flipguard module's imports
(module level and inside functions) go only to packages its layer may use, the package
graph has no cycle, and function-local imports of flipguard modules stay few."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flipguard"

# layer of each top-level module/package; a module may import only from lower layers or its
# own package (same-layer imports between packages are listed explicitly in ALLOWED)
LAYERS = {
    "errors": 0, "fileio": 0, "fingerprint": 0, "layers": 0, "metrics": 0, "ssim": 0,
    "intervals": 0,
    "threshold": 0, "flipguard": 0, "mapselect": 3,
    "data": 1, "models": 1, "faults": 1,
    "detect": 2, "train": 2, "inject": 2,
    "campaign": 3,
    "criticality": 4, "harden": 4, "ra": 4,
    "report": 5, "nas": 6,
    "study": 7,
    "cli": 8, "__main__": 9,
}
ALLOWED = {("criticality", "detect"), ("ra", "criticality"), ("harden", "ra")}
MAX_LOCAL = 10


def _modules():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        yield f, ".".join(rel.parts).removesuffix(".__init__")


def _pkg(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "flipguard"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
             for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n == "flipguard" or n.startswith("flipguard."):
                yield n, id(node) in local


def test_every_import_goes_down_the_layers():
    bad = []
    for path, mod in _modules():
        src = _pkg(mod)
        for target, _ in _imports(path):
            dst = _pkg(target)
            if dst == src:
                continue
            assert dst in LAYERS and src in LAYERS, f"{mod}: {dst} has no layer in this test"
            same_base = LAYERS[dst] == LAYERS[src] == 0
            if LAYERS[dst] >= LAYERS[src] and not same_base and (src, dst) not in ALLOWED:
                bad.append(f"{mod} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_package_cycles():
    graph = defaultdict(set)
    for path, mod in _modules():
        for target, _ in _imports(path):
            if _pkg(target) != _pkg(mod):
                graph[_pkg(mod)].add(_pkg(target))
    seen, stack = set(), set()

    def visit(n, trail):
        assert n not in stack, "import cycle: " + " -> ".join(trail + [n])
        if n in seen:
            return
        stack.add(n)
        for m in sorted(graph[n]):
            visit(m, trail + [n])
        stack.discard(n)
        seen.add(n)

    for n in list(graph):
        visit(n, [])


def test_few_function_local_imports():
    local = [(mod, t) for path, mod in _modules() for t, is_local in _imports(path) if is_local]
    assert len(local) <= MAX_LOCAL, f"{len(local)} function-local flipguard imports: {local}"
