"""Stage one with --tail-samples: the sampled tail in the store, bit-identical across shards and
resumes, draws independent of the batch size, readable with plain zarr, covered by verify, and
trained on by stage two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline.advice import report_warnings, training_warnings
from mtkd.pipeline.data import load_data
from mtkd.pipeline.errors import BadInputError, StoreMismatchError
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.layouts import SampledTopK
from mtkd.pipeline.loader import TeacherRows
from mtkd.pipeline.report import inspect_store
from mtkd.pipeline.specs import load_teacher_specs
from mtkd.pipeline.store import open_store
from mtkd.pipeline.verify import verify_store
from tests.pipeline.conftest import LM_VOCAB, snapshot
from tests.pipeline.test_train import sparse_kd_of, train_lm
from tests.pipeline.token_world import token_world  # noqa: F401 (a fixture)

LM = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}
OPTIONS = {"top_k": 4, "tail_samples": 6, "chunk_rows": 6, "batch_size": 3, "device": "cpu"}


@pytest.fixture
def lm_toml(make_teachers):
    return make_teachers([{"name": "gru", **LM}, {"name": "other", **LM, "seed": 1}])


def _sequence_logits(toml, name, data):
    model = next(s for s in load_teacher_specs(toml) if s.name == name).build().eval()
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(data.tokens[a:b])[None])[0].double() for a, b in zip(data.offsets[:-1], data.offsets[1:])])


def test_plain_zarr_reads_the_samples_and_they_are_the_teachers(tmp_path, make_tokens, lm_toml):
    path = make_tokens(10)
    run_infer(lm_toml, str(path), tmp_path / "s.zarr", seed=5, **OPTIONS)
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    data = load_data(str(path))
    for name in ("gru", "other"):
        t = g[f"teachers/{name}"]
        assert (t.attrs["layout"], t.attrs["top_k"], t.attrs["tail_samples"], t.attrs["tail_seed"]) == ("topk", 4, 6, 5)
        ids, lp = t["tail_ids"][...], t["tail_logprobs"][...]
        assert ids.shape == lp.shape == (data.num_rows, 6) and ids.dtype == np.int32 and lp.dtype == np.float16
        assert (np.diff(ids, axis=1) >= 0).all()
        assert not (ids[:, :, None] == t["topk_ids"][...][:, None, :]).any()  # never a listed class
        log_p = torch.log_softmax(_sequence_logits(lm_toml, name, data), 1)
        assert torch.allclose(torch.from_numpy(lp.astype(np.float64)), log_p.gather(1, torch.from_numpy(ids).long()), atol=3e-3)
        for a in ("tail_ids", "tail_logprobs"):
            assert "crc32c" in [c["name"] for c in t[a].metadata.to_dict()["codecs"]]
    assert (g["teachers/gru/tail_ids"][...] != g["teachers/other/tail_ids"][...]).any()  # each teacher its own draws


def test_shards_resume_and_added_teachers_are_bit_identical(tmp_path, make_tokens, make_teachers, lm_toml):
    path = str(make_tokens(10))
    run_infer(lm_toml, path, tmp_path / "one.zarr", **OPTIONS)
    for i in range(3):
        run_infer(lm_toml, path, tmp_path / "sharded.zarr", shard=f"{i}/3", **OPTIONS)
    assert snapshot(tmp_path / "sharded.zarr") == snapshot(tmp_path / "one.zarr")
    run_infer(lm_toml, path, tmp_path / "resumed.zarr", shard="1/4", **OPTIONS)  # a partial store, resumed
    run_infer(lm_toml, path, tmp_path / "resumed.zarr", **{**OPTIONS, "tail_samples": 0})  # 0: the stored layout
    assert snapshot(tmp_path / "resumed.zarr") == snapshot(tmp_path / "one.zarr")
    only_gru = make_teachers([{"name": "gru", **LM}], filename="gru.toml")
    run_infer(only_gru, path, tmp_path / "added.zarr", **OPTIONS)
    assert run_infer(lm_toml, path, tmp_path / "added.zarr", **OPTIONS).teachers == ["other"]
    assert snapshot(tmp_path / "added.zarr") == snapshot(tmp_path / "one.zarr")


def test_the_draws_do_not_depend_on_the_batch_size(tmp_path, make_tokens, lm_toml):
    # The teacher's own logits may differ in their last bits between batchings (its matmuls): the
    # draws do not (layouts' test holds the whole rows bit-identical for equal logits).
    path = str(make_tokens(10))
    for b in (3, 7):
        run_infer(lm_toml, path, tmp_path / f"b{b}.zarr", **{**OPTIONS, "batch_size": b})
    three, seven = (zarr.open_group(tmp_path / f"b{b}.zarr", mode="r") for b in (3, 7))
    for name in ("gru", "other"):
        np.testing.assert_array_equal(three[f"teachers/{name}/tail_ids"][...], seven[f"teachers/{name}/tail_ids"][...])
        np.testing.assert_allclose(three[f"teachers/{name}/tail_logprobs"][...], seven[f"teachers/{name}/tail_logprobs"][...], atol=2e-3)


def test_pure_sampling_and_the_reader_give_targets_of_mass_one(tmp_path, make_tokens, lm_toml):
    path = str(make_tokens(8))
    run_infer(lm_toml, path, tmp_path / "k0.zarr", **{**OPTIONS, "top_k": 0, "tail_samples": 8})
    store = open_store(tmp_path / "k0.zarr")
    assert store.layout("gru") == SampledTopK("float16", LM_VOCAB, 0, (1.0, 2.0), 8, 0)
    assert zarr.open_group(tmp_path / "k0.zarr", mode="r")["teachers/gru/topk_ids"].shape == (store.num_rows, 0)
    rows = TeacherRows(store, ["gru", "other"], 2.0).read(0, store.num_rows)
    assert rows["ids"].shape == (2, store.num_rows, 8)
    mass = rows["logprobs"].double().exp().sum(-1)
    assert (mass - 1).abs().max() < 1e-5
    assert verify_store(store.path).clean
    report = inspect_store(store)
    assert all(t["tail_samples"] == 8 and t["bytes_per_row"] > 0 for t in report["teachers"])
    # Every class is tail here, but the samples teach it: no "outside its stored top-k" warning.
    tail_warnings = [w for w in training_warnings(store, store.teachers, 1.0) + report_warnings(report, store.labels(), 1.0)
                     if "outside its stored top-k" in w]
    assert tail_warnings == []


def test_a_head_and_tail_store_mixes_with_a_plain_top_k_teacher(tmp_path, make_tokens, make_teachers):
    path = str(make_tokens(8))
    run_infer(make_teachers([{"name": "plain", **LM}], filename="p.toml"), path, tmp_path / "s.zarr", top_k=4, chunk_rows=6, device="cpu")
    run_infer(make_teachers([{"name": "sampled", **LM, "seed": 1}], filename="s.toml"), path, tmp_path / "s.zarr",
              top_k=4, tail_samples=5, device="cpu")
    store = open_store(tmp_path / "s.zarr")
    rows = TeacherRows(store, ["plain", "sampled"], 1.0).read(0, store.num_rows)
    assert rows["ids"].shape == (2, store.num_rows, 9)  # the plain teacher padded to the widest target
    assert float(rows["logprobs"][1].double().exp().sum(-1).sub(1).abs().max()) < 1e-5
    assert float(rows["logprobs"][0].double().exp().sum(-1).max()) < 1  # top-k alone keeps its tail bucket


def test_verify_covers_the_samples(tmp_path, make_tokens, lm_toml):
    run_infer(lm_toml, str(make_tokens(8)), tmp_path / "s.zarr", **OPTIONS)
    store = open_store(tmp_path / "s.zarr")
    assert verify_store(store.path).clean
    g = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    g["teachers/gru/tail_ids"][2, 1] = LM_VOCAB + 3  # rewritten through zarr: the checksum is valid
    g["teachers/other/tail_logprobs"][7, 0] = np.nan
    findings = verify_store(tmp_path / "s.zarr").findings
    assert {(f.teacher, f.kind, f.block) for f in findings} == {("gru", "invalid", 0), ("other", "non-finite", 1)}
    assert any("tail_ids outside [0, 40) at row 2" in f.message for f in findings)
    assert any("tail_logprobs" in f.message for f in findings)


@pytest.mark.parametrize(("options", "culprit"), [
    ({"tail_samples": -1}, "--tail-samples must be at least 0"),
    ({"top_k": 0, "tail_samples": 0}, "--top-k must be at least 1 (0 only with --tail-samples)"),
    ({"top_k": None}, "--tail-samples applies to top-k teachers only"),
    ({"top_k": LM_VOCAB}, "nothing is left to sample"),
    ({"seed": -3}, "--seed must lie in"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, make_tokens, lm_toml, options, culprit):
    with pytest.raises(BadInputError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        run_infer(lm_toml, str(make_tokens(4)), tmp_path / "s.zarr", **{**OPTIONS, **options})
    assert not (tmp_path / "s.zarr").exists()


def test_a_stored_teacher_resumes_only_with_its_own_draws(tmp_path, make_tokens, lm_toml):
    path = str(make_tokens(6))
    run_infer(lm_toml, path, tmp_path / "s.zarr", shard="0/2", seed=3, **OPTIONS)
    before = snapshot(tmp_path / "s.zarr")
    for options, culprit in (({"tail_samples": 7}, "6 tail samples, not --tail-samples 7"), ({"seed": 4}, "drawn with --seed 3, not 4")):
        with pytest.raises(StoreMismatchError, match=culprit):
            run_infer(lm_toml, path, tmp_path / "s.zarr", **{**OPTIONS, "seed": 3, **options})
    assert snapshot(tmp_path / "s.zarr") == before


@pytest.fixture(scope="module")
def sampled_world(token_world, tmp_path_factory):  # noqa: F811
    """token_world's teachers and data in a top-4 + 8 samples store."""
    import types

    store = tmp_path_factory.mktemp("sampled") / "store.zarr"
    run_infer(token_world.teachers, str(token_world.data["train"]), store, top_k=4, tail_samples=8, temperatures="1,2",
              device="cpu", chunk_rows=token_world.chunk_rows)
    return types.SimpleNamespace(store=store, student=token_world.student, data=token_world.data)


@pytest.mark.parametrize("fusion", ["mean", "weighted", "confidence", "vote"])
def test_every_fusion_distils_from_a_sampled_store(sampled_world, token_world, tmp_path, fusion):  # noqa: F811
    out = tmp_path / "run"
    weights = {"g1": 1.0, "g2": 0.0, "g3": 0.0} if fusion == "weighted" else None
    train_lm(sampled_world, out, fusion=fusion, teacher_weights=weights, temperature=2.0, epochs=2)
    # Measured against the teachers' top-8 store: the student moved towards the teachers.
    before = sparse_kd_of(token_world, None, fusion=fusion, temperature=2.0)
    after = sparse_kd_of(token_world, out, fusion=fusion, temperature=2.0)
    # Two epochs: measured 0.7-0.8 of the fresh student's loss, vote 0.92 (with the tails' estimates
    # voting in place of the teachers' exact top-1, vote's loss rose).
    assert np.isfinite(after) and after < (0.95 if fusion == "vote" else 0.9) * before, (before, after)
