"""The human-readable output of every command, on rows and on token data, through the real CLI.

Each command's `--json` has its own tests; these hold the renderers (what a person or a `set -e`
job sees without --json) to exit 0 and to the facts they must name. A renderer that reads a key
one kind of data does not have (token runs are validated by perplexity, not accuracy) fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.conftest import _toml_inline
from tests.pipeline.token_world import token_world  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("rows", "tokens")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


class World:
    """Per kind: teachers TOML, data, a store of it, a student TOML and a validation set."""

    def __init__(self, kind: str, kd_world, token_world, root):
        if kind == "tokens":
            w = token_world
            self.teachers, self.data, self.val, self.student = w.teachers, w.data["val"], w.data["val"], w.student
            self.infer_extra = ("--top-k", "8")
        else:
            w = kd_world
            self.data, self.val, self.student = w.data["labelled"], w.data["val"], w.student
            # Row teachers from the student's own factory: the store made by the CLI below.
            import torch

            from mtkd.pipeline.specs import load_student_spec

            spec = load_student_spec(w.student)
            lines = []
            for seed, name in enumerate(("a", "b")):
                torch.manual_seed(seed)
                torch.save(spec.build().state_dict(), root / f"{name}.pt")
                lines += ["[[teachers]]", f'name = "{name}"', f'factory = "{spec.factory}"',
                          f"kwargs = {_toml_inline(spec.kwargs)}", f'checkpoint = "{name}.pt"', ""]
            self.teachers = root / "teachers.toml"
            self.teachers.write_text("\n".join(lines))
            self.infer_extra = ()
        self.store = root / "store.zarr"


@pytest.fixture(scope="module", params=KINDS)
def world(request, kd_world, token_world, tmp_path_factory):  # noqa: F811
    w = World(request.param, kd_world, token_world, tmp_path_factory.mktemp(f"human_{request.param}"))
    w.kind = request.param
    w.infer_out = invoke("infer", "--teachers", w.teachers, "--data", w.data, "--out", w.store, "--device", "cpu",
                         "--quiet", *w.infer_extra)
    return w


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run_{world.kind}") / "run"
    text = invoke("train", "--student", world.student, "--data", world.data, "--store", world.store, "--out", out,
                  "--epochs", "2", "--batch-size", "16", "--val-data", world.val, "--temperature", "1", "--quiet")
    return out, text


def test_infer_names_each_teacher_and_the_unit(world):
    unit = "tokens" if world.kind == "tokens" else "rows"
    assert "computed" in world.infer_out and f" {unit}, " in world.infer_out
    assert ("top-8 of 40, T=1,2" if world.kind == "tokens" else "dense 5, float16") in world.infer_out


def test_train_with_val_data_reports_the_best_epoch_by_its_metric(run):
    _, text = run
    assert "student.pt" in text and "best epoch" in text
    headline = "val perplexity" if "tokens" in str(run[0]) else "val accuracy"
    assert headline in text.splitlines()[-1]  # "(best epoch 2, val perplexity 31.2)"


def test_eval_lists_every_metric(world, run):
    text = invoke("eval", run[0], "--data", world.val)
    names = ("perplexity", "accuracy", "nll") if world.kind == "tokens" else ("accuracy", "f1_macro", "nll", "ece")
    assert all(name in text for name in names), text
    assert ("positions" if world.kind == "tokens" else "labelled rows") in text


def test_inspect_shows_teachers_and_the_ensemble(world):
    text = invoke("inspect", world.store, "--quiet")
    assert "ensemble (2)" in text or "ensemble (3)" in text
    assert ("ppl" in text and "tail mass" in text) if world.kind == "tokens" else "ECE" in text
    numbers = [line for line in text.splitlines() if line.startswith("│ a ") or line.startswith("│ g1 ")]
    assert numbers and "…" not in numbers[0]  # the table is not cut (CliRunner's stdout is no terminal)


def test_verify_says_clean(world):
    text = invoke("verify", world.store, "--quiet")
    assert "clean" in text and "blocks recorded (complete)" in text
    assert np.all([line.startswith(("teacher ", str(world.store))) for line in text.strip().splitlines()])
