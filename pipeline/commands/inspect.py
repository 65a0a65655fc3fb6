"""`mtkd inspect`: what a store holds and how good its teachers are. Hands off to report.inspect_store."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit
from mtkd.pipeline.progress import progress_bar


def inspect(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="A store written by `mtkd infer`.")],
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Show a store's teachers, completeness, accuracy/NLL/ECE and agreement.

    Per teacher and for the ensemble (the mean of the complete teachers'
    probabilities), against the labels stored with the data (-100: left
    out).

    Example:
      mtkd inspect train.zarr
      mtkd inspect train.zarr --json
    """
    from mtkd.pipeline.report import inspect_store  # heavy (torch, zarr): here, so --help stays fast
    from mtkd.pipeline.store import open_store

    opened = open_store(store)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"inspect {store.name}", total=opened.num_blocks)
        report = inspect_store(opened, progress=lambda done, total: bar.update(task, completed=done))
    emit(report, as_json, _render)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _render(report: dict) -> None:
    console = Console()
    console.print(
        f"[bold]{report['store']}[/bold]: {report['num_rows']} rows ({report['labelled_rows']} labelled), "
        f"{report['num_classes']} classes, blocks of {report['chunk_rows']} rows; data {report['dataset']['spec']}"
    )
    table = Table()
    for column in ("model", "dtype", "rows complete", "accuracy", "NLL", "ECE"):
        table.add_column(column, justify="left" if column in ("model", "dtype") else "right")
    for t in report["teachers"]:
        m = t["metrics"]
        rows = f"{t['rows_complete']}/{report['num_rows']}" + ("" if t["complete"] else " (incomplete)")
        table.add_row(t["name"], t["dtype"], rows, _fmt(m["accuracy"]), _fmt(m["nll"]), _fmt(m["ece"]))
    if report["ensemble"] is not None:
        m = report["ensemble"]["metrics"]
        label = f"ensemble ({len(report['ensemble']['teachers'])} teachers)"
        table.add_row(label, "", str(report["num_rows"]), _fmt(m["accuracy"]), _fmt(m["nll"]), _fmt(m["ece"]), style="bold")
    console.print(table)
    if report["agreement"]:
        pairs = Table(title="pairwise agreement (rows both wrote)")
        for column in ("teacher", "teacher", "agreement", "rows"):
            pairs.add_column(column)
        for p in report["agreement"]:
            pairs.add_row(p["a"], p["b"], _fmt(p["agreement"]), str(p["rows"]))
        console.print(pairs)
