"""Garbage on the broker's port is rejected and counted; training goes on unaffected."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import broker_address, join_proof, read_events, reap, start_worker, start_zsgd, stop, summary_of, wait_for, wait_for_updates
from zsgd.wire import protocol
from zsgd.wire.shm import SharedSlots
from zsgd.wire.protocol import Message, MsgType

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.05", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them

valid_header = protocol.encode(protocol.update_message("x", 0, 0, np.zeros(4, np.float32), 32, 0.5))[0]
garbage = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=4),  # random frames
    st.binary(min_size=1, max_size=len(valid_header)).map(lambda b: [bytes(valid_header[: len(b)])]),  # truncated header
    st.tuples(st.integers(0, len(valid_header) - 1), st.integers(0, 255)).map(  # one byte flipped
        lambda t: [bytes(valid_header[: t[0]]) + bytes([t[1]]) + bytes(valid_header[t[0] + 1:]), np.zeros(4, np.float32).tobytes()]),
    st.just([b"ZS\x63\x04{}"]),  # wrong protocol version
    st.just([b"ZS" + bytes([protocol.PROTOCOL_VERSION, 4]) + b"x" * 70000]),  # oversized header
)


@pytest.mark.slow
def test_fuzzed_and_hostile_messages_are_rejected_and_training_continues(tmp_path, no_orphans):
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "3", "--algo", "async", "--steps", "2500", "--start-wait", "0", "--out", str(out), *FAST)  # the rogue is the third
    workers, made = [], []
    ctx = zmq.Context()
    try:
        address = broker_address(out)
        for i in range(2):  # worker 0 keeps its exchanges on the socket (--no-shared-memory); worker 1 shares memory
            workers.append(start_worker(address, "--id", str(i), "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", *(["--no-shared-memory"] * (i == 0)),
                                        keys=out / "keys"))
        wait_for_updates(out, 1)
        sent = 0
        attacker = ctx.socket(zmq.DEALER)
        attacker.linger = 0
        attacker.connect(address)

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames=garbage)
        def send(frames):
            nonlocal sent
            attacker.send_multipart(frames)
            sent += 1

        send()
        # A peer that joins properly, then sends poison: NaN gradient, wrong shape, wrong run, wrong dtype.
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.setsockopt(zmq.ROUTING_ID, b"rogue")
        rogue.connect(address)
        protocol.send(rogue, Message(MsgType.HELLO, "-", 2, 0, {}, meta={"stage": "join", "role": "worker", **join_proof(out, "worker", 2)}))
        assign = _recv_type(rogue, MsgType.ASSIGN)
        run, wid, n_params = assign.run, assign.worker, 784 * 10 + 10
        protocol.send(rogue, Message(MsgType.HELLO, run, wid, 0, {}, meta={"stage": "ready", "role": "worker", "need_shard": False}))
        weights = _recv_type(rogue, MsgType.WEIGHTS)
        poison = [
            protocol.update_message(run, wid, weights.version, np.full(n_params, np.nan, np.float32), 32, 0.1),
            protocol.update_message(run, wid, weights.version, np.zeros(n_params + 1, np.float32), 32, 0.1),
            protocol.update_message("other-run", wid, weights.version, np.zeros(n_params, np.float32), 32, 0.1),
            protocol.update_message(run, wid, weights.version, np.zeros(n_params, np.float16), 32, 0.1),
            protocol.update_message(run, wid, weights.version, np.full(n_params, np.inf, np.float32), 32, 0.1),
            # a top-k payload whose indices run past the model
            protocol.update_message(run, wid, weights.version, None, 32, 0.1, codec="topk:0.01",
                                    extra_arrays={"i": np.arange(n_params - 40, n_params + 39, dtype=np.int32), "v": np.ones(79, np.float32)}),
        ]
        rejected = lambda: sum(e["event"] == "rejected" and e.get("peer") == b"rogue".hex() for e in read_events(out))  # noqa: E731
        for n, msg in enumerate(poison, 1):  # one at a time: each is turned down before the next goes out
            protocol.send(rogue, msg)
            wait_for(lambda n=n: rejected() >= n, 20, interval=0.01, what=f"poison message {n} to be rejected")
        # Shared memory (zsgd.wire.shm): a gradient "in" slots never offered; an offer of a file that is not one
        # (declined, the update itself is fine); then real slots and a sequence number they were never written under.
        zeros = np.zeros(n_params, np.float32)
        protocol.send(rogue, protocol.update_message(run, wid, weights.version, None, 32, 0.1, shm=2))
        wait_for(lambda: rejected() >= len(poison) + 1, 20, interval=0.01, what="an update in slots never offered to be rejected")
        protocol.send(rogue, protocol.update_message(run, wid, weights.version, zeros, 32, 0.1, shm_offer={"path": "/etc/passwd", "n": n_params}))
        slots = SharedSlots.create(n_params)
        made.append(slots)  # removed in the finally below, whatever fails first
        protocol.send(rogue, protocol.update_message(run, wid, weights.version, zeros, 32, 0.1, shm_offer=slots.offer()))
        # Replies to the NaN poison (async answers a dropped update with the current weights) and to the declined
        # offer come over the socket first; the reply to the taken offer is the first in the slot.
        weights = _recv_type(rogue, MsgType.WEIGHTS, where=lambda m: "shm" in m.meta)
        assert "w" not in weights.arrays and not slots.path.exists()  # taken: the reply is in the slot, the name is gone
        assert np.isfinite(slots.take("reply", weights.meta["shm"])).all() and weights.meta["shm"] % 2 == 0
        protocol.send(rogue, protocol.update_message(run, wid, weights.version, None, 32, 0.1, shm=slots.put("update", zeros) + 2))
        wait_for(lambda: rejected() >= len(poison) + 2, 20, interval=0.01, what="a stale shared-memory update to be rejected")
        _, err = broker.communicate(timeout=120)
        assert broker.returncode == 0, err[-2000:]
    finally:
        for slots in made:
            slots.unlink()
            slots.close()
        stop(broker, group=True)
        reap(*workers, timeout=15)
        ctx.destroy(linger=0)
    summary = summary_of(out)
    assert summary["updates"] >= 2500
    assert summary["test_accuracy"] > 0.6
    assert summary["rejected_messages"] >= sent + len(poison) - 5, summary["rejected_by_reason"]
    reasons = summary["rejected_by_reason"]
    assert reasons.get("non-finite", 0) >= 2 and reasons.get("wrong-shape", 0) + reasons.get("wrong-dtype", 0) >= 2
    assert reasons.get("shm-stale", 0) == 1 and reasons.get("bad-schema", 0) >= 1
    assert summary["shared_memory_links"] == 2  # worker 1 (on this machine) and the rogue's own slots
    assert summary["shared_memory_declined"] == {"not-a-zsgd-file": 1}


def _recv_type(sock, mtype, timeout=20.0, where=lambda msg: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(200):
            _, msg = protocol.recv(sock)
            if msg.type == mtype and where(msg):
                return msg
    raise AssertionError(f"no {mtype.name} within {timeout} s")
