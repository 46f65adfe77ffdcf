"""Where an end-to-end worker's step goes, beside DDP's (``bench_runtime.py --only e2e --breakdown``).

The same ``zsgd run --n-proc 2`` as the end-to-end row, started through
``python -c`` with timers wrapped around the functions a worker's step
passes through (nothing else changes: the workers are forked from that
process, so they inherit the wrappers). Each worker writes its totals to
``phases-<pid>.json`` when its loop ends; the broker (the run process) writes
its CPU time. Per step, in ms:

- ``kernel``: ``Model.loss_and_grad`` (forward and backward), wall and the compute thread's CPU;
- ``batch``: the rest of ``WorkerStep.compute`` (picking and converting the batch);
- ``send``: ``BrokerLink.send`` (header encode, the gradient's copy into shared memory, the pipe to the link thread);
- ``wait``: ``BrokerLink.recv`` less the copy below (the reply's round trip through the link thread and the broker);
- ``receive copy``: ``WorkerShare.incoming`` (the weights out of the shared slot);
- ``validate``: ``protocol.validate_weights``;
- ``other``: the step's wall time less all of these (the loop's own Python, message construction).

The wrappers add a few microseconds per call: about 10 calls a step of 50+ ms.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

PHASES = ("kernel", "batch", "send", "wait", "receive_copy", "validate")


def install(out_dir: str) -> None:
    """Wrap the worker's step functions; each worker process writes its totals to ``out_dir`` when its loop ends."""
    from zsgd import node
    from zsgd.algorithms.worker import WorkerStep
    from zsgd.nn.models import Model
    from zsgd.wire import link as link_mod
    from zsgd.wire import protocol, shm

    totals: dict[str, float] = {k: 0.0 for k in (*PHASES, "compute", "recv")}
    totals |= {k + "_cpu": 0.0 for k in list(totals)}
    steps = {"n": 0, "first": None, "last": None}

    def timed(owner: Any, name: str, key: str) -> None:
        inner: Callable = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - t
                totals[key + "_cpu"] = totals.get(key + "_cpu", 0.0) + time.thread_time() - c

        setattr(owner, name, wrapper)

    timed(Model, "loss_and_grad", "kernel")
    timed(WorkerStep, "compute", "compute")
    timed(link_mod.BrokerLink, "recv", "recv")
    timed(shm.WorkerShare, "incoming", "receive_copy")
    timed(protocol, "validate_weights", "validate")
    send = link_mod.BrokerLink.send

    def counted_send(self: Any, msg: Any) -> None:
        t, c = time.perf_counter(), time.thread_time()
        try:
            send(self, msg)
        finally:
            totals["send"] += time.perf_counter() - t
            totals["send_cpu"] += time.thread_time() - c
            if msg.type == protocol.MsgType.UPDATE:
                steps["n"] += 1
                if steps["n"] == 11:  # the first ten steps (kernel loading, the join) are not steady state
                    for k in totals:
                        totals[k] = 0.0
                    steps["first"], steps["first_wall"], steps["start_cpu"] = t, time.time(), _cpu()
                # The window ends at the latest update: what the loop does after its last one (the final wait) is not a step.
                steps["last"], steps["last_wall"], steps["last_cpu"], steps["totals"] = t, time.time(), _cpu(), dict(totals)

    link_mod.BrokerLink.send = counted_send
    run_node = node.run_node

    def dumping_run_node(opts: Any) -> int:
        try:
            return run_node(opts)
        finally:
            if opts.role == "worker" and steps["n"] > 20:
                n = steps["n"] - 11
                done = steps["totals"]
                row = {k: done[k] / n for k in done} | {"steps": n, "step": (steps["last"] - steps["first"]) / n,
                                                        "process_cpu": (steps["last_cpu"] - steps["start_cpu"]) / n,
                                                            "first_wall": steps["first_wall"], "last_wall": steps["last_wall"]}
                Path(out_dir, f"phases-{os.getpid()}.json").write_text(json.dumps(row))

    node.run_node = dumping_run_node
    _sample_broker_cpu(out_dir)


def _sample_broker_cpu(out_dir: str) -> None:
    """This process (the run's broker): its CPU time every 0.1 s, written at exit, to be read over the workers' window."""
    import atexit
    import threading

    samples: list[tuple[float, float]] = []
    parent = os.getpid()

    def sample() -> None:
        while True:
            samples.append((time.time(), _cpu()))
            time.sleep(0.1)

    def write() -> None:
        if os.getpid() == parent:
            Path(out_dir, "broker-cpu.json").write_text(json.dumps(samples))

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(write)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def breakdown(out_dir: Path) -> dict[str, float]:
    """Mean ms per step over the workers' files: the phases, ``other``, the step, and CPU."""
    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("phases-*.json"))]
    if not rows:
        raise RuntimeError(f"no worker wrote its phases to {out_dir}")
    mean = {k: 1e3 * sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("steps", "first_wall", "last_wall")}
    for cpu in ("", "_cpu"):  # wall, then the compute thread's CPU
        mean["batch" + cpu] = mean["compute" + cpu] - mean["kernel" + cpu]
        mean["wait" + cpu] = mean["recv" + cpu] - mean["receive_copy" + cpu]
    mean["other"] = mean["step"] - sum(mean[k] for k in PHASES)
    samples = json.loads((out_dir / "broker-cpu.json").read_text())
    lo, hi = max(r["first_wall"] for r in rows), min(r["last_wall"] for r in rows)
    window = [(t, c) for t, c in samples if lo <= t <= hi]
    if len(window) >= 2:
        updates = sum((window[-1][0] - window[0][0]) / r["step"] for r in rows)  # applied in that window, all workers together
        mean["broker_cpu_per_update"] = 1e3 * (window[-1][1] - window[0][1]) / updates
    return mean


def run_instrumented(argv: list[str], out_dir: Path, env: dict, root: Path) -> None:
    """``zsgd ARGV`` with the wrappers installed, the workers' files in ``out_dir``."""
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(Path(__file__).parent)!r}]; import e2e_breakdown; "
            f"e2e_breakdown.install({str(out_dir)!r}); sys.argv = ['zsgd', *{argv!r}]; from zsgd.cli import main; main()")
    import subprocess

    from zsgd.runtime.threads import SINGLE_THREAD_ENV

    out_dir.mkdir(parents=True, exist_ok=True)
    # What `zsgd run` sets before numpy loads; here numpy loads first (the wrappers), so it comes from the environment.
    done = subprocess.run([sys.executable, "-c", code], env=SINGLE_THREAD_ENV | env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"zsgd {' '.join(argv)} exited with {done.returncode}: {done.stderr[-2000:]}")


def breakdown_rows(zsgd_rounds: list[dict], ddp_rounds: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """Table rows (measure, zsgd, DDP, ratio, target): the median over rounds of each phase, ms per step, wall (CPU)."""
    import statistics

    def med(rounds: list[dict], key: str) -> float:
        values = [r[key] for r in rounds if key in r]
        return statistics.median(values) if values else float("nan")

    z = {k: med(zsgd_rounds, k) for k in zsgd_rounds[0]}
    d = {k: med(ddp_rounds, k) for k in (ddp_rounds[0] if ddp_rounds else {})}
    nan = float("nan")

    def both(key: str) -> str:
        return f"{z[key]:.2f} ({z[key + '_cpu']:.2f})"

    def row(name: str, a: float, b: float) -> tuple[str, str, str, str, str]:
        return name, f"{a:.2f}", "" if b != b else f"{b:.2f}", "" if b != b or not b else f"{a / b:.2f}x", ""

    z_cpu = z["process_cpu"] + z.get("broker_cpu_per_update", nan)
    return [
        row("  a step, wall ms (worker | DDP rank)", z["step"], d.get("step", nan)),
        row("  compute, wall (zsgd kernel | DDP forward + backward, its all-reduce waited for inside)", z["kernel"],
            d.get("forward", nan) + d.get("backward", nan)),
        row("  compute, CPU of the computing thread (zsgd kernel | DDP forward + backward)", z["kernel_cpu"], d.get("compute_cpu", nan)),
        row("  optimizer step, CPU (zsgd: the broker's whole CPU per update | DDP: each rank's step)", z.get("broker_cpu_per_update", nan),
            d.get("optimizer_cpu", nan)),
        ("    zsgd, wall (compute thread's CPU): send | wait for the reply | receive copy",
         f"{both('send')} | {both('wait')} | {both('receive_copy')}", "", "", ""),
        ("    zsgd, wall (CPU): batch preparation | validation; wall: the loop's own",
         f"{both('batch')} | {both('validate')}; {z['other']:.2f}", "", "", ""),
        row("  CPU per step, all threads (zsgd: worker + the broker's per update | DDP rank, gloo's threads included)", z_cpu,
            d.get("process_cpu", nan)),
        row("  ... of which not the compute (zsgd: exchange, link thread, broker | DDP: all-reduce, optimizer)", z_cpu - z["kernel_cpu"],
            d.get("process_cpu", nan) - d.get("compute_cpu", nan)),
    ]
