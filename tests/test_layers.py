"""The package's layers: every import points down (or within a layer), and no modules import each
other in a cycle. Imports inside functions count; `if TYPE_CHECKING:` imports (annotations) do not."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first; methods and tasks are plugins on the contract, the engine and the data layer
LAYERS = ["core", "engine", "storage", "data", "plugins", "running", "sweeps", "reporting", "cli"]
SOURCES = {"tta_bench": ROOT / "tta_bench", "tta_bench.methods": ROOT / "methods", "tta_bench.tasks": ROOT / "tasks"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "tta_bench" and parts[0] not in LAYERS:
                continue  # the package's __init__ (lazy re-exports of the public API)
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def layer(module: str) -> str:
    if module.startswith(("tta_bench.methods", "tta_bench.tasks")):
        return "plugins"
    return module.split(".")[1]


def _annotation_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (absolute or relative), TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _annotation_only(node)
            for child in node.body for n in ast.walk(child)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_every_import_points_down_or_within_its_layer():
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in graph().items() for t in sorted(targets)
              if LAYERS.index(layer(t)) > LAYERS.index(layer(m))]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_layer_map_covers_every_module():
    assert {layer(m) for m in modules()} <= set(LAYERS)


def test_the_0_1_module_paths_still_import_with_a_warning():
    import warnings

    from tta_bench.core.method import Method
    from tta_bench.core.protocol import Protocol
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from tta_bench.method import Method as old_method

        from tta_bench.engine import Protocol as old_protocol
    assert old_method is Method and old_protocol is Protocol
    assert any("tta_bench.core.method" in str(w.message) for w in caught)
