"""Stage two's training: the loss per fusion mode, distillation reaching its target, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkd.kernels import confidence_weights, kd_loss_ref
from mtkd.pipeline.specs import load_student_spec
from mtkd.pipeline.config import TrainConfig
from mtkd.pipeline.objective import Objective
from mtkd.pipeline.train import run_train

from .conftest import KD_CLASSES, KD_TEACHERS

VENV_BIN = Path(sys.executable).parent
# One thread per process: the uninterrupted and the resumed runs must do the same arithmetic.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def student_log_probs(run: Path, kd_world, split: str, temperature: float = 1.0) -> torch.Tensor:
    model = load_student_spec(kd_world.student).build()
    if run is not None:
        model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    with torch.no_grad():
        return torch.log_softmax(model(torch.from_numpy(kd_world.x[split])) / temperature, dim=-1)


def initial_log_probs(kd_world, split: str, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    torch.manual_seed(seed)  # as run_train builds its student
    model = load_student_spec(kd_world.student).build()
    with torch.no_grad():
        return torch.log_softmax(model(torch.from_numpy(kd_world.x[split])) / temperature, dim=-1)


def kl(target: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean KL(target || q) over rows, 0 log 0 = 0."""
    return float(torch.where(target > 0, target * (target.log() - log_q), 0.0).sum(-1).mean())


def mean_target(kd_world, split, temperature, weights=None):
    z = kd_world.teacher_stack(split)  # (K, N, V)
    w = torch.full((3,), 1 / 3) if weights is None else weights / weights.sum(-1, keepdim=True)
    w = w.reshape(-1, 3).T.unsqueeze(-1)  # (K, N or 1, 1)
    return (torch.softmax(z / temperature, dim=-1) * w).sum(0)


def train(kd_world, out, split="labelled", **options):
    defaults = dict(store=kd_world.store[split], epochs=25, batch_size=32, lr=1e-2, temperature=1.0)
    return run_train(TrainConfig(kd_world.student, str(kd_world.data[split]), out, **{**defaults, **options}))


# -- the loss of one batch ------------------------------------------------------------------------


def batch_of(z, labels):
    return SimpleNamespace(logits=z, labels=labels)


def objective(**overrides):
    options = dict(distil=True, fusion="mean", weights=None, temperature=2.0, alpha=0.3, loss="kl")
    return Objective(**{**options, **overrides})


def test_unlabelled_rows_keep_their_kd_term_and_labelled_rows_add_cross_entropy():
    torch.manual_seed(1)
    s = torch.randn(12, 5, requires_grad=True)
    z = torch.randn(3, 12, 5)
    y = torch.randint(0, 5, (12,))
    y[::3] = -100
    loss = objective()(s, batch_of(z, y))
    kd = kd_loss_ref(s, z, temperature=2.0, reduction="none")
    ce = F.cross_entropy(s, y, ignore_index=-100, reduction="none")  # 0 where unknown
    torch.testing.assert_close(loss, (0.3 * kd + 0.7 * ce).mean())
    loss.backward()
    assert (s.grad[::3].abs().sum(-1) > 0).all()  # unlabelled rows still learn


@pytest.mark.parametrize("labels", ["all", "none"])
def test_homogeneous_batches_take_one_kernel_call_with_the_same_meaning(labels):
    torch.manual_seed(2)
    s, z = torch.randn(8, 4), torch.randn(2, 8, 4)
    y = torch.randint(0, 4, (8,)) if labels == "all" else torch.full((8,), -100)
    rows = 0.3 * kd_loss_ref(s, z, temperature=2.0, reduction="none")
    if labels == "all":
        rows = rows + 0.7 * F.cross_entropy(s, y, reduction="none")
    torch.testing.assert_close(objective()(s, batch_of(z, y)), rows.mean())


def test_vote_target_is_the_fraction_of_teacher_argmaxes():
    z = torch.tensor([[[3.0, 1, 0]], [[0, 2, 1]], [[5, 0, 0]]])  # argmaxes 0, 1, 0
    pseudo, weights = objective(fusion="vote", temperature=3.0).target(z, torch.tensor([-100]))
    assert weights is None and pseudo.shape == (1, 1, 3)
    torch.testing.assert_close(torch.softmax(pseudo[0] / 3.0, -1), torch.tensor([[2 / 3, 1 / 3, 0]]))


def test_confidence_weights_come_per_row_from_each_teachers_label_probability():
    torch.manual_seed(4)
    z, y = torch.randn(3, 6, 4), torch.tensor([0, 1, 2, 3, -100, 1])
    _, weights = objective(fusion="confidence").target(z, y)
    # Computed here, independently: SPEC's CA-MKD form w_nk = (1 - softmax_k(CE_nk)) / (K - 1),
    # CE_nk = -log softmax(z_kn)[y_n]; uniform where there is no label.
    ce = torch.stack([-torch.log_softmax(z[k].double(), -1)[torch.arange(6), y.clamp(min=0)] for k in range(3)], 1)
    expected = (1 - torch.softmax(ce, dim=1)) / 2
    expected[4] = 1 / 3
    assert weights.shape == (6, 3)
    torch.testing.assert_close(weights.double(), expected)
    assert not torch.allclose(weights[0], weights[1])  # per row, not one weight per teacher


def test_mse_is_squared_error_of_fused_and_student_probabilities_at_t():
    torch.manual_seed(3)
    s, z = torch.randn(6, 4), torch.randn(2, 6, 4)
    y = torch.tensor([0, 1, -100, 3, 2, -100])
    w = torch.tensor([3.0, 1.0])
    loss = objective(fusion="weighted", weights=w, loss="mse")(s, batch_of(z, y))
    p = 0.75 * torch.softmax(z[0] / 2, -1) + 0.25 * torch.softmax(z[1] / 2, -1)
    mse = (p - torch.softmax(s / 2, -1)).square().sum(-1)
    ce = F.cross_entropy(s, y, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, (0.3 * mse + 0.7 * ce).mean())


# -- training reaches its target ------------------------------------------------------------------


def test_hard_label_training_writes_a_run(kd_world, tmp_path):
    out = tmp_path / "run"
    result = run_train(TrainConfig(kd_world.student, str(kd_world.data["labelled"]), out, epochs=15, batch_size=32, lr=1e-2))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "student.pt"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 16))
    assert {"loss", "train_accuracy", "lr", "rows_per_s", "seconds", "rows"} <= set(lines[0])
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"] and lines[-1]["train_accuracy"] > 0.85
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "hard-label" and config["store"] is None and config["student_pt"] == "final"
    assert list(config)[0] == "command" and config["command"].startswith("mtkd train --student")
    assert result["student_pt"] == "final" and result["steps"] == 15 * 12


def test_distilling_from_unlabelled_rows_reaches_the_fused_teachers(kd_world, tmp_path):
    out = tmp_path / "run"
    train(kd_world, out, split="unlabelled", alpha=0.5)  # alpha < 1: unlabelled rows still carry alpha * KD
    target = mean_target(kd_world, "unlabelled", 1.0)
    before = kl(target, initial_log_probs(kd_world, "unlabelled"))
    after = kl(target, student_log_probs(out, kd_world, "unlabelled"))
    assert after < 0.15 * before, (before, after)
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["labelled_rows"] == 0
    assert config["store"]["fingerprint"] == config["data"]["fingerprint"]
    assert [t["name"] for t in config["teachers"]] == list(KD_TEACHERS)


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("fusion", ["mean", "weighted", "confidence", "vote"])
def test_each_fusion_mode_pulls_the_student_to_its_own_target(kd_world, tmp_path, fusion, loss):
    out = tmp_path / "run"
    weights = {"a": 1.0, "b": 0.0, "c": 0.0} if fusion == "weighted" else None
    train(kd_world, out, fusion=fusion, loss=loss, teacher_weights=weights, temperature=2.0)
    z = kd_world.teacher_stack("labelled")
    y = torch.from_numpy(kd_world.y["labelled"])
    if fusion == "mean":
        target = mean_target(kd_world, "labelled", 2.0)
    elif fusion == "weighted":
        target = torch.softmax(z[0] / 2.0, -1)  # teacher a alone
    elif fusion == "confidence":
        target = mean_target(kd_world, "labelled", 2.0, confidence_weights(z, y))
    else:
        target = F.one_hot(z.argmax(-1), KD_CLASSES).float().mean(0)
    before = kl(target, initial_log_probs(kd_world, "labelled", temperature=2.0))
    after = kl(target, student_log_probs(out, kd_world, "labelled", temperature=2.0))
    assert after < 0.5 * before, (before, after)
    if fusion == "weighted":  # the zero-weight teachers were ignored: the student sides with a
        pred = student_log_probs(out, kd_world, "labelled").argmax(-1)
        agree = [(pred == z[k].argmax(-1)).float().mean() for k in range(3)]
        assert agree[0] > max(agree[1], agree[2]) + 0.1, agree


def test_val_data_keeps_the_best_epoch(kd_world, tmp_path):
    out = tmp_path / "run"
    result = train(kd_world, out, epochs=6, lr=3e-2, val_data=str(kd_world.data["val"]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(lines, key=lambda r: r["val_accuracy"])
    assert result["best"] == {"epoch": best["epoch"], "val_accuracy": best["val_accuracy"]}
    assert {"val_accuracy", "val_nll", "val_ece", "val_f1_macro"} <= set(lines[0])
    pred = student_log_probs(out, kd_world, "val").argmax(-1)
    accuracy = float((pred == torch.from_numpy(kd_world.y["val"])).float().mean())
    assert accuracy == pytest.approx(best["val_accuracy"])
    assert json.loads((out / "config.json").read_text())["student_pt"] == "best"


def test_streamed_logits_train_too(kd_world, tmp_path):
    out = tmp_path / "run"
    result = train(kd_world, out, epochs=10, stream=True)
    assert result["loader"] == "stream" and json.loads((out / "config.json").read_text())["loader"] == "stream"
    # The student learns from the streamed logits: it moves most of the way to the fused teachers.
    target = mean_target(kd_world, "labelled", 1.0)
    before = kl(target, initial_log_probs(kd_world, "labelled"))
    after = kl(target, student_log_probs(out, kd_world, "labelled"))
    assert after < 0.3 * before, (before, after)


# -- optimisation: steps, accumulation, schedule ------------------------------------------------------


def test_max_steps_ends_the_run_inside_an_epoch(kd_world, tmp_path):
    out = tmp_path / "run"
    result = train(kd_world, out, max_steps=30)  # 12 batches per epoch: two epochs and 6 batches of a third
    assert result["steps"] == 30 and result["epochs"] == 3
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and [r["rows"] for r in lines] == [384, 384, 6 * 32]
    assert lines[-1]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train(kd_world, out, max_steps=30, resume=True)["resumed_from"] == {"epoch": 3, "batch": 0}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_accumulating_two_half_batches_takes_the_step_of_one_whole_batch(kd_world, tmp_path):
    whole = train(kd_world, tmp_path / "whole", epochs=2, batch_size=32)
    halves = train(kd_world, tmp_path / "halves", epochs=2, batch_size=16, grad_accum=2)
    assert whole["steps"] == halves["steps"] == 2 * 12
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "student.pt", weights_only=True)
    for k in a:  # the same rows per step (the order does not depend on the batch size), in other sums
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_warmup_rises_linearly_then_decays_by_cosine():
    from mtkd.pipeline.train import Plan, _schedule

    c = TrainConfig("s.toml", "d.npz", "out", lr=1.0, warmup_steps=4)
    lr_at = _schedule(c, Plan(batches_per_epoch=10, grad_accum=1, total_steps=20))
    assert [lr_at(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4) == 1.0 and lr_at(12) == pytest.approx(0.5) and lr_at(19) < 0.02


# -- resume ----------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_changes_nothing(kd_world, tmp_path):
    out = tmp_path / "run"
    train(kd_world, out, epochs=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = train(kd_world, out, epochs=2, resume=True)
    assert result["resumed_from"] == {"epoch": 2, "batch": 0} and result["steps"] == 2 * 12
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_without_a_run_starts_one(kd_world, tmp_path):
    result = train(kd_world, tmp_path / "run", epochs=1, resume=True)
    assert result["resumed_from"] is None and (tmp_path / "run" / "student.pt").is_file()


def cli_train(kd_world, out, *extra):
    return [
        str(VENV_BIN / "mtkd"), "train", "--student", str(kd_world.student), "--data", str(kd_world.data["labelled"]),
        "--store", str(kd_world.store["labelled"]), "--out", str(out), "--epochs", "40", "--batch-size", "8",
        "--lr", "0.01", "--checkpoint-every", "5", "--quiet", *extra,
    ]


def test_resume_after_sigkill_ends_with_the_same_weights(kd_world, tmp_path):
    kill_and_resume(lambda out, *extra: cli_train(kd_world, out, *extra), tmp_path, epochs=40)


def test_a_streamed_token_run_resumed_after_sigkill_ends_with_the_same_weights(token_world, tmp_path):
    def command(out, *extra):
        return [str(VENV_BIN / "mtkd"), "train", "--student", str(token_world.student), "--data",
                str(token_world.data["train"]), "--store", str(token_world.store), "--out", str(out), "--epochs", "12",
                "--batch-size", "4", "--temperature", "2", "--alpha", "0.5", "--fusion", "confidence", "--lr", "0.01",
                "--loader", "stream", "--checkpoint-every", "3", "--quiet", *extra]

    kill_and_resume(command, tmp_path, epochs=12)


def kill_and_resume(command, tmp_path, *, epochs):
    """An uninterrupted run against one killed (SIGKILL) three times and resumed.

    Each kill waits for its process to checkpoint past a random point of training (somewhere in
    10-25%, 30-45% and 50-65% of the epochs), then a random few milliseconds more: the kills land at
    random batches and always before the end, however fast or loaded this machine is."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(reference), check=True, env=SUBPROCESS_ENV, capture_output=True)
    rng = random.Random(0)
    targets = [epochs * rng.uniform(0.1 + 0.2 * i, 0.25 + 0.2 * i) for i in range(3)]
    positions = []
    checkpoint = killed / "checkpoint.pt"
    for target in targets:
        proc = subprocess.Popen(command(killed, "--resume"), env=SUBPROCESS_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, seen = time.monotonic() + 120, None
        while proc.poll() is None and time.monotonic() < deadline:
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp is not None and stamp != seen:  # checkpoints are written atomically (renamed into place)
                seen = stamp
                if torch.load(checkpoint, weights_only=True)["epoch"] >= target:
                    break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = torch.load(checkpoint, weights_only=True)
        positions.append((saved["epoch"], saved["batch"]))
    print("killed at (epoch, batch)", positions)
    assert positions[-1][0] < epochs, "the kills came too late to interrupt training"
    done = subprocess.run(command(killed, "--resume", "--json"), env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["resumed_from"] is not None
    a = torch.load(reference / "student.pt", weights_only=True)
    b = torch.load(killed / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), positions

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(reference) == losses(killed)


# -- DDP --------------------------------------------------------------------------------------------


def test_torchrun_with_two_cpu_processes_writes_one_run(kd_world, tmp_path):
    out = tmp_path / "run"
    cmd = [
        str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mtkd.pipeline.cli", "train",
        "--student", str(kd_world.student), "--data", str(kd_world.data["labelled"]),
        "--store", str(kd_world.store["labelled"]), "--out", str(out), "--epochs", "2", "--batch-size", "16",
        "--device", "cpu", "--json", "--quiet",
    ]
    done = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports
    result = json.loads(reports[0])
    assert result["world_size"] == 2 and result["steps"] == 2 * 12  # 384 rows / 2 ranks / 16 per batch
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "student.pt"]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rows"] for r in lines] == [384, 384]  # both ranks' rows are counted


# -- tokens: language models from a sparse store ---------------------------------------------------

from mtkd.kernels import kd_sparse_loss_ref  # noqa: E402
from mtkd.pipeline.data import load_data  # noqa: E402
from mtkd.pipeline.loader import SequenceLoader, TeacherRows  # noqa: E402
from mtkd.pipeline.store import open_store  # noqa: E402

from .token_world import TEACHERS as LM_TEACHERS  # noqa: E402
from .token_world import token_world  # noqa: E402, F401


def train_lm(world, out, **options):
    # alpha 1 (pure KD), as these tests measure it; token data now defaults to 0.8
    defaults = dict(store=world.store, epochs=6, batch_size=8, lr=2e-2, temperature=1.0, alpha=1.0)
    return run_train(TrainConfig(world.student, str(world.data["train"]), out, **{**defaults, **options}))


def sparse_kd_of(world, run, *, student=None, fusion="mean", temperature=1.0, seed=0):
    """Mean sparse KD loss (alpha 1) of a run's student, or of the fresh one, against the store's teachers."""
    model = load_student_spec(student or world.student).build()
    if run is None:
        torch.manual_seed(seed)
        model = load_student_spec(student or world.student).build()
    else:
        model.load_state_dict(torch.load(run / "student.pt", weights_only=True))
    data = load_data(str(world.data["train"]))
    rows = TeacherRows(open_store(world.store), LM_TEACHERS, temperature)
    loader = SequenceLoader(data.tokens, data.offsets, batch_size=data.num_seqs, seed=0, teachers=rows)
    batch = next(iter(loader.epoch(0)))
    objective = Objective(distil=True, fusion=fusion, weights=torch.tensor([1.0, 0.0, 0.0]), temperature=temperature,
                          alpha=1.0, loss="kl")
    ids, logprobs, w = objective.sparse_target(batch.teachers, batch.labels[batch.attention_mask])
    with torch.no_grad():
        logits = model(batch.input_ids)[batch.attention_mask]
    return float(kd_sparse_loss_ref(logits, ids, logprobs, temperature=temperature, weights=w))


@pytest.mark.parametrize("fusion", ["mean", "weighted", "confidence", "vote"])
def test_a_student_lm_distils_towards_each_fusion_of_the_sparse_teachers(token_world, tmp_path, fusion):
    out = tmp_path / "run"
    weights = {"g1": 1.0, "g2": 0.0, "g3": 0.0} if fusion == "weighted" else None
    result = train_lm(token_world, out, fusion=fusion, teacher_weights=weights, temperature=2.0)
    before = sparse_kd_of(token_world, None, fusion=fusion, temperature=2.0)
    after = sparse_kd_of(token_world, out, fusion=fusion, temperature=2.0)
    # A GRU of width 8 cannot match a mixture of three wider teachers, nor vote's near one-hot
    # targets, exactly: the bound leaves room for that, measured at 0.60 / 0.21 / 0.60 / 0.79.
    assert after < (0.85 if fusion == "vote" else 0.7) * before, (before, after)
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "tokens" and config["loss_function"] == "fused_linear_sparse_kd_loss"
    assert result["steps"] == 6 * 8  # 60 sequences, 8 per batch


def test_token_metrics_per_epoch_and_the_best_by_validation_perplexity(token_world, tmp_path):
    out = tmp_path / "run"
    result = train_lm(token_world, out, epochs=3, alpha=0.5, val_data=str(token_world.data["val"]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    positions = int(np.diff(load_data(str(token_world.data["train"])).offsets).sum())
    assert [r["rows"] for r in lines] == [positions] * 3 and all(r["tokens_per_s"] > 0 for r in lines)
    assert {"val_perplexity", "val_accuracy", "val_nll"} <= set(lines[0])
    assert all(r["val_perplexity"] == pytest.approx(math.exp(r["val_nll"])) for r in lines)
    best = min(lines, key=lambda r: r["val_perplexity"])
    assert result["best"] == {"epoch": best["epoch"], "val_perplexity": best["val_perplexity"]}
    assert lines[-1]["val_perplexity"] < lines[0]["val_perplexity"] * 1.05


def test_torchrun_with_two_cpu_processes_distils_a_token_run_from_disjoint_equal_shares(token_world, tmp_path):
    # The student writes down, per process, its parameters' sum and every sequence it trains on.
    record = tmp_path / "seen"
    record.mkdir()
    student = token_world.student_toml(f"recording-{tmp_path.name}.toml", "recording_lm", hidden=8, record=json.dumps(str(record)))
    out, epochs = tmp_path / "run", 4
    cmd = [
        str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mtkd.pipeline.cli", "train",
        "--student", str(student), "--data", str(token_world.data["train"]), "--store", str(token_world.store),
        "--out", str(out), "--epochs", str(epochs), "--batch-size", "4", "--lr", "0.02", "--device", "cpu", "--json", "--quiet",
    ]
    done = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports
    per_rank = token_world.seqs // 2
    result = json.loads(reports[0])
    assert result["world_size"] == 2 and result["steps"] == epochs * math.ceil(per_rank / 4)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "student.pt"]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["kind"] == "tokens" and config["loss_function"] == "fused_linear_sparse_kd_loss"

    data = load_data(str(token_world.data["train"]))
    ids = {tuple(data.tokens[a:b].tolist()): s for s, (a, b) in enumerate(zip(data.offsets[:-1], data.offsets[1:]))}
    assert len(ids) == data.num_seqs  # every sequence told apart by its tokens
    seen, sums = {}, {}
    for rank in (0, 1):
        lines = (record / f"rank-{rank}.txt").read_text().splitlines()
        sums[rank] = [line for line in lines if line.startswith("P ")]
        seen[rank] = [ids[tuple(int(t) for t in line.split())] for line in lines if not line.startswith("P ")]
        assert len(seen[rank]) == epochs * per_rank
    for e in range(epochs):  # each epoch: equal shares, disjoint, together every sequence
        a, b = (set(seen[r][e * per_rank : (e + 1) * per_rank]) for r in (0, 1))
        assert len(a) == len(b) == per_rank and not a & b and len(a | b) == data.num_seqs
    assert seen[0][:per_rank] != seen[0][per_rank : 2 * per_rank]  # reshuffled each epoch
    # One model: after every step both processes hold the same parameters (gradients all-reduced,
    # the output layer's too, although the fused loss applies it outside DDP's forward).
    assert sums[0] == sums[1] and len(set(sums[0])) > 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rows"] for r in lines] == [data.num_rows] * epochs  # both processes' positions counted
    before, after = sparse_kd_of(token_world, None, student=student), sparse_kd_of(token_world, out, student=student)
    assert after < 0.8 * before, (before, after)  # measured 0.66


def test_a_student_whose_logits_are_not_its_output_layer_falls_back_to_its_logits(token_world, tmp_path):
    scaled = token_world.student_toml("scaled.toml", "scaled_lm", hidden=8)
    out = tmp_path / "run"
    run_train(TrainConfig(scaled, str(token_world.data["train"]), out, store=token_world.store, epochs=4, batch_size=8,
                          lr=2e-2, temperature=1.0))
    assert json.loads((out / "config.json").read_text())["loss_function"] == "fused_sparse_kd_loss"
    before = sparse_kd_of(token_world, None, student=scaled)
    after = sparse_kd_of(token_world, out, student=scaled)
    assert after < 0.7 * before, (before, after)  # trained on its real logits, scale included


def test_loss_path_logits_trains_on_the_logits_and_says_so_with_auto_s_reason(token_world, tmp_path):
    data = str(token_world.data["train"])
    runs = {}
    for path in ("auto", "logits"):
        out = tmp_path / path
        run_train(TrainConfig(token_world.student, data, out, store=token_world.store, epochs=1, batch_size=8,
                              temperature=2.0, loss_path=path))
        runs[path] = json.loads((out / "config.json").read_text())
        runs[path]["losses"] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert runs["auto"]["loss_path"] == {"option": "auto", "ran": "fused", "why": runs["auto"]["loss_path"]["why"]}
    assert runs["auto"]["loss_path"]["why"].startswith("auto: the student's hidden states and output layer give its logits")
    assert runs["auto"]["loss_function"] == "fused_linear_sparse_kd_loss"
    assert runs["logits"]["loss_path"] == {"option": "logits", "ran": "logits", "why": "--loss-path logits"}
    assert runs["logits"]["loss_function"] == "fused_sparse_kd_loss"
    assert "--loss-path logits" in runs["logits"]["command"]
    assert runs["logits"]["losses"] == pytest.approx(runs["auto"]["losses"], rel=1e-5)  # one loss, two ways


def test_loss_path_fused_is_refused_where_it_cannot_run_before_anything_is_written(token_world, kd_world, tmp_path):
    from mtkd.pipeline.errors import BadInputError

    scaled = token_world.student_toml("scaled-refused.toml", "scaled_lm", hidden=8)
    out = tmp_path / "scaled"
    with pytest.raises(BadInputError, match="--loss-path fused: student 'scaled_lm' exposes no hidden states"):
        run_train(TrainConfig(scaled, str(token_world.data["train"]), out, store=token_world.store, epochs=1, loss_path="fused"))
    assert not out.exists()
    with pytest.raises(BadInputError, match="--loss-path fused: only token data distilled from top-k teachers"):
        run_train(TrainConfig(kd_world.student, str(kd_world.data["labelled"]), tmp_path / "rows", store=kd_world.store["labelled"],
                              epochs=1, loss_path="fused"))
    assert not (tmp_path / "rows").exists()
    with pytest.raises(BadInputError, match="--loss-path fused needs --store"):
        TrainConfig(kd_world.student, str(kd_world.data["labelled"]), tmp_path / "hard", loss_path="fused")
    with pytest.raises(BadInputError, match="--loss-path must be one of auto, fused, logits"):
        TrainConfig(kd_world.student, str(kd_world.data["labelled"]), tmp_path / "hard", loss_path="chunked")


def test_the_fused_linear_and_the_logits_paths_compute_one_loss_and_gradient():
    torch.manual_seed(5)
    p, h, v, k = 30, 6, 11, 4
    hidden = torch.randn(p, h, requires_grad=True)
    head = torch.nn.Linear(h, v)
    ids = torch.stack([torch.stack([torch.randperm(v)[:k] for _ in range(p)]) for _ in range(2)])  # (2, P, k)
    logprobs = torch.log_softmax(torch.randn(2, p, v), -1).gather(2, ids)
    labels = torch.randint(0, v, (p,))
    labels[::7] = -100
    obj = Objective(distil=True, fusion="mean", weights=None, temperature=2.0, alpha=0.6, loss="kl")
    teachers = {"ids": ids, "logprobs": logprobs, "label_logprob": logprobs[:, :, 0]}
    fused = obj.tokens(hidden, head, teachers, labels)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = obj.tokens(head(hidden), None, teachers, labels)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain)
    # alpha mixes in the next-token CE of the labelled positions only (the SPEC's ignore_index).
    kd = kd_sparse_loss_ref(head(hidden), ids, logprobs, temperature=2.0, reduction="none")
    ce = F.cross_entropy(head(hidden), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(plain, (0.6 * kd + 0.4 * ce).mean())


def test_vote_lists_each_teachers_top1_id_once_with_its_vote_fraction():
    ids = torch.tensor([[[3, 1]], [[3, 0]], [[2, 3]]])  # (K=3, P=1, k=2); top-1 by log-probability below
    logprobs = torch.log(torch.tensor([[[0.6, 0.3]], [[0.9, 0.1]], [[0.5, 0.4]]]))
    obj = Objective(distil=True, fusion="vote", weights=None, temperature=1.0, alpha=1.0, loss="kl")
    pid, plp, w = obj.sparse_target({"ids": ids, "logprobs": logprobs}, torch.tensor([-100]))
    listed = {int(i): float(lp.exp()) for i, lp in zip(pid[0, 0], plp[0, 0]) if lp > -math.inf}
    assert w is None and listed == pytest.approx({3: 2 / 3, 2: 1 / 3})
    assert len(set(pid[0, 0].tolist())) == 3  # distinct ids, the repeat moved past the vocabulary


def hf_student(root: Path, name: str, **config) -> Path:
    """A fresh Hugging Face causal LM saved locally (nothing downloaded) and its student TOML."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kind = config.pop("kind")
    cfg = {"llama": transformers.LlamaConfig, "gemma2": transformers.Gemma2Config}[kind](
        vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=32, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / name)
    toml = root / f"{name}.toml"
    toml.write_text(f'[student]\nname = "{name}"\nfactory = "transformers:AutoModelForCausalLM.from_pretrained"\n'
                    f'kwargs = {{ pretrained_model_name_or_path = "{name}" }}\n')
    return toml


def test_a_hugging_face_student_trains_through_its_base_model_and_lm_head(token_world, tmp_path):
    student = hf_student(tmp_path, "llama", kind="llama")
    out = tmp_path / "run"
    run_train(TrainConfig(student, str(token_world.data["train"]), out, store=token_world.store, epochs=2, batch_size=8,
                          lr=2e-2, temperature=1.0, alpha=0.5))
    assert json.loads((out / "config.json").read_text())["loss_function"] == "fused_linear_sparse_kd_loss"
    state = torch.load(out / "student.pt", weights_only=True)
    assert "lm_head.weight" in state or "model.embed_tokens.weight" in state  # its own state_dict, for save_pretrained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_a_soft_capped_hugging_face_student_is_not_trained_on_uncapped_logits(token_world, tmp_path):
    # Gemma 2 soft-caps its logits after lm_head: hidden @ W.T is not its output (TRL PR 6629).
    student = hf_student(tmp_path, "gemma", kind="gemma2", final_logit_softcapping=0.5)
    out = tmp_path / "run"
    run_train(TrainConfig(student, str(token_world.data["train"]), out, store=token_world.store, epochs=1, batch_size=8))
    assert json.loads((out / "config.json").read_text())["loss_function"] == "fused_sparse_kd_loss"
