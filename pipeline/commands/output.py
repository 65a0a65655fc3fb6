"""What every command shares: the --json/--quiet options and how a result reaches stdout."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
StorageOption = Annotated[
    list[str] | None,
    typer.Option("--storage-option", metavar="KEY=VALUE", help="For a store at a URL (s3://...): an fsspec option, "
                 "e.g. endpoint_url=http://host:9000; repeatable. Credentials: as the backend reads them (AWS_* env, profile)."),
]


def where(spec: str, storage_option: list[str] | None):
    """A store named on the command line (a path or a URL) with its --storage-option pairs -> where it lives."""
    from mtkd.pipeline.storage import location, parse_options

    return location(spec, parse_options(storage_option))


def _finite(value: Any) -> Any:
    # JSON has no NaN: metrics without labelled rows are null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# Piped into a file, grep or a batch job's log, rich would lay tables out for 80 columns and cut
# their cells (`0.0…`); where nobody reads it on a terminal, every table keeps its natural width.
UNBOUNDED_WIDTH = 10_000


def console(**options: Any) -> Console:
    """The rich Console a command prints its report with: the terminal's width on a terminal, else unbounded."""
    terminal = Console(**options)
    return terminal if terminal.is_terminal else Console(width=UNBOUNDED_WIDTH, **options)


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    """Print `result` as one JSON line (--json) or through `render` for people."""
    if as_json:
        print(json.dumps(_finite(result), default=str))
    else:
        render(result)
