"""Training throughput of zsgd's kernels vs PyTorch CPU and a plain-numpy im2col, on ONE thread.

    python benchmarks/bench_kernels.py                 # cnn, batch 64
    python benchmarks/bench_kernels.py --model lenet5 --batch 128
    python benchmarks/bench_kernels.py --model lstm    # vs torch.nn.LSTM, tokens/s

Prints samples/s for a training step (forward + backward + SGD update) and
for forward only, zsgd's per-layer share of its step time, and the time a
fresh process takes to its first training step (numba cache warm). All
three implementations run the same architecture on the same batch in the
same process, interleaved in short groups of steps so machine noise hits
them alike; each step is timed and the median step is reported (the first
step of each group, which finds caches cold after another implementation,
is not counted).

One thread everywhere: zsgd's workers are single-threaded processes by
design (parallelism comes from more workers), so this is the number that
scales. BLAS threads are pinned before numpy is imported.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

try:  # belt and braces: if numpy was imported earlier by something else
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # pragma: no cover
    pass

from zsgd.nn.models import get_model  # noqa: E402
from zsgd.nn.optim import make_optimizer  # noqa: E402

LR = 0.01


# ---------------------------------------------------------------- plain numpy reference (cnn)


class NumpyCNN:
    """The textbook numpy CNN: NCHW, im2col via sliding_window_view, one sgemm per conv.

    The same architecture as zsgd's ``cnn`` (and the same flat-vector layout,
    so its gradient can be checked against zsgd's); this is what a careful
    "just use numpy" implementation costs.
    """

    def __init__(self, model):
        self.layout = {n: (s, o) for n, s, o in model.layout()}
        self.rng = np.random.default_rng(0)

    def p(self, w, name):
        s, o = self.layout[name]
        return w[o:o + int(np.prod(s))].reshape(s)

    @staticmethod
    def conv(x, wt, b):
        n, c, h, wd = x.shape
        co, _, kh, kw = wt.shape
        oh, ow = h - kh + 1, wd - kw + 1
        win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
        cols = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * kh * kw)
        y = cols @ wt.reshape(co, -1).T + b
        return np.ascontiguousarray(y.reshape(n, oh, ow, co).transpose(0, 3, 1, 2)), cols

    @staticmethod
    def conv_back(dy, cols, x_shape, wt, need_dx=True):
        n, c, h, wd = x_shape
        co, _, kh, kw = wt.shape
        oh, ow = h - kh + 1, wd - kw + 1
        d2 = dy.transpose(0, 2, 3, 1).reshape(-1, co)
        gw = (d2.T @ cols).reshape(wt.shape)
        gb = d2.sum(0)
        if not need_dx:
            return None, gw, gb
        dcols = (d2 @ wt.reshape(co, -1)).reshape(n, oh, ow, c, kh, kw)
        dx = np.zeros(x_shape, np.float32)
        for i in range(kh):
            for j in range(kw):
                dx[:, :, i:i + oh, j:j + ow] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dx, gw, gb

    def loss_and_grad(self, w, x, y, training=True):
        P = lambda n: self.p(w, n)  # noqa: E731
        n = x.shape[0]
        z1, cols1 = self.conv(x, P("conv1.weight"), P("conv1.bias"))
        a1 = np.maximum(z1, 0)
        z2, cols2 = self.conv(a1, P("conv2.weight"), P("conv2.bias"))
        a2 = np.maximum(z2, 0)
        _, c, h, wd = a2.shape
        win = a2[:, :, :h // 2 * 2, :wd // 2 * 2].reshape(n, c, h // 2, 2, wd // 2, 2)
        pooled = win.max(axis=(3, 5))
        m1 = (self.rng.random(pooled.shape) >= 0.25).astype(np.float32) / 0.75 if training else 1.0
        f = (pooled * m1).reshape(n, -1)
        h1 = np.maximum(f @ P("fc1.weight").T + P("fc1.bias"), 0)
        m2 = (self.rng.random(h1.shape) >= 0.5).astype(np.float32) / 0.5 if training else 1.0
        h1d = h1 * m2
        logits = h1d @ P("fc2.weight").T + P("fc2.bias")
        zmax = logits.max(1, keepdims=True)
        e = np.exp(logits - zmax)
        s = e.sum(1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) + zmax[:, 0] - logits[np.arange(n), y]))
        d = e / s
        d[np.arange(n), y] -= 1
        d /= n
        g = np.empty_like(w)
        G = lambda nm: self.p(g, nm)  # noqa: E731
        G("fc2.weight")[:] = d.T @ h1d
        G("fc2.bias")[:] = d.sum(0)
        dh = (d @ P("fc2.weight")) * m2 * (h1 > 0)
        G("fc1.weight")[:] = dh.T @ f
        G("fc1.bias")[:] = dh.sum(0)
        dp = (dh @ P("fc1.weight")).reshape(pooled.shape) * m1
        mask = win == pooled[:, :, :, None, :, None]
        da2 = np.zeros_like(a2)
        hh, ww = h // 2 * 2, wd // 2 * 2
        da2[:, :, :hh, :ww] = (mask * dp[:, :, :, None, :, None]).reshape(n, c, hh, ww)
        dz2 = da2 * (z2 > 0)
        da1, G("conv2.weight")[:], G("conv2.bias")[:] = self.conv_back(dz2, cols2, a1.shape, P("conv2.weight"))
        _, G("conv1.weight")[:], G("conv1.bias")[:] = self.conv_back(da1 * (z1 > 0), cols1, x.shape,
                                                                    P("conv1.weight"), need_dx=False)
        return loss, g, logits


# ---------------------------------------------------------------- PyTorch


def torch_net(name: str, shape, k: int):
    import torch.nn as nn

    c, h, w = shape
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Linear(128, k))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128),
                             nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, k))
    return nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2), 120),
                         nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, k))


# ---------------------------------------------------------------- harness


def cold_start_seconds(model: str, shape, batch: int) -> float:
    """Wall time of a fresh ``python -c`` from start to the end of its first training step."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import numpy as np\n"
        "from zsgd.nn.models import get_model\n"
        f"m = get_model({model!r}, input_shape={tuple(shape)!r}, n_classes=10)\n"
        f"x = np.random.rand({batch}, *m.input_shape).astype(np.float32); y = np.zeros({batch}, np.int64)\n"
        "m.loss_and_grad(m.init(0), x, y, seed=0)\n"
        "print(time.perf_counter() - t0)\n"
    )
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: E731
    run()  # make sure the numba cache is warm
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def timed_group(fn: Callable[[], object], group: int, batch: int) -> list[float]:
    """Run ``group`` steps back to back; samples/s of each step but the first (cache warm-up)."""
    rates = []
    for i in range(group):
        t0 = time.perf_counter()
        fn()
        if i:
            rates.append(batch / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn", choices=["cnn", "lenet5", "mlp", "logreg", "lstm"])
    ap.add_argument("--shape", default="1,28,28", help="C,H,W (default 1,28,28: MNIST)")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (lstm: 32 streams)")
    ap.add_argument("--group", type=int, default=4, help="steps in a row per implementation and round (>= 2)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-cold", action="store_true", help="skip the fresh-process start-up measurement")
    ap.add_argument("--lstm", default="lstm:embed=64,hidden=256,layers=2", help="lstm model name (--model lstm)")
    ap.add_argument("--vocab", type=int, default=72, help="lstm vocabulary (72: the embedded corpus' characters)")
    ap.add_argument("--bptt", type=int, default=64, help="lstm sequence length per step")
    ap.add_argument("--parts", action="store_true", help="lstm: also time zsgd's step by part (thread CPU time)")
    args = ap.parse_args()
    if args.model == "lstm":
        args.batch = args.batch or 32
        bench_lstm(args)
        return
    args.batch = args.batch or 64
    shape = tuple(int(s) for s in args.shape.split(","))
    n = args.batch

    m = get_model(args.model, input_shape=shape, n_classes=10)
    w = m.init(0)
    g = np.empty_like(w)
    opt = make_optimizer("sgd", m.n_params, lr=LR)
    rng = np.random.default_rng(0)
    x = rng.random((n, *shape), dtype=np.float32)
    y = rng.integers(0, 10, n)
    step_no = [0]

    def zsgd_step():
        step_no[0] += 1
        m.loss_and_grad(w, x, y, training=True, seed=step_no[0], out=g)
        opt.step(w, g)

    train: dict[str, Callable[[], object]] = {"zsgd": zsgd_step}
    fwd: dict[str, Callable[[], object]] = {"zsgd": lambda: m.predict(w, x)}

    if args.model == "cnn":
        ref = NumpyCNN(m)
        _, g_ref, _ = ref.loss_and_grad(w, x, y, training=False)
        _, g_z = m.loss_and_grad(w, x, y, training=False)
        err = np.abs(g_ref - g_z).max() / np.abs(g_ref).max()
        assert err < 1e-4, f"numpy reference disagrees with zsgd: {err}"
        wn = w.copy()

        def numpy_step():
            _, gn, _ = ref.loss_and_grad(wn, x, y)
            wn[:] -= LR * gn

        train["numpy im2col"] = numpy_step  # (no forward-only timing: the reference is one function)

    torch_version = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            torch.set_num_threads(1)
            torch_version = torch.__version__
            net = torch_net(args.model, shape, 10)
            topt = torch.optim.SGD(net.parameters(), lr=LR)
            xt, yt = torch.tensor(x), torch.tensor(y)
            lossf = torch.nn.CrossEntropyLoss()

            def torch_step():
                topt.zero_grad()
                lossf(net(xt), yt).backward()
                topt.step()

            def torch_fwd():
                with torch.no_grad():
                    net.eval()
                    out = net(xt)
                    net.train()
                    return out

            train["pytorch"] = torch_step
            fwd["pytorch"] = torch_fwd

    for f in (*train.values(), *fwd.values()):  # warm-up: JIT, caches, allocator
        for _ in range(3):
            f()
    results: dict[str, list[float]] = {f"train/{k}": [] for k in train} | {f"fwd/{k}": [] for k in fwd}
    group = max(2, args.group)
    for _ in range(args.rounds):
        for k, f in train.items():
            results[f"train/{k}"] += timed_group(f, group, n)
        for k, f in fwd.items():
            results[f"fwd/{k}"] += timed_group(f, group, n)
    # per-layer shares: separate training steps with the model's timers on; the
    # median per part, so a noisy neighbour in one step does not skew the split
    per_part: dict[str, list[float]] = {}
    prof_steps = 20
    for i in range(prof_steps):
        m.timings = {}
        m.loss_and_grad(w, x, y, training=True, seed=i, out=g)
        t0 = time.perf_counter()
        opt.step(w, g)
        m.timings["optimizer (sgd)"] = time.perf_counter() - t0
        for k, v in m.timings.items():
            per_part.setdefault(k, []).append(v)
    m.timings = None
    timings = {k: statistics.median(v) for k, v in per_part.items()}
    med = {k: statistics.median(v) for k, v in results.items()}

    cold = None if args.no_cold else cold_start_seconds(args.model, shape, n)
    report(args, med, results, timings, cold, torch_version)


class TorchLM:
    """``torch.nn.Embedding -> LSTM -> Linear`` with zsgd's parameter names (so one state_dict fits both)."""

    def __new__(cls, vocab: int, embed: int, hidden: int, layers: int):
        import torch

        class _LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, embed)
                self.lstm = torch.nn.LSTM(embed, hidden, layers, batch_first=True)
                self.fc = torch.nn.Linear(hidden, vocab)

            def forward(self, x, hc):
                out, hc = self.lstm(self.embed(x), hc)
                return self.fc(out), hc

        return _LM()


def bench_lstm(args) -> None:
    """Tokens/s of one truncated-BPTT training step (forward, backward, SGD), zsgd vs torch.nn.LSTM.

    Both carry their hidden state across steps (zsgd in an ``LSTMState``,
    PyTorch detached, as in ``word_language_model``) and start from the same
    weights; the first step's gradients are checked to agree.
    """
    from zsgd.nn.lstm import get_lstm

    m = get_lstm(args.lstm, args.vocab)
    s = m.spec
    B, T, V = args.batch, args.bptt, args.vocab
    w = m.init(0)
    g = np.empty_like(w)
    opt = make_optimizer("sgd", m.n_params, lr=LR)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (B, T))
    y = rng.integers(0, V, (B, T))
    state = m.init_state(B)
    train: dict[str, Callable[[], object]] = {}

    def zsgd_step():
        m.loss_and_grad(w, x, y, out=g, state=state)
        opt.step(w, g)

    train["zsgd"] = zsgd_step
    torch_version = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            torch.set_num_threads(1)
            torch_version = torch.__version__
            net = TorchLM(V, s.embed, s.hidden, s.layers)
            net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in m.state_dict(w).items()})
            loss_t = torch.nn.functional.cross_entropy(net(torch.from_numpy(x), None)[0].reshape(-1, V),
                                                       torch.from_numpy(y).reshape(-1))
            loss_t.backward()
            _, g0 = m.loss_and_grad(w, x, y)
            g_t = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
            err = np.abs(g_t - g0).max() / np.abs(g_t).max()
            assert err < 1e-4, f"zsgd and PyTorch LSTM gradients disagree: {err}"
            topt = torch.optim.SGD(net.parameters(), lr=LR)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y).reshape(-1)
            hc = [(torch.zeros(s.layers, B, s.hidden), torch.zeros(s.layers, B, s.hidden))]

            def torch_step():
                topt.zero_grad()
                out, (h, c) = net(xt, hc[0])
                hc[0] = (h.detach(), c.detach())
                torch.nn.functional.cross_entropy(out.reshape(-1, V), yt).backward()
                topt.step()

            train["pytorch"] = torch_step
    for f in train.values():
        for _ in range(2):
            f()
    results: dict[str, list[float]] = {f"{c}/{k}": [] for k in train for c in ("train", "cpu")}
    for _ in range(args.rounds):
        for k, f in train.items():
            for wall, cpu in _timed_group_cpu(f, max(2, args.group), B * T):
                results[f"train/{k}"].append(wall)
                results[f"cpu/{k}"].append(cpu)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{m.name} vocab {V}, batch {B} x bptt {T}, 1 thread, median of {args.rounds} x {max(2, args.group) - 1} "
          f"timed steps | numpy {np.__version__}, torch {torch_version} | {_cpu_name()}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')} (numpy's BLAS: zsgd's LSTM runs its "
          f"large products in its own tile, PyTorch in MKL and oneDNN)")
    for k, v in med.items():
        base = med.get(k.split("/")[0] + "/pytorch")
        ratio = f"{v / base:.2f}x PyTorch" if base else ""
        print(f"  {k:14s} {v:10,.0f} tokens/s (best step {max(results[k]):,.0f})  {ratio}")
    print("  (train: wall-clock time of a step; cpu: the thread's CPU time, which a shared machine's "
          "other processes do not add to)")
    if args.parts:
        _lstm_parts(m, w, x, y, state, max(20, args.rounds * 2))


def _timed_group_cpu(fn: Callable[[], object], group: int, batch: int) -> list[tuple[float, float]]:
    """As :func:`timed_group`, but (wall, thread-CPU) samples/s of each step but the first."""
    rates = []
    for i in range(group):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.thread_time()
        if i:
            rates.append((batch / (t1 - t0), batch / max(c1 - c0, 1e-9)))
    return rates


#: The calls of one LSTM training step that ``--parts`` times (module, function, what it does there).
_LSTM_PARTS = (
    ("LG", "gemm_at", "weight gradients: dg.T @ h (and dg.T @ x, the bias) over the block"),
    ("LK", "layer_forward", "forward through time: recurrent products, gates, cell"),
    ("LK", "layer_backward", "backward through time: cell and gates derivative, recurrent products"),
    ("LG", "gemm_packed", "block-wide products: layer 1's input projection and input gradient, output layer"),
    ("LG", "pack_rows", "packing weights (for x @ W.T)"),
    ("LG", "pack_cols", "packing weights (for dg @ W)"),
    ("LK", "softmax_xent", "softmax and cross-entropy gradient"),
    ("LK", "embed_scatter_add", "gate gradients summed per token (token table)"),
)


def _lstm_parts(m, w: np.ndarray, x: np.ndarray, y: np.ndarray, state, steps: int) -> None:
    """zsgd's LSTM step by part: the thread CPU time of each kernel call, fastest of ``steps`` steps per part.

    Wraps the module attributes ``zsgd.nn.lstm`` calls through (``LG.gemm_at``,
    ...) with timers for the duration, so it measures the real step's calls
    in their real order and cache state; restores them afterwards.
    """
    import zsgd.nn.lstm as lstm_mod

    spent: dict[str, float] = {}
    saved = []

    def timed(name: str, f: Callable) -> Callable:
        def call(*a, **kw):
            c0 = time.thread_time()
            r = f(*a, **kw)
            spent[name] = spent.get(name, 0.0) + time.thread_time() - c0
            return r
        return call

    for mod, name, _ in _LSTM_PARTS:
        owner = getattr(lstm_mod, mod)
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timed(name, getattr(owner, name)))
    g = np.empty_like(w)
    best: dict[str, float] = {}
    totals = []
    try:
        for _ in range(steps):
            spent.clear()
            c0 = time.thread_time()
            m.loss_and_grad(w, x, y, out=g, state=state)
            totals.append(time.thread_time() - c0)
            for k, v in spent.items():
                best[k] = min(best.get(k, v), v)
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    print(f"zsgd step by part (thread CPU ms, fastest of {steps} steps each; the step without SGD: "
          f"fastest {min(totals) * 1e3:.1f}, median {statistics.median(totals) * 1e3:.1f})")
    for _, name, what in _LSTM_PARTS:
        print(f"  {name:18s} {best.get(name, 0.0) * 1e3:7.2f}  {what}")
    print(f"  {'rest':18s} {(min(totals) - sum(best.values())) * 1e3:7.2f}  the fastest step less the parts' minima")


def _cpu_name() -> str:
    """The CPU's model name (what the LSTM figures depend on: the vector width, the L2 size)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def report(args, med, results, timings, cold, torch_version) -> None:
    import platform

    rows = []
    for kind, label in (("train", "train step"), ("fwd", "forward only")):
        base = med.get(f"{kind}/pytorch")
        best_base = max(results[f"{kind}/pytorch"]) if base else None
        for impl in ("zsgd", "pytorch", "numpy im2col"):
            key = f"{kind}/{impl}"
            if key in med:
                best = max(results[key])
                ratio = f"{med[key] / base:.2f}x" if base else "-"
                bratio = f"{best / best_base:.2f}x" if base else "-"
                rows.append((label, impl, f"{med[key]:.0f}", f"{best:.0f}", ratio, bratio))
    per_step = timings
    total = sum(per_step.values())
    layer_rows = [(k, f"{v * 1e3:.2f}", f"{100 * v / total:.1f}%")
                  for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])]
    title = (f"{args.model} {args.shape} batch {args.batch}, 1 thread, median of {args.rounds} x {max(2, args.group) - 1} "
             f"timed steps | numpy {np.__version__}, torch {torch_version} | {platform.processor() or platform.machine()}")
    try:
        from rich.console import Console
        from rich.table import Table

        con = Console(width=max(Console().width, 110))
        t = Table(title=title)
        for c in ("what", "implementation", "samples/s (median step)", "best step", "vs PyTorch", "best vs best"):
            t.add_column(c, justify="right" if c not in ("what", "implementation") else "left")
        for r in rows:
            t.add_row(*r)
        con.print(t)
        t2 = Table(title="zsgd training step time by part (median of steps; fwd/bwd per layer)")
        for c in ("part", "ms/step", "share"):
            t2.add_column(c, justify="left" if c == "part" else "right")
        for r in layer_rows:
            t2.add_row(*r)
        con.print(t2)
    except ImportError:  # pragma: no cover
        print(title)
        for r in rows:
            print("  ".join(f"{c:>24}" for c in r))
        for r in layer_rows:
            print("  ".join(f"{c:>18}" for c in r))
    if cold is not None:
        print(f"fresh process to end of first training step (numba cache warm): {cold:.2f} s")


if __name__ == "__main__":
    main()
