"""The live view of a distributed run: one glance tells whether it is healthy.

Top line: progress, updates/s, samples/s, loss, test accuracy, ETA (for a
language model: tokens/s and test perplexity). Below,
one row per worker: host, state, steps, staleness, last loss, so a dead or
straggling worker stands out at once.
"""

from __future__ import annotations

import math
import time

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from zsgd.output.live import stderr_console


class RunView:
    def __init__(self, title: str, total_updates: int | None, enabled: bool = True, language_model: bool = False) -> None:
        self.enabled = enabled
        self.language_model = language_model  # samples are tokens, the test metric is perplexity
        self.progress = Progress(TextColumn("[bold cyan]{task.description}"), BarColumn(bar_width=40), MofNCompleteColumn(),
                                 TextColumn("updates"), TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(),
                                 TextColumn("left"), console=stderr_console)
        self.task = self.progress.add_task(title, total=total_updates)
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
        st = broker.ledger
        now = time.monotonic()
        t, u, s = self._last
        if now - t >= 1.0:
            self._rates = ((st.updates - u) / (now - t), (st.samples - s) / (now - t))
            self._last = (now, st.updates, st.samples)
        ups, sps = self._rates
        if self.language_model:  # a language model's samples are tokens, its test metric perplexity
            acc = f"{math.exp(min(st.test_loss, 700.0)):.2f} (update {st.evals[-1].updates})" if st.evals else "-"
        else:
            acc = f"{st.test_acc:.2%} (update {st.evals[-1].updates})" if st.evals else "-"
        unit, metric = ("tokens/s", "test ppl") if self.language_model else ("samples/s", "test acc")
        loss = f"{st.last_loss:.4f}" if st.last_loss == st.last_loss else "-"
        self.progress.update(self.task, completed=st.updates, total=st.expected_updates())  # the stop rule's count, as it stands
        lr = broker.current_lr
        lr_text = f"lr {lr:.3g}  " if lr == lr else ""
        stats = Text.from_markup(f"[bold]{ups:,.1f}[/] updates/s  [bold]{sps:,.0f}[/] {unit}  train loss [bold]{loss}[/]  "
                                 f"{metric} [bold]{acc}[/]  {lr_text}rejected {sum(broker.rejected.values())}  deaths {broker.session.deaths}")
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for col in ("worker", "host", "state", "steps", "staleness mean/max", "loss", "lives"):
            table.add_column(col, justify="right" if col not in ("host", "state") else "left")
        for w in sorted(broker.members.by_worker):
            p = broker.members.by_worker[w]
            style = {"ready": "green", "joining": "yellow", "gone": "red"}.get(p.state, "")
            table.add_row(str(w), p.host, f"[{style}]{p.state}[/]", str(p.steps), f"{p.mean_staleness:.1f}/{p.staleness_max}",
                          f"{p.last_loss:.3f}" if p.last_loss == p.last_loss else "-", str(p.incarnations))
        parts = [self.progress.get_renderable(), stats, table]
        servers = broker.service.server_rows()
        if servers:
            parts.append(_server_table(servers))
        if st.stop_reason is not None:
            parts.insert(2, Text(f"stopping: {st.stop_reason}", style="bold red" if st.diverged else "bold"))
        self.live.update(Group(*parts))


def _server_table(rows: list[dict]) -> Table:
    """``--servers K``: a row per server, so the one that cannot keep up (its queue grows) stands out."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("server", "range", "state", "updates/s", "queue", "MB/s in", "MB/s out"):
        table.add_column(col, justify="left" if col in ("range", "state") else "right")
    for r in rows:
        style = {"ready": "green", "joining": "yellow", "gone": "red"}.get(r["state"], "yellow")
        lo, hi = r["range"]
        table.add_row(str(r["server"]), f"{lo:,}-{hi:,}", f"[{style}]{r['state']}[/]", f"{r.get('updates_per_s', 0.0):,.1f}",
                      str(r.get("queue_depth", "-")), f"{r.get('bytes_in_per_s', 0.0) / 1e6:,.1f}", f"{r.get('bytes_out_per_s', 0.0) / 1e6:,.1f}")
    return table
