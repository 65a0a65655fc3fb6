"""kd_loss_ref against an independent naive float64 statement of the SPEC, and its validation."""

import itertools
import math

import pytest
import torch

from mtkd.kernels import fused_kd_loss, kd_loss_ref


def naive_kd(s, z, *, temperature, weights, labels, alpha, fusion, reduction, ignore_index=-100,
             mask=None):
    """Row by row in float64 with plain probabilities (no log-space tricks): the loss and the
    SPEC's closed-form gradient dL/ds."""
    s, z, T = s.double(), z.double(), temperature
    K, N, V = z.shape
    if weights is None:
        w = torch.ones(N, K, dtype=torch.float64)
    else:
        w = weights.double().expand(N, K)
    w = w / w.sum(dim=1, keepdim=True)
    losses, grads = torch.zeros(N, dtype=torch.float64), torch.zeros(N, V, dtype=torch.float64)
    counted = 0
    for n in range(N):
        if mask is not None and not mask[n]:
            continue
        counted += 1
        q = torch.softmax(s[n] / T, dim=0)
        if fusion == "prob":
            p = sum(w[n, k] * torch.softmax(z[k, n] / T, dim=0) for k in range(K))
        else:
            p = torch.softmax(sum(w[n, k] * z[k, n] for k in range(K)) / T, dim=0)
        kl = sum(p[v] * math.log(p[v] / q[v]) for v in range(V) if p[v] > 0)
        losses[n] = alpha * T * T * kl
        grads[n] = alpha * T * (q - p)
        if labels is not None and alpha < 1 and labels[n] != ignore_index:
            sm = torch.softmax(s[n], dim=0)
            losses[n] += (1 - alpha) * -math.log(sm[labels[n]])
            onehot = torch.zeros(V, dtype=torch.float64)
            onehot[labels[n]] = 1
            grads[n] += (1 - alpha) * (sm - onehot)
    if reduction == "none":
        return losses, grads
    if reduction == "sum":
        return losses.sum(), grads
    divisor = max(counted, 1)
    return losses.sum() / divisor, grads / divisor


def reference_loss_and_grad(s, z, **kwargs):
    s = s.detach().clone().requires_grad_()
    loss = kd_loss_ref(s, z, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss, grad


@pytest.mark.parametrize("fusion, weights, alpha, reduction", list(itertools.product(
    ["prob", "logit"], [None, "K", "NK"], [0.0, 0.3, 1.0], ["mean", "sum", "none"])))
def test_reference_matches_naive_formula(fusion, weights, alpha, reduction):
    K, N, V = 3, 4, 11
    temperature = {0.0: 1.0, 0.3: 0.25, 1.0: 4.0}[alpha]
    s = torch.randn(N, V, dtype=torch.float64) * 3
    z = torch.randn(K, N, V, dtype=torch.float64) * 3
    w = {None: None, "K": torch.rand(K, dtype=torch.float64) + 0.1,
         "NK": torch.rand(N, K, dtype=torch.float64)}[weights]
    y = torch.tensor([2, -100, 0, V - 1])
    mask = None if weights == "K" else torch.tensor([True, True, False, True])
    kwargs = dict(temperature=temperature, weights=w, labels=y, alpha=alpha, fusion=fusion,
                  reduction=reduction, mask=mask)
    loss, grad = reference_loss_and_grad(s, z, **kwargs)
    naive_loss, naive_grad = naive_kd(s, z, **kwargs)
    torch.testing.assert_close(loss, naive_loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, naive_grad, atol=1e-12, rtol=1e-10)


def test_reference_with_minus_inf_teacher_logits_matches_naive_formula():
    K, N, V = 2, 3, 8
    s = torch.randn(N, V, dtype=torch.float64)
    z = torch.randn(K, N, V, dtype=torch.float64)
    z[:, :, 0] = -math.inf
    z[0, :, 1] = -math.inf
    kwargs = dict(temperature=2.0, weights=None, labels=None, alpha=1.0, fusion="prob",
                  reduction="none", mask=None)
    loss, grad = reference_loss_and_grad(s, z, **kwargs)
    naive_loss, naive_grad = naive_kd(s, z, **kwargs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, naive_loss)
    torch.testing.assert_close(grad, naive_grad)


def test_reference_dtypes():
    s = torch.randn(3, 10, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(2, 3, 10, dtype=torch.float16)
    loss = kd_loss_ref(s, z)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert kd_loss_ref(s.double(), z).dtype == torch.float64


def test_reference_all_rows_masked_is_exactly_zero():
    s = torch.randn(3, 10, requires_grad=True)
    z = torch.randn(2, 3, 10)
    y = torch.full((3,), -100)
    loss = kd_loss_ref(s, z, labels=y, alpha=0.5, mask=torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_single_class_is_exactly_zero(dtype, fusion):
    """V = 1: p = q = 1 whatever the logits and weights; version 1 gave -3e-8 * T^2."""
    s = torch.randn(5, 1, dtype=dtype, requires_grad=True)
    loss = kd_loss_ref(s, torch.randn(3, 5, 1, dtype=dtype), weights=torch.rand(5, 3),
                       temperature=7.0, fusion=fusion, reduction="none")
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(s.grad, torch.zeros_like(s))


# Validation: the same checks guard both implementations.

GOOD = dict(temperature=1.0, weights=None, labels=None, alpha=1.0, fusion="prob", reduction="mean")
BAD_CALLS = [
    # (what changes, exception, a word the message must contain)
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(fusion="mean"), ValueError, "fusion"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(weights=torch.tensor([1.0, -1.0])), ValueError, "weights"),
    (dict(weights=torch.tensor([1.0, math.nan])), ValueError, "weights"),
    (dict(weights=torch.zeros(2)), ValueError, "weights"),
    (dict(weights=torch.ones(3)), ValueError, "weights"),
    (dict(weights=torch.ones(4, 2)), ValueError, "weights"),
    (dict(weights=torch.ones(2, dtype=torch.int64)), TypeError, "weights"),
    (dict(labels=torch.tensor([0, 1, 10])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, -1, 2])), ValueError, "labels"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (dict(student_logits=torch.randn(30)), ValueError, "student_logits"),
    (dict(student_logits=torch.randint(0, 5, (3, 10))), TypeError, "student_logits"),
    (dict(teacher_logits=torch.randn(2, 3, 11)), ValueError, "teacher_logits"),
    (dict(teacher_logits=torch.randn(3, 10)), ValueError, "teacher_logits"),
    (dict(teacher_logits=torch.randn(0, 3, 10)), ValueError, "teacher_logits"),
    (dict(mask=torch.ones(3)), TypeError, "mask"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    (dict(weights=torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])), ValueError, "weights"),
    (dict(teacher_logits=torch.full((2, 3, 10), math.nan)), ValueError, "finite"),
]


@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
@pytest.mark.parametrize("change, error, word", BAD_CALLS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_are_refused_by_name(loss_fn, change, error, word):
    args = dict(student_logits=torch.randn(3, 10), teacher_logits=torch.randn(2, 3, 10), **GOOD)
    args.update(change)
    s, z = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(error, match=word):
        loss_fn(s, z, **args)
