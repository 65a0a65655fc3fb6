"""`mtkd inspect` through the real CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.infer import run_infer

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
    for text in ("a", "b", "ensemble (2 teachers)", "40/40", "float16", "agreement"):
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
