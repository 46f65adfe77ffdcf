"""zsgd's cnn training step with the direct conv/dense kernels against the im2col + BLAS path, part by part.

    python benchmarks/bench_conv_paths.py                # cnn, batch 64, 10 rounds
    python benchmarks/bench_conv_paths.py --model mlp --rounds 20

Both paths live in the same code (``zsgd.nn.conv``): the direct kernels
(``zsgd.nn.conv.direct``) run wherever a layer's shape allows; switching
their shape checks off gives the im2col + numpy-sgemm path the code had
before them. The two take turns in one process, a few steps each, so the
load of a shared machine hits both alike; the table gives each part's
fastest step (``Model.timings``) and the median. One thread, as a worker runs.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from zsgd.nn.conv import direct as D  # noqa: E402
from zsgd.nn.models import get_model  # noqa: E402


def measure(model_name: str, batch: int, rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Per path, per part (and "step"): the seconds of every timed step."""
    m = get_model(model_name, (1, 28, 28), 10, seed=0)
    w = m.init(0)
    rng = np.random.default_rng(0)
    x, y = rng.random((batch, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, batch)
    g = np.empty_like(w)
    on = (D.supported, D.dense_supported)
    paths = {"direct": on, "im2col + BLAS": (lambda *a: False, lambda *a: False)}
    res: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    try:
        for _ in range(rounds):
            for name, (conv_ok, dense_ok) in paths.items():
                D.supported, D.dense_supported = conv_ok, dense_ok
                m._ws.clear()  # the layers pick a path when their buffers are made
                m.loss_and_grad(w, x, y, seed=1, out=g)  # untimed: caches cold from the other path
                for _ in range(steps):
                    m.timings = {}
                    t = time.perf_counter()
                    m.loss_and_grad(w, x, y, seed=1, out=g)
                    res[name].setdefault("step", []).append(time.perf_counter() - t)
                    for k, v in m.timings.items():
                        res[name].setdefault(k, []).append(v)
    finally:
        D.supported, D.dense_supported = on
        m.timings = None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path per round")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    res = measure(args.model, args.batch, args.rounds, args.steps)
    from rich.console import Console
    from rich.table import Table

    direct, ref = res["direct"], res["im2col + BLAS"]
    t = Table(title=f"{args.model}, batch {args.batch}, 1 thread: ms per step, fastest (median) of "
                    f"{args.rounds * args.steps}; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for col in ("part", "direct", "im2col + BLAS", "ratio (fastest)"):
        t.add_column(col, justify="left" if col == "part" else "right")
    parts = sorted(direct, key=lambda k: (k != "step", -min(ref.get(k, direct[k]))))
    for k in parts:
        a, b = direct[k], ref.get(k, direct[k])
        if k != "step" and min(b) < 2e-4:
            continue
        t.add_row("whole step" if k == "step" else k, f"{min(a) * 1e3:.2f} ({statistics.median(a) * 1e3:.2f})",
                  f"{min(b) * 1e3:.2f} ({statistics.median(b) * 1e3:.2f})", f"{min(b) / min(a):.2f}x")
    Console(width=110).print(t)
    print(f"samples/s, fastest step: direct {args.batch / min(direct['step']):.0f}, "
          f"im2col + BLAS {args.batch / min(ref['step']):.0f}")


if __name__ == "__main__":
    main()
