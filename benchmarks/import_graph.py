"""The package's import graph, drawn from the source with `ast`, and the rules it must keep.

    python benchmarks/import_graph.py            # the layer graph, the checks; exit 1 if one fails
    python benchmarks/import_graph.py --modules  # every module's gemmaquant imports as well

Every `import` counts, the ones inside functions included (a late import is still a dependency).
Checked (tests/test_import_graph.py runs the same checks):
  layers      each top-level module or package sits in a layer (LAYERS); no import points to a higher
              layer. Modules of one layer may import each other.
  cycles      no import cycle between modules.
  private     no `_name` imported from another module (`__dunder__` names are public).
  top level   at most MAX_TOP_LEVEL modules directly under gemmaquant/.
  torch-free  the modules in TORCH_FREE, and every module they import at module level, import no
              torch at module level (the CLI starts, lists schemes and starts the GGUF header
              process before torch's ~1.5 s import).
  one reader  one module parses GGUF (a byte cursor, or the gguf package's GGUFReader), and one
              reads a safetensors shard index (`weight_map` looked up).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gemmaquant"
# Bottom to top. A module's layer is that of its first component below gemmaquant.
LAYERS = [
    ("errors", ["gemmaquant", "errors"]),
    ("formats", ["formats"]),
    ("registry", ["schemes", "recipes", "limits"]),
    ("numerics", ["numerics"]),
    ("model", ["model"]),
    ("calib", ["calib"]),
    ("export / evaluate", ["export", "evaluate"]),
    ("pipeline", ["pipeline"]),
    ("cli", ["cli"]),
]
MAX_TOP_LEVEL = 6
TORCH_FREE = ["gemmaquant.errors", "gemmaquant.schemes", "gemmaquant.recipes", "gemmaquant.limits",
              "gemmaquant.formats"]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _base(name: str, path: Path, level: int, module: str | None) -> str:
    """The absolute module a `from` import names (relative imports resolved)."""
    if not level:
        return module or ""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    parts = pkg.split(".")
    if level > 1:
        parts = parts[: -(level - 1)]
    return ".".join(parts + ([module] if module else []))


def _top_level(tree: ast.Module):
    """Statements that run at import: the module body, the bodies of its if/try blocks, but not
    `if TYPE_CHECKING:` (never runs) nor functions and classes' methods."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                    (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                stack.extend(node.orelse)
                continue
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
        elif isinstance(node, ast.ClassDef):
            stack.extend(s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
        else:
            yield node


class Graph:
    def __init__(self, root: Path = ROOT):
        self.mods = modules(root)
        self.edges: dict[str, set[str]] = defaultdict(set)  # every import
        self.eager: dict[str, set[str]] = defaultdict(set)  # imports that run when the module is imported
        self.private: list[tuple[str, str, str]] = []
        self.torch_at_import: set[str] = set()
        self.trees = {name: ast.parse(p.read_text(encoding="utf-8")) for name, p in self.mods.items()}
        for name, tree in self.trees.items():
            top = {id(n) for n in _top_level(tree)}
            for node in ast.walk(tree):
                targets = self._targets(name, node)
                for t in targets:
                    self.edges[name].add(t)
                    if id(node) in top:
                        self.eager[name].add(t)
                if id(node) in top and self._imports_torch(node):
                    self.torch_at_import.add(name)

    def _targets(self, name: str, node) -> list[str]:
        out = []
        if isinstance(node, ast.ImportFrom):
            base = _base(name, self.mods[name], node.level, node.module)
            if not base.startswith("gemmaquant"):
                return []
            for a in node.names:
                sub = f"{base}.{a.name}"
                target = sub if sub in self.mods else base
                out.append(target)
                private = a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))
                if private and target != name:
                    self.private.append((name, target, a.name))
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("gemmaquant")]
        return out

    @staticmethod
    def _imports_torch(node) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name == "torch" or a.name.startswith("torch.") for a in node.names)
        return isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch"

    # -- layers ---------------------------------------------------------------------------------
    @staticmethod
    def top(module: str) -> str:
        """The top-level module or package a module belongs to ('gemmaquant' for the root)."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "gemmaquant"

    def layer(self, module: str) -> int | None:
        for i, (_, members) in enumerate(LAYERS):
            if self.top(module) in members:
                return i
        return None

    def unplaced(self) -> list[str]:
        return sorted({self.top(m) for m in self.mods if self.layer(m) is None})

    def upward(self) -> list[tuple[str, str]]:
        return sorted((a, b) for a, bs in self.edges.items() for b in bs
                      if None not in (self.layer(a), self.layer(b)) and self.layer(b) > self.layer(a))

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module, or a module importing itself."""
        index, low, stack, on, out = {}, {}, [], set(), []
        counter = [0]

        def visit(v):  # Tarjan, iterative enough for a package of this size
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in sorted(self.edges.get(v, ())):
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
                if len(comp) > 1 or v in self.edges.get(v, ()):
                    out.append(sorted(comp))

        limit = sys.getrecursionlimit()  # restored: a raised limit would outlive us (tests share the process)
        sys.setrecursionlimit(max(limit, 10000))
        try:
            for v in sorted(self.mods):
                if v not in index:
                    visit(v)
        finally:
            sys.setrecursionlimit(limit)
        return out

    def top_level_modules(self) -> list[str]:
        return sorted(p.name for p in ROOT.glob("*.py"))

    def torch_leaks(self) -> list[str]:
        """Modules reached at import time from TORCH_FREE (through module-level imports, packages'
        __init__ included) that import torch at module level."""
        seen, todo = set(), [m for m in self.mods if any(m == r or m.startswith(r + ".") for r in TORCH_FREE)]
        while todo:
            m = todo.pop()
            if m in seen or m not in self.mods:
                continue
            seen.add(m)
            parts = m.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a, a.b
            todo += sorted(self.eager.get(m, ()))
        return sorted(m for m in seen if m in self.torch_at_import)

    def readers(self) -> tuple[list[str], list[str]]:
        """(modules that parse GGUF, modules that read a shard index's weight_map)."""
        gguf, index = set(), set()
        for name, tree in self.trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and "Cursor" in node.name:
                    gguf.add(name)
                if isinstance(node, ast.Attribute) and node.attr == "GGUFReader":
                    gguf.add(name)
                if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                        and node.slice.value == "weight_map" and isinstance(node.ctx, ast.Load):
                    index.add(name)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                        and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "weight_map":
                    index.add(name)
        return sorted(gguf), sorted(index)

    # -- report ---------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        out = [f"in no layer: gemmaquant.{t} (add it to LAYERS)" for t in self.unplaced()]
        out += [f"upward import: {a} -> {b} ({LAYERS[self.layer(a)][0]} -> {LAYERS[self.layer(b)][0]})"
                for a, b in self.upward()]
        out += [f"import cycle: {' -> '.join(c)}" for c in self.cycles()]
        out += [f"private name imported: {a} imports {n} from {b}" for a, b, n in sorted(self.private)]
        top = self.top_level_modules()
        if len(top) > MAX_TOP_LEVEL:
            out.append(f"{len(top)} modules directly under gemmaquant/ (at most {MAX_TOP_LEVEL}): {', '.join(top)}")
        out += [f"torch imported at module level by {m}, which a torch-free module imports" for m in self.torch_leaks()]
        gguf, index = self.readers()
        if len(gguf) != 1:
            out.append(f"{len(gguf)} GGUF readers (one expected): {', '.join(gguf)}")
        if len(index) != 1:
            out.append(f"{len(index)} shard-index readers (one expected): {', '.join(index)}")
        return out

    def layer_graph(self) -> dict[tuple[int, int], int]:
        """(layer of importer, layer of imported) -> number of module imports, between different layers."""
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for a, bs in self.edges.items():
            for b in bs:
                la, lb = self.layer(a), self.layer(b)
                if None not in (la, lb) and la != lb:
                    counts[(la, lb)] += 1
        return dict(counts)

    def package_graph(self) -> dict[str, set[str]]:
        """Top-level module/package -> the top-level modules/packages it imports."""
        out: dict[str, set[str]] = defaultdict(set)
        for a, bs in self.edges.items():
            for b in bs:
                if self.top(a) != self.top(b):
                    out[self.top(a)].add(self.top(b))
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", action="store_true", help="also list every module's gemmaquant imports")
    a = ap.parse_args(argv)
    g = Graph()
    if a.modules:
        for m in sorted(g.mods):
            print(f"{m} -> {', '.join(sorted(g.edges.get(m, ()))) or '-'}")
        print()
    print("layers, top first, and what each imports (every import, function-level ones included):")
    pkgs = g.package_graph()
    present = {g.top(m) for m in g.mods}

    def rank(t):
        return g.layer(t if t == "gemmaquant" else f"gemmaquant.{t}")

    for i, (label, members) in reversed(list(enumerate(LAYERS))):
        for m in (m for m in members if m in present):
            deps = sorted(pkgs.get(m, ()), key=lambda d: (-(rank(d) if rank(d) is not None else 99), d))
            print(f"  [{i}] {label:18s} {m:10s} -> {', '.join(deps) or '-'}")
    counts = g.layer_graph()
    up = sum(n for (s, d), n in counts.items() if d > s)
    down = sum(n for (s, d), n in counts.items() if d < s)
    print(f"imports between layers: {down} downward, {up} upward")
    gguf, index = g.readers()
    print(f"GGUF reader: {', '.join(gguf) or '-'}; shard-index reader: {', '.join(index) or '-'}")
    print(f"modules directly under gemmaquant/: {', '.join(g.top_level_modules())}")
    problems = g.problems()
    print(f"{len(g.mods)} modules, {sum(len(v) for v in g.edges.values())} imports; "
          + ("all checks pass" if not problems else f"{len(problems)} problems:"))
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
