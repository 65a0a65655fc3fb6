"""`mtkd train`'s defaults by data kind (tokens: T 1, alpha 0.8; rows: T 2, alpha 1), written resolved
to config.json, and runs made before (with T 2, alpha 1 recorded for tokens) resuming unchanged."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.token_world import token_world  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_defaults_by_kind_are_recorded(kd_world, token_world, tmp_path):  # noqa: F811
    tokens = invoke("train", "--student", token_world.student, "--data", token_world.data["train"], "--store",
                    token_world.store, "--out", tmp_path / "lm", "--max-steps", 1, "--batch-size", 8, "--quiet")
    rows = invoke("train", "--student", kd_world.student, "--data", kd_world.data["labelled"], "--store",
                  kd_world.store["labelled"], "--out", tmp_path / "mlp", "--max-steps", 1, "--quiet")
    assert tokens.exit_code == 0 and rows.exit_code == 0, tokens.output + rows.output
    lm, mlp = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("lm", "mlp"))
    assert (lm["temperature"], lm["alpha"]) == (1.0, 0.8) and "--temperature 1.0 --alpha 0.8" in lm["command"]
    assert (mlp["temperature"], mlp["alpha"]) == (2.0, 1.0)


def test_a_run_made_with_the_old_defaults_resumes_with_them(token_world, tmp_path):  # noqa: F811
    out = tmp_path / "old"
    args = ("train", "--student", token_world.student, "--data", token_world.data["train"], "--store", token_world.store,
            "--out", out, "--epochs", 1, "--batch-size", 8, "--quiet")
    # A run made before the defaults were by kind: T 2, alpha 1 recorded (then the defaults).
    assert invoke(*args, "--temperature", 2, "--alpha", 1).exit_code == 0
    again = invoke(*args, "--resume", "--json")  # no -T, no --alpha: the recorded ones, not tokens' new ones
    assert again.exit_code == 0, again.output  # (a changed temperature is refused: exit 2)
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_from"] == {"epoch": 1, "batch": 0}
    changed = invoke(*args, "--resume", "--temperature", 1)
    assert changed.exit_code == 2 and "temperature" in changed.stderr
