"""`mtkd demo`: the embedded default, end to end on MNIST-1D. Parses options, hands off to run_demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mtkd.pipeline.device import Device
from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit
from mtkd.pipeline.demo import DemoConfig, run_demo


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, models, stores, runs and plot.")] = Path("mtkd-demo"),
    transfer_size: Annotated[
        int, typer.Option("--transfer-size", min=0, help="Unlabelled MNIST-1D rows added to the transfer set.")
    ] = DemoConfig.transfer_size,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train three teachers on MNIST-1D, store their logits, distil an MLP student, compare.

    Trains a CNN, a GRU and a wide-kernel CNN on the 4000 labelled rows, runs stage one over the
    labelled rows plus an unlabelled transfer set, distils the paper's MLP (40-100-100-10) from the
    stored logits, trains the same MLP on the labels as the baseline, and prints test accuracies and
    each stage's wall time. About a minute on 2 CPU cores.

    Example:
      mtkd demo --out mtkd-demo
      mtkd demo --transfer-size 20000 --json
    """
    log = (lambda message: None) if (as_json or quiet) else (lambda message: Console().print(f"[dim]{message}[/]"))
    result = run_demo(out, DemoConfig(transfer_size=transfer_size, device=device.value), quiet=quiet or as_json, log=log)
    emit(result, as_json, _render)


def _render(result: dict[str, Any]) -> None:
    table = Table(title="mtkd demo: MNIST-1D test accuracy")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    for name, accuracy in result["teachers"].items():
        table.add_row(f"teacher {name}", f"{accuracy:.3f}")
    table.add_row("fused ensemble (mean of probabilities)", f"{result['ensemble']:.3f}")
    table.add_row("baseline student (hard labels)", f"{result['baseline_student']:.3f}")
    table.add_row("[bold]distilled student[/]", f"[bold]{result['distilled_student']:.3f}[/]")
    times = Table(title="wall time per stage")
    for stage in result["wall_s"]:
        times.add_column(stage, justify="right")
    times.add_row(*(f"{seconds:.1f} s" for seconds in result["wall_s"].values()))
    console = Console()
    console.print(table)
    console.print(times)
    console.print(f"stores, runs and plot under {result['out']}" + (f"; plot: {result['plot']}" if result["plot"] else ""))
