"""Progress bars: rich bars on a terminal, nothing when stdout is not one or with --quiet.

A bar names what it measures, `STAGE MODEL` ("train cnn", "distil mlp", "infer transfer"), and may
carry metrics that it shows after the counts: a training bar shows the running loss as it goes and
keeps the last validation metric until the next one.

    with progress_bar(quiet) as bars:
        bar = bars.bar("train", "mlp", total=steps_per_epoch * epochs)
        for step in ...:
            bar.advance(loss=running_loss)          # one step; shows "loss 0.4123"
        bar.update(val_accuracy=0.912)              # shows "loss 0.4123  val_accuracy 0.912"

`bars.bar(...)` returns a `Bar`; its `advance(steps=1, **metrics)` and `update(completed=, total=,
**metrics)` are the whole API. Metric values are numbers (shown with 4 significant digits) or None
(removed). rich.Progress's own `add_task`/`update`/`advance` also work on `bars`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def describe(stage: str, model: str | None = None) -> str:
    """The label of a bar: what runs (`stage`) on what (`model`, a model's or a store's name)."""
    return stage if not model else f"{stage} {model}"


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4g}" for name, value in metrics.items())


class Bar:
    """One bar of a `Bars`: a count towards a total (None: unknown) and the metrics shown beside it."""

    def __init__(self, progress: Any | None, task: int | None) -> None:
        self._progress, self._task = progress, task
        self.metrics: dict[str, float] = {}  # what the bar shows now (kept also when silent: tests read it)

    def advance(self, steps: float = 1, **metrics: float | None) -> None:
        self._merge(metrics)
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, metrics=format_metrics(self.metrics))

    def update(self, *, completed: float | None = None, total: float | None = None, **metrics: float | None) -> None:
        self._merge(metrics)
        if self._progress is not None:
            fields: dict[str, Any] = {"metrics": format_metrics(self.metrics)}
            if completed is not None:
                fields["completed"] = completed
            if total is not None:
                fields["total"] = total
            self._progress.update(self._task, **fields)

    def _merge(self, metrics: dict[str, float | None]) -> None:
        for name, value in metrics.items():
            if value is None:
                self.metrics.pop(name, None)
            else:
                self.metrics[name] = float(value)


class Bars:
    """The bars of one `progress_bar` block; silent (`progress` None) off a terminal or with --quiet."""

    def __init__(self, progress: Any | None) -> None:
        self._progress = progress

    def bar(self, stage: str, model: str | None = None, *, total: float | None = None) -> Bar:
        """A new bar labelled `STAGE MODEL` counting towards `total` (None: unknown until updated)."""
        task = None if self._progress is None else self._progress.add_task(describe(stage, model), total=total, metrics="")
        return Bar(self._progress, task)

    # rich.Progress's API, for callers that manage task ids themselves.
    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        if self._progress is None:
            return 0
        return self._progress.add_task(description, total=total, **{"metrics": "", **fields})

    def update(self, task: int, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(task, **fields)

    def advance(self, task: int, advance: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(task, advance)


def _columns() -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"))


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Bars]:
    """Yield the `Bars` of one display; silent when stdout is not a terminal or `quiet`."""
    if quiet or not sys.stdout.isatty():
        yield Bars(None)
        return
    from rich.progress import Progress  # rich's progress machinery only when a bar is drawn

    with Progress(*_columns(), transient=False) as progress:
        yield Bars(progress)
