"""Structure of a tta_bench tree (issue 28's before/after figures): modules and lines, the longest
functions, import floors (the longest chain of module imports) and import cycles.

    python -m benchmarks.layers_report .                          # this checkout
    git archive dd20cb9 tta_bench methods tasks | tar -x -C /tmp/before && python -m benchmarks.layers_report /tmp/before
"""
import ast
import sys
from pathlib import Path

root = Path(sys.argv[1])
pkgs = {"tta_bench": root / "tta_bench", "tta_bench.methods": root / "methods", "tta_bench.tasks": root / "tasks"}
mods = {}
for pkg, folder in pkgs.items():
    for p in folder.rglob("*.py"):
        parts = p.relative_to(folder).with_suffix("").parts
        if pkg == "tta_bench" and parts and parts[0] in ("methods", "tasks"): continue
        mods[".".join((pkg, *parts)).removesuffix(".__init__")] = p
def imports(name, path):
    tree = ast.parse(path.read_text()); pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING" for c in node.body for n in ast.walk(c)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip: continue
        if isinstance(node, ast.Import): ts = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level: base = ".".join(pkg.split(".")[:len(pkg.split("."))-node.level+1] + ([base] if base else []))
            ts = [f"{base}.{a.name}" for a in node.names] + [base]
        else: continue
        out |= {t for t in ts if t in mods and t != name}
    return out
g = {m: imports(m, p) for m, p in mods.items()}
core = {m: p for m, p in mods.items() if not m.startswith(("tta_bench.methods", "tta_bench.tasks"))}
lines = {m: len(p.read_text().splitlines()) for m, p in core.items()}
print(f"tta_bench modules: {len(core)} ({sum(1 for m in core if not m.endswith('__init__') and mods[m].name != '__init__.py')} non-init), lines {sum(lines.values())}, largest:",
      ", ".join(f"{m.removeprefix('tta_bench.')} {n}" for m, n in sorted(lines.items(), key=lambda x: -x[1])[:6]))
funcs = []
for m, p in core.items():
    for node in ast.walk(ast.parse(p.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((node.end_lineno - node.lineno + 1, f"{m.removeprefix('tta_bench.')}.{node.name}"))
print("longest functions:", ", ".join(f"{n} {f}" for n, f in sorted(funcs, reverse=True)[:6]))
# floors: longest import chain among tta_bench core modules (cycles collapsed by ignoring back edges)
import functools

sys.setrecursionlimit(10000)
cyc = set()
state = {}
def visit(n, trail):
    state[n] = 1
    for t in g[n]:
        if t not in core: continue
        if state.get(t) == 1: cyc.add(tuple(sorted({*trail[trail.index(t):], n}) if t in trail else (n, t)))
        elif t not in state: visit(t, trail + [n])
    state[n] = 2
for n in core:
    if n not in state: visit(n, [])
@functools.lru_cache(None)
def floor(n, stack=()):
    deps = [t for t in g[n] if t in core and t not in stack]
    return 1 + max((floor(t, stack + (n,)) for t in deps), default=0)
deepest = max(core, key=floor)
chain = [deepest]
while deps := [t for t in g[chain[-1]] if t in core and t not in chain]:
    chain.append(max(deps, key=floor))
print("import floors:", floor(deepest), "cycles:", len(cyc), sorted(cyc))
print("deepest chain:", " -> ".join(m.removeprefix("tta_bench.") for m in chain))
