"""`mtkd verify`: check every chunk and attribute of a store; --repair drops what is damaged.
Hands off to verify.verify_store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from mtkd.pipeline.commands.output import console as output_console, JsonOption, QuietOption, StorageOption, emit, where
from mtkd.pipeline.progress import progress_bar


def verify(
    store: Annotated[str, typer.Argument(metavar="STORE", help="A store written by `mtkd infer` (a path or a URL).")],
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Drop the records of damaged blocks (and `complete`), so that rerunning "
                     "the same `mtkd infer` recomputes exactly those blocks."),
    ] = False,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Read every chunk once: checksums, NaN/inf, records without chunks and chunks without records,
    attributes that contradict the arrays. Exit 0 when clean, 2 when damage was found (also when
    --repair repaired it: run verify again to see the repaired store).

    Example:
      mtkd verify train.zarr
      mtkd verify train.zarr --repair   # then the same `mtkd infer` again
    """
    from mtkd.pipeline.verify import verify_store  # heavy (torch, zarr): here, so --help stays fast

    loc = where(store, storage_option)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"verify {loc.name}", total=None)
        report = verify_store(loc, repair=repair, progress=lambda done, total: bar.update(task, completed=done, total=total))
    emit(report.to_dict(), as_json, _render)
    if not report.clean:
        damage = report.damage
        teachers = sorted({f.teacher for f in damage if f.teacher is not None})
        action = "repaired: rerun `mtkd infer` to recompute what was dropped" if repair and not report.unrepaired else (
            "not all of it could be repaired" if repair else f"run `mtkd verify {store} --repair`, then `mtkd infer` again"
        )
        named = f" (teachers {', '.join(map(repr, teachers))})" if teachers else ""
        typer.echo(f"error: store {str(store)!r}: {len(damage)} problems{named}; {action}", err=True)
        raise typer.Exit(2)


def _render(report: dict) -> None:
    console = output_console(highlight=False)
    for t in report["teachers"]:
        state = "complete" if t["complete"] else "incomplete"
        bad = f", damaged blocks {t['damaged_blocks']}" if t["damaged_blocks"] else ""
        console.print(f"teacher {t['name']}: {t['blocks_recorded']}/{report['blocks']} blocks recorded ({state}){bad}")
    for f in report["findings"]:
        console.print(("[red]damage[/red] " if f["damage"] else "note ") + escape(f["message"]))
    for line in report["repaired"]:
        console.print("repaired " + escape(line))
    for line in report["unrepaired"]:
        console.print("[red]not repaired[/red] " + escape(line))
    if report["clean"]:
        console.print(f"{report['store']}: clean")
