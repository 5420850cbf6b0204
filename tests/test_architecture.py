"""The shape of the code, checked from its source: no import cycle; imports point down the layers (the CLI, then
api, then detect, then proposals, then detect.ops, then detect.structures / detect.io / detect.errors); one exception
hierarchy in detect/errors.py; test modules share helpers only through tests/helpers.py.

Decisions:
- Imports are read with ``ast`` from every ``.py`` file under ``detect/``, ``api/`` and ``proposals/``, including
  imports inside functions and ``importlib.import_module("...")`` calls with a literal name: a lazy import is still
  a dependency, and deferring one is how a cycle usually hides.
- An import names the most specific project module it reaches (``from detect import weights`` is an edge to
  ``detect.weights``). The implicit import of parent packages (``detect/__init__.py``) is not an edge: a package
  that re-exports its submodules would otherwise form a cycle with each of them.
- The exception check imports every project module and walks ``DetectError.__subclasses__()``; classes that test
  modules define are ignored (their ``__module__`` is not a project module).
- Failure messages list every offending edge as ``importer -> imported (file:line)`` so the fix is obvious.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detect", "api", "proposals")
IN_PROGRESS = pytest.mark.xfail(strict=True, reason="issue 11 in progress")  # the lead removes each marker


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # "path:line"

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*folders: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` under ``folders`` (relative to the repository root)."""
    files = (p for folder in folders for p in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in p.parts)
    return {module_name(p): p for p in files}


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a known module (``None`` when none is)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _literal_import_module(node: ast.AST) -> str | None:
    """The name in ``import_module("name")`` / ``importlib.import_module("name")``, else ``None``."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return None
    func = node.func
    named = (isinstance(func, ast.Name) and func.id == "import_module") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )
    return node.args[0].value if named and isinstance(node.args[0].value, str) else None


def _targets(node: ast.AST, module: str, path: Path, known: set[str]) -> Iterator[str | None]:
    """The known modules one AST node imports: ``from pkg import sub`` names ``pkg.sub`` when that is a module,
    ``pkg`` itself otherwise."""
    if isinstance(node, ast.Import):
        yield from (_resolve(alias.name, known) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(node, module, path)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield sub if sub in known else _resolve(base, known)
    elif (name := _literal_import_module(node)) is not None:
        yield _resolve(name, known)


def import_edges(files: dict[str, Path], known: set[str]) -> list[Edge]:
    """One edge per (importer, imported) pair of ``known`` modules, located at its first import."""
    edges: dict[tuple[str, str], Edge] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _targets(node, module, path, known):
                if target is not None and target != module:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    edge = edges.setdefault((module, target), Edge(module, target, where))
                    if node.lineno < int(edge.where.rpartition(":")[2]):
                        edges[(module, target)] = Edge(module, target, where)
    return sorted(edges.values(), key=lambda e: (e.importer, e.imported))


def project_edges() -> list[Edge]:
    files = source_files(*PACKAGES)
    return import_edges(files, set(files))


# --- (a) no import cycle -------------------------------------------------------------------------------------------


def strongly_connected(nodes: set[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each is one or more import cycles)."""
    succ = {n: sorted({e.imported for e in edges if e.importer == n}) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(n: str) -> None:
        index[n] = low[n] = len(index)
        stack.append(n)
        for m in succ[n]:
            if m not in index:
                visit(m)
                low[n] = min(low[n], low[m])
            elif m in stack:
                low[n] = min(low[n], index[m])
        if low[n] == index[n]:
            component = []
            while True:
                m = stack.pop()
                component.append(m)
                if m == n:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def shortest_cycle(start: str, component: set[str], edges: list[Edge]) -> list[Edge]:
    """A shortest cycle through ``start`` inside one strongly connected component (breadth first)."""
    out = {e.importer: [] for e in edges}
    for e in edges:
        if e.importer in component and e.imported in component:
            out[e.importer].append(e)
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for n in frontier:
            for e in out.get(n, []):
                if e.imported == start:
                    return paths[n] + [e]
                if e.imported not in paths:
                    paths[e.imported] = paths[n] + [e]
                    following.append(e.imported)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")


def test_no_import_cycle() -> None:
    edges = project_edges()
    cycles = []
    for component in strongly_connected(set(source_files(*PACKAGES)), edges):
        inside = [f"    {e}" for e in edges if e.importer in component and e.imported in component]
        shortest = [f"    {e}" for e in shortest_cycle(component[0], set(component), edges)]
        cycles.append("\n".join([f"  {component}; a shortest cycle:", *shortest, "  all imports inside it:", *inside]))
    assert not cycles, "import cycles among project modules:\n" + "\n".join(cycles)


# --- (b) imports point down the layers -----------------------------------------------------------------------------


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


CLI = ("detect.cli", "detect.__main__")


@dataclass(frozen=True)
class Rule:
    """Modules ``importers`` (minus ``exempt``) may import only ``allowed`` (when given) and never ``forbidden``."""

    importers: tuple[str, ...]
    allowed: tuple[str, ...] | None = None
    forbidden: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def broken_by(self, edge: Edge) -> bool:
        if not under(edge.importer, *self.importers) or under(edge.importer, *self.exempt):
            return False
        outside = self.allowed is not None and not under(edge.imported, *self.allowed)
        return outside or under(edge.imported, *self.forbidden)


RULES = {
    "errors imports no project module": Rule(("detect.errors",), allowed=()),
    "ops imports only ops and errors": Rule(("detect.ops",), allowed=("detect.ops", "detect.errors")),
    "structures imports only errors": Rule(("detect.structures",), allowed=("detect.errors",)),
    "io imports only errors": Rule(("detect.io",), allowed=("detect.errors",)),
    "proposals imports only ops, structures, errors and proposals": Rule(
        ("proposals",), allowed=("detect.ops", "detect.structures", "detect.errors", "proposals")
    ),
    "detect never imports api or the cli": Rule(("detect",), forbidden=("api",) + CLI, exempt=CLI),
    "api never imports the cli or the local batch engine": Rule(("api",), forbidden=CLI + ("detect.engines.local",)),
}

NOT_YET: set[str] = set()  # names of RULES the code does not satisfy yet: each runs as a strict xfail


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[IN_PROGRESS] if n in NOT_YET else []) for n in RULES]
)
def test_imports_point_down(name: str) -> None:
    rule = RULES[name]
    broken = [str(e) for e in project_edges() if rule.broken_by(e)]
    assert not broken, f"{name}; these imports break it:\n  " + "\n  ".join(broken)


# --- (c) one exception hierarchy ----------------------------------------------------------------------------------


def _import_all() -> list[str]:
    """Import every project module but ``__main__``; return those that need a third-party package not installed."""
    skipped = []
    for module in source_files(*PACKAGES):
        if module.endswith("__main__"):
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is None or under(error.name, *PACKAGES):
                raise
            skipped.append(module)
    return skipped


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _subclassing_by_source(modules: list[str], bases: set[str]) -> Iterator[str]:
    """Classes in ``modules`` (read, not imported) with a base named like one of ``bases``."""
    files = source_files(*PACKAGES)
    for module in modules:
        for node in ast.walk(ast.parse(files[module].read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if names & bases:
                    yield f"{module}.{node.name}"


def test_every_detect_error_lives_in_errors_module() -> None:
    skipped = _import_all()
    from detect.errors import DetectError

    hierarchy = [DetectError, *_subclasses(DetectError)]
    stray = {f"{c.__module__}.{c.__qualname__}" for c in hierarchy if under(c.__module__, *PACKAGES)}
    stray -= {f"detect.errors.{c.__qualname__}" for c in hierarchy if c.__module__ == "detect.errors"}
    stray |= set(_subclassing_by_source(skipped, {c.__name__ for c in hierarchy}))
    assert not stray, "DetectError subclasses defined outside detect/errors.py:\n  " + "\n  ".join(sorted(stray))


# --- (d) test modules share helpers only through tests/helpers.py -------------------------------------------------


def is_test_module(module: str) -> bool:
    last = module.rpartition(".")[2]
    return last.startswith("test_") or last == "conftest"


def test_no_test_module_imports_another() -> None:
    files = source_files("tests")
    broken = [str(e) for e in import_edges(files, set(files)) if is_test_module(e.imported)]
    assert not broken, "test code importing from test modules or conftest (use tests/helpers.py):\n  " + "\n  ".join(
        broken
    )
