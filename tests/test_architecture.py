"""Architecture rules of DESIGN.md, checked on the source text (ast and regex; nothing is imported).

- the catalog has one owner: no SQL write and no catalog write call outside ``store/``;
- no import cycle among the project's modules (lazy, function-level imports count too);
- no ``_private`` name imported from another module, and no private module imported from
  outside its package;
- layering: ``store`` imports no model code and neither stage; ``scdm.classify`` imports no
  transformers/peft and not ``scdm.embedding``; ``scdm.embedding`` does not import ``scdm.classify``.

Each test lists every violation it finds (file:line), so one run shows all that is left to fix.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
"""The one import root, ``scdm``, lives in ``src/scdm``."""
STORE = "scdm.store"
"""The layer that owns the catalog; every other module reaches it only through its functions."""


# --------------------------------------------------------------------------------------------
# the project's modules and their imports
# --------------------------------------------------------------------------------------------
@cache
def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the ``scdm`` package."""
    out = {}
    for path in sorted((SOURCE / "scdm").rglob("*.py")):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@cache
def tree_of(module: str) -> ast.Module:
    path = project_modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(module: str, node: ast.AST) -> str:
    return f"{project_modules()[module].relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"


def by_line(found: list[str]) -> list[str]:
    """``path:line: ...`` messages without repeats, in file and line order."""
    def key(hit: str) -> tuple[str, int, str]:
        path, line, rest = hit.split(":", 2)
        return path, int(line), rest

    return sorted(set(found), key=key)


def is_project(name: str) -> bool:
    return _inside(name, "scdm")


@dataclass(frozen=True)
class Import:
    """One imported module (``from m import x``: ``m.x`` when that is a module, else ``m``)."""

    importer: str
    target: str
    name: str | None
    """The name taken from ``target`` (``from m import name``), None for ``import m``."""
    node: ast.stmt
    lazy: bool
    """Inside a function: runs when the function is called."""
    type_checking: bool
    """Under ``if TYPE_CHECKING:``: never runs."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, lazy: bool = False, type_checking: bool = False) -> Iterator[tuple[ast.AST, bool, bool]]:
    """Every node with whether it sits in a function and whether under ``if TYPE_CHECKING``."""
    for child in ast.iter_child_nodes(node):
        yield child, lazy, type_checking
        in_function = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, in_function, True
                yield from _walk(stmt, in_function, True)
            for stmt in child.orelse:
                yield stmt, in_function, type_checking
                yield from _walk(stmt, in_function, type_checking)
        else:
            yield from _walk(child, in_function, type_checking)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if project_modules()[module].name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import statement of ``module``, top-level, lazy and TYPE_CHECKING alike."""
    modules = project_modules()
    out = []
    for node, lazy, type_checking in _walk(tree_of(module)):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, None, node, lazy, type_checking) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Import(module, sub if sub in modules else base, None if sub in modules else a.name,
                                  node, lazy, type_checking))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# a) the catalog has one owner
# --------------------------------------------------------------------------------------------
SQL_WRITE = re.compile(
    r"\b(INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+[\w.\"]+\s+SET|DELETE\s+FROM|TRUNCATE\s+(TABLE\s+)?[\w.\"]+|"
    r"CREATE\s+(OR\s+REPLACE\s+)?(TEMP(ORARY)?\s+)?(TABLE|VIEW|INDEX|SEQUENCE|SCHEMA|MACRO)|"
    r"DROP\s+(TABLE|VIEW|INDEX|SEQUENCE|SCHEMA|MACRO)|ALTER\s+TABLE|COPY\s+[\w.\"]+\s+FROM)\b")
"""A SQL statement that changes the catalog. Upper case (the project's SQL style) anywhere in a
string; any case in a string passed to an execute/query/sql call."""
SQL_CALLS = {"execute", "executemany", "query", "sql", "read_sql"}
CATALOG_OBJECTS = {"st", "store", "catalog", "cat"}
"""Names the project gives a Store or its Catalog (``st``, ``self.st``, ``st.catalog`` ...)."""


def _receiver(call: ast.Call) -> str:
    return ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""


def _is_write_call(call: ast.Call) -> bool:
    """A call that writes to the catalog whatever its SQL: ``insert_df``, a write transaction,
    ``execute`` on a store or catalog, a catalog connection that is not read-only."""
    method = _method(call)
    if method not in ("insert_df", "transaction", "execute", "executemany", "connect"):
        return False
    receiver = _receiver(call).split(".")[-1]
    if method in ("insert_df", "transaction"):
        return True
    if method in ("execute", "executemany"):
        return receiver in CATALOG_OBJECTS
    if method == "connect" and receiver == "catalog":
        return not any(k.arg == "read_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in call.keywords)
    return False


ALLOWED_WRITE_TEXT: dict[tuple[str, str], str] = {
    # (file, part of the string): why it is not a write. Add user-facing text that names a
    # statement without running it, e.g. help saying the read-only console refuses "DELETE FROM x".
}
"""Strings that mention SQL writes without running them (none at present)."""


def _string_text(node: ast.AST) -> str | None:
    """The text of a string literal, or an f-string's literal parts joined with ``?``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "?" for v in node.values)
    return None


def _method(call: ast.Call) -> str | None:
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def catalog_writes(module: str) -> list[str]:
    """``path:line: what`` of every catalog write in ``module``."""
    found = []
    tree = tree_of(module)
    # an f-string is checked as a whole, and a string passed to an SQL call only as such
    skip = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_write_call(node):
            found.append(f"{where(module, node)}: {_receiver(node)}.{_method(node)}(...)")
        if isinstance(node, ast.Call) and _method(node) in SQL_CALLS and node.args:
            text = _string_text(node.args[0])
            skip.add(id(node.args[0]))
            if text is not None and SQL_WRITE.search(text.upper()):
                found.append(f"{where(module, node)}: SQL write {text.strip()[:60]!r}")
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr | ast.Constant) and id(node) not in skip:
            text = _string_text(node)
            if text is not None and SQL_WRITE.search(text) and not _allowed_text(module, text):
                found.append(f"{where(module, node)}: SQL write text {text.strip()[:60]!r}")
    return by_line(found)


def _allowed_text(module: str, text: str) -> bool:
    path = str(project_modules()[module].relative_to(ROOT))
    return any(path == file and part in text for file, part in ALLOWED_WRITE_TEXT)


def test_write_calls_tell_writes_from_reads() -> None:
    def call(text: str) -> ast.Call:
        node = ast.parse(text).body[0].value  # type: ignore[attr-defined]
        assert isinstance(node, ast.Call)
        return node

    for write in ["st.insert_df('t', frame)", "self.st.catalog.transaction()", "st.execute(sql)",
                  "self.catalog.execute(sql, [1])", "st.catalog.connect()"]:
        assert _is_write_call(call(write)), write
    for read in ["st.query(sql)", "self.st.catalog.connect(read_only=True)", "con.execute(sql)", "st.sql(text)"]:
        assert not _is_write_call(call(read)), read


def test_sql_write_pattern_tells_statements_from_prose() -> None:
    for statement in ["INSERT INTO splits VALUES (?)", "UPDATE eval_runs SET status = 'done'", "DELETE FROM adapters",
                      "CREATE OR REPLACE TEMP TABLE t AS SELECT 1", "DROP VIEW v", "ALTER TABLE cells ADD COLUMN x",
                      "TRUNCATE eval_results"]:
        assert SQL_WRITE.search(statement), statement
    for prose in ["SELECT * FROM eval_results WHERE status = 'updated'", "the read-only console refuses writes",
                  "Delete from the store with `scdm rm`", "SELECT created_at FROM datasets"]:
        assert not SQL_WRITE.search(prose), prose


def test_no_catalog_writes_outside_store() -> None:
    """DESIGN.md: every catalog table has typed writer functions in ``store/``; nothing else writes SQL."""
    upper = [m for m in project_modules() if not _inside(m, STORE)]
    found = [hit for m in upper for hit in catalog_writes(m)]
    assert not found, "catalog writes outside store/ (add a typed writer to store/ instead):\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------
# b) no import cycles
# --------------------------------------------------------------------------------------------
def import_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (lazily or not; TYPE_CHECKING imports never run)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        for imp in imports_of(m):
            if not imp.type_checking and imp.target in modules and imp.target != m:
                graph[m].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan).

    A component holds every module on some cycle with the others; breaking the cycle shown may
    leave another in the same component, which the next run shows.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, c) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(component)


def test_cycle_finder_finds_lazy_cycles_only() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """Dependencies point one way (DESIGN.md): a lazy import inside a function is still a dependency."""
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for cycle in found:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            first = next(i for i in imports_of(a) if i.target == b and not i.type_checking)
            steps.append(f"{a} -> {b} ({where(a, first.node)}{', lazy' if first.lazy else ''})")
        members = _component(graph, cycle[0])
        lines.append("; ".join(steps) + (f"  [cycles also run through: {', '.join(sorted(members - set(cycle)))}]"
                                         if members - set(cycle) else ""))
    assert not found, "import cycles:\n" + "\n".join(lines)


def _component(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules reachable from ``start`` that also reach it."""
    def reach(edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    reverse: dict[str, set[str]] = {v: set() for v in graph}
    for v, ws in graph.items():
        for w in ws:
            reverse[w].add(v)
    return reach(graph) & reach(reverse)


# --------------------------------------------------------------------------------------------
# c) nothing reaches into another module's internals
# --------------------------------------------------------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_owner(target: str) -> str | None:
    """The package a private module belongs to (``store._zarr`` -> ``store``), None for a public module."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:i])
    return None


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def private_imports(module: str) -> list[str]:
    """``_name`` imported from another module; a private module imported from outside its package.

    A leading-underscore module is an implementation file of its package: the package's modules
    (subpackages included) may import it, nothing else may. A leading-underscore name is private to
    its module.
    """
    found = []
    for imp in imports_of(module):
        if not is_project(imp.target):
            continue
        owner = _private_module_owner(imp.target)
        if owner is not None and not _inside(module, owner):
            found.append(f"{where(module, imp.node)}: imports {imp.target}, private to package {owner}")
        if imp.name is not None and _private(imp.name):
            found.append(f"{where(module, imp.node)}: imports {imp.name} from {imp.target}")
    found += _private_attributes(module)
    found += _private_members(module)
    return by_line(found)


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to project modules (``import store.x as y``, ``from store import evaluation``)."""
    aliases = {}
    for imp in imports_of(module):
        if not is_project(imp.target):
            continue
        node = imp.node
        for a in node.names:  # type: ignore[attr-defined]
            if isinstance(node, ast.Import) and a.name == imp.target:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and imp.name is None and imp.target.endswith("." + a.name):
                aliases[a.asname or a.name] = imp.target
    return aliases


def _private_attributes(module: str) -> list[str]:
    """``mod._name`` where ``mod`` is another project module (``import store._zarr as z; z._x``)."""
    aliases = _module_aliases(module)
    found = []
    for node in ast.walk(tree_of(module)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = []
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                target = ".".join([aliases[value.id], *reversed(chain)])
                found.append(f"{where(module, node)}: uses {node.attr} of {target}")
    return found


NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
"""Public by design despite the underscore."""


def _private_members(module: str) -> list[str]:
    """``obj._name`` where nothing in this module defines ``_name``: another module's internals.

    ``self._name`` and ``cls._name`` are the class's own (a subclass may use its base's); a name
    this module defines (function, class, assignment, attribute it sets) is its own to use on any
    object; objects of third-party modules (``os._exit``) are not this project's business.
    """
    tree = tree_of(module)
    defined, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    for imp in imports_of(module):
        if not is_project(imp.target) and not getattr(imp.node, "level", 0):
            for a in imp.node.names:  # type: ignore[attr-defined]
                external.add(a.asname or a.name.split(".")[0])
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in defined | NAMEDTUPLE_API:
            continue
        root = node.value
        while isinstance(root, ast.Attribute | ast.Call | ast.Subscript):
            root = root.func if isinstance(root, ast.Call) else root.value
        if isinstance(root, ast.Name) and (root.id in external or (root.id in ("self", "cls") and root is node.value)):
            continue
        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super":
            continue
        found.append(f"{where(module, node)}: uses {ast.unparse(node)}, defined in another module")
    return found


def test_private_import_finder() -> None:
    assert _private_module_owner("scdm.store._zarr") == "scdm.store"
    assert _private_module_owner("scdm.embedding.models._common") == "scdm.embedding.models"
    assert _private_module_owner("scdm.store.splits") is None
    assert _inside("scdm.embedding.models.uce", "scdm.embedding") and not _inside("scdm.embeddingx", "scdm.embedding")


def test_no_private_names_across_modules() -> None:
    """A ``_name`` is its module's (a ``_module`` its package's): make it public or move it."""
    found = [hit for m in project_modules() for hit in private_imports(m)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------
# d) layering
# --------------------------------------------------------------------------------------------
_ABOVE_THE_STAGES = {"scdm.cli", "scdm.server", "scdm.demo", "scdm.api", "scdm.__main__"}
FORBIDDEN = {
    "scdm.store": {"torch", "transformers", "peft", "scdm.embedding", "scdm.classify", "scdm.prompt", *_ABOVE_THE_STAGES},
    "scdm.classify": {"transformers", "peft", "scdm.embedding", "scdm.prompt", *_ABOVE_THE_STAGES},
    "scdm.embedding": {"scdm.classify", "scdm.prompt", *_ABOVE_THE_STAGES},
    # the prompting arm meets the stages only in the store; openai/transformers/torch are imported inside its backends
    "scdm.prompt": {"scdm.embedding", "scdm.classify", "peft", *_ABOVE_THE_STAGES},
}
"""Packages each layer may not import, even lazily or for type checking (DESIGN.md:
``cli -> scdm.embedding, scdm.classify -> scdm.store``; the store has no torch; the stages never meet)."""


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layering(layer: str) -> None:
    found = [f"{where(m, imp.node)}: {m} imports {imp.target}"
             for m in project_modules() if _inside(m, layer)
             for imp in imports_of(m) if any(_inside(imp.target, banned) for banned in FORBIDDEN[layer])]
    assert not found, f"{layer} imports what it may not:\n" + "\n".join(found)


def test_import_scanner_sees_lazy_and_type_checking_imports() -> None:
    # this file's own module list must find the three packages' entry points
    modules = project_modules()
    assert {"scdm", "scdm.store", "scdm.embedding", "scdm.classify", "scdm.cli"} <= set(modules)
    kinds = {(i.lazy, i.type_checking) for m in modules for i in imports_of(m)}
    assert {(False, False), (True, False), (False, True)} <= kinds
