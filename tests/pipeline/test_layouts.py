"""The dense and top-k layouts: what a batch of logits becomes, and what a read gives back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline import layouts
from mtkd.pipeline.layouts import Dense, TopK, from_storage, normalisers, parse_temperatures, retemper, to_storage, top_k


def _logits(n=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * 3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_reduce_against_a_float64_reference(dtype):
    z = _logits()
    labels = torch.tensor([0, 3, -100, 10, 5, -100])
    layout = TopK(dtype, 11, 4, (1.0, 0.5, 3.0))
    arrays, summary = layout.reduce(z.float(), labels)
    ref_lp = torch.log_softmax(z, 1)
    top = ref_lp.topk(4, 1)
    ids, order = top.indices.sort(1)  # stored in ascending id order
    top = torch.return_types.topk((top.values.gather(1, order), ids))
    assert torch.equal(arrays["topk_ids"].long(), top.indices) and arrays["topk_ids"].dtype == torch.int32
    tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-5}[dtype]
    assert torch.allclose(arrays["topk_logprobs"].double(), top.values, rtol=tol, atol=tol)
    for j, t in enumerate(layout.temperatures):
        assert torch.allclose(arrays["lse"][:, j].double(), torch.logsumexp(z / t, 1), atol=1e-5)
    has = labels >= 0
    assert torch.allclose(arrays["label_logprob"][has].double(), ref_lp[has].gather(1, labels[has, None]).squeeze(1), atol=1e-5)
    assert torch.isnan(arrays["label_logprob"][~has]).all()
    # the summary: top-1 and the tail mass at each stored temperature
    assert torch.equal(summary.top1, ref_lp.argmax(1))
    for j, t in enumerate(layout.temperatures):
        p = torch.softmax(z / t, 1).gather(1, top.indices)
        assert torch.allclose(summary.tail[:, j].double(), 1 - p.sum(1), atol=5 * tol)


@pytest.mark.parametrize("vocab", [300, 2053, 4099])  # below the grouping threshold; 2053 % 8 and 4099 % 8 left over
def test_top_k_gives_torch_topk_values_and_ids(vocab):
    g = torch.Generator().manual_seed(vocab)
    z = torch.randperm(40 * vocab, generator=g).view(40, vocab).float() / 7  # distinct values: ids are unique
    z[3] = -float("inf")
    z[3, [5, vocab - 1]] = 1.0  # -inf ties fill the rest of this row: values still equal topk's
    z[4, vocab - 3 :] += 1e6  # the largest values among the classes left over by the groups
    for k in (1, 8, 32):
        values, ids = top_k(z, k)
        ref = z.topk(k, dim=1)
        assert torch.equal(values.sort(1).values, ref.values.sort(1).values)
        assert torch.equal(z.gather(1, ids), values)  # ids point at their values ...
        distinct = torch.arange(40) != 3
        assert torch.equal(ids[distinct].sort(1).values, ref.indices[distinct].sort(1).values)  # ... torch's where no ties
        assert all(len(set(row.tolist())) == k for row in ids)  # distinct classes even in the -inf row
    values, _ = top_k(torch.full((2, 2053), float("nan")), 8)
    assert values.isnan().all()  # NaN rows stay NaN (and are refused as stored values)


def test_normalisers_at_every_temperature_across_chunks(monkeypatch):
    monkeypatch.setattr(layouts, "NORMALISER_CHUNK_BYTES", 7 * 4 * 301)  # 7 rows a chunk: 43 rows in 7 chunks
    z = torch.randn(43, 301, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    temps = (1.0, 0.5, 0.25, 2.0, 3.0, 4.0)  # 0.5 squares 1's exponentials, 0.25 squares 0.5's, 2 squares 4's
    got = normalisers(z.float(), temps)
    for j, t in enumerate(temps):
        assert torch.allclose(got[:, j].double(), torch.logsumexp(z / t, 1), rtol=1e-6, atol=2e-6)  # float32: ulps of lse
    bad = z.float().clone()
    bad[0, 3], bad[1] = float("nan"), -float("inf")
    bad[2, 5] = float("inf")
    flags = torch.isfinite(normalisers(bad, temps)).all(1)
    assert flags.tolist()[:4] == [False, False, False, True]


def test_retempering_is_exact_at_every_stored_temperature():
    z = _logits(v=7)
    temps = (1.0, 0.25, 2.0, 8.0)
    lse = torch.stack([torch.logsumexp(z / t, 1) for t in temps], 1)
    logprobs = z - lse[:, :1]  # every class listed
    for j, t in enumerate(temps):
        assert torch.allclose(retemper(logprobs, lse, temps)[j], torch.log_softmax(z / t, 1), atol=1e-12)
    layout = TopK("float32", 7, 7, temps)
    raw = {"topk_ids": np.tile(np.arange(7, dtype=np.int32), (6, 1)), "topk_logprobs": logprobs.float().numpy(),
           "lse": lse.float().numpy(), "label_logprob": np.zeros(6, np.float32)}
    for t in temps:
        assert torch.allclose(layout.decode(raw, t).logprobs.double(), torch.log_softmax(z / t, 1), atol=1e-5)
        assert torch.allclose(layout.decode(raw, t).logprobs.exp().sum(1), torch.ones(6), atol=1e-5)  # k = V: no tail


def test_nonfinite_rows_as_stored_and_unlabelled_dense_rows_skip_stats():
    z = _logits().float()
    labels = torch.tensor([0, 1, 2, -100, 4, 5])
    dense = Dense("float16", 11)
    arrays, summary = dense.reduce(z, labels)
    assert not summary.nonfinite.any() and torch.isnan(summary.label_logprob[3]) and not torch.isnan(summary.label_logprob[4])
    ref = torch.log_softmax(z.half().double(), 1)
    assert torch.allclose(summary.label_logprob[[0, 1, 2, 4, 5]].double(), ref[[0, 1, 2, 4, 5], [0, 1, 2, 4, 5]], atol=1e-5)
    assert torch.equal(summary.top1[[0, 1, 2, 4, 5]], ref.argmax(1)[[0, 1, 2, 4, 5]])
    z[2, 3] = 7e4  # finite in float32, inf in float16
    z[4, 1] = float("nan")
    assert dense.reduce(z, labels)[1].nonfinite.tolist() == [False, False, True, False, True, False]
    assert not Dense("float32", 11).reduce(z.nan_to_num(), labels)[1].nonfinite.any()
    _, unlabelled = dense.reduce(z, torch.full((6,), -100))
    assert torch.isnan(unlabelled.label_logprob).all() and unlabelled.nonfinite.tolist() == [False, False, True, False, True, False]
    topk = TopK("float16", 11, 3)
    big = _logits().float()
    big[4] = -float("inf")
    big[4, 0] = 0.0  # one finite class: the others of its top 3 are -inf
    assert topk.reduce(big, labels)[1].nonfinite.tolist() == [False] * 4 + [True, False]
    bits = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    stored = to_storage(bits, np.dtype(np.uint16))
    assert stored.dtype == np.uint16 and torch.equal(from_storage(stored, "bfloat16"), bits)


def test_parse_temperatures():
    assert parse_temperatures("2,4") == (1.0, 2.0, 4.0) and parse_temperatures("0.5,1") == (1.0, 0.5)
    for text, message in (("0", "'0' is not a positive"), ("x", "'x' is not a number"), ("2,2", "2 is listed twice"),
                          ("nan", "not a positive"), ("1,-3", "'-3' is not a positive")):
        with pytest.raises(BadInputError, match=message):
            parse_temperatures(text)
    with pytest.raises(BadInputError, match=r"temperature 3 is not stored \(stored: 1,2\)"):
        TopK("float16", 5, 2).temperature_index(3.0)
    assert math.isclose(TopK("float16", 5, 2).row_bytes(), 8)
