"""Stage one as a library call: what lands in the store, resume, shards, adding teachers, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline import infer as infer_module
from mtkd.pipeline.errors import BadInputError, StoreMismatchError, TeacherOutputError
from mtkd.pipeline.infer import Shard, forward_throughput, parse_shard, run_infer
from mtkd.pipeline.metrics import classification_metrics
from mtkd.pipeline.data import load_data
from mtkd.pipeline.specs import load_teacher_specs
from mtkd.pipeline.layouts import Dense, TopK
from mtkd.pipeline.store import open_store
from tests.pipeline.conftest import LM_VOCAB, snapshot


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
    # Recorded block by block from float32 summaries of the stored logits, while they are written.
    for key in ("accuracy", "nll", "ece"):
        assert stats[key] == pytest.approx(expected[key], rel=1e-6)


def test_unlabelled_data_gives_null_stats(tmp_path, make_data, make_teachers):
    run_infer(make_teachers([{"name": "a"}]), str(make_data(20, labelled=False)), tmp_path / "s.zarr", device="cpu")
    stats = open_store(tmp_path / "s.zarr").teacher("a").stats
    assert stats["n"] == 0 and stats["accuracy"] is None


def test_batches_are_not_capped_by_blocks_and_progress_counts_rows(tmp_path, make_data, make_teachers, monkeypatch):
    sizes = []
    original = infer_module.run_teacher

    def counting(name, model, batch, dev):
        sizes.append(len(batch.inputs))
        return original(name, model, batch, dev)

    monkeypatch.setattr(infer_module, "run_teacher", counting)
    calls = []
    result = run_infer(
        make_teachers([{"name": "a"}]), str(make_data(50)), tmp_path / "s.zarr",
        batch_size=16, chunk_rows=6, device="cpu", progress=lambda done, total: calls.append((done, total)),
    )
    assert result.blocks_written == 9 and result.rows == 50
    # batches of 16 rows over blocks of 6: each batch forwarded once (the first by the probe)
    assert sizes == [16, 16, 16, 2]
    assert [d for d, _ in calls] == [0, 16, 32, 48, 50] and {t for _, t in calls} == {50}


def test_loop_time_counts_the_first_batch_forward_and_reduce(tmp_path, make_data, make_teachers, monkeypatch):
    """The probe's batch is reused by the loop: its forward and its per-position work are loop time
    (a one-batch run did all its reduce before the loop started, and loop_s missed it)."""
    import time

    original_rows, original_teacher = infer_module._teacher_rows, infer_module.run_teacher

    def slow_rows(*args, **kwargs):
        time.sleep(0.3)
        return original_rows(*args, **kwargs)

    def slow_teacher(*args, **kwargs):
        time.sleep(0.2)
        return original_teacher(*args, **kwargs)

    monkeypatch.setattr(infer_module, "_teacher_rows", slow_rows)
    monkeypatch.setattr(infer_module, "run_teacher", slow_teacher)
    result = run_infer(make_teachers([{"name": "a"}]), str(make_data(20)), tmp_path / "s.zarr", batch_size=32, device="cpu")
    assert result.rows == 20 and result.loop_s >= 0.5
    assert result.rows_per_s == pytest.approx(20 / result.loop_s)


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
    assert f1.teacher("fresh").weights_sha256 is None
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


# -- tokens ------------------------------------------------------------------------------------------

LM = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}
TF = {"factory": "mtkd.pipeline.models:transformer_lm", "kwargs": {"vocab_size": LM_VOCAB, "d_model": 8, "layers": 1, "heads": 2, "max_len": 16}}


def _sequence_logits(toml, name, data):
    """Each sequence alone, unpadded, through the teacher: (num_rows, V) float64, in store row order."""
    model = next(s for s in load_teacher_specs(toml) if s.name == name).build().eval()
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(data.tokens[a:b])[None])[0].double() for a, b in zip(data.offsets[:-1], data.offsets[1:])])


def test_token_store_holds_the_teachers_own_top_k_from_plain_zarr(tmp_path, make_tokens, make_teachers):
    path = make_tokens(12)
    toml = make_teachers([{"name": "gru", **LM}, {"name": "tf", "seed": 1, **TF}])
    # blocks of 7 positions cut sequences; batches of 5 sequences cut blocks
    result = run_infer(toml, str(path), tmp_path / "t.zarr", top_k=5, temperatures="2,0.5", chunk_rows=7, batch_size=5, device="cpu")
    data = load_data(str(path))
    assert result.kind == "tokens" and result.rows == data.num_rows and result.complete == {"gru": True, "tf": True}
    g = zarr.open_group(tmp_path / "t.zarr", mode="r")
    assert g.attrs["mtkd"]["kind"] == "tokens" and g.attrs["mtkd"]["num_rows"] == data.num_rows
    np.testing.assert_array_equal(g["sequences/offsets"][...], data.offsets)
    np.testing.assert_array_equal(g["labels"][...], data.labels)
    labels = torch.from_numpy(data.labels)
    has = labels >= 0
    for name in ("gru", "tf"):
        z = _sequence_logits(toml, name, data)  # (rows, V)
        t = g[f"teachers/{name}"]
        assert (t.attrs["layout"], t.attrs["top_k"], t.attrs["temperatures"], t.attrs["vocab_size"]) == ("topk", 5, [1.0, 0.5, 2.0], LM_VOCAB)
        ids = torch.from_numpy(t["topk_ids"][...]).long()
        lp = torch.from_numpy(t["topk_logprobs"][...].astype(np.float64))
        lse = torch.from_numpy(t["lse"][...].astype(np.float64))
        label_lp = torch.from_numpy(t["label_logprob"][...].astype(np.float64))
        assert torch.equal(ids, z.topk(5, dim=1).indices.sort(1).values)  # ascending id order
        log_p = torch.log_softmax(z, 1)
        assert torch.allclose(lp, log_p.gather(1, ids), atol=2e-3)  # float16
        for j, temp in enumerate((1.0, 0.5, 2.0)):
            assert torch.allclose(lse[:, j], torch.logsumexp(z / temp, 1), atol=1e-4)
        assert torch.allclose(label_lp[has], log_p[has].gather(1, labels[has, None]).squeeze(1), atol=1e-4)
        assert torch.isnan(label_lp[~has]).all()
        stats = t.attrs["stats"]
        assert stats["n"] == int(has.sum()) and stats["perplexity"] == pytest.approx(np.exp(stats["nll"]))
        assert stats["nll"] == pytest.approx(-float(log_p[has].gather(1, labels[has, None]).mean()), rel=1e-4)
        assert set(stats["tail_mass"]) == {"1", "0.5", "2"}


def test_tokens_are_dense_up_to_1024_classes_and_top_64_beyond(tmp_path, make_tokens, make_teachers):
    small = make_teachers([{"name": "small", **LM}], filename="small.toml")
    run_infer(small, str(make_tokens(4)), tmp_path / "small.zarr", device="cpu")
    assert open_store(tmp_path / "small.zarr").layout("small") == Dense("float16", LM_VOCAB)
    big = make_teachers([{"name": "big", "factory": LM["factory"], "kwargs": {"vocab_size": 1100, "hidden": 4}}], filename="big.toml")
    run_infer(big, str(make_tokens(4, name="big.npz")), tmp_path / "big.zarr", device="cpu")
    assert open_store(tmp_path / "big.zarr").layout("big") == TopK("float16", 1100, 64, (1.0, 2.0))


def test_token_resume_shards_and_added_teacher_are_bit_identical(tmp_path, make_tokens, make_teachers, monkeypatch):
    path = str(make_tokens(10))
    toml = make_teachers([{"name": "gru", **LM}, {"name": "tf", "seed": 1, **TF}])
    options = {"top_k": 4, "chunk_rows": 6, "batch_size": 3, "device": "cpu"}
    run_infer(toml, path, tmp_path / "one.zarr", **options)
    for i in range(3):
        run_infer(toml, path, tmp_path / "sharded.zarr", shard=f"{i}/3", **options)
    assert snapshot(tmp_path / "sharded.zarr") == snapshot(tmp_path / "one.zarr")
    only_gru = make_teachers([{"name": "gru", **LM}], filename="gru.toml")
    run_infer(only_gru, path, tmp_path / "added.zarr", **options)
    result = run_infer(toml, path, tmp_path / "added.zarr", **options)
    assert result.skipped_teachers == ["gru"] and result.teachers == ["tf"]
    assert snapshot(tmp_path / "added.zarr") == snapshot(tmp_path / "one.zarr")


def test_teachers_of_different_vocabularies_share_a_sparse_store(tmp_path, make_tokens, make_teachers):
    wide = {"factory": LM["factory"], "kwargs": {"vocab_size": LM_VOCAB + 9, "hidden": 8}}
    toml = make_teachers([{"name": "a", **LM}, {"name": "wide", **wide}])
    run_infer(toml, str(make_tokens(6)), tmp_path / "t.zarr", top_k=3, device="cpu")
    store = open_store(tmp_path / "t.zarr")
    assert [store.layout(n).vocab_size for n in ("a", "wide")] == [LM_VOCAB, LM_VOCAB + 9]
    assert store.num_classes == LM_VOCAB + 9 and store.read_topk("wide", 0, 5).ids.shape == (5, 3)


def test_a_hugging_face_teacher_from_a_local_directory(tmp_path, make_tokens):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=LM_VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "models" / "tiny")  # nothing is ever downloaded
    (tmp_path / "hf.toml").write_text(
        '[[teachers]]\nname = "tiny"\nfactory = "transformers:AutoModelForCausalLM.from_pretrained"\n'
        'kwargs = { pretrained_model_name_or_path = "models/tiny" }\n'
    )
    path = make_tokens(6)
    run_infer(tmp_path / "hf.toml", str(path), tmp_path / "t.zarr", top_k=4, batch_size=4, device="cpu")
    store = open_store(tmp_path / "t.zarr")
    data = load_data(str(path))
    with torch.inference_mode():  # each sequence alone: the padded batch's mask made no difference
        z = torch.cat([model(torch.from_numpy(data.tokens[a:b])[None]).logits[0] for a, b in zip(data.offsets[:-1], data.offsets[1:])])
    sparse = store.read_topk("tiny", 0, data.num_rows)
    assert torch.equal(sparse.ids, z.topk(4, 1).indices.sort(1).values)
    assert torch.allclose(sparse.logprobs, torch.log_softmax(z.double(), 1).gather(1, sparse.ids).float(), atol=2e-3)
    info = store.teacher("tiny")
    spec = load_teacher_specs(tmp_path / "hf.toml")[0]
    assert info.weights_sha256 == spec.weights_sha256() and {p.name for p in spec.weight_files()} >= {"config.json", "model.safetensors"}
    # other weights under the same name are refused, the store untouched
    before = snapshot(tmp_path / "t.zarr")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(tmp_path / "models" / "tiny")
    with pytest.raises(StoreMismatchError, match="teacher 'tiny'.*models/tiny"):
        run_infer(tmp_path / "hf.toml", str(path), tmp_path / "t.zarr", top_k=4, device="cpu")
    assert snapshot(tmp_path / "t.zarr") == before


def test_a_run_directory_teacher_is_its_student(tmp_path, make_data, make_teachers):
    toml = make_teachers([{"name": "a"}])
    spec = load_teacher_specs(toml)[0]
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"student": spec.to_dict()}))
    shutil.copy(spec.checkpoint, run / "student.pt")
    (tmp_path / "run.toml").write_text('[[teachers]]\nname = "a"\nrun = "runs/a"\n')
    data = str(make_data(20))
    run_infer(toml, data, tmp_path / "direct.zarr", device="cpu")
    run_infer(tmp_path / "run.toml", data, tmp_path / "via-run.zarr", device="cpu")
    direct, via = open_store(tmp_path / "direct.zarr"), open_store(tmp_path / "via-run.zarr")
    assert torch.equal(direct.read_logits("a", 0, 20), via.read_logits("a", 0, 20))
    assert direct.teacher("a").weights_sha256 == via.teacher("a").weights_sha256
    assert via.teacher("a").spec["run"] == str(run)
