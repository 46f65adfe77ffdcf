"""The live view of a distributed run: one glance tells whether it is healthy.

Top line: progress, updates/s, samples/s, loss, test accuracy, ETA. Below,
one row per worker: host, state, steps, staleness, last loss, so a dead or
straggling worker stands out at once.
"""

from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from zsgd.live import stderr_console


class RunView:
    def __init__(self, title: str, total_updates: int | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console)
        self.task = self.progress.add_task(title, total=total_updates, rate="")
        self.live = Live(console=stderr_console, refresh_per_second=4, transient=False) if enabled else None
        self._last = (time.monotonic(), 0, 0)
        self._rates = (0.0, 0.0)

    def __enter__(self) -> "RunView":
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, broker) -> None:
        if not self.live:
            return
        st = broker.state
        now = time.monotonic()
        t, u, s = self._last
        if now - t >= 1.0:
            self._rates = ((st.updates - u) / (now - t), (st.samples - s) / (now - t))
            self._last = (now, st.updates, st.samples)
        ups, sps = self._rates
        acc = f"{st.test_acc:.2%}" if st.test_acc == st.test_acc else "-"
        loss = f"{st.last_loss:.4f}" if st.last_loss == st.last_loss else "-"
        self.progress.update(self.task, completed=st.updates,
                             rate=f"{ups:6.1f} upd/s {sps:7.0f} samples/s  loss {loss}  acc {acc}  rejected {sum(st.rejected.values())}")
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for col in ("worker", "host", "state", "steps", "staleness mean/max", "loss", "lives"):
            table.add_column(col, justify="right" if col not in ("host", "state") else "left")
        for w in sorted(broker.members.by_worker):
            p = broker.members.by_worker[w]
            style = {"ready": "green", "joining": "yellow", "gone": "red"}.get(p.state, "")
            table.add_row(str(w), p.host, f"[{style}]{p.state}[/]", str(p.steps), f"{p.mean_staleness:.1f}/{p.staleness_max}",
                          f"{p.last_loss:.3f}" if p.last_loss == p.last_loss else "-", str(p.incarnations))
        self.live.update(Group(self.progress.get_renderable(), table))
