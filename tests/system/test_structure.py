"""The package's shape: subpackages by concept with few modules at the top, no import cycle
between modules, no private name imported across a package boundary, short modules and functions,
few positional parameters.

Imports are read from the source with :mod:`ast`, not by importing: top-level, function-level and
``if TYPE_CHECKING:`` imports all count (a function-level import is still a dependency, only a
later one; a type-only import still couples two modules for a reader).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

MAX_MODULE_LINES = 520
MAX_FUNCTION_LINES = 85
MAX_POSITIONAL = 8
MAX_TOP_LEVEL_MODULES = 10


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, name
    return Path(next(iter(spec.submodule_search_locations)))


def _modules() -> dict[str, Path]:
    """Dotted module name → source file, for ``trajscope`` and ``trajscope.recorders`` (which
    lives in its own directory, ``recorders/``)."""
    out: dict[str, Path] = {}
    for package in ("trajscope", "trajscope.recorders"):
        root = _package_dir(package)
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parents[2]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, ``if TYPE_CHECKING:`` bodies included."""
    return [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported_names(name: str, path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(module, name) for every name that module ``name`` imports from one of the package's
    modules with ``from … import name``."""
    package = _package_of(name, path)
    out: list[tuple[str, str]] = []
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            base = ".".join(anchor[: len(anchor) - (node.level - 1)] + ([base] if base else []))
        if base in known:
            out += [(base, alias.name) for alias in node.names if f"{base}.{alias.name}" not in known]
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports."""
    package = _package_of(name, path)
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else names in pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in import order, the first repeated), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of ``graph``, each found one cut at its closing edge before looking again,
    so that every cycle is reported at once."""
    graph = {k: set(v) for k, v in graph.items()}
    found: list[list[str]] = []
    while (cycle := _cycle(graph)) is not None:
        found.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return found


def test_the_package_has_no_import_cycle() -> None:
    modules = _modules()
    assert "trajscope.analysis.driver" in modules and "trajscope.recorders" in modules
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_type_only_imports_count_as_dependencies() -> None:
    # trajscope.analysis.job names Placement only for type checkers: still an edge of the graph
    modules = _modules()
    assert "trajscope.analysis.execution" in _imports("trajscope.analysis.job", modules["trajscope.analysis.job"],
                                                      set(modules))


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_modules_are_short() -> None:
    long = {_shown(path): n for path in _modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short() -> None:
    long: dict[str, int] = {}
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_shown(path)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_private_name_is_imported_across_a_package_boundary() -> None:
    """A module's underscore names are its package's own business: another package imports only
    what a module shows (a name without the underscore, or the package's ``__init__``)."""
    modules = _modules()
    crossing = []
    for name, path in modules.items():
        own = _package_of(name, path)
        for module, imported in _imported_names(name, path, set(modules)):
            if imported.startswith("_") and not imported.startswith("__"):
                if _package_of(module, modules[module]) != own:
                    crossing.append(f"{name} imports {module}.{imported}")
    assert not crossing, "\n".join(crossing)


def test_the_private_import_check_sees_one(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from pkg.sub.b import _hidden, shown\n")
    b.write_text("_hidden = shown = 1\n")
    assert _imported_names("pkg.a", a, {"pkg.a", "pkg.sub.b"}) == [("pkg.sub.b", "_hidden"), ("pkg.sub.b", "shown")]


def test_few_modules_sit_at_the_top() -> None:
    """Every module but the shared ones (errors, the run format, confinement, the objective, the
    command line, the version, the metric tester, and the plugin names kept for one release) sits
    in the subpackage of its concept."""
    root = _package_dir("trajscope")
    top = sorted(p.name for p in root.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["analysis", "metrics", "probe", "report", "store", "tools"], packages


def _is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated by click (``@cli.command()``, ``@click.option(...)``): its parameters are the
    command's options, passed by keyword by click."""
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and (
                target.attr in ("command", "group") or (isinstance(target.value, ast.Name)
                                                         and target.value.id == "click")):
            return True
    return False


def _positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args.posonlyargs + node.args.args
    return [a.arg for a in args if a.arg not in ("self", "cls")]


def test_functions_take_few_positional_parameters() -> None:
    """Options are keyword-only: a call with nine positional arguments cannot be read without the
    signature beside it."""
    many: dict[str, int] = {}
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_click_command(node):
                if (n := len(_positional(node))) > MAX_POSITIONAL:
                    many[f"{_shown(path)}:{node.lineno} {node.name}"] = n
    assert not many, f"functions with more than {MAX_POSITIONAL} positional parameters: {many}"


def test_the_positional_check_counts_and_exempts_click_commands() -> None:
    tree = ast.parse("@cli.command()\n@click.option('--a')\ndef cmd(a, b, c, d, e, f, g, h, i): pass\n"
                     "def f(self, a, b, /, c, *, d): pass\n")
    cmd, f = (n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert _is_click_command(cmd) and not _is_click_command(f)
    assert _positional(f) == ["a", "b", "c"]
