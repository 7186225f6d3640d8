"""The house rules, checked on the source: floors that only import downward, no import circles.

Every `import datasteer.X` / `from datasteer.X import ...` counts, including those inside function bodies. The
package's face (`datasteer/__init__.py`, which exposes the public API lazily) is exempt.
"""

import ast
from pathlib import Path

import datasteer

ROOT = Path(datasteer.__file__).resolve().parent

# Ground floor first; a module may import its own package and anything on a lower floor.
FLOORS = [
    {"errors", "progress", "stats", "chat", "secrets", "distributed"},
    {"config", "plugins", "plotting", "models", "retry"},
    {"runs", "recipes", "training", "engines"},
    {"io", "rows"},
    {"generation", "metagrad", "hub"},
    {"metrics", "dpg", "probes"},
    {"inheritance"},
    {"api", "cli"},
    {"__main__"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _unit(module: str) -> str:
    """datasteer.metrics.base -> metrics (a package or a top-level module)."""
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("datasteer"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (ROOT / Path(*node.module.split(".")[1:]) / f"{a.name}.py").exists()
                         or (ROOT / Path(*node.module.split(".")[1:]) / a.name).is_dir())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("datasteer"))
    return {m for m in found if m != "datasteer"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("datasteer", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def test_every_module_sits_on_a_floor():
    units = {_unit(m) for m in _modules() if m != "datasteer"}
    assert units <= set(FLOOR), f"put these on a floor in FLOORS: {sorted(units - set(FLOOR))}"


def test_no_import_runs_back_up_a_floor():
    wrong = []
    for module, path in _modules().items():
        if module == "datasteer":
            continue
        here = _unit(module)
        for imported in _imports(path):
            there = _unit(imported)
            if there != here and FLOOR[there] >= FLOOR[here]:
                wrong.append(f"{module} -> {imported}")
    assert not wrong, "imports that run sideways or back up:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items() if m != "datasteer"}
    # a package's __init__ importing its own submodules is its face, not a circle
    graph = {m: {i for i in deps if not (i.startswith(m + ".") and modules[m].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
