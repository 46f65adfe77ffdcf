"""The example ResNet trained by a plain PyTorch loop: the reference ``zsgd train`` is compared with.

    python examples/torch/plain_loop.py --epochs 2 --seed 0
    zsgd train --model torch:examples.torch.resnet:make --data fashion-mnist --epochs 2 --seed 0 \\
        --batch-size 64 --lr 0.05 --optimizer momentum --momentum 0.9 --lr-schedule cosine

Same settings as that command: SGD with momentum 0.9 (``torch.optim.SGD``, which zsgd's ``momentum``
optimizer matches), lr 0.05 decayed to 0 by zsgd's cosine (``zsgd.core.schedule.lr_factor``, once per
step), batch 64, a fresh shuffle every epoch, initial weights from
``torch.manual_seed(seed)`` then the factory, as zsgd builds them. Only the shuffle order differs (zsgd
draws its own), so the two agree within seed-to-seed noise. The images come through zsgd's loader
(the same arrays, scaled to [0, 1]); everything else is PyTorch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: examples.torch.resnet, zsgd

from examples.torch.resnet import make  # noqa: E402
from zsgd.data import load_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ds = load_dataset(args.data)
    x = torch.from_numpy(ds.x_train.astype(np.float32) / 255.0)
    y = torch.from_numpy(ds.y_train.astype(np.int64))
    torch.manual_seed(args.seed)
    net = make(ds.input_shape, ds.n_classes)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    steps = int(round(args.epochs * len(y) / args.batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(y), generator=gen), 0
    t0 = time.perf_counter()
    net.train()
    for t in range(steps):
        if args.lr_schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
        if pos + args.batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    net.eval()
    xt = torch.from_numpy(ds.x_test.astype(np.float32) / 255.0)
    with torch.no_grad():
        logits = torch.cat([net(xt[i:i + 1000]) for i in range(0, len(xt), 1000)])
    acc = float((logits.argmax(1).numpy() == ds.y_test).mean())
    test_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(ds.y_test.astype(np.int64))))
    print(f"plain PyTorch: {steps} steps ({args.epochs:g} epochs) in {wall:.1f} s, {torch.get_num_threads()} threads; "
          f"test accuracy {acc:.4f}, test loss {test_loss:.4f}")


if __name__ == "__main__":
    main()
