"""`mtkd eval` through the CLI: a run directory, --model with --checkpoint, --json keys, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mtkd.pipeline.cli import app

runner = CliRunner()
METRICS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "nll", "ece"}


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(kd_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_eval") / "run"
    result = invoke("train", "--student", kd_world.student, "--data", kd_world.data["labelled"], "--out", out,
                    "--epochs", "3", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_run_directory_and_model_checkpoint_give_the_same_json(kd_world, run_dir):
    by_run = invoke("eval", run_dir, "--data", kd_world.data["val"], "--json")
    by_model = invoke("eval", "--model", kd_world.student, "--checkpoint", run_dir / "student.pt",
                      "--data", kd_world.data["val"], "--json")
    assert by_run.exit_code == 0 and by_model.exit_code == 0, by_run.output + by_model.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (by_run, by_model))
    assert METRICS <= set(a) and {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    assert 0 <= a["accuracy"] <= 1 and a["n"] == kd_world.rows


def test_human_output_lists_every_metric(kd_world, run_dir):
    result = invoke("eval", run_dir, "--data", kd_world.data["val"], "--quiet")
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in METRICS)


def test_help_shows_an_example():
    result = invoke("eval", "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "mtkd eval" in result.stdout


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--data", "{unlabelled}", "{run}"], "no labels"),
        (["--data", "{val}"], "--model"),
        (["--data", "{val}", "--model", "{student}"], "--checkpoint"),
        (["--data", "{val}", "{run}", "--model", "{student}", "--checkpoint", "{run}/student.pt"], "either"),
        (["--data", "nowhere.npz", "{run}"], "nowhere.npz"),
    ],
)
def test_refusals_exit_2_naming_the_culprit(kd_world, run_dir, args, culprit):
    names = {"unlabelled": kd_world.data["unlabelled"], "val": kd_world.data["val"], "run": run_dir,
             "student": kd_world.student}
    result = invoke("eval", *[a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert culprit in result.stderr and "\n" not in result.stderr.strip(), result.stderr


def test_tokens_report_perplexity(token_world):
    result = invoke("eval", "--model", token_world.teachers, "--teacher", "g1", "--data", token_world.data["val"], "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["kind"] == "tokens" and out["perplexity"] > 1 and 0 <= out["accuracy"] <= 1
    human = invoke("eval", "--model", token_world.teachers, "--teacher", "g1", "--data", token_world.data["val"])
    assert "perplexity" in human.stdout and "positions" in human.stdout


from tests.pipeline.token_world import token_world  # noqa: E402, F401
