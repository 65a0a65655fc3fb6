"""Progress bars: rich bars on a terminal, nothing when stdout is not one or with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Silent:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress | _Silent]:
    """Yield an object with rich.Progress's add_task/advance/update; silent when not wanted."""
    if quiet or not sys.stdout.isatty():
        yield _Silent()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        yield bar
