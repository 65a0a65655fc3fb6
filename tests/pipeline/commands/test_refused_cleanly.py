"""Nothing silently wrong, through the real CLI: every bad input one line and exit 2 with nothing
written; damage in a store exit 2 naming store, teacher and block; failures that are not the input's
fault (a teacher raising, a full disk, a diverging loss) one line and exit 1, with what was written
before kept valid."""

from __future__ import annotations

import errno
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import refused, snapshot

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def failed(result, *culprits) -> str:
    """Exit 1 with a one-line message naming every culprit (not a traceback)."""
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for culprit in culprits:
        assert str(culprit) in message, message
    return message


def infer_args(toml, data, out, *extra):
    return ["infer", "--teachers", toml, "--data", data, "--out", out, "--chunk-rows", 8, "--batch-size", 4, "--quiet", *extra]


def train_args(kd_world, out, *extra, store=None):
    store_args = [] if store is False else ["--store", store or kd_world.store["labelled"]]
    return ["train", "--student", kd_world.student, "--data", kd_world.data["labelled"], *store_args,
            "--out", out, "--epochs", "2", "--batch-size", "64", "--quiet", *extra]


def copy_store(kd_world, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(kd_world.store["labelled"], path)
    return path


def chunk(store, teacher, block):
    return store / "teachers" / teacher / "logits" / "c" / str(block) / "0"


# -- non-finite input data: refused before anything is written ---------------------------------------


@pytest.fixture
def nan_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x[17, 3] = np.nan
    x[29, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=rng.integers(0, 3, 40))
    return tmp_path / "nan.npz"


def test_nan_inputs_are_refused_by_infer_train_and_eval_naming_the_first_bad_row(tmp_path, nan_data, make_teachers, kd_world):
    toml = make_teachers([{"name": "a"}])
    refused(invoke(*infer_args(toml, nan_data, tmp_path / "s.zarr")), nan_data, "row 17", "NaN/inf")
    assert not (tmp_path / "s.zarr").exists()
    student = tmp_path / "student.toml"
    student.write_text('[student]\nname = "m"\nfactory = "mtkd.pipeline.models:mlp"\n'
                       "kwargs = { in_features = 8, hidden = [4], num_classes = 3 }\n")
    result = invoke("train", "--student", student, "--data", nan_data, "--out", tmp_path / "run", "--epochs", 1, "--quiet")
    refused(result, nan_data, "row 17")
    assert not (tmp_path / "run").exists()
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).state_dict(), tmp_path / "m.pt")
    result = invoke("eval", "--model", student, "--checkpoint", tmp_path / "m.pt", "--data", nan_data)
    refused(result, nan_data, "row 17")


# -- names and paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "zarr.json", "t" * 101])
def test_teacher_names_that_are_not_folders_of_their_own_are_refused(tmp_path, make_data, make_teachers, name):
    toml = make_teachers([{"name": "ok"}])
    toml.write_text(toml.read_text().replace('name = "ok"', f'name = "{name}"'))
    refused(invoke(*infer_args(toml, make_data(20), tmp_path / "s.zarr")), "not allowed")
    assert not (tmp_path / "s.zarr").exists()


def test_an_out_below_a_file_is_refused(tmp_path, make_data, make_teachers, kd_world):
    (tmp_path / "file").write_text("")
    refused(invoke(*infer_args(make_teachers([{"name": "a"}]), make_data(20), tmp_path / "file" / "s.zarr")), "is a file")
    refused(invoke(*train_args(kd_world, tmp_path / "file" / "run")), "is a file")
    assert (tmp_path / "file").read_text() == ""


# -- a damaged store: exit 2 naming store, teacher and block; nothing written ---------------------------


def test_a_truncated_chunk_is_named_by_inspect_and_train_and_train_leaves_nothing(kd_world, tmp_path):
    store = copy_store(kd_world, tmp_path)
    chunk(store, "b", 3).write_bytes(chunk(store, "b", 3).read_bytes()[:100])
    refused(invoke("inspect", store, "--quiet"), store, "'b'", "block 3", "mtkd verify")
    result = invoke(*train_args(kd_world, tmp_path / "run", store=store))
    refused(result, store, "'b'", "block 3", "mtkd verify")
    assert not (tmp_path / "run").exists()  # no config.json left to block the rerun


def test_a_missing_array_zarr_json_is_one_line(kd_world, tmp_path):
    store = copy_store(kd_world, tmp_path)
    (store / "teachers" / "a" / "logits" / "zarr.json").unlink()
    refused(invoke("inspect", store, "--quiet"), store, "'a'")
    refused(invoke(*train_args(kd_world, tmp_path / "run", store=store)), store, "'a'")
    assert not (tmp_path / "run").exists()
    assert invoke("verify", store).exit_code == 2


@pytest.mark.parametrize("stream", [False, True])
def test_stored_nan_stops_training_naming_store_teacher_and_block(kd_world, tmp_path, stream):
    store = copy_store(kd_world, tmp_path)
    zarr.open_array(store / "teachers" / "c" / "logits", mode="r+")[263, 2] = np.nan  # block 5 (50 rows a block)
    loader = ["--loader", "stream" if stream else "memory"]
    result = invoke(*train_args(kd_world, tmp_path / "run", *loader, store=store))
    refused(result, store, "'c'", "block 5", "mtkd verify")
    assert not (tmp_path / "run" / "student.pt").exists()
    refused(invoke("inspect", store, "--quiet"), store, "'c'", "block 5")


def test_verify_repair_and_infer_mend_what_train_refused(tmp_path, make_data, make_teachers, kd_world):
    data, toml = make_data(40), make_teachers([{"name": "a"}])
    store = tmp_path / "s.zarr"
    assert invoke(*infer_args(toml, data, store)).exit_code == 0
    before = snapshot(store)
    chunk(store, "a", 2).unlink()  # a deleted chunk whose record stayed: today trains on NaN fill
    refused(invoke("inspect", store, "--quiet"), "'a'", "block 2")
    refused(invoke("verify", store, "--repair"), "repaired")
    assert invoke(*infer_args(toml, data, store)).exit_code == 0
    assert snapshot(store) == before


# -- resume -----------------------------------------------------------------------------------------------


def test_a_checkpoint_with_other_keys_is_one_line_on_resume(kd_world, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args(kd_world, run, "--epochs", 1)).exit_code == 0
    torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    refused(invoke(*train_args(kd_world, run, "--epochs", 1, "--resume")), "checkpoint.pt", "missing")


def test_a_finished_run_is_named_so(kd_world, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args(kd_world, run, "--epochs", 1)).exit_code == 0
    refused(invoke(*train_args(kd_world, run, "--epochs", 1)), "already holds a finished run")


# -- failures that are not the input's: exit 1, one line, what was written kept -----------------------------

RAISING_TEACHER = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Raising(nn.Module):
        def __init__(self, in_features=8, num_classes=3):
            super().__init__()
            self.linear = nn.Linear(in_features, num_classes)

        def forward(self, x):
            if (x[:, 0] > 1e3).any():
                raise RuntimeError("the GPU fell off the bus")
            return self.linear(x)
    """
)


def test_a_teacher_raising_partway_is_one_line_and_keeps_the_blocks_before(tmp_path, make_data, make_teachers, monkeypatch):
    (tmp_path / "raising_teacher.py").write_text(RAISING_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = make_data(40, nan_row=21)  # first feature 1e4 at row 21 (block 2): the teacher raises there
    toml = make_teachers([{"name": "r", "factory": "raising_teacher:Raising"}])
    message = failed(invoke(*infer_args(toml, data, tmp_path / "s.zarr")), "'r'", "rows 20..23", "kept")
    assert "fell off the bus" in message
    store = open_store(tmp_path / "s.zarr")
    assert store.done_blocks("r") == {0, 1}  # written before the failure: valid and kept
    assert invoke("verify", tmp_path / "s.zarr").exit_code == 0


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, make_data, make_teachers, monkeypatch):
    data, toml = make_data(40), make_teachers([{"name": "a"}])
    real = os.fsync
    synced = []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/logits/c/" in path:
            synced.append(path)
            if "/logits/c/2/" in path:  # block 2's chunk finds the disk full (blocks are written in parallel)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    message = failed(invoke(*infer_args(toml, data, tmp_path / "s.zarr")), "no space left")
    assert "/logits/c/2/0" in message  # the file being written, not a temporary name
    monkeypatch.undo()
    store = tmp_path / "s.zarr"
    assert not list(store.rglob("*.partial"))
    # Blocks are written by several threads at once: a block after the failed one may be whole and
    # recorded too (each block is valid on its own); the failed one never is.
    done = open_store(store).done_blocks("a")
    assert {0, 1} <= done and 2 not in done
    assert invoke("verify", store).exit_code == 0
    assert invoke(*infer_args(toml, data, store)).exit_code == 0  # and the rerun completes it
    assert invoke("verify", store).exit_code == 0


def test_a_full_disk_while_checkpointing_leaves_no_temporary_file(kd_world, tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp-checkpoint.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    failed(invoke(*train_args(kd_world, tmp_path / "run")), "no space left", "checkpoint.pt")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob(".tmp-*"))


def test_a_loss_turning_nan_stops_with_exit_1_keeping_the_last_good_checkpoint(kd_world, tmp_path):
    run = tmp_path / "run"
    # A learning rate this large makes the weights (and so the loss) overflow within a few steps.
    result = invoke(*train_args(kd_world, run, "--lr", "1e30", "--checkpoint-every", 1, "--schedule", "inverse", store=False))
    message = failed(result, "NaN/inf", "epoch 1, batch", "last good checkpoint")
    assert not (run / "student.pt").exists()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    first_bad = int(message.split("batch ")[1].split(";")[0])
    assert checkpoint["batch"] == first_bad - 1  # the last batch before it


def test_json_reports_the_verify_result_on_damage(kd_world, tmp_path):
    store = copy_store(kd_world, tmp_path)
    chunk(store, "a", 0).unlink()
    result = invoke("verify", store, "--json", "--quiet")
    assert result.exit_code == 2
    assert json.loads(result.stdout.strip().splitlines()[-1])["clean"] is False


def test_under_torchrun_every_rank_exits_2_on_bad_input(kd_world, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtkd.pipeline.cli",
           *map(str, train_args(kd_world, tmp_path / "run", "--teachers", "zzz", "--device", "cpu"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1  # torchrun's own code for failed ranks ...
    assert done.stderr.count("error: ") == 2 and "'zzz'" in done.stderr  # ... each of which said why
    assert done.stderr.count("exitcode  : 2") + done.stderr.count("exitcode: 2") >= 1, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()
