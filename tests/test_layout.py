"""The package's import graph: no cycles, no module importing a layer above its own, and
every import inside a function marked with why it is lazy. Static (ast): nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlxring"

# Bottom first. A module may import modules of its own layer and of the layers below;
# the most specific prefix decides a module's layer. This is the README's layout.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "mlxring.errors",
            "mlxring.cluster.protocol",
            "mlxring.cluster.config",
            "mlxring.cluster.plan",
        ),
    ),
    ("model facts and weights", ("mlxring.model", "mlxring.tiny")),
    ("transport, crypto, shards", ("mlxring.ring", "mlxring.crypto", "mlxring.shards")),
    ("engine", ("mlxring.engine",)),
    ("launch, server, jobs", ("mlxring.cluster", "mlxring.server", "mlxring.jobs")),
    ("commands", ("mlxring.commands",)),
    ("entry points", ("mlxring.cli", "mlxring.node", "mlxring.__main__")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None and module != "mlxring":
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README)")
    return best if best is not None else 0


def imported(node: ast.AST, module: str, modules: set[str]) -> list[str]:
    """The mlxring modules an import statement loads (a package's __init__ included)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = module.split(".")[: -node.level]
            base = ".".join([*package, base] if base else package)
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n in modules]


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """module -> the mlxring modules it imports; and the function-level imports."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[tuple[str, int, str]] = []
    for module, path in files.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    lazy.append((module, node.lineno, "\n".join(lines[: node.lineno])))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges[module].update(m for m in imported(node, module, modules) if m != module)
    return edges, lazy


def test_every_module_is_in_a_layer_and_imports_none_above_it():
    edges, _ = graph()
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in sorted(edges.items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lazy_imports_say_why():
    """An import inside a function keeps a heavy library off a path that does not need it;
    the comment above its block says so ("# lazy: ...")."""
    _, lazy = graph()
    unexplained = []
    for module, lineno, before in lazy:
        lines = before.splitlines()
        block = lineno - 1  # walk up over the import block to the line above it
        while block > 0 and (
            not lines[block - 1].strip()
            or lines[block - 1].strip().startswith(("from ", "import "))
        ):
            block -= 1
        above = lines[block - 1].strip() if block > 0 else ""
        if not (above.startswith("# lazy") or "# lazy" in lines[lineno - 1]):
            unexplained.append(f"{module}:{lineno}")
    assert not unexplained, "function-level imports without a '# lazy: why' comment: " + ", ".join(
        unexplained
    )


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The rules can fail: a made-up graph with both faults is caught."""
    assert layer_of("mlxring.cluster.config") < layer_of("mlxring.engine.engine")
    assert layer_of("mlxring.cluster.launch") > layer_of("mlxring.engine.engine")
    tree = ast.parse("from mlxring.cluster import config\nfrom . import plan\n")
    modules = {"mlxring.cluster", "mlxring.cluster.config", "mlxring.cluster.plan"}
    found = [m for node in tree.body for m in imported(node, "mlxring.cluster.fit", modules)]
    assert sorted(set(found)) == [
        "mlxring.cluster",
        "mlxring.cluster.config",
        "mlxring.cluster.plan",
    ]
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
