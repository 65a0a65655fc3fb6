"""The language-model demo end to end, shrunk (60 kB of stdlib text, a 300-token vocabulary, tiny
models, one or two epochs): every stage runs for real through the library functions behind the
commands, the result has the documented shape, and the students learn (far better than chance)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mtkd.pipeline.demos.corpus import CorpusConfig
from mtkd.pipeline.demos.lm import LMDemoConfig, run_lm_demo
from mtkd.pipeline.demos.rows import Recipe
from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.store import open_store

MODELS = "mtkd.pipeline.models"


def tiny_config() -> LMDemoConfig:
    teachers = (
        Recipe("transformer", f"{MODELS}:transformer_lm", {"d_model": 32, "layers": 1, "heads": 2}, epochs=3, lr=1e-2),
        Recipe("gru", f"{MODELS}:gru_lm", {"hidden": 32}, epochs=3, lr=1e-2),
    )
    student = Recipe("student", f"{MODELS}:transformer_lm", {"d_model": 16, "layers": 1, "heads": 2}, epochs=2, lr=1e-2)
    return LMDemoConfig(corpus=CorpusConfig(max_bytes=60_000, vocab_size=300, window=32), teachers=teachers,
                        student=student, top_k=8, batch_size=16, seeds=(0, 1), device="cpu")


@pytest.mark.slow
def test_lm_demo_runs_every_stage_and_the_students_learn(tmp_path, one_thread):
    config = tiny_config()
    result = run_lm_demo(tmp_path / "demo", config, log=lambda message: None)

    assert set(result["teachers"]) == {"transformer", "gru"}
    models = [*result["teachers"].values(), result["ensemble"], result["baseline_student"], result["distilled_student"]]
    assert all(set(m) == {"perplexity", "accuracy"} and 0.0 <= m["accuracy"] <= 1.0 for m in models)
    vocab = result["config"]["corpus"]["vocab_size"]
    # A real floor: a model at chance has perplexity V; the distilled student must be far below.
    assert result["distilled_student"]["perplexity"] < 0.3 * vocab
    assert result["baseline_student"]["perplexity"] < 0.5 * vocab
    assert set(result["wall_s"]) == {"data", "teachers", "infer", "distil", "baseline", "eval", "total"}
    # Each student once per seed (its own initialisation and order), reported as the mean.
    for kind in ("baseline_student", "distilled_student"):
        runs = result["per_seed"][kind]
        assert len(runs) == 2 and runs[0] != runs[1]
        assert result[kind]["perplexity"] == pytest.approx((runs[0]["perplexity"] + runs[1]["perplexity"]) / 2)

    store = open_store(tmp_path / "demo" / "stores" / "train")
    store.require_complete(["transformer", "gru"])
    # Every real train position is one store row, its label the next token; padding is never stored.
    assert store.num_rows == result["config"]["corpus"]["train_tokens"]
    # bytes per token: the store's files on disk over its rows, and below the raw payload (top-8 ids
    # int32 and log-probs float16, two normalisers, a label log-prob and an entropy per teacher, an
    # int64 label): the codecs bought something.
    on_disk = sum(p.stat().st_size for p in (tmp_path / "demo" / "stores" / "train").rglob("*") if p.is_file())
    assert result["bytes_per_token"] == pytest.approx(on_disk / store.num_rows)
    assert result["bytes_per_token"] < 2 * (8 * 4 + 8 * 2 + 2 * 4 + 4 + 4) + 8
    for run in ("baseline", "distilled", "baseline-seed1", "distilled-seed1"):
        lines = (tmp_path / "demo" / "runs" / run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == config.student.epochs
    assert (tmp_path / "demo" / "perplexity.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["distilled_student"] == result["distilled_student"]


def test_lm_demo_refuses_a_folder_that_already_holds_something(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not an empty folder"):
        run_lm_demo(tmp_path / "old", tiny_config(), log=lambda message: None)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]


def test_a_temperature_that_is_not_stored_and_repeated_seeds_are_refused():
    with pytest.raises(BadInputError, match="temperature 3"):
        dataclasses.replace(tiny_config(), temperature=3.0)
    with pytest.raises(BadInputError, match="distinct seeds"):
        dataclasses.replace(tiny_config(), seeds=(1, 1))
