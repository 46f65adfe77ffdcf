"""Bad input, as a probe found it (issue 12, item 4): one line on stderr, a non-zero exit, no traceback.

Each case runs in-process through click's runner against ``zsgd.cli.main``
(the ZsgdGroup turns a ZsgdError into ``zsgd: error: ...`` and exit 2), and
is refused before anything starts: no worker process, nothing half-written.
The few that need a real process (a worker's signals, a real run to resume,
an SSH probe) are marked slow and wait on conditions with deadlines.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import cli, lines_of, refused, run_zsgd, wait_for, zsgd_cmd
from zsgd.errors import ZsgdError

SMALL = ("--model", "logreg", "--data", "embedded", "--quiet")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, fresh_home):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


# -- zsgd worker: endpoints and intervals --------------------------------------------------
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:notaport", "tcp://127.0.0.1:", "tcp://127.0.0.1:-1", "ipc://",
                                      "tcp://:5555", "tcp://127.0.0.1:70000", "udp://127.0.0.1:5555", "tcp://*:5555",
                                      "tcp://127.0.0.1:5555 "])
def test_worker_bad_endpoint(endpoint):
    refused("worker", "--connect", endpoint, match=r"--connect .*(tcp://HOST:PORT|ipc://)", seconds=5)


@pytest.mark.parametrize("flags,match", [
    (("--heartbeat", "nan"), r"--heartbeat must be a positive number of seconds, got nan"),
    (("--timeout", "inf"), r"--timeout must be a positive number of seconds, got inf"),
    (("--timeout", "nan"), r"--timeout must be a positive number"),
    (("--heartbeat", "2", "--timeout", "1"), r"--timeout \(1 s\) must be longer than --heartbeat \(2 s\)"),
    (("--join-timeout", "nan"), r"--join-timeout must be a number of seconds > 0"),
])
def test_worker_bad_intervals(flags, match):
    refused("worker", "--connect", "tcp://127.0.0.1:5555", *flags, match=match, seconds=5)


def test_link_thread_death_ends_the_worker():
    """An address ZeroMQ refuses inside the link thread (past the up-front check) is an error on the compute side, not a hang."""
    import zmq

    from zsgd.wire.link import BrokerLink
    from zsgd.wire.protocol import Message, MsgType

    ctx = zmq.Context()
    link = BrokerLink(ctx, "tcp://127.0.0.1:notaport", b"w", run="-", worker=-1, heartbeat=0.2, timeout=1.0).open()
    t0 = time.monotonic()
    try:
        with pytest.raises(ZsgdError, match=r"connection to tcp://127.0.0.1:notaport failed: Invalid argument"):
            link.send(Message(MsgType.HELLO, "-", -1, 0, {}, meta={}))
            while time.monotonic() - t0 < 10:
                link.recv(timeout=0.2)
        assert time.monotonic() - t0 < 5
    finally:
        link.close()
        ctx.term()


def _comm(task: Path) -> str:
    try:
        return (task / "comm").read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_waiting_worker_ends_on_sigterm(tmp_path, no_orphans):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens: the worker waits to join
    proc = subprocess.Popen(zsgd_cmd("worker", "--connect", f"tcp://127.0.0.1:{port}", "--join-timeout", "120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        # ZeroMQ's I/O thread exists once run_node has its SIGTERM handler and context
        wait_for(lambda: proc.poll() is not None or any(_comm(t).startswith("ZMQbg") for t in Path(f"/proc/{proc.pid}/task").glob("*")),
                 60, what="worker's ZeroMQ context")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


# -- YAML: alias bombs, types, duplicates, encodings ---------------------------------------------
def _bomb(levels: int = 9) -> str:
    """A "billion laughs": a few hundred bytes that expand to 9**levels strings."""
    text = "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]\n"
    return "{" + text.strip().replace("\n", ", ") + "}"


def test_alias_bomb_in_experiment_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"arms: [{{name: a}}]\ndescription: {_bomb()}\n")
    assert path.stat().st_size < 600
    refused("experiment", path, match=r"bomb.yaml:2: YAML aliases \(\*x0\) are not accepted", seconds=5)


@pytest.mark.parametrize("key", ["name", "lr"])
def test_alias_bomb_in_config_file(tmp_path, key):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"model: logreg\n{key}: {_bomb()}\n")
    refused("train", "--config", path, *SMALL, match=r"bomb.yaml:2: YAML aliases", seconds=5)
    assert not (tmp_path / "runs").exists()


def test_alias_in_merge_key_refused(tmp_path):
    (tmp_path / "m.yaml").write_text("defaults: &d {workers: 2}\narms:\n  - {<<: *d, name: a}\n")
    refused("experiment", tmp_path / "m.yaml", match=r"m.yaml:3: YAML aliases \(\*d\)")


@pytest.mark.parametrize("text,match", [
    ("name: [[a, b], [c]]\n", r"c.yaml:1: name must be a non-empty string, got list"),
    ("model: {a: 1}\n", r"c.yaml:1: model must be a non-empty string, got dict"),
    ("data: [embedded]\n", r"c.yaml:1: data must be a non-empty string, got list"),
    ("lr: 0.1\nlr: 0.2\n", r"c.yaml:2: duplicate key 'lr' \(first on line 1\)"),
    ("lr: 0.1\nmomentum: fast\n", r"c.yaml:2: momentum must be a number, got 'fast'"),
    ("batch_size: 3.5\n", r"c.yaml:1: batch_size must be a positive integer, got 3.5"),
    ("seed: -1\n", r"c.yaml:1: seed must be a whole number in 0\.\.4294967295, got -1"),
    ("grayscale: maybe\n", r"c.yaml:1: grayscale must be true or false"),
    ("steps: [1, 2]\n", r"c.yaml:1: steps must be a positive integer, got list"),
    ("lrr: 0.1\n", r"c.yaml:1: unknown key 'lrr'; did you mean 'lr'\?"),
    ("time: 5\ntime_limit: 3\n", r"c.yaml:2: 'time_limit' repeats an option"),
    ("- lr\n", r"c.yaml:1: expected a mapping of option: value, got list"),
    ("lr: [0.1\n", r"c.yaml:2: invalid YAML"),
    ("split: foo\n", r"c.yaml:1: split: invalid split 'foo'"),
])
def test_config_file_checked_with_line(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    refused("train", "--config", tmp_path / "c.yaml", "--steps", "5", "--out", tmp_path / "out", match=match)
    assert not (tmp_path / "out").exists()


def test_config_file_not_utf8(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"name: \xff\xfe\n")
    refused("train", "--config", tmp_path / "c.yaml", match=r"c.yaml: not a text file \(UTF-8 YAML expected")


def test_config_file_too_large(tmp_path):
    (tmp_path / "c.yaml").write_text("name: " + "x" * (5 << 20) + "\n")
    refused("train", "--config", tmp_path / "c.yaml", match=r"too large for a config file")


def test_config_file_nested_too_deeply(tmp_path):
    (tmp_path / "c.yaml").write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    refused("train", "--config", tmp_path / "c.yaml", match=r"c.yaml: nested too deeply|c.yaml:1: name must be")


def test_experiment_fields_type_checked(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("description: [a, b]\narms: [{name: a}]\n")
    refused("experiment", path, match=r"e.yaml:1: description must be text, got list")
    path.write_text("name: [[a]]\narms: [{name: a}]\n")
    refused("experiment", path, match=r"e.yaml:1: name must be a string")
    path.write_text("problem: {model: logreg, data: embedded, seed: -1}\narms: [{name: a}]\n")
    refused("experiment", path, match=r"e.yaml:1: problem: seed: --seed must be a whole number in 0\.\.4294967295, got -1")
    path.write_text("problem:\n  model: {a: 1}\narms: [{name: a}]\n")
    refused("experiment", path, match=r"e.yaml:2: problem: model: --model must be a non-empty string, got dict")
    path.write_text("arms:\n  - {name: a, mode: run, timeout: .inf}\n")
    refused("experiment", path, match=r"--timeout must be a positive number of seconds, got inf")


# -- flags out of range ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "sim"])
def test_negative_seed(command, tmp_path):
    refused(command, "--seed", "-1", "--steps", "5", *(SMALL if command == "train" else SMALL[:4]), "--out", tmp_path / "o",
            match=r"--seed must be a whole number in 0\.\.4294967295, got -1")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,match", [
    (("--timeout", "nan"), r"--timeout must be a positive number of seconds, got nan"),
    (("--timeout", "inf"), r"--timeout must be a positive number of seconds, got inf"),
    (("--heartbeat", "nan"), r"--heartbeat must be a positive number of seconds, got nan"),
    (("--eval-interval", "nan"), r"--eval-interval must be a number of seconds >= 0 and at most 86,400 s, got nan"),
    (("--n-proc", "100000"), r"--n-proc 100,000 is more local workers than this machine can run \(at most \d+ for "),
    (("--algo", "foo"), r"unknown algorithm 'foo'; choose one of async, sync, ssp:S, localsgd:K, ksync:K, kasync:K, or decentralized dsgd, dsgt, cadmm"),
])
def test_run_flags_refused_before_anything_starts(tmp_path, flags, match):
    refused("run", *flags, "--steps", "5", *SMALL, "--out", tmp_path / "o", match=match)
    assert not (tmp_path / "o").exists()


def test_unknown_algo_lists_every_algorithm():
    from zsgd.decentralized.rules import DECENTRALIZED

    line = refused("run", "--algo", "nope", *SMALL, match="unknown algorithm")
    for name in ("async", "sync", "ssp", "localsgd", *DECENTRALIZED):
        assert name in line


@pytest.mark.parametrize("command", ["train", "run"])
def test_batch_size_larger_than_data_set(command, tmp_path):
    refused(command, "--batch-size", "100000000", "--steps", "5", *SMALL, "--out", tmp_path / "o",
            match=r"--batch-size 100,000,000 is larger than the training set \([\d,]+ samples of embedded\)")
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_batch_size_beyond_memory(tmp_path, monkeypatch):
    import zsgd.core.machine as machine

    monkeypatch.setattr(machine, "available_memory", lambda: 1 << 30)
    refused("train", "--model", "cnn", "--data", "embedded", "--batch-size", "9000", "--steps", "5", "--quiet", "--out", tmp_path / "o",
            match=r"--batch-size 9,000 needs about [\d.]+ GiB for one step of cnn, more than the 1.0 GiB available: choose at most [\d,]+")
    assert not (tmp_path / "o").exists()


def test_split_checked_by_train(tmp_path):
    refused("train", "--split", "foo", "--steps", "5", *SMALL, "--out", tmp_path / "o", match=r"invalid split 'foo'")
    refused("train", "--split", "classes:²", "--steps", "5", *SMALL, "--out", tmp_path / "o", match=r"invalid split 'classes:²'")


def test_empty_out_refused(tmp_path):
    refused("train", "--out", "", "--steps", "5", *SMALL, match=r"--out must name a directory, got an empty string")
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.jsonl").exists()


# -- --resume ---------------------------------------------------------------------------------------
@pytest.fixture
def run_at_200(tmp_path) -> Path:
    """A run directory as 'zsgd run --steps 200' leaves it, checkpoint at 200 updates (made without running)."""
    from zsgd.core.config import TrainConfig, write_config
    from zsgd.core.problem import Problem
    from zsgd.runtime.server.checkpoint import save_checkpoint
    from zsgd.runtime.run_options import RunOptions

    cfg = TrainConfig(model="logreg", data="embedded", steps=200, batch_size=32, name="r").validate()
    problem = Problem.from_config(cfg)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    write_config(run_dir / "config.yaml", cfg.to_dict() | {"mode": "run", "run": asdict(RunOptions.from_flags({"n_proc": 2, "show": False}))})
    w = problem.model.init(seed=0)
    save_checkpoint(run_dir, w, {"step": np.asarray(200), "momentum_buffer": np.zeros_like(w)},
                    {"updates": 200, "samples": 6400, "elapsed": 5.0, "algo": "async", "run": "abc"})
    (run_dir / "metrics.jsonl").write_text('{"event":"start","t":0}\n{"event":"train","t":1,"updates":20,"loss":2.0}\n')
    return run_dir


def _damage(run_dir: Path, how: str) -> None:
    npz = run_dir / "checkpoint.npz"
    if how == "truncated":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    elif how == "bit-flipped":  # inside the weights' bytes (a flip in a zip header's date field would be harmless)
        data = bytearray(npz.read_bytes())
        data[len(data) // 4] ^= 0x10
        npz.write_bytes(bytes(data))
    elif how == "empty":
        npz.write_bytes(b"")
    elif how == "checkpoint.json":
        (run_dir / "checkpoint.json").write_text('{"updates": 20')
    elif how == "counters":
        (run_dir / "checkpoint.json").write_text('{"updates": "many", "samples": 1}')
    elif how == "config.yaml":
        (run_dir / "config.yaml").write_text("model: [logreg\n")
    elif how == "config-types":
        stored = yaml.safe_load((run_dir / "config.yaml").read_text())
        (run_dir / "config.yaml").write_text(yaml.safe_dump(stored | {"batch_size": "big"}))


@pytest.mark.parametrize("how,match", [
    ("truncated", r"cannot read .*checkpoint.npz: .*\(the file is damaged\)"),
    ("bit-flipped", r"cannot read .*checkpoint.npz: Bad CRC-32 for file 'w.npy' \(the file is damaged\)"),
    ("empty", r"cannot read .*checkpoint.npz: the file is empty"),
    ("checkpoint.json", r"cannot read .*checkpoint.json: "),
    ("counters", r"checkpoint.json: 'updates' must be a whole number >= 0"),
    ("config.yaml", r"config.yaml:2: invalid YAML"),
    ("config-types", r"config.yaml: --batch-size must be a positive integer, got 'big'"),
])
def test_resume_damaged_run_dir(run_at_200, how, match):
    _damage(run_at_200, how)
    refused("run", "--resume", run_at_200, "--steps", "300", "--quiet", match=match)
    assert "resumed" not in (run_at_200 / "metrics.jsonl").read_text()


@pytest.mark.parametrize("flags,match", [
    (("--model", "mlp"), r"--resume continues the run as it was configured: --model mlp differs from its logreg"),
    (("--algo", "sync"), r"--algo sync differs from its async"),
    (("--lr", "0.5"), r"--lr 0.5 differs from its 0.05"),
    (("--compress", "topk:0.1"), r"--compress topk:0.1 differs from its none"),
])
def test_resume_refuses_changed_configuration(run_at_200, flags, match):
    refused("run", "--resume", run_at_200, "--steps", "300", *flags, "--quiet", match=match)


# config.yaml's run: as zsgd wrote it before the options were grouped (one flat mapping)
FLAT_RUN_OPTIONS = {"n_proc": 3, "algo": "sync", "host": None, "port": 0, "heartbeat": 1.0, "timeout": 3.0, "staleness_lr": "off",
                    "compress": "topk:0.1", "compress_replies": "none", "checkpoint_every": 500, "eval_interval": 0.0, "evaluator": True,
                    "tensorboard": False, "expect_workers": None, "inject_latency": None, "inject_bandwidth": None, "inject_loss": None,
                    "stragglers": None, "remote": None, "advertise": None, "allow_partial": False, "ssh": {"config": None, "options": []},
                    "secure": False, "keys_dir": None, "remote_workers": 0, "launcher": "local", "slurm_request": None,
                    "slurm_workers": 0, "auto_scale": ["lr"], "topology": None, "alpha0": None, "mu": None, "rho": None,
                    "rho_scaling": None, "primal_steps": None, "gamma": None}


def test_resume_reads_the_flat_run_options_of_earlier_versions(run_at_200):
    from zsgd.runtime.run_options import RunOptions, flat_run_dict

    stored = yaml.safe_load((run_at_200 / "config.yaml").read_text())
    (run_at_200 / "config.yaml").write_text(yaml.safe_dump(stored | {"run": FLAT_RUN_OPTIONS}))
    refused("run", "--resume", run_at_200, "--steps", "300", "--algo", "async", "--quiet", match=r"--algo async differs from its sync")
    refused("run", "--resume", run_at_200, "--steps", "300", "--compress", "none", "--quiet", match=r"--compress none differs from its topk:0.1")
    nested = RunOptions.from_flags({"n_proc": 3, "algo": "sync", "compress": "topk:0.1", "auto_scale": ["lr"]}).to_dict()
    for key in ("n_proc", "algo", "compress", "compress_replies", "staleness_lr", "auto_scale"):
        assert flat_run_dict(FLAT_RUN_OPTIONS)[key] == flat_run_dict(nested)[key]


def test_run_options_place_each_flag_in_its_group():
    from zsgd.runtime.run_options import RunOptions

    opts = RunOptions.from_flags({"algo": "sync", "port": 5555, "inject_latency": "5ms", "keys_dir": "k", "rho": 0.2, "tensorboard": True})
    assert (opts.server.algo, opts.network.port, opts.emulation.inject_latency, opts.remote.keys_dir, opts.decentralized.rho,
            opts.output.tensorboard) == ("sync", 5555, "5ms", "k", 0.2, True)
    with pytest.raises(TypeError, match="not run options: nope"):
        RunOptions.from_flags({"nope": 1})


def test_resume_refuses_a_stop_rule_already_reached(run_at_200):
    refused("run", "--resume", run_at_200, "--steps", "100", "--quiet",
            match=r"--steps 100: .* is already at 200 updates; give --steps above 200 to continue it")
    refused("run", "--resume", run_at_200, "--quiet", match=r"already reached its --steps 200 \(200 updates\)")
    refused("run", "--resume", run_at_200, "--steps", "300", "--time", "1", "--quiet", match=r"--time 1: .* has already run 5 s")
    summary_before = (run_at_200 / "summary.json").exists()
    assert not summary_before


def test_resume_refuses_config_file(run_at_200, tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    refused("run", "--resume", run_at_200, "--steps", "300", "--config", tmp_path / "c.yaml", match=r"--config does not apply with --resume")


def test_resume_of_a_train_dir(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.yaml").write_text("model: logreg\nmode: train\n")
    refused("run", "--resume", tmp_path / "t", match=r"was not made by 'zsgd run'")


@pytest.mark.slow
def test_resume_keeps_and_records_n_proc(tmp_path, no_orphans):
    out = tmp_path / "run"
    common = ("--heartbeat", "0.2", "--timeout", "1.5", "--quiet", "--no-plots")
    run_zsgd("run", "--n-proc", "2", "--steps", "60", "--checkpoint-every", "20", *SMALL, "--out", str(out), *common, check=True)
    run_zsgd("run", "--resume", str(out), "--steps", "90", "--n-proc", "1", *common, check=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["n_proc"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 90
    run_zsgd("run", "--resume", str(out), "--steps", "120", *common, check=True)
    starts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert [s["n_workers"] for s in starts] == [2, 1, 1]  # the stored --n-proc 1, not the default 2


# -- data and models --------------------------------------------------------------------------------
def _mnist_dir(tmp_path: Path, images_header: bytes) -> Path:
    d = tmp_path / "mnist"
    d.mkdir()
    labels = np.zeros(10, dtype=np.uint8)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images_header + bytes(100)))
    (d / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 10) + labels.tobytes())
    (d / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 10, 28, 28) + bytes(10 * 784))
    (d / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 10) + labels.tobytes())
    return d


def test_idx_header_claiming_huge_dims(tmp_path):
    d = _mnist_dir(tmp_path, struct.pack(">IIII", 0x803, 100_000_000, 28, 28))
    refused("train", "--data", "mnist", "--data-dir", d, "--model", "logreg", "--steps", "5", "--quiet",
            match=r"train-images-idx3-ubyte.gz is truncated: header promises 78400000000 data bytes, found 100", seconds=10)
    raw = tmp_path / "raw-images"
    raw.write_bytes(struct.pack(">IIII", 0x803, 100_000_000, 28, 28) + bytes(100))
    from zsgd.data.idx import read_idx

    with pytest.raises(ZsgdError, match="header promises 78400000000 data bytes, found 100"):
        read_idx(raw)


def test_imagefolder_one_image_per_class(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog", "eel"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 12), (10, 20, 30)).save(tmp_path / "imgs" / cls / "a.png")
    refused("train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "8", "--model", "logreg", "--steps", "5", "--quiet",
            "--out", tmp_path / "o", match=r"one readable image per class, which leaves none to test on")
    assert not (tmp_path / "o").exists()


USER_MODELS = '''
from zsgd.nn.models import get_model

def raises(input_shape, n_classes):
    raise RuntimeError("boom\\nsecond line")

not_callable = 42

class Wrap:
    def __init__(self, inner):
        self._m = inner
    def __getattr__(self, k):
        return getattr(self._m, k)

class WrongShape(Wrap):
    def predict(self, w, x):
        return self._m.predict(w, x)[:, :3]

class BadState(Wrap):
    def state_dict(self, w):
        return [w]

def wrong_shape(input_shape, n_classes):
    return WrongShape(get_model("logreg", input_shape, n_classes))

def bad_state(input_shape, n_classes):
    return BadState(get_model("logreg", input_shape, n_classes))

def not_a_model(input_shape, n_classes):
    return "model"
'''


@pytest.mark.parametrize("factory,match", [
    ("raises", r"model 'zsgd_bad_models:raises': the factory raised RuntimeError: boom second line"),
    ("not_callable", r"model factory 'zsgd_bad_models:not_callable' is a int, not a function"),
    ("wrong_shape", r"predict\(\) on 2 images must return an array of shape \(2, 10\) .* got array of shape \(2, 3\)"),
    ("bad_state", r"state_dict\(\) must return a dict of name -> numpy array, got list"),
    ("not_a_model", r"returned str, which lacks"),
    ("missing", r"cannot load model factory 'zsgd_bad_models:missing'"),
])
@pytest.mark.parametrize("command", ["train", "sim"])
def test_user_model_checked_before_training(tmp_path, monkeypatch, factory, match, command):
    (tmp_path / "zsgd_bad_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zsgd_bad_models", raising=False)
    extra = ("--quiet",) if command == "train" else ()
    refused(command, "--model", f"zsgd_bad_models:{factory}", "--data", "embedded", "--steps", "5", *extra, "--out", tmp_path / "o", match=match)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


# -- run directories ------------------------------------------------------------------------------
def test_failed_start_does_not_block_the_next_run(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        for _ in range(2):  # the second attempt gets the same error, not "already holds a run"
            refused("run", "--port", port, "--steps", "5", *SMALL, "--out", tmp_path / "o", match=r"cannot listen on .*the port is in use")
    finally:
        busy.close()
    assert not (tmp_path / "o" / "summary.json").exists()


def test_a_run_that_trained_is_still_protected(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("model: logreg\n")
    (out / "metrics.jsonl").write_text('{"event":"start","t":0}\n{"event":"train","t":1,"updates":20,"loss":2.0}\n')
    refused("train", "--steps", "5", *SMALL, "--out", out, match=r"already holds a run; choose another --out")
    assert "train" in (out / "metrics.jsonl").read_text()


def test_keys_generate_into_unwritable_place(tmp_path):
    (tmp_path / "a-file").write_text("")
    refused("keys", "generate", tmp_path / "a-file" / "keys", match=r"cannot write keys to .*a-file/keys: Not a directory")
    refused("keys", "generate", tmp_path / "k", "--clients", "100000000", match=r"--clients 100,000,000 is more than")
    assert not (tmp_path / "k").exists()


# -- hosts files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,match", [
    ("localhost slots=²", r"slots must be a whole number from 1 to \d+, got '²'"),
    ("localhost:²² ", r"port"),
])
def test_hosts_file_superscript_digits(tmp_path, line, match):
    (tmp_path / "hosts.txt").write_text(line + "\n")
    refused("run", "--remote", tmp_path / "hosts.txt", "--steps", "5", *SMALL, "--out", tmp_path / "o", match=match)


@pytest.mark.slow
def test_allow_partial_with_no_usable_host_runs_locally(tmp_path, no_orphans):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    (tmp_path / "hosts.txt").write_text(f"nobody@127.0.0.1:{port}\n")
    proc = run_zsgd("run", "--remote", str(tmp_path / "hosts.txt"), "--allow-partial", "--n-proc", "1", "--steps", "20", *SMALL, "--out", str(tmp_path / "o"), timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no host in" in proc.stderr and "going on with the 1 local worker" in proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["updates"] >= 20, summary["stop_reason"]
    proc = cli("run", "--remote", str(tmp_path / "hosts.txt"), "--allow-partial", "--steps", "20", *SMALL,
               "--out", str(tmp_path / "o2"))  # refused before anything starts: in-process
    assert proc.exit_code == 2 and "no other host" in proc.stderr  # no local worker: nothing to run


# -- zsgd plot --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,match", [
    # garbage, the same every run (os.urandom made one run in ~250 start with a newline: a corrupt line 2, not 1)
    (random.Random(20).randbytes(3000) + b"\n" + random.Random(21).randbytes(100),
     r"metrics.jsonl:\d+: not a metrics event \(corrupt line\)|nothing to plot"),
    (b'[1, 2]\n5\n{"event":"train","t":1,"updates":1,"loss":1}\n', r"metrics.jsonl:1: not a metrics event \(a JSON object expected, got list\)"),
    (b"", r"nothing to plot: the metrics.jsonl of .* holds no train or eval events"),
    (b'{"event":"train","t":NaN,"updates":1,"loss":NaN}\n{"event":"eval","t":"x","updates":1,"test_acc":Infinity}\n',
     r"nothing to plot"),
])
def test_plot_bad_metrics(tmp_path, content, match):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_bytes(content)
    refused("plot", tmp_path / "r", "--out", tmp_path / "p", match=match)
    assert not list((tmp_path / "p").glob("*.png")) if (tmp_path / "p").exists() else True


def test_plot_skips_non_numbers(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(
        '{"event":"train","t":NaN,"updates":1,"loss":NaN}\n{"event":"train","t":1,"updates":2,"loss":1.5}\n'
        '{"event":"eval","t":2,"updates":"x","test_acc":0.5}\n{"event":"train","t":3,"updates":4,"loss":true}\n')
    result = cli("plot", str(tmp_path / "r"), "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").glob("*.png"))) == 2


def test_worker_plot_with_absurd_staleness(tmp_path):
    from zsgd.output.plots import plot_workers

    (tmp_path / "metrics.jsonl").write_text('{"event":"update","t":1,"staleness":1e15,"worker":0}\n'
                                            '{"event":"update","t":2,"staleness":3,"worker":1}\n')
    assert len(plot_workers(tmp_path)) == 2  # bounded bins, not an array of 1e15


# -- issue 20: simulator, experiment and plot input ---------------------------------------------
EXPERIMENT_HEAD = "problem: {model: logreg, data: embedded, steps: 20}\narms:\n"


def test_trace_that_is_a_device_is_refused(tmp_path):
    refused("sim", "--latency", "trace:/dev/zero", *SMALL, match=r"trace '/dev/zero': not a regular file")
    refused("run", "--inject-latency", "trace:/dev/zero", *SMALL, match=r"trace '/dev/zero': not a regular file")
    (tmp_path / "e.yaml").write_text(EXPERIMENT_HEAD + "  - {name: a, latency: 'trace:/dev/zero'}\n")
    refused("experiment", tmp_path / "e.yaml", "--check", match=r"trace '/dev/zero': not a regular file")


def test_trace_larger_than_the_cap_is_refused(tmp_path):
    from zsgd.network import MAX_TRACE_BYTES, MAX_TRACE_ROWS

    with open(tmp_path / "huge.csv", "wb") as f:
        f.truncate(MAX_TRACE_BYTES + 1)  # sparse: costs no disk
    refused("sim", "--latency", f"trace:{tmp_path / 'huge.csv'}", *SMALL, match=r"larger than the 32 MiB a trace may be")
    (tmp_path / "rows.csv").write_text("1\n" * (MAX_TRACE_ROWS + 1))
    refused("sim", "--latency", f"trace:{tmp_path / 'rows.csv'}", *SMALL, match=r"more than the 1,000,000 samples a trace may hold")
    (tmp_path / "ok.csv").write_text("1\n" * MAX_TRACE_ROWS)
    from zsgd.network import parse_delay

    assert parse_delay(f"trace:{tmp_path / 'ok.csv'}").mean == pytest.approx(0.001)


@pytest.mark.parametrize("flags,match", [
    (("--failures", "0-99999999999@10s"), r"--failures item '0-99999999999@10s': worker 99999999999 does not exist \(at most 8 workers"),
    (("--latency-worker", "0-99999999999=50ms"), r"--latency-worker .*: worker 99999999999 does not exist \(at most 8 workers"),
    (("--failures", "9" * 5000 + "@1s"), r"worker 99999999\.\.\. \(5000 digits\) does not exist"),
    (("--workers", "4,16", "--latency-worker", "16=5ms"), r"worker 16 does not exist \(at most 16 workers"),
    (("--workers", "10000", "--algo", "dsgd", "--topology", "complete"),
     r"topology 'complete' on 10,000 nodes has 49,995,000 edges .* more than the 1,000,000"),
    (("--workers", "5000", "--algo", "dsgd", "--topology", "erdos-renyi:0.001"), r"more than the 1,000,000 a graph may have"),
])
def test_worker_ranges_and_graphs_bounded_before_allocation(flags, match):
    refused("sim", *flags, *SMALL, match=match, seconds=10)


def test_worker_range_bounded_in_experiment_and_dense_random_graph(tmp_path):
    (tmp_path / "e.yaml").write_text(EXPERIMENT_HEAD + "  - {name: a, workers: 4, failures: '0-99999999999@1s'}\n")
    refused("experiment", tmp_path / "e.yaml", "--check", match=r"worker 99999999999 does not exist \(at most 1,000,000 workers")
    (tmp_path / "e.yaml").write_text(EXPERIMENT_HEAD + "  - {name: a, workers: 4, failures: '0-9@1s'}\n")
    refused("experiment", tmp_path / "e.yaml", "--check", match=r"worker 9 does not exist \(at most 4 workers")
    from zsgd.decentralized.topology import parse_topology

    with pytest.raises(ZsgdError, match="more than the 1,000,000"):
        parse_topology("random-regular:1990", 2000)


def _metrics(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text(text)
    return path


GOOD_LINES = '{"event":"train","t":1,"updates":1,"loss":2.0}\n{"event":"train","t":2,"updates":2,"loss":1.0}\n'


def test_plot_number_too_long_for_python(tmp_path):
    """A 100,000-digit integer: json raises a ValueError that is no JSONDecodeError (Python's 4300-digit limit)."""
    run = _metrics(tmp_path / "r", '{"event":"train","t":1,"updates":1,"loss":' + "9" * 100_000 + "}\n" + GOOD_LINES)
    refused("plot", run, "--out", tmp_path / "p", match=r"metrics.jsonl:1: not a metrics event \(corrupt line\)")
    big = "9" * 400  # parses, but has no float
    _metrics(run, GOOD_LINES + f'{{"event":"train","t":3,"updates":3,"loss":{big}}}\n{{"event":"update","t":1,"staleness":{big},"worker":{big}}}\n'
             '{"event":"update","t":1,"staleness":1,"worker":0}\n')
    result = cli("plot", str(run), "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["curves_vs_time.png", "curves_vs_updates.png",
                                                                        "staleness_hist.png", "worker_throughput.png"]


def test_plot_line_and_file_sizes_bounded(tmp_path):
    from zsgd.output.metrics import MAX_LINE_BYTES
    from zsgd.output.plots import MAX_METRICS_BYTES

    run = _metrics(tmp_path / "r", '{"event":"train","t":1,"updates":1,"loss":1,"pad":"' + "x" * MAX_LINE_BYTES + '"}\n' + GOOD_LINES)
    refused("plot", run, "--out", tmp_path / "p", match=r"metrics.jsonl:1: not a metrics event \(a line longer than 1 MiB\)")
    with open(run / "metrics.jsonl", "r+b") as f:
        f.truncate(MAX_METRICS_BYTES + 1)  # sparse: costs no disk
    refused("plot", run, "--out", tmp_path / "p", match=r"metrics.jsonl is 2.0 GiB, more than the 2 GiB zsgd plot reads")


def test_plot_of_a_sweep_draws_every_arm(tmp_path):
    sweep = tmp_path / "sweep"
    for arm in ("00-lat0", "01-lat10ms"):
        _metrics(sweep / arm, GOOD_LINES)
    (sweep / "sweep.yaml").write_text("mode: sim-sweep\n")
    result = cli("plot", str(sweep), "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["curves_vs_time.png", "curves_vs_updates.png"]
    from zsgd.output.plots import run_dirs_of

    assert [d.name for d in run_dirs_of(sweep)] == ["00-lat0", "01-lat10ms"]
    (tmp_path / "empty").mkdir()
    refused("plot", tmp_path / "empty", match=r"empty is not a run directory \(no metrics.jsonl\), nor a sweep or experiment directory")


FAST_SIM = ("--compute", "1ms", "--broker-time", "0", "--broker-bandwidth", "inf")  # nothing timed on this machine


def test_sim_table_follows_target_acc(tmp_path):
    """--target-acc 0.5 stops the arm at 50 %: the table's target is 50 % too, not --target's 75 %."""
    result = cli("sim", *SMALL, *FAST_SIM, "--target-acc", "0.5", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "target accuracy 50%" in (tmp_path / "s" / "results.md").read_text()
    row = next(iter(__import__("csv").DictReader(open(tmp_path / "s" / "results.csv"))))
    assert row["time_to_target_s"] != "" and row["stop_reason"].startswith("reached the target accuracy"), row
    (tmp_path / "e.yaml").write_text("problem: {model: logreg, data: embedded, steps: 20, target_acc: 0.6}\narms:\n  - {name: a}\n")
    from zsgd.experiments.config import load_experiment

    assert load_experiment(tmp_path / "e.yaml").target == 0.6


def test_config_file_sets_every_flag_of_its_command(tmp_path):
    (tmp_path / "c.yaml").write_text("workers: 4\nlatency: [0, 10ms]\ncompute: 1ms\nbroker_time: 0\nbroker-bandwidth: inf\n"
                                     "latency_worker: ['0=5ms']\ntarget: 0.5\nquiet: true\n")
    result = cli("sim", "--config", str(tmp_path / "c.yaml"), "--model", "logreg", "--data", "embedded", "--steps", "5",
                 "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    arms = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert arms == ["00-lat0ms", "01-lat10ms"]
    cfg = yaml.safe_load((tmp_path / "s" / arms[1] / "config.yaml").read_text())
    assert cfg["sim"]["n_workers"] == 4 and cfg["sim"]["latency_worker"] == {"0": "5ms"}, cfg["sim"]
    result = cli("sim", "--config", str(tmp_path / "c.yaml"), "--workers", "2", "--latency", "0", *SMALL, "--steps", "5",
                 "--out", str(tmp_path / "s2"))  # flags win over the file
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "s2" / "00-async" / "config.yaml").read_text())["sim"]["n_workers"] == 2
    (tmp_path / "r.yaml").write_text("n-proc: 100000\n")  # zsgd run's own options too (refused as a flag would be)
    refused("run", "--config", tmp_path / "r.yaml", *SMALL, match=r"--n-proc 100,000 is more local workers")


@pytest.mark.parametrize("text,match", [
    ("n_proc: 3.5\n", r"r.yaml:1: n_proc must be a whole number, got float 3.5"),
    ("quiet: 1\n", r"r.yaml:1: quiet must be true or false"),
    ("launcher: foo\n", r"r.yaml:1: launcher: 'foo' is not one of 'local', 'ssh', 'slurm'"),
    ("algo: {a: 1}\n", r"r.yaml:1: algo must be a single value"),
    ("n_proc: 2\nn-proc: 3\n", r"r.yaml:2: 'n-proc' repeats an option given above"),
    ("inject_latncy: 5ms\n", r"r.yaml:1: unknown key 'inject_latncy'; did you mean 'inject_latency'\?"),
])
def test_config_file_command_options_checked_with_line(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    refused("run", "--config", tmp_path / "r.yaml", *SMALL, match=match)


@pytest.mark.parametrize("flags,match", [
    (("--latency", "10,10,10ms"), r"bad --latency '10,10,10ms': 10ms is given twice; each value of a comma list makes one arm"),
    (("--workers", "1,1"), r"bad --workers '1,1': 1 is given twice"),
    (("--latency", "10ms,0.01s"), r"0.01s is given twice \(10ms and 0.01s are the same\)"),
    (("--failures", "1@1s;1@1s"), r"bad --failures '1@1s;1@1s': 1@1s is given twice"),
    (("--model", "lstm:embed=64,embed=32", "--data", "text"), r"lstm embed is given twice in 'lstm:embed=64,embed=32'"),
])
def test_duplicate_values_and_keys_refused(flags, match):
    refused("sim", *SMALL, *flags, match=match, seconds=10)


def _train_events(arm: Path) -> bool:
    try:
        return b'"event":"train"' in (arm / "metrics.jsonl").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("command,sig", [("sim-j1", signal.SIGINT), ("sim-j2", signal.SIGTERM), ("experiment", signal.SIGINT)])
def test_interrupted_sim_and_experiment_leave_summaries(tmp_path, no_orphans, command, sig):
    """Ctrl-C (to the terminal's whole process group) or SIGTERM while arms run: each started arm ends with
    summary.json marked interrupted, no further arm starts, and the command exits 130 with one line."""
    from helpers import start_zsgd, stop

    out = tmp_path / "o"
    long = ("--steps", "100000000")
    if command == "experiment":
        (tmp_path / "e.yaml").write_text("problem: {model: logreg, data: embedded, steps: 100000000}\n"
                                         "defaults: {compute: 1ms, broker_time: 0, broker_bandwidth: inf}\n"
                                         "arms:\n  - {name: a}\n  - {name: b, latency: 10ms}\n  - {name: c, latency: 20ms}\n")
        proc = start_zsgd("experiment", str(tmp_path / "e.yaml"), "-q", "-j", "2", "--out", str(out))
        started = ["00-a", "01-b"]
    else:
        jobs = command[-1]
        proc = start_zsgd("sim", *SMALL, *FAST_SIM, *long, "--latency", "0,10ms,20ms", "-j", jobs, "--out", str(out))
        started = ["00-lat0ms", "01-lat10ms"][:int(jobs)]
    try:
        wait_for(lambda: all(_train_events(out / a) for a in started), 90, what=f"arms {started} training")
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc, group=True)
    assert proc.returncode == 130, err
    assert lines_of(err) == ["zsgd: interrupted"], err  # --quiet: nothing else
    for arm in started:
        summary = json.loads((out / arm / "summary.json").read_text())
        assert summary["stop_reason"] == "interrupted" and 0 < summary["updates"] < 100000000, summary
    assert not any((out / d).exists() for d in ("02-lat20ms", "02-c")), "an arm started after the interrupt"


def test_plan_size_checked_before_anything_is_written(tmp_path):
    many = ",".join(f"{i}ms" for i in range(1, 101))
    refused("sim", *SMALL, "--latency", many, "--workers", ",".join(str(i) for i in range(1, 21)), "--out", tmp_path / "s",
            match=r"--workers x --latency makes 2,000 arms, more than the 1,000 one sweep or experiment may run", seconds=10)
    refused("sim", *SMALL, *FAST_SIM, "--steps", str(10**23), "--out", tmp_path / "s",
            match=r"the arms would write about 10\^25 bytes \(about 10\^23 updates in all.* more than the .* free on the disk of")
    assert not (tmp_path / "s").exists()
    (tmp_path / "e.yaml").write_text(EXPERIMENT_HEAD + "".join(f"  - {{name: a{i}}}\n" for i in range(2_000)))
    refused("experiment", tmp_path / "e.yaml", "--check", match=r"e.yaml:2: the file's arms: list makes 2,000 arms, more than the 1,000")
    (tmp_path / "e.yaml").write_text(f"problem: {{model: logreg, data: embedded, steps: {10**23}}}\narms:\n  - {{name: a}}\n")
    refused("experiment", tmp_path / "e.yaml", "--out", tmp_path / "x", match=r"the arms would write about 10\^25 bytes")
    assert not (tmp_path / "x").exists()


def test_decentralized_nodes_checked_against_available_memory(tmp_path, monkeypatch):
    """Each simulated dsgd node holds its own model: 2,000 mlp nodes are ~6.6 GB, refused on a machine
    with 1 GiB available (as --n-proc is capped by memory), before any node is built."""
    monkeypatch.setattr("zsgd.core.machine.available_memory", lambda: 1 << 30)
    refused("sim", "--model", "mlp", "--data", "embedded", "-q", "--workers", "2000", "--algo", "dsgd", "--out", tmp_path / "s",
            match=r"--workers 2,000 with dsgd simulates 2,000 nodes, each with its own model of 235,146 parameters "
                  r"\(about 6.6 GB, 3.5 model copies a node\), more than the 1.1 GB of memory available")
    assert not (tmp_path / "s").exists()
    (tmp_path / "e.yaml").write_text("problem: {model: mlp, data: embedded, steps: 2}\narms:\n  - {name: d, algo: dsgt, workers: 2000}\n")
    refused("experiment", tmp_path / "e.yaml", "--out", tmp_path / "x", match=r"e.yaml:3: arm 'd': --workers 2,000 with dsgt")


@pytest.mark.parametrize("text,match", [
    ("n_proc: " + "9" * 5000 + "\n", r"c.yaml: invalid value in the config file \(a number of more than 4300 digits\)"),
    ("name: 2024-13-45\n", r"c.yaml: invalid value in the config file \(month must be in 1..12\)"),
])
def test_yaml_values_python_cannot_build(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    refused("run", "--config", tmp_path / "c.yaml", *SMALL, match=match)
    (tmp_path / "e.yaml").write_text(EXPERIMENT_HEAD + "  - {name: a, workers: " + text.partition(": ")[2].strip() + "}\n")
    refused("experiment", tmp_path / "e.yaml", "--check", match=r"e.yaml: invalid value in the experiment file")


# -- an error names a huge value; it never repeats it whole -----------------------------------------------------------------
@pytest.mark.parametrize("args", [("sim", "--algo", "ssp:" + "x" * 100_000, "--steps", "5"),
                                  ("sim", "--steps", "9" * 5_000),
                                  ("sim", "--algo", "dsgd", "--topology", "x" * 100_000, "--steps", "5")])
def test_an_error_about_a_huge_value_stays_a_short_line(args, tmp_path):
    line = refused(*args, "--out", tmp_path / "o", match=r"\.\.\. [\d,]+ characters \.\.\.")
    assert len(line) < 600


@pytest.mark.parametrize("topology, match", [("xxxx", "unknown topology 'xxxx'"), ("random-regular:7", "random-regular")])
def test_sim_refuses_a_graph_it_cannot_build_before_writing_anything(topology, match, tmp_path):
    """The arm's graph is built when the sweep is checked (it was first built inside the running arm, after the
    output directory and the progress view existed)."""
    refused("sim", "--algo", "dsgd", "--topology", topology, "--workers", "4", "--steps", "5", "--out", tmp_path / "o", match=match)
    assert not (tmp_path / "o").exists()
