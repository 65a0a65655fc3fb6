"""The rows demo end to end, shrunk (a small transfer set, a few epochs, two seeds): every stage runs
for real through the library functions behind the commands, and what it reports is learnt, not chance."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.data import load_data
from mtkd.pipeline.demos.rows import RowsDemoConfig, run_rows_demo
from mtkd.pipeline.store import open_store

CHANCE = 0.1  # MNIST-1D has 10 balanced classes


def tiny_config() -> RowsDemoConfig:
    # Each teacher sees its own part (about a third) of the labelled rows: 6 epochs are the steps 2 epochs on all were.
    teachers = tuple(dataclasses.replace(t, epochs=6) for t in RowsDemoConfig().teachers)
    return RowsDemoConfig(transfer_size=1000, teachers=teachers, distil_epochs=3, baseline_epochs=3, seeds=(0, 1),
                          device="cpu")


def teachers_of(run) -> list[str]:
    """The names of the teachers a run distilled from, as its config.json records them."""
    return [t["name"] if isinstance(t, dict) else t for t in json.loads((run / "config.json").read_text())["teachers"]]


@pytest.mark.slow
def test_demo_runs_every_stage_and_its_students_learn(tmp_path, one_thread):
    result = run_rows_demo(tmp_path / "demo", tiny_config(), log=lambda message: None)

    assert set(result["teachers"]) == set(result["single_teacher_students"]) == {"cnn", "gru", "cnn_wide"}
    # Real floors. Each teacher knows mostly its own classes: at 6 epochs the best reaches ~0.4 alone and
    # the three together ~0.7, so the ensemble is far above every teacher. The student from all three
    # (~0.40 on both seeds at 3 epochs) beats the best single-teacher student (~0.33): a fusion that
    # let the wrong teacher teach, or a student that learnt nothing from its store, fails here.
    assert result["ensemble"] >= 0.6 and result["ensemble"] >= max(result["teachers"].values()) + 0.15, result
    assert result["baseline_student"] >= 2.5 * CHANCE and result["distilled_student"] >= 3 * CHANCE, result
    assert min(result["per_seed"]["distilled_student"]) > max(
        max(seeds) for seeds in result["per_seed"]["single_teacher_students"].values()), result
    # Means and spreads over the two seeds, from the per-seed accuracies.
    for seeds, mean, std in [(result["per_seed"]["distilled_student"], result["distilled_student"],
                              result["std"]["distilled_student"]),
                             (result["per_seed"]["single_teacher_students"]["cnn"],
                              result["single_teacher_students"]["cnn"], result["std"]["single_teacher_students"]["cnn"])]:
        assert len(seeds) == 2 and mean == pytest.approx(sum(seeds) / 2)
        assert std == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5)
    assert set(result["wall_s"]) == {"data", "teachers", "infer", "distil", "single_teacher", "baseline", "eval", "total"}
    # The transfer store holds the 4000 labelled rows then the unlabelled ones, every teacher complete.
    store = open_store(tmp_path / "demo" / "stores" / "transfer")
    assert store.num_rows == 4000 + 1000
    assert (store.labels()[4000:] == -100).all() and (store.labels()[:4000] >= 0).all()
    store.require_complete(["cnn", "gru", "cnn_wide"])
    # Complementary teachers: each trained on its own part of the 4000 labelled rows, disjoint, and
    # holding ~90% of the rows of its own classes (class c belongs to teacher c mod 3).
    parts = {}
    for name in ("cnn", "gru", "cnn_wide"):
        run = json.loads((tmp_path / "demo" / "runs" / f"teacher-{name}" / "config.json").read_text())
        assert run["paths"]["data"].endswith(f"part-{name}.npz")
        parts[name] = np.load(tmp_path / "demo" / "data" / f"part-{name}.npz")
    rows = np.concatenate([p["x"] for p in parts.values()])
    labelled = load_data("mnist1d:train")
    assert len(rows) == 4000
    for owner, part in enumerate(parts.values()):
        counts = np.bincount(part["y"], minlength=10)
        owned = np.arange(10) % 3 == owner
        assert 0.87 <= counts[owned].sum() / np.isin(labelled.labels, np.flatnonzero(owned)).sum() <= 0.93, counts
        assert (counts > 0).all()  # and a few rows of every other class
    assert len(np.unique(rows, axis=0)) == 4000  # no row in two parts
    assert sorted(map(bytes, rows)) == sorted(map(bytes, labelled.x))  # and together every labelled row
    # A single-teacher student saw one teacher only; the distilled one all three.
    assert teachers_of(tmp_path / "demo" / "runs" / "single-gru-s1") == ["gru"]
    assert sorted(teachers_of(tmp_path / "demo" / "runs" / "distilled-s0")) == ["cnn", "cnn_wide", "gru"]
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["distilled_student"] == result["distilled_student"]


def test_demo_help_shows_an_example():
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "mtkd demo rows" in result.output and "lm:" in result.output


def test_the_lm_demo_is_wired_to_its_refusals(tmp_path):
    """`mtkd demo lm` runs the language-model demo (its run: tests/pipeline/demos/test_lm.py); bad
    input stops it before any work, exit 2."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "lm", "--out", str(tmp_path / "old"), "--json"])
    assert result.exit_code == 2
    assert "not an empty folder" in json.loads(result.stdout.strip().splitlines()[-1])["error"]["message"]
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(app, ["demo", "lm", "--transfer-size", "5", "--out", str(tmp_path / "lm")])
    assert result.exit_code == 2 and "--transfer-size" in result.output
    assert not (tmp_path / "lm").exists()


def test_demo_refuses_a_folder_that_already_holds_something(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs").mkdir()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "old"), "--json"])
    assert result.exit_code == 2
    assert "not an empty folder" in result.output
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["runs"]


def test_demo_refuses_an_out_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    result = CliRunner().invoke(app, ["demo", "rows", "--out", str(target), "--json"])
    assert result.exit_code == 2
    assert str(target) in result.output
    assert target.read_text() == "not a folder"


def test_transfer_size_belongs_to_the_rows_demo(tmp_path):
    result = CliRunner().invoke(app, ["demo", "lm", "--transfer-size", "10", "--out", str(tmp_path / "lm")])
    assert result.exit_code == 2 and "--transfer-size" in result.stderr
    assert not (tmp_path / "lm").exists()
