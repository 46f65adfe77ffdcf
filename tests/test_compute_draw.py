"""Random compute times: one seeded draw per worker and step, shared by ``zsgd sim --compute`` and
``zsgd run --inject-compute`` (``zsgd.network.compute_draw``), and the worker's stretch of its step."""

import numpy as np
import pytest

from helpers import cli, lines_of
from zsgd.errors import ZsgdError
from zsgd.runtime.worker.replies import emulated_stretch
from zsgd.runtime.run_options import RunOptions
from zsgd.network.compute_draw import ComputeDraw
from zsgd.network import ShiftedExponential, parse_compute, parse_delay


def test_shifted_exponential_spec_and_its_moments():
    d = parse_delay("shifted-exp:10ms,20ms", "compute time")
    assert d == ShiftedExponential(0.010, 0.020) and str(d) == "shifted-exp:10ms,20ms" and d.mean == pytest.approx(0.030)
    x = np.array([d.sample(np.random.default_rng(i)) for i in range(4000)])
    assert x.min() >= 0.010 and abs(x.mean() - 0.030) < 0.002  # 4000 draws: the mean within ~6 standard errors
    assert parse_delay("shifted-exp:0,5ms") == ShiftedExponential(0.0, 0.005)  # a unitless 0 takes its neighbour's unit


@pytest.mark.parametrize("bad,needle", [("shifted-exp:10ms", "takes 2"), ("shifted-exp:-1ms,2ms", ">= 0"), ("shifted-exp:1ms,x", "unit")])
def test_bad_shifted_exponential_specs(bad, needle):
    with pytest.raises(ZsgdError, match=needle):
        parse_compute(bad)


def test_draws_depend_on_seed_worker_and_step_only():
    spec = parse_compute("exp:20ms")
    a, b = ComputeDraw(spec, seed=7), ComputeDraw(spec, seed=7)
    forward = [[a.next(w) for _ in range(5)] for w in range(3)]
    interleaved = {w: [] for w in range(3)}
    for _ in range(5):  # another order of asking, as a sync round's replies may go out
        for w in (2, 0, 1):
            interleaved[w].append(b.next(w))
    assert forward == [interleaved[w] for w in range(3)]
    assert forward[0] != forward[1] and len(set(np.round(forward[0], 12))) == 5
    assert ComputeDraw(spec, seed=8).draw(0, 0) != a.draw(0, 0)
    one = ComputeDraw(spec, seed=7)
    rng = np.random.default_rng([7, 0xC0417E, 1, 3])
    assert one.draw(1, 3, local_steps=2) == pytest.approx(spec.sample(rng) + spec.sample(rng))  # local SGD: K draws of one stream


@pytest.mark.parametrize("spec", ["normal:5ms,1ms", "exp:3ms", "lognormal:2ms,0.5", "uniform:1ms,3ms", "10ms"])
def test_draws_are_the_generator_of_seed_tag_worker_and_step(spec):
    """The seed handed to SeedSequence as 32-bit words (and none for a constant, which draws nothing) gives the
    draws of ``default_rng([seed, tag, worker, step])``, bit for bit: same seed, same metrics as before."""
    from zsgd.network.compute_draw import _TAG

    for seed in (0, 3, 2**32 - 1, 2**32 + 5, -3):
        d = ComputeDraw(parse_compute(spec), seed)
        for worker in (0, 77, 2**32 - 1, 2**32):
            for step in (0, 5, 2**32):
                for k in (1, 3):
                    rng = np.random.default_rng([seed & 0xFFFFFFFF, _TAG, worker, step])
                    assert d.draw(worker, step, k) == float(sum(d.spec.sample(rng) for _ in range(k)))


def test_the_run_draws_what_the_simulation_draws():
    """``zsgd run --inject-compute``'s emulator (built as the run builds it) hands each worker the draws
    ``zsgd sim --compute`` gives that worker's steps, for the same seed."""
    opts = RunOptions.from_flags({"n_proc": 3, "algo": "ksync:2", "inject_compute": "shifted-exp:10ms,20ms"}).validate()
    emulator = opts.emulator(seed=11)
    sim = ComputeDraw(parse_compute("shifted-exp:10ms,20ms"), 11)  # what zsgd.sim.Simulation builds from cfg.seed
    got = [emulator.compute_target(w) for _ in range(4) for w in range(3)]
    assert got == [sim.draw(w, n) for n in range(4) for w in range(3)]
    assert RunOptions.from_flags({"inject_compute": "0"}).emulator(seed=1) is None  # "0": nothing stretched, nothing emulated


def test_reply_stretch_is_validated_like_any_broker_message():
    assert emulated_stretch({"compute_target_s": 0.025, "slowdown": 3}) == (0.025, 3.0)
    for meta in ({}, {"compute_target_s": "1", "slowdown": None}, {"compute_target_s": float("inf"), "slowdown": -2.0},
                 {"compute_target_s": 1e9, "slowdown": True}):
        assert emulated_stretch(meta) == (0.0, 1.0)


@pytest.mark.parametrize("args,needle", [
    (["--inject-compute", "shifted-exp:5ms"], "--inject-compute 'shifted-exp:5ms': shifted-exp takes 2"),
    (["--inject-compute", "exp:20ms", "--algo", "dsgd", "--topology", "ring"], "--inject-compute stretches the steps a parameter server"),
    (["--algo", "kasync:0"], "kasync needs K >= 1"),
    (["--inject-compute", "trace:/nonexistent/steps.csv"], "file not found"),
])
def test_bad_flags_are_one_line(tmp_path, args, needle):
    result = cli("run", "--n-proc", "2", "--model", "logreg", "--data", "embedded", "--steps", "5", *args, "--out", str(tmp_path / "r"))
    lines = lines_of(result.stderr)
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_stretch_listens_and_an_abandon_ends_it():
    """The worker's hold: a WAIT abandon for a newer version ends it (nothing handed back, nothing more awaited);
    one for the step's own version is stale news; any other message ends it and is handed back; without
    messages it holds for the draw, then for the straggler factor."""
    import time

    from zsgd.runtime.worker.replies import stretch_step
    from zsgd.wire import protocol

    asked: list[float] = []

    def feed(*messages):
        queue = list(messages)

        def recv(timeout):
            asked.append(timeout)
            if queue:
                return queue.pop(0)
            time.sleep(timeout)
            return None
        return recv

    assert stretch_step(time.monotonic(), 600.0, 1.0, recv=feed(protocol.wait_message("r", 0, 5, reason="abandon")), version=4) is None
    assert len(asked) == 1  # ended by the abandon: the ten minutes drawn were never waited for
    leave = protocol.leave("r", 0, "done")
    asked.clear()
    got = stretch_step(time.monotonic(), 600.0, 1.0, recv=feed(protocol.wait_message("r", 0, 4, reason="abandon"), leave), version=4)
    assert got is leave and len(asked) == 2
    asked.clear()
    assert stretch_step(time.monotonic(), 0.02, 2.0, recv=feed()) is None
    assert len(asked) == 2 and 0 < asked[0] <= 0.02 and asked[1] > 0  # the draw, then the straggler's stretch of it


@pytest.mark.parametrize("args,needle", [
    (["--compute", "shifted-exp:1ms"], "shifted-exp takes 2"),
])
def test_bad_sim_flags_are_one_line(tmp_path, args, needle):
    result = cli("sim", "--workers", "2", "--model", "logreg", "--data", "embedded", "--steps", "5", *args, "--out", str(tmp_path / "s"))
    lines = lines_of(result.stderr)
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_a_per_round_spec_draws_once_for_a_local_sgd_round():
    """round:SPEC: the K steps of a local-SGD round are one draw (slow or fast together), not K draws."""
    from zsgd.network.delays import PerRound, parse_compute

    spec = parse_compute("round:exp:10ms")
    assert isinstance(spec, PerRound) and str(spec) == "round:exp:10ms" and spec.mean == pytest.approx(0.01)
    per_round, per_step = ComputeDraw(spec, 7), ComputeDraw(parse_compute("exp:10ms"), 7)
    assert per_round.draw(2, 5, local_steps=4) == per_step.draw(2, 5, local_steps=1)  # the round's one draw
    assert per_step.draw(2, 5, local_steps=4) != per_step.draw(2, 5, local_steps=1)  # four draws summed
    with pytest.raises(ZsgdError, match="compute time per round"):
        parse_compute("round:soon")


def test_the_twin_of_a_local_sgd_run_draws_its_rounds(tmp_path, monkeypatch):
    from zsgd.experiments import twin

    monkeypatch.setattr(twin, "turnaround_samples", lambda _d: [0.04, 0.08])
    assert twin.compute_trace(tmp_path, tmp_path / "t.csv", steps=4, per_round=True) == f"round:trace:{tmp_path / 't.csv'}"
    assert (tmp_path / "t.csv").read_text().split() == ["0.0400", "0.0800"]
    assert twin.compute_trace(tmp_path, tmp_path / "u.csv", steps=4) == f"trace:{tmp_path / 'u.csv'}"  # per step (decentralized)
    assert (tmp_path / "u.csv").read_text().split() == ["0.0100", "0.0200"]


def test_a_first_step_is_slowed_down_on_its_draw_alone():
    """A worker's first step holds the process's one-time costs (kernels loaded or compiled): a straggler's factor
    applies to its drawn time, not to all it took, and without a draw not at all."""
    import time

    from zsgd.runtime.worker.replies import stretch_step
    from zsgd.wire import protocol

    asked: list[float] = []

    def recv(timeout):
        asked.append(timeout)
        return protocol.leave("r", 0, "done")  # a message ends the hold at once: the test reads what it was asked

    slow_start = time.monotonic() - 5.0  # a first step that took 5 s (a compile)
    stretch_step(slow_start, 0.0, 3.0, recv=recv, first=True)
    assert asked == []  # no draw: not slowed down (it was held 10 s more)
    stretch_step(slow_start, 0.01, 3.0, recv=recv, first=True)
    assert len(asked) == 1 and asked[0] == pytest.approx(0.02, abs=1e-6)  # (3 - 1) x the 10 ms drawn, not x 5 s
    asked.clear()
    stretch_step(slow_start, 0.0, 3.0, recv=recv)
    assert len(asked) == 1 and asked[0] > 9.9  # any later step: the factor times all it took
