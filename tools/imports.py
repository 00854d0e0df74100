"""The import graph of utils/: cycles and imports against the layering (none of either is allowed).

    python tools/imports.py [ROOT]     # prints every violation and every cycle; exit 1 if any

Layers, bottom to top (a module may import its own package and any lower layer, never a peer or a higher one):
  0  utils.cli, utils.metrics, utils.eigen, utils.imagemath   plain: errors and flags, math
  1  utils.io, utils.stats                                      files; bootstrap intervals (use metrics)
  2  utils.prompts, utils.distributed, utils.results          prompt files, several processes, result files
  3  utils.models                                              families, denoisers, instruments
  4  utils.detection | utils.mitigation | utils.evaluation | utils.demo   (peers: none imports another)
  5  utils.startup                                             what the scripts share
Every import counts, also one inside a function.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"utils.cli": 0, "utils.metrics": 0, "utils.eigen": 0, "utils.imagemath": 0, "utils.schemas": 0,
          "utils.io": 1, "utils.stats": 1,
          "utils.prompts": 2, "utils.distributed": 2, "utils.results": 2, "utils.models": 3, "utils.detection": 4,
          "utils.mitigation": 4, "utils.evaluation": 4, "utils.demo": 4, "utils.startup": 5}


def modules(root=ROOT):
    """{module name: path} of every .py file under utils/."""
    out = {}
    for d, _, files in os.walk(os.path.join(root, "utils")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
                name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
                out[name] = os.path.join(d, f)
    return out


def imports(name, path, known):
    """Module names under utils that `name` imports (relative imports resolved; 'from pkg import mod' -> mod)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("utils")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("utils"):
                continue
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m != name}


def unit(name):
    """The layered unit a module belongs to (its top-level part of utils)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def check(root=ROOT):
    """(violations, cycles): 'a -> b (layer x -> y)' strings, and lists of module names forming a cycle."""
    mods = modules(root)
    graph = {m: imports(m, p, mods) for m, p in mods.items()}
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            um, ud = unit(m), unit(d)
            if um == ud or um == "utils" or ud == "utils":
                continue
            lm, ld = LAYERS.get(um), LAYERS.get(ud)
            if lm is None or ld is None or ld >= lm:
                bad.append(f"{m} -> {d} (layer {lm} -> {ld})")
    return bad, _cycles(graph)


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv=None):
    root = (argv or sys.argv[1:] or [ROOT])[0]  # another checkout's root (e.g. an old revision's worktree)
    bad, cycles = check(root)
    for b in bad:
        print("upward or sideways import:", b)
    for c in cycles:
        print("cycle:", " <-> ".join(c))
    print(f"{len(modules(root))} modules: {len(bad)} layering violation(s), {len(cycles)} cycle(s)")
    return 1 if bad or cycles else 0


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    sys.exit(main())
