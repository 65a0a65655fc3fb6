"""Stage one's one-pass per-row work (layouts.row_pass, sample_unlisted with the known maxima) stores
the very bytes the straightforward version did (tests/pipeline/stage_one_before.py): every storable
row, every array, on logits with ties, -inf, signed zeros and V not a multiple of the group, at
temperature sets that square (1, 2, 4, 0.5) and that do not (1, 3, 0.3), and across chunks."""

import math

import pytest
import torch

from mtkd.pipeline import layouts
from mtkd.pipeline.layouts import SampledTopK, TopK, normalisers, row_pass
from tests.pipeline.stage_one_before import normalisers as normalisers_before
from tests.pipeline.stage_one_before import reduce_before


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]) if x.is_floating_point() else x


def _logits(vocab: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(vocab)
    z = 3 * torch.randn(23, vocab, generator=g)
    if kind == "ties":
        return (z * 2).round() / 2
    if kind == "special":
        z[::3, ::7] = -math.inf
        z[1, :] = -math.inf  # no finite class: not storable
        z[2, 1:] = -math.inf  # one class
        z[4, 0] = math.inf
        z[5, 3] = math.nan
        z[6] = 0.0
        z[7, ::2] = -0.0
        z[8] = -0.0
    return z


@pytest.mark.parametrize("vocab", [100, 2053, 8192])
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("temps", [(1.0, 2.0), (1.0,), (1.0, 2.0, 4.0, 0.5), (1.0, 3.0, 0.3)])
@pytest.mark.parametrize("k,tail", [(64, 0), (16, 0), (1, 0), (64, 7), (0, 7)])
def test_stored_bytes_are_those_of_the_version_before(monkeypatch, vocab, kind, temps, k, tail):
    monkeypatch.setattr(layouts, "NORMALISER_CHUNK_BYTES", 5 * 4 * vocab)  # 5 rows a chunk: 23 rows in 5 chunks
    monkeypatch.setattr(layouts, "TAIL_CHUNK_BYTES", {"cpu": 4 * 8 * vocab, "cuda": 4 * 8 * vocab})
    import tests.pipeline.stage_one_before as before
    monkeypatch.setattr(before, "NORMALISER_CHUNK_BYTES", 5 * 4 * vocab)
    monkeypatch.setattr(before, "TAIL_CHUNK_BYTES", {"cpu": 4 * 8 * vocab, "cuda": 4 * 8 * vocab})
    z = _logits(vocab, kind)
    labels = torch.randint(0, vocab, (len(z),), generator=torch.Generator().manual_seed(1))
    labels[::5], labels[3] = -100, vocab - 1
    rows = torch.arange(1000, 1000 + len(z))
    if tail:
        layout = SampledTopK("float16", vocab, k, temps, tail, 3)
        arrays, summary = layout.reduce(z, labels, rows=rows, teacher="t")
    else:
        layout = TopK("float16", vocab, k, temps)
        arrays, summary = layout.reduce(z, labels)
    want = reduce_before(layout, z, labels, rows, "t")
    assert set(arrays) == set(want)
    storable = ~summary.nonfinite
    assert storable.any()
    if kind == "special":  # rows 1 (no finite class), 4 (+inf) and 5 (NaN) are refused; zeros and -inf stored
        assert not storable[[1, 4, 5]].any() and storable[[0, 6, 7, 8]].all()
    for name in arrays:  # refused rows are never written: their NaN payloads may differ
        assert torch.equal(_bits(arrays[name][storable]), _bits(want[name][storable])), name


@pytest.mark.parametrize("temps", [(1.0,), (1.0, 2.0), (1.0, 0.05)])
def test_normalisers_and_entropy_bit_identical(temps):
    z = _logits(2053, "special")
    for got, want in zip(normalisers(z, temps, entropy=True), normalisers_before(z, temps, entropy=True)):
        assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(normalisers(z, temps)), _bits(normalisers_before(z, temps)))


def test_row_pass_gives_the_row_maxima_and_torch_topk_values():
    z = _logits(8192, "randn")
    done = row_pass(z, (1.0, 2.0), entropy=True, k=64)
    assert torch.equal(done.top, z.amax(dim=1))
    assert torch.equal(done.topk_values.sort(dim=1).values, z.topk(64, dim=1).values.sort(dim=1).values)
    assert torch.equal(z.gather(1, done.topk_ids), done.topk_values)
    assert torch.allclose(done.lse[:, 1], torch.logsumexp(z / 2, dim=1), rtol=1e-6)
