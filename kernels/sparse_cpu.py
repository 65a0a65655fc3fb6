"""The sparse KD loss and its gradient in one pass of PyTorch ops: what `fused_sparse_kd_loss` and
`fused_linear_sparse_kd_loss` run on CPU tensors (no GPU, no interpreter).

The maths is the SPEC's, as `reference.py` states it; per row n, with a = s_n / T, log q = log
softmax(a), and for each teacher k its listed in-range ids S_kn, p_knv = exp(logprob), tail
r_kn = max(0, 1 - sum_S p) (0 when S_kn covers [0, V)) and the student's unlisted mass
1 - Q_kn = sum_{v not in S_kn} q_nv:

    KD_n     = T^2 sum_k w_nk [ sum_S p (log p - log q) + r log(r / (1 - Q)) ]
    dL/ds_n  = alpha T (q_n - p~_n) + (1 - alpha) (softmax(s_n) - onehot(y_n))
    p~_nj    = sum_k w_nk (p_knj if j in S_kn else q_nj r_kn / (1 - Q_kn))

The reference gets the same numbers through autograd, in a graph of about twice the work; here
the gradient is assembled directly, for all teachers at once (`_kd_terms`), with c_nk = w_nk r_kn /
(1 - Q_kn) and C_n = sum_k c_nk:

    1 - Q_kn = sum_v q_nv - sum_S q_nv        (both sums in float64)
    q_n - p~_n = q_n (1 - C_n) - sum_k [j in S_kn] (w_nk p_knj - c_nk q_nj)

so a step costs the student's log-softmax and exponentials, one product over (N, V) and a scatter of
the K x k listed entries. That is exact to float32 while 1 - Q is not tiny and C_n is moderate
(FAST_TAIL, FAST_C below); the other rows (a student far sharper than its teachers on their lists)
are computed teacher by teacher (`_kd_terms_exact`): each teacher's unlisted mass summed directly,
in log space where it underflows float32, and its share of p~ in log space where w r / (1 - Q)
would overflow, so that q r / (1 - Q) <= r whatever the student's tail.

Validity, masks and value checks are the reference's (`check_sparse_teacher_values`, the same
replacement of rows outside `mask`), so the CPU path refuses exactly what the reference refuses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtkd.kernels.cpu_path import RowsWithGradient, add_ce_and_mask
from mtkd.kernels.reference import (
    accumulation_dtype,
    check_sparse_kd_arguments,
    check_sparse_teacher_values,
    check_student_logits,
    normalised_log_weights,
    reduce_rows,
)

# A student tail 1 - Q below this is summed in log space (its q's underflow float32 in the sum).
_DEEP_TAIL = 2.0**-100
# log(w r / (1 - Q)) beyond this: the factor is formed with each q in log space.
_LARGE_LOG = 60.0
# `_kd_terms`' one pass for a row while every taught teacher's 1 - Q >= FAST_TAIL (its float64
# difference then exact to ~1e-16 / FAST_TAIL relative) and C_n <= FAST_C (the listed classes'
# float32 rounding at most ~FAST_C ulps of q); other rows are computed teacher by teacher.
FAST_TAIL = 1e-6
FAST_C = 16.0


def sparse_kd_rows_and_grad(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    weights: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(per-row losses L_n (N,) in the accumulation dtype, dL_n/ds_n (N, V) in the student's
    dtype or None). Arguments are assumed valid (`check_sparse_kd_arguments`); teacher values are
    checked here. Rows outside `mask` get a zero loss and a zero gradient."""
    N, V = student_logits.shape
    K, _, k = teacher_ids.shape
    acc = accumulation_dtype(student_logits, teacher_logprobs, weights)
    T = float(temperature)
    s = student_logits.detach().to(acc)
    if mask is not None:
        s = torch.where(mask[:, None], s, 0.0)
    rows = torch.zeros(N, dtype=acc, device=s.device)
    grad = None  # (N, V) once a term adds to it

    if alpha > 0:
        ids = teacher_ids.detach().long()
        lp = teacher_logprobs.detach().to(acc)
        if mask is not None:  # rows outside the mask: distinct ids, no teacher mass
            keep = mask[None, :, None]
            ids = torch.where(keep, ids, torch.arange(k, device=ids.device))
            lp = torch.where(keep, lp, -math.inf)
        log_w = normalised_log_weights(weights, K, N, acc, s.device, mask)  # (N, K)
        w = log_w.exp()
        check_sparse_teacher_values(ids, lp, w > 0)
        log_q = torch.log_softmax(s / T if T != 1 else s, dim=-1)  # (N, V)
        q = log_q.exp()
        kd, grad = _kd_terms(log_q, q, ids, lp, w, log_w, scale=alpha * T, need_grad=need_grad)
        rows += alpha * T * T * kd

    return add_ce_and_mask(rows, grad, s, labels, alpha=alpha, ignore_index=ignore_index, mask=mask,
                           need_grad=need_grad, dtype=student_logits.dtype)


def _kd_terms(log_q: Tensor, q: Tensor, ids: Tensor, lp: Tensor, w: Tensor, log_w: Tensor, *,
              scale: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(KD_n / T^2 (N,), scale (q - p~) (N, V) in q's buffer, or None): every row in one pass
    over the row where that is exact to float32, the others by `_kd_terms_exact`.

    One pass: each teacher's unlisted mass 1 - Q_kn is the row's whole sum of q less its listed
    q's, both summed in float64 (the q's are positive: the float32 rounding of each is the same
    as in a direct sum of the unlisted ones, and float64 cancels nothing that float32 would
    see while 1 - Q >= FAST_TAIL); and
        q - p~ = q (1 - C_n) - sum_k [listed] (w_nk p_knj - c_nk q_nj),  c_nk = w_nk r_kn / (1 - Q_kn),
    C_n = sum_k c_nk: one product over (N, V) and a scatter of the K x k listed entries, where the
    per-teacher way copies, scatters and sums (N, V) for each teacher. Its float32 rounding on a
    listed class grows with C_n (q (1 - C) and c q cancel there), so rows with C_n > FAST_C, or a
    student tail below FAST_TAIL where the teacher has one, take the per-teacher way instead.
    """
    K, N, k = ids.shape
    V = q.shape[1]
    in_range = ids < V  # ids at or beyond V are tail mass
    safe = torch.where(in_range, ids, 0)  # (K, N, k): out-of-range ids read class 0, their terms zeroed
    gather = lambda t: t.gather(1, safe.permute(1, 0, 2).reshape(N, K * k)).reshape(N, K, k).permute(1, 0, 2)  # noqa: E731
    log_q_ids, q_ids = gather(log_q), gather(q)
    p = torch.where(in_range, lp.exp(), 0.0)  # (K, N, k)
    has_tail = in_range.sum(dim=-1) < V  # (K, N): ids are distinct
    r = torch.where(has_tail, (1 - p.sum(dim=-1)).clamp(min=0), 0.0)
    listed_kl = torch.where(p > 0, p * (lp - log_q_ids), 0.0).sum(dim=-1)  # (K, N)
    tail = _sum64(q) - torch.where(in_range, q_ids, 0.0).double().sum(dim=-1)  # (K, N)
    wt = w.T  # (K, N)
    taught = (wt > 0) & (r > 0)  # where the teacher's tail enters the row
    c = torch.where(taught, wt.double() * r.double() / tail.clamp(min=FAST_TAIL), 0.0)  # (K, N) float64
    fast = (~taught | (tail >= FAST_TAIL)).all(dim=0) & (c.sum(dim=0) <= FAST_C)  # (N,)

    log_tail = tail.clamp(min=FAST_TAIL).log().to(q.dtype)
    tail_kl = torch.where(r > 0, r * (torch.log(r) - log_tail), 0.0)
    kd = torch.where(wt > 0, wt * (listed_kl + tail_kl), 0.0).sum(dim=0)  # (N,)
    grad = None
    if need_grad:
        C = c.sum(dim=0).to(q.dtype)
        listed = torch.where(in_range, wt[:, :, None] * p - c.to(q.dtype)[:, :, None] * q_ids, 0.0)  # (K, N, k)
        grad = q.mul_(scale * (1 - C[:, None]))  # q is done with: its buffer holds the gradient
        grad.scatter_add_(1, safe.permute(1, 0, 2).reshape(N, K * k), -scale * listed.permute(1, 0, 2).reshape(N, K * k))
    slow = (~fast).nonzero().squeeze(1)
    if len(slow):
        lq = log_q.index_select(0, slow)
        kd_slow, grad_slow = _kd_terms_exact(lq, lq.exp(), ids[:, slow], lp[:, slow], w[slow], log_w[slow], need_grad=need_grad)
        kd = kd.index_copy(0, slow, kd_slow)
        if need_grad:
            grad.index_copy_(0, slow, grad_slow.mul_(scale))
    return kd, grad


def _sum64(x: Tensor, rows: int = 128) -> Tensor:
    """x.sum(dim=1) accumulated in float64, `rows` rows at a time (sum(dtype=float64) converts the
    whole tensor first: 25x slower on a CPU than this)."""
    return torch.cat([x[i : i + rows].double().sum(dim=1) for i in range(0, len(x), rows)]) if len(x) else x.new_zeros(0, dtype=torch.float64)


def _kd_terms_exact(log_q: Tensor, q: Tensor, ids: Tensor, lp: Tensor, w: Tensor, log_w: Tensor, *,
                    need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """`_kd_terms` teacher by teacher, exact however deep the student's tail or large w r / (1 - Q):
    each teacher's unlisted mass summed directly (in log space where it underflows float32), its
    share of p~ formed in log space where w r / (1 - Q) would overflow (so that q r / (1 - Q) <= r)."""
    N, V = q.shape
    K = ids.shape[0]
    acc = q.dtype
    in_range = ids < V
    # Out-of-range ids point at a spare column V, so one scatter handles every id (never
    # clamped to V - 1: their write there would unlist the last class when it is listed too).
    spare_ids = torch.where(in_range, ids, V)
    p = torch.where(in_range, lp.exp(), 0.0)  # (K, N, k)
    has_tail = in_range.sum(dim=-1) < V  # (K, N): ids are distinct
    kd = torch.zeros(N, dtype=acc, device=q.device)
    p_tilde = torch.zeros(N, V + 1, dtype=acc, device=q.device) if need_grad else None
    # q with each teacher's listed classes zeroed, column V the spare for out-of-range ids:
    # one copy and a scatter per teacher (a boolean mask and a where cost two more passes).
    q_spare = torch.empty(N, V + 1, dtype=acc, device=q.device)
    for t in range(K):  # one teacher's (N, V) temporaries at a time
        on = w[:, t] > 0
        P = p[t].sum(dim=-1)
        r = torch.where(has_tail[t], (1 - P).clamp(min=0), 0.0)
        log_q_ids = log_q.gather(1, torch.where(in_range[t], ids[t], 0))
        listed_kl = torch.where(p[t] > 0, p[t] * (lp[t] - log_q_ids), 0.0).sum(dim=-1)
        q_spare[:, :V].copy_(q)
        q_unlisted = q_spare.scatter_(1, spare_ids[t], 0.0)[:, :V]  # q where unlisted, else 0
        tail = q_unlisted.sum(dim=-1)  # 1 - Q: the unlisted mass itself, never 1 - sum q
        log_tail = tail.log()
        deep = has_tail[t] & (tail < _DEEP_TAIL)
        unlisted = None
        if deep.any():  # q underflows there: the same sum in log space
            unlisted = _unlisted(N, V, spare_ids[t])
            log_tail = torch.where(deep, torch.logsumexp(
                torch.where(unlisted, log_q, -math.inf), dim=-1), log_tail)
        tail_kl = torch.where(r > 0, r * (torch.log(r) - log_tail), 0.0)
        kd += torch.where(on, w[:, t] * (listed_kl + tail_kl), 0.0)
        if need_grad:
            p_tilde.scatter_add_(1, spare_ids[t], w[:, t, None] * p[t])
            # w r / (1 - Q): 0 where the teacher has no tail mass or is off the row.
            log_c = torch.where(on & (r > 0), log_w[:, t] + torch.log(r) - log_tail, -math.inf)
            if (log_c > _LARGE_LOG).any():  # r / (1 - Q) beyond float range: q c <= r in log space
                unlisted = _unlisted(N, V, spare_ids[t]) if unlisted is None else unlisted
                p_tilde[:, :V] += torch.where(unlisted, torch.exp(log_q + log_c[:, None]), 0.0)
            else:
                p_tilde[:, :V].addcmul_(q_unlisted, log_c.exp()[:, None])
        del q_unlisted
    # into q's buffer; + 0.0 as the old zeros + x did: -0 becomes +0
    return kd, torch.sub(q, p_tilde[:, :V], out=q).add_(0.0) if need_grad else None


def _unlisted(N: int, V: int, spare_ids: Tensor) -> Tensor:
    """(N, V) bool: the classes one teacher does not list (spare_ids (N, k), out-of-range ids at V)."""
    unlisted = torch.ones(N, V + 1, dtype=torch.bool, device=spare_ids.device)
    return unlisted.scatter_(1, spare_ids, False)[:, :V]


def sparse_kd_loss_cpu(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: Tensor | None = None,
) -> Tensor:
    """`fused_sparse_kd_loss` for CPU tensors (its signature and semantics): checked, reduced,
    differentiable in `student_logits` through the gradient of this pass."""
    check_student_logits(student_logits)
    check_sparse_kd_arguments(
        *student_logits.shape, student_logits.device, teacher_ids, teacher_logprobs,
        temperature=temperature, weights=weights, labels=labels, alpha=alpha,
        reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    def compute(s: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        return sparse_kd_rows_and_grad(
            s, teacher_ids.detach(), teacher_logprobs.detach(), None if weights is None else weights.detach(), labels, mask,
            temperature=float(temperature), alpha=float(alpha), ignore_index=int(ignore_index), need_grad=need_grad)

    if student_logits.requires_grad and torch.is_grad_enabled():
        rows = RowsWithGradient.apply(student_logits, compute)
    else:
        rows = compute(student_logits, False)[0]
    return reduce_rows(rows, mask, reduction)
