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

    rows (the default): trains a CNN, a GRU and a wide-kernel CNN, each
    on its own part of the 4000 labelled rows of MNIST-1D, a part that
    holds mostly its own classes (complementary teachers, as different
    groups' are), stores their logits over those
    rows and an unlabelled transfer set, and trains the paper's MLP
    (40-100-100-10) on the hard labels, from each teacher alone and from
    all three, over 3 seeds. Prints every model's test accuracy and each
    stage's wall time, and draws a plot (README: what it measured).

    lm: two domains of text every Python has, the standard library's .py
    files (code) and its help pages (prose, pydoc_data.topics), a BPE
    tokenizer trained here, one teacher language model per domain trained
    on that domain only, stage one sparse (top-k) over the mixture, and a
    student several times smaller on the mixture: on the next tokens
    alone, from each teacher alone, and from both under `mean` and under
    a selecting fusion (`best`, per sequence). Prints each model's
    validation perplexity on the mixture and per domain, the store's
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
    table.add_row(f"[bold]student from all {len(result['teachers'])} teachers ({result['config']['fusion']})[/]",
                  f"[bold]{_with_std(result['distilled_student'], std['distilled_student'], seeds)}[/]")
    console = Console()
    console.print(table)
    _print_wall(console, result["wall_s"])
    console.print(f"data, models, stores and runs under {result['out']}")
    if result["plot"]:
        console.print(f"plot: {result['plot']}")



def _render_lm(result: dict[str, Any]) -> None:
    seeds = len(result["seeds"])
    wheres = ["mixture", *next(iter(result["teachers"].values()))["domains"]]
    title = "mtkd demo lm: validation perplexity (code: stdlib .py; prose: pydoc topics)"
    table = Table(title=title + (f"\n(students: mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    table.add_column("model")
    for where in wheres:
        table.add_column(where, justify="right")
    singles = result["single_teacher_students"]
    experts = result["experts"]  # domain -> its expert teacher

    def cells(m: dict[str, Any], against_experts: bool = False) -> list[str]:
        out = []
        for where in wheres:
            cell = m if where == "mixture" else m["domains"][where]
            text = _ppl(cell, seeds)
            if against_experts and where in experts:
                expert = singles[experts[where]]["domains"][where]["perplexity"]
                text += f" ({cell['perplexity'] / expert:.2f}x {experts[where]}'s)"
            out.append(text)
        return out

    for name, m in result["teachers"].items():
        table.add_row(f"teacher {name}", *cells(m))
    for fusion, m in result["ensembles"].items():
        table.add_row(f"ensemble, {fusion}", *cells(m))
    table.add_row("student on next tokens (baseline)", *cells(result["baseline_student"]))
    for name, m in singles.items():
        table.add_row(f"student from {name} alone", *cells(m))
    for fusion, m in result["fused_students"].items():
        bold = fusion == result["chosen_fusion"]
        label = f"student from all {len(result['teachers'])}, {fusion}"
        row = [label, *cells(m, against_experts=True)]
        table.add_row(*([f"[bold]{c}[/]" for c in row] if bold else row))
    console = Console()
    console.print(table)
    best = min(singles, key=lambda n: singles[n]["perplexity"])
    distilled, baseline = result["distilled_student"], result["baseline_student"]
    console.print(f"mixture perplexity, {result['chosen_fusion']} student / best single-teacher student ({best}): "
                  f"{distilled['perplexity'] / singles[best]['perplexity']:.3f}; / baseline: "
                  f"{distilled['perplexity'] / baseline['perplexity']:.3f}; store: {result['bytes_per_token']:.1f} bytes "
                  f"per token ({len(result['teachers'])} teachers, top-{result['config']['top_k']}"
                  + (f" + {result['config']['tail_samples']} tail draws" if result['config'].get('tail_samples') else "") + ")")
    _print_wall(console, result["wall_s"])
    console.print(f"data, models, stores and runs under {result['out']}")
    if result["plot"]:
        console.print(f"plot: {result['plot']}")


def _ppl(m: dict[str, Any], seeds: int) -> str:
    return f"{m['perplexity']:.1f} ± {m['perplexity_std']:.1f}" if seeds > 1 and "perplexity_std" in m else f"{m['perplexity']:.1f}"


def _print_wall(console: Console, wall: dict[str, float]) -> None:
    # One row per stage: a row of columns would not fit 80 columns.
    times = Table(title="wall time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in wall.items():
        times.add_row(stage.replace("_", " "), f"{seconds:.1f}")
    console.print(times)
