"""The cost of zsgd's PyTorch adapter (``--model torch:...``) against a plain PyTorch training step, ONE thread.

    python benchmarks/bench_torch_adapter.py                    # every case, 15 rounds of 10 pairs of steps
    python benchmarks/bench_torch_adapter.py --case resnet-b32 --rounds 30

A plain step is what a PyTorch user writes: ``zero_grad(set_to_none=True)``,
forward, cross-entropy, ``backward()``, ``torch.optim.SGD.step()``. The
adapter's step is what a zsgd worker and trainer do: ``loss_and_grad`` (bind
the module's parameters to the flat weight vector, point every ``.grad`` at
a new flat gradient, seed the step, forward, loss, backward) and zsgd's SGD
update of the flat vector. Same architecture, same weights, same batch, same
process. The machine is shared and its load drifts within seconds, so the
two alternate step by step (which one goes first flips every pair), every
step is timed, and the overhead is the median over pairs of (adapter step /
plain step) - 1: two neighbouring steps see the same load. The table also
gives the median step of each and the load average before and after.

Cases: the example ResNet (examples/torch/resnet.py, 5 K parameters, compute
bound) at two batch sizes, the Keras mnist CNN (1.2 M parameters) and an MLP
whose step is cheap next to its 1.9 M parameters (the adapter's per-step
work on the flat vectors is largest there, relative to the step).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples.torch.resnet

from zsgd.nn.optim import make_optimizer  # noqa: E402
from zsgd.nn.torch_model import TorchModel  # noqa: E402

LR = 0.01


def keras_cnn(input_shape=(1, 28, 28), n_classes=10) -> nn.Module:
    """zsgd's ``cnn`` in PyTorch (dropout on: the adapter seeds each step's masks, the plain loop does not)."""
    return nn.Sequential(nn.Conv2d(input_shape[0], 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(128, n_classes))


def wide_mlp(input_shape=(1, 28, 28), n_classes=10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, n_classes))


def resnet(input_shape=(1, 28, 28), n_classes=10) -> nn.Module:
    from examples.torch.resnet import make

    return make(input_shape, n_classes)


CASES = {"resnet-b32": (resnet, 32), "resnet-b128": (resnet, 128), "cnn-b64": (keras_cnn, 64), "mlp-b64": (wide_mlp, 64)}


def bench_case(name: str, rounds: int, group: int) -> dict:
    factory, batch = CASES[name]
    model = TorchModel(f"torch:{name}", factory, (1, 28, 28), 10, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)

    torch.manual_seed(0)
    net = factory((1, 28, 28), 10)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict(model.init(0)).items()})
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    w = model.init(0)
    zopt = make_optimizer("sgd", model.n_params, lr=LR)
    step_no = [0]

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        opt.step()
        step_no[0] += 1

    def adapter() -> None:
        _, g = model.loss_and_grad(w, x, y, training=True, seed=step_no[0])
        zopt.step(w, g)
        step_no[0] += 1

    for fn in (plain, adapter):  # warm up both
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {"plain": [], "adapter": []}
    ratios: list[float] = []
    for r in range(rounds):
        order = [("plain", plain), ("adapter", adapter)]
        for i in range(group):
            pair = {}
            for key, fn in (order if (r + i) % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn()
                pair[key] = time.perf_counter() - t0
                times[key].append(pair[key])
            ratios.append(pair["adapter"] / pair["plain"])
    p, a = statistics.median(times["plain"]), statistics.median(times["adapter"])
    return {"case": name, "params": model.n_params, "batch": batch, "plain_ms": 1e3 * p, "adapter_ms": 1e3 * a,
            "overhead": statistics.median(ratios) - 1.0, "steps": len(times["plain"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default: all")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    parser.add_argument("--group", type=int, default=10, help="timed pairs of steps per round (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    rows = [bench_case(c, args.rounds, args.group) for c in (args.case or list(CASES))]
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} cores; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print(f"{'case':<12} {'params':>10} {'batch':>6} {'plain ms':>10} {'adapter ms':>11} {'overhead':>9} {'steps':>6}")
    for r in rows:
        print(f"{r['case']:<12} {r['params']:>10,} {r['batch']:>6} {r['plain_ms']:>10.2f} {r['adapter_ms']:>11.2f} "
              f"{100 * r['overhead']:>8.1f}% {r['steps']:>6}")


if __name__ == "__main__":
    main()
