"""zsgd.wire.memory: a process that receives model-size messages keeps its freed buffers instead of faulting in
fresh pages for each one (a loaded broker took 4-36 minor faults per update before, the raw echo up to ~450).

Each case runs in a fresh interpreter: glibc's thresholds are per process, and adapt to its first frees."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Buffers of a cnn message's size (4.8 MB) and one above it, freed out of order: the allocation pattern of a
# server holding an update while the next arrives and a reply is in flight. With glibc's adaptive thresholds
# the larger block is mapped and unmapped every round (about 1,600 faults over 30 rounds on the development VM).
PATTERN = r"""
import resource, sys, numpy as np
from zsgd.wire.memory import keep_message_memory
kept = keep_message_memory()
def one_round():
    a = np.empty(1_200_000, np.float32); a.fill(1)
    b = np.empty(1_200_000, np.float32); b.fill(1)
    del a
    c = np.empty(5_000_000, np.float32); c.fill(1)
    del b, c
one_round()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    one_round()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _run(keep: str) -> tuple[bool, int]:
    env = os.environ | {"ZSGD_KEEP_MEMORY": keep, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PATTERN], env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


@glibc
def test_freed_message_buffers_are_reused_not_faulted_in():
    kept, faults = _run("1")
    assert kept
    assert faults < 50, f"{faults} minor faults over 30 rounds of message-size buffers: freed memory went back to the system"


@glibc
def test_switched_off_it_leaves_the_allocator_alone():
    kept, _ = _run("0")
    assert not kept


def test_idempotent_in_one_process():
    from zsgd.wire.memory import keep_message_memory

    assert keep_message_memory() == keep_message_memory()
