"""`mtkd eval`: accuracy, macro precision/recall/F1, NLL and ECE of a student. Parses options, hands off to
run_eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtkd.pipeline.device import Device
from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "nll", "ece")
# evaluate.EVAL_BATCH_SIZE, repeated because importing evaluate (torch) would slow every --help;
# tests/test_cli.py holds the two equal.
BATCH_SIZE = 1024


def eval_command(
    data: Annotated[
        str, typer.Option("--data", help="Labelled data spec: PATH.npz, a Zarr array, mnist1d:SPLIT or MODULE:FUNCTION.")
    ],
    run: Annotated[
        Path | None,
        typer.Argument(metavar="RUN", help="A `mtkd train` run directory (its student spec and student.pt).", exists=True, file_okay=False),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Student TOML with a `student` table (instead of RUN).", exists=True, dir_okay=False),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="state_dict file for --model (torch.save).", exists=True, dir_okay=False),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = BATCH_SIZE,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure a student on labelled data: accuracy, macro P/R/F1, NLL, ECE.

    Rows whose label is unknown (-100) are left out.

    Example:
      mtkd eval runs/kd --data mnist1d:test
      mtkd eval --model mlp.toml --checkpoint runs/kd/student.pt \\
          --data mnist1d:test --json
    """
    from mtkd.pipeline.evaluate import run_eval  # heavy (torch): here, so --help stays fast

    result = run_eval(
        data, run=run, model=model, checkpoint=checkpoint, batch_size=batch_size, device=device.value, quiet=quiet
    )
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    print(f"{result['model']} ({result['checkpoint']}) on {result['data']}: {result['n']} labelled rows")
    for name in METRICS:
        print(f"  {name:<16}{result[name]:.4f}")
