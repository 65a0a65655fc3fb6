"""`mtkd eval`: accuracy, macro precision/recall/F1, NLL and ECE (rows) or perplexity, next-token
accuracy and NLL (tokens), or MSE, MAE and R^2 (regression rows), of a student or a teacher. Parses
options, hands off to run_eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtkd.pipeline.device import Device
from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit

METRICS = {
    "rows": ("accuracy", "precision_macro", "recall_macro", "f1_macro", "nll", "ece"),
    "tokens": ("perplexity", "accuracy", "nll"),
}
# evaluate.EVAL_BATCH_SIZE and EVAL_TOKEN_BATCH_SIZE, repeated because importing evaluate (torch)
# would slow every --help; tests/test_cli.py holds the first two equal.
BATCH_SIZE = 1024
TOKEN_BATCH_SIZE = 16


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
        typer.Option("--model", help="Student TOML with a `student` table (with --checkpoint), or a teachers TOML "
                     "(instead of RUN).", exists=True, dir_okay=False),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="state_dict file for --model (torch.save).", exists=True, dir_okay=False),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option("--teacher", help="With a teachers TOML as --model: which teacher (when it has several).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1,
                     help=f"Rows (default {BATCH_SIZE}) or sequences (default {TOKEN_BATCH_SIZE}) per forward pass."),
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure a student or a teacher: accuracy, macro P/R/F1, NLL, ECE on rows;
    perplexity, next-token accuracy, NLL on token sequences; MSE, MAE, R^2
    (per output and averaged) on regression rows (float labels).

    Rows whose label is unknown (-100, NaN) and each sequence's last position are left out.

    Example:
      mtkd eval runs/kd --data mnist1d:test
      mtkd eval --model mlp.toml --checkpoint runs/kd/student.pt \\
          --data mnist1d:test --json
      mtkd eval --model teachers.toml --teacher llama --data val.npz
    """
    from mtkd.pipeline.evaluate import run_eval  # heavy (torch): here, so --help stays fast

    result = run_eval(
        data, run=run, model=model, checkpoint=checkpoint, teacher=teacher, batch_size=batch_size, device=device.value,
        quiet=quiet,
    )
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    weights = result["checkpoint"] or "its own weights"
    unit = "positions" if result["kind"] == "tokens" else "rows with targets" if "r2" in result else "labelled rows"
    print(f"{result['model']} ({weights}) on {result['data']}: {result['n']} {unit}")
    if "r2" in result:  # regression data (v3): averaged over the outputs, then per output where there are several
        for name in ("mse", "mae", "r2"):
            per = result[f"{name}_per_output"]
            print(f"  {name:<16}{result[name]:.4f}" + (f"  (per output: {', '.join(f'{v:.4f}' for v in per)})" if len(per) > 1 else ""))
        return
    for name in METRICS[result["kind"]]:
        print(f"  {name:<16}{result[name]:.4f}")
