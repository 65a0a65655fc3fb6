"""`mtkd demo [rows|lm]`: the embedded defaults, end to end. Parses options, hands off to the demo."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit
from mtkd.pipeline.demos.rows import RowsDemoConfig
from mtkd.pipeline.device import Device
from mtkd.pipeline.errors import BadInputError


class Demo(str, Enum):
    rows = "rows"
    lm = "lm"


def demo(
    which: Annotated[Demo, typer.Argument(metavar="DEMO", help="rows: MNIST-1D classification; lm: language models.")] = Demo.rows,
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, models, stores, runs and plot.")] = Path("mtkd-demo"),
    transfer_size: Annotated[
        int | None,
        typer.Option("--transfer-size", min=0, show_default=False,
                     help=f"rows only: unlabelled MNIST-1D rows in the transfer set (default {RowsDemoConfig.transfer_size})."),
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run a demo end to end: teachers, stage one, students, one table.

    rows (the default): trains a CNN, a GRU and a wide-kernel CNN on the
    4000 labelled rows of MNIST-1D, stores their logits over those rows and
    an unlabelled transfer set, and trains the paper's MLP (40-100-100-10)
    on the hard labels, from each teacher alone and from all three, over 3
    seeds. Prints every model's test accuracy and each stage's wall time,
    and draws a plot (README: what it measured, and how long it took).

    lm: the Python standard library's own .py files as text, a BPE
    tokenizer trained here, three teacher language models, stage one
    sparse (top-k), and a student several times smaller distilled from the
    store beside the same student on the next tokens alone. Prints each
    model's validation perplexity and next-token accuracy, the store's
    bytes per token and each stage's wall time, and draws a plot.

    Example:
      mtkd demo --out mtkd-demo
      mtkd demo rows --transfer-size 20000 --json
      mtkd demo lm --out mtkd-demo-lm
    """
    log = (lambda message: None) if (as_json or quiet) else (lambda message: Console().print(f"[dim]{message}[/]"))
    if which is Demo.rows:
        from mtkd.pipeline.demos.rows import run_rows_demo  # heavy (torch): here, so --help stays fast

        config = RowsDemoConfig(device=device.value, **({} if transfer_size is None else {"transfer_size": transfer_size}))
        result = run_rows_demo(out, config, quiet=quiet or as_json, log=log)
        emit(result, as_json, _render_rows)
        return
    if transfer_size is not None:
        raise BadInputError("--transfer-size is an option of `mtkd demo rows`, not of `mtkd demo lm`")
    from mtkd.pipeline.demos.lm import LMDemoConfig, run_lm_demo  # heavy (torch, tokenizers)

    result = run_lm_demo(out, LMDemoConfig(device=device.value), quiet=quiet or as_json, log=log)
    emit(result, as_json, _render_lm)


def _with_std(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def _render_rows(result: dict[str, Any]) -> None:
    seeds, std = len(result["seeds"]), result["std"]
    title = "mtkd demo rows: MNIST-1D test accuracy"
    table = Table(title=title + (f"\n(students: mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    for name, accuracy in result["teachers"].items():
        table.add_row(f"teacher {name}", f"{accuracy:.3f}")
    table.add_row("ensemble (mean of probabilities)", f"{result['ensemble']:.3f}")
    table.add_row("student on hard labels (baseline)",
                  _with_std(result["baseline_student"], std["baseline_student"], seeds))
    for name, accuracy in result["single_teacher_students"].items():
        table.add_row(f"student from {name} alone", _with_std(accuracy, std["single_teacher_students"][name], seeds))
    table.add_row(f"[bold]student from all {len(result['teachers'])} teachers[/]",
                  f"[bold]{_with_std(result['distilled_student'], std['distilled_student'], seeds)}[/]")
    console = Console()
    console.print(table)
    _print_wall(console, result["wall_s"])
    console.print(f"data, models, stores and runs under {result['out']}")
    if result["plot"]:
        console.print(f"plot: {result['plot']}")



def _render_lm(result: dict[str, Any]) -> None:
    seeds = len(result["seeds"])
    title = "mtkd demo lm: Python stdlib, validation split"
    table = Table(title=title + (f"\n(students: mean over {seeds} seeds)" if seeds > 1 else ""))
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("next-token accuracy", justify="right")
    rows = [(f"teacher {name}", m) for name, m in result["teachers"].items()]
    rows += [("ensemble (mean of probabilities)", result["ensemble"]),
             ("student on next tokens (baseline)", result["baseline_student"])]
    for label, m in rows:
        table.add_row(label, f"{m['perplexity']:.1f}", f"{m['accuracy']:.3f}")
    distilled, baseline = result["distilled_student"], result["baseline_student"]
    table.add_row(f"[bold]student from all {len(result['teachers'])} teachers[/]", f"[bold]{distilled['perplexity']:.1f}[/]",
                  f"[bold]{distilled['accuracy']:.3f}[/]")
    console = Console()
    console.print(table)
    console.print(f"distilled / baseline perplexity: {distilled['perplexity'] / baseline['perplexity']:.3f}; "
                  f"store: {result['bytes_per_token']:.1f} bytes per token ({len(result['teachers'])} teachers, "
                  f"top-{result['config']['top_k']})")
    _print_wall(console, result["wall_s"])
    console.print(f"data, models, stores and runs under {result['out']}")
    if result["plot"]:
        console.print(f"plot: {result['plot']}")


def _print_wall(console: Console, wall: dict[str, float]) -> None:
    # One row per stage: a row of columns would not fit 80 columns.
    times = Table(title="wall time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in wall.items():
        times.add_row(stage.replace("_", " "), f"{seconds:.1f}")
    console.print(times)
