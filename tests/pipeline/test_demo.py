"""The demo end to end, shrunk (tiny transfer set, one epoch per model): every stage runs for real
through the library functions behind the commands, and the result has the documented shape."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.demo import DemoConfig, run_demo
from mtkd.pipeline.store import open_store


def tiny_config() -> DemoConfig:
    teachers = tuple(dataclasses.replace(t, epochs=1) for t in DemoConfig().teachers)
    return DemoConfig(transfer_size=300, teachers=teachers, distil_epochs=1, baseline_epochs=1, device="cpu")


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_accuracies(tmp_path):
    result = run_demo(tmp_path / "demo", tiny_config(), log=lambda message: None)

    assert set(result["teachers"]) == {"cnn", "gru", "cnn_wide"}
    accuracies = [*result["teachers"].values(), result["ensemble"], result["baseline_student"], result["distilled_student"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert set(result["wall_s"]) == {"data", "teachers", "infer", "distil", "baseline", "eval", "total"}
    # The transfer store holds the 4000 labelled rows then the unlabelled ones, every teacher complete.
    store = open_store(tmp_path / "demo" / "stores" / "transfer")
    assert store.num_rows == 4000 + 300
    assert (store.labels()[4000:] == -100).all() and (store.labels()[:4000] >= 0).all()
    store.require_complete(["cnn", "gru", "cnn_wide"])
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["distilled_student"] == result["distilled_student"]


def test_demo_help_shows_an_example():
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "mtkd demo" in result.output


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
    result = CliRunner().invoke(app, ["demo", "--out", str(target), "--json"])
    assert result.exit_code == 2
    assert str(target) in result.output
    assert target.read_text() == "not a folder"
