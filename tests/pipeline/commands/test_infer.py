"""`mtkd infer` through the real CLI: output, every refusal (exit 2, culprit named, store untouched),
and real processes: killed with SIGKILL and resumed, several shards writing one store at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import LM_VOCAB, refused, snapshot

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def store_of(tmp_path, make_data, make_teachers):
    """A complete store of teacher "a" on data.npz (60 rows, blocks of 16)."""
    data, toml = make_data(60), make_teachers([{"name": "a"}])
    result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--chunk-rows", 16, "--quiet")
    assert result.exit_code == 0, result.output
    return tmp_path / "s.zarr"


# -- success ---------------------------------------------------------------------------------------


def test_json_is_the_last_stdout_line(tmp_path, make_data, make_teachers):
    data, toml = make_data(60), make_teachers([{"name": "a"}, {"name": "b", "seed": 1}])
    result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--json", "--chunk-rows", 16)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["teachers"] == ["a", "b"] and out["rows"] == 60 and out["blocks_written"] == 4
    assert out["blocks_skipped"] == 0 and out["complete"] == {"a": True, "b": True}
    assert out["rows_per_s"] > 0 and out["wall_s"] > 0 and out["shard"] == "0/1"
    again = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--json")
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped_teachers"] == ["a", "b"]


def test_human_output_lists_teachers(tmp_path, make_data, make_teachers):
    result = invoke("infer", "--teachers", make_teachers([{"name": "a"}]), "--data", make_data(10), "--out", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    assert "a" in result.stdout and "computed" in result.stdout and "10 rows" in result.stdout


def test_help_has_an_example():
    result = invoke("infer", "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and "mtkd infer --teachers" in result.stdout and "--shard" in result.stdout
    assert "--chunk-rows" not in result.stdout  # a testing knob, hidden


# -- refusals: exit 2, culprit named, store untouched ----------------------------------------------


def test_refuses_data_with_another_fingerprint(tmp_path, store_of, make_data, make_teachers):
    before = snapshot(store_of)
    other = make_data(60, seed=5, name="other.npz")
    result = invoke("infer", "--teachers", tmp_path / "teachers.toml", "--data", other, "--out", store_of)
    refused(result, "other.npz", "data.npz")
    assert snapshot(store_of) == before


def test_refuses_same_named_teacher_with_another_checkpoint(tmp_path, store_of, make_teachers):
    before = snapshot(store_of)
    retrained = make_teachers([{"name": "a", "seed": 9}], folder=tmp_path / "v2")
    result = invoke("infer", "--teachers", retrained, "--data", tmp_path / "data.npz", "--out", store_of)
    refused(result, "teacher 'a'", "checkpoint")
    assert snapshot(store_of) == before


def _factory_toml(path, hidden):
    """A teacher of its factory's own seeded weights: no checkpoint, so no weights hash."""
    path.write_text('[[teachers]]\nname = "a"\nfactory = "mtkd.pipeline.models:mlp"\n'
                    f"kwargs = {{ in_features = 8, hidden = {hidden}, num_classes = 3 }}\n")
    return path


def test_refuses_a_same_named_teacher_with_other_kwargs_and_no_checkpoint(tmp_path, make_data):
    data = make_data(20)
    args = ("--data", data, "--out", tmp_path / "s.zarr", "--quiet")
    assert invoke("infer", "--teachers", _factory_toml(tmp_path / "t.toml", [16]), *args).exit_code == 0
    assert open_store(tmp_path / "s.zarr").teacher("a").weights_sha256 is None
    before = snapshot(tmp_path / "s.zarr")
    result = invoke("infer", "--teachers", _factory_toml(tmp_path / "wider.toml", [16, 4]), *args, "--json")
    refused(result, "teacher 'a'", "kwargs.hidden [16], not [16, 4]")
    assert json.loads(result.stdout.strip().splitlines()[-1])["error"]["kind"] == "StoreMismatchError"
    assert snapshot(tmp_path / "s.zarr") == before


def test_the_same_teacher_from_a_moved_project_is_the_stored_one(tmp_path, make_data, make_teachers):
    """Identity is what builds the model (factory, kwargs, the weights' bytes), not where the TOML
    and its checkpoint lie: the project copied elsewhere finds its teachers complete."""
    data = make_data(20)
    toml = make_teachers([{"name": "a"}], folder=tmp_path / "here")
    assert invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--quiet").exit_code == 0
    (tmp_path / "there").mkdir()
    for name in ("teachers.toml", "a.pt"):
        (tmp_path / "there" / name).write_bytes((tmp_path / "here" / name).read_bytes())
    before = snapshot(tmp_path / "s.zarr")
    result = invoke("infer", "--teachers", tmp_path / "there" / "teachers.toml", "--data", data, "--out", tmp_path / "s.zarr", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["skipped_teachers"] == ["a"]
    assert snapshot(tmp_path / "s.zarr") == before


def test_refuses_teachers_with_different_class_counts(tmp_path, make_data, make_teachers):
    toml = make_teachers([{"name": "three"}, {"name": "four", "num_classes": 4}])
    result = invoke("infer", "--teachers", toml, "--data", make_data(20), "--out", tmp_path / "s.zarr")
    refused(result, "'four'", "4 classes", "'three'")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_data_whose_labels_exceed_the_teachers_classes(tmp_path, make_teachers):
    # Labels 0..4 against 3-class teachers: refused before anything is written (it used to write
    # every block and then crash computing the teacher's accuracy, leaving a store stuck for good).
    import numpy as np

    data = tmp_path / "five.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), y=np.arange(20) % 5)
    result = invoke("infer", "--teachers", make_teachers([{"name": "three"}]), "--data", data, "--out", tmp_path / "s.zarr")
    refused(result, "label 4", "3 classes", "'three'")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_a_teacher_whose_class_count_differs_from_the_store(tmp_path, store_of, make_teachers):
    before = snapshot(store_of)
    toml = make_teachers([{"name": "four", "num_classes": 4}], filename="four.toml")
    result = invoke("infer", "--teachers", toml, "--data", tmp_path / "data.npz", "--out", store_of)
    refused(result, "four", "4 classes", "3")
    assert snapshot(store_of) == before


def test_refuses_a_missing_checkpoint(tmp_path, store_of, make_teachers):
    before = snapshot(store_of)
    toml = make_teachers([{"name": "a"}, {"name": "b", "checkpoint": "gone.pt"}], filename="more.toml")
    result = invoke("infer", "--teachers", toml, "--data", tmp_path / "data.npz", "--out", store_of)
    refused(result, "'b'", "gone.pt", "does not exist")
    assert snapshot(store_of) == before


def test_refuses_an_unloadable_checkpoint(tmp_path, store_of, make_teachers):
    before = snapshot(store_of)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    toml = make_teachers([{"name": "b", "checkpoint": "junk.pt"}], filename="junk.toml")
    result = invoke("infer", "--teachers", toml, "--data", tmp_path / "data.npz", "--out", store_of)
    refused(result, "'b'", "junk.pt", "does not load")
    assert snapshot(store_of) == before


def test_refuses_a_checkpoint_of_another_architecture(tmp_path, make_data, make_teachers):
    toml = make_teachers([{"name": "wide", "kwargs": {"hidden": [32]}}])
    text = toml.read_text().replace("hidden = [32]", "hidden = [16]")  # the file's weights no longer fit
    toml.write_text(text)
    result = invoke("infer", "--teachers", toml, "--data", make_data(20), "--out", tmp_path / "s.zarr")
    refused(result, "'wide'", "wide.pt")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_an_unimportable_factory(tmp_path, make_data):
    (tmp_path / "t.toml").write_text('[[teachers]]\nname = "x"\nfactory = "no_such_module_xyz:net"\n')
    result = invoke("infer", "--teachers", tmp_path / "t.toml", "--data", make_data(20), "--out", tmp_path / "s.zarr")
    refused(result, "no_such_module_xyz")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_a_teacher_returning_nan_before_creating_the_store(tmp_path, make_data, make_teachers, odd_teachers):
    toml = make_teachers([{"name": "ok"}, {"name": "nan", "factory": "mtkd_test_teachers:odd", "kwargs": {"mode": "nan"}}])
    result = invoke("infer", "--teachers", toml, "--data", make_data(20, nan_row=3), "--out", tmp_path / "s.zarr")
    refused(result, "teacher 'nan'", "NaN/inf", "row 3")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_a_teacher_returning_nan_mid_run(tmp_path, make_data, make_teachers, odd_teachers):
    toml = make_teachers([{"name": "nan", "factory": "mtkd_test_teachers:odd", "kwargs": {"mode": "nan"}}])
    data = make_data(64, nan_row=37)
    result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--chunk-rows", 16, "--batch-size", 8)
    refused(result, "teacher 'nan'", "row 37")
    store = open_store(tmp_path / "s.zarr")
    assert 2 in store.missing_blocks("nan") and not store.teacher("nan").complete


# -- bad output found once writing began: exit 2, the store valid and resumable ---------------------

# (kind, mode, labelled, the message's culprit). Each teacher behaves for its first `after` batches
# (forward calls), then: one class more or fewer (labelled: the class it drops is some row's label;
# else no label falls there), NaN (rows whose first feature is the NaN marker), one position fewer.
BENT_LATER = [
    ("rows", "wide", True, "gave 4 classes on rows 24..31, but 3 on its first batch"),
    ("rows", "narrow", True, "gave 2 classes on rows 24..31, but 3 on its first batch"),
    ("rows", "narrow", False, "gave 2 classes on rows 24..31, but 3 on its first batch"),
    ("rows", "nan", True, "returned NaN/inf at row 37"),
    ("tokens", "wide", True, "gave 41 classes on rows"),
    ("tokens", "narrow", True, "gave 39 classes on rows"),
    ("tokens", "narrow", False, "gave 39 classes on rows"),
    ("tokens", "short", True, "expected (4, "),
]


@pytest.mark.parametrize(("kind", "mode", "labelled", "culprit"), BENT_LATER)
def test_a_teacher_bent_after_some_batches_leaves_a_valid_store_a_rerun_finishes(
        tmp_path, make_data, make_tokens, make_teachers, odd_teachers, kind, mode, labelled, culprit):
    fix = tmp_path / "fixed"  # once it exists the teacher behaves: its code fixed, its spec the same
    kwargs = {"mode": mode, "after": 0 if mode == "nan" else 3, "fixed_by": str(fix)}
    if kind == "rows":
        toml = make_teachers([{"name": "bent", "factory": "mtkd_test_teachers:odd", "kwargs": kwargs}])
        data = make_data(64, labelled=labelled, nan_row=37 if mode == "nan" else None)
        args = ["--batch-size", 8, "--chunk-rows", 16]
    else:
        toml = make_teachers([{"name": "bent", "factory": "mtkd_test_teachers:odd_lm", "kwargs": kwargs}])
        data = make_tokens(24, vocab=40 if labelled else 30)  # labelled: next tokens up to 39, the class dropped
        args = ["--batch-size", 4, "--chunk-rows", 16, "--top-k", 4]
    def command(out):
        return invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / out, "--quiet", *args)

    message = refused(command("s.zarr"), "teacher 'bent'", culprit, "valid and resumable", "rerun the same `mtkd infer`")
    store = open_store(tmp_path / "s.zarr")
    assert store.missing_blocks("bent") and not store.teacher("bent").complete
    if mode != "nan":  # the first three batches were stored (blocks of 16 rows: at least the first)
        assert 0 in store.done_blocks("bent"), message
    assert invoke("verify", tmp_path / "s.zarr").exit_code == 0  # what is recorded is whole and right

    fix.touch()
    assert command("s.zarr").exit_code == 0  # the rerun continues the store, never refuses it
    assert command("one_go.zarr").exit_code == 0
    assert snapshot(tmp_path / "s.zarr") == snapshot(tmp_path / "one_go.zarr")


@pytest.mark.parametrize("mode", ["rows", "3d"])
def test_refuses_a_teacher_returning_the_wrong_shape(tmp_path, make_data, make_teachers, odd_teachers, mode):
    toml = make_teachers([{"name": "bent", "factory": "mtkd_test_teachers:odd", "kwargs": {"mode": mode}}])
    result = invoke("infer", "--teachers", toml, "--data", make_data(20), "--out", tmp_path / "s.zarr")
    refused(result, "teacher 'bent'", "expected (20, ")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("[[teachers]\nname = 'a'\n", "not valid TOML"),
        ('[[teachers]]\nname = "a"\nfactory = "mtkd.pipeline.models:mlp"\nlayers = 3\n', "unknown keys ['layers']"),
        ('[[teachers]]\nname = "a b"\nfactory = "mtkd.pipeline.models:mlp"\n', "name"),
        ('[[teachers]]\nname = "a"\nfactory = "m:f"\n[[teachers]]\nname = "a"\nfactory = "m:f"\n', "'a' appears twice"),
        ('[student]\nname = "a"\nfactory = "m:f"\n', "[[teachers]]"),
    ],
)
def test_refuses_malformed_toml(tmp_path, store_of, text, culprit):
    before = snapshot(store_of)
    (tmp_path / "bad.toml").write_text(text)
    result = invoke("infer", "--teachers", tmp_path / "bad.toml", "--data", tmp_path / "data.npz", "--out", store_of)
    refused(result, "bad.toml", culprit)
    assert snapshot(store_of) == before


@pytest.mark.parametrize("shard", ["2/2", "x/2", "1", "0/0", "-1/3"])
def test_refuses_a_bad_shard(tmp_path, store_of, shard):
    before = snapshot(store_of)
    result = invoke("infer", "--teachers", tmp_path / "teachers.toml", "--data", tmp_path / "data.npz", "--out", store_of, "--shard", shard)
    refused(result, f"--shard {shard!r}")
    assert snapshot(store_of) == before


def test_refuses_a_resume_with_another_dtype(tmp_path, make_data, make_teachers):
    data, toml = make_data(64), make_teachers([{"name": "a"}])
    run_infer(toml, str(data), tmp_path / "s.zarr", chunk_rows=16, shard="0/2", device="cpu")  # half done
    before = snapshot(tmp_path / "s.zarr")
    result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", "--dtype", "float32")
    refused(result, "teacher 'a'", "float16", "float32")
    assert snapshot(tmp_path / "s.zarr") == before


def test_refuses_an_out_that_is_not_a_store(tmp_path, make_data, make_teachers):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    result = invoke("infer", "--teachers", make_teachers([{"name": "a"}]), "--data", make_data(10), "--out", tmp_path / "notes")
    refused(result, "notes", "not an mtkd store")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]


def test_refuses_bad_data_spec(tmp_path, make_teachers):
    result = invoke("infer", "--teachers", make_teachers([{"name": "a"}]), "--data", tmp_path / "none.npz", "--out", tmp_path / "s.zarr")
    refused(result, "none.npz")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(("arrays", "culprits"), [
    ({"x": np.zeros((4, 8), np.float32), "input_ids": np.ones((4, 3), np.int64)}, ("both 'x'", "'input_ids'")),
    ({"x": np.zeros((4, 8), np.float32), "labels": np.zeros(4, np.int64)}, ("unknown arrays ['labels']", "'x'")),
    ({"input_ids": np.ones((4, 3), np.int64), "mask": np.ones((4, 3), np.int64)}, ("unknown arrays ['mask']", "'input_ids'")),
])
def test_refuses_an_npz_of_two_kinds_or_with_unknown_arrays(tmp_path, make_teachers, arrays, culprits):
    np.savez(tmp_path / "mixed.npz", **arrays)
    result = invoke("infer", "--teachers", make_teachers([{"name": "a"}]), "--data", tmp_path / "mixed.npz", "--out", tmp_path / "s.zarr")
    refused(result, "mixed.npz", *culprits)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal only without CUDA")
def test_refuses_cuda_without_a_gpu(tmp_path, make_data, make_teachers):
    result = invoke("infer", "--teachers", make_teachers([{"name": "a"}]), "--data", make_data(10), "--out", tmp_path / "s.zarr", "--device", "cuda")
    refused(result, "--device cuda")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_bad_choices_and_missing_files_as_usage_errors(tmp_path, make_data, make_teachers):
    toml, data = make_teachers([{"name": "a"}]), make_data(10)
    for args, culprit in (
        (("--dtype", "float64"), "--dtype"),
        (("--device", "tpu"), "--device"),
        (("--batch-size", "0"), "--batch-size"),
    ):
        result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "s.zarr", *args)
        assert result.exit_code == 2 and culprit in result.output
    result = invoke("infer", "--teachers", tmp_path / "missing.toml", "--data", data, "--out", tmp_path / "s.zarr")
    assert result.exit_code == 2 and "missing.toml" in result.output
    assert not (tmp_path / "s.zarr").exists()


# -- real processes --------------------------------------------------------------------------------

SLOW = {"factory": "mtkd_test_teachers:odd", "kwargs": {"sleep": 0.08}}


def _infer_process(tmp_path, out, *extra):
    # The current folder is importable (SPEC), which is how the slow teacher's module is found.
    args = ["--teachers", "teachers.toml", "--data", "data.npz", "--out", out, "--chunk-rows", "4", "--batch-size", "4", "--quiet"]
    return subprocess.Popen(
        [sys.executable, "-m", "mtkd.pipeline.cli", "infer", *args, *extra],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Stage one's layouts the process tests run: dense rows, and top-k with sampled tails (their draws
# must reproduce across kills and shards too; the test teachers have 3 classes).
SAMPLED = ("--top-k", "1", "--tail-samples", "5", "--seed", "9")
# Dense rows with features (v3): both teachers also store a module's output (set in their TOML, not options).
FEATURED = ("features",)
# Regression rows (v3): data.npz with float labels (rows, 3), so both teachers are stored as values.
REGRESSION = ("regression",)
LAYOUTS = pytest.mark.parametrize("layout", [(), SAMPLED, FEATURED, REGRESSION], ids=["dense", "sampled", "features", "values"])


def _teachers_and_options(make_teachers, layout):
    """The fast and slow teachers (storing features under FEATURED) and the infer options of `layout`
    (REGRESSION: data.npz rewritten with float targets, NaN in some rows)."""
    featured = layout is FEATURED
    toml = make_teachers([{"name": "fast", **({"features": ["1"]} if featured else {})},
                          {"name": "slow", **SLOW, **({"features": ["linear"]} if featured else {})}])
    if layout is REGRESSION:
        x = np.load(toml.parent / "data.npz")["x"]
        y = np.stack([x[:, 0], x[:, 1] * 2, -x[:, 2]], axis=1)
        y[::5] = np.nan
        np.savez(toml.parent / "data.npz", x=x, y=y)
    return () if featured or layout is REGRESSION else layout


def _reference(tmp_path, *extra, name="reference.zarr"):
    """An uninterrupted single run, in a process of its own like the runs it is compared with."""
    proc = _infer_process(tmp_path, name, *extra)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return snapshot(tmp_path / name)


def _kill_once_recorded(proc, store: Path, blocks: int) -> None:
    """SIGKILL `proc` as soon as `blocks` blocks are recorded for both teachers, fast and slow (stage
    one writes a block's teachers at once, so either record may come first): the rerun must skip them."""
    records = [store / "teachers" / name / "done" / "c" for name in ("fast", "slow")]
    deadline = time.monotonic() + 60
    while len(set.intersection(*(set(os.listdir(r)) if r.is_dir() else set() for r in records))) < blocks:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@LAYOUTS
def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, make_data, make_teachers, odd_teachers, layout):
    make_data(80)
    featured, regression, layout = layout is FEATURED, layout is REGRESSION, _teachers_and_options(make_teachers, layout)
    expected = _reference(tmp_path, *layout)
    assert bool(layout) == any(key.startswith("teachers/slow/tail_ids/c/") for key in expected)
    assert featured == any(key.startswith("teachers/slow/features/linear/c/") for key in expected)
    assert regression == any(key.startswith("teachers/slow/values/c/") for key in expected)

    proc = _infer_process(tmp_path, "s.zarr", *layout)
    _kill_once_recorded(proc, tmp_path / "s.zarr", 3)
    done = len(os.listdir(tmp_path / "s.zarr/teachers/slow/done/c"))
    assert 3 <= done < 20, "the kill came too late to test anything"

    rerun = _infer_process(tmp_path, "s.zarr", *layout, "--json")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["blocks_skipped"] >= 2
    assert snapshot(tmp_path / "s.zarr") == expected


@pytest.mark.slow
@LAYOUTS
def test_concurrent_shard_processes_equal_one_run(tmp_path, make_data, make_teachers, odd_teachers, layout):
    make_data(80)
    featured, regression, layout = layout is FEATURED, layout is REGRESSION, _teachers_and_options(make_teachers, layout)
    expected = _reference(tmp_path, *layout)
    assert featured == any(key.startswith("teachers/fast/features/1/c/") for key in expected)
    assert regression == any(key.startswith("teachers/fast/values/c/") for key in expected)

    procs = [_infer_process(tmp_path, "s.zarr", *layout, "--shard", f"{i}/3") for i in range(3)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert snapshot(tmp_path / "s.zarr") == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


# -- tokens: refusals (exit 2, culprit named, store untouched) and real processes ---------------------

LM = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}


@pytest.fixture
def token_store(tmp_path, make_tokens, make_teachers):
    """A complete top-4 store of the LM teacher "lm" on tokens.npz (blocks of 16 positions)."""
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    result = invoke("infer", "--teachers", toml, "--data", make_tokens(8), "--out", tmp_path / "t.zarr", "--top-k", 4, "--chunk-rows", 16, "--quiet")
    assert result.exit_code == 0, result.output
    return tmp_path / "t.zarr"


def _refused_untouched(tmp_path, store, args, *culprits):
    before = snapshot(store)
    refused(invoke("infer", *args), *culprits)
    assert snapshot(store) == before


@pytest.mark.parametrize(("value", "culprit"), [("0", "'0' is not a positive"), ("-1,2", "'-1' is not a positive"), ("abc", "'abc' is not a number"), ("2,2", "2 is listed twice")])
def test_refuses_bad_temperatures(tmp_path, token_store, value, culprit):
    args = ("--teachers", tmp_path / "lm.toml", "--data", tmp_path / "tokens.npz", "--out", token_store, "--top-k", 4, "--temperatures", value)
    _refused_untouched(tmp_path, token_store, args, "--temperatures", culprit)


@pytest.mark.parametrize(("k", "culprit"), [("0", "--top-k must be at least 1"), (str(LM_VOCAB + 1), f"exceeds teacher 'lm''s vocabulary of {LM_VOCAB}")])
def test_refuses_a_top_k_below_one_or_beyond_the_vocabulary(tmp_path, make_tokens, make_teachers, k, culprit):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    refused(invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", "--top-k", k), culprit)
    assert not (tmp_path / "t.zarr").exists()


def test_refuses_temperatures_for_a_dense_teacher(tmp_path, make_data, make_teachers):
    toml = make_teachers([{"name": "a"}])
    refused(invoke("infer", "--teachers", toml, "--data", make_data(10), "--out", tmp_path / "s.zarr", "--temperatures", "1,2"), "--temperatures", "'a'")
    assert not (tmp_path / "s.zarr").exists()


def test_refuses_token_data_into_a_rows_store(tmp_path, store_of, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    _refused_untouched(tmp_path, store_of, ("--teachers", toml, "--data", make_tokens(4), "--out", store_of), "holds rows", "is tokens")


def test_refuses_rows_into_a_token_store(tmp_path, token_store, make_data, make_teachers):
    toml = make_teachers([{"name": "a"}])
    _refused_untouched(tmp_path, token_store, ("--teachers", toml, "--data", make_data(10), "--out", token_store), "holds tokens", "is rows")


@pytest.mark.parametrize(("mode", "culprit"), [("last", "returned (4, 40)"), ("short", "expected (4, ")])
def test_refuses_an_lm_returning_b_v_or_another_length(tmp_path, make_tokens, make_teachers, odd_teachers, mode, culprit):
    toml = make_teachers([{"name": "bent", "factory": "mtkd_test_teachers:odd_lm", "kwargs": {"mode": mode}}])
    result = invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr")
    refused(result, "teacher 'bent'", culprit, "(B, L, V)")
    assert not (tmp_path / "t.zarr").exists()


def test_refuses_token_ids_beyond_a_teachers_vocabulary(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "small", "factory": LM["factory"], "kwargs": {"vocab_size": 20, "hidden": 4}}])
    data = make_tokens(4, vocab=LM_VOCAB)
    with np.load(data) as f:  # the first id the teacher cannot embed, sequence by sequence
        ids = np.where(f["attention_mask"] == 1, f["input_ids"], 0)
    seq, pos = (int(i) for i in np.argwhere(ids >= 20)[0])
    result = invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "t.zarr")
    refused(result, "teacher 'small'", f"sequence {seq} holds token id {ids[seq, pos]} at position {pos}", "20 token ids")
    assert not (tmp_path / "t.zarr").exists()


def test_a_token_id_beyond_the_vocabulary_in_a_later_batch_leaves_a_valid_store(tmp_path, make_teachers):
    ids = np.random.default_rng(0).integers(0, 20, (12, 6))
    ids[9, 0] = 33  # in batch 2 (4 sequences a batch), blocks written before it; a first token is no label
    np.savez(tmp_path / "late.npz", input_ids=ids)
    toml = make_teachers([{"name": "small", "factory": LM["factory"], "kwargs": {"vocab_size": 20, "hidden": 4}}])
    args = ("--teachers", toml, "--data", tmp_path / "late.npz", "--out", tmp_path / "t.zarr", "--batch-size", 4, "--chunk-rows", 8)
    refused(invoke("infer", *args), "teacher 'small'", "sequence 9 holds token id 33 at position 0", "valid and resumable")
    store = open_store(tmp_path / "t.zarr")
    assert store.done_blocks("small") and store.missing_blocks("small")
    assert invoke("verify", tmp_path / "t.zarr").exit_code == 0


def test_refuses_labels_at_a_teachers_vocabulary(tmp_path, make_teachers, odd_teachers):
    # every id fits the teacher's embedding (31), but the next token 30 is beyond its 30 classes
    np.savez(tmp_path / "edge.npz", input_ids=np.array([[1, 2, 30, 3]]))
    fits = make_teachers([{"name": "v31", "factory": "mtkd_test_teachers:odd_lm", "kwargs": {"vocab_size": 31}}], filename="fits.toml")
    assert invoke("infer", "--teachers", fits, "--data", tmp_path / "edge.npz", "--out", tmp_path / "ok.zarr", "--quiet").exit_code == 0
    narrow = make_teachers([{"name": "v30", "factory": "mtkd_test_teachers:odd_lm", "kwargs": {"vocab_size": 31, "classes": 30}}], filename="n.toml")
    result = invoke("infer", "--teachers", narrow, "--data", tmp_path / "edge.npz", "--out", tmp_path / "n.zarr", "--top-k", 2)
    refused(result, "has label 30", "teacher 'v30' gives 30 classes")
    assert not (tmp_path / "n.zarr").exists()


@pytest.mark.parametrize(("args", "culprit"), [(("--top-k", "3"), "top-k 4, not --top-k 3"), ((), "top-k 4")])
def test_refuses_a_same_named_teacher_with_another_k_or_layout(tmp_path, token_store, args, culprit):
    if not args:  # dense: a rows-sized vocabulary asked dense is the same teacher stored top-k
        args = ("--top-k", "4", "--temperatures", "1,3")
        culprit = "at temperatures 1,2, not 1,3"
    _refused_untouched(tmp_path, token_store, ("--teachers", tmp_path / "lm.toml", "--data", tmp_path / "tokens.npz", "--out", token_store, *args), "teacher 'lm'", culprit)


def test_refuses_a_dense_teacher_named_like_a_stored_top_k_one(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    data = make_tokens(4)
    assert invoke("infer", "--teachers", toml, "--data", data, "--out", tmp_path / "d.zarr", "--quiet").exit_code == 0  # V = 40: dense
    _refused_untouched(tmp_path, tmp_path / "d.zarr", ("--teachers", toml, "--data", data, "--out", tmp_path / "d.zarr", "--top-k", 4), "teacher 'lm'", "dense, not --top-k 4")


SLOW_LM = {"factory": "mtkd_test_teachers:odd_lm", "kwargs": {"sleep": 0.08}}


def _token_process(tmp_path, out, *extra):
    args = ["--teachers", "lm.toml", "--data", "tokens.npz", "--out", out, "--chunk-rows", "6", "--batch-size", "2", "--top-k", "4", "--quiet"]
    return subprocess.Popen([sys.executable, "-m", "mtkd.pipeline.cli", "infer", *args, *extra], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _token_reference(tmp_path):
    proc = _token_process(tmp_path, "reference.zarr")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return snapshot(tmp_path / "reference.zarr")


@pytest.mark.slow
def test_tokens_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, make_tokens, make_teachers, odd_teachers):
    make_tokens(16)
    make_teachers([{"name": "fast", **LM}, {"name": "slow", **SLOW_LM}], filename="lm.toml")
    expected = _token_reference(tmp_path)
    proc = _token_process(tmp_path, "t.zarr")
    _kill_once_recorded(proc, tmp_path / "t.zarr", 1)
    blocks = open_store(tmp_path / "t.zarr").num_blocks
    assert 1 <= len(os.listdir(tmp_path / "t.zarr/teachers/slow/done/c")) < blocks, "the kill came too late to test anything"
    rerun = _token_process(tmp_path, "t.zarr", "--json")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["blocks_skipped"] >= 1
    assert snapshot(tmp_path / "t.zarr") == expected


@pytest.mark.slow
def test_tokens_three_concurrent_shards_equal_one_run(tmp_path, make_tokens, make_teachers, odd_teachers):
    make_tokens(16)
    make_teachers([{"name": "fast", **LM}, {"name": "slow", **SLOW_LM}], filename="lm.toml")
    expected = _token_reference(tmp_path)
    procs = [_token_process(tmp_path, "t.zarr", "--shard", f"{i}/3") for i in range(3)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert snapshot(tmp_path / "t.zarr") == expected
