"""How workers reach a run's broker: address, CURVE keys, and who launches them.

The runner asks one object three questions -- where to bind, which CURVE
settings the broker gets, and which launchers start the workers -- so the
run loop itself stays the same for a laptop run and a cluster run.

Rules (README, "Remote workers"): the broker binds loopback unless told
otherwise; with ``--remote`` it binds the advertised address (or ``--host``);
CURVE is on whenever it listens beyond loopback, or with ``--secure``; without
it the run secret (``zsgd.wire.auth``) authenticates every process the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsgd.errors import ZsgdError
from zsgd.wire.security import RunKeys, is_loopback

LOOPBACK = "127.0.0.1"


@dataclass
class Access:
    bind_host: str
    plan: Any = None  # zsgd.remote.launcher.RemotePlan when --remote
    keys: RunKeys | None = None  # CURVE keys, or the run secret alone (RunKeys.secret_only)
    slurm: Any = None  # zsgd.runtime.launch.slurm.SlurmPlan with --launcher slurm

    @property
    def secure(self) -> bool:
        """CURVE is on (else the run secret alone authenticates the run's processes)."""
        return self.keys is not None and self.keys.curve

    def bind(self, port: int) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"tcp://{host}:{port}"

    def broker_curve(self) -> dict | None:
        return self.keys.broker_curve() if self.keys else None

    def broker_token(self) -> str | None:
        return self.keys.broker_token() if self.keys else None

    def local_address(self, bound: str) -> str:
        """Where local workers connect: a wildcard bind is reached through loopback."""
        for wildcard in ("tcp://0.0.0.0:", "tcp://[::]:", "tcp://*:"):
            if bound.startswith(wildcard):
                return f"tcp://{LOOPBACK}:{bound.rsplit(':', 1)[1]}"
        return bound

    def remote_address(self, bound: str, advertise: str | None = None) -> str:
        port = bound.rsplit(":", 1)[1]
        adv = advertise or self.plan.advertise
        return f"tcp://[{adv}]:{port}" if ":" in adv else f"tcp://{adv}:{port}"

    def write_client_files(self, run_dir: Path, n: int, announce: bool = True) -> Path:
        """Key files (0600, in a 0700 folder) for workers started by hand: one CURVE bundle per worker, or
        the run secret (``keys/run.json``) that every process of a run without CURVE proves it holds."""
        from zsgd.output.live import stderr_console
        from zsgd.wire.security import RUN_SECRET_FILE, write_secret_json

        folder = Path(run_dir) / "keys"
        folder.mkdir(mode=0o700, exist_ok=True)
        if not self.secure:
            write_secret_json(folder / RUN_SECRET_FILE, self.keys.bundle("by-hand"))
            if announce:
                stderr_console.print(f"workers started by hand join with 'zsgd worker --keys-file {folder / RUN_SECRET_FILE} ...' "
                                     f"(this run's secret: a process without it is refused)")
            return folder
        for i in range(n):
            write_secret_json(folder / f"client-{i}.json", self.keys.bundle(f"worker-{i}"))
        if announce:
            stderr_console.print(f"CURVE is on: give each worker one key file, e.g. 'zsgd worker --keys-file {folder}/client-0.json ...' "
                                 f"(copy them over SSH; they are secret)")
        return folder

    def launchers(self, broker, run_dir: Path, heartbeat: float, timeout: float, show: bool, ranks: list):
        """The launchers ``ranks`` name (``zsgd.runtime.launch.base``), built for this run as one group."""
        from zsgd.runtime.launch.base import LaunchContext, LauncherGroup

        ctx = LaunchContext(self, broker, Path(run_dir), heartbeat, timeout, show, user_model_flag(broker.cfg.model))
        return LauncherGroup.build(ctx, {r.launcher for r in ranks})


def prepare_access(opts) -> Access:
    """Probe remote hosts (if any), choose the bind address and make this run's keys.

    ``opts`` is the runner's ``RunOptions``; its ``remote_workers`` (or
    ``slurm_workers``) is set here, since it is known only once the hosts
    (or the allocation) have answered."""
    plan = None
    acc, host = opts.remote, opts.network.host
    bind_host = host or LOOPBACK
    if acc.hosts_file:
        from zsgd.remote.launcher import prepare_remote
        from zsgd.remote.ssh import SshOptions

        ssh = SshOptions(**{**(acc.ssh or {}), "options": tuple((acc.ssh or {}).get("options", ()))})
        plan = prepare_remote(acc.hosts_file, ssh, first_id=opts.n_proc, allow_partial=acc.allow_partial, advertise=acc.advertise,
                              host_flag=host, show=opts.output.show)
        if plan is not None:  # None: --allow-partial and no usable host, the local workers go on alone
            opts.remote_workers = plan.n_workers
            bind_host = plan.bind_host
    elif opts.launcher == "slurm":
        from zsgd.runtime.launch.slurm import plan_workers

        slurm = plan_workers(opts.slurm_request, acc.advertise, host)
        opts.slurm_workers = slurm.n_workers
        keys = RunKeys.create(acc.keys_dir)  # always CURVE: the workers are on other machines, or could be
        return Access(slurm.bind_host, None, keys, slurm)
    elif acc.advertise:
        raise ZsgdError("--advertise is for remote workers; use it with --remote or --launcher slurm")
    secure = acc.secure or bool(acc.keys_dir) or not is_loopback(bind_host)
    keys = RunKeys.create(acc.keys_dir) if secure else RunKeys.secret_only()
    return Access(bind_host, plan, keys)


def user_model_flag(spec: str) -> str | None:
    """The ``--model`` a launched worker is given when the run trains a user model: a worker runs a
    user's factory only when it was started for that very spec (a broker cannot make it import another)."""
    from zsgd.nn.models import is_user_model

    return spec if is_user_model(spec) else None
