"""The host model (``zsgd.network.hosts``): a host's cores shared by the threads of a run, on the virtual clock.

Processor sharing is checked against its arithmetic (no timing): D threads
on C < D cores each run at C / D of a core; jobs that start later or end
earlier change the others' speed from that moment on. Then the simulator's
``--placement local`` against the closed forms of a saturated host.
"""

from __future__ import annotations

import heapq
import math

import pytest

from helpers import cli
from zsgd.core.config import TrainConfig
from zsgd.core.problem import Problem
from zsgd.errors import ZsgdError
from zsgd.network import Constant
from zsgd.network.hosts import CpuPool, FifoStage, crossing_stage, parse_host_cores, parse_placement, this_machines_cores
from zsgd.sim import SimOptions, Workload, run_arm


class Clock:
    """A tiny event loop for a pool: the pool schedules its next end here, and ``run`` delivers them in time order."""

    def __init__(self, cores: float) -> None:
        self.events: list = []
        self.seq = 0
        self.pool = CpuPool(cores, self.schedule)
        self.ends: dict[str, float] = {}

    def schedule(self, t, pool, generation):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, generation))

    def job(self, now: float, name: str, work: float, demand: float = 1.0):
        return self.pool.start(now, work, demand, lambda t: self.ends.__setitem__(name, t))

    def run(self, until: float = math.inf) -> None:
        while self.events and self.events[0][0] <= until:
            t, _seq, generation = heapq.heappop(self.events)
            self.pool.on_event(t, generation)


def test_threads_within_the_cores_run_at_full_speed():
    c = Clock(2)
    c.job(0.0, "a", 1.0)
    c.job(0.0, "b", 2.0)
    c.run()
    assert c.ends == pytest.approx({"a": 1.0, "b": 2.0})


def test_more_threads_than_cores_share_them_equally():
    c = Clock(2)
    for name in "abcd":
        c.job(0.0, name, 1.0)
    c.run()
    assert c.ends == pytest.approx({n: 2.0 for n in "abcd"})  # 4 threads on 2 cores: each at half speed


def test_the_rate_changes_when_a_job_starts_or_ends():
    c = Clock(1)
    c.job(0.0, "a", 1.0)  # alone until t=0.5 (0.5 done), then shared: 0.5 left at half speed -> ends at 1.5
    c.run(until=0.5)
    c.job(0.5, "b", 0.25)  # shares from 0.5: 0.25 at half speed -> ends at 1.0; a has 0.25 left then, alone -> 1.25
    c.run()
    assert c.ends == pytest.approx({"b": 1.0, "a": 1.25})


def test_a_job_with_several_threads_counts_each():
    c = Clock(2)
    c.job(0.0, "pair", 1.0, demand=2.0)
    c.job(0.0, "one", 1.0)
    c.run()
    assert c.ends == pytest.approx({"pair": 1.5, "one": 1.5})  # 3 threads on 2 cores: each at 2/3


def test_a_cancelled_job_never_ends_and_frees_its_share():
    c = Clock(1)
    j = c.job(0.0, "a", 10.0)
    c.job(0.0, "b", 1.0)
    c.run(until=1.0)
    assert c.pool.attained(1.0, j) == pytest.approx(0.5)
    c.pool.cancel(1.0, j)
    c.run()
    assert "a" not in c.ends and c.ends["b"] == pytest.approx(1.5)  # 0.5 left, alone from t=1


def test_occupancy_slows_the_jobs_beside_it():
    c = Clock(1)
    c.job(0.0, "a", 1.0)
    c.pool.occupy(0.0, 1.0)  # a message crossing: a thread busy, not itself slowed
    c.run(until=1.0)
    c.pool.occupy(1.0, -1.0)
    c.run()
    assert c.ends["a"] == pytest.approx(1.5)  # half speed for 1 s (0.5 done), then 0.5 alone


def test_a_fifo_stage_serves_one_request_at_a_time_on_the_pool():
    c = Clock(1)
    stage = FifoStage(c.pool)
    done: list[tuple[str, float]] = []
    for name in "xyz":
        stage.submit(0.0, 1.0, lambda t, name=name: done.append((name, t)))
    c.job(0.0, "other", 1.0)  # shares the core with the stage's first request
    c.run()
    assert [n for n, _t in done] == ["x", "y", "z"]
    assert [t for _n, t in done] == pytest.approx([2.0, 3.0, 4.0])


def test_a_stage_with_a_tail_serves_the_next_request_while_the_tail_runs_beside_it():
    """``FifoStage(tail=f)``: a request holds the stage for 1 - f of its work; the rest runs on the pool after it, at
    ``tail_demand`` threads, while the stage serves the next request. Alone a request still takes its whole work."""
    c = Clock(4)
    stage, done = FifoStage(c.pool, 1.0, tail=0.75, tail_demand=1.0), []
    for name in "xyz":
        stage.submit(0.0, 1.0, lambda t, name=name: done.append((name, t)))
    c.run()
    assert done == [("x", pytest.approx(1.0)), ("y", pytest.approx(1.25)), ("z", pytest.approx(1.5))]
    c = Clock(1)  # one core: the tails (one thread each) and the stage's parts share it, so the three take their sum
    stage, done = FifoStage(c.pool, 1.0, tail=0.5, tail_demand=1.0), []
    for _ in range(3):
        stage.submit(0.0, 1.0, done.append)
    c.run()
    assert max(done) == pytest.approx(3.0)


def test_a_crossing_holds_the_io_thread_for_its_measured_share_and_keeps_its_measured_threads_busy():
    """``crossing_stage``: with the I/O thread's share s of a lone exchange measured, the stage is held for s of each
    crossing and the rest runs after it on (threads - s) / (1 - s) threads: the same CPU in all. Without it (an older
    record) the whole crossing holds the stage, on the measured threads (2 when those were not measured either)."""
    old, older = crossing_stage(Clock(2).pool, 2, 0.8, None), crossing_stage(Clock(2).pool, 1, None, None)
    assert (old.demand, old.tail, older.demand, older.tail) == (1.6, 0.0, 2.0, 0.0)
    stage = crossing_stage(Clock(2).pool, 2, 0.8, 0.4, 0.3, seed=5)
    assert stage.demand == 2.0 and stage.tail == pytest.approx(0.6) and stage.tail_demand == pytest.approx(2 * 0.4 / 0.6)
    cpu = (1 - stage.tail) * stage.demand + stage.tail * stage.tail_demand
    assert cpu == pytest.approx(0.8 * 2) and stage.spread == 0.3  # per unit of work: the lone echo's threads, K servers
    assert crossing_stage(Clock(2).pool, 1, 0.3, 0.6).tail_demand == 0.0  # a noisy share above the threads: no negative CPU
    assert crossing_stage(Clock(2).pool, 1, 1.0, 1.5).tail == 0.0  # at most the whole crossing


def test_utilisation_is_counted():
    c = Clock(4)
    c.job(0.0, "a", 2.0)
    c.run()
    c.pool._advance(4.0)
    assert c.pool.busy_core_s == pytest.approx(2.0)


@pytest.mark.parametrize("text,want", [("2", 2.0), ("16", 16.0), ("0.5", 0.5), ("auto", float(this_machines_cores()))])
def test_host_cores_parse(text, want):
    assert parse_host_cores(text) == want


@pytest.mark.parametrize("text", ["0", "-2", "nan", "inf", "lots", "1e9"])
def test_bad_host_cores_are_one_line_errors(text):
    with pytest.raises(ZsgdError, match="--host-cores"):
        parse_host_cores(text)


def test_a_stage_with_a_spread_draws_each_requests_work_around_its_mean_the_same_every_run():
    """``FifoStage(spread=c)``: each request's work is gamma-drawn with mean as given and coefficient of variation c,
    from a seeded generator: the total is about the sum, the same seed gives the same ends, no spread exact ones."""
    def ends(spread, seed=0, n=4000):
        c = Clock(2)
        stage, out = FifoStage(c.pool, 1.0, spread, seed), []
        for _ in range(n):
            stage.submit(0.0, 0.001, out.append)
        c.run()
        return out

    exact, drawn = ends(None), ends(0.5)
    assert exact[-1] == pytest.approx(4.0) and exact[0] == pytest.approx(0.001)
    assert drawn[-1] == pytest.approx(4.0, rel=0.05) and drawn == ends(0.5) and drawn != ends(0.5, seed=1)
    gaps = [b - a for a, b in zip([0.0] + drawn, drawn)]
    mean = sum(gaps) / len(gaps)
    assert (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean == pytest.approx(0.5, rel=0.1)


def test_placement_parse():
    assert parse_placement(" Local ") == "local" and parse_placement("spread") == "spread"
    with pytest.raises(ZsgdError, match="--placement"):
        parse_placement("everywhere")


# -- the simulator on a shared host ---------------------------------------------------------------------

C, T = 0.010, 0.001  # a worker's step, the server's step


@pytest.fixture(scope="module")
def workload() -> Workload:
    cfg = TrainConfig(model="logreg", data="embedded", steps=400, lr=0.02, eval_every=10**6).validate()
    return Workload(cfg, Problem.from_config(cfg))


def rate(workload, tmp_path, n: int, cores: float, placement: str = "local", algo: str = "async") -> float:
    opts = SimOptions(algo=algo, n_workers=n, compute=Constant(C), broker_s=T, broker_bandwidth=math.inf, placement=placement,
                      host_cores=cores)
    return run_arm(workload.cfg, opts, workload, tmp_path / f"{placement}-{n}-{cores}-{algo}").summary["updates_per_s"]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_async_on_a_shared_host_saturates_at_its_cores(workload, tmp_path, n):
    """Each update is C + T of CPU; with the host's 2 cores busy the rate is 2 / (C + T), never N / (C + T)."""
    spread = rate(workload, tmp_path, n, 2, "spread")
    local = rate(workload, tmp_path, n, 2)
    assert spread == pytest.approx(min(n / (C + T), 1 / T), rel=0.03)
    assert local == pytest.approx(min(n, 2) / (C + T) if n <= 2 else 2 / (C + T), rel=0.03)
    assert rate(workload, tmp_path, n, 64) == pytest.approx(spread, rel=0.03)  # cores to spare: the cluster's figure


def test_sync_rounds_on_a_shared_host_take_turns(workload, tmp_path):
    """4 workers' steps on 2 cores take 2 C, then the server takes the 4 gradients (T each, the calibrated step is
    per update): one round per 2 C + 4 T, against C + 4 T with a core each."""
    assert rate(workload, tmp_path, 4, 2, algo="sync") == pytest.approx(1 / (2 * C + 4 * T), rel=0.03)
    assert rate(workload, tmp_path, 4, 4, algo="sync") == pytest.approx(1 / (C + 4 * T), rel=0.03)


def test_the_same_seed_gives_the_same_metrics_on_a_shared_host(workload, tmp_path):
    a = (tmp_path / "a")
    b = (tmp_path / "b")
    for out in (a, b):
        run_arm(workload.cfg, SimOptions(algo="ksync:2", n_workers=4, compute=Constant(C), broker_s=T, broker_bandwidth=1e9,
                                         placement="local", host_cores=2), workload, out)
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()


def test_cli_sweeps_host_cores_and_placement(tmp_path):
    out = tmp_path / "sweep"
    r = cli("sim", "--workers", "4", "--placement", "spread,local", "--host-cores", "2,16", "--compute", "10ms", "--broker-time", "1ms",
            "--broker-bandwidth", "inf", "--steps", "200", "--eval-every", "1000000", "--quiet", "--out", str(out))
    assert r.exit_code == 0, r.output
    import json

    rates = {}
    for arm in sorted(p for p in out.iterdir() if p.is_dir()):
        s = json.loads((arm / "summary.json").read_text())
        rates[(s["sim"]["placement"], s["sim"]["host_cores"])] = s["updates_per_s"]
    assert rates[("local", 2.0)] == pytest.approx(2 / (C + T), rel=0.05)
    assert rates[("local", 16.0)] == pytest.approx(rates[("spread", 16.0)], rel=0.03) == pytest.approx(4 / (C + T), rel=0.05)


def test_local_placement_is_refused_for_decentralized_algorithms(tmp_path):
    r = cli("sim", "--algo", "dsgd", "--workers", "4", "--placement", "local", "--steps", "20", "--quiet", "--out", str(tmp_path / "d"))
    assert r.exit_code != 0 and "--placement local" in r.output and "Traceback" not in r.output


def test_auto_host_cores_are_a_replayed_calibrations_machine(tmp_path):
    """--calibration FILE replays figures measured on another machine: --host-cores auto means that machine's cores."""
    from zsgd.simulation import calibration

    record = {"source": "elsewhere", "machine": {"cpu": "big", "cores": 16}}
    previous = calibration.use(calibration.Calibration("replay", record, source="elsewhere.json"))
    try:
        opts = SimOptions(algo="async", n_workers=2, compute=Constant(C), broker_s=T, broker_bandwidth=math.inf, placement="local")
        assert opts.validate().host_cores == 16.0
    finally:
        calibration.use(previous)
    assert SimOptions(placement="local").validate().host_cores == float(this_machines_cores())


def test_a_crossing_is_cpu_work_of_two_threads_shared_out_by_the_hosts_cores(workload, tmp_path, monkeypatch):
    """--placement local with the transport measured: a message crossing loopback is CPU work (the lone echo's time
    for it) of two threads, the server's I/O thread and the peer's, one crossing at a time per server's I/O thread.
    Alone it takes its lone time; beside other threads the host's processor sharing stretches it."""
    from zsgd.simulation.transport import Transport

    u, w = workload.update_bytes, workload.weights_bytes
    lone = 100 * (u + w)  # a lone exchange (both crossings) takes 10 ms; the loaded figure is not what local uses
    monkeypatch.setattr(Workload, "transport_model", lambda self, opts: (Transport(lone / 3, 0.5, lone), True))
    exchange = (u + w) / (2 * lone)  # 5 ms

    def rate(n: int, servers: int, cores: float, step: float = 0.0) -> float:
        opts = SimOptions(algo="async", n_workers=n, compute=Constant(0.0), broker_s=step, servers=servers, placement="local",
                          host_cores=cores)
        summary = run_arm(workload.cfg, opts, workload, tmp_path / f"n{n}-k{servers}-c{cores}-t{step}").summary
        assert summary["broker_lone_bandwidth_Bps"] == lone
        return summary["updates_per_s"]

    assert rate(1, 1, 2) == pytest.approx(1 / exchange, rel=0.03)  # lone: the echo's own figure
    assert rate(8, 1, 2) == pytest.approx(1 / exchange, rel=0.03)  # one I/O thread: no more, however many workers
    assert rate(8, 2, 2) == pytest.approx(1 / exchange, rel=0.03)  # two I/O threads, two threads each, on 2 cores: no more
    assert rate(8, 4, 4) == pytest.approx(2 / exchange, rel=0.03)  # 8 threads' crossings on 4 cores
    assert rate(8, 4, 16) == pytest.approx(4 / exchange, rel=0.03)  # cores to spare: each server's I/O thread crosses its range
    t = 0.004  # the server's step beside the crossings: alone it adds; on 2 busy cores the CPU of an update is shared
    assert rate(1, 1, 2, t) == pytest.approx(1 / (exchange + t), rel=0.03)
    assert rate(8, 1, 2, t) == pytest.approx(2 / (2 * exchange + t), rel=0.03)  # 2 threads x crossings + the step, on 2 cores
    assert rate(8, 1, 16, t) == pytest.approx(1 / exchange, rel=0.03)  # a core each: the I/O thread is the slowest stage


def test_the_broker_loop_and_the_measured_crossing_threads_are_cpu_work_on_the_host(workload, tmp_path, monkeypatch):
    """--placement local with the step and transport measured: the real broker's per-message cost beyond its step
    (``calibrate.broker_loop``) runs on the server's thread beside the step, and a crossing keeps the lone echo's
    measured threads busy (``lone_threads``), not two. One worker alone: exchange + step + loop. A cluster
    (--placement spread) is charged neither."""
    from zsgd.network import Measured
    from zsgd.simulation import calibrate
    from zsgd.simulation.transport import Transport

    u, w = workload.update_bytes, workload.weights_bytes
    lone = 100 * (u + w)  # a lone exchange takes 10 ms
    exchange, step, loop = (u + w) / (2 * lone), 0.002, 0.003
    monkeypatch.setattr(Workload, "broker_model", lambda self, opts: (step, [step]))
    monkeypatch.setattr(calibrate, "local_server", lambda wl, opts, t: (loop if calibrate.charges_loop(opts) else 0.0, t))

    def run(n: int, threads: float | None, cores: float = 2, placement: str = "local") -> dict:
        monkeypatch.setattr(Workload, "transport_model", lambda self, opts: (Transport(lone / 3, 0.5, lone, threads), True))
        opts = SimOptions(algo="async", n_workers=n, compute=Constant(0.0), broker_s=Measured(), broker_bandwidth=Measured(),
                          placement=placement, host_cores=cores)
        return run_arm(workload.cfg, opts, workload, tmp_path / f"{placement}-n{n}-t{threads}-c{cores}").summary

    alone = run(1, 1.0)
    assert alone["broker_loop_s"] == loop and alone["crossing_threads"] == 1.0
    assert alone["updates_per_s"] == pytest.approx(1 / (exchange + step + loop), rel=0.03)
    # one thread a crossing and one for the step and loop: 2 cores hold both, so the I/O thread sets the plateau
    assert run(8, 1.0)["updates_per_s"] == pytest.approx(1 / exchange, rel=0.03)
    # two threads a crossing (a record from before its CPU was measured): the cores hold an update's CPU, shared
    old = run(8, None)
    assert old["crossing_threads"] == 2.0 and old["updates_per_s"] == pytest.approx(2 / (2 * exchange + step + loop), rel=0.03)
    spread = run(1, 1.0, placement="spread")
    assert spread["broker_loop_s"] == 0.0 and spread["crossing_threads"] is None  # a cluster's server: unchanged


def test_crossings_as_varied_as_the_lone_echos_bend_the_knee_and_keep_its_ends(workload, tmp_path, monkeypatch):
    """A measured spread of the lone exchange (``lone_spread``): each crossing's time is drawn around its mean. One
    worker alone keeps its mean cycle, the plateau stays the I/O thread's, and two workers no longer fall into a
    perfect pipeline through it (they queue now and then, as real ones do); the same seed gives the same run."""
    from zsgd.network import Measured
    from zsgd.simulation.transport import Transport

    u, w = workload.update_bytes, workload.weights_bytes
    lone = 100 * (u + w)  # a lone exchange takes 10 ms; one thread a crossing
    exchange, step = (u + w) / (2 * lone), 0.004

    def rate(n: int, spread: float | None, name: str = "") -> float:
        monkeypatch.setattr(Workload, "transport_model", lambda self, opts: (Transport(lone, 0.5, lone, 1.0, spread), True))
        opts = SimOptions(algo="async", n_workers=n, compute=Constant(0.0), broker_s=step, broker_bandwidth=Measured(),
                          placement="local", host_cores=16)
        return run_arm(workload.cfg, opts, workload, tmp_path / f"n{n}-s{spread}{name}").summary["updates_per_s"]

    assert rate(2, None) == pytest.approx(1 / exchange, rel=0.03)  # constant times: two workers already at the plateau
    assert rate(1, 1.0) == pytest.approx(1 / (exchange + step), rel=0.08)
    assert rate(2, 1.0) < 0.92 / exchange  # queueing behind each other now and then
    assert rate(8, 1.0) == pytest.approx(1 / exchange, rel=0.08)
    assert rate(2, 1.0) == rate(2, 1.0, "again")


def test_the_io_threads_share_lets_crossings_overlap_up_to_the_cores(workload, tmp_path, monkeypatch):
    """The echo server's I/O thread measured busy for a share s of a lone exchange: a worker alone still takes the lone
    exchange, but with several in flight the I/O thread is held only s of each crossing, so the plateau is
    1 / (s x exchange) where the cores allow, and the cores' share of the crossings' CPU where they do not."""
    from zsgd.network import Measured
    from zsgd.simulation.transport import Transport

    u, w = workload.update_bytes, workload.weights_bytes
    lone = 100 * (u + w)  # a lone exchange takes 10 ms
    exchange = (u + w) / (2 * lone)

    def rate(n: int, threads: float, share: float | None, cores: float) -> float:
        monkeypatch.setattr(Workload, "transport_model", lambda self, opts: (Transport(lone, 0.5, lone, threads, None, share), True))
        opts = SimOptions(algo="async", n_workers=n, compute=Constant(0.0), broker_s=0.0, broker_bandwidth=Measured(),
                          placement="local", host_cores=cores)
        summary = run_arm(workload.cfg, opts, workload, tmp_path / f"n{n}-t{threads}-s{share}-c{cores}").summary
        assert summary["crossing_io_share"] == share and summary["crossing_threads"] == threads
        return summary["updates_per_s"]

    assert rate(1, 1.0, 0.5, 16) == pytest.approx(1 / exchange, rel=0.03)  # alone: the lone exchange
    assert rate(8, 1.0, 0.5, 16) == pytest.approx(2 / exchange, rel=0.03)  # cores to spare: the I/O thread's share
    assert rate(8, 1.0, None, 16) == pytest.approx(1 / exchange, rel=0.03)  # an older record: the whole crossing
    assert rate(8, 1.0, 0.5, 1.5) == pytest.approx(1.5 / exchange, rel=0.03)  # 1 thread a crossing on 1.5 cores


def test_the_loop_records_own_lone_echo_is_what_local_crossings_take(workload, tmp_path, monkeypatch):
    """``calibrate.local_server``: where the loop is charged and its record holds the lone echo measured in the same
    rounds, the crossings take those figures (one worker alone is then the broker's lone cycle of those minutes);
    a record from before it had them replays with the transport's own lone figures; a cluster is charged nothing."""
    from zsgd.network import Measured
    from zsgd.simulation import calibrate
    from zsgd.simulation.calibration import Calibration, key_text
    from zsgd.simulation.transport import Transport

    transport = Transport(1e9, 0.5, 2e9, 1.2, 0.4, None)
    entry = {"samples": [0.004], "steps": [0.001], "overhead_s": 0.0005, "lone_bytes_per_s": 1.5e9, "lone_threads": 0.9,
             "lone_spread": 0.3, "io_share": 0.45}
    local = SimOptions(algo="async", n_workers=2, broker_s=Measured(), broker_bandwidth=Measured(), placement="local", host_cores=2)
    key = key_text(calibrate.loop_key(workload))
    monkeypatch.setattr(workload, "calibration", Calibration("replay", {"broker_loop": {key: entry}}, source="new.json"))
    assert calibrate.local_server(workload, local, transport) == (0.0005, Transport(1e9, 0.5, 1.5e9, 0.9, 0.3, 0.45))
    assert calibrate.local_server(workload, SimOptions(placement="spread", broker_s=Measured(), broker_bandwidth=Measured()),
                                  transport) == (0.0, transport)
    old = {k: entry[k] for k in ("samples", "steps", "overhead_s")}
    monkeypatch.setattr(workload, "calibration", Calibration("replay", {"broker_loop": {key: old}}, source="old.json"))
    assert calibrate.local_server(workload, local, transport) == (0.0005, transport)
