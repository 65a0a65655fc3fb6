"""`mtkd tokenize`: text or chat into token data (Parquet). Hands off to tokenize.run_tokenize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtkd.pipeline.commands.output import JsonOption, QuietOption, emit
from mtkd.pipeline.progress import progress_bar


def tokenize(
    tokenizer: Annotated[
        Path, typer.Option("--tokenizer", help="A local tokenizer folder (what AutoTokenizer.from_pretrained loads) "
                           "or a tokenizers .json file.")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="A .txt (one example a line), a .jsonl or .parquet with a `text` or a "
                           "`messages` column, or a folder of such shards.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The token data to write: a new .parquet file.")],
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=2, help="Tokens per row: longer examples are truncated (or, "
                                 "with --pack, the length of every row).")
    ] = None,
    pack: Annotated[
        bool, typer.Option("--pack", help="Join the examples with EOS and cut the stream into rows of --max-length "
                           "(default: one example per row).")
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Tokenise text or chat into token data for `mtkd infer` and `mtkd train`.

    Writes input_ids, attention_mask and labels (Hugging Face's: -100 where
    not trained on). Chat `messages` are rendered by the tokenizer's chat
    template; only the assistant turns are trained on. The tokenizer's path
    and hash are recorded in the file, for `mtkd export`. Deterministic.

    Example:
      mtkd tokenize --tokenizer models/llama --data corpus.txt \\
          --out train.parquet --max-length 512 --pack
      mtkd tokenize --tokenizer tok.json --data chat.jsonl --out sft.parquet
    """
    from mtkd.pipeline.tokenize import TokenizeConfig, run_tokenize  # heavy (transformers): here

    config = TokenizeConfig(tokenizer=tokenizer, data=data, out=out, max_length=max_length, pack=pack)
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"tokenize {data.name} (bytes read)", total=None)
        result = run_tokenize(config, progress=lambda done, total: bar.update(task, completed=done, total=total))
    emit(result, as_json, _render)


def _render(result: dict) -> None:
    mode = f"packed into rows of {result['max_length']}" if result["pack"] else (
        f"one example a row, at most {result['max_length']} tokens" if result["max_length"] else "one example a row")
    print(f"{result['out']}: {result['rows']} rows, {result['tokens']} tokens ({result['labelled_positions']} positions "
          f"with a label), {mode}")
    print(f"  from {len(result['files'])} file(s), column {result['column']!r}; tokenizer {result['tokenizer']['path']} "
          f"(sha256 {result['tokenizer']['sha256'][:12]})")
