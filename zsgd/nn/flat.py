"""The flat parameter vector's checks, shared by every built-in model.

Every zsgd model keeps its parameters in one contiguous float32 vector laid
out by ``layout()`` (PyTorch's names, shapes and order); what a vector or a
``state_dict`` must look like is therefore the same for all of them, and is
checked here once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zsgd.errors import ZsgdError


def check_flat(w: Any, n_params: int, model: str) -> np.ndarray:
    """``w`` as a C-contiguous float32 vector of ``n_params``, or a ZsgdError saying what to use."""
    if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.shape != (n_params,):
        got = f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', '')}"
        raise ZsgdError(f"model '{model}' needs a flat float32 vector of {n_params} parameters, "
                        f"got {got}: use model.init() or load_state_dict()")
    return w if w.flags.c_contiguous else np.ascontiguousarray(w)


def load_flat(sd: dict[str, Any], layout: list[tuple[str, tuple[int, ...], int]], n_params: int, model: str) -> np.ndarray:
    """A new flat vector from a ``state_dict`` (numpy arrays or CPU torch tensors) in ``layout``."""
    names = [n for n, _, _ in layout]
    missing = [n for n in names if n not in sd]
    extra = [n for n in sd if n not in names]
    if missing or extra:
        raise ZsgdError(f"state_dict does not match model '{model}': missing {missing}, unexpected "
                        f"{extra}; expected names {names}")
    w = np.empty(n_params, np.float32)
    for n, shape, off in layout:
        v = sd[n]
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        v = np.asarray(v)
        if v.shape != tuple(shape):
            raise ZsgdError(f"state_dict['{n}'] has shape {v.shape}, model '{model}' needs {tuple(shape)}")
        w[off:off + v.size] = v.astype(np.float32, copy=False).ravel()
    return w
