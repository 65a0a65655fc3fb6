"""What the CPU paths of the losses share (`dense_cpu.py`, `sparse_cpu.py`): per-row losses whose
gradient was computed in the same pass as them, and the hard-label term with its gradient.

A CPU path computes L_n and dL_n/ds_n together from the SPEC's closed form (no autograd graph
through the teachers); `RowsWithGradient` hands autograd the rows and, on backward, that gradient
scaled by the incoming per-row gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class RowsWithGradient(torch.autograd.Function):
    """rows = compute(student_logits, need_grad)[0], differentiable in `student_logits` through the
    gradient `compute` returned with them ((N, V), or None when not needed)."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, compute: Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]):
        rows, grad = compute(student_logits, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None
        return grad * grad_rows[:, None].to(grad.dtype), None


def ce_rows_and_grad(s: Tensor, labels: Tensor, ignore_index: int, mask: Tensor | None, *,
                     need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The hard-label term: per-row cross-entropy of s (N, V) (0 where the label is ignore_index or
    the row is outside `mask`) and its gradient softmax(s) - onehot(y) (0 on those rows), or None."""
    N = s.shape[0]
    labelled = labels != ignore_index
    if mask is not None:
        labelled = labelled & mask  # a masked row's label may be anything
    y = torch.where(labelled, labels, 0).long()
    log_softmax = torch.log_softmax(s, dim=-1)
    ce = torch.where(labelled, -log_softmax.gather(1, y[:, None]).squeeze(1), 0.0)
    if not need_grad:
        return ce, None
    grad = log_softmax.exp_()
    grad.scatter_add_(1, y[:, None], torch.full((N, 1), -1.0, dtype=s.dtype, device=s.device))
    return ce, torch.where(labelled[:, None], grad, 0.0)


def add_ce_and_mask(rows: Tensor, grad: Tensor | None, s: Tensor, labels: Tensor | None, *, alpha: float,
                    ignore_index: int, mask: Tensor | None, need_grad: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A CPU path's KD rows (alpha-weighted already) and gradient (or None: no KD term), finished:
    plus (1 - alpha) CE on the labelled rows, a zero gradient where neither term gave one, zeros
    outside `mask`; the gradient in `dtype` (the student's)."""
    if labels is not None and alpha < 1:
        ce, ce_grad = ce_rows_and_grad(s, labels, ignore_index, mask, need_grad=need_grad)
        rows += (1 - alpha) * ce
        if need_grad:
            term = ce_grad.mul_(1 - alpha)
            grad = term if grad is None else grad.add_(term)
    if need_grad and grad is None:  # neither term (alpha 0 without labels): a zero gradient
        grad = torch.zeros_like(s)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
        if need_grad:
            grad = torch.where(mask[:, None], grad, 0.0)
    return rows, None if grad is None else grad.to(dtype)
