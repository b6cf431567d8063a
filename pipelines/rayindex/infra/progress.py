"""Progress bars (rate and ETA per stage) and the final summary table, with rich."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, in the task's own unit (docs/s, vectors/s)."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "items")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"- {unit}/s", style="progress.data.speed")


class StageProgress:
    """One bar per stage; disabled (silent) when quiet, e.g. inside tests or Ray jobs without a TTY."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=quiet,
        )

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def note(self, message: str) -> None:
        """A line above the bars (shown even when quiet: resuming a run is worth knowing)."""
        self.console.print(message, highlight=False)

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str):
        """Yields update(completed) for the stage's bar."""
        task = self.progress.add_task(name, total=max(total, 1), unit=unit)
        start = time.monotonic()

        def update(completed: int) -> None:
            self.progress.update(task, completed=completed)

        yield update
        self.progress.update(task, completed=max(total, 1))
        if not self.progress.disable:
            self.progress.console.log(f"{name}: {total:,} {unit} in {time.monotonic() - start:.1f} s")


def summary_table(manifest) -> Table:
    """Stage, items, seconds, rate: what the build did, from its manifest."""
    counts = manifest.counts
    items = {
        "plan": (counts.rows_read, "rows"),
        "encode": (counts.docs_encoded, "docs"),
        "train": (manifest.training.sample_size if manifest.training else 0, "vectors"),
        "add": (counts.passages, "vectors"),
        "merge": (manifest.merge.ntotal if manifest.merge else 0, "vectors"),
    }
    table = Table(title=f"rayindex build {manifest.run_id} ({manifest.status})")
    for col in ("stage", "items", "seconds", "rate"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, seconds in manifest.timings_s.items():
        n, unit = items.get(stage, (0, ""))
        rate = f"{n / seconds:,.0f} {unit}/s" if n and seconds > 0 else ""
        table.add_row(stage, f"{n:,} {unit}" if n else "", f"{seconds:.1f}", rate)
    return table
