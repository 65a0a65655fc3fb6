"""`mtkd infer`: stage one, teachers' outputs into a Zarr store. Parses options, hands off to run_infer."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mtkd.pipeline.commands.output import console as output_console, JsonOption, QuietOption, StorageOption, emit, where
from mtkd.pipeline.device import Device
from mtkd.pipeline.progress import progress_bar


class Dtype(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


def infer(
    teachers: Annotated[
        Path,
        typer.Option("--teachers", help="Teachers TOML: name, factory, kwargs, checkpoint, torchscript or run per teacher.", exists=True, dir_okay=False, readable=True),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Data spec. Rows: PATH.npz (x, y), PATH.npy, a Zarr array, mnist1d:SPLIT, MODULE:FUNCTION. "
            "Tokens: PATH.npz (input_ids, attention_mask, labels), PATH.parquet or a folder of them (input_ids, labels), "
            "MODULE:FUNCTION (a list of id arrays). labels: -100 = not trained on. A .npz/.npy or Zarr array may be a URL (s3://...).",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="The store to create or resume: a Zarr v3 folder, or a URL (s3://bucket/prefix).")],
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Rows per forward pass (default 512), or whole sequences for tokens (16).")
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    dtype: Annotated[
        Dtype,
        typer.Option("--dtype", help="Stored logit dtype; on CUDA, 16-bit dtypes also autocast the forward. "
                     "Regression teachers (float labels) are stored as float32 values whatever it says."),
    ] = Dtype.float16,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Store each row's K most probable classes (sparse). Default: dense; tokens with V > 1024: 64."),
    ] = None,
    temperatures: Annotated[
        str | None,
        typer.Option("--temperatures", help="Sparse only: temperatures whose exact normalisers are stored (default 1,2; 1 always)."),
    ] = None,
    tail_samples: Annotated[
        int,
        typer.Option("--tail-samples", help="Sparse: also store M draws per position from each teacher's unlisted classes "
                     "(its sampled tail; with --top-k 0, from all classes). Default 0: none."),
    ] = 0,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seed of the tail draws (default 0; recorded per teacher as tail_seed)."),
    ] = None,
    shard: Annotated[
        str, typer.Option("--shard", help="I/N: write the row blocks b with b % N == I; N processes may run at once.")
    ] = "0/1",
    chunk_rows: Annotated[
        int | None, typer.Option("--chunk-rows", hidden=True, min=1, help="Rows per block of a new store (tests).")
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run every teacher over the data once and store its outputs (stage one).

    Creates OUT or resumes it: blocks already complete are skipped. A
    teacher complete with the same weights is not run again; a teacher new
    to the store is added. Processes with distinct --shard I/N may write one
    store at once. On regression data (float labels) every teacher is stored
    as its raw outputs (layout values, float32).

    Example:
      mtkd infer --teachers teachers.toml --data mnist1d:train --out train.zarr
      mtkd infer --teachers teachers.toml --data x.npz --out x.zarr --shard 3/8
      mtkd infer --teachers t.toml --data x.npz --out s3://bucket/x.zarr \\
          --shard 3/8 --storage-option endpoint_url=http://host:9000
      mtkd infer --teachers lm.toml --data tok.parquet --out tok.zarr --top-k 64
      mtkd infer --teachers lm.toml --data tok.parquet --out tok.zarr \\
          --top-k 32 --tail-samples 32
    """
    from mtkd.pipeline.data import load_data
    from mtkd.pipeline.infer import parse_shard, run_infer  # heavy (torch): here, so --help stays fast
    from mtkd.pipeline.storage import is_url, parse_options

    parsed_shard = parse_shard(shard)
    # The --storage-option pairs are for whichever of the store and the data lives at a URL.
    store = where(out, storage_option if is_url(out) or not is_url(data) else None)
    if is_url(data):
        data = load_data(data, parse_options(storage_option))
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"infer {store.name} [{parsed_shard}]", total=None)
        result = run_infer(
            teachers,
            data,
            store,
            batch_size=batch_size,
            device=device.value,
            dtype=dtype.value,
            top_k=top_k,
            temperatures=temperatures,
            shard=parsed_shard,
            chunk_rows=chunk_rows,
            tail_samples=tail_samples,
            seed=seed,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    emit(result.to_dict(), as_json, _render)


def _render(result: dict) -> None:
    table = Table(title=f"mtkd infer -> {result['store']} (shard {result['shard']})")
    for column in ("teacher", "this run", "layout", "complete"):
        table.add_column(column)
    for name, complete in result["complete"].items():
        ran = "computed" if name in result["teachers"] else "skipped (already complete)"
        layout = result["layouts"].get(name)
        table.add_row(name, ran, _layout(layout) if layout else "", "yes" if complete else "no")
    console = output_console()
    console.print(table)
    unit = "tokens" if result["kind"] == "tokens" else "rows"
    console.print(
        f"{result['rows']} {unit}, {result['blocks_written']} blocks written, {result['blocks_skipped']} skipped, "
        f"{result['rows_per_s']:.0f} {unit}/s, {result['wall_s']:.1f} s"
    )


def _layout(attrs: dict) -> str:
    if attrs["layout"] == "topk":
        temps = ",".join(f"{t:g}" for t in attrs["temperatures"])
        tail = f" + {attrs['tail_samples']} samples" if attrs.get("tail_samples") else ""
        return f"top-{attrs['top_k']}{tail} of {attrs['vocab_size']}, T={temps}, {attrs['dtype']}"
    if attrs["layout"] == "values":
        return f"values {attrs['vocab_size']}, {attrs['dtype']}"
    return f"dense {attrs['vocab_size']}, {attrs['dtype']}"
