"""The dense KD loss and its gradient in one pass of PyTorch ops: what `fused_kd_loss` runs on CPU
tensors (no GPU, no interpreter).

The maths is the SPEC's, as `reference.py` states it; per row n, with log q = log softmax(s_n / T)
and p_n the K teachers fused at T (`reference.fused_teacher_log_probs`: the weighted mixture of
their softmaxes, or the softmax of their weighted logits):

    KD_n     = T^2 sum_v p_nv (log p_nv - log q_nv)
    dL/ds_n  = alpha T (q_n - p_n) + (1 - alpha) (softmax(s_n) - onehot(y_n))

The reference gets the same numbers through autograd, which records every teacher's operations
and walks them back; the teachers need no gradient, so here the gradient is assembled directly
(one pass over q and p) and saved for backward, as the sparse CPU path does (`sparse_cpu.py`).
The reference mixes the teachers in log space (logaddexp, exact for probabilities below float32's
range); here `prob` mixes softmaxes in linear space (a probability that underflows float32 adds
below 1e-38 to a row's KL and gradient) and checks the result once: a NaN in a counted row means
a NaN/+inf logit or a teacher row with no finite logit, and the reference's function is then run
to raise its own message. So this refuses what the reference refuses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtkd.kernels.cpu_path import RowsWithGradient, add_ce_and_mask
from mtkd.kernels.reference import (
    accumulation_dtype,
    check_kd_arguments,
    fused_teacher_log_probs,
    normalised_log_weights,
    reduce_rows,
)


def kd_rows_and_grad(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    *,
    temperature: float,
    alpha: float,
    fusion: str,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(per-row losses L_n (N,) in the accumulation dtype, dL_n/ds_n (N, V) in the student's dtype
    or None). Arguments are assumed valid (`check_kd_arguments`). Rows outside `mask` get a zero
    loss and a zero gradient."""
    z = teacher_logits.detach()
    N = student_logits.shape[0]
    acc = accumulation_dtype(student_logits, z, weights)
    T = float(temperature)
    s = student_logits.detach().to(acc)
    if mask is not None:
        s = torch.where(mask[:, None], s, 0.0)
    rows = torch.zeros(N, dtype=acc, device=s.device)
    grad = None

    if alpha > 0:
        log_q = torch.log_softmax(s / T if T != 1 else s, dim=-1)
        p, log_p = _teacher_probs(z, weights, T, fusion, mask, acc)
        # 0 log 0 = 0: a class the teachers rule out contributes nothing, whatever the student says.
        rows += alpha * T * T * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        if need_grad:
            grad = log_q.exp_().sub_(p).mul_(alpha * T)  # into log q's buffer: it is done with

    return add_ce_and_mask(rows, grad, s, labels, alpha=alpha, ignore_index=ignore_index, mask=mask,
                           need_grad=need_grad, dtype=student_logits.dtype)


def _teacher_probs(z: Tensor, weights: Tensor | None, T: float, fusion: str, mask: Tensor | None,
                   acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(p, log p) (N, V) of the teachers fused at T (see the header); ValueError as the reference."""
    if fusion != "prob":
        log_p = fused_teacher_log_probs(z, weights, T, fusion, mask, acc)
        return log_p.exp(), log_p
    K, N, _ = z.shape
    w = normalised_log_weights(weights, K, N, acc, z.device, mask).exp()  # (N, K)
    p = None
    for k in range(K):
        zk = z[k].to(acc)
        if mask is not None:
            zk = torch.where(mask[:, None], zk, 0.0)
        wk = w[:, k : k + 1]
        term = torch.softmax(zk / T if T != 1 else zk, dim=-1).mul_(wk)
        if not bool((wk > 0).all()):  # a teacher off a row (w = 0) is left out whatever its logits, even all -inf
            term = torch.where(wk > 0, term, 0.0)
        p = term if p is None else p.add_(term)
    if p.isnan().any(dim=-1).any():  # a counted row's NaN/+inf logit or a row with no finite logit
        fused_teacher_log_probs(z, weights, T, fusion, mask, acc)  # raises the reference's message
    p = p.div_(p.sum(dim=-1, keepdim=True))  # renormalised: w sums to one only up to rounding
    return p, p.log()


def kd_loss_cpu(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    fusion: str = "prob",
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: Tensor | None = None,
) -> Tensor:
    """`fused_kd_loss` for CPU tensors (its signature and semantics): checked, reduced,
    differentiable in `student_logits` through the gradient of this pass."""
    check_kd_arguments(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    def compute(s: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        return kd_rows_and_grad(
            s, teacher_logits.detach(), None if weights is None else weights.detach(), labels, mask,
            temperature=float(temperature), alpha=float(alpha), fusion=fusion, ignore_index=int(ignore_index), need_grad=need_grad)

    if student_logits.requires_grad and torch.is_grad_enabled():
        rows = RowsWithGradient.apply(student_logits, compute)
    else:
        rows = compute(student_logits, False)[0]
    return reduce_rows(rows, mask, reduction)
