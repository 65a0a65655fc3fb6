"""The sampled tail (layouts.SampledTopK): the draws, and the sparse target the reader makes of them.

The estimator's checks are statistical, on random teachers: many rows holding the same logits get
independent draws (their global rows differ), so the mean of their merged targets over D rows is the
mean over D independent draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkd.kernels import fused_kd_loss, fused_sparse_kd_loss
from mtkd.pipeline.layouts import TAIL_PAD_ID, SampledTopK, row_uniforms, to_storage

V, K_HEAD, M = 30, 5, 8


def _teacher(n=4, v=V, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _reduce(layout, z, rows=None, teacher="t"):
    rows = torch.arange(len(z)) if rows is None else rows
    return layout.reduce(z, torch.full((len(z),), -100), rows=rows, teacher=teacher)[0]


def _stored(layout, arrays):
    """The arrays as the store holds them (numpy, bfloat16 as its bits)."""
    specs = {a.name: a for a in layout.arrays()}
    return {k: to_storage(v.to(specs[k].torch_dtype), specs[k].dtype) for k, v in arrays.items()}


def _merged(z, draws, temperature, *, m=M, k=K_HEAD, dtype="float32", seed=0):
    """(draws, n, V) float64: each row of `z` drawn `draws` times, merged into dense distributions."""
    layout = SampledTopK(dtype, z.shape[1], k, (1.0, 2.0), m, seed)
    rows = _reduce(layout, z.repeat(draws, 1))
    target = layout.decode(_stored(layout, rows), temperature)
    dense = torch.zeros(len(target.ids), z.shape[1] + 1, dtype=torch.float64)
    dense.scatter_add_(1, target.ids.clamp(max=z.shape[1]), target.logprobs.double().exp())  # pads: p = 0
    return dense[:, : z.shape[1]].view(draws, *z.shape), target


# -- the draws ---------------------------------------------------------------------------------------


def test_draws_depend_on_seed_teacher_and_row_alone_not_on_the_batch():
    z = _teacher(n=21)
    layout = SampledTopK("float16", V, K_HEAD, (1.0, 2.0), M, 7)
    whole = _stored(layout, _reduce(layout, z, torch.arange(100, 121)))
    for batch in (3, 7):
        parts = [_stored(layout, _reduce(layout, z[s : s + batch], torch.arange(100 + s, 100 + min(s + batch, 21))))
                 for s in range(0, 21, batch)]
        for name, values in whole.items():
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]).view(np.uint8), values.view(np.uint8), err_msg=name)
    ids = whole["tail_ids"]
    assert (np.diff(ids, axis=1) >= 0).all() and ids.dtype == np.int32  # ascending
    reseeded = SampledTopK("float16", V, K_HEAD, (1.0, 2.0), M, 8)
    others = [_stored(layout, _reduce(layout, z, torch.arange(100, 121), teacher="u"))["tail_ids"],
              _stored(reseeded, _reduce(reseeded, z, torch.arange(100, 121)))["tail_ids"],
              _stored(layout, _reduce(layout, z, torch.arange(200, 221)))["tail_ids"]]
    assert all((other != ids).any() for other in others)  # another teacher, seed or row draws anew


def test_uniforms_are_uniform_and_counter_based():
    u = row_uniforms(3, 11, torch.arange(40_000), 4)
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.equal(row_uniforms(3, 11, torch.tensor([7, 39_999, 2**40 + 5]), 4)[:2], u[[7, 39_999]])
    assert abs(float(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1])) < 0.03  # neighbouring rows


def test_draws_follow_the_teacher_restricted_to_its_unlisted_classes():
    z = _teacher(n=1)
    draws = 4000
    layout = SampledTopK("float32", V, K_HEAD, (1.0,), M, 0)
    arrays = _reduce(layout, z.repeat(draws, 1))
    listed = set(arrays["topk_ids"][0].tolist())
    counts = torch.bincount(arrays["tail_ids"].long().flatten(), minlength=V).double()
    p = torch.softmax(z[0].double(), 0)
    unlisted = torch.tensor([v not in listed for v in range(V)])
    assert counts[~unlisted].sum() == 0  # never a listed class
    expected = p * unlisted / p[unlisted].sum() * draws * M
    chi2 = float(((counts - expected)[unlisted] ** 2 / expected[unlisted]).sum())
    dof = int(unlisted.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2  # about 5 sigma
    lp = torch.log_softmax(z.double(), 1)[0]
    assert torch.allclose(arrays["tail_logprobs"][0].double(), lp[arrays["tail_ids"][0].long()], atol=1e-5)


def test_pure_sampling_draws_from_every_class():
    z = _teacher(n=1, scale=0.5)
    layout = SampledTopK("float32", V, 0, (1.0, 2.0), 16, 0)
    arrays = _reduce(layout, z.repeat(500, 1))
    assert arrays["topk_ids"].shape == (500, 0)
    assert set(arrays["tail_ids"].flatten().tolist()) == set(range(V))
    target = layout.decode(_stored(layout, arrays), 2.0)
    assert torch.allclose(target.logprobs.double().exp().sum(1), torch.ones(500, dtype=torch.float64), atol=1e-5)


# -- the merged target -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_merged_targets_list_mass_one_with_distinct_ids(dtype, temperature):
    z = _teacher(n=50, scale=3.0)
    _, target = _merged(z, 1, temperature, dtype=dtype)
    assert target.ids.shape == (50, K_HEAD + M)
    assert all(len(set(row.tolist())) == K_HEAD + M for row in target.ids)  # distinct per row
    pads = target.ids >= TAIL_PAD_ID
    assert torch.isneginf(target.logprobs[pads]).all() and torch.isfinite(target.logprobs[~pads]).all()
    mass = target.logprobs.double().exp().sum(1)
    assert (mass - 1).abs().max() < 1e-6  # the head's exact mass plus the tail's exact mass r_T


def test_at_temperature_one_the_estimate_is_r_count_over_m():
    z = _teacher(n=3)
    layout = SampledTopK("float32", V, K_HEAD, (1.0, 2.0), M, 0)
    arrays = _reduce(layout, z)
    target = layout.decode(_stored(layout, arrays), 1.0)
    r = 1 - torch.softmax(z.double(), 1).gather(1, arrays["topk_ids"].long()).sum(1)
    for row in range(3):
        drawn = arrays["tail_ids"][row].long()
        for j in drawn.unique():
            col = K_HEAD + int((drawn == j).nonzero()[0, 0])
            assert target.ids[row, col] == j
            assert float(target.logprobs[row, col].exp()) == pytest.approx(float(r[row]) * int((drawn == j).sum()) / M, rel=1e-5)


def test_at_temperature_one_the_mean_target_converges_to_the_teacher():
    z = _teacher()
    p = torch.softmax(z.double(), 1)
    errors = {}
    for draws in (100, 1600):
        merged, _ = _merged(z, draws, 1.0)
        mean = merged.mean(0)
        errors[draws] = float(((mean - p) ** 2).mean().sqrt())
        # Unbiased: standardised by the estimator's own spread, the errors are ~ N(0, 1) (chi-square mean 1).
        se = merged.std(0) / math.sqrt(draws)
        zs = ((mean - p) / se)[se > 0]
        assert 0.6 < float((zs**2).mean()) < 1.6, draws
    assert 2.5 < errors[100] / errors[1600] < 6.5  # 1 / sqrt(draws): 4 expected


def _self_normalised_bias(z, t, m, k=K_HEAD):
    """The first-order bias of the merged target at T (n, V): E[pi_hat_j] - pi_j = (pi_j / M)
    (sum_i pi_i^2 / q_i - pi_j / q_j) + O(1 / M^2), pi the tail at T and q at T = 1, both restricted
    to the unlisted classes and normalised (the delta method), times the exact tail mass r_T."""
    p, p1 = torch.softmax(z.double() / t, 1), torch.softmax(z.double(), 1)
    unlisted = torch.ones_like(p, dtype=torch.bool).scatter_(1, z.topk(k, 1).indices, False)
    r_t = (p * unlisted).sum(1, keepdim=True)
    pi = p * unlisted / r_t
    q = p1 * unlisted / (p1 * unlisted).sum(1, keepdim=True)
    ratio = torch.where(unlisted, pi / q, 0.0)
    return r_t * pi / m * ((pi * ratio).sum(1, keepdim=True) - ratio), unlisted


def test_at_temperature_two_the_bias_is_the_self_normalised_estimators():
    z, t, m = _teacher(), 2.0, 16
    p = torch.softmax(z.double() / t, 1)
    bias, unlisted = _self_normalised_bias(z, t, m)
    merged, _ = _merged(z, 4000, t, m=m)
    mean, se = merged.mean(0), merged.std(0) / math.sqrt(4000)
    head = ~unlisted
    assert torch.allclose(mean[head], p[head], atol=1e-6)  # the head is exact at every T
    assert float((mean - p).abs().max()) < float(bias.abs().max()) + 4 * float(se.max())  # within the bias
    residual = (mean - p - bias).abs()  # what the first-order bias leaves: noise and O(1 / M^2)
    assert float(residual.max()) < 0.5 * float(bias.abs().max()) + 4 * float(se.max())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_gradient_of_the_sparse_loss_on_merged_targets_is_the_dense_gradient(temperature):
    z = _teacher(n=3)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, V, generator=g)
    draws = 1500
    merged, target = _merged(z, draws, temperature, m=M)
    student = s.repeat(draws, 1).requires_grad_(True)
    loss = fused_sparse_kd_loss(student, target.ids[None], target.logprobs[None], temperature=temperature, reduction="sum")
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, student)
    grad = grad.double().view(draws, 3, V)
    # Per row the sparse gradient is T (q - p_hat): the merged target lists mass 1, no tail bucket.
    q = torch.softmax(s.double() / temperature, 1)
    assert torch.allclose(grad, temperature * (q - merged), atol=2e-5)
    dense_student = s.clone().requires_grad_(True)
    dense = fused_kd_loss(dense_student, z[None], temperature=temperature, reduction="sum")
    (dense_grad,) = torch.autograd.grad(dense, dense_student)
    se = grad.std(0) / math.sqrt(draws)
    if temperature == 1.0:  # unbiased: within the estimator's own error
        assert float(((grad.mean(0) - dense_grad.double()).abs() - 4.5 * se).max()) < 1e-6
    else:  # within the self-normalised bias: the gradient's is -T times the target's
        bias, _ = _self_normalised_bias(z, temperature, M)
        excess = (grad.mean(0) - dense_grad.double()).abs() - temperature * bias.abs() * 1.5 - 4.5 * se
        assert float(excess.max()) < 1e-6


def test_merged_target_loss_has_no_tail_term_and_ids_beyond_the_student_stay_tail():
    z = _teacher(n=40, v=V + 6, scale=2.0)  # a teacher 6 classes wider than the student
    _, target = _merged(z, 1, 2.0)
    s = torch.randn(40, V)
    rows = fused_sparse_kd_loss(s, target.ids[None], target.logprobs[None], temperature=2.0, reduction="none").double()
    p = target.logprobs.double().exp()
    inside = target.ids < V
    log_q = torch.log_softmax(s.double() / 2.0, 1)
    listed_kl = torch.where(inside, p * (target.logprobs.double() - log_q.gather(1, target.ids.clamp(max=V - 1))), 0.0).sum(1)
    r = (1 - (p * inside).sum(1)).clamp(min=0)  # the drawn ids past V: the student's tail bucket
    unlisted = torch.ones(40, V, dtype=torch.bool)
    for row in range(40):
        unlisted[row, target.ids[row][inside[row]]] = False
    log_tail = torch.logsumexp(log_q.masked_fill(~unlisted, -math.inf), 1)
    tail_kl = torch.where(r > 1e-6, r * (r.log() - log_tail), 0.0)
    assert torch.allclose(rows, 4.0 * (listed_kl + tail_kl), atol=1e-4)
    assert bool((r > 1e-3).any())  # some rows drew past the student's vocabulary
