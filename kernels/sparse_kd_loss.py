"""Sparse (top-k) multi-teacher knowledge-distillation loss.

The maths is the SPEC's and `mtkd.kernels.reference.kd_sparse_loss_ref` states it in plain PyTorch.
This first version runs that reference on every device; the Triton kernel (one program per row,
loss and gradient in one pass) replaces it on CUDA and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from mtkd.kernels.reference import (
    check_sparse_kd_arguments,
    check_student_logits,
    kd_sparse_loss_rows_ref,
    reduce_rows,
)


def fused_sparse_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    alpha: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Sparse multi-teacher KD loss (SPEC "Kernels"), with its gradient to the student.

    Args:
        student_logits: (N, V) float tensor (fp16, bf16, fp32 or fp64), any strides.
        teacher_ids: (K, N, k) integer ids (int32 or int64), distinct per teacher and row; ids at
            or beyond V count as the teacher's tail mass.
        teacher_logprobs: (K, N, k) float, each listed class's log-probability under its teacher
            at this temperature (-inf: probability 0).
        temperature: T > 0, applied to the student in the KD term.
        weights: None (uniform), (K,) or (N, K) non-negative teacher weights, normalised per row.
        labels: (N,) integer labels for the CE term; rows equal to `ignore_index` drop the CE term
            only (they still distil).
        alpha: weight of KD in [0, 1]; CE gets 1 - alpha.
        reduction: "mean" over the rows in `mask` (0 when none), "sum", or "none" (N,).
        mask: (N,) bool or None: rows with False contribute nothing and are not counted.

    Returns:
        The loss in float32 (float64 if an input is float64): a scalar, or (N,) for "none".
    """
    check_student_logits(student_logits)
    check_sparse_kd_arguments(
        *student_logits.shape, student_logits.device, teacher_ids, teacher_logprobs,
        temperature=temperature, weights=weights, labels=labels, alpha=alpha,
        reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    rows = kd_sparse_loss_rows_ref(
        student_logits, teacher_ids, teacher_logprobs, temperature=temperature, weights=weights,
        labels=labels, alpha=alpha, ignore_index=ignore_index, mask=mask,
    )
    return reduce_rows(rows, mask, reduction)
