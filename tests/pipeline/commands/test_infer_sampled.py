"""`mtkd infer --tail-samples` through the real CLI: refusals (exit 2, nothing written), the table and
inspect. Real processes killed and resumed, and concurrent shards, run on sampled stores in
test_infer.py's process tests (parametrized over the layouts)."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.commands.test_infer import SAMPLED, invoke
from tests.pipeline.conftest import LM_VOCAB, refused, snapshot

LM = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}


@pytest.mark.parametrize(("extra", "culprits"), [
    (("--top-k", "4", "--tail-samples", "-1"), ("--tail-samples must be at least 0", "-1")),
    (("--top-k", "0"), ("--top-k must be at least 1", "--tail-samples")),
    (("--tail-samples", "8"), ("--tail-samples applies to top-k teachers only", "'lm'")),  # V = 40: tokens stored dense
])
def test_bad_tail_options_exit_2_and_write_nothing(tmp_path, make_tokens, make_teachers, extra, culprits):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    refused(invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", *extra), *culprits)
    assert not (tmp_path / "t.zarr").exists()


def test_tail_samples_on_a_dense_store_exit_2_untouched(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    args = ("--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", "--quiet")
    assert invoke("infer", *args).exit_code == 0  # dense (V = 40)
    before = snapshot(tmp_path / "t.zarr")
    refused(invoke("infer", *args, "--tail-samples", "4"), "teacher 'lm'", "0 tail samples", "--tail-samples 4")
    assert snapshot(tmp_path / "t.zarr") == before


def test_the_table_and_inspect_show_the_samples(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    result = invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", "--top-k", "4", "--tail-samples", "6")
    assert result.exit_code == 0, result.output
    assert "top-4 + 6 samples of 40" in result.stdout
    shown = invoke("inspect", tmp_path / "t.zarr")
    assert shown.exit_code == 0 and "top-4+6s" in shown.stdout
    report = json.loads(invoke("inspect", tmp_path / "t.zarr", "--json").stdout.strip().splitlines()[-1])
    assert report["teachers"][0]["tail_samples"] == 6 and report["teachers"][0]["bytes_per_row"] > 0
