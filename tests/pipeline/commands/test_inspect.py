"""`mtkd inspect` through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import LM_VOCAB

runner = CliRunner()


def _store(tmp_path, make_data, make_teachers):
    toml = make_teachers([{"name": "a"}, {"name": "b", "seed": 1}])
    run_infer(toml, str(make_data(40)), tmp_path / "s.zarr", device="cpu", chunk_rows=16)
    return tmp_path / "s.zarr"


def test_json(tmp_path, make_data, make_teachers):
    result = runner.invoke(app, ["inspect", str(_store(tmp_path, make_data, make_teachers)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [t["name"] for t in report["teachers"]] == ["a", "b"]
    assert all(t["complete"] and t["rows_complete"] == 40 and t["dtype"] == "float16" for t in report["teachers"])
    assert report["ensemble"]["teachers"] == ["a", "b"] and 0 <= report["ensemble"]["metrics"]["accuracy"] <= 1
    assert report["agreement"][0]["a"] == "a" and report["agreement"][0]["rows"] == 40


def test_table_for_people(tmp_path, make_data, make_teachers):
    result = runner.invoke(app, ["inspect", str(_store(tmp_path, make_data, make_teachers))])
    assert result.exit_code == 0, result.output
    for text in ("a", "b", "ensemble (2)", "40/40", "dense f16", "agreement"):
        assert text in result.stdout


def test_unlabelled_store_prints_nulls(tmp_path, make_data, make_teachers):
    run_infer(make_teachers([{"name": "a"}]), str(make_data(10, labelled=False)), tmp_path / "s.zarr", device="cpu")
    result = runner.invoke(app, ["inspect", str(tmp_path / "s.zarr"), "--json"])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["teachers"][0]["metrics"]["accuracy"] is None and report["labelled_rows"] == 0


def test_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "folder").mkdir()
    for path, message in ((tmp_path / "none", "does not exist"), (tmp_path / "folder", "not an mtkd store")):
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2 and message in result.stderr and str(path) in result.stderr


def test_help_has_an_example():
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout and "mtkd inspect train.zarr" in result.stdout


def test_quiet_prints_the_same_report(tmp_path, make_data, make_teachers):
    store = str(_store(tmp_path, make_data, make_teachers))
    loud = runner.invoke(app, ["inspect", store, "--json"])
    quiet = runner.invoke(app, ["inspect", store, "--json", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout.strip().splitlines()[-1]) == json.loads(loud.stdout.strip().splitlines()[-1])


def test_a_token_store(tmp_path, make_tokens, make_teachers):
    lm = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}
    toml = make_teachers([{"name": "a", **lm}, {"name": "b", "seed": 1, **lm}])
    run_infer(toml, str(make_tokens(10)), tmp_path / "t.zarr", top_k=5, temperatures="2,4", device="cpu", chunk_rows=16)
    result = runner.invoke(app, ["inspect", str(tmp_path / "t.zarr"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    store = open_store(tmp_path / "t.zarr")
    labels = torch.from_numpy(store.labels())
    has = labels >= 0
    assert report["kind"] == "tokens" and report["num_sequences"] == 10 and report["labelled_rows"] == int(has.sum())
    label_lp = {}
    for t in report["teachers"]:
        assert (t["layout"], t["top_k"], t["temperatures"], t["vocab_size"], t["dtype"]) == ("topk", 5, [1, 2, 4], LM_VOCAB, "float16")
        assert t["complete"] and t["rows_complete"] == store.num_rows and 0 < t["bytes_per_row"] < 5 * (4 + 2) + 16 + 40
        sparse = store.read_topk(t["name"], 0, store.num_rows)
        label_lp[t["name"]] = sparse.label_logprob.double()
        m = t["metrics"]
        nll = -float(label_lp[t["name"]][has].mean())
        assert m["nll"] == pytest.approx(nll, rel=1e-6) and m["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)
        top1 = sparse.ids.gather(1, sparse.logprobs.argmax(1, keepdim=True)).squeeze(1)
        assert m["accuracy"] == pytest.approx(float((top1[has] == labels[has]).double().mean()))
        for temp in ("1", "2", "4"):
            tail = 1 - store.read_topk(t["name"], 0, store.num_rows, float(temp)).logprobs.double().exp().sum(1)
            assert m["tail_mass"][temp] == pytest.approx(float(tail.clamp(min=0).mean()), abs=1e-3)
        assert m == store.teacher(t["name"]).stats | {k: m[k] for k in ("nll", "perplexity", "ece", "accuracy")}  # same as recorded
    mixture = torch.logsumexp(torch.stack([label_lp["a"], label_lp["b"]]), 0) - math.log(2)  # the mixture's label probability
    assert report["ensemble"]["metrics"]["perplexity"] == pytest.approx(math.exp(-float(mixture[has].mean())), rel=1e-6)
    assert report["agreement"][0]["rows"] == store.num_rows
    table = runner.invoke(app, ["inspect", str(tmp_path / "t.zarr")])
    for text in ("tokens", "top-5 f16", "ppl", "T=4", "ensemble (2)"):
        assert text in table.stdout


@pytest.mark.parametrize("kind", ["rows", "tokens"])
def test_human_output_and_json_show_which_teacher_is_best_and_each_fusion(tmp_path, kind):
    from tests.pipeline.test_fusion import row_store, token_store

    store = (row_store(tmp_path) if kind == "rows" else token_store(tmp_path, "topk"))[0]
    human = runner.invoke(app, ["inspect", str(store.path), "--quiet"], env={"COLUMNS": "100"})
    assert human.exit_code == 0, human.output
    assert "best teacher" in human.output and "ensemble by fusion" in human.output
    for fusion in ("posterior", "best", "entropy", *(("best per sequence",) if kind == "tokens" else ())):
        assert f"│ {fusion} " in human.output, fusion
    assert ("sequences" in human.output) == (kind == "tokens")
    report = json.loads(runner.invoke(app, ["inspect", str(store.path), "--json"]).stdout.strip().splitlines()[-1])
    shares = report["selection"]["best_rows"]
    assert set(shares) == {"a", "b", "c"} and sum(shares.values()) == pytest.approx(1.0)
