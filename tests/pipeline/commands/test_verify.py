"""`mtkd verify` through the real CLI: exit 0 clean, exit 2 with one line naming the damage, --repair,
--json as the last stdout line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.conftest import refused

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def store(tmp_path, make_data, make_teachers):
    data, toml = make_data(40), make_teachers([{"name": "a"}])
    args = ("--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--chunk-rows", 8, "--quiet")
    assert invoke("infer", *args).exit_code == 0
    return tmp_path / "s.zarr", args


def test_a_clean_store_exits_0_and_the_json_says_so(store):
    path, _ = store
    result = invoke("verify", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["clean"] and report["findings"] == [] and report["teachers"][0]["blocks_recorded"] == 5
    human = invoke("verify", path)
    assert human.exit_code == 0 and "clean" in human.stdout


def test_damage_exits_2_then_repair_then_infer_makes_it_clean(store):
    path, infer_args = store
    (path / "teachers" / "a" / "logits" / "c" / "3" / "0").unlink()
    result = invoke("verify", path, "--json")
    message = refused(result, path, "'a'", "--repair")
    assert "1 problems" in message
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["clean"] and [(f["kind"], f["block"]) for f in report["findings"]] == [("record-without-chunk", 3)]
    assert "block 3" in invoke("verify", path).stdout

    repaired = invoke("verify", path, "--repair")
    refused(repaired, "repaired", "mtkd infer")
    assert invoke("verify", path).exit_code == 0
    assert invoke("infer", *infer_args).exit_code == 0
    assert invoke("verify", path).exit_code == 0


def test_what_is_not_a_store_is_refused(tmp_path):
    refused(invoke("verify", tmp_path / "nowhere"), "nowhere")
    (tmp_path / "folder").mkdir()
    refused(invoke("verify", tmp_path / "folder"), "not an mtkd store")


def test_help_shows_an_example():
    result = invoke("verify", "--help")
    assert result.exit_code == 0 and "mtkd verify train.zarr --repair" in result.stdout
