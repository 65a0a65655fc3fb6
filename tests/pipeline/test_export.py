"""`mtkd export` of a built-in student (TOML + state_dict) and its refusals; the Hugging Face form,
save_pretrained with the tokenizer, runs in tests/test_guide.py as README shows it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.conftest import refused

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(kd_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    result = invoke("train", "--student", kd_world.student, "--data", kd_world.data["labelled"], "--out", out,
                    "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_a_built_in_student_exports_as_toml_and_state_dict(kd_world, run, tmp_path):
    result = invoke("export", run, "--out", tmp_path / "mlp", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["form"] == "torch" and out["files"] == ["student.pt", "student.toml"] and out["tokenizer"] is None
    state, exported = torch.load(run / "student.pt", weights_only=True), torch.load(tmp_path / "mlp/student.pt", weights_only=True)
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in state)
    a, b = (invoke(*args, "--data", kd_world.data["val"], "--json") for args in
            (["eval", run], ["eval", "--model", tmp_path / "mlp/student.toml", "--checkpoint", tmp_path / "mlp/student.pt"]))
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ma, mb = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (a, b))
    assert ma["accuracy"] == mb["accuracy"] and ma["nll"] == mb["nll"]
    human = invoke("export", run, "--out", tmp_path / "again")
    assert human.exit_code == 0 and "TOML and state_dict" in human.stdout


def test_refusals_write_nothing(run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused(invoke("export", run, "--out", tmp_path / "full"), "not empty")
    refused(invoke("export", tmp_path / "nope", "--out", tmp_path / "o"), "not a finished mtkd train run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
