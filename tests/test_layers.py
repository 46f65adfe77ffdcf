"""The package layout is the architecture: layers import downwards only, no cycles.

Counts every import, including those inside functions (they hide real
dependencies just as well); only imports under ``if TYPE_CHECKING:`` are left
out, since they never run. The layer table is the one in ARCHITECTURE.md and
the README's Layout section; a new package must be placed in it.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zsgd"

ROOT = PACKAGE.parent


def _contract_layers() -> list[tuple[str, ...]]:
    """The layers of the import-linter contract in pyproject.toml, low to high, as module-name prefixes."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [("zsgd",)] + [tuple(f"zsgd.{m.strip()}" for m in layer.replace("|", ":").split(":")) for layer in reversed(contract["layers"])]


# Low to high: a module may import from its own layer or any lower one. import-linter enforces it
# (test_import_linter_contracts_hold); this copy only lets a test say which layer a module is in.
LAYERS: list[tuple[str, ...]] = _contract_layers()
MAX_TOP_LEVEL_MODULES = 14
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The zsgd modules ``name`` imports, resolved to modules (not attributes)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if not base.startswith("zsgd"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("zsgd"))
    found.discard(name)
    return {m for m in found if m in modules}


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add its package to LAYERS (and ARCHITECTURE.md)")
    return best


@functools.cache  # the cycle tests read one parse of the package, not one each
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_import_linter_contracts_hold():
    """The layers and independence contracts of pyproject.toml ([tool.importlinter]), checked by import-linter
    itself: every import counts, those inside functions too (only ``if TYPE_CHECKING:`` ones are left out)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_import_cycles():
    g = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of concern
    # when the module does not import the package back; count every edge anyway.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_cycles():
    """Between the top-level packages and modules (``zsgd.runtime``, ``zsgd.sim``, ...): an entry point such as
    ``zsgd/sim.py`` imports its package, and nothing in the package imports it back."""
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for a, deps in graph().items():
        edges.setdefault(top(a), set()).update(top(b) for b in deps if top(b) != top(a))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, deps in edges.items() for b in deps if reaches(b, a)})
    assert not cycles, f"package cycles: {cycles}"


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines: split it by concern"
