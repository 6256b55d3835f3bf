"""The package's import graph, read from the source: no circles, no arrow running up the layers, and imports of bpo
modules at the top of a file unless a comment beside them says why (an optional dependency, start-up time)."""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bpo"

# Each unit (a subpackage, or a top-level module; a module named here is a unit of its own) may import from units in
# lower layers and from itself only. Atomic writes sit below everything: the config tree saves itself with them.
LAYERS = (
    ("bpo.runtime.atomic",),
    ("bpo.config", "bpo.loss"),
    ("bpo.runtime", "bpo.ops", "bpo.optim", "bpo.schedule"),
    ("bpo.data",),
    ("bpo.model",),
    ("bpo.ref_cache", "bpo.engines"),
    ("bpo.demo", "bpo.cli", "bpo.run_record"),
    ("bpo.eval", "bpo.build_data", "bpo.export", "bpo.plan"),
    ("bpo.train", "bpo.generate_blind", "bpo.ref_logprobs", "bpo.evaluate"),
)
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit_of(name):
    """The longest name in LAYERS that is `name` or a package holding it."""
    parts = name.split(".")
    return next(".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in LAYER or n == 1)


def imported_modules(name, node):
    """The bpo modules an import statement loads (a `from package import module` names the module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [m for m in found if m in MODULES and m != name]


def graph():
    """{module: [(imported module, line, at top level?)]}"""
    out = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        top |= {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try)) for n in ast.walk(stmt)}
        out[name] = [(m, node.lineno, id(node) in top) for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom)) for m in imported_modules(name, node)]
    return out


def test_every_unit_has_a_layer():
    assert {unit_of(m) for m in MODULES} - {"bpo"} <= set(LAYER), "add the new unit to LAYERS"
    assert unit_of("bpo.runtime.atomic") == "bpo.runtime.atomic" and unit_of("bpo.runtime.dist") == "bpo.runtime"


def test_no_arrow_runs_up():
    wrong = [f"{name}:{line} imports {target}" for name, edges in graph().items() for target, line, _ in edges
             if name != "bpo" and unit_of(name) != unit_of(target) and LAYER[unit_of(target)] >= LAYER[unit_of(name)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    edges = {name: {target for target, _, _ in targets} for name, targets in graph().items()}
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def says_why(lines, line):
    """A comment on the import's line, or on the line above the block of imports it belongs to."""
    i = line - 1
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
        i -= 1
    return any("#" in text for text in lines[max(i - 1, 0):line])


def test_imports_inside_functions_say_why():
    silent = set()
    for name, edges in graph().items():
        lines = MODULES[name].read_text().splitlines()
        for target, line, at_top in edges:
            if not at_top and not says_why(lines, line):
                silent.add(f"{os.path.relpath(MODULES[name], PACKAGE.parent)}:{line} imports {target}")
    assert not silent, "move these to the top of the file, or say why not in a comment:\n" + "\n".join(sorted(silent))


def test_the_graph_reader_sees_what_it_should():
    """Guard against a reader that finds nothing: the train job's imports are seen, at top level, and a silent import
    in a function is told from one that says why."""
    edges = graph()["bpo.train"]
    assert ("bpo.config", True) in {(t, top) for t, _, top in edges}
    assert len(edges) > 10
    lines = ["def f():", "    x = 1", "    from bpo import config", "    # torch: start-up time", "    import bpo.loss",
             "    from bpo import cli"]
    assert not says_why(lines, 3) and says_why(lines, 5) and says_why(lines, 6)
