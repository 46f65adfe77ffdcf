"""What does each gradient codec cost and save on the 1.2M-parameter cnn?

For real gradients of the ``cnn`` model (Keras mnist_cnn, 1,199,882
parameters) on the embedded Fashion-MNIST subset, per codec:

* payload bytes per update (array frames; the mean, as AdaComp's varies)
  and the whole UPDATE message (header included), and the compression
  ratio against 4.8 MB of float32;
* worker-side ``encode`` and broker-side ``decode`` time (median over
  ``--reps`` updates, cycling through ``--batches`` different gradients so
  the error-feedback residual evolves as in training);
* relative error ``||decoded - grad|| / ||grad||`` of one update (for the
  error-feedback codecs the rest is not lost, only delayed).

Run: ``python benchmarks/bench_compression.py [--reps 30] [--batches 8]``.
Single-threaded numba kernels, like a worker process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from zsgd.wire import protocol as P
from zsgd.compression import decode, encoded_nbytes, make_codec

CODECS = ("none", "topk:0.01", "topk:0.001", "adacomp:50", "adacomp:500", "qsgd:8", "qsgd:4")


def cnn_gradients(batches: int, batch_size: int = 64) -> list[np.ndarray]:
    from zsgd.data import load_embedded, to_float
    from zsgd.nn.models import get_model

    data = load_embedded()
    model = get_model("cnn", (1, 28, 28), 10)
    w = model.init(seed=0)
    grads = []
    for b in range(batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        _, g = model.loss_and_grad(w, to_float(data.x_train[sl]), data.y_train[sl], training=True, seed=b)
        grads.append(g)
    return grads


def bench(spec: str, grads: list[np.ndarray], reps: int) -> dict:
    n = grads[0].size
    codec = make_codec(spec, n, seed=1)
    arrays = codec.encode(grads[0])
    err = float(np.linalg.norm(decode(codec.name, arrays, n) - grads[0]) / np.linalg.norm(grads[0]))
    enc_t, dec_t, sizes = [], [], []
    for r in range(reps):
        g = grads[r % len(grads)]
        t = time.perf_counter()
        arrays = codec.encode(g)
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode(codec.name, arrays, n)
        dec_t.append(time.perf_counter() - t)
        sizes.append(encoded_nbytes(arrays))
    msg = P.update_message("bench", 0, 0, None, 64, 0.0, codec=codec.name, extra_arrays=arrays)
    header = P.message_nbytes(msg) - encoded_nbytes(arrays)
    payload = statistics.mean(sizes)  # AdaComp's size varies: report the mean over the updates
    return {"codec": codec.name, "payload": payload, "message": payload + header, "ratio": 4 * n / payload,
            "enc": statistics.median(enc_t), "dec": statistics.median(dec_t), "err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated list; default: %(default)s")
    args = ap.parse_args()
    grads = cnn_gradients(args.batches)
    n = grads[0].size
    specs = args.codecs.split(",")
    for spec in specs:  # compile (or load cached) kernels outside the timings
        c = make_codec(spec, n)
        decode(c.name, c.encode(grads[0]), n)
    print(f"cnn gradient: {n:,} float32 parameters = {4 * n / 1e6:.2f} MB; "
          f"median of {args.reps} updates over {args.batches} batches, single thread")
    head = (f"{'codec':<12} {'payload KB':>11} {'message KB':>11} {'ratio':>7} {'encode ms':>10} "
            f"{'decode ms':>10} {'rel err':>8}")
    print(head)
    print("-" * len(head))
    for spec in specs:
        r = bench(spec, grads, args.reps)
        print(f"{r['codec']:<12} {r['payload'] / 1e3:>11.1f} {r['message'] / 1e3:>11.1f} {r['ratio']:>7.1f} "
              f"{r['enc'] * 1e3:>10.2f} {r['dec'] * 1e3:>10.2f} {r['err']:>8.3f}")


if __name__ == "__main__":
    main()
