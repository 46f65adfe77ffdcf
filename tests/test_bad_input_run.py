"""Bad input to run, train, remote and worker, as a probe found it (issue 20): one line, a non-zero exit, no traceback.

Like ``test_bad_input.py``: each refusal runs in-process through click's runner
against ``zsgd.cli.main`` and must happen before anything starts. The few
cases that need a real process (Ctrl-C of ``zsgd train``, a real run's update
count) are marked slow and wait on conditions with deadlines.
"""

from __future__ import annotations

import pytest

from helpers import cli, lines_of

SMALL = ("--model", "logreg", "--data", "embedded", "--quiet")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSGD_HOME", str(tmp_path / "zsgd-home"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def refused(*args: str, match: str, code: int = 2) -> str:
    """Run ``zsgd ARGS`` in-process; assert one ``zsgd: error:`` line matching ``match`` and exit ``code``."""
    import re

    result = cli(*[str(a) for a in args])
    lines = lines_of(result.stderr)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("zsgd: error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]
    assert len(lines[0]) < 400, lines[0]
    return lines[0]


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
    from zsgd.runtime.launch import max_local_servers

    cap, why = max_local_servers()
    refused(*command, "--servers", "1000", "--out", tmp_path / "o",
            match=rf"--servers 1,000 would start 999 range servers on this machine, .*at most {cap} for {why}")
    assert not (tmp_path / "o").exists()


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
