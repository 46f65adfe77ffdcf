"""Shared memory between a worker and its broker on one machine (``zsgd.wire.shm``): the slots, the checks a
broker makes before it maps a file a peer named, and the messages with and without their big array."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from zsgd.wire import protocol
from zsgd.wire.frames import ProtocolError
from zsgd.wire.protocol import MsgType
from zsgd.wire.shm import PREFIX, Declined, SharedPeers, SharedSlots, WorkerShare, file_bytes, shm_dir, sweep_orphans

N = 1000


@pytest.fixture
def slots():
    s = SharedSlots.create(N)
    yield s
    s.unlink()
    s.close()


def test_a_slot_gives_back_what_was_put_under_its_sequence_number(slots):
    g = np.arange(N, dtype=np.float32)
    seq = slots.put("update", g)
    assert seq == 2 and np.array_equal(slots.take("update", seq), g)
    assert slots.put("update", g * 2) == 4 and slots.put("reply", -g) == 2  # each slot counts on its own
    assert np.array_equal(slots.take("reply", 2), -g)
    with pytest.raises(ProtocolError) as e:
        slots.take("update", 2)  # overwritten since: never the newer data under the older name
    assert e.value.reason == "shm-stale"
    for bad in (3, 0, -2, "4", True, None):
        with pytest.raises(ProtocolError) as e:
            slots.take("update", bad)
        assert e.value.reason == "bad-schema"


def test_the_file_is_private_and_both_ends_see_one_memory(slots):
    st = os.stat(slots.path)
    assert st.st_mode & 0o777 == 0o600 and st.st_size == file_bytes(N) and slots.path.parent == shm_dir()
    other = SharedSlots.attach(slots.offer(), N)
    seq = other.put("reply", np.ones(N, np.float32))
    assert np.array_equal(slots.take("reply", seq), np.ones(N, np.float32))
    out = np.zeros(N, np.float32)
    out.flags.writeable = False  # handed out read-only last time: taken into again
    assert slots.take("reply", seq, out=out) is out and out.all()
    other.unlink()
    assert not slots.path.exists()
    seq = slots.put("update", np.full(N, 3, np.float32))  # mappings outlive the name
    assert other.take("update", seq)[0] == 3
    other.close()


@pytest.mark.parametrize("case", ["no-file", "elsewhere", "wrong-prefix", "group-readable", "wrong-size", "wrong-n", "symlink", "gone"])
def test_a_broker_maps_only_a_private_zsgd_file_of_the_right_size(slots, tmp_path, case):
    offer, n = slots.offer(), N
    if case == "no-file":
        offer = {"n": N}
    elif case == "elsewhere":
        offer = {"path": str(tmp_path / slots.path.name)}
        (tmp_path / slots.path.name).write_bytes(slots.path.read_bytes())
    elif case == "wrong-prefix":
        other = shm_dir() / f"not-zsgd-{os.getpid()}"
        other.write_bytes(b"x")
        offer = {"path": str(other)}
    elif case == "group-readable":
        os.chmod(slots.path, 0o640)
    elif case == "wrong-size":
        n = N + 1
    elif case == "wrong-n":
        os.truncate(slots.path, file_bytes(N))  # same size; the header says N, the broker's model is bigger
        n = N
        np.frombuffer(slots._mm, np.uint64, count=1, offset=8)[0] = N - 2  # noqa: SLF001 -- a forged header
    elif case == "symlink":
        link = shm_dir() / f"zsgd-shm-link-{os.getpid()}"
        link.symlink_to(slots.path)
        offer = {"path": str(link)}
    elif case == "gone":
        slots.unlink()
    try:
        with pytest.raises(Declined) as e:
            SharedSlots.attach(offer, n)
    finally:
        for p in shm_dir().glob(f"*-{os.getpid()}"):
            p.unlink()
    assert e.value.reason == {"no-file": "no-file", "elsewhere": "not-a-zsgd-file", "wrong-prefix": "not-a-zsgd-file",
                              "group-readable": "not-private", "wrong-size": "wrong-size", "wrong-n": "wrong-layout",
                              "symlink": "cannot-open", "gone": "cannot-open"}[case]


def test_a_broker_switched_off_declines_every_offer_and_leaves_the_arrays_on_the_socket(slots):
    peers = SharedPeers(N, enabled=False)  # --no-shared-memory
    g = np.linspace(-1, 1, N, dtype=np.float32)
    first = protocol.update_message("r", 0, 0, g, 32, 0.5, shm_offer=slots.offer())
    assert peers.incoming(b"w0", first) is first and slots.path.exists()  # not mapped, not unlinked: the worker's to remove
    assert peers.summary() == {"shared_memory_links": 0, "shared_memory_declined": {"switched-off": 1}}
    assert peers.outgoing(b"w0", protocol.weights_message("r", 1, g)).arrays["w"] is not None
    with pytest.raises(ProtocolError, match="from a peer that has none"):
        peers.incoming(b"w0", protocol.update_message("r", 0, 1, None, 32, 0.4, shm=slots.put("update", g)))
    peers.close()


def test_the_broker_end_takes_an_offer_and_moves_the_big_arrays_through_the_slots(slots):
    peers = SharedPeers(N)
    g = np.linspace(-1, 1, N, dtype=np.float32)
    first = protocol.update_message("r", 0, 0, g, 32, 0.5, shm_offer=slots.offer())
    assert peers.incoming(b"w0", first) is first and not slots.path.exists()  # taken, and the name removed at once
    assert peers.summary() == {"shared_memory_links": 1, "shared_memory_declined": {}}
    reply = peers.outgoing(b"w0", protocol.weights_message("r", 7, g * 3))
    assert "w" not in reply.arrays and np.array_equal(slots.take("reply", reply.meta["shm"]), g * 3)
    decoded = protocol.decode(protocol.encode(reply))  # what goes on the wire is a plain message without the array
    assert decoded.type == MsgType.WEIGHTS and decoded.meta["shm"] == reply.meta["shm"]
    update = protocol.update_message("r", 0, 7, None, 32, 0.4, shm=slots.put("update", g + 1))
    got = peers.incoming(b"w0", update)
    assert np.array_equal(got.arrays["g"], g + 1) and not got.arrays["g"].flags.writeable
    protocol.validate_update(got, run="r", known_workers={0}, n_params=N)  # as if it had come in a frame
    assert peers.outgoing(b"other", protocol.weights_message("r", 7, g)).arrays["w"] is not None  # no slots: unchanged
    with pytest.raises(ProtocolError, match="from a peer that has none"):
        peers.incoming(b"other", update)
    with pytest.raises(ProtocolError, match="both in shared memory and in a frame"):
        peers.incoming(b"w0", protocol.update_message("r", 0, 7, g, 32, 0.4, shm=update.meta["shm"]))
    peers.incoming(b"w1", protocol.update_message("r", 1, 0, g, 32, 0.5, shm_offer={"path": "/etc/passwd"}))
    assert peers.summary()["shared_memory_declined"] == {"not-a-zsgd-file": 1}
    peers.forget(b"w0")
    with pytest.raises(ProtocolError):
        peers.incoming(b"w0", update)  # a dead incarnation's slots are gone with it
    peers.close()


def test_a_gradient_buffer_still_held_elsewhere_is_not_reused(slots):
    peers = SharedPeers(N)
    peers.incoming(b"w0", protocol.update_message("r", 0, 0, np.zeros(N, np.float32), 32, 0.5, shm_offer=slots.offer()))
    held = peers.incoming(b"w0", protocol.update_message("r", 0, 0, None, 32, 0.5, shm=slots.put("update", np.ones(N, np.float32)))).arrays["g"]
    again = peers.incoming(b"w0", protocol.update_message("r", 0, 0, None, 32, 0.5, shm=slots.put("update", np.full(N, 2, np.float32)))).arrays["g"]
    assert held[0] == 1 and again[0] == 2 and held is not again  # a sync round may keep the first update until it ends
    del held
    third = peers.incoming(b"w0", protocol.update_message("r", 0, 0, None, 32, 0.5, shm=slots.put("update", np.full(N, 3, np.float32)))).arrays["g"]
    assert third[0] == 3 and len(peers._pool) == 2  # noqa: SLF001 -- the freed buffer came back
    peers.close()


def test_only_a_worker_whose_broker_must_be_on_this_machine_offers():
    from zsgd.wire.shm import broker_on_this_machine

    for address in ("tcp://127.0.0.1:5555", "tcp://127.0.0.2:1", "tcp://localhost:80", "tcp://[::1]:5", "ipc:///tmp/zsgd.sock"):
        assert broker_on_this_machine(address), address
    # Parsed only, never contacted: a documentation address (TEST-NET-1) and a scheme ZeroMQ would refuse.
    for address in ("tcp://192.0.2.1:5555", "udp://127.0.0.1:1", "tcp://name.invalid:5"):
        assert not broker_on_this_machine(address), address


def test_the_worker_end_offers_once_then_moves_both_arrays_through_the_slots():
    import zmq

    from zsgd.wire.link import BrokerLink

    ctx = zmq.Context()
    link = BrokerLink(ctx, "tcp://127.0.0.1:9", b"w", run="r", worker=0, heartbeat=1.0, timeout=5.0)  # never opened: no traffic
    try:
        g = np.arange(N, dtype=np.float32)
        assert link.shared.outgoing(protocol.update_message("r", 0, 0, g, 32, 0.5)).meta.get("shm_offer") is None  # not asked to
        link.offer_shared_memory(N)
        first = link.shared.outgoing(protocol.update_message("r", 0, 0, g, 32, 0.5))
        assert first.arrays["g"] is g and first.meta["shm_offer"]["path"] == str(link.shared.slots.path)  # offered, gradient still in a frame
        broker = SharedSlots.attach(first.meta["shm_offer"], N)
        broker.unlink()
        older, newer = broker.put("reply", g), broker.put("reply", g * 2)
        assert link.shared.incoming(protocol.Message(MsgType.WEIGHTS, "r", -1, 1, {}, meta={"shm": older})) is None  # superseded
        got = link.shared.incoming(protocol.Message(MsgType.WEIGHTS, "r", -1, 2, {}, meta={"shm": newer}))
        assert np.array_equal(got.arrays["w"], g * 2) and not got.arrays["w"].flags.writeable and link.shared.active
        second = link.shared.outgoing(protocol.update_message("r", 0, 2, g + 1, 32, 0.5))
        assert "g" not in second.arrays and np.array_equal(broker.take("update", second.meta["shm"]), g + 1)
        assert "shm_offer" not in second.meta
        coded = protocol.update_message("r", 0, 2, None, 32, 0.5, codec="topk:0.1", extra_arrays={"i": np.arange(3, dtype=np.int32),
                                                                                                   "v": np.ones(3, np.float32)})
        assert link.shared.outgoing(coded) is coded  # compressed updates stay on the socket
        broker.close()
    finally:
        link.close(flush=False)
        ctx.destroy(linger=0)
    assert not list(shm_dir().glob(f"zsgd-shm-{os.getpid()}-*"))


def test_the_worker_reads_the_weights_in_place_and_knows_when_they_were_rewritten_under_it():
    """No copy on the worker's receive path: the weights it computes on are the reply slot itself, so a broker that
    rewrites the slot meanwhile (newer weights, their message on its way) voids that step: ``intact`` says so."""
    share = WorkerShare(N)
    try:
        first = share.outgoing(protocol.update_message("r", 0, 0, np.zeros(N, np.float32), 32, 0.5))
        broker = SharedSlots.attach(first.meta["shm_offer"], N)
        broker.unlink()
        msg = protocol.Message(MsgType.WEIGHTS, "r", -1, 1, {}, meta={"shm": broker.put("reply", np.full(N, 3, np.float32))})
        got = share.incoming(msg)
        w = got.arrays["w"]
        assert np.all(w == 3) and not w.flags.writeable and share.intact(got)
        with pytest.raises(ValueError):
            w[0] = 1  # read-only: the worker never writes the broker's slot
        broker.put("reply", np.full(N, 4, np.float32))
        assert np.all(w == 4), "the weights are the slot itself, not a copy"
        assert not share.intact(got)  # so the step computed on them is void
        framed = protocol.weights_message("r", 2, np.ones(N, np.float32))
        assert share.incoming(framed) is framed and share.intact(framed)  # weights in a frame are the worker's own
        with pytest.raises(ProtocolError):
            share.incoming(protocol.Message(MsgType.WEIGHTS, "r", -1, 3, {}, meta={"shm": 3}))  # odd: never a finished write
        del w, got
        broker.close()
    finally:
        share.close()
        if share.slots is not None:
            share.slots.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_files_of_dead_workers_are_swept_and_no_others(tmp_path):
    dead, alive = tmp_path / f"{PREFIX}{_dead_pid()}-abc", tmp_path / f"{PREFIX}{os.getpid()}-abc"
    odd, other = tmp_path / f"{PREFIX}notapid-abc", tmp_path / "unrelated-1"
    for f in (dead, alive, odd, other):
        f.write_bytes(b"x")
    assert sweep_orphans(tmp_path) == 1
    assert not dead.exists() and alive.exists() and odd.exists() and other.exists()


def test_a_worker_making_its_slots_sweeps_a_file_a_killed_worker_left():
    """A worker SIGKILLed between making its file and its broker mapping it leaves the name behind."""
    left = shm_dir() / f"{PREFIX}{_dead_pid()}-{os.getpid()}"
    left.write_bytes(b"x")
    s = None
    try:
        s = SharedSlots.create(N)
        assert not left.exists() and s.path.exists()
    finally:
        left.unlink(missing_ok=True)
        if s is not None:
            s.unlink()
            s.close()
