"""`mtkd tokenize`: text -> the token data mtkd reads (Parquet: `input_ids`, `attention_mask`, `labels`).

    config = TokenizeConfig(tokenizer="tok/", data="chat.jsonl", out="train.parquet", max_length=512)
    run_tokenize(config)

Inputs (`data`: one file, or a folder of such files taken in name order as one data set):
    .txt            every non-empty line is one example of text (as Hugging Face's "text" loader)
    .jsonl          one JSON object a line, with a `text` string or a `messages` list (chat)
    .parquet        a `text` or a `messages` column, read one row group at a time
An example is `text`, tokenised with the tokenizer's special tokens, every token trained on; or
`messages` ([{"role", "content"}, ...]), rendered by the tokenizer's chat template, where only the
assistant turns are trained on: the rest (system, user, the template's own markup before each
reply) has labels -100, so it counts for nothing in stage one's labels and stage two's loss.

Rows: one example per row, truncated to `max_length`; or with `pack`, every example followed by the
EOS token, concatenated and cut into rows of `max_length` (the last one shorter), as the language-
model demo makes its windows. `labels` follow Hugging Face: they equal input_ids where trained,
-100 elsewhere (mtkd reads position t's label as labels[t + 1]).

The output is written under a temporary name beside `out` and renamed when complete, so a refusal
or a failure leaves nothing. Its schema metadata (key b"mtkd") records the tokenizer (its path and
a sha256 over its files) and the options: `mtkd export` reads it to copy the tokenizer with the
student. The same inputs and tokenizer give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.pipeline.data import IGNORE_LABEL
from mtkd.pipeline.errors import BadInputError, SpecError
from mtkd.pipeline.specs import brief

SUFFIXES = (".txt", ".jsonl", ".parquet")
COLUMNS = ("text", "messages")
METADATA_KEY = b"mtkd"
ENCODE_BATCH = 256  # examples tokenised at once (the fast tokenizers parallelise a batch)
ROW_GROUP_ROWS = 1024  # output rows per Parquet row group: what stage two reads at a time
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


@dataclass(frozen=True)
class TokenizeConfig:
    tokenizer: Path  # a from_pretrained folder or a tokenizers JSON file
    data: Path  # a file or a folder of files (SUFFIXES)
    out: Path  # the .parquet to write
    max_length: int | None = None  # tokens per row; needed with pack
    pack: bool = False

    def __post_init__(self) -> None:
        for name in ("tokenizer", "data", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.max_length is not None and (isinstance(self.max_length, bool) or self.max_length < 2):
            raise BadInputError(f"--max-length must be an integer >= 2 (a label needs a next token), got {self.max_length!r}")
        if self.pack and self.max_length is None:
            raise BadInputError("--pack needs --max-length (the length of the rows it cuts)")
        if self.out.suffix != ".parquet":
            raise BadInputError(f"--out {str(self.out)!r}: the token data is written as Parquet; name it *.parquet")


def run_tokenize(config: TokenizeConfig, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Tokenise `config.data` into `config.out` (see the module docstring); returns a summary.

    Raises BadInputError (nothing written) for a missing or unknown input, a missing column, a chat
    column without a chat template, an existing --out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if config.out.exists():
        raise BadInputError(f"--out {str(config.out)!r} exists; choose another path (tokenize never overwrites)")
    if config.out.parent.exists() and not config.out.parent.is_dir():
        raise BadInputError(f"--out {str(config.out)!r}: {str(config.out.parent)!r} is not a folder")
    files = input_files(config.data)
    tokenizer, record = load_tokenizer(config.tokenizer)
    examples = _examples(files, progress)
    column, first = _first(examples, files)
    if column == "messages" and not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"tokenizer {str(config.tokenizer)!r} has no chat template, needed for the messages of {str(files[0])!r}")
    eos = _eos_id(tokenizer, config.tokenizer) if config.pack else None

    metadata = {"format": 1, "tokenizer": record, "data": str(config.data), "column": column,
                "max_length": config.max_length, "pack": config.pack}
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                        ("labels", pa.list_(pa.int32()))], metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    tmp = config.out.with_name(f".tmp-{config.out.name}")
    rows = tokens = trained = examples_seen = 0
    buffer: list[tuple[list[int], list[int]]] = []
    made = [p for p in (config.out.parent, *config.out.parent.parents) if not p.exists()]  # removed on failure
    config.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            def flush() -> None:
                nonlocal rows, tokens, trained
                if not buffer:
                    return
                ids = [r[0] for r in buffer]
                labels = [r[1] for r in buffer]
                writer.write_table(pa.table({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                                             "labels": labels}, schema=schema))
                rows += len(ids)
                tokens += sum(map(len, ids))
                trained += sum(sum(1 for v in r[1:] if v != IGNORE_LABEL) for r in labels)  # positions with a label
                buffer.clear()

            for ids, labels in _rows(_encoded(_chain(first, examples), column, tokenizer), config, eos):
                examples_seen += 1
                buffer.append((ids, labels))
                if len(buffer) == ROW_GROUP_ROWS:
                    flush()
            flush()
        if rows == 0:
            raise BadInputError(f"--data {str(config.data)!r} holds no non-empty example")
        os.replace(tmp, config.out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return {"out": str(config.out), "rows": rows, "tokens": tokens, "labelled_positions": trained, "column": column,
            "files": [str(f) for f in files], "tokenizer": record, "max_length": config.max_length, "pack": config.pack}


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The `mtkd tokenize` record of a Parquet file (or of the first shard of a folder), or None."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".parquet")
        if not shards:
            return None
        path = shards[0]
    if path.suffix != ".parquet" or not path.is_file():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # not Parquet: then there is no record
        return None
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


# -- the tokenizer ------------------------------------------------------------------------------------


def load_tokenizer(path: Path) -> tuple[Any, dict[str, Any]]:
    """A Hugging Face fast tokenizer from a local folder or a `tokenizers` JSON file, and its record
    (path, kind, sha256 over the files that make it)."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as e:
        raise SpecError("mtkd tokenize needs transformers and tokenizers (pip install 'mtkd[hf]')") from e
    path = Path(path)
    try:
        if path.is_dir():
            tokenizer, kind = AutoTokenizer.from_pretrained(str(path), local_files_only=True), "pretrained"
        elif path.is_file() and path.suffix == ".json":
            tokenizer, kind = PreTrainedTokenizerFast(tokenizer_file=str(path)), "tokenizers-json"
        else:
            raise SpecError(f"--tokenizer {str(path)!r}: not a tokenizer folder or a tokenizers .json file")
    except SpecError:
        raise
    except Exception as e:  # a folder without a tokenizer, a damaged file
        raise SpecError(f"--tokenizer {str(path)!r}: cannot load it: {brief(e)}") from e
    return tokenizer, {"path": str(path.resolve()), "kind": kind, "sha256": tokenizer_sha256(path)}


def tokenizer_sha256(path: Path) -> str:
    """sha256 over a tokenizer's files (name and bytes, in name order; a folder's weight files left out)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _is_tokenizer_file(p))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for piece in iter(lambda: stream.read(1 << 20), b""):
                h.update(piece)
    return h.hexdigest()


def _is_tokenizer_file(p: Path) -> bool:
    # A model folder may hold its tokenizer too: its weights are not part of the tokenizer.
    return p.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf") and p.name not in (
        "config.json", "generation_config.json", "model.safetensors.index.json")


def _eos_id(tokenizer: Any, path: Path) -> int:
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in EOS_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    raise BadInputError(f"--tokenizer {str(path)!r} names no EOS token (eos_token, or one of {', '.join(EOS_CANDIDATES)}); "
                        "--pack joins examples with it")


# -- the inputs ---------------------------------------------------------------------------------------


def input_files(data: Path) -> list[Path]:
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.is_file() and not p.name.startswith("."))
        unknown = [p.name for p in files if p.suffix not in SUFFIXES]
        if unknown:
            raise BadInputError(f"--data {str(data)!r} holds {unknown[0]!r}: not one of {', '.join(SUFFIXES)}")
        if not files:
            raise BadInputError(f"--data {str(data)!r} is an empty folder")
        suffixes = {p.suffix for p in files}
        if len(suffixes) > 1:
            raise BadInputError(f"--data {str(data)!r} mixes {', '.join(sorted(suffixes))} files; give shards of one kind")
        return files
    if not data.is_file():
        raise BadInputError(f"--data {str(data)!r}: no such file or folder")
    if data.suffix not in SUFFIXES:
        raise BadInputError(f"--data {str(data)!r}: unknown extension {data.suffix or '(none)'!r}; expected {', '.join(SUFFIXES)}")
    return [data]


Example = tuple[str, Any, str]  # (column, value, where: "FILE:LINE" or "FILE row N")


def _examples(files: list[Path], progress: Callable[[int, int], None] | None) -> Iterator[Example]:
    """Every example of every file, in order; progress in bytes of the inputs read."""
    total = sum(f.stat().st_size for f in files)
    done = 0
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                file = pq.ParquetFile(f)
            except Exception as e:
                raise BadInputError(f"--data {str(f)!r}: cannot read it as Parquet: {brief(e)}") from e
            column = next((c for c in COLUMNS if c in file.schema_arrow.names), None)
            if column is None:
                raise BadInputError(f"--data {str(f)!r} has no 'text' or 'messages' column (columns: {', '.join(file.schema_arrow.names)})")
            row = 0
            for g in range(file.num_row_groups):
                for value in file.read_row_group(g, columns=[column]).column(0).to_pylist():
                    yield column, value, f"{f} row {row}"
                    row += 1
                if progress:
                    progress(done + f.stat().st_size * (g + 1) // max(file.num_row_groups, 1), total)
            done += f.stat().st_size
            continue
        with open(f, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                done += len(raw)
                where = f"{f}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadInputError(f"--data {where}: not UTF-8 text ({brief(e)})") from e
                if f.suffix == ".txt":
                    if line.strip():
                        yield "text", line.rstrip("\r\n"), where
                elif line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadInputError(f"--data {where}: not a JSON object ({brief(e)})") from e
                    column = next((c for c in COLUMNS if isinstance(record, dict) and c in record), None)
                    if column is None:
                        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                        raise BadInputError(f"--data {where}: no 'text' or 'messages' field (found {keys})")
                    yield column, record[column], where
                if progress and number % 1000 == 0:
                    progress(done, total)
        if progress:
            progress(done, total)


def _first(examples: Iterator[Example], files: list[Path]) -> tuple[str, Example | None]:
    """The data's column (from its first example: every example must have it) and that example."""
    for example in examples:
        return example[0], example
    raise BadInputError(f"--data {str(files[0])!r} holds no example")


def _chain(first: Example | None, rest: Iterator[Example]) -> Iterator[Example]:
    if first is not None:
        yield first
    yield from rest


# -- tokens -------------------------------------------------------------------------------------------


def _encoded(examples: Iterator[Example], column: str, tokenizer: Any) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, labels -100 where not trained on; batches for the fast tokenizer."""
    batch: list[tuple[Any, str]] = []

    def encode() -> Iterator[tuple[list[int], list[int]]]:
        if column == "text":
            for ids in tokenizer([v for v, _ in batch])["input_ids"]:
                yield list(ids), list(ids)
        else:
            for messages, where in batch:
                yield _chat(tokenizer, messages, where)
        batch.clear()

    for kind, value, where in examples:
        if kind != column:
            raise BadInputError(f"--data {where}: has '{kind}' where the data's first example had '{column}'")
        if column == "text" and not isinstance(value, str):
            raise BadInputError(f"--data {where}: text must be a string, got {type(value).__name__}")
        batch.append((value, where))
        if len(batch) == ENCODE_BATCH:
            yield from encode()
    if batch:
        yield from encode()


def _chat(tokenizer: Any, messages: Any, where: str) -> tuple[list[int], list[int]]:
    """A conversation rendered by the chat template; only the assistant turns' tokens are trained on.

    Turn i's tokens are those between the rendering of messages[:i] with the generation prompt (the
    template's markup that opens a reply) and the rendering of messages[:i + 1]."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise BadInputError(f"--data {where}: messages must be a list of {{\"role\", \"content\"}} objects")

    def ids(turns: list[dict], generation: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    try:
        full = ids(messages)
        labels = [IGNORE_LABEL] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(ids(messages[:i], generation=True)), len(ids(messages[: i + 1]))
            labels[start:end] = full[start:end]
    except BadInputError:
        raise
    except Exception as e:  # the template refuses the conversation (roles out of order, ...)
        raise BadInputError(f"--data {where}: the chat template cannot render it: {brief(e)}") from e
    return full, labels


def _rows(encoded: Iterator[tuple[list[int], list[int]]], config: TokenizeConfig, eos: int | None) -> Iterator[tuple[list[int], list[int]]]:
    """One row per example (truncated), or packed: examples joined by EOS and cut into max_length."""
    limit = config.max_length
    if not config.pack:
        for ids, labels in encoded:
            if ids:
                yield (ids[:limit], labels[:limit]) if limit else (ids, labels)
        return
    ids_buf: list[int] = []
    labels_buf: list[int] = []
    for ids, labels in encoded:
        if not ids:
            continue
        ids_buf += ids + [eos]
        labels_buf += labels + [eos]  # the end of an example is trained on: where it stops
        while len(ids_buf) >= limit:
            yield ids_buf[:limit], labels_buf[:limit]
            del ids_buf[:limit], labels_buf[:limit]
    if ids_buf:
        yield ids_buf, labels_buf
