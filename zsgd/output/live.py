"""Rich progress views for long work.

Users look rather than read: a training run shows one live line with the
numbers that matter (progress, epoch, samples/s, loss, accuracy, ETA) and
ends with a summary table. Output goes to stderr so stdout stays clean for
pipes; with ``enabled=False`` (``--quiet``) nothing is drawn.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

stderr_console = Console(stderr=True)


class TrainProgress:
    """One progress bar over updates (or seconds, when only a time limit is known)."""

    def __init__(self, total: int | None, title: str = "train", enabled: bool = True, language_model: bool = False) -> None:
        self.enabled = enabled
        # A language model's samples are tokens, and its test metric is perplexity.
        self.language_model = language_model
        self.total = total
        self._t0 = time.perf_counter()
        self._last_samples = 0
        self._last_t = self._t0
        self._sps = 0.0
        self._excluded = 0.0
        self._progress = Progress(
            TextColumn("[bold cyan]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]:.2f}"),
            TextColumn("{task.fields[sps]:>5.0f} " + ("tokens/s" if language_model else "samples/s")),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn(("ppl" if language_model else "acc") + " {task.fields[acc]}"),
            TimeRemainingColumn(),
            console=stderr_console,
            disable=not enabled,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(title, total=total, epoch=0.0, sps=0.0, loss="-", acc="-")

    def __enter__(self) -> "TrainProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def exclude(self, seconds: float) -> None:
        """Leave out time not spent training (an evaluation) from the samples/s."""
        self._last_t += seconds
        self._excluded += seconds

    def update(self, updates: int, samples: int, epoch: float, loss: float | None = None, acc: float | None = None,
               test_loss: float | None = None) -> None:
        now = time.perf_counter()
        if now - self._last_t >= 0.5:
            self._sps = (samples - self._last_samples) / (now - self._last_t)
            self._last_samples, self._last_t = samples, now
        sps = self._sps
        if sps == 0.0 and now - self._t0 - self._excluded > 0:  # no full window yet: average since the start
            sps = samples / (now - self._t0 - self._excluded)
        fields: dict[str, Any] = {"epoch": epoch, "sps": sps}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if self.language_model:
            if test_loss is not None:
                fields["acc"] = f"{math.exp(min(test_loss, 700.0)):.2f}"
        elif acc is not None:
            fields["acc"] = f"{acc:.2%}"
        self._progress.update(self._task, completed=updates, **fields)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
        table.add_row(key, str(value))
    return table


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def row_cells(row: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    """The cells of one results-table row; a diverged arm says so in place of its accuracy."""
    return ["diverged" if key == "final_acc" and row.get("diverged") else format_cell(key, row.get(key)) for key, _h in columns]


def format_cell(key: str, v: Any) -> str:
    """One cell of a results table (sweeps and experiments), by column name."""
    if v is None or (isinstance(v, float) and v != v):
        return "not reached" if key == "time_to_target_s" else "-"
    if key == "final_acc":
        return f"{v:.2%}"
    if key.startswith("bytes"):
        return format_bytes(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


class ResultsTable:
    """A results table whose first column (the arm names) is never cut, at any terminal width.

    Why not a plain rich ``Table``: squeezed into 80 columns, rich shrinks every
    column alike and elides what no longer fits, so the arm names, the one
    column that tells the rows apart, became "…" or vanished. Here the width is
    known only when the table is drawn (``__rich_console__``), and the other
    columns are kept left to right (the order of importance) while they fit
    whole; those left out are named below the table, since the complete table
    is in the file (``results.md``). Arm names longer than the whole width wrap
    instead of being cut.
    """

    def __init__(self, title: str, heads: Sequence[str], rows: Sequence[Sequence[str]], complete_in: str = "results.md",
                 keep_with_arm: int = 2) -> None:
        self.title, self.heads, self.rows, self.complete_in = title, list(heads), [list(r) for r in rows], complete_in
        self.keep_with_arm = keep_with_arm  # columns worth wrapping long arm names for (accuracy, time to target)

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Table]:
        yield self.build(options.max_width)

    def build(self, width: int) -> Table:
        from rich.cells import cell_len

        natural = [max([cell_len(h)] + [cell_len(r[i]) for r in self.rows]) for i, h in enumerate(self.heads)]

        def drawn(widths: list[int]) -> int:  # a boxed table: one space of padding each side, a rule between columns
            return sum(w + 2 for w in widths) + len(widths) + 1

        def fit(first: int) -> list[int]:  # the columns kept, left to right, beside an arm column this wide
            shown = [0]
            for i in range(1, len(self.heads)):
                if drawn([first] + [natural[j] for j in shown[1:] + [i]]) > width:
                    break
                shown.append(i)
            return shown

        shown = fit(natural[0])
        if len(shown) - 1 < min(self.keep_with_arm, len(self.heads) - 1):
            # long arm names: wrap them (at spaces) rather than hide the first results
            words = [cell_len(w) for r in self.rows for w in r[0].split()] or [4]
            shown = fit(min(natural[0], max(max(words), 16)))[:1 + self.keep_with_arm]  # and the rest of the width to them
        first = min(natural[0], max(4, width - drawn([0] + [natural[j] for j in shown[1:]])))  # what the kept columns leave
        left_out = [self.heads[i] for i in range(len(self.heads)) if i not in shown]
        caption = f"not shown at this width: {', '.join(left_out)} (all in {self.complete_in})" if left_out else None
        table = Table(title=self.title, title_justify="left", caption=caption, caption_justify="left")
        for i in shown:
            if i == 0:
                table.add_column(self.heads[0], justify="left", overflow="fold", min_width=first, max_width=first)
            else:
                table.add_column(self.heads[i], justify="right", no_wrap=True, min_width=natural[i])
        for r in self.rows:
            table.add_row(*(r[i] for i in shown))
        return table
