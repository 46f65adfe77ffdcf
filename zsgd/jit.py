"""How zsgd's numba kernels are compiled and cached: the same bits whether compiled in this process or loaded.

Every module with ``@njit(cache=True)`` kernels imports this one before
its first decorator. Found as a first run (compiling the LSTM) whose
gradients differed from every later run (loading numba's cache) by about
5e-9; three rules keep a kernel's machine code independent of the
process's history:

1. **A kernel that another kernel calls is inlined into it** (the callee
   calls :func:`always_inline`). Numba links a copy of the callee into
   the caller's module (``linkonce_odr``) and, where LLVM keeps the call,
   MCJIT binds it to the first definition of that symbol the process
   loaded: the callee's own code when it was compiled in this process
   (the first run), the caller's copy, optimised a second time inside the
   caller and so not the same instructions (with ``fastmath`` not the same
   sums), when the caller came from the cache. Inlined, a caller is one
   piece of code, the same compiled or loaded. ``tests/test_jit_cache_bits.py``
   checks that no kernel calls into a linked copy.
2. **LLVM options are set here, once, before any kernel compiles.** An
   option applies to whatever compiles after it in the process, so one
   set by the LSTM's module would give the kernels of other modules a
   different compile, and the cache whichever kind was compiled first.
3. **A kernel's cache entry is keyed on every zsgd module its file
   imports** (transitively), not only on its own file as numba does: the
   register tiles of ``lstm_gemm`` and ``conv/tile.py``, and constants
   such as ``NR``, are compiled into the callers in other files, and an
   edit there must recompile them.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

from numba import types
from numba.extending import intrinsic

#: LLVM vectorises a loop over several arrays only after run-time checks
#: that they do not overlap, and gives up past 8 such checks (its
#: ``-runtime-memory-check-threshold``). The LSTM's backward step reads and
#: writes seven rows at once; raising the limit makes it 2x faster (78 ->
#: 37 us at B=32, H=256). It only lets LLVM vectorise more loops; if this
#: llvmlite refuses the option, the kernels stay correct, just slower.
VECTOR_CHECKS = 64

_PACKAGE = Path(__file__).resolve().parent


def _set_llvm_options() -> None:
    try:
        import llvmlite.binding as ll

        ll.set_option("zsgd", f"-runtime-memory-check-threshold={VECTOR_CHECKS}")
    except Exception:  # pragma: no cover - an llvmlite without the option: slower, still correct
        pass


@intrinsic
def always_inline(typingctx):
    """Mark the calling numba function ``alwaysinline``: every kernel calling it gets the code, not a call (rule 1)."""

    def codegen(context, builder, signature, args):
        builder.function.attributes.add("alwaysinline")
        return context.get_dummy_value()

    return types.none(), codegen


def _module_file(name: str) -> Path | None:
    """The source file of zsgd module ``name`` (``zsgd.nn.lstm_gemm``), or None for a name that is no module."""
    rel = Path(*name.split(".")[1:])
    if not rel.parts:
        return _PACKAGE / "__init__.py"
    for path in (_PACKAGE / rel.with_suffix(".py"), _PACKAGE / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _imports(path: Path) -> tuple[Path, ...]:
    """Source files of the zsgd modules ``path`` imports by absolute name (anywhere in the file)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zsgd"):
            # "from zsgd.x import y": y's file where y is a module, else x's
            found.update(_module_file(f"{node.module}.{a.name}") or _module_file(node.module) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(_module_file(a.name) for a in node.names if a.name.startswith("zsgd"))
    found.discard(None)
    found.discard(path)
    return tuple(sorted(found))


def dependencies(path: Path) -> tuple[Path, ...]:
    """Every zsgd source file ``path`` imports, directly or through another, sorted (rule 3)."""
    seen: set[Path] = set()
    todo = [Path(path).resolve()]
    while todo:
        for dep in _imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    seen.discard(Path(path).resolve())
    return tuple(sorted(seen))


class _DependencyLocator:
    """Numba's usual cache locator for a zsgd kernel module, with a source stamp that covers its dependencies.

    Applies only to modules that import this one (the others keep numba's
    own stamp, so the stamp never depends on what a process imported first).
    """

    _others: list = []

    def __init__(self, inner, deps: tuple[Path, ...]):
        self._inner = inner
        self._deps = deps

    def ensure_cache_path(self):
        return self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        return self._inner.get_disambiguator()

    def get_source_stamp(self):
        return (self._inner.get_source_stamp(),
                tuple((str(p.relative_to(_PACKAGE)), hashlib.sha256(p.read_bytes()).hexdigest()) for p in self._deps))

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            path = Path(py_file).resolve()
            path.relative_to(_PACKAGE)
        except (OSError, ValueError):
            return None
        deps = dependencies(path)
        if Path(__file__).resolve() not in deps:
            return None
        for other in cls._others:
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner, deps)
        return None


def _register_locator() -> None:
    """Put :class:`_DependencyLocator` first in numba's list (where this numba has one; else numba's own stamp)."""
    try:
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
        classes = impl._locator_classes
    except Exception:  # pragma: no cover - a numba without locator classes: caches keyed on one file, as before
        return
    if _DependencyLocator not in classes:
        _DependencyLocator._others = list(classes)
        classes.insert(0, _DependencyLocator)


_set_llvm_options()
_register_locator()
