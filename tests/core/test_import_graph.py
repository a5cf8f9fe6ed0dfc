"""No import cycles between the modules of the four packages, counting imports inside functions too
(a function-level import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[2] / "packages"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGES.glob("*/src/*/**/*.py"):
        src = next(p for p in path.parents if p.name == "src")
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its body (``from a import b`` means
    module ``a.b`` when that is a module, else package ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def test_the_packages_have_no_import_cycles():
    modules = _modules()
    assert len(modules) > 60 and "quant_core.algorithms.awq" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "quant_core.algorithms.statistics" in graph["quant_core.algorithms.awq"]
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_a_cycle_is_reported(tmp_path):
    # the check itself: two modules importing each other inside functions form a cycle
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from pkg import b\n")
    b.write_text("def g():\n    import pkg.a\n")
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": a, "pkg.b": b}
    graph = {name: _imports(name, path, modules) for name, path in modules.items() if name != "pkg"}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
