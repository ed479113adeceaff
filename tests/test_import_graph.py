"""The package's import graph has no cycles, and its subpackages import downwards only (LAYERS).

A cycle makes a module's names depend on which module of the cycle was imported first; the layout
is meant to read one way, top to bottom in LAYERS (docs/architecture.md). The cycle check and the
layering check count what runs when a module loads: imports inside functions run later (that is how
`iterppo` imports a subcommand's module only when it runs) and `if TYPE_CHECKING:` imports never run.
The second cycle check counts every import statement that can run: a cycle hidden in a function
(cli -> sweep -> cli, once) still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "iterppo_lightning"
# Source folder -> the module name it is installed as (pyproject.toml: callbacks/ is iterppo_lightning.callbacks).
SOURCES = {REPO / PACKAGE: PACKAGE, REPO / "callbacks": f"{PACKAGE}.callbacks"}
# The package's layers, top to bottom (docs/architecture.md): a module imports, at module level, only from its
# own layer or the layers below it. A top-level module (cli.py, system.py) is a layer of its own.
LAYERS = [
    "__main__",
    "cli",
    "experiments",
    "commands",
    "system",
    "loop",
    "callbacks",
    "modules",
    "rl",
    "env",
    "models",
    "data",
    "distributed",
    "utils",
]


def module_files(sources: dict[Path, str]) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py file under the source folders."""
    modules = {}
    for folder, prefix in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module loads: top level, and inside top-level if/try blocks."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _module_level_imports(block)


def _every_import(body: list[ast.stmt]):
    """Every import statement that can run, in functions too; `if TYPE_CHECKING:` blocks are for type checkers only."""
    pending = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path], everywhere: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (everywhere: in functions too)."""
    graph: dict[str, set[str]] = {}
    imports = _every_import if everywhere else _module_level_imports
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's own package, one level up per extra dot
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # `from a import b` imports the module a.b when there is one, else the name b of module a.
                candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str | None:
    """`pkg.loop.controller` -> "loop", `pkg.cli` -> "cli"; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]], layers: list[str]) -> list[str]:
    """Every import from a module to one in a higher layer (or in a layer `layers` does not place), as text."""
    rank = {layer: i for i, layer in enumerate(layers)}
    problems = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            src, dst = layer_of(source), layer_of(target)
            if src is None or dst is None or src == dst:
                continue
            if src not in rank or dst not in rank:
                problems.append(f"{source} -> {target} ({src if src not in rank else dst} is not in LAYERS)")
            elif rank[dst] < rank[src]:
                problems.append(f"{source} -> {target} ({dst} is above {src})")
    return problems


def test_the_package_import_graph_has_no_cycles():
    modules = module_files(SOURCES)
    assert f"{PACKAGE}.cli" in modules and f"{PACKAGE}.callbacks.base" in modules
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle (module-level imports): " + " -> ".join(cycle)


def test_no_cycle_hides_in_imports_inside_functions():
    cycle = find_cycle(import_graph(module_files(SOURCES), everywhere=True))
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_the_check_finds_a_cycle_through_absolute_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from pkg.a import something\n")
    (pkg / "d.py").write_text("def f():\n    import pkg.a\n")  # inside a function: not module level
    (pkg / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n")
    graph = import_graph(module_files({pkg: "pkg"}))
    assert graph["pkg.d"] == set() and graph["pkg.e"] == set()
    cycle = ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert find_cycle(graph) == cycle
    (pkg / "sub" / "c.py").write_text("def g():\n    from pkg.a import something\n")
    assert find_cycle(import_graph(module_files({pkg: "pkg"}))) is None
    assert find_cycle(import_graph(module_files({pkg: "pkg"}), everywhere=True)) == cycle


def test_subpackages_import_only_from_the_layers_below_them():
    modules = module_files(SOURCES)
    assert {layer_of(m) for m in modules} - {None} == set(LAYERS), "every top-level module or subpackage has a layer"
    problems = upward_imports(import_graph(modules), LAYERS)
    assert not problems, "imports against the layering (docs/architecture.md):\n  " + "\n  ".join(problems)


def test_the_layering_check_finds_an_upward_import_and_an_unplaced_subpackage(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("high", "low", "extra"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from pkg.low import b\n")  # downwards: allowed
    (pkg / "high" / "c.py").write_text("from . import a\n")  # within its layer: allowed
    (pkg / "low" / "b.py").write_text("def f():\n    from pkg.high import a\n")  # inside a function: not counted
    layers = ["high", "low"]
    assert upward_imports(import_graph(module_files({pkg: "pkg"})), layers) == []
    (pkg / "low" / "b.py").write_text("from ..high import a\n")
    (pkg / "extra" / "d.py").write_text("import pkg.low.b\n")
    assert upward_imports(import_graph(module_files({pkg: "pkg"})), layers) == [
        "pkg.extra.d -> pkg.low.b (extra is not in LAYERS)",
        "pkg.low.b -> pkg.high.a (high is above low)",
    ]
