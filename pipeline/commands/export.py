"""`mtkd export`: a trained student as a Hugging Face folder or a TOML + state_dict. Hands off to
export.run_export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtkd.pipeline.commands.output import JsonOption, emit


def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="A finished `mtkd train` run directory.")],
    out: Annotated[Path, typer.Option("--out", help="The folder to write (new, or empty).")],
    as_json: JsonOption = False,
) -> None:
    """Export a run's student where its users load it.

    A Hugging Face student: a save_pretrained folder (safetensors) with the
    tokenizer the data was tokenised with (`mtkd tokenize` records it), for
    AutoModelForCausalLM.from_pretrained(OUT). Any other student: OUT/student.toml
    and OUT/student.pt, for `mtkd eval --model` or a [[teachers]] table.

    Example:
      mtkd export runs/kd --out export/kd
      python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('export/kd')"
    """
    from mtkd.pipeline.export import run_export  # heavy (torch, transformers): here, so --help stays fast

    emit(run_export(run, out), as_json, _render)


def _render(result: dict) -> None:
    print(f"{result['out']}: student {result['student']!r} of {result['run']} as a {result['form']} "
          f"{'folder (save_pretrained)' if result['form'] == 'hugging-face' else 'TOML and state_dict'}")
    print(f"  files: {', '.join(result['files'])}")
    tok = result["tokenizer"]
    if tok is not None:
        print(f"  tokenizer from the {tok['source']}: {tok['path']}")
