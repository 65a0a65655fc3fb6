"""What `mtkd inspect` computes, checked against the plain metrics on the whole arrays."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.pipeline.metrics import RunningMetrics, agreement, classification_metrics, fuse_log_probs
from mtkd.pipeline.data import make_row_data
from mtkd.pipeline.infer import write_logits_block
from mtkd.pipeline.layouts import Dense
from mtkd.pipeline.report import StatsSums, inspect_store, teacher_stats
from mtkd.pipeline.store import create_store

N, V, CHUNK = 30, 4, 8  # blocks: 0..7, 8..15, 16..23, 24..29


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_running_metrics_equal_the_metrics_of_everything_at_once(seed, cuts):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(40, 5, generator=g, dtype=torch.float64) * 3, 1)
    labels = torch.randint(0, 5, (40,), generator=g)
    labels[torch.rand(40, generator=g) < 0.2] = -100
    running = RunningMetrics(5)
    edges = [0, *sorted(cuts), 40]
    for start, stop in zip(edges, edges[1:]):
        running.update(log_probs[start:stop], labels[start:stop])
    got, expected = running.result(), classification_metrics(log_probs, labels)
    assert got["n"] == expected["n"]
    for key in expected:
        if expected["n"]:
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def _filled_store(tmp: Path, complete=("a", "b"), partial=("c",)):
    rng = np.random.default_rng(0)
    y = rng.integers(0, V, N)
    y[:3] = -100
    store, _ = create_store(tmp / "s.zarr", data=make_row_data("d", rng.standard_normal((N, 2)), y), num_classes=V, chunk_rows=CHUNK)
    logits = {}
    for i, name in enumerate((*complete, *partial)):
        layout = Dense("float32", V)
        store.add_teacher(name, spec={}, weights_sha256=None, layout=layout, stats_width=StatsSums.width(layout))
        logits[name] = torch.from_numpy(rng.standard_normal((N, V)).astype(np.float32) * (i + 1))
        blocks = range(store.num_blocks) if name in complete else (1, 3)
        for block in blocks:
            start, stop = store.block_range(block)
            write_logits_block(store, name, block, logits[name][start:stop].clone(), torch.from_numpy(y[start:stop]))
    return store, logits, torch.from_numpy(y)


def test_inspect_matches_the_metrics_of_whole_arrays(tmp_path):
    store, logits, y = _filled_store(tmp_path)
    report = inspect_store(store)
    assert report["num_rows"] == N and report["labelled_rows"] == N - 3 and report["num_blocks"] == 4
    by_name = {t["name"]: t for t in report["teachers"]}
    assert [t["name"] for t in report["teachers"]] == ["a", "b", "c"]
    for name in ("a", "b"):
        expected = classification_metrics(logits[name].double().log_softmax(1), y)
        assert by_name[name]["complete"] and by_name[name]["rows_complete"] == N and by_name[name]["dtype"] == "float32"
        assert by_name[name]["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
        assert by_name[name]["metrics"]["nll"] == pytest.approx(expected["nll"])
        assert by_name[name]["metrics"]["ece"] == pytest.approx(expected["ece"])
    # c wrote blocks 1 and 3: rows 8..15 and 24..29
    rows_c = torch.cat([torch.arange(8, 16), torch.arange(24, 30)])
    assert not by_name["c"]["complete"] and by_name["c"]["rows_complete"] == 14 and by_name["c"]["blocks_complete"] == 2
    expected_c = classification_metrics(logits["c"][rows_c].double().log_softmax(1), y[rows_c])
    assert by_name["c"]["metrics"]["nll"] == pytest.approx(expected_c["nll"])

    fused = fuse_log_probs(torch.stack([logits["a"], logits["b"]]))
    assert report["ensemble"]["teachers"] == ["a", "b"]
    assert report["ensemble"]["metrics"]["accuracy"] == pytest.approx(classification_metrics(fused, y)["accuracy"])
    assert report["ensemble"]["metrics"]["nll"] == pytest.approx(classification_metrics(fused, y)["nll"])

    pairs = {(p["a"], p["b"]): p for p in report["agreement"]}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert pairs[("a", "b")]["agreement"] == pytest.approx(agreement(logits["a"].argmax(1), logits["b"].argmax(1)))
    assert pairs[("a", "c")]["rows"] == 14
    assert pairs[("a", "c")]["agreement"] == pytest.approx(agreement(logits["a"][rows_c].argmax(1), logits["c"][rows_c].argmax(1)))


def test_inspect_without_complete_teachers_has_no_ensemble(tmp_path):
    store, _, _ = _filled_store(tmp_path, complete=(), partial=("c",))
    report = inspect_store(store)
    assert report["ensemble"] is None and report["agreement"] == []


def test_teacher_stats_need_a_complete_teacher(tmp_path):
    store, logits, y = _filled_store(tmp_path)
    stats = teacher_stats(store, "a")
    assert stats["accuracy"] == pytest.approx(classification_metrics(logits["a"].double().log_softmax(1), y)["accuracy"])
    with pytest.raises(Exception, match="teacher 'c' is missing"):
        teacher_stats(store, "c")


def test_inspect_empty_store():
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = create_store(Path(tmp) / "s.zarr", data=make_row_data("d", np.zeros((3, 1))), num_classes=2, chunk_rows=3)
        report = inspect_store(store)
        assert report["teachers"] == [] and report["ensemble"] is None and report["labelled_rows"] == 0


# -- complementary teachers (v3): who is best where, and the ensemble under each fusion ---------------


def _selection_reference(z: np.ndarray, labels: np.ndarray, offsets: np.ndarray | None, fusions: list[str]):
    """The inspect report's "selection" from (K, N, V) float64 logits, written out with numpy."""
    from .test_fusion import reference_weights

    k = z.shape[0]
    z = z.astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    keep = labels != -100
    rows = np.flatnonzero(keep)
    score = logp[:, rows, labels[rows]]  # (K, n)
    out = {"best_rows": np.bincount(score.argmax(0), minlength=k) / len(rows), "nll": {}}
    for fusion in fusions:
        w = np.full((len(rows), k), 1 / k) if fusion == "mean" else reference_weights(fusion, z, labels, np.ones(k), 1.0)[rows]
        out["nll"][fusion] = -np.log((w * np.exp(score.T)).sum(1)).mean()
        out.setdefault("accuracy", {})[fusion] = float(((w.T[:, :, None] * np.exp(logp[:, rows])).sum(0).argmax(1) == labels[rows]).mean())
    if offsets is not None:
        seq = np.searchsorted(offsets, rows, side="right") - 1
        sums = np.zeros((k, len(offsets) - 1))
        for j in range(k):
            np.add.at(sums[j], seq, score[j])
        has = np.bincount(seq, minlength=len(offsets) - 1) > 0
        best = sums[:, has].argmax(0)
        out["best_sequences"] = np.bincount(best, minlength=k) / has.sum()
        out["nll"]["best_sequence"] = -sums[:, has][best, np.arange(len(best))].sum() / len(rows)
    return out


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_inspect_shows_which_teacher_is_best_and_the_ensemble_under_each_fusion(tmp_path, kind):
    from .test_fusion import NAMES, token_store

    store, data, z = token_store(tmp_path, kind)
    selection = inspect_store(store)["selection"]
    expected = _selection_reference(z, data.labels, data.offsets, ["mean", "posterior", "best", "entropy"])
    assert selection["teachers"] == list(NAMES) and selection["rows"] == int((data.labels != -100).sum())
    assert selection["sequences"] == 6  # the two 1-token sequences have no labelled position
    np.testing.assert_allclose([selection["best_rows"][t] for t in NAMES], expected["best_rows"], rtol=0, atol=1e-12)
    np.testing.assert_allclose([selection["best_sequences"][t] for t in NAMES], expected["best_sequences"], rtol=0, atol=1e-12)
    assert set(selection["fusions"]) == {"mean", "posterior", "best", "entropy", "best_sequence"}
    for fusion, nll in expected["nll"].items():
        got = selection["fusions"][fusion]
        assert got["nll"] == pytest.approx(nll, rel=1e-5), fusion
        assert got["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5), fusion
        if kind == "dense" and fusion in expected["accuracy"]:
            assert got["accuracy"] == pytest.approx(expected["accuracy"][fusion], abs=1e-12), fusion
    # knowing the label, best per row is at least as good as the mean and as one teacher a sequence
    fused = selection["fusions"]
    assert fused["best"]["nll"] <= min(fused["mean"]["nll"], fused["best_sequence"]["nll"], fused["posterior"]["nll"])


def test_inspect_of_rows_and_of_teachers_without_entropies(tmp_path):
    from .test_fusion import NAMES, row_store

    store, data, z = row_store(tmp_path, entropy=False)
    selection = inspect_store(store)["selection"]
    expected = _selection_reference(z, data.labels, None, ["mean", "posterior", "best"])
    assert set(selection["fusions"]) == {"mean", "posterior", "best"}  # no entropies stored: no entropy fusion
    assert "best_sequences" not in selection
    np.testing.assert_allclose([selection["best_rows"][t] for t in NAMES], expected["best_rows"], rtol=0, atol=1e-12)
    for fusion, nll in expected["nll"].items():
        assert selection["fusions"][fusion]["nll"] == pytest.approx(nll, rel=1e-5), fusion
        assert selection["fusions"][fusion]["accuracy"] == pytest.approx(expected["accuracy"][fusion], abs=1e-12), fusion
