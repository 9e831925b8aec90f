"""The package's structure: no import cycles inside cuconv, no lazy imports of cuconv
modules inside cuconv/ops (but the backend choice in _common.py), no reach-ins through
importlib or sys.modules, and no re-export that hides a submodule."""

import ast
import re
from pathlib import Path

import cuconv
import cuconv.reference
from cuconv import ops

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cuconv"
# Discovery of a package's own modules, and the optional NVRTC wheels looked up by name.
IMPORTLIB_ALLOWED = {"cuconv/ops/__init__.py", "cuconv/_nvrtc.py", "bench/__init__.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: dict, top_level_only: bool):
    """(imported cuconv module, line) pairs; a package's `from . import x` counts as an
    import of x when x is a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cuconv"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if not source.startswith("cuconv"):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                yield (full if full in known else source), node.lineno


def test_no_import_cycles_inside_cuconv():
    known = _modules()
    graph = {name: {m for m, _ in _imports(path, name, known, False) if m in known and m != name}
             for name, path in known.items()}
    for name, path in known.items():  # a package that discovers its modules imports each of them
        if "pkgutil.iter_modules" in path.read_text():
            graph[name] |= {m for m in known if m.rpartition(".")[0] == name}
    # A package's __init__ is imported before its submodules, which therefore never form
    # a cycle through it: drop the edge submodule -> its own package.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, f"import cycles: {cycle[:3]}"


def test_ops_import_their_cuconv_dependencies_at_the_top():
    known = _modules()
    lazy = []
    for name, path in known.items():
        if not name.startswith("cuconv.ops.") or name == "cuconv.ops._common":
            continue
        top = set(_imports(path, name, known, True))
        lazy += [f"{path.name}:{line} {m}" for m, line in _imports(path, name, known, False) if (m, line) not in top]
    assert not lazy, f"function-level imports of cuconv modules: {lazy}"


def test_no_reach_ins_through_importlib_or_sys_modules():
    found = []
    for folder in ("cuconv", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "tests/test_layout.py":
                continue
            text = path.read_text()
            # (blocking an import in a subprocess, sys.modules['torch'] = None, is no reach-in)
            if re.search(r"sys\.modules(\.get|\[[^\]]+\](?!\s*=\s*None))", text):
                found.append(f"{rel}: sys.modules")
            if "importlib" in text and rel not in IMPORTLIB_ALLOWED:
                found.append(f"{rel}: importlib")
    assert not found, found


def test_no_reexport_hides_a_submodule():
    """cuconv.ops.NAME and cuconv.reference.NAME are the modules of those names."""
    for package in (ops, cuconv.reference):
        folder = Path(package.__file__).parent
        for path in folder.glob("*.py"):
            if path.stem != "__init__":
                __import__(f"{package.__name__}.{path.stem}")
                attr = getattr(package, path.stem)
                assert type(attr).__name__ == "module", f"{package.__name__}.{path.stem} is {attr!r}"
