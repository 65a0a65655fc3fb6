"""`mtkd train` through the CLI: output, help, and every refusal (exit 2, culprit named, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.conftest import refused, snapshot, write_store

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(kd_world, out, *extra, data="labelled", store="labelled"):
    return ["train", "--student", kd_world.student, "--data", kd_world.data[data], "--store", kd_world.store[store],
            "--out", out, "--epochs", "2", "--batch-size", "64", "--quiet", *extra]


def test_json_is_the_last_stdout_line(kd_world, tmp_path):
    result = invoke(*train_args(kd_world, tmp_path / "run", "--json", "--fusion", "weighted", "--teacher-weights", "a=2,b=1,c=1"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["epochs"] == 2 and out["steps"] == 2 * 6 and out["mode"] == "distil" and out["student_pt"] == "final"
    assert out["last"]["epoch"] == 2 and out["last"]["rows_per_s"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["teacher_weights"] == {"a": 2.0, "b": 1.0, "c": 1.0} and config["fusion"] == "weighted"


def test_human_output_names_the_student_file(kd_world, tmp_path):
    result = invoke(*train_args(kd_world, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "student.pt" in result.stdout and "distil" in result.stdout


def test_help_shows_an_example():
    result = invoke("train", "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "mtkd train --student" in result.stdout


# -- refusals: exit 2, the culprit named, nothing written ----------------------------------------


def test_refuses_an_incomplete_store(kd_world, tmp_path):
    x, y = kd_world.x["labelled"], kd_world.y["labelled"]
    store = write_store(tmp_path / "part.zarr", x, y, {"a": kd_world.logits["labelled"]["a"]}, chunk_rows=50, skip_blocks=(3,))
    result = invoke("train", "--student", kd_world.student, "--data", kd_world.data["labelled"], "--store", store,
                    "--out", tmp_path / "run")
    refused(result, "'a'", "part.zarr", "missing")
    assert not (tmp_path / "run").exists()


def test_refuses_a_store_of_other_data(kd_world, tmp_path):
    refused(invoke(*train_args(kd_world, tmp_path / "run", data="val")), "labelled.zarr", "val.npz", "fingerprint")
    assert not (tmp_path / "run").exists()


def test_refuses_a_store_with_another_row_count(kd_world, tmp_path):
    fewer = tmp_path / "fewer.npz"
    np.savez(fewer, x=kd_world.x["labelled"][:100], y=kd_world.y["labelled"][:100])
    result = invoke("train", "--student", kd_world.student, "--data", fewer, "--store", kd_world.store["labelled"],
                    "--out", tmp_path / "run")
    refused(result, "384 rows", "100 rows")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        (["--teachers", "a,zz"], ["'zz'", "--teachers"]),
        (["--temperature", "0"], ["--temperature"]),
        (["--temperature", "-1.5"], ["--temperature"]),
        (["--alpha", "1.5"], ["--alpha"]),
        (["--alpha", "-0.1"], ["--alpha"]),
        (["--fusion", "weighted", "--teacher-weights", "a=-1,b=1,c=1"], ["'a'", "--teacher-weights"]),
        (["--fusion", "weighted", "--teacher-weights", "a=1,b=1,c=1,zz=2"], ["'zz'", "--teacher-weights"]),
        (["--fusion", "weighted", "--teacher-weights", "a=1,b=1"], ["c", "--teacher-weights"]),
        (["--fusion", "weighted", "--teacher-weights", "a:1"], ["--teacher-weights", "a:1"]),
        (["--teacher-weights", "a=1,b=1,c=1"], ["--fusion weighted"]),
        (["--fusion", "weighted"], ["--teacher-weights"]),
    ],
)
def test_refuses_bad_options(kd_world, tmp_path, extra, culprits):
    refused(invoke(*train_args(kd_world, tmp_path / "run", *extra)), *culprits)
    assert not (tmp_path / "run").exists()


def test_refuses_a_student_whose_width_differs_from_the_store(kd_world, tmp_path):
    student = tmp_path / "wide.toml"
    student.write_text('[student]\nname = "wide"\nfactory = "mtkd.pipeline.models:mlp"\n'
                       "kwargs = { in_features = 8, hidden = [4], num_classes = 7 }\n")
    result = invoke("train", "--student", student, "--data", kd_world.data["labelled"], "--store", kd_world.store["labelled"],
                    "--out", tmp_path / "run")
    refused(result, "'wide'", "7 classes", "5")
    assert not (tmp_path / "run").exists()


def test_refuses_a_student_that_does_not_fit_the_inputs(kd_world, tmp_path):
    student = tmp_path / "narrow.toml"
    student.write_text('[student]\nname = "narrow"\nfactory = "mtkd.pipeline.models:mlp"\n'
                       "kwargs = { in_features = 3, hidden = [4], num_classes = 5 }\n")
    result = invoke("train", "--student", student, "--data", kd_world.data["labelled"], "--out", tmp_path / "run")
    refused(result, "'narrow'", "(8,)")
    assert not (tmp_path / "run").exists()


def test_refuses_hard_label_training_on_unlabelled_data(kd_world, tmp_path):
    result = invoke("train", "--student", kd_world.student, "--data", kd_world.data["unlabelled"], "--out", tmp_path / "run")
    refused(result, "unlabelled.npz", "no labels")
    assert not (tmp_path / "run").exists()


def test_refuses_resume_with_another_configuration(kd_world, tmp_path):
    out = tmp_path / "run"
    assert invoke(*train_args(kd_world, out)).exit_code == 0
    before = snapshot(out)
    refused(invoke(*train_args(kd_world, out, "--resume", "--temperature", "3")), "--resume", "temperature")
    refused(invoke(*train_args(kd_world, out, "--resume", "--teachers", "a,b")), "--resume", "teachers")
    assert snapshot(out) == before


def test_refuses_to_overwrite_a_run_without_resume(kd_world, tmp_path):
    out = tmp_path / "run"
    assert invoke(*train_args(kd_world, out)).exit_code == 0
    before = snapshot(out)
    refused(invoke(*train_args(kd_world, out)), str(out), "--resume")
    assert snapshot(out) == before


def test_resume_continues_a_finished_run_as_a_no_op(kd_world, tmp_path):
    out = tmp_path / "run"
    assert invoke(*train_args(kd_world, out)).exit_code == 0
    before = snapshot(out)
    result = invoke(*train_args(kd_world, out, "--resume", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["resumed_from"] == {"epoch": 2, "batch": 0}
    assert snapshot(out) == before


# -- tokens ---------------------------------------------------------------------------------------

from tests.pipeline.token_world import token_world  # noqa: E402, F401


def lm_args(world, out, *extra):
    return ["train", "--student", world.student, "--data", world.data["train"], "--store", world.store, "--out", out,
            "--epochs", "1", "--batch-size", "8", "--quiet", *extra]


def test_a_token_run_reports_tokens_per_second(token_world, tmp_path):
    result = invoke(*lm_args(token_world, tmp_path / "run", "--temperature", "2", "--json"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["last"]["tokens_per_s"] > 0 and out["mode"] == "distil"


@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        (["--temperature", "3"], ["--temperature 3", "1, 2", "'g1'"]),  # not stored: the stored ones listed
        (["--loss", "mse", "--temperature", "1"], ["--loss mse", "top-k"]),
    ],
)
def test_token_refusals(token_world, tmp_path, extra, culprits):
    refused(invoke(*lm_args(token_world, tmp_path / "run", *extra)), *culprits)
    assert not (tmp_path / "run").exists()
