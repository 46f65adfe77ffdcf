"""The broker's endpoint says whether a zero-copy weights send may still be read by ZeroMQ (``weights_in_flight``):
the parameter server steps out of place while it does, so a reply is never overwritten on its way out. It tells from
a weak reference to the frame pyzmq holds until its I/O thread is done (no MessageTracker per reply); these check
that it says "in flight" exactly while the frame is held, with real sockets."""

from __future__ import annotations

import numpy as np
import zmq

from zsgd.runtime.server.endpoint import Endpoint
from zsgd.wire import protocol

from helpers import wait_for


def _pair(tmp_path):
    """An endpoint whose socket buffers are small, and a DEALER it knows (it has sent one message)."""
    ep = Endpoint("tcp://127.0.0.1:0", protocol.Limits(), tmp_path)
    ep.sock.setsockopt(zmq.SNDBUF, 4096)  # for connections made from now on: a big reply cannot all sit in the kernel
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.linger = 0
    d.setsockopt(zmq.RCVBUF, 4096)
    d.setsockopt(zmq.ROUTING_ID, b"peer-1")
    d.connect(ep.address)
    d.send(b"hello")
    assert ep.poll(30), "the endpoint got nothing"
    identity = next(ep.receive())[0].bytes
    return ep, ctx, d, identity


def test_a_big_reply_is_in_flight_until_the_peer_has_read_it(tmp_path):
    ep, ctx, d, identity = _pair(tmp_path)
    try:
        w = np.arange(2_000_000, dtype=np.float32)  # 8 MB: far more than 4 KiB socket buffers hold while the peer does not read
        assert ep.send(identity, protocol.weights_message("run1", 3, w.view()))
        assert ep.weights_in_flight()
        assert d.poll(60_000)
        frames = d.recv_multipart()
        assert np.array_equal(np.frombuffer(frames[-1], np.float32), w)
        wait_for(lambda: not ep.weights_in_flight(), 30, interval=0.01, what="the reply to leave flight after the peer read it")
    finally:
        d.close()
        ctx.term()
        ep.close(linger_ms=0)


def test_a_reply_under_the_copy_threshold_is_copied_and_never_in_flight(tmp_path):
    ep, ctx, d, identity = _pair(tmp_path)
    try:
        w = np.ones(100, dtype=np.float32)  # 400 bytes: pyzmq copies it (protocol.ZERO_COPY_THRESHOLD)
        assert ep.send(identity, protocol.weights_message("run1", 3, w))
        assert not ep.weights_in_flight()
        assert d.poll(30_000) and np.array_equal(np.frombuffer(d.recv_multipart()[-1], np.float32), w)
    finally:
        d.close()
        ctx.term()
        ep.close(linger_ms=0)
