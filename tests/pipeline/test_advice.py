"""The warnings of `mtkd train` (at setup) and `mtkd inspect`: they fire on weak teachers, on a mean
that dilutes its best teacher and on tails beyond the stored top-k, and stay silent on good ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.advice import TAIL_MASS_LIMIT, training_warnings, unigram, warnings_of
from mtkd.pipeline.cli import app
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import write_store
from tests.pipeline.token_world import token_world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def test_each_rule_alone():
    quiet = warnings_of(teachers={"a": {"nll": 1.0, "tail_mass": {"1": 0.1}}, "b": {"nll": 1.1, "tail_mass": {"1": 0.2}}},
                        ensemble_nll=1.05, unigram=(3.0, 0.2), temperature=1.0, kind="tokens")
    assert quiet == []
    tails = warnings_of(teachers={"a": {"nll": 1.0, "tail_mass": {"1": 0.1, "2": 0.45}}}, ensemble_nll=None,
                        unigram=(3.0, 0.2), temperature=2.0, kind="tokens")
    assert len(tails) == 1 and "'a' leaves 0.45" in tails[0] and "T = 2" in tails[0] and "--top-k" in tails[0]
    weak = warnings_of(teachers={"a": {"nll": 3.2, "accuracy": 0.15, "tail_mass": None}}, ensemble_nll=None,
                       unigram=(3.0, 0.2), temperature=1.0, kind="tokens")
    assert len(weak) == 1 and "no better than a unigram" in weak[0] and f"{math.exp(3.2):.4g}" in weak[0]
    # over-confident but accurate: still worth distilling from
    assert warnings_of(teachers={"a": {"nll": 3.2, "accuracy": 0.6}}, ensemble_nll=None, unigram=(3.0, 0.2),
                       temperature=1.0, kind="tokens") == []
    diluted = warnings_of(teachers={"a": {"nll": 1.0}, "b": {"nll": 2.0}}, ensemble_nll=1.3, unigram=(3.0, 0.2),
                          temperature=1.0, kind="tokens")
    assert len(diluted) == 1 and "worse than 'a' alone" in diluted[0] and "--teachers a" in diluted[0]


def test_the_unigram_model_is_the_label_frequencies():
    y = np.array([0, 0, 1, 3, -100, 3, 3, 3])
    p = np.array([2, 1, 4]) / 7
    assert unigram(y) == pytest.approx((float(-(p * np.log(p)).sum()), 4 / 7))


def test_silent_on_good_teachers_and_firing_on_a_diluting_weak_one(kd_world, tmp_path):
    good = open_store(kd_world.store["labelled"])
    assert training_warnings(good, good.teachers, 2.0) == []
    x, y = kd_world.x["labelled"], kd_world.y["labelled"]
    rng = np.random.default_rng(0)
    noise = (8 * rng.standard_normal(kd_world.logits["labelled"]["a"].shape)).astype(np.float32)
    good_logits = kd_world.logits["labelled"]["a"] * 0.25  # calibrated: NLL 1.24 against the unigram's 1.59
    path = write_store(tmp_path / "mixed.zarr", x, y, {"good": good_logits, "noise": noise}, chunk_rows=50)
    found = training_warnings(open_store(path), ["good", "noise"], 2.0)
    assert any("'noise' is no better than a unigram" in w for w in found)
    assert any("worse than 'good' alone" in w for w in found)
    assert training_warnings(open_store(path), ["good"], 2.0) == []
    # inspect says the same, and --teachers shows the ensemble of the subset (one teacher: no dilution)
    report = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout.strip().splitlines()[-1])
    assert any("unigram" in w for w in report["warnings"]) and any("dilute" in w for w in report["warnings"])
    table = runner.invoke(app, ["inspect", str(path)]).stdout
    assert "warning" in table and "dilute" in table
    subset = runner.invoke(app, ["inspect", str(path), "--teachers", "good", "--json"])
    sub = json.loads(subset.stdout.strip().splitlines()[-1])
    assert sub["ensemble"]["teachers"] == ["good"] and not any("dilute" in w for w in sub["warnings"])
    assert runner.invoke(app, ["inspect", str(path), "--teachers", "nope"]).exit_code == 2


def test_tail_mass_at_the_training_temperature(token_world, tmp_path):  # noqa: F811
    store = open_store(token_world.store)
    for temperature in (1.0, 2.0):
        tails = {n: store.teacher(n).stats["tail_mass"][f"{temperature:g}"] for n in store.teachers}
        found = [w for w in training_warnings(store, store.teachers, temperature) if "outside its stored top-k" in w]
        assert len(found) == sum(t > TAIL_MASS_LIMIT for t in tails.values())
    run = runner.invoke(app, [str(a) for a in ("train", "--student", token_world.student, "--data", token_world.data["train"],
                                                "--store", token_world.store, "--out", tmp_path / "run", "--max-steps", 1,
                                                "--epochs", 3, "--batch-size", 8, "--temperature", 2, "--json")])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["warnings"] == training_warnings(store, store.teachers, 2.0) and out["steps"] == 1  # --max-steps wins
    assert all(f"warning: {w}" in run.stderr for w in out["warnings"])
