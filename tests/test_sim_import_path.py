"""What a short ``zsgd sim`` imports before and while it simulates (issue 24: an arm that starts at once).

``zsgd.cli`` registers its commands by name and imports a command's module only when the command is looked
up (``zsgd.cli.COMMANDS``), so ``zsgd sim`` does not pay for the flags, launchers and SSH helpers of
``run``, ``remote`` and the rest. The parent of a ``zsgd sim`` also leaves matplotlib to its forked
plotting helpers (``zsgd.output.plotter``). These tests fail when a command module, or a heavy library,
slips back onto that path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from zsgd.cli import COMMANDS, main

HEAVY = ("numpy", "numba", "scipy", "zmq", "rich", "matplotlib", "torch")
OTHER_COMMANDS = ("zsgd.commands.run", "zsgd.commands.remote", "zsgd.commands.experiment", "zsgd.commands.train",
                  "zsgd.commands.worker", "zsgd.commands.data", "zsgd.commands.plot", "zsgd.remote", "zsgd.runtime.launch")
#: what the sim parent still imports and why (each outside the CLI): numba's package body imports scipy (a version
#: check; scipy.linalg is refused, zsgd.commands.group); zsgd.simulation.simulator imports zsgd.wire.protocol (zmq);
#: zsgd.simulation.parallel.ArmsView builds its rich Progress even when disabled (--quiet). A new library here fails.
KNOWN_ON_SIM_PATH = {"numpy", "numba", "scipy", "zmq", "rich"}

LOOKUP = f"""
import json, sys
import click
from zsgd.cli import main
main.get_command(click.Context(main), "sim")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith({OTHER_COMMANDS!r}))))
"""

RUN = f"""
import atexit, json, os, sys
pid = os.getpid()
atexit.register(lambda: os.getpid() == pid and print("MODULES " + json.dumps(sorted(
    m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith({OTHER_COMMANDS!r}))), file=sys.stderr))
sys.argv = ["zsgd", "sim", "--model", "logreg", "--steps", "200", "--quiet", "--out", sys.argv[1]]
from zsgd.cli import main
main()  # no arguments: as the zsgd script runs it (start_quickly, quick_exit; the exit handlers still run)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_every_registered_name_is_its_command():
    """Each lazily registered name loads a command of that name; ``--help`` lists the same commands as before."""
    for name, (module, attribute) in COMMANDS.items():
        command = main.get_command(None, name)
        assert command is not None and command.name == name, f"{name}: {module}.{attribute} is named {command and command.name}"
    listed = CliRunner().invoke(main, ["--help"], prog_name="zsgd")
    assert listed.exit_code == 0, listed.output
    shown = {line.split()[0] for line in listed.output.split("Commands:")[1].splitlines() if line.startswith("  ")}
    assert shown == {n for n in COMMANDS if not main.get_command(None, n).hidden}
    assert {"sim-arm", "experiment-arm"}.isdisjoint(shown)  # hidden stays hidden


def test_unknown_command_is_still_one_line():
    got = CliRunner().invoke(main, ["nosuch"], prog_name="zsgd")
    assert got.exit_code == 2 and "No such command 'nosuch'" in got.output


@pytest.mark.slow  # a new interpreter
def test_looking_up_sim_imports_no_other_command_and_no_library():
    out = _python(LOOKUP)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"imported by registering and looking up 'zsgd sim': {loaded}"


@pytest.mark.slow  # a whole zsgd sim in a new interpreter
def test_a_quiet_sim_parent_imports_only_what_it_uses(tmp_path):
    out = _python(RUN, str(tmp_path / "sim"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, out.stderr[-2000:]
    loaded = json.loads(lines[-1][len("MODULES "):])
    other = [m for m in loaded if m.startswith(OTHER_COMMANDS)]
    assert other == [], f"zsgd sim imported other commands' modules: {other}"
    libraries = {m.split(".")[0] for m in loaded} & set(HEAVY)
    assert libraries <= KNOWN_ON_SIM_PATH, f"new on the zsgd sim path: {sorted(libraries - KNOWN_ON_SIM_PATH)}"
    assert "matplotlib" not in libraries  # drawn by the forked helpers, never imported by the parent
