"""`mtkd inspect`: what a store holds and how good its teachers are. Hands off to report.inspect_store."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mtkd.pipeline.commands.output import console as output_console, JsonOption, QuietOption, StorageOption, emit, where
from mtkd.pipeline.progress import progress_bar


def inspect(
    store: Annotated[str, typer.Argument(metavar="STORE", help="A store written by `mtkd infer` (a path or a URL).")],
    teachers: Annotated[
        str | None, typer.Option("--teachers", help="Comma-separated teachers whose ensemble to show (default: all complete).")
    ] = None,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Show a store's teachers, completeness, quality and agreement.

    Per teacher: layout, dtype, vocabulary, k, temperatures, bytes per row
    (per token). Rows: accuracy, NLL, ECE; tokens: perplexity and
    next-token accuracy. The ensemble is the mean of the complete teachers'
    probabilities. Against the stored labels (-100: left out). Top-k
    teachers also show their mean tail mass at each stored temperature.
    Complementary teachers: the share of labelled rows (tokens: and of
    sequences) on which each teacher gives the label the highest
    probability, and the ensemble under each fusion (posterior and best
    know the label: an upper bound of what selecting targets offer).
    A regression store (float labels, teachers stored as values): MSE, MAE
    and R^2 per teacher and for the ensemble by mean and by median.

    Warnings (one line each; in --json as `warnings`) name a teacher with more
    than 0.3 of its mass outside its top-k, an ensemble worse than its best
    teacher, a teacher no better than a unigram model of the labels.

    Example:
      mtkd inspect train.zarr
      mtkd inspect train.zarr --teachers llama,gpt2 --json
    """
    from mtkd.pipeline.advice import report_warnings
    from mtkd.pipeline.commands.train import _names
    from mtkd.pipeline.config import KIND_DEFAULTS
    from mtkd.pipeline.report import inspect_store  # heavy (torch, zarr): here, so --help stays fast
    from mtkd.pipeline.store import open_store

    opened = open_store(where(store, storage_option))
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"inspect {opened.path.name}", total=opened.num_blocks)
        report = inspect_store(opened, progress=lambda done, total: bar.update(task, completed=done), ensemble_of=_names(teachers))
    if report.get("task") == "regression":
        report["warnings"] = []
        emit(report, as_json, _render_regression)
        return
    # At the temperature `mtkd train` distils at by default on this kind of data.
    report["warnings"] = report_warnings(report, opened.labels(), KIND_DEFAULTS[report["kind"]]["temperature"])
    emit(report, as_json, _render)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _render(report: dict) -> None:
    console = output_console()
    tokens = report["kind"] == "tokens"
    unit = "token" if tokens else "row"
    seqs = f" in {report['num_sequences']} sequences" if tokens else ""
    console.print(
        f"[bold]{report['store']}[/bold] ({report['kind']}): {report['num_rows']} {unit}s{seqs} ({report['labelled_rows']} labelled), "
        f"{report['num_classes']} classes, blocks of {report['chunk_rows']} rows; data {report['dataset']['spec']}"
    )
    table = Table()
    quality = ("acc", "ppl", "NLL") if tokens else ("acc", "NLL", "ECE")
    for column in ("model", "layout", "V", "rows", f"B/{unit}", *quality):
        table.add_column(column, justify="left" if column in ("model", "layout") else "right", no_wrap=True)

    def values(m: dict) -> tuple[str, ...]:
        if tokens:
            return _fmt(m["accuracy"], 3), _fmt(m.get("perplexity"), 1), _fmt(m["nll"], 3)
        return _fmt(m["accuracy"], 3), _fmt(m["nll"], 3), _fmt(m.get("ece"), 3)

    for t in report["teachers"]:
        rows = f"{t['rows_complete']}/{report['num_rows']}" + ("" if t["complete"] else " !")
        kind = f"top-{t['top_k']}" if t["layout"] == "topk" else "dense"
        if t.get("tail_samples"):
            kind += f"+{t['tail_samples']}s"
        size = "-" if t["bytes_per_row"] is None else f"{t['bytes_per_row']:.0f}"
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}.get(t["dtype"], t["dtype"])
        table.add_row(t["name"], f"{kind} {short}", str(t["vocab_size"]), rows, size, *values(t["metrics"]))
    if report["ensemble"] is not None:
        label = f"ensemble ({len(report['ensemble']['teachers'])})"
        table.add_row(label, "", "", str(report["num_rows"]), "", *values(report["ensemble"]["metrics"]), style="bold")
    console.print(table)
    console.print(
        f"acc: {'next-token accuracy, ppl: perplexity' if tokens else 'accuracy'}; B/{unit}: bytes stored per {unit}; "
        "rows ... !: incomplete; ensemble (K): the mean of K complete teachers' probabilities"
    )
    for t in report["teachers"]:  # v3 features: bytes per row each (they dominate a store that has them)
        for module, size in (t.get("feature_bytes_per_row") or {}).items():
            stored = "-" if size["stored"] is None else f"{size['stored']:.0f}"
            console.print(f"  {t['name']} features/{module}: {stored} B/{unit} stored ({size['raw']} B/{unit} uncompressed)")
    sparse = [t for t in report["teachers"] if t["layout"] == "topk"]
    if sparse:
        temps = sorted({temp for t in sparse for temp in t["metrics"]["tail_mass"]}, key=float)
        tails = Table(title="mean tail mass (probability outside the stored top-k)")
        for column in ("teacher", *(f"T={temp}" for temp in temps)):
            tails.add_column(column, justify="left" if column == "teacher" else "right")
        for t in sparse:
            tails.add_row(t["name"], *(_fmt(t["metrics"]["tail_mass"].get(temp), 3) for temp in temps))
        console.print(tails)
    if report["agreement"]:
        pairs = Table(title="pairwise top-1 agreement (rows both wrote)")
        for column in ("teacher", "teacher", "agreement", "rows"):
            pairs.add_column(column)
        for p in report["agreement"]:
            pairs.add_row(p["a"], p["b"], _fmt(p["agreement"]), str(p["rows"]))
        console.print(pairs)
    if report.get("selection"):
        _render_selection(console, report["selection"], tokens)

    for line in report.get("warnings", []):
        console.print(f"[bold yellow]warning[/] {escape(line)}", highlight=False)


def _render_regression(report: dict) -> None:
    """A regression store: each teacher and the fused ensembles, MSE / MAE / R^2 averaged over the outputs."""
    console = output_console()
    console.print(
        f"[bold]{report['store']}[/bold] (regression rows): {report['num_rows']} rows ({report['labelled_rows']} with targets), "
        f"{report['num_outputs']} outputs, blocks of {report['chunk_rows']} rows; data {report['dataset']['spec']}"
    )
    table = Table()
    for column in ("model", "layout", "D", "rows", "B/row", "MSE", "MAE", "R^2"):
        table.add_column(column, justify="left" if column in ("model", "layout") else "right", no_wrap=True)

    def cells(m: dict) -> tuple[str, ...]:
        return _fmt(m["mse"]), _fmt(m["mae"]), _fmt(m["r2"])

    for t in report["teachers"]:
        rows = f"{t['rows_complete']}/{report['num_rows']}" + ("" if t["complete"] else " !")
        size = "-" if t["bytes_per_row"] is None else f"{t['bytes_per_row']:.0f}"
        table.add_row(t["name"], f"values {t['dtype']}", str(t["vocab_size"]), rows, size, *cells(t["metrics"]))
    if report["ensemble"] is not None:
        for fusion, m in report["ensemble"]["metrics"].items():
            table.add_row(f"{fusion} ({len(report['ensemble']['teachers'])})", "", "", str(report["num_rows"]), "", *cells(m), style="bold")
    console.print(table)
    console.print("against the stored targets (NaN: left out), averaged over the outputs (--json: per output too); "
                  "rows ... !: incomplete; mean/median (K): the K complete teachers fused")


def _render_selection(console: Console, selection: dict, tokens: bool) -> None:
    """Whether the teachers are complementary: who is best where, and the ensemble per fusion."""
    best = Table(title="best teacher (label log-prob)")
    for column in ("teacher", "rows", *(("sequences",) if tokens else ())):
        best.add_column(column, justify="left" if column == "teacher" else "right")
    for name in selection["teachers"]:
        cells = [_fmt(selection["best_rows"][name], 3)] + ([_fmt(selection["best_sequences"][name], 3)] if tokens else [])
        best.add_row(name, *cells)
    console.print(best)
    unit = "tokens" if tokens else "rows"
    seqs = f" ({selection['sequences']} sequences)" if tokens else ""
    console.print(f"share of the {selection['rows']} labelled {unit}{seqs} on which each teacher is best")
    fused = Table(title="ensemble by fusion")
    quality = ("acc", "ppl", "NLL") if tokens else ("acc", "NLL")
    for column in ("fusion", *quality):
        fused.add_column(column, justify="left" if column == "fusion" else "right")
    for name, m in selection["fusions"].items():
        cells = [_fmt(m["accuracy"], 3)] + ([_fmt(m.get("perplexity"), 1)] if tokens else []) + [_fmt(m["nll"], 3)]
        fused.add_row(name.replace("_", " per "), *cells)
    console.print(fused)
    console.print("posterior and best know the label: the most that selecting targets offer, not a held-out score")
