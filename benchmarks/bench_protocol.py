"""What does the zsgd protocol cost over sending raw bytes?

Measures, for a 4.8 MB float32 message (1.2M parameters, a mid-sized model):

* encode + decode in memory (header JSON, checks, views; no sockets), and
* a DEALER -> ROUTER -> DEALER round trip over tcp and ipc loopback, with
  `protocol.send`/`recv` versus a bare `send(copy=False)` of the same bytes.

Run: ``python benchmarks/bench_protocol.py [--n-params 1200000] [--reps 200]``.
The protocol should add microseconds per message, not a copy of the payload.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import zmq

from zsgd.wire import protocol as P


def _time(fn: Callable[[], object], reps: int) -> list[float]:
    for _ in range(min(10, reps)):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _row(name: str, times: list[float], nbytes: int) -> str:
    med = statistics.median(times)
    return f"{name:<34} {med * 1e6:>11.1f} {min(times) * 1e6:>11.1f} {nbytes / med / 1e9:>8.2f}"


def bench_codec(w: np.ndarray, reps: int) -> list[str]:
    msg = P.weights_message("bench", 1, w)
    frames = [bytes(f) if len(f) < P.ZERO_COPY_THRESHOLD else f for f in P.encode(msg)]
    n = P.message_nbytes(msg)
    return [
        _row("encode (in memory)", _time(lambda: P.encode(msg), reps), n),
        _row("decode (in memory)", _time(lambda: P.decode(frames), reps), n),
        _row("np.copy of payload (reference)", _time(lambda: w.copy(), reps), n),
    ]


def bench_socket(endpoint: str, w: np.ndarray, reps: int) -> list[str]:
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for s in (router, dealer):
            s.linger, s.rcvtimeo, s.sndtimeo = 0, 10000, 10000
        if endpoint.startswith("tcp"):
            port = router.bind_to_random_port(endpoint)
            dealer.connect(f"{endpoint}:{port}")
        else:
            router.bind(endpoint)
            dealer.connect(endpoint)
        msg = P.update_message("bench", 0, 1, w, 32, 0.5)
        raw = memoryview(w).cast("B")
        lim = P.Limits.for_model(w.size)

        def proto_rt() -> None:
            P.send(dealer, msg)
            ident, got = P.recv(router, lim, router=True)
            P.send(router, P.weights_message("bench", 2, got.arrays["g"]), identity=ident)
            P.recv(dealer, lim)

        def raw_rt() -> None:
            dealer.send(raw, copy=False)
            ident, payload = router.recv_multipart(copy=False)
            router.send(ident, zmq.SNDMORE)
            router.send(payload, copy=False)
            dealer.recv(copy=False)

        n = 2 * P.message_nbytes(msg)
        kind = endpoint.split(":")[0]
        return [
            _row(f"{kind} round trip, raw bytes", _time(raw_rt, reps), n),
            _row(f"{kind} round trip, zsgd protocol", _time(proto_rt, reps), n),
        ]
    finally:
        ctx.destroy(linger=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-params", type=int, default=1_200_000)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    w = np.random.default_rng(0).standard_normal(args.n_params).astype(np.float32)
    print(f"payload {w.nbytes / 1e6:.1f} MB float32, {args.reps} reps")
    print(f"{'case':<34} {'median us':>11} {'min us':>11} {'GB/s':>8}")
    rows = bench_codec(w, args.reps)
    rows += bench_socket("tcp://127.0.0.1", w, args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_socket(f"ipc://{os.path.join(tmp, 'bench.sock')}", w, args.reps)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
