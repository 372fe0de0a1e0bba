"""docs/architecture.md is true of the code: every module it names exists, every module is on its
map, and the code imports only what its "What may import what" block allows."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = {"trajscope": ROOT / "trajscope", "trajscope.recorders": ROOT / "recorders"}


def _source_files() -> dict[str, Path]:
    """Path as the page writes it (``trajscope/probe/line.py``, ``recorders/hooks.py``) → file."""
    return {str(p.relative_to(ROOT)): p for base in PACKAGES.values() for p in sorted(base.rglob("*.py"))}


def _module_name(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    if parts[0] == "recorders":
        parts = ["trajscope", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str:
    """The part of the "What may import what" block a module belongs to: ``recorders``, a
    subpackage (``probe``) or a top-level module (``errors``)."""
    return module.split(".")[1]


def _imports_block(text: str) -> dict[str, set[str]]:
    block = re.search(r"```imports\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```imports block"
    allowed: dict[str, set[str]] = {}
    for line in block.group(1).splitlines():
        if line.strip():
            part, arrow, deps = line.partition("->")
            assert arrow, f"not 'part -> parts': {line!r}"
            allowed[part.strip()] = set(deps.split())
    return allowed


def _imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports: top-level, function-level and type-only."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - (node.level - 1)] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != "trajscope":
                out.add(target)
    return out


def test_every_module_the_page_names_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    files = _source_files()
    named_files = set(re.findall(r"`((?:trajscope|recorders)/[\w/]+\.py)`", text))
    assert named_files, "the page names no module"
    assert not sorted(named_files - set(files)), sorted(named_files - set(files))
    for dotted in set(re.findall(r"`(trajscope(?:\.\w+)+)`", text)):
        parts = dotted.split(".")
        found = any(importlib.util.find_spec(".".join(parts[:i])) for i in range(len(parts), 1, -1))
        assert found, f"docs/architecture.md names {dotted}, which does not exist"


def test_every_module_is_on_the_map() -> None:
    """A newcomer finds every module from the page: each is named in it (package faces aside)."""
    text = DOC.read_text(encoding="utf-8")
    missing = [rel for rel in _source_files() if not rel.endswith("__init__.py") and f"`{rel}`" not in text]
    assert not missing, f"modules docs/architecture.md does not name: {missing}"


def test_the_code_imports_only_what_the_page_allows() -> None:
    allowed = _imports_block(DOC.read_text(encoding="utf-8"))
    files = {_module_name(rel): path for rel, path in _source_files().items()}
    parts = {_part(m) for m in files if m != "trajscope"}
    assert parts == set(allowed), f"parts missing from the block: {sorted(parts - set(allowed))}; " \
                                  f"named but absent: {sorted(set(allowed) - parts)}"
    broken = []
    for module, path in files.items():
        if module == "trajscope":
            continue
        for target in _imported_modules(module, path, set(files)):
            if _part(target) != _part(module) and _part(target) not in allowed[_part(module)]:
                broken.append(f"{module} imports {target}")
    assert not broken, "imports docs/architecture.md does not allow:\n" + "\n".join(sorted(broken))


def test_the_import_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from trajscope.analysis.driver import analyze\n")
    known = {"trajscope.analysis.driver", "trajscope.store.run"}
    assert _imported_modules("trajscope.store.run", bad, known) == {"trajscope.analysis.driver"}
    assert _part("trajscope.analysis.driver") not in _imports_block(DOC.read_text(encoding="utf-8"))["store"]
