"""`mtkd infer`: stage one, teachers' logits into a Zarr store. Parses options, hands off to run_infer."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit
from mtkd.pipeline.device import Device
from mtkd.pipeline.progress import progress_bar


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def infer(
    teachers: Annotated[
        Path,
        typer.Option("--teachers", help="Teachers TOML: name, factory, kwargs, checkpoint or torchscript per teacher.", exists=True, dir_okay=False, readable=True),
    ],
    data: Annotated[
        str, typer.Option("--data", help="Data spec: PATH.npz, PATH.npy, a Zarr array, mnist1d:SPLIT or MODULE:FUNCTION.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The store to create or resume (a Zarr v3 folder).")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per forward pass.")] = 512,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    dtype: Annotated[
        Dtype,
        typer.Option("--dtype", help="Stored logit dtype; on CUDA, 16-bit dtypes also autocast the forward."),
    ] = Dtype.float16,
    shard: Annotated[
        str, typer.Option("--shard", help="I/N: write the row blocks b with b % N == I; N processes may run at once.")
    ] = "0/1",
    chunk_rows: Annotated[
        int | None, typer.Option("--chunk-rows", hidden=True, min=1, help="Rows per block of a new store (tests).")
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run every teacher over the data once and store its raw logits (stage one).

    Creates OUT or resumes it: blocks already complete are skipped. A
    teacher complete with the same weights is not run again; a teacher new
    to the store is added. Processes with distinct --shard I/N may write one
    store at once.

    Example:
      mtkd infer --teachers teachers.toml --data mnist1d:train --out train.zarr
      mtkd infer --teachers teachers.toml --data x.npz --out x.zarr --shard 3/8
    """
    from mtkd.pipeline.infer import parse_shard, run_infer  # heavy (torch): here, so --help stays fast

    parsed_shard = parse_shard(shard)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"infer {out.name} [{parsed_shard}]", total=None)
        result = run_infer(
            teachers,
            data,
            out,
            batch_size=batch_size,
            device=device.value,
            dtype=dtype.value,
            shard=parsed_shard,
            chunk_rows=chunk_rows,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    emit(result.to_dict(), as_json, _render)


def _render(result: dict) -> None:
    table = Table(title=f"mtkd infer -> {result['store']} (shard {result['shard']})")
    for column in ("teacher", "this run", "complete"):
        table.add_column(column)
    for name, complete in result["complete"].items():
        ran = "computed" if name in result["teachers"] else "skipped (already complete)"
        table.add_row(name, ran, "yes" if complete else "no")
    console = Console()
    console.print(table)
    console.print(
        f"{result['rows']} rows, {result['blocks_written']} blocks written, {result['blocks_skipped']} skipped, "
        f"{result['rows_per_s']:.0f} rows/s, {result['wall_s']:.1f} s"
    )
