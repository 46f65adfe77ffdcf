"""The ``zsgd`` command line: the group and its commands, registered here.

Each command lives in ``zsgd.commands``; they are thin (parse flags, call
the modules that do the work) and import those lazily, so ``zsgd --help``
stays instant (numba and matplotlib cost a second to import).
"""

from __future__ import annotations

import click

from zsgd import __version__
from zsgd.commands.data import data_group
from zsgd.commands.experiment import experiment_arm_command, experiment_command
from zsgd.commands.group import ZsgdGroup
from zsgd.commands.plot import plot
from zsgd.commands.remote import keys_group, remote_group
from zsgd.commands.run import broker, run
from zsgd.commands.simulate import sim_arm_command, sim_command
from zsgd.commands.train import train
from zsgd.commands.worker import worker


@click.group(cls=ZsgdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="zsgd")
def main() -> None:
    """Distributed SGD over ZeroMQ: train across processes and machines, or
    simulate latency, stragglers and staleness in virtual time."""


for command in (train, run, broker, worker, plot, data_group, remote_group, keys_group, sim_command, sim_arm_command,
                experiment_command, experiment_arm_command):
    main.add_command(command)
