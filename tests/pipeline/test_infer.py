"""Stage one as a library call: what lands in the store, resume, shards, adding teachers, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkd.pipeline import infer as infer_module
from mtkd.pipeline.errors import BadInputError, TeacherOutputError
from mtkd.pipeline.infer import Shard, forward_throughput, parse_shard, run_infer
from mtkd.pipeline.metrics import classification_metrics
from mtkd.pipeline.specs import load_data, load_teacher_specs
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import snapshot


# TorchScript is deprecated by recent torch but is a model format SPEC accepts.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

def _teacher_logits(toml, name, x):
    spec = next(s for s in load_teacher_specs(toml) if s.name == name)
    with torch.inference_mode():
        return spec.build().eval()(torch.from_numpy(x)).float()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_logits_are_the_teachers_outputs_in_the_stored_dtype(tmp_path, make_data, make_teachers, dtype):
    data = make_data(50)
    toml = make_teachers([{"name": "a"}, {"name": "b", "seed": 1}])
    result = run_infer(toml, str(data), tmp_path / "s.zarr", batch_size=64, dtype=dtype, device="cpu")
    assert result.teachers == ["a", "b"] and result.rows == 50 and result.complete == {"a": True, "b": True}
    store = open_store(tmp_path / "s.zarr")
    x = np.load(data)["x"]
    for name in ("a", "b"):
        info = store.teacher(name)
        assert info.complete and info.dtype == dtype and info.spec["name"] == name
        stored = store.read_logits(name, 0, 50)
        # One batch holds all 50 rows, so the stored logits are the forward's, rounded once.
        expected = _teacher_logits(toml, name, x).to(stored.dtype)
        bits = torch.int32 if dtype == "float32" else torch.int16
        assert torch.equal(stored.view(bits), expected.view(bits))


def test_stats_are_the_metrics_of_the_stored_logits(tmp_path, make_data, make_teachers):
    data = make_data(90)
    run_infer(make_teachers([{"name": "a"}]), str(data), tmp_path / "s.zarr", chunk_rows=16, device="cpu")
    store = open_store(tmp_path / "s.zarr")
    expected = classification_metrics(torch.log_softmax(store.read_logits("a", 0, 90).double(), 1), torch.from_numpy(store.labels()))
    stats = store.teacher("a").stats
    assert stats["n"] == expected["n"] == int((store.labels() != -100).sum())
    for key in ("accuracy", "nll", "ece", "f1_macro"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-12)


def test_unlabelled_data_gives_null_stats(tmp_path, make_data, make_teachers):
    run_infer(make_teachers([{"name": "a"}]), str(make_data(20, labelled=False)), tmp_path / "s.zarr", device="cpu")
    stats = open_store(tmp_path / "s.zarr").teacher("a").stats
    assert stats["n"] == 0 and stats["accuracy"] is None


def test_batches_never_straddle_blocks_and_progress_counts_rows(tmp_path, make_data, make_teachers):
    calls = []
    result = run_infer(
        make_teachers([{"name": "a"}]), str(make_data(50)), tmp_path / "s.zarr",
        batch_size=8, chunk_rows=12, device="cpu", progress=lambda done, total: calls.append((done, total)),
    )
    assert result.blocks_written == 5 and result.rows == 50
    # blocks of 12 rows in batches of 8: 8, 4 per block, then the last block of 2 rows
    assert [d for d, _ in calls] == [0, 8, 12, 20, 24, 32, 36, 44, 48, 50]
    assert {t for _, t in calls} == {50}


def test_rerun_skips_everything_and_changes_nothing(tmp_path, make_data, make_teachers):
    data, toml = make_data(40), make_teachers([{"name": "a"}])
    run_infer(toml, str(data), tmp_path / "s.zarr", chunk_rows=8, device="cpu")
    before = snapshot(tmp_path / "s.zarr")
    again = run_infer(toml, str(data), tmp_path / "s.zarr", chunk_rows=8, device="cpu")
    assert again.teachers == [] and again.skipped_teachers == ["a"] and again.rows == 0
    assert snapshot(tmp_path / "s.zarr") == before


def test_shards_one_after_another_equal_one_run(tmp_path, make_data, make_teachers):
    data, toml = make_data(70), make_teachers([{"name": "a"}, {"name": "b", "seed": 3}])
    run_infer(toml, str(data), tmp_path / "one.zarr", chunk_rows=8, batch_size=5, device="cpu")
    results = [
        run_infer(toml, str(data), tmp_path / "many.zarr", chunk_rows=8, batch_size=5, device="cpu", shard=Shard(i, 3))
        for i in (2, 0, 1)
    ]
    assert [r.blocks_written for r in results] == [3, 3, 3]  # 9 blocks of 8 rows
    assert [r.complete["a"] for r in results] == [False, False, True]  # the last shard finishes the teacher
    assert snapshot(tmp_path / "many.zarr") == snapshot(tmp_path / "one.zarr")


def test_resume_after_an_interrupted_run_is_bit_identical(tmp_path, make_data, make_teachers):
    data, toml = make_data(70), make_teachers([{"name": "a"}])
    run_infer(toml, str(data), tmp_path / "one.zarr", chunk_rows=8, device="cpu")
    run_infer(toml, str(data), tmp_path / "two.zarr", chunk_rows=8, device="cpu", shard="1/4")  # a partial store
    store = open_store(tmp_path / "two.zarr")
    assert store.missing_blocks("a") == [0, 2, 3, 4, 6, 7, 8]
    resumed = run_infer(toml, str(data), tmp_path / "two.zarr", chunk_rows=8, device="cpu")
    assert resumed.blocks_written == 7 and resumed.blocks_skipped == 2
    assert snapshot(tmp_path / "two.zarr") == snapshot(tmp_path / "one.zarr")


def test_adding_a_teacher_computes_only_that_teacher(tmp_path, make_data, make_teachers, monkeypatch):
    data = make_data(30)
    run_infer(make_teachers([{"name": "a"}], filename="first.toml"), str(data), tmp_path / "s.zarr", device="cpu")
    a_before = {k: v for k, v in snapshot(tmp_path / "s.zarr").items() if k.startswith("teachers/a/")}
    loaded = []
    real_load = infer_module.load_teacher
    monkeypatch.setattr(infer_module, "load_teacher", lambda spec, dev: loaded.append(spec.name) or real_load(spec, dev))
    both = make_teachers([{"name": "a"}, {"name": "b", "seed": 2}], filename="both.toml")
    result = run_infer(both, str(data), tmp_path / "s.zarr", device="cpu")
    assert loaded == ["b"]  # a: not even built
    assert result.teachers == ["b"] and result.skipped_teachers == ["a"]
    store = open_store(tmp_path / "s.zarr")
    assert store.teachers == ["a", "b"] and store.teacher("b").complete
    assert {k: v for k, v in snapshot(tmp_path / "s.zarr").items() if k.startswith("teachers/a/")} == a_before


def test_torchscript_and_factory_only_teachers(tmp_path, make_data, make_teachers):
    data = make_data(20)
    (tmp_path / "f.toml").write_text('[[teachers]]\nname = "fresh"\nfactory = "mtkd.pipeline.models:mlp"\n'
                                     "kwargs = { in_features = 8, hidden = [4], num_classes = 3 }\n")
    ts = make_teachers([{"name": "ts", "torchscript": True}], filename="ts.toml")
    run_infer(ts, str(data), tmp_path / "ts.zarr", device="cpu")
    assert open_store(tmp_path / "ts.zarr").teacher("ts").complete
    # A factory without checkpoint starts from a fixed seed: two runs (or two shards) agree.
    run_infer(tmp_path / "f.toml", str(data), tmp_path / "f1.zarr", device="cpu")
    run_infer(tmp_path / "f.toml", str(data), tmp_path / "f2.zarr", device="cpu")
    f1, f2 = open_store(tmp_path / "f1.zarr"), open_store(tmp_path / "f2.zarr")
    assert f1.teacher("fresh").checkpoint_sha256 is None
    assert torch.equal(f1.read_logits("fresh", 0, 20), f2.read_logits("fresh", 0, 20))


def test_nan_mid_run_stops_before_recording_its_block(tmp_path, make_data, make_teachers, odd_teachers):
    data = make_data(40, nan_row=21)
    toml = make_teachers([{"name": "ok"}, {"name": "odd", "factory": "mtkd_test_teachers:odd", "kwargs": {"mode": "nan"}}])
    with pytest.raises(TeacherOutputError, match=r"teacher 'odd' returned NaN/inf at row 21"):
        run_infer(toml, str(data), tmp_path / "s.zarr", chunk_rows=8, batch_size=4, device="cpu")
    store = open_store(tmp_path / "s.zarr")
    assert 2 in store.missing_blocks("odd") and 2 in store.missing_blocks("ok")
    assert {0, 1} <= store.done_blocks("odd")  # blocks handed to the writer before the NaN are kept
    assert not store.teacher("odd").complete


def test_fp16_overflow_counts_as_inf(tmp_path, make_data, make_teachers, odd_teachers):
    toml = make_teachers([{"name": "big", "factory": "mtkd_test_teachers:odd"}])
    state = torch.load(tmp_path / "big.pt")
    state["linear.bias"] += 1e6  # fine in float32, inf in float16
    torch.save(state, tmp_path / "big.pt")
    with pytest.raises(TeacherOutputError, match="'big' returned NaN/inf at row 0"):
        run_infer(toml, str(make_data(10)), tmp_path / "s.zarr", device="cpu")
    assert not (tmp_path / "s.zarr").exists()
    run_infer(toml, str(make_data(10)), tmp_path / "s32.zarr", device="cpu", dtype="float32")


def test_parse_shard():
    assert parse_shard("0/1") == Shard(0, 1) and parse_shard("3/8") == Shard(3, 8)
    assert [b for b in range(10) if parse_shard("1/3").owns(b)] == [1, 4, 7]
    for bad in ("", "1", "3/3", "-1/2", "a/b", "0/0", "1/2/3"):
        with pytest.raises(BadInputError, match="--shard"):
            parse_shard(bad)


def test_data_may_be_passed_loaded(tmp_path, make_data, make_teachers):
    data = load_data(str(make_data(10)))
    specs = load_teacher_specs(make_teachers([{"name": "a"}]))
    result = run_infer(specs, data, tmp_path / "s.zarr", device="cpu")
    assert result.complete == {"a": True}
    assert forward_throughput(specs, data, batch_size=4, device="cpu") > 0
