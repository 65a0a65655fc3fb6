"""run_eval: a run directory or a model spec with a checkpoint, measured against labelled data."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mtkd.pipeline.errors import BadInputError, CheckpointError
from mtkd.pipeline.evaluate import run_eval
from mtkd.pipeline.metrics import classification_metrics
from mtkd.pipeline.specs import load_student_spec, load_teacher_specs
from mtkd.pipeline.config import TrainConfig
from mtkd.pipeline.train import run_train

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "nll", "ece")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(kd_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    run_train(TrainConfig(kd_world.student, str(kd_world.data["labelled"]), out, store=kd_world.store["labelled"],
                          epochs=10, batch_size=32, lr=1e-2))
    return out


def test_a_run_and_its_model_with_checkpoint_measure_the_same(kd_world, trained):
    by_run = run_eval(str(kd_world.data["val"]), run=trained)
    by_model = run_eval(str(kd_world.data["val"]), model=kd_world.student, checkpoint=trained / "student.pt")
    assert {k: by_run[k] for k in METRICS} == {k: by_model[k] for k in METRICS}
    model = load_student_spec(kd_world.student).build()
    model.load_state_dict(torch.load(trained / "student.pt", weights_only=True))
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.from_numpy(kd_world.x["val"])).double(), -1)
    expected = classification_metrics(log_probs, torch.from_numpy(kd_world.y["val"]))
    for k in METRICS:
        assert by_run[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12)
    assert by_run["n"] == kd_world.rows and 0.6 < by_run["accuracy"] <= 1.0


def test_rows_without_labels_are_left_out(kd_world, trained, tmp_path):
    y = kd_world.y["val"].copy()
    y[::2] = -100
    np.savez(tmp_path / "half.npz", x=kd_world.x["val"], y=y)
    assert run_eval(str(tmp_path / "half.npz"), run=trained)["n"] == kd_world.rows // 2


def test_refusals(kd_world, trained, tmp_path):
    with pytest.raises(BadInputError, match="no labels"):
        run_eval(str(kd_world.data["unlabelled"]), run=trained)
    with pytest.raises(BadInputError, match="either"):
        run_eval(str(kd_world.data["val"]), run=trained, model=kd_world.student)
    with pytest.raises(BadInputError, match="--checkpoint"):
        run_eval(str(kd_world.data["val"]), model=kd_world.student)
    with pytest.raises(BadInputError, match="config.json"):
        run_eval(str(kd_world.data["val"]), run=tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt"):
        run_eval(str(kd_world.data["val"]), model=kd_world.student, checkpoint=tmp_path / "missing.pt")


# -- tokens ---------------------------------------------------------------------------------------

from mtkd.pipeline.data import load_data  # noqa: E402

from .token_world import token_world  # noqa: E402, F401


def manual_token_metrics(model, data):
    """Perplexity, accuracy and NLL computed here, one sequence at a time, without padding."""
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for s in range(data.num_seqs):
            seq = torch.from_numpy(data.tokens[data.offsets[s] : data.offsets[s + 1]].astype(np.int64))
            log_probs = torch.log_softmax(model(seq[None])[0, :-1].double(), -1)
            nll -= float(log_probs.gather(1, seq[1:, None]).sum())
            correct += int((log_probs.argmax(-1) == seq[1:]).sum())
            n += len(seq) - 1
    return {"n": n, "perplexity": np.exp(nll / n), "accuracy": correct / n, "nll": nll / n}


def test_a_token_run_is_measured_by_perplexity_accuracy_and_nll(token_world, tmp_path):
    run = tmp_path / "run"
    run_train(TrainConfig(token_world.student, str(token_world.data["train"]), run, store=token_world.store, epochs=2,
                          batch_size=8, temperature=1.0))
    measured = run_eval(str(token_world.data["val"]), run=run, batch_size=5)
    model = load_student_spec(token_world.student).build()
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    expected = manual_token_metrics(model, load_data(str(token_world.data["val"])))
    assert measured["kind"] == "tokens" and measured["n"] == expected["n"]
    for k in ("perplexity", "accuracy", "nll"):
        assert measured[k] == pytest.approx(expected[k], rel=1e-6)


def test_a_teacher_table_works_as_the_model(token_world):
    measured = run_eval(str(token_world.data["val"]), model=token_world.teachers, teacher="g2")
    spec = next(s for s in load_teacher_specs(token_world.teachers) if s.name == "g2")
    expected = manual_token_metrics(spec.build(), load_data(str(token_world.data["val"])))
    assert measured["model"] == "g2" and measured["checkpoint"] is None
    assert measured["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    with pytest.raises(BadInputError, match="g1, g2, g3"):
        run_eval(str(token_world.data["val"]), model=token_world.teachers)
    with pytest.raises(BadInputError, match="'zz'"):
        run_eval(str(token_world.data["val"]), model=token_world.teachers, teacher="zz")


def test_a_run_whose_factory_sits_beside_its_toml_evaluates_as_it_trained(token_world, tmp_path):
    """`mtkd train` imports MODULE from the student TOML's folder; eval of the run (and a `run =`
    teacher) must find it there too, from any directory."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "beside_the_toml.py").write_text(
        "from mtkd.pipeline.models import gru_lm\n\n\ndef lm(vocab_size):\n    return gru_lm(vocab_size, hidden=8)\n")
    (models / "student.toml").write_text('[student]\nname = "s"\nfactory = "beside_the_toml:lm"\nkwargs = { vocab_size = 40 }\n')
    run = tmp_path / "run"
    run_train(TrainConfig(models / "student.toml", str(token_world.data["train"]), run, max_steps=1, batch_size=8))
    (tmp_path / "teachers.toml").write_text('[[teachers]]\nname = "mine"\nrun = "run"\n')
    sys.modules.pop("beside_the_toml", None)
    sys.path[:] = [p for p in sys.path if p != str(models)]  # as in a fresh `mtkd eval` process
    measured = run_eval(str(token_world.data["val"]), run=run, batch_size=5)
    assert measured["kind"] == "tokens" and np.isfinite(measured["perplexity"])
    sys.modules.pop("beside_the_toml", None)
    sys.path[:] = [p for p in sys.path if p != str(models)]
    as_teacher = run_eval(str(token_world.data["val"]), model=tmp_path / "teachers.toml", teacher="mine", batch_size=5)
    assert as_teacher["perplexity"] == pytest.approx(measured["perplexity"])
