"""The language-model demo end to end, shrunk (40 kB each of stdlib code and pydoc prose, a 300-token
vocabulary, tiny models, two or three epochs): every stage runs for real through the library functions behind the
commands, the result has the documented shape, and the students learn (far better than chance)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mtkd.pipeline.demos.corpus import CorpusConfig
from mtkd.pipeline.demos.lm import Fusing, LMDemoConfig, run_lm_demo
from mtkd.pipeline.demos.rows import Recipe
from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.store import open_store

MODELS = "mtkd.pipeline.models"


def tiny_config() -> LMDemoConfig:
    # One small GRU expert per domain (as the demo's), a tiny student, 4 kB-scale text per domain.
    teachers = tuple(Recipe(domain, f"{MODELS}:gru_lm", {"hidden": 48}, epochs=3, lr=1e-2, data=domain)
                     for domain in ("code", "prose"))
    student = Recipe("student", f"{MODELS}:transformer_lm", {"d_model": 16, "layers": 1, "heads": 2}, epochs=2, lr=1e-2)
    return LMDemoConfig(corpus=CorpusConfig(max_bytes=40_000, prose_max_bytes=40_000, vocab_size=300, window=32),
                        teachers=teachers, student=student, top_k=8, batch_size=16, seeds=(0, 1), device="cpu")


@pytest.mark.slow
def test_lm_demo_runs_every_stage_and_the_students_learn(tmp_path, one_thread):
    config = tiny_config()
    result = run_lm_demo(tmp_path / "demo", config, log=lambda message: None)

    assert set(result["teachers"]) == set(result["single_teacher_students"]) == {"code", "prose"}
    assert set(result["fused_students"]) == set(result["ensembles"]) == {"mean", "best-sequence"}
    assert result["experts"] == {"code": "code", "prose": "prose"} and result["chosen_fusion"] == "best-sequence"
    models = [*result["teachers"].values(), *result["ensembles"].values(), result["baseline_student"],
              *result["single_teacher_students"].values(), *result["fused_students"].values()]
    for m in models:
        assert set(m["domains"]) == {"code", "prose"}
        for where in (m, *m["domains"].values()):
            assert where["perplexity"] > 1.0 and 0.0 <= where["accuracy"] <= 1.0
    # The experts are complementary: each is better on its own domain than the other expert.
    teachers = result["teachers"]
    for domain, other in (("code", "prose"), ("prose", "code")):
        assert teachers[domain]["domains"][domain]["perplexity"] < teachers[other]["domains"][domain]["perplexity"]
    # `best` per sequence gives each validation window to the teacher that explains it best: its
    # ensemble is at least as good as either teacher on every split (exactly, not by luck), and on
    # the mixture, where each expert wins its own domain's windows, better than both.
    best, mean = result["ensembles"]["best-sequence"], result["ensembles"]["mean"]
    for where in ("code", "prose"):
        assert best["domains"][where]["perplexity"] <= 1.0001 * min(t["domains"][where]["perplexity"] for t in teachers.values())
    assert best["perplexity"] < 0.99 * min(t["perplexity"] for t in teachers.values())
    # ... and it is exactly the float64 computation from the stored label log-probabilities: per
    # window, the teacher of the highest summed log p(label); a fusion that does not select fails.
    store = open_store(tmp_path / "demo" / "stores" / "validation-mixture")
    labels, offsets = store.labels(), store.offsets()
    scores = np.stack([store.read(t, 0, store.num_rows, only=("label_logprob",))["label_logprob"] for t in ("code", "prose")]).astype(np.float64)
    chosen = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        has = labels[start:stop] != -100
        window = scores[:, start:stop][:, has]
        chosen.append(window[int(np.argmax(window.sum(axis=1)))])
    assert best["perplexity"] == pytest.approx(float(np.exp(-np.concatenate(chosen).mean())), rel=1e-5)
    # The ensembles are weighed as training weighs the teachers: under mean, what `mtkd inspect` says.
    assert mean["perplexity"] == pytest.approx(result["ensemble"]["perplexity"], rel=1e-4)
    assert mean["domains"]["prose"]["accuracy"] == pytest.approx(result["ensemble"]["domains"]["prose"]["accuracy"])
    # A real floor: a model at chance has perplexity V; every student must be far below.
    vocab = result["config"]["corpus"]["vocab_size"]
    students = [result["baseline_student"], *result["single_teacher_students"].values(), *result["fused_students"].values()]
    assert max(s["perplexity"] for s in students) < 0.5 * vocab
    assert result["distilled_student"] == result["fused_students"]["best-sequence"]
    assert set(result["wall_s"]) == {"data", "teachers", "infer", "baseline", "single_teacher", "distil", "eval", "total"}
    # Each student once per seed (its own initialisation and order), reported as mean and sample std.
    per_seed = result["per_seed"]
    assert per_seed["distilled_student"] == per_seed["fused_students"]["best-sequence"]
    assert len(per_seed["single_teacher_students"]["prose"]) == 2
    for runs, kind in ((per_seed["baseline_student"], result["baseline_student"]),
                       (per_seed["distilled_student"], result["distilled_student"])):
        assert len(runs) == 2 and runs[0] != runs[1]
        ppl = [r["perplexity"] for r in runs]
        assert kind["perplexity"] == pytest.approx(sum(ppl) / 2)
        assert kind["perplexity_std"] == pytest.approx(abs(ppl[0] - ppl[1]) / 2**0.5)
        code = [r["domains"]["code"]["perplexity"] for r in runs]
        assert kind["domains"]["code"]["perplexity"] == pytest.approx(sum(code) / 2)

    demo = tmp_path / "demo"
    store = open_store(demo / "stores" / "train")
    store.require_complete(["code", "prose"])
    # Every real train position of both domains is one store row, its label the next token.
    assert store.num_rows == result["config"]["corpus"]["train_tokens"]
    # Each expert trained on its own domain only; every student on the mixture, the single-teacher
    # ones from their teacher alone, the fused ones under their fusion.
    config_of = lambda run: json.loads((demo / "runs" / run / "config.json").read_text())  # noqa: E731
    assert config_of("teacher-code")["paths"]["data"].endswith("train-code.npz")
    assert config_of("teacher-prose")["paths"]["data"].endswith("train-prose.npz")
    assert teachers_of(config_of("single-prose-seed1")) == ["prose"]
    fused = config_of("fused-best-sequence")
    assert sorted(teachers_of(fused)) == ["code", "prose"] and fused["paths"]["data"].endswith("/train.npz")
    assert (fused["fusion"], fused["fusion_scope"]) == ("best", "sequence")
    assert fused["fusion_fallback"] == {"entropy": 0, "prior": 0}  # every window has labelled positions
    assert config_of("fused-mean")["fusion"] == "mean"
    on_disk = sum(p.stat().st_size for p in (demo / "stores" / "train").rglob("*") if p.is_file())
    assert result["bytes_per_token"] == pytest.approx(on_disk / store.num_rows)
    for run in ("baseline", "fused-mean", "single-code-seed1"):
        assert len((demo / "runs" / run / "metrics.jsonl").read_text().splitlines()) == config.student.epochs
    assert (demo / "perplexity.png").stat().st_size > 0
    assert json.loads((demo / "demo.json").read_text())["distilled_student"] == result["distilled_student"]


def teachers_of(run_config: dict) -> list[str]:
    return [t["name"] if isinstance(t, dict) else t for t in run_config["teachers"]]


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


def test_a_teacher_of_an_unknown_domain_and_repeated_fusions_are_refused():
    config = tiny_config()
    with pytest.raises(BadInputError, match="'poetry'"):
        dataclasses.replace(config, teachers=(dataclasses.replace(config.teachers[0], data="poetry"),))
    with pytest.raises(BadInputError, match="'prose'"):  # a code-only corpus has no prose expert
        dataclasses.replace(config, corpus=CorpusConfig(max_bytes=40_000, vocab_size=300, window=32))
    with pytest.raises(BadInputError, match="distinct fusions"):
        dataclasses.replace(config, fusions=(Fusing("mean"), Fusing("mean")))
