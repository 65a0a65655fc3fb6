"""kernels/stage_one.py: the one-pass kernel (under TRITON_INTERPRET=1) against `stage_one_ref` and
against stage one's CPU path (layouts.row_pass), on small shapes: V not a multiple of the block, the
label at V - 1, temperatures far from 1, -inf logits (whole leading blocks of them), no label."""

import math

import pytest
import torch

from mtkd.kernels import stage_one
from mtkd.kernels.stage_one import stage_one_ref, stage_one_rows
from mtkd.pipeline.layouts import _label_logprob, row_pass


def _case(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(n, vocab, generator=g)
    z[0, ::3] = -math.inf
    z[1, : vocab - 2] = -math.inf  # the first blocks all -inf: the maximum appears late
    z[2, 1:] = -math.inf  # one class with all the mass: entropy 0
    z[3] = 0.0  # uniform: entropy log V
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1], labels[4] = vocab - 1, -100
    return z, labels


@pytest.mark.parametrize("vocab,block", [(37, 16), (300, 64), (1000, 128), (1000, 2048)])
@pytest.mark.parametrize("temps", [(1.0,), (1.0, 2.0), (1.0, 0.05, 20.0), (1.0, 0.5, 2.0, 4.0, 3.0)])
def test_kernel_matches_reference_and_cpu_path(triton_interpreter, monkeypatch, vocab, block, temps):
    monkeypatch.setattr(stage_one, "BLOCK_V", block)
    z, labels = _case(7, vocab, vocab)
    lse, lp, ent, top = stage_one_rows(z, labels, temps)
    want = stage_one_ref(z, labels, temps)
    for got, ref in zip((lse, lp, ent, top), want):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert math.isnan(lp[4]) and ent[2] == 0 and abs(ent[3] - math.log(vocab)) < 1e-4
    done = row_pass(z, temps, entropy=True)  # what stage one computes on the CPU
    torch.testing.assert_close(lse, done.lse, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ent, done.entropy, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lp, _label_logprob(z, done.lse[:, 0], labels), rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.equal(top, done.top)


def test_nonfinite_rows_stay_nonfinite(triton_interpreter, monkeypatch):
    monkeypatch.setattr(stage_one, "BLOCK_V", 16)
    z = torch.randn(3, 40)
    z[0, 5], z[1, 30], z[2] = math.nan, math.inf, -math.inf
    lse, _, ent, _ = stage_one_rows(z, torch.tensor([1, 2, 3]), (1.0, 2.0))
    assert not torch.isfinite(lse).all(dim=1).any()
    assert not torch.isfinite(ent).any()


def test_half_inputs_and_strides(triton_interpreter, monkeypatch):
    monkeypatch.setattr(stage_one, "BLOCK_V", 32)
    z = (3 * torch.randn(100, 6)).T  # (6, 100), column stride 6
    labels = torch.tensor([0, 99, -100, 5, 50, 7])
    for x in (z, z.half(), z.bfloat16()):
        got = stage_one_rows(x, labels, (1.0, 2.0))
        for a, b in zip(got, stage_one_ref(x, labels, (1.0, 2.0))):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, equal_nan=True)


def test_bad_temperatures_refused():
    z, labels = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    for temps in ((2.0, 1.0), (), (1.0, 0.0), (1.0, math.inf)):
        with pytest.raises(ValueError):
            stage_one_rows(z, labels, temps)
