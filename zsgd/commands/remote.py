"""``zsgd remote init|check`` and ``zsgd keys generate``.

Kept apart from ``cli.py`` so the remote commands and the ssh flags they
share with ``zsgd run`` live in one place: ``ssh_options`` declares
``--ssh-config``, ``--ssh-option``, ``--connect-timeout`` and ``--remote-dir``
once, for every command that calls ssh.
"""

from __future__ import annotations

import time
from typing import Callable

import click

from zsgd.errors import ZsgdError
from zsgd.remote.ssh import DEFAULT_REMOTE_DIR, SshOptions


def ssh_options(func: Callable) -> Callable:
    """The flags every ssh-using command shares."""
    opts = [
        click.option("--ssh-config", type=click.Path(dir_okay=False), default=None, help="ssh client config file (passed as 'ssh -F FILE')."),
        click.option("--ssh-option", "ssh_option", multiple=True, metavar="OPT",
                     help="Extra ssh option, as 'ssh -o OPT' (repeatable), e.g. ProxyJump=bastion."),
        click.option("--connect-timeout", default=10, show_default=True, type=click.IntRange(1, 600), help="Seconds ssh waits for a host."),
        click.option("--remote-dir", default=DEFAULT_REMOTE_DIR, show_default=True, envvar="ZSGD_REMOTE_DIR",
                     help="Folder on each host holding zsgd's venv (made by 'zsgd remote init')."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def make_ssh_options(ssh_config: str | None, ssh_option: tuple[str, ...], connect_timeout: int, remote_dir: str) -> SshOptions:
    """Validate the ssh flags up front (a typo here should not surface as N ssh failures)."""
    from pathlib import Path

    if ssh_config is not None and not Path(ssh_config).is_file():
        raise ZsgdError(f"--ssh-config {ssh_config}: no such file")
    for opt in ssh_option:
        if not opt or opt.startswith("-") or "\n" in opt:
            raise ZsgdError(f"--ssh-option {opt!r}: give an ssh_config option such as ProxyJump=bastion (what 'ssh -o' takes)")
    if not remote_dir or any(c in remote_dir for c in "'\"`$\\\n"):
        raise ZsgdError(f"--remote-dir {remote_dir!r}: give a plain path such as ~/.zsgd")
    return SshOptions(config=str(Path(ssh_config).resolve()) if ssh_config else None, options=tuple(ssh_option),
                      connect_timeout=connect_timeout, remote_dir=remote_dir.rstrip("/") or "/")


@click.group("remote")
def remote_group() -> None:
    """Prepare and check the hosts that run remote workers (see 'zsgd run --remote')."""


@remote_group.command("init")
@click.argument("hosts_file", type=click.Path(dir_okay=False))
@ssh_options
@click.option("--system-site-packages", is_flag=True, help="Let the venv see the host Python's packages (fast and offline where they are installed).")
@click.option("--wheel", "wheel_file", type=click.Path(dir_okay=False), default=None, help="Install this zsgd wheel instead of building one.")
@click.option("--no-warm", is_flag=True, help="Skip compiling the numba kernels on the hosts.")
def init_command(hosts_file: str, ssh_config: str | None, ssh_option: tuple[str, ...], connect_timeout: int, remote_dir: str,
                 system_site_packages: bool, wheel_file: str | None, no_warm: bool) -> None:
    """Install this zsgd build on every host of HOSTS_FILE, in parallel.

    Builds a wheel here, copies it over ssh, makes a venv (REMOTE_DIR/venv),
    installs zsgd with its dependencies and compiles the kernels. Running it
    again is a quick no-op while the build is unchanged."""
    import tempfile
    from pathlib import Path

    from rich.table import Table

    from zsgd.remote.hosts import load_hosts
    from zsgd.output.live import stderr_console
    from zsgd.remote.provision import build_wheel, init_hosts

    ssh = make_ssh_options(ssh_config, ssh_option, connect_timeout, remote_dir)
    hosts = load_hosts(hosts_file)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zsgd-wheel-") as tmp:
        wheel = build_wheel(Path(tmp), wheel_file)
        stderr_console.print(f"wheel {wheel.name} (sha256 {wheel.sha256[:12]}) built in {time.monotonic() - t0:.1f} s; "
                             f"preparing {len(hosts)} host(s)")
        results = init_hosts(ssh, hosts, wheel, system_site_packages=system_site_packages, warm=not no_warm)
    table = Table(title=f"zsgd remote init ({hosts_file})", show_edge=False, header_style="bold")
    for col in ("host", "status", "python", "zsgd", "time"):
        table.add_column(col)
    for r in results:
        style = "green" if r.ok else "red"
        table.add_row(r.host.label, f"[{style}]{r.status}[/]", r.python or "-", r.zsgd or "-", f"{r.seconds:.1f} s")
    stderr_console.print(table)
    failed = [r for r in results if not r.ok]
    if len(failed) > 1:
        for r in failed:
            stderr_console.print(f"[red]{r.host.label}[/]: {r.error}")
    if failed:
        raise ZsgdError(f"{failed[0].host.label}: {failed[0].error}" if len(failed) == 1
                        else f"{len(failed)} of {len(results)} hosts failed (first: {failed[0].host.label}: {failed[0].error})")


@remote_group.command("check")
@click.argument("hosts_file", type=click.Path(dir_okay=False))
@ssh_options
def check_command(hosts_file: str, ssh_config: str | None, ssh_option: tuple[str, ...], connect_timeout: int, remote_dir: str) -> None:
    """Say whether each host of HOSTS_FILE is ready to run workers."""
    from rich.table import Table

    from zsgd.remote.hosts import load_hosts
    from zsgd.output.live import stderr_console
    from zsgd.remote.provision import check_hosts

    ssh = make_ssh_options(ssh_config, ssh_option, connect_timeout, remote_dir)
    hosts = load_hosts(hosts_file)
    results = check_hosts(ssh, hosts, hosts_file)
    table = Table(title=f"zsgd remote check ({hosts_file})", show_edge=False, header_style="bold")
    for col in ("host", "slots", "ready", "python", "zsgd", "detail", "time"):
        table.add_column(col)
    for r in results:
        table.add_row(r.host.label, str(r.host.slots), "[green]yes[/]" if r.ready else "[red]no[/]", r.python or "-", r.zsgd or "-",
                      r.detail, f"{r.seconds:.1f} s")
    stderr_console.print(table)
    bad = [r for r in results if not r.ready]
    if bad:
        raise ZsgdError(f"{len(bad)} of {len(results)} hosts not ready (first: {bad[0].host.label}: {bad[0].detail})")


@click.group("keys")
def keys_group() -> None:
    """CURVE keys for brokers reachable beyond this machine."""


@keys_group.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--clients", default=0, show_default=True, type=int, help="Also write N client key files for workers started by hand.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
def generate_command(directory: str, clients: int, force: bool) -> None:
    """Write a broker keypair (DIRECTORY/server.json) and client key files, all mode 0600.

    Use them with 'zsgd run --keys DIRECTORY' or 'zsgd broker --keys
    DIRECTORY'; give each worker started by hand one client file with
    'zsgd worker --keys-file DIRECTORY/client-N.json'. Workers that 'zsgd run'
    starts get fresh keys of their own over SSH."""
    from zsgd.wire.security import generate_keys_dir

    for path in generate_keys_dir(directory, clients, force=force):
        click.echo(str(path))


# -- flags of 'zsgd run' and 'zsgd broker' ------------------------------------------------------
def secure_options(func: Callable) -> Callable:
    """``--secure`` and ``--keys`` (run and broker)."""
    func = click.option("--keys", "keys_dir", type=click.Path(file_okay=False), default=None,
                        help="CURVE keys from 'zsgd keys generate DIR' (implies --secure); default: fresh keys per run.")(func)
    func = click.option("--secure", is_flag=True, help="Encrypt and authenticate with CURVE even on loopback (always on beyond it).")(func)
    return func


def remote_run_options(func: Callable) -> Callable:
    """``--remote HOSTS`` and what goes with it (run only)."""
    func = ssh_options(func)
    func = click.option("--allow-partial", is_flag=True, help="Skip unusable hosts (with a warning) instead of aborting.")(func)
    func = click.option("--advertise", default=None, metavar="ADDR",
                        help="Address remote workers connect to (default: this machine's address on the route to the hosts).")(func)
    func = click.option("--remote", "hosts_file", type=click.Path(dir_okay=False), default=None, metavar="HOSTS_FILE",
                        help="Also start workers over SSH on the hosts of HOSTS_FILE (see ssh_hosts.txt).")(func)
    return func


def pop_ssh_flags(params: dict) -> dict | None:
    """Take the ssh flags out of a command's params, validated, as ``AccessOptions.ssh`` (None: the command has none)."""
    import dataclasses

    if "ssh_config" not in params:
        return None
    ssh = make_ssh_options(params.pop("ssh_config"), params.pop("ssh_option"), params.pop("connect_timeout"), params.pop("remote_dir"))
    return {**dataclasses.asdict(ssh), "options": list(ssh.options)}
