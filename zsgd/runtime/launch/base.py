"""One shape for every launcher: plan the ranks, start them, poll, stop.

Why: the run loop used to ask which launchers it had (start the local
workers here, the remote ones there, the srun step last) and a new launcher
touched the runner, the options and the access code. Now a run's processes
are a list of ranks, each naming the launcher that starts it
(``plan_ranks``), and every launcher answers the same calls:

- ``start(ranks)``: start the ranks that are its own (it ignores the rest);
- ``children`` and ``running()``: its processes, for the run's checks;
- ``lost()``: a reason the run can no longer get its ranks back (an srun
  step that ended), else None;
- ``failed()``: one line naming a rank that ended with zsgd's error exit
  code (a module, data or flag its host lacks), else None; the run then
  fails with that line. ``failed_child(children)`` answers it for a
  launcher whose children's exit codes are their ranks' own.
- ``stop_all(grace)``: end them all, politely first.

A launcher is registered under a name with one line
(``register_launcher(name, factory)``); the factory gets the run's
``LaunchContext`` and returns the launcher, or None where it has nothing to
start (no hosts file, no allocation). ``zsgd run --launcher NAME`` gives that
launcher the run's workers; the evaluator and range servers not placed on a
host are the local launcher's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from zsgd.errors import ZsgdError


@dataclass(frozen=True)
class Rank:
    """One process of a run: its role (worker, evaluator, server), its id, and the launcher that starts it."""

    role: str
    id: int
    launcher: str


class Launcher(Protocol):
    """What the run loop calls on every launcher (see the module docstring)."""

    name: str
    children: list

    def start(self, ranks: list[Rank]) -> None: ...

    def running(self) -> list: ...

    def lost(self) -> str | None: ...

    def failed(self) -> str | None: ...

    def stop_all(self, grace: float = 5.0) -> None: ...


@dataclass
class LaunchContext:
    """What a launcher factory may use: the run's access (address, keys, plans), the broker, where logs go."""

    access: Any  # zsgd.runtime.launch.access.Access
    broker: Any  # zsgd.broker.Broker
    run_dir: Path
    heartbeat: float
    timeout: float
    show: bool
    model: str | None  # a user model's spec, which launched workers are started for (access.user_model_flag)


LauncherFactory = Callable[[LaunchContext], "Launcher | None"]
LOCAL = "local"
LAUNCHERS: dict[str, str | LauncherFactory] = {
    LOCAL: "zsgd.runtime.launch.local:make_local",
    "ssh": "zsgd.runtime.launch.ssh:make_remote",
    "slurm": "zsgd.runtime.launch.slurm:make_slurm",
}


#: A zsgd process that ended on a ZsgdError (zsgd.errors: bad input, a model or data set it cannot load) exits so.
ERROR_EXIT = ZsgdError.exit_code


def failed_child(children: list) -> str | None:
    """One line for the first of ``children`` that exited with ``ERROR_EXIT``: its name (which says the host of a
    remote one) and its log's last line (the error it printed), else None.

    Why not treat it as a dead worker, as any other exit: the error would come back on every restart (the host
    lacks the module), and a run whose other workers trained on ended with exit 0 and a death count only."""
    for c in children:
        if c.returncode == ERROR_EXIT:
            why = c.log_tail(1).removeprefix("zsgd: error: ") or "no output"
            return f"{c.name} failed: {why}"
    return None


def register_launcher(name: str, factory: str | LauncherFactory) -> None:
    """Make launcher ``name`` known: ``factory`` (or ``"module:function"``, imported when a run needs it)."""
    LAUNCHERS[name] = factory


def _factory(name: str) -> LauncherFactory:
    ref = LAUNCHERS[name]
    if callable(ref):
        return ref
    import importlib

    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


def plan_ranks(n_first: int, n_remote: int, servers: int, remote_servers: set[int], evaluator: bool, workers_by: str) -> list[Rank]:
    """Every process a run starts, each with its launcher: range servers 1..K-1 (on the hosts the hosts file
    places them, else here), workers ``0 .. n_first - 1`` started by ``workers_by`` (the local launcher, an srun
    step, or any registered one), the ``n_remote`` after them over SSH, and the evaluator (here)."""
    ranks = [Rank("server", i, "ssh" if i in remote_servers else LOCAL) for i in range(1, servers)]
    ranks += [Rank("worker", i, workers_by) for i in range(n_first)]
    ranks += [Rank("worker", i, "ssh") for i in range(n_first, n_first + n_remote)]
    if evaluator:
        ranks.append(Rank("evaluator", 0, LOCAL))
    return ranks


class LauncherGroup:
    """Every launcher of a run seen as one: the run loop starts, polls and stops this, never a launcher by name."""

    def __init__(self, launchers: dict[str, Launcher]) -> None:
        self.by_name = launchers

    @classmethod
    def build(cls, ctx: LaunchContext, wanted: set[str]) -> "LauncherGroup":
        """The registered launchers named in ``wanted`` (always the local one) whose factories apply to this run."""
        made = {}
        for name in [LOCAL, *sorted(wanted - {LOCAL})]:
            launcher = _factory(name)(ctx)
            if launcher is not None:
                made[name] = launcher
        return cls(made)

    def start(self, ranks: list[Rank]) -> None:
        missing = sorted({r.launcher for r in ranks} - set(self.by_name))
        if missing:
            raise ZsgdError(f"no launcher {missing[0]!r} for this run's {next(r for r in ranks if r.launcher == missing[0]).role}s")
        for name, launcher in self.by_name.items():
            mine = [r for r in ranks if r.launcher == name]
            if mine:
                launcher.start(mine)

    @property
    def children(self) -> list:
        return [c for launcher in self.by_name.values() for c in launcher.children]

    def running(self) -> list:
        return [c for c in self.children if c.returncode is None]

    def lost(self) -> str | None:
        """The first launcher's reason that its ranks cannot come back, or None."""
        return next((why for why in (launcher.lost() for launcher in self.by_name.values()) if why), None)

    def failed(self) -> str | None:
        """The first launcher's one line for a rank that ended with an error (``failed_child``), or None."""
        return next((why for why in (launcher.failed() for launcher in self.by_name.values()) if why), None)

    def stop_all(self, grace: float = 5.0) -> None:
        """Stop every launcher at once, so remote and local workers share one grace period."""
        threads = [threading.Thread(target=launcher.stop_all, args=(grace,)) for launcher in self.by_name.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
