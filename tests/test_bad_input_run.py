"""Bad input to run, train, remote and worker, as a probe found it (issue 20): one line, a non-zero exit, no traceback.

Like ``test_bad_input.py``: each refusal runs in-process through click's runner
against ``zsgd.cli.main`` and must happen before anything starts. The few
cases that need a real process (Ctrl-C of ``zsgd train``, a real run's update
count) are marked slow and wait on conditions with deadlines.
"""

from __future__ import annotations

import signal
import subprocess

import numpy as np
import pytest

from helpers import read_events, refused, summary_of, wait_for, zsgd_cmd

SMALL = ("--model", "logreg", "--data", "embedded", "--quiet")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, fresh_home):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


# -- item 8: zsgd worker --id ----------------------------------------------------------------------
@pytest.mark.parametrize("worker_id", ["-5", "99999999999", "2147483648"])
def test_worker_id_out_of_range(worker_id):
    refused("worker", "--connect", "tcp://127.0.0.1:1", "--id", worker_id, match=r"--id.*0<=x<=2147483647")


@pytest.mark.parametrize("value", ["99999999999", "１２"])
def test_worker_rank_from_env_out_of_range(monkeypatch, value):
    monkeypatch.setenv("SLURM_PROCID", value)
    for name in ("OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    refused("worker", "--connect", "tcp://127.0.0.1:1", match=r"SLURM_PROCID=.* is not a rank .*0\.\.2147483647")


# -- item 7: hosts files with absurd lines ------------------------------------------------------------
@pytest.mark.parametrize("line,match", [
    ("a" * 1_000_000, r"hosts:1: line is 1,000,000 characters long; a host line has at most 1,024"),
    ("localhost python=/" + "a" * 1_000_000, r"hosts:1: line is .* characters long"),
    ("a" * 300, r"hosts:1: bad host name 'aaaa.*\.\.\. \(at most 253 characters"),
])
@pytest.mark.parametrize("command", [("remote", "check"), ("remote", "init"), ("run", *SMALL, "--remote")])
def test_hosts_file_with_an_absurd_line(tmp_path, line, match, command):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# cluster\n{line}\n".replace("# cluster\n", ""))
    refused(*command, hosts, match=match)


def test_hosts_file_that_is_not_a_file_or_too_large(tmp_path):
    refused("remote", "check", "/dev/zero", match=r"hosts file /dev/zero is not a regular file")
    big = tmp_path / "hosts"
    big.write_text("localhost\n" + "# padding\n" * 120_000)
    refused("remote", "check", big, match=r"larger than 1 MiB")


# -- item 3: --servers is bounded by the machine, the model and sense -----------------------------------
@pytest.mark.parametrize("command", [("run", *SMALL), ("broker", *SMALL, "--workers", "2")])
def test_run_servers_capped_by_the_machine(command, tmp_path):
    from zsgd.runtime.launch.local import max_local_servers

    cap, why = max_local_servers()
    refused(*command, "--servers", "1000", "--out", tmp_path / "o",
            match=rf"--servers 1,000 would start 999 range servers on this machine, .*at most {cap} for {why}")
    assert not (tmp_path / "o").exists()


def test_run_servers_placed_by_the_hosts_file_are_not_counted_here(tmp_path):
    from zsgd.runtime.launch.local import max_local_servers

    cap, _why = max_local_servers()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:1 slots=1 servers=3\n")  # nothing listens on port 1: the probe fails at once
    k = cap + 1 + 3  # the coordinator, cap here, 3 there
    refused("run", *SMALL, "--remote", hosts, "--servers", k + 1, "--out", tmp_path / "o",
            match=rf"--servers {k + 1} would start {cap + 1} range servers on this machine")
    line = refused("run", *SMALL, "--remote", hosts, "--servers", k, "--out", tmp_path / "o", match=r"127\.0\.0\.1")
    assert "range servers on this machine" not in line


def test_sim_servers_beyond_any_sense_refused(tmp_path):
    refused("sim", *SMALL, "--workers", "4", "--steps", "20", "--servers", "100000", "--broker-time", "1ms", "--out", tmp_path / "o",
            match=r"--servers 100,000 is more servers than zsgd splits a model over \(at most 1,024\)")
    assert not (tmp_path / "o").exists()


def test_sim_servers_beyond_the_models_parameters_refused(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = ("--model", "logreg", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "8", "--grayscale", "--batch-size", "2")  # 130 parameters
    refused("sim", *data, "--workers", "2", "--steps", "5", "--servers", "1,200", "--broker-time", "1ms", "--out", tmp_path / "o",
            match=r"--servers 200 is more servers than the model has parameters \(130\)")
    assert not (tmp_path / "o").exists()


# -- item 9: every duration and factor has a sane ceiling -------------------------------------------------
@pytest.mark.parametrize("flags,match", [
    (("--timeout", "1e308"), r"--timeout must be a number of seconds > 0 and at most 3,600 s, got 1e\+308"),
    (("--heartbeat", "1e-9"), r"--heartbeat must be at least 0.01 s"),
    (("--stragglers", "1:1e308x"), r"bad --stragglers '1:1e308x': FACTOR must be from 1 to 1000"),
    (("--inject-latency", "1e308s"), r"bad --inject-latency '1e308s': at most 1,000,000 s"),
    (("--inject-latency", "lognormal:1ms,1e308"), r"lognormal SIGMA must be a unitless number in \[0, 10\]"),
    (("--inject-latency", "uniform:1ms,2e6s"), r"bad --inject-latency '2e6s': at most 1,000,000 s"),
    (("--inject-bandwidth", "1e-300bps"), r"bad bandwidth '1e-300bps': at least 1Kbps"),
    (("--inject-loss", "0.99"), r"bad loss '0.99': must be in \[0, 0.9\]"),
    (("--time", "1e308"), r"--time must be a number of seconds > 0 and at most 366 days"),
    (("--epochs", "1e308"), r"--epochs must be at most 1,000,000, got 1e\+308"),
    (("--eval-interval", "1e308"), r"--eval-interval must be a number of seconds >= 0 and at most 86,400 s"),
    (("--start-wait", "1e9"), r"--start-wait must be a number of seconds >= 0 and at most 86,400 s"),
])
def test_run_durations_and_factors_bounded(tmp_path, flags, match):
    refused("run", *SMALL, "--steps", "5", *flags, "--out", tmp_path / "o", match=match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,match", [
    (("--timeout", "1e308"), r"--timeout must be a number of seconds > 0 and at most 3,600 s"),
    (("--join-timeout", "1e308"), r"--join-timeout must be a number of seconds > 0 and at most 86,400 s"),
])
def test_worker_durations_bounded(flags, match):
    refused("worker", "--connect", "tcp://127.0.0.1:1", *flags, match=match)


@pytest.mark.parametrize("flags,match", [
    (("--stragglers", "1:1e308x"), r"FACTOR must be from 1 to 1000"),
    (("--failures", "0@1e300s"), r"bad failure time '1e300s': at most 1,000,000 s"),
    (("--time", "1e308"), r"--time must be a number of seconds > 0 and at most 366 days"),
])
def test_sim_durations_and_factors_bounded(tmp_path, flags, match):
    refused("sim", *SMALL, "--workers", "2", "--steps", "5", *flags, "--out", tmp_path / "o", match=match)


def test_train_epochs_bounded(tmp_path):
    refused("train", *SMALL, "--epochs", "1e308", "--out", tmp_path / "o", match=r"--epochs must be at most 1,000,000")


def test_config_file_time_bounded(tmp_path):
    (tmp_path / "c.yaml").write_text("time: 1.0e+308\n")
    refused("train", *SMALL, "--config", tmp_path / "c.yaml", match=r"c.yaml:1: time must be a number of seconds > 0 and at most 366 days")


def test_a_dead_childs_traceback_is_one_short_line(tmp_path):
    """What a run's error quotes of a dead worker's log: the lines before its traceback and what was raised."""
    from zsgd.runtime.launch.local import Child

    log = tmp_path / "worker-0.log"
    log.write_text("zsgd worker 0: joining tcp://127.0.0.1:5555\n"
                   "Traceback (most recent call last):\n"
                   '  File "/x/zsgd/wire/link.py", line 121, in recv\n'
                   "    if not self._pipe.poll(int(timeout * 1000)):\n"
                   "                           ^^^^^^^^^^^^^^^^^^^\n"
                   "OverflowError: cannot convert float infinity to integer\n" + "x" * 5000 + "\n")
    tail = Child("worker-0", None, log).log_tail()
    assert tail.startswith("zsgd worker 0: joining tcp://127.0.0.1:5555 | xxx"), tail
    assert "File" not in tail and "^" not in tail and len(tail) < 300, tail
    log.write_text("zsgd worker 0: joining\nTraceback (most recent call last):\n  File \"x\", line 1, in f\n"
                   "OverflowError: cannot convert float infinity to integer\n")
    assert Child("worker-0", None, log).log_tail() == "zsgd worker 0: joining | OverflowError: cannot convert float infinity to integer"


# -- item 16: model specs -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,match", [
    ("cnn:foo=1", r"model 'cnn' takes no options, got 'cnn:foo=1': only lstm does \(lstm:embed=E,hidden=H,layers=L\)"),
    ("LOGREG", r"unknown model 'LOGREG' \(did you mean 'logreg'\?\): choose one of logreg, mlp, cnn, lenet5, lstm "),
    ("Lstm:embed=8", r"unknown model 'Lstm:embed=8' \(did you mean 'lstm:embed=8'\?\)"),
    ("x" * 100_000, r"--model must be at most 512 printable characters .*got 'xxx.*\.\.\.$"),
])
@pytest.mark.parametrize("command", ["train", "sim"])
def test_bad_model_specs(tmp_path, model, match, command):
    refused(command, "--model", model, "--data", "embedded", "--steps", "2", "--out", tmp_path / "o", match=match)
    assert not (tmp_path / "o").exists()


def test_every_builtin_model_is_listed():
    from zsgd.nn.lstm_spec import LSTM_NAME
    from zsgd.nn.models import BUILTIN_MODELS, MODEL_NAMES

    line = refused("train", "--model", "nope", "--data", "embedded", "--steps", "2", match=r"unknown model 'nope'")
    assert set(BUILTIN_MODELS) == {*MODEL_NAMES, LSTM_NAME}
    for name in BUILTIN_MODELS:
        assert f" {name}," in line or f" {name} " in line, (name, line)


# -- item 6: Ctrl-C and SIGTERM of zsgd train keep the run ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig,code,reason", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 0, "stopped by SIGTERM")])
def test_train_stopped_by_a_signal_writes_summary_and_weights(tmp_path, no_orphans, sig, code, reason):
    out = tmp_path / "run"
    proc = subprocess.Popen(zsgd_cmd("train", *SMALL, "--steps", "100000", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or any(e["event"] == "update" for e in read_events(out)), 120, what="a first update")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    summary = summary_of(out)
    assert summary["stop_reason"] == reason and 0 < summary["updates"] < 100000, summary
    with np.load(out / "weights.npz") as weights:
        assert sum(v.size for v in weights.values()) == 7850
    assert read_events(out)[-1]["event"] == "end"


@pytest.mark.parametrize("command,flag", [("run", "--inject-latency"), ("run", "--stragglers"), ("run", "--inject-bandwidth"),
                                          ("run", "--inject-loss"), ("sim", "--bandwidth"), ("sim", "--latency")])
def test_a_pasted_spec_is_refused_at_once_and_quoted_short(tmp_path, command, flag):
    """100,000 digits and a bad unit: refused by its length before any regex (one took minutes to backtrack)."""
    extra = ("--workers", "2") if command == "sim" else ()
    refused(command, *SMALL, *extra, "--steps", "5", flag, "9" * 100_000 + "q", "--out", tmp_path / "o", match=r"'9{50,}\.\.\.'")


# -- paths no file system can hold (a probe's follow-up: each was an OSError traceback) ------------------------------
LONG = "x" * 300  # one name past NAME_MAX


@pytest.mark.parametrize("command,flags,flag", [
    ("train", ("--data", f"imagefolder:{LONG}"), "--data"),
    ("train", ("--data", f"text:{LONG}"), "--data"),
    ("train", ("--data", "mnist", "--data-dir", LONG), "--data-dir"),
    ("train", ("--data", "embedded", "--out", f"runs/{LONG}"), "--out"),
    ("run", ("--data", "embedded", "--resume", LONG), "--resume"),
    ("run", ("--data", "embedded", "--keys", LONG), "--keys"),
    ("sim", ("--data", "embedded", "--out", LONG), "--out"),
])
def test_a_path_too_long_for_any_file_system(command, flags, flag):
    refused(command, "--model", "logreg", "--steps", "2", "--quiet", *flags,
            match=rf"{flag} '.*\.\.\.' has a name of 300 bytes; a file or folder name has at most 255")


def test_a_path_longer_than_path_max():
    refused("train", *SMALL, "--steps", "2", "--out", "/".join(["y" * 200] * 21),
            match=r"--out 'yyy.*\.\.\.' is 4,220 bytes long; a path has at most 4,095")
