"""The hosts file, ssh command lines and ssh error messages (no network needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import REPO, cli
from zsgd.errors import ZsgdError
from zsgd.remote.hosts import Host, load_hosts, parse_hosts
from zsgd.remote.ssh import SshOptions, explain_failure, python_sh, remote_dir_sh


def test_example_hosts_file_parses():
    hosts = load_hosts(REPO / "ssh_hosts.txt")
    assert hosts and all(h.slots >= 1 for h in hosts)


def test_full_syntax():
    hosts = parse_hosts("""
        # a comment
        node1                        # one slot, default port
        alice@node2:2222 slots=4     # MPI/DeepSpeed style
        gpu-3 python=/opt/py/bin/python3 slots=2

        [fe80::1]:2200 slots=1
    """, "hosts.txt")
    assert [h.label for h in hosts] == ["node1", "node2:2222", "gpu-3", "[fe80::1]:2200"]
    assert hosts[1] == Host("node2", "alice", 2222, 4, None, 4, "hosts.txt")
    assert hosts[1].ssh_destination() == ["-p", "2222", "alice@node2"]
    assert hosts[2].python == "/opt/py/bin/python3" and hosts[2].slots == 2
    assert hosts[0].ssh_destination() == ["node1"]


@pytest.mark.parametrize("text,needle", [
    ("node1 slots=0", "my_hosts.txt:1: slots must be"),
    ("\nnode1 slots=many", "my_hosts.txt:2: slots must be"),
    ("node1 gpus=2", "unknown key 'gpus'"),
    ("node1 slots", "expected key=value"),
    ("node1:99999", "port must be 1-65535"),
    ("node1:ssh", "port must be"),
    ("-oProxyCommand=x", "bad host name"),
    ("bad$host", "bad host name"),
    ("@node1", "bad user name"),
    ("node1 python=bin/python", "python= needs an absolute path"),
    ("node1 python=/x;rm", "python= needs an absolute path"),
    ("node1\nnode1 slots=2", "already listed on line 1"),
    ("node1 slots=1 slots=2", "slots= given twice"),
    ("# nothing but comments\n\n", "no hosts listed"),
])
def test_errors_name_file_line_and_problem(text, needle):
    with pytest.raises(ZsgdError) as exc:
        parse_hosts(text, "my_hosts.txt")
    assert needle in str(exc.value)
    assert str(exc.value).startswith("my_hosts.txt")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ZsgdError, match="not found"):
        load_hosts(tmp_path / "nope.txt")


def test_ssh_argv_user_options_first_and_one_quoted_word():
    ssh = SshOptions(config="/etc/my_ssh_config", options=("ProxyJump=bastion", "ConnectTimeout=30"), connect_timeout=7)
    argv = ssh.argv(Host("node1", port=2222), "echo 'hi there'; exit 3")
    assert argv[:3] == ["ssh", "-F", "/etc/my_ssh_config"]
    i = argv.index("ProxyJump=bastion")
    assert argv[i - 1] == "-o" and i < argv.index("BatchMode=yes") and i < argv.index("ConnectTimeout=7")
    assert "-n" in argv  # no stdin unless asked for
    assert argv[-3:-1] == ["-p", "2222"] or argv[-4:-2] == ["-p", "2222"]
    # The remote command is one word: what sh -c gets back equals the script.
    out = subprocess.run(["sh", "-c", argv[-1].replace("sh -c ", "printf %s ", 1)], capture_output=True, text=True).stdout
    assert out == "echo 'hi there'; exit 3"


def test_remote_dir_and_python_selection_in_sh(tmp_path):
    assert remote_dir_sh("~/.zsgd") == '"$HOME"/.zsgd'
    venv_py = tmp_path / "venv" / "bin" / "python"
    script = python_sh(Host("h", python="/usr/bin/python3"), str(tmp_path)) + '; printf "%s" "$PY"'
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout == "/usr/bin/python3"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("#!/bin/sh\n")
    venv_py.chmod(0o755)
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout == str(venv_py)  # the venv wins
    home = python_sh(parse_hosts("h python=~/conda/bin/python3")[0], str(tmp_path / "nothing")) + '; printf "%s" "$PY"'
    assert subprocess.run(["sh", "-c", home], capture_output=True, text=True, env={"HOME": "/home/u"}).stdout == "/home/u/conda/bin/python3"


@pytest.mark.parametrize("stderr,needle", [
    ("ssh: Could not resolve hostname nodex: Name or service not known", "unknown host"),
    ("root@192.0.2.1: Permission denied (publickey).", "permission denied"),
    ("ssh: connect to host 192.0.2.1 port 22: Connection refused", "connection refused on port 22"),
    ("ssh: connect to host 192.0.2.1 port 22: Connection timed out", "host is down or a firewall blocks port 22"),
    ("Host key verification failed.", "host key not trusted"),
    ("ssh: connect to host 192.0.2.1 port 22: No route to host", "unreachable"),
])
def test_ssh_failures_become_one_sentence(stderr, needle):
    msg = explain_failure(Host("nodex", line=3, source="hosts.txt"), SshOptions(), subprocess.CompletedProcess([], 255, b"", stderr.encode()))
    assert needle in msg and "\n" not in msg


def test_bad_hosts_file_is_a_one_line_cli_error(tmp_path):
    bad = tmp_path / "hosts.txt"
    bad.write_text("good-host\nnode2 slots=zero\n")
    for args in (["run", "--remote", str(bad), "--model", "logreg", "--data", "embedded", "--steps", "1", "--quiet", "--out", str(tmp_path / "r")],
                 ["remote", "check", str(bad)], ["remote", "init", str(bad)]):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert r.stderr.strip().count("\n") == 0 and f"{bad}:2: slots must be" in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--advertise", "192.0.2.1"], "need --remote"),
    (["--remote", str(REPO / "ssh_hosts.txt"), "--ssh-config", "/nonexistent/cfg"], "--ssh-config /nonexistent/cfg: no such file"),
    (["--remote", str(REPO / "ssh_hosts.txt"), "--ssh-option", "-oFoo"], "--ssh-option"),
])
def test_bad_remote_flags(tmp_path, args, needle):
    r = cli("run", "--model", "logreg", "--data", "embedded", "--quiet", "--out", str(tmp_path / "r"), *args)
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.strip().count("\n") == 0, r.output


def test_setup_script_installs_openssh():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert "openssh-server" in text and "openssh-client" in text
    assert Path(REPO / "scripts" / "init_remote.py").is_file()


def test_servers_key_places_range_servers():
    hosts = parse_hosts("a slots=2 servers=1\nb\nc servers=2\n", "hosts.txt")
    assert [h.servers for h in hosts] == [1, 0, 2]
    from zsgd.remote.launcher import RemotePlan

    plan = RemotePlan("hosts.txt", None, hosts, {})
    assert plan.n_servers == 3 and plan.n_workers == 4
    assert {i: h.host for i, h in plan.server_placement().items()} == {1: "a", 2: "c", 3: "c"}


@pytest.mark.parametrize("value", ["-1", "x", "65", "1.5", ""])
def test_malformed_servers_key_names_the_line(value):
    with pytest.raises(ZsgdError, match=r"hosts.txt:2: .*servers"):
        parse_hosts(f"a\nb servers={value}\n", "hosts.txt")
