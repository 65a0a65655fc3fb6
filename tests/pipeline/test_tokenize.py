"""`mtkd tokenize` on a tokenizer and text built locally: text and chat, packed or one example a row,
the prompt masked, the tokenizer recorded; refusals exit 2 and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.data import IGNORE_LABEL, load_data
from mtkd.pipeline.tokenize import read_record, tokenizer_sha256
from tests.pipeline.conftest import refused
from tests.pipeline.hf_world import hf_world

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return hf_world(tmp_path_factory.mktemp("hf"))


def tokenize(*args):
    return runner.invoke(app, ["tokenize", *map(str, args), "--quiet"])


def test_text_packed_into_rows_with_eos(world, tmp_path):
    out = tmp_path / "t.parquet"
    result = tokenize("--tokenizer", world.tokenizer_json, "--data", world.text, "--out", out, "--max-length", 16, "--pack", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(world.tokenizer_json))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    texts = [json.loads(line)["text"] for line in world.text.read_text().splitlines()]
    stream = [t for text in texts for t in tok(text)["input_ids"] + [eos]]
    table = pq.read_table(out)
    rows = table.column("input_ids").to_pylist()
    assert [t for r in rows for t in r] == stream and all(len(r) == 16 for r in rows[:-1])
    assert table.column("labels").to_pylist() == rows and summary["rows"] == len(rows) == -(-len(stream) // 16)
    assert summary["tokens"] == len(stream)
    data = load_data(str(out))  # token data mtkd reads: every position but each row's last has a label
    assert data.num_rows == len(stream) and data.labelled_rows == len(stream) - len(rows)
    record = read_record(out)
    assert record["tokenizer"] == {"path": str(world.tokenizer_json.resolve()), "kind": "tokenizers-json",
                                   "sha256": tokenizer_sha256(world.tokenizer_json)}
    again = tmp_path / "again.parquet"
    assert tokenize("--tokenizer", world.tokenizer_json, "--data", world.text, "--out", again, "--max-length", 16, "--pack").exit_code == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic


def test_chat_masks_everything_but_the_replies(world, tmp_path):
    out = tmp_path / "c.parquet"
    result = tokenize("--tokenizer", world.tokenizer, "--data", world.chat, "--out", out)
    assert result.exit_code == 0, result.output
    assert "rows" in result.stdout and "column 'messages'" in result.stdout
    tok = transformers.AutoTokenizer.from_pretrained(str(world.tokenizer))
    rows = pq.read_table(out).to_pylist()
    for line, row in zip(world.chat.read_text().splitlines(), rows):
        messages = json.loads(line)["messages"]
        reply = tok(messages[-1]["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
        trained = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE_LABEL]
        assert trained == reply  # the reply and its end marker, nothing of the prompt
        assert all(y in (t, IGNORE_LABEL) for t, y in zip(row["input_ids"], row["labels"]))
    data = load_data(str(out))
    assert data.labelled_rows == sum(sum(y != IGNORE_LABEL for y in r["labels"][1:]) for r in rows)


def test_one_row_per_example_truncated_and_shards(world, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    texts = [json.loads(line)["text"] for line in world.text.read_text().splitlines()]
    (folder / "a.txt").write_text("\n".join(texts[:10]) + "\n\n")
    pq.write_table(pa.table({"text": texts[10:20]}), folder / "b.parquet")
    assert refused(tokenize("--tokenizer", world.tokenizer, "--data", folder, "--out", tmp_path / "x.parquet"), "mixes")
    (folder / "b.parquet").unlink()
    (folder / "b.txt").write_text("\n".join(texts[10:20]))
    out = tmp_path / "rows.parquet"
    assert tokenize("--tokenizer", world.tokenizer, "--data", folder, "--out", out, "--max-length", 5).exit_code == 0
    rows = pq.read_table(out).column("input_ids").to_pylist()
    tok = transformers.AutoTokenizer.from_pretrained(str(world.tokenizer))
    assert rows == [tok(t)["input_ids"][:5] for t in texts[:20]]


@pytest.mark.parametrize(
    ("make", "options", "culprits"),
    [
        (lambda p: p.write_text('{"prompt": "x"}\n'), (), ["data.jsonl:1", "no 'text' or 'messages'"]),
        (lambda p: p.write_text('{"text": "x"}\nnot json\n'), (), ["data.jsonl:2", "not a JSON object"]),
        (lambda p: p.write_text("x"), ("--pack",), ["--pack needs --max-length"]),
    ],
)
def test_refusals_write_nothing(world, tmp_path, make, options, culprits):
    data = tmp_path / "data.jsonl"
    make(data)
    out = tmp_path / "new" / "out.parquet"  # a folder tokenize would make: removed again on refusal
    refused(tokenize("--tokenizer", world.tokenizer, "--data", data, "--out", out, *options), *culprits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_refuses_chat_without_a_template_and_unknown_files(world, tmp_path):
    refused(tokenize("--tokenizer", world.tokenizer_json, "--data", world.chat, "--out", tmp_path / "o.parquet"),
            "no chat template", "tokenizer.json")
    (tmp_path / "d.csv").write_text("text\nx\n")
    refused(tokenize("--tokenizer", world.tokenizer, "--data", tmp_path / "d.csv", "--out", tmp_path / "o.parquet"),
            "unknown extension '.csv'")
    refused(tokenize("--tokenizer", tmp_path, "--data", world.text, "--out", tmp_path / "o.parquet"), "--tokenizer")
    assert not (tmp_path / "o.parquet").exists() and not list(tmp_path.glob(".tmp-*"))


def test_help_shows_an_example():
    result = runner.invoke(app, ["tokenize", "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout and "mtkd tokenize --tokenizer" in result.stdout
