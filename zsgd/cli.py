"""The ``zsgd`` command line: the group and its commands, registered here.

Each command lives in ``zsgd.commands``; they are thin (parse flags, call
the modules that do the work) and import those lazily, so ``zsgd --help``
stays instant (numba and matplotlib cost a second to import). The command
modules themselves are imported only when their command is looked up
(``COMMANDS``): ``zsgd sim`` loads ``zsgd.commands.simulate`` and not the
flags, launchers and SSH helpers of ``run``, ``remote`` and the rest (about
30 ms of every short ``zsgd sim`` arm); ``zsgd --help`` looks up all of them.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from zsgd import __version__
from zsgd.commands.group import ZsgdGroup

#: command name -> (module, attribute) of its click command
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("zsgd.commands.train", "train"),
    "run": ("zsgd.commands.run", "run"),
    "broker": ("zsgd.commands.run", "broker"),
    "worker": ("zsgd.commands.worker", "worker"),
    "plot": ("zsgd.commands.plot", "plot"),
    "data": ("zsgd.commands.data", "data_group"),
    "remote": ("zsgd.commands.remote", "remote_group"),
    "keys": ("zsgd.commands.remote", "keys_group"),
    "sim": ("zsgd.commands.simulate", "sim_command"),
    "sim-arm": ("zsgd.commands.simulate", "sim_arm_command"),
    "experiment": ("zsgd.commands.experiment", "experiment_command"),
    "experiment-arm": ("zsgd.commands.experiment", "experiment_arm_command"),
}


class LazyGroup(ZsgdGroup):
    """A ``ZsgdGroup`` that imports a command's module when the command is looked up (run, help, completion)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attribute = COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="zsgd")
def main() -> None:
    """Distributed SGD over ZeroMQ: train across processes and machines, or
    simulate latency, stragglers and staleness in virtual time."""
