"""Loading and calling a user's model code, with one-line errors.

Why a module of its own: a user's model comes in two forms (a numpy model,
``package.module:factory``, and a PyTorch module, ``torch:package.module:factory``),
and both must be imported the same way (from the current directory too, in
the launching process and in every worker) and fail the same way: one line
that names the spec and what went wrong, never a traceback from inside the
user's code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

import numpy as np

from zsgd.errors import ZsgdError


def load_factory(spec: str, factory_spec: str | None = None) -> Callable[..., Any]:
    """The callable named by ``factory_spec`` (``package.module:function``; default ``spec``).

    The current directory is searched after the installed packages, so a spec typed at the root of a
    project (``examples.torch.resnet:make``) resolves there under the ``zsgd`` script as it does under
    ``python -m zsgd``; forked workers inherit the path, exec'd and remote ones start in the same
    directory (remote hosts need the module installed or shipped, see the README).
    """
    target = spec if factory_spec is None else factory_spec
    mod_name, _, fn_name = target.partition(":")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ZsgdError(f"cannot load model factory '{spec}' ({one_line(exc)}): give 'package.module:function' "
                        f"importable from this Python") from None
    except Exception as exc:  # noqa: BLE001 -- the user's module failed while importing
        raise ZsgdError(f"cannot load model factory '{spec}': importing {mod_name} raised {type(exc).__name__}: {one_line(exc)}") from None
    if not callable(factory):
        raise ZsgdError(f"model factory '{spec}' is a {type(factory).__name__}, not a function: give 'package.module:function'")
    return factory


def user_call(spec: str, what: str, call: Callable[[], Any]) -> Any:
    """``call()``, with anything the user's code raises turned into one ZsgdError line."""
    try:
        return call()
    except ZsgdError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a user's code: report it as one line, not a traceback
        raise ZsgdError(f"model '{spec}': {what} raised {type(exc).__name__}: {one_line(exc)}") from None


def describe(value: Any) -> str:
    """A short description of a value a user's code returned, for an error message."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} ({value.dtype})"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
