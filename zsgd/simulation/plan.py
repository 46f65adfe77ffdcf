"""The size of a plan of arms, checked before anything is written (as ``--n-proc`` is checked against the machine).

Why: a grid or an experiment file is easy to get wrong by orders of
magnitude (``--latency`` with a thousand values times ``--workers`` with a
hundred, ``steps: 10^23``), and nothing else stops it: the arms start
writing run directories until the disk is full. Two checks, each with the
limit in its message:

- the number of arms (``MAX_ARMS``), counted before the arms are built
  (a cross product of long lists is itself the problem);
- what the arms will write: every applied update is one ``update`` event in
  ``metrics.jsonl`` (about ``BYTES_PER_UPDATE``; measured 120 bytes for an
  async arm with its train events), plus each arm's final weights, against
  the free space of the disk the output goes to. Arms bounded only by
  ``--time`` or a target have no count to check.

And one more before a decentralized arm builds its nodes: each simulated
node holds its own model and the rule's state (``MODEL_COPIES``), so
``--workers 5000 --algo dsgd`` with the mlp is some 14 GB; that is checked
against the memory available now, as ``--n-proc`` is.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterable

from zsgd.errors import ZsgdError

#: A thousand arms is days of CPU even for the mlp; more is a typo, or a job to split (``--only``, fewer values).
MAX_ARMS = 1_000
BYTES_PER_UPDATE = 120


def check_arm_count(n_arms: int, what: str) -> None:
    """Refuse more than ``MAX_ARMS`` arms; ``what`` says where they come from (``--latency x --workers``)."""
    if n_arms > MAX_ARMS:
        raise ZsgdError(f"{what} makes {n_arms:,} arms, more than the {MAX_ARMS:,} one sweep or experiment may run: "
                        f"use fewer values (or split the study into several)")


def _fmt(n_bytes: float) -> str:
    if n_bytes >= 1e15:
        return f"10^{int(math.log10(n_bytes))} bytes"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:,.0f} bytes"


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_plan_size(updates: Iterable[int | None], weights_bytes: int, out: Path) -> None:
    """Refuse arms whose metrics (``updates`` per arm) and weights would not fit on the disk of ``out``."""
    counts = list(updates)
    known = sum(u for u in counts if u is not None)
    need = known * BYTES_PER_UPDATE + len(counts) * weights_bytes
    where = _existing(Path(out))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no way to tell (an unusual file system): the run's own writes will say
    if need > free:
        steps = f"{known:,}" if known < 10**15 else f"about 10^{int(math.log10(known))}"
        raise ZsgdError(f"the arms would write about {_fmt(need)} ({steps} updates in all, ~{BYTES_PER_UPDATE} bytes of "
                        f"metrics each, and {len(counts)} weight file(s)), more than the {_fmt(free)} free on the disk of "
                        f"{where}: fewer --steps/--epochs or arms")


#: Model-sized float32 arrays a simulated decentralized node holds, from peak memory measured here
#: (mlp, 100 and 400 nodes: dsgd 2.9, dsgt 5.9, cadmm 4.9 copies a node), rounded up.
MODEL_COPIES = {"dsgd": 3.5, "dsgt": 6.5, "cadmm": 5.5}


def check_node_memory(algo: str, n_nodes: int, n_params: int) -> None:
    """Refuse a decentralized arm whose nodes' models would not fit in the memory available now."""
    from zsgd.core.machine import available_memory

    need = MODEL_COPIES.get(algo, max(MODEL_COPIES.values())) * n_nodes * n_params * 4
    avail = available_memory()
    if avail is not None and need > avail:
        raise ZsgdError(f"--workers {n_nodes:,} with {algo} simulates {n_nodes:,} nodes, each with its own model of "
                        f"{n_params:,} parameters (about {_fmt(need)}, {MODEL_COPIES.get(algo, 6.5):g} model copies a node), "
                        f"more than the {_fmt(avail)} of memory available: use fewer workers or a smaller model")
