"""CURVE: key files, key hand-over, and rogue clients against a real secure run."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import zmq

from helpers import broker_address, cli, read_events, reap, run_zsgd, start_worker, start_zsgd, stop, summary_of, wait_for, wait_for_updates
from zsgd.wire import protocol
from zsgd.errors import ZsgdError
from zsgd.wire.protocol import Message, MsgType
from zsgd.wire.security import KeyPair, generate_keys_dir, is_loopback, load_keys_dir, read_keys_line

FAST = ["--model", "logreg", "--data", "embedded", "--batch-size", "32", "--lr", "0.05", "--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots"]  # the PNGs are tested where a test looks at them


def test_keys_generate_writes_private_files(tmp_path):
    d = tmp_path / "keys"
    r = cli("keys", "generate", str(d), "--clients", "2")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in d.iterdir()) == ["client-1.json", "client-2.json", "server.json"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    server, allowed = load_keys_dir(d)
    client = json.loads((d / "client-1.json").read_text())
    assert client["server"] == server.public and client["public"] in allowed and len(client["secret"]) == 40
    again = cli("keys", "generate", str(d))
    assert again.exit_code == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    (d / "client-2.json").chmod(0o644)
    with pytest.raises(ZsgdError, match="readable by other users; run 'chmod 600"):
        load_keys_dir(d)


def test_keys_line_from_stdin():
    r, w = os.pipe()
    kp = KeyPair.generate()
    os.write(w, json.dumps({"server": kp.public, "public": kp.public, "secret": kp.secret}).encode() + b"\nstays unread")
    creds = read_keys_line(r, timeout=2)
    assert creds.curve["secret"] == kp.secret.encode() and creds.token is None
    assert os.read(r, 100) == b"stays unread"  # nothing past the line was consumed (the stdin watchdog reads the rest)
    token = "ab" * 32  # a run without CURVE hands over its secret instead
    os.write(w, json.dumps({"token": token}).encode() + b"\n")
    creds = read_keys_line(r, timeout=2)
    assert creds.token == token and creds.curve is None
    os.write(w, b'{"token": "not-hex"}\n')
    with pytest.raises(ZsgdError, match="not a run secret"):
        read_keys_line(r, timeout=2)
    os.write(w, b'{"server": "short"}\n')
    with pytest.raises(ZsgdError, match="Z85|'public'"):
        read_keys_line(r, timeout=2)
    with pytest.raises(ZsgdError, match="no keys arrived"):
        read_keys_line(r, timeout=0.2)
    os.close(w)
    os.close(r)


def test_worker_with_bad_keys_is_a_one_line_error(tmp_path):
    # --keys-stdin reads the process's own file descriptor 0: this one needs a real process.
    proc = run_zsgd("worker", "--connect", "tcp://127.0.0.1:9", "--keys-stdin", input="not json\n", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--keys-stdin" in proc.stderr
    loose = tmp_path / "k.json"
    loose.write_text("{}")
    loose.chmod(0o644)
    r = cli("worker", "--connect", "tcp://127.0.0.1:9", "--keys-file", str(loose))
    assert r.exit_code == 2 and "chmod 600" in r.stderr


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")


def test_a_plain_text_client_that_hangs_up_is_a_refused_client_not_a_dropped_connection(tmp_path):
    """A client without CURVE that sends its greeting and leaves at once fails the handshake without detail:
    it counts in refused_clients (it was counted as a dropped connection of the run). Only the reach tests that
    zsgd itself makes (announced with expect_probes) are not refusals."""
    import socket
    import time

    from zsgd.wire.security import CurveGuard

    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    keys = KeyPair.generate()
    server.curve_server, server.curve_secretkey, server.curve_publickey = True, keys.secret.encode(), keys.public.encode()
    guard = CurveGuard(ctx, {}, tmp_path / "security.log")
    guard.attach(server)
    port = server.bind_to_random_port("tcp://127.0.0.1")

    def settled(refused: int, failed: int) -> None:
        deadline = time.monotonic() + 10
        while (guard.refused, guard.handshakes_failed) != (refused, failed) or guard.disconnects < failed:
            assert time.monotonic() < deadline, (guard.refused, guard.handshakes_failed, guard.disconnects)
            server.poll(20)
    try:
        guard.expect_probes(1)
        socket.create_connection(("127.0.0.1", port)).close()  # zsgd's own reach test
        settled(0, 1)
        for _ in range(3):
            plain = ctx.socket(zmq.DEALER)
            plain.linger = 0
            plain.connect(f"tcp://127.0.0.1:{port}")
            plain.send_multipart(protocol.encode(protocol.hello("-", 0, stage="join", role="worker")))
            plain.close()
        socket.create_connection(("127.0.0.1", port)).close()  # a scanner: no reach test is expected any more
        settled(4, 5)
        assert guard.dropped == 0
    finally:
        guard.stop()
        server.close()
        ctx.term()
    assert "refused a client" in (tmp_path / "security.log").read_text()


def _rogue(ctx: zmq.Context, address: str, kind: str, server_public: str) -> zmq.Socket:
    """A client that tries to join and inject: no keys, unknown keys, or the wrong server key.

    Each one claims worker 0's routing identity (a replayed identity): were it
    admitted, ROUTER_HANDOVER would hand it worker 0's route."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.ROUTING_ID, protocol.worker_identity("", 0))
    if kind != "none":
        mine = KeyPair.generate()
        sock.curve_secretkey, sock.curve_publickey = mine.secret.encode(), mine.public.encode()
        sock.curve_serverkey = (server_public if kind == "unknown-key" else KeyPair.generate().public).encode()
    sock.connect(address)
    hello = Message(MsgType.HELLO, "-", 0, 0, {}, meta={"stage": "join", "role": "worker", "host": "rogue", "pid": 1})
    sock.send_multipart(protocol.encode(hello))
    grad = np.full(7850, 1e3, np.float32)
    sock.send_multipart(protocol.encode(protocol.update_message("x", 0, 0, grad, 32, 0.0)))
    return sock


@pytest.mark.slow
def test_rogue_clients_get_nothing_and_change_nothing(tmp_path, no_orphans):
    keys = tmp_path / "keys"
    generate_keys_dir(keys, 0)
    server, _ = load_keys_dir(keys)
    out = tmp_path / "run"
    proc = start_zsgd("run", "--n-proc", "2", "--keys", str(keys), "--algo", "sync", "--steps", "400", "--out", str(out), *FAST, session=False)
    ctx = zmq.Context()
    rogues = []
    try:
        wait_for_updates(out, 10)
        address = broker_address(out)
        rogues = [_rogue(ctx, address, kind, server.public) for kind in ("none", "unknown-key", "wrong-server-key")]
        poller = zmq.Poller()
        for r in rogues:
            poller.register(r, zmq.POLLIN)

        def nothing_reached_a_rogue_and_then(done):
            assert not poller.poll(50), "a rogue client received a message"
            return done()

        # Watch the rogues until the broker has refused all three, then on to the end of the run.
        refused = lambda: (out / "security.log").exists() and (out / "security.log").read_text().count("refused a client") >= 3  # noqa: E731
        wait_for(lambda: nothing_reached_a_rogue_and_then(refused), 60, interval=0, what="the broker to refuse the three rogues")
        wait_for(lambda: nothing_reached_a_rogue_and_then(lambda: proc.poll() is not None), 120, interval=0, what="the run to end")
        _, err = proc.communicate(timeout=30)
    finally:
        for r in rogues:
            r.close()
        ctx.term()
        stop(proc)
    assert proc.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["updates"] >= 400 and s["test_accuracy"] > 0.7, s
    assert s["rejected_messages"] == 0  # nothing the rogues sent ever reached the broker's message handling
    assert s["refused_clients"] >= 3, s
    assert s["worker_deaths"] == 0 and all(w["incarnations"] == 1 for w in s["workers"].values())  # no route taken over
    log = (out / "security.log").read_text()
    assert "denied CURVE client" in log and "refused a client" in log


@pytest.mark.slow
def test_hand_started_worker_joins_with_a_key_file(tmp_path, no_orphans):
    """'zsgd broker --keys DIR' admits a worker started by hand with one of DIR's client files."""
    keys = tmp_path / "keys"
    assert cli("keys", "generate", str(keys), "--clients", "1").exit_code == 0
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "1", "--keys", str(keys), "--steps", "100", "--out", str(out), *FAST)
    worker = None
    try:
        address = broker_address(out)
        worker = run_zsgd("worker", "--connect", address, "--keys-file", str(keys / "client-1.json"), "--heartbeat", "0.2", "--timeout", "1.5",
                          timeout=120)
        _, err = broker.communicate(timeout=60)
    finally:
        stop(broker)
    assert worker.returncode == 0, worker.stderr
    assert broker.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["updates"] >= 100 and s["refused_clients"] == 0


@pytest.mark.slow
def test_a_valid_key_cannot_speak_for_another_worker(tmp_path, no_orphans):
    """An insider with worker 1's valid key takes over worker 0's routing identity: nothing it sends counts."""
    keys = tmp_path / "keys"
    assert cli("keys", "generate", str(keys), "--clients", "2").exit_code == 0
    out = tmp_path / "run"
    broker = start_zsgd("broker", "--workers", "2", "--keys", str(keys), "--algo", "async", "--steps", "1500", "--checkpoint-every", "50",
                        "--out", str(out), *FAST)
    workers, ctx = [], zmq.Context()
    try:
        address = broker_address(out)
        for i in (0, 1):
            workers.append(start_worker(address, "--id", str(i), "--keys-file", str(keys / f"client-{i + 1}.json"), "--heartbeat", "0.2",
                                        "--timeout", "1.5", "--quiet"))
        run_id = wait_for(lambda: (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["run"], 60, what="checkpoint")
        stolen = json.loads((keys / "client-2.json").read_text())
        insider = ctx.socket(zmq.DEALER)
        insider.linger = 0
        insider.setsockopt(zmq.ROUTING_ID, protocol.worker_identity("", 0))
        insider.curve_secretkey, insider.curve_publickey = stolen["secret"].encode(), stolen["public"].encode()
        insider.curve_serverkey = stolen["server"].encode()
        insider.connect(address)  # the DEALER queues what follows until its CURVE handshake is done
        protocol.send(insider, Message(MsgType.HELLO, "-", 0, 0, {}, meta={"stage": "join", "role": "worker"}))
        for _ in range(3):
            protocol.send(insider, protocol.update_message(run_id, 0, 0, np.full(7850, 1e3, np.float32), 32, 0.0))
        # Hold the connection open until the broker has turned down all four messages.
        refused = lambda: [e for e in read_events(out) if e["event"] == "rejected" and e["reason"] in ("wrong-key", "key-in-use")]  # noqa: E731
        wait_for(lambda: len(refused()) >= 4, 60, what="the insider's four messages to be rejected")
        insider.close()
        _, err = broker.communicate(timeout=120)
    finally:
        ctx.destroy(linger=0)
        stop(broker, group=True)
        reap(*workers)
    assert broker.returncode == 0, err[-2000:]
    s = summary_of(out)
    assert s["rejected_by_reason"].get("wrong-key", 0) + s["rejected_by_reason"].get("key-in-use", 0) >= 4, s["rejected_by_reason"]
    assert s["updates"] >= 1500 and s["test_accuracy"] > 0.6
