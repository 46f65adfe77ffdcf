"""A kernel compiled in this process and the same kernel loaded from numba's cache give the same bits (zsgd.jit).

The first run on a fresh machine compiles; every later one loads. Before
zsgd.jit's rules the first run's LSTM gradients differed from the later
runs' by about 5e-9 (the caller of a kernel ran the callee's own code when
both were compiled in the process, its own re-optimised copy when it was
loaded), so ``zsgd train`` and ``zsgd sim`` were not reproducible across
their first and second run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

# Two training steps of a small LSTM and of the CNN (every kernel family: LSTM, conv tile and im2col,
# dense, dropout, the optimizers' and the server's passes), hashed; then, where this process compiled
# them, every kernel's LLVM IR searched for a call into a linked copy of another kernel (zsgd.jit, rule 1).
_CHILD = r"""
import hashlib, json, re
import numpy as np
from numba.core.registry import CPUDispatcher
from zsgd.nn.lstm import get_lstm
from zsgd.nn.models import get_model
from zsgd.nn.optim import make_optimizer
from zsgd.nn import server_step

def h(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

out = {}
rng = np.random.default_rng(0)
m = get_lstm("lstm:embed=16,hidden=32,layers=2", 40)
w = m.init(0)
st = m.init_state(4)
opt = make_optimizer("adam", m.n_params, lr=0.01)
for i in range(2):
    x, y = rng.integers(0, 40, (4, 8)), rng.integers(0, 40, (4, 8))
    out[f"lstm{i}"] = h(m.loss_and_grad(w, x, y, state=st)[1])
    opt.step(w, m.loss_and_grad(w, x, y)[1])
out["lstm_w"] = h(w)
for name in ("cnn", "lenet5"):
    m = get_model(name, (1, 28, 28), 10)
    w = m.init(0)
    opt = make_optimizer("momentum", m.n_params, lr=0.05)
    for i in range(2):
        x, y = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)
        g = m.loss_and_grad(w, x, y, training=True, seed=i)[1]
        out[f"{name}{i}"] = h(g)
        opt.step(w, g)
    acc = np.zeros_like(w)
    server_step.add_scaled(acc, g, np.float32(0.5))
    out[f"{name}_w"] = h(w) + h(acc)

import zsgd.kernels, zsgd.nn.lstm_kernels, zsgd.nn.lstm_gemm, zsgd.nn.conv.direct, zsgd.nn.optim
hits = misses = 0
linked_calls = []
for mod in (zsgd.kernels, zsgd.nn.lstm_kernels, zsgd.nn.lstm_gemm, zsgd.nn.conv.direct, zsgd.nn.optim, server_step):
    for name, f in vars(mod).items():
        if not (isinstance(f, CPUDispatcher) and f.py_func.__module__ == mod.__name__):
            continue
        hits += sum(f.stats.cache_hits.values())
        misses += sum(f.stats.cache_misses.values())
        if sum(f.stats.cache_hits.values()):
            continue  # loaded: no IR to read
        for ir in f.inspect_llvm().values():
            weak = set(re.findall(r"define linkonce_odr [^@]*@([\w.$]+)\(", ir))
            calls = set(re.findall(r"call [^@]*@([\w.$]+)\(", ir))
            linked_calls += [f"{mod.__name__}.{name} -> {c[:60]}" for c in sorted(calls & weak) if not c.startswith("NRT_")]
print("RESULT " + json.dumps({"hashes": out, "hits": hits, "misses": misses, "linked_calls": linked_calls}))
"""


def _run(cache: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env,
                          cwd=cache.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_compiled_and_cached_kernels_give_the_same_bits(tmp_path):
    cache = tmp_path / "numba-cache"
    first = _run(cache)  # compiles every kernel and fills the cache
    second = _run(cache)  # loads them
    assert first["hits"] == 0 and first["misses"] > 0, first
    assert second["hits"] > 0 and second["misses"] == 0, second
    diff = sorted(k for k, v in first["hashes"].items() if v != second["hashes"][k])
    assert not diff, f"compiled vs loaded from the cache: {diff} differ"
    assert first["linked_calls"] == [], first["linked_calls"]


def test_a_kernel_cache_is_keyed_on_the_files_compiled_into_it():
    """direct.py's callers hold conv/tile.py's and lstm_gemm.py's code: their cache stamp covers those files."""
    from zsgd import jit
    from zsgd.nn.conv import direct
    from zsgd.nn import lstm_kernels

    pkg = Path(jit.__file__).resolve().parent
    assert {pkg / "nn/conv/tile.py", pkg / "nn/lstm_gemm.py", pkg / "jit.py"} <= set(jit.dependencies(pkg / "nn/conv/direct.py"))
    assert pkg / "nn/lstm_gemm.py" in jit.dependencies(pkg / "nn/lstm_kernels.py")
    for kernel, dep in ((direct.forward, "nn/conv/tile.py"), (lstm_kernels.layer_forward, "nn/lstm_gemm.py")):
        locator = kernel._cache._impl.locator
        assert isinstance(locator, jit._DependencyLocator), type(locator)
        digest = hashlib.sha256((pkg / dep).read_bytes()).hexdigest()
        assert (dep, digest) in locator.get_source_stamp()[1]
