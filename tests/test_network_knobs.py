"""One schema of the network knobs (``zsgd.network.knobs``): ``zsgd sim``'s flags, the sweep's axes, the
experiment file's keys and ``zsgd run``'s emulation flags are all read from it.

The single-source test adds a knob to the table and finds it in every place; the same checks run on a
table without it find it nowhere, so a place that kept its own list would fail them. The coverage tests
make sure every knob of the real table does something: changing it changes the simulated arm, and each
emulated one reaches ``zsgd run``'s options."""

from __future__ import annotations

import re
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from helpers import cli
from zsgd.errors import ZsgdError
from zsgd.network import knobs, parse_delay
from zsgd.network.knobs import RUN, SIM, Knob, all_knobs, emulated

JITTER = Knob("jitter", "Extra latency of each message, e.g. 1ms.", lambda text, _what, _n: parse_delay(text, "jitter"),
              default="0", sweep="units", label="jit", file=(SIM,), run_flag="--inject-jitter", run_help="Emulate jitter.")

EXPERIMENT = """\
problem: {{model: logreg, data: embedded, steps: 4}}
defaults: {{compute: 1ms, broker_time: 0, broker_bandwidth: inf}}
arms:
  - {{name: a, workers: 2{extra}}}
"""


def _command_params(decorator, args: list[str]) -> tuple[int, dict, str]:
    """Invoke a fresh click command carrying ``decorator``'s options; its exit code, params and output."""
    seen: dict = {}

    @click.command()
    @decorator
    def command(**params):
        seen.update(params)

    result = CliRunner().invoke(command, args)
    return result.exit_code, seen, result.output


def _experiment(tmp_path, extra: str):
    from zsgd.experiments.config import load_experiment

    path = tmp_path / "e.yaml"
    path.write_text(EXPERIMENT.format(extra=extra))
    return load_experiment(path)


@pytest.mark.parametrize("added", [True, False])
def test_a_knob_added_to_the_schema_appears_in_every_place(monkeypatch, tmp_path, added):
    """CLI option, sweep axis and experiment key from one table entry (and none of them without it)."""
    from zsgd.commands.options import pop_network, run_emulation_options, sim_network_options
    from zsgd.experiments.config import arm_keys
    from zsgd.simulation.sweep import SweepSpec, build_arms, dimensions

    if added:
        monkeypatch.setattr(knobs, "KNOBS", knobs.KNOBS + (JITTER,))
    # zsgd sim's flag, with its default and help, and pop_network hands its value on
    code, params, _out = _command_params(sim_network_options, ["--jitter", "1,2ms"])
    assert (code == 0) is added
    if added:
        assert pop_network(params)["jitter"] == "1,2ms" and not params
        _c, _p, help_text = _command_params(sim_network_options, ["--help"])
        assert "--jitter" in help_text and "Extra latency of each message" in help_text and "A comma list makes arms" in help_text
    # zsgd run's emulation flag
    code, params, _out = _command_params(run_emulation_options, ["--inject-jitter", "1ms"])
    assert (code == 0 and params["inject_jitter"] == "1ms") is added
    # the sweep: an axis whose comma list makes arms, labelled, with every value parsed up front
    assert ("jitter" in [d.key for d in dimensions()]) is added
    arms = build_arms(SweepSpec(grid={"workers": "2", "jitter": "1,2ms"}))
    assert [a.label for a in arms] == (["jit=1ms", "jit=2ms"] if added else ["async"])
    if added:
        with pytest.raises(ZsgdError, match="bad jitter 'soon'"):
            build_arms(SweepSpec(grid={"workers": "2", "jitter": "soon"}))
    # the experiment file: a key of sim arms, checked at its line, refused as a list and on run arms
    assert ("jitter" in arm_keys()) is added
    if added:
        (arm,) = _experiment(tmp_path, ", jitter: 5ms").arms
        assert arm.settings["jitter"] == "5ms"
        for extra, words in ((", jitter: soon", "bad jitter 'soon'"), (", jitter: '1,2ms'", "is a list"),
                             (", jitter: 5ms, mode: run", "'jitter' applies to sim arms only")):
            with pytest.raises(ZsgdError, match=words):
                _experiment(tmp_path, extra)
    else:
        with pytest.raises(ZsgdError, match="unknown key 'jitter'"):
            _experiment(tmp_path, ", jitter: 5ms")


# One value other than the default for every knob. A knob added to the table must be added here too, and the
# tests below then check that it changes what is simulated (a knob that did nothing would be a silent lie).
SAMPLES = {"latency": "5ms", "latency_up": "5ms", "latency_down": "5ms", "latency_worker": ("0=5ms",), "bandwidth": "1Gbps",
           "broker_bandwidth": "1Gbps", "loss": "1%", "retransmit": "100ms", "compute": "5ms", "stragglers": "0.5:2x",
           "failures": "1@1s", "detect": "1s", "broker_time": "1ms", "placement": "local", "host_cores": "64"}


def test_every_knob_has_a_sample():
    assert set(SAMPLES) == {k.name for k in all_knobs()}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_knob_changes_the_simulated_arm(name):
    from zsgd.simulation.sweep import SweepSpec, build_arms

    k = knobs.knob(name)

    def opts(value) -> str:
        grid, fixed = {"workers": "4"}, {}
        if value is not None:
            (grid if k.sweep else fixed)[name] = value
        (arm,) = build_arms(SweepSpec(grid=grid, **fixed))
        return re.sub(r" at 0x[0-9a-f]+", "", repr(arm.opts))  # Measured() objects differ by address only

    assert opts(k.default) == opts(None)  # the flag's default is what an unset key simulates
    assert opts(SAMPLES[name]) != opts(k.default)


def test_run_emulates_exactly_the_knobs_with_a_run_flag():
    """Each emulated knob is an ``EmulationOptions`` field that builds the real run's emulator; the experiment
    file's run-arm keys are a subset (--inject-compute and --inject-broker-bandwidth are flags only)."""
    from zsgd.runtime.run_options import EmulationOptions

    assert {f.name for f in fields(EmulationOptions)} == {k.run_name for k in emulated()}
    for k in emulated():
        assert EmulationOptions(**{k.run_name: str(SAMPLES[k.name])}).emulator(4, 0) is not None, k.name
    assert all(k.run_flag for k in all_knobs() if RUN in k.file)


def test_the_commands_list_every_knob_from_the_table():
    sim_help, run_help = cli("sim", "--help").output, cli("run", "--help").output
    for k in all_knobs():
        assert k.flag in sim_help, k.flag
    for k in emulated():
        assert k.run_flag in run_help, k.run_flag
    assert "--inject-retransmit" not in run_help  # and nothing the table does not name


def test_a_knob_that_contradicts_itself_fails_on_import():
    parse = JITTER.parse
    with pytest.raises(ValueError, match="inconsistent network knob 'x'"):
        Knob("x", "", parse, file=(SIM, RUN))  # a run-arm key needs a run flag to emulate it
    with pytest.raises(ValueError, match="inconsistent"):
        Knob("x", "", parse, sweep="units")  # an axis needs a label for the arms' names
    with pytest.raises(ValueError, match="inconsistent"):
        Knob("x", "", parse, sweep="commas", label="x")
