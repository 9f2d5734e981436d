"""The import graph of the fewseg package, read from its source with ``ast``: nothing is imported or run.

Two uses: a test asserts that the graph is one-way (no module imports one that imports it back, through any
chain), and :mod:`fewseg.config` digests the source of the modules behind each kind of workflow job, so that
editing a module reruns exactly the jobs that run it. Every form counts, at module level and inside functions:
``import fewseg.x``, ``from fewseg.x import y``, ``from fewseg import x`` and the relative ``from . import x``.
Imports under ``if TYPE_CHECKING:`` do not run and do not count.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

Graph = dict[str, set[str]]  # module -> the package's modules it imports


@dataclass(frozen=True)
class ModuleImports:
    """What one module imports: in its module-level code, and in each top-level function or class.

    ``references`` names, per top-level definition (and ``None`` for the module-level code), the module's other
    top-level definitions it mentions, so that an entry point's closure follows its helpers in the same module.
    """

    module_level: frozenset[str]
    definitions: Mapping[str, frozenset[str]]
    references: Mapping[str | None, frozenset[str]]

    @property
    def everywhere(self) -> set[str]:
        return set(self.module_level).union(*self.definitions.values())


def module_names(package_dir: str | os.PathLike = PACKAGE_DIR) -> list[str]:
    """The package's modules: one per ``.py`` file directly in it (``__init__`` included)."""
    return sorted(p.stem for p in Path(package_dir).glob("*.py"))


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> set[str]:
    """The package's modules an import statement loads."""

    def module_of(dotted: str) -> str:
        first = dotted.split(".", 1)[0]
        return first if first in modules else "__init__"

    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == package:
                found.add("__init__")
            elif alias.name.startswith(package + "."):
                found.add(module_of(alias.name[len(package) + 1 :]))
        return found
    if node.level > 1:
        raise ValueError(f"relative import beyond the {package} package (level {node.level})")
    if node.level == 1:
        base = node.module or ""
    elif node.module == package:
        base = ""
    elif node.module and node.module.startswith(package + "."):
        base = node.module[len(package) + 1 :]
    else:
        return found
    if base:
        found.add(module_of(base))
    else:  # from fewseg import x, y: modules, or names defined in __init__
        found |= {alias.name if alias.name in modules else "__init__" for alias in node.names}
    return found


def _collect(nodes: Iterable[ast.AST], package: str, modules: set[str]) -> set[str]:
    """Package modules imported anywhere under ``nodes``, skipping ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _targets(node, package, modules)
        elif _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def _names(nodes: Iterable[ast.AST]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def parse_module(path: str | os.PathLike, package: str, modules: Iterable[str]) -> ModuleImports:
    """The imports of one source file of ``package`` (whose modules are ``modules``)."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"{path}: cannot be parsed ({err.msg}, line {err.lineno})") from None
    modules = set(modules)
    definitions = {
        node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    # Module-level code: everything but the bodies of top-level definitions (their decorators do run on import).
    top = [n for n in tree.body if n.__class__ not in (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)]
    top += [d for node in definitions.values() for d in node.decorator_list]
    module_level = frozenset(_collect(top, package, modules))
    imports = {name: frozenset(_collect([node], package, modules)) for name, node in definitions.items()}
    refs: dict[str | None, frozenset[str]] = {None: frozenset(_names(top) & set(definitions))}
    for name, node in definitions.items():
        refs[name] = frozenset((_names([node]) & set(definitions)) - {name})
    return ModuleImports(module_level, imports, refs)


def parse_package(package_dir: str | os.PathLike = PACKAGE_DIR) -> dict[str, ModuleImports]:
    """:func:`parse_module` for every module of the package in ``package_dir`` (its name is the folder's)."""
    package_dir = Path(package_dir)
    names = module_names(package_dir)
    return {name: parse_module(package_dir / f"{name}.py", package_dir.name, names) for name in names}


def import_graph(package_dir: str | os.PathLike = PACKAGE_DIR) -> Graph:
    """module -> the package's modules it imports anywhere (module level or inside functions)."""
    return {name: parsed.everywhere for name, parsed in parse_package(package_dir).items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts (``[a, b, a]``), or None if the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path = [root]
        todo = [iter(sorted(graph.get(root, ())))]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph.get(nxt, ()))))
    return None


def closure(graph: Mapping[str, Iterable[str]], roots: Iterable[str]) -> set[str]:
    """``roots`` and every module they import, directly or through others."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.get(name, ()))
    return seen


def entry_closures(
    module: str, entry_points: Mapping[str, Iterable[str]], package_dir: str | os.PathLike = PACKAGE_DIR
) -> dict[str, set[str]]:
    """For each named group of ``module``'s top-level functions, the modules that run when they run.

    That is ``module`` itself, its module-level imports and those inside the functions and the same-module helpers
    they name; then everything those modules import. Other functions of ``module`` (other stages) do not count.
    """
    parsed = parse_package(package_dir)
    if module not in parsed:
        raise ValueError(f"{Path(package_dir) / module}.py: no such module")
    own = parsed[module]
    graph = {name: p.everywhere for name, p in parsed.items()}
    out = {}
    for group, functions in entry_points.items():
        missing = sorted(set(functions) - set(own.definitions))
        if missing:
            raise ValueError(f"{Path(package_dir) / module}.py: no top-level function {', '.join(missing)}")
        reached = closure(own.references, [None, *functions]) - {None}
        roots = {module, *own.module_level}.union(*(own.definitions[name] for name in reached))
        partial = closure({**graph, module: set()}, roots)  # the rest of the entry module is other entry points
        if any(module in graph[name] for name in partial - {module}):
            partial = closure(graph, roots)  # a module it runs imports it back: any of its functions may run
        out[group] = partial
    return out


def entry_closure(module: str, functions: Iterable[str], package_dir: str | os.PathLike = PACKAGE_DIR) -> set[str]:
    """:func:`entry_closures` of one group of functions."""
    return entry_closures(module, {"": functions}, package_dir)[""]
