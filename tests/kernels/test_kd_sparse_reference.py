"""kd_sparse_loss_ref against a naive float64 statement of the SPEC, its identities, and its
validation."""

import itertools
import math

import pytest
import torch

from mtkd.kernels import (
    fused_sparse_kd_loss,
    kd_loss_ref,
    kd_sparse_loss_ref,
)
from tests.kernels.checks import loss_and_grad, make_sparse_inputs


def naive_sparse_kd(s, ids, logprobs, *, temperature, weights, labels, alpha, reduction,
                    ignore_index=-100, mask=None):
    """Row by row and teacher by teacher in float64 with plain probabilities: the loss and the
    SPEC's closed-form gradient T (q - p~) (+ the CE part). 1 - Q is summed over the unlisted
    classes."""
    s, T = s.double(), temperature
    K, N, k = ids.shape
    V = s.shape[1]
    w = torch.ones(N, K, dtype=torch.float64) if weights is None else \
        weights.double().expand(N, K)
    w = w / w.sum(dim=1, keepdim=True)
    losses, grads = torch.zeros(N, dtype=torch.float64), torch.zeros(N, V, dtype=torch.float64)
    counted = 0
    for n in range(N):
        if mask is not None and not mask[n]:
            continue
        counted += 1
        q = torch.softmax(s[n] / T, dim=0)
        p_tilde = torch.zeros(V, dtype=torch.float64)
        kd = 0.0
        for t in range(K):
            listed = {int(i): math.exp(float(lp)) for i, lp in zip(ids[t, n], logprobs[t, n])
                      if int(i) < V}
            unlisted = [v for v in range(V) if v not in listed]
            r = max(0.0, 1.0 - sum(listed.values())) if unlisted else 0.0
            tail_q = sum(q[v].item() for v in unlisted)
            term = sum(p * math.log(p / q[v].item()) for v, p in listed.items() if p > 0)
            if r > 0:
                term += r * math.log(r / tail_q)
            kd += w[n, t].item() * term
            for v, p in listed.items():
                p_tilde[v] += w[n, t] * p
            for v in unlisted:
                p_tilde[v] += w[n, t] * q[v] * (r / tail_q if r > 0 else 0.0)
        losses[n] = alpha * T * T * kd
        grads[n] = alpha * T * (q - p_tilde)
        if labels is not None and alpha < 1 and labels[n] != ignore_index:
            sm = torch.softmax(s[n], dim=0)
            losses[n] += (1 - alpha) * -math.log(sm[labels[n]])
            grads[n] += (1 - alpha) * (sm - torch.nn.functional.one_hot(labels[n], V))
    if reduction == "none":
        return losses, grads
    if reduction == "sum":
        return losses.sum(), grads
    return losses.sum() / max(counted, 1), grads / max(counted, 1)


def reference_loss_and_grad(s, ids, logprobs, **kwargs):
    s = s.detach().clone().requires_grad_()
    loss = kd_sparse_loss_ref(s, ids, logprobs, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss, grad


@pytest.mark.parametrize("weights, alpha, reduction, extra", list(itertools.product(
    [None, "K", "NK"], [0.0, 0.3, 1.0], ["mean", "sum", "none"], [0, 6])))
def test_reference_matches_naive_formula(weights, alpha, reduction, extra):
    K, N, V, k = 3, 4, 11, 4
    temperature = {0.0: 1.0, 0.3: 0.25, 1.0: 4.0}[alpha]
    s, ids, lp, w, _ = make_sparse_inputs(K, N, V, k, torch.float64, extra_classes=extra,
                                          weights=weights, temperature=temperature)
    y = torch.tensor([2, -100, 0, V - 1])
    mask = None if weights == "K" else torch.tensor([True, True, False, True])
    kwargs = dict(temperature=temperature, weights=w, labels=y, alpha=alpha, reduction=reduction,
                  mask=mask)
    loss, grad = reference_loss_and_grad(s, ids, lp, **kwargs)
    naive_loss, naive_grad = naive_sparse_kd(s, ids, lp, **kwargs)
    torch.testing.assert_close(loss, naive_loss, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, naive_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_class_listed_is_the_dense_prob_fusion(dtype):
    """k = V: the gradient is the dense "prob" fusion's; the losses differ by
    T^2 sum_k w_k KL(p_k || p), which does not depend on the student."""
    K, N, V, T = 3, 5, 13, 2.0
    z = torch.randn(K, N, V, dtype=torch.float64) * 3
    s = torch.randn(N, V, dtype=torch.float64).to(dtype)
    w = torch.rand(N, K, dtype=torch.float64)
    log_p = torch.log_softmax(z / T, dim=-1)
    order = torch.rand(K, N, V).argsort(dim=-1)
    kwargs = dict(temperature=T, weights=w.to(dtype), reduction="none")
    loss, grad = loss_and_grad(kd_sparse_loss_ref, s, order, log_p.gather(2, order).to(dtype),
                               **kwargs)
    dense, dense_grad = loss_and_grad(kd_loss_ref, s, z.to(dtype), **kwargs)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(grad, dense_grad, **tol)
    wn = w / w.sum(1, keepdim=True)
    mixed = (wn.T[..., None] * log_p.exp()).sum(0)  # (N, V)
    spread = T * T * (wn.T * (log_p.exp() * (log_p - mixed.log())).sum(-1)).sum(0)
    torch.testing.assert_close(loss.double(), dense.double() + spread, **tol)


def test_ids_beyond_the_vocabulary_are_tail_mass():
    """A teacher's id >= V is mass the student cannot name: it joins the tail bucket, exactly as
    if that class were merely unlisted."""
    s, ids, lp, _, _ = make_sparse_inputs(2, 4, 10, 5, torch.float64, extra_classes=5)
    assert (ids >= 10).any()
    beyond = ids >= 10
    dropped = torch.where(beyond, torch.arange(5) + 100, ids)  # other ids beyond V, same mass
    a = reference_loss_and_grad(s, ids, lp, reduction="none")
    b = reference_loss_and_grad(s, dropped, lp, reduction="none")
    torch.testing.assert_close(a, b)


def test_confident_student_keeps_its_tail():
    """Q_k > 1 - 1e-6: 1 - Q_k must not be lost to cancellation (float32 against float64)."""
    N, V, k = 4, 50, 5
    s = torch.randn(N, V, dtype=torch.float64)
    s[:, :k] += 20.0  # the student's mass sits on the listed classes: Q ~ 1 - 1e-7
    ids = torch.arange(k).expand(1, N, k).contiguous()
    p = torch.softmax(torch.randn(N, k, dtype=torch.float64), -1) * 0.9  # r = 0.1
    lp = p.log()[None]
    q = torch.softmax(s, -1)
    assert (q[:, :k].sum(-1) > 1 - 1e-6).all()
    loss32, grad32 = reference_loss_and_grad(s.float(), ids, lp.float(), reduction="none")
    loss64, grad64 = reference_loss_and_grad(s, ids, lp, reduction="none")
    naive, naive_grad = naive_sparse_kd(s, ids, lp, temperature=1.0, weights=None, labels=None,
                                        alpha=1.0, reduction="none")
    torch.testing.assert_close(loss64, naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss32.double(), naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad32.double(), naive_grad, rtol=1e-5, atol=1e-7)


def with_extra_id(ids, lp, extra):
    """ids and lp (K, N, k) with one more id per teacher and row, `extra` (K, N), of probability 0."""
    return (torch.cat([ids, extra[..., None].to(ids.dtype)], dim=2),
            torch.cat([lp, torch.full_like(lp[..., :1], -math.inf)], dim=2))


def first_unlisted(ids, V):
    K, N, _ = ids.shape
    return torch.tensor([[next(v for v in range(V) if v not in ids[t, n].tolist())
                          for n in range(N)] for t in range(K)])


def test_an_extra_listed_id_of_probability_zero_changes_nothing():
    """Beyond V always; within V when the teacher's listed mass is 1 (no tail). With a tail r > 0
    it is not a no-op, by the SPEC's maths: the class leaves the tail bucket, the teacher now says
    it has no mass at all, and the student is pushed off it."""
    V = 12
    s, ids, lp, w, y = make_sparse_inputs(2, 4, V, 3, torch.float64, weights="NK")
    kwargs = dict(weights=w, labels=y, alpha=0.4, temperature=1.5, reduction="none")
    expected = reference_loss_and_grad(s, ids, lp, **kwargs)
    beyond = torch.full(ids.shape[:2], V + 3)
    torch.testing.assert_close(reference_loss_and_grad(s, *with_extra_id(ids, lp, beyond),
                                                       **kwargs), expected)
    no_tail = torch.log_softmax(lp, dim=-1)  # listed mass exactly 1: r = 0
    torch.testing.assert_close(
        reference_loss_and_grad(s, *with_extra_id(ids, no_tail, first_unlisted(ids, V)), **kwargs),
        reference_loss_and_grad(s, ids, no_tail, **kwargs))
    moved = reference_loss_and_grad(s, *with_extra_id(ids, lp, first_unlisted(ids, V)), **kwargs)
    assert not torch.allclose(moved[0], expected[0])


def test_single_class_and_all_rows_masked():
    s = torch.randn(3, 1, requires_grad=True)
    loss = kd_sparse_loss_ref(s, torch.zeros(2, 3, 1, dtype=torch.int32), torch.zeros(2, 3, 1),
                              temperature=3.0, reduction="none")
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(s.grad, torch.zeros_like(s))
    s, ids, lp, _, y = make_sparse_inputs(2, 3, 10, 4)
    lp[0, 0] = math.nan  # masked rows are never looked at
    ids[1, 1] = ids[1, 1, 0]  # repeated ids
    s.requires_grad_()
    loss = kd_sparse_loss_ref(s, ids, lp, labels=y, alpha=0.5, mask=torch.zeros(3, dtype=bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_unlabelled_rows_still_distil():
    s, ids, lp, _, y = make_sparse_inputs(2, 4, 10, 4, torch.float64, labels="all")
    loss = kd_sparse_loss_ref(s, ids, lp, labels=y, alpha=0.3, reduction="none")
    torch.testing.assert_close(loss, 0.3 * kd_sparse_loss_ref(s, ids, lp, reduction="none"))
    assert (loss > 0).all()


# Validation: the same checks guard the reference and the fused loss.

def good_call():
    s, ids, lp, _, _ = make_sparse_inputs(2, 3, 10, 4)
    return dict(student_logits=s, teacher_ids=ids, teacher_logprobs=lp)


def spoil(name, index, value):
    def change(args):
        args[name] = args[name].clone()
        args[name][index] = value
    return change


BAD_CALLS = [
    # (what changes, exception, a word the message must contain)
    (dict(teacher_ids=torch.zeros(2, 3, 4)), TypeError, "teacher_ids"),
    (dict(teacher_ids=torch.zeros(2, 4, 4, dtype=torch.long)), ValueError, "teacher_ids"),
    (dict(teacher_ids=torch.zeros(2, 3, 0, dtype=torch.long)), ValueError, "teacher_ids"),
    (dict(teacher_logprobs=torch.zeros(2, 3, 5)), ValueError, "teacher_logprobs"),
    (dict(teacher_logprobs=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "teacher_logprobs"),
    (spoil("teacher_ids", (1, 2, 0), -1), ValueError, ">= 0"),
    (spoil("teacher_logprobs", (0, 1, 3), math.nan), ValueError, "finite"),
    (spoil("teacher_logprobs", (0, 1, 3), math.inf), ValueError, "finite"),
    (dict(weights=torch.ones(3)), ValueError, "weights"),
    (dict(labels=torch.tensor([0, 1, 10])), ValueError, "labels"),
    (dict(mask=torch.ones(3, dtype=torch.int64)), TypeError, "mask"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(alpha=2.0), ValueError, "alpha"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(student_logits=torch.randn(3, 0)), ValueError, "student_logits"),
]


@pytest.mark.parametrize("loss_fn", [fused_sparse_kd_loss, kd_sparse_loss_ref],
                         ids=["fused", "reference"])
@pytest.mark.parametrize("change, error, word", BAD_CALLS,
                         ids=[f"{i}" for i in range(len(BAD_CALLS))])
def test_bad_arguments_are_refused_by_name(loss_fn, change, error, word):
    args = good_call()
    if callable(change):
        change(args)
    else:
        args.update(change)
    with pytest.raises(error, match=word):
        loss_fn(**args)


def test_repeated_ids_are_refused_by_the_reference():
    args = good_call()
    args["teacher_ids"][1, 2, 3] = args["teacher_ids"][1, 2, 0]
    with pytest.raises(ValueError, match="distinct"):
        kd_sparse_loss_ref(**args)
