"""The sparse KD loss on hidden @ weight.T (+ bias), in row chunks: the (N, V) logits never exist.

For hidden states h (N, H) and the student's output layer W (V, H), b (V,), the loss is
`fused_sparse_kd_loss(h @ W.T + b, ...)` exactly. A student with a 128k vocabulary and 8k rows
would hold 1e9 logits (2 GB in bf16) plus as much again for their gradient; here, per chunk of
`chunk_rows` rows (Liger-Kernel's fused-linear losses do the same for one dense teacher):

    logits  = h_c @ W.T + b                    (chunk_rows, V): the only matmul forward
    rows_c, dL/dlogits                         the sparse kernel, gradient written over the logits
    grad_h_c = dL/dlogits @ W                  (chunk_rows, H)
    grad_W  += dL/dlogits.T @ h_c              (V, H), accumulated in W's dtype (addmm)
    grad_b  += dL/dlogits summed over rows     (V,), accumulated in float32 (or float64)

so besides the inputs and the gradients it returns, one chunk's (chunk_rows, V) logits are alive at
a time. The gradients are computed in the forward pass (no logits are kept for a backward) and the
backward only multiplies them by the incoming gradient, in place, skipping an exact 1 as the dense
kernel's backward does. For reduction "none" the incoming gradient differs per row and is unknown
in the forward, so there the forward computes only the losses and the backward recomputes each
chunk's logits (one more matmul per chunk).

The default `chunk_rows` makes a chunk's logits about as large as the hidden states (Liger's rule:
N / ceil(V / H), rounded up to a power of two) where the kernel runs; on the CPU, 16 MiB of logits
(CPU_CHUNK_BYTES: the GPU rule's small chunks cost their fixed per-chunk work many times over). grad_W is accumulated in W's own dtype, rounded once
per chunk: a float32 accumulator would be another V x H x 4 bytes (2 GB at 128256 x 4096).

On CUDA (or under TRITON_INTERPRET=1) each chunk runs the Triton kernel; otherwise the same loss
and gradient in PyTorch ops (`sparse_cpu.py`), in the same chunked structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mtkd.kernels.reference import (
    FLOAT_DTYPES,
    accumulation_dtype,
    check_sparse_kd_arguments,
)
from mtkd.kernels.sparse_cpu import sparse_kd_rows_and_grad

try:
    from mtkd.kernels.launch import check_teacher_report, refuse_forward_ad, runs_triton, \
        scale_grad_rows
    from mtkd.kernels.sparse_kd_loss import TEACHER_MESSAGES, sparse_kd_loss_in_place
except ModuleNotFoundError as error:  # triton is Linux-only (pyproject): the reference path only
    if error.name != "triton":
        raise

    def runs_triton(tensor: Tensor) -> bool:
        return False

    def refuse_forward_ad(tensor: Tensor, name: str) -> None:
        return None

    def scale_grad_rows(grad: Tensor, grad_rows: Tensor) -> None:
        grad.mul_(grad_rows[:, None].to(grad.dtype))


@dataclass(frozen=True)
class LossOptions:
    """The sparse loss's scalar options, resolved once and handed down."""

    temperature: float
    alpha: float
    reduction: str
    ignore_index: int


# CPU: a chunk's logits take about this many bytes (float32). The GPU rule gives 32-row chunks at
# small H (N / ceil(V / H)), and on the CPU each chunk costs a fixed ~20 small ops (teacher checks,
# gathers, per-row sums), each a parallel section: forward + backward measured (bench/loss_cpu.py,
# 2 threads, load average ~4) 614 ms with 32-row chunks against 191 ms whole at N = 2048, V = 2048,
# H = 32, K = 2, k = 64, and 3136 ms against 1558 ms with 512-row chunks (16 MiB) at N = 4096,
# V = 8192, H = 64, K = 3; on 1 thread the two were alike (134 / 136 ms). The sparse pass holds ~6
# such (rows, V) temporaries: 16 MiB of logits is ~100 MiB alive. Chunks change the order in which
# grad_W and grad_b are summed over rows: float32 rounding, not bit for bit the GPU rule's result.
CPU_CHUNK_BYTES = 16 << 20


def default_chunk_rows(N: int, V: int, H: int, device: torch.device | str = "cuda") -> int:
    """Rows per chunk: on a GPU, so that a chunk's logits (rows x V) are about the hidden states'
    size (Liger's rule); on the CPU, CPU_CHUNK_BYTES of float32 logits (at most N rows)."""
    if torch.device(device).type == "cpu":
        return max(1, min(N, CPU_CHUNK_BYTES // (4 * V)))
    rows = math.ceil(N / math.ceil(V / H))
    return 1 << max(rows - 1, 0).bit_length()


def _rows_of(t: Optional[Tensor], rows: slice, dim: int = 0) -> Optional[Tensor]:
    if t is None:
        return None
    return t[:, rows] if dim == 1 else t[rows]


def _chunk_loss_cpu(logits, ids, logprobs, weights, labels, mask, options, divisor, need_grad):
    """Per-row losses of one chunk (times 1 / divisor) and their gradient, in PyTorch ops."""
    rows, grad = sparse_kd_rows_and_grad(
        logits, ids, logprobs, weights, labels, mask, temperature=options.temperature,
        alpha=options.alpha, ignore_index=options.ignore_index, need_grad=need_grad)
    if divisor is not None:
        rows = rows / divisor
        if grad is not None:
            grad = grad.div_(divisor)
    return rows, grad


def _chunk_loss_kernel(logits, ids, logprobs, weights, labels, mask, options, divisor,
                       need_grad):
    """The same with the Triton kernel, which writes the gradient over `logits` (contiguous)."""
    if divisor is not None and not isinstance(divisor, Tensor):
        divisor = torch.full((), divisor, dtype=torch.int64, device=logits.device)
    rows, report = sparse_kd_loss_in_place(
        logits, ids, logprobs, weights, labels, mask, divisor, options.temperature,
        options.alpha, "mean" if divisor is not None else "sum", options.ignore_index, need_grad)
    check_teacher_report(report, TEACHER_MESSAGES)
    return rows, logits if need_grad else None


def chunk_loss(logits, ids, logprobs, weights, labels, mask, options, divisor, need_grad):
    """(rows (n,) times 1 / divisor, dL/dlogits (n, V) or None) for one chunk of logits (n, V):
    the kernel where it runs (the gradient then replaces the logits), else `sparse_cpu`."""
    run = _chunk_loss_kernel if runs_triton(logits) else _chunk_loss_cpu
    return run(logits, ids, logprobs, weights, labels, mask, options, divisor, need_grad)


def _bias_accumulator(bias: Tensor) -> Tensor:
    # float32 (float64 for a float64 bias): (V,) is small, and a bf16 sum over chunks is not.
    return torch.zeros(bias.shape, dtype=accumulation_dtype(bias), device=bias.device)


def _scale_(t: Optional[Tensor], factor: Tensor) -> Optional[Tensor]:
    """t *= factor (a scalar tensor) in place, skipping an exact 1 without a host sync where the
    kernels run (the rows of `t` through the dense kernel's in-place row scaling)."""
    if t is not None:
        rows = t.view(1, -1) if t.dim() == 1 else t  # contiguous: made so in the forward
        scale_grad_rows(rows, factor.reshape(1).expand(rows.shape[0]))
    return t


class _FusedLinearSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, weights, labels, mask, options,
                chunk_rows):
        N = hidden.shape[0]
        need = ctx.needs_input_grad[:3]
        grads_now = any(need) and options.reduction != "none"
        divisor = None
        if options.reduction == "mean":
            divisor = max(N, 1) if mask is None else mask.sum().clamp(min=1)
        acc = accumulation_dtype(hidden, logprobs, weights)
        rows = torch.empty(N, dtype=acc, device=hidden.device)
        # Contiguous (not *_like, which keeps an input's strides): the backward scales rows.
        grad_hidden = hidden.new_empty(hidden.shape) if grads_now and need[0] else None
        grad_weight = weight.new_zeros(weight.shape) if grads_now and need[1] else None
        grad_bias = _bias_accumulator(bias) if grads_now and need[2] else None
        for start in range(0, N, chunk_rows):
            part = slice(start, start + chunk_rows)
            h = hidden[part]
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)  # (n, V)
            rows[part], grad = chunk_loss(
                logits, ids[:, part], logprobs[:, part], _rows_of(weights, part)
                if weights is not None and weights.dim() == 2 else weights,
                _rows_of(labels, part), _rows_of(mask, part), options, divisor, grads_now)
            del logits  # with the kernel, grad is the same buffer
            if grads_now:
                if grad_hidden is not None:
                    torch.mm(grad, weight, out=grad_hidden[part])
                if grad_weight is not None:
                    grad_weight.addmm_(grad.T, h)
                if grad_bias is not None:
                    grad_bias += grad.sum(dim=0, dtype=grad_bias.dtype)
            del grad
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.options, ctx.chunk_rows, ctx.grads_now = options, chunk_rows, grads_now
        if grads_now:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        else:
            ctx.save_for_backward(hidden, weight, bias, ids, logprobs, weights, labels, mask)
        return rows if options.reduction == "none" else rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads_now:
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            # In place: the forward's buffers become the gradients. A second backward through a
            # retained graph fails loudly (autograd sees the saved tensors changed).
            return (_scale_(grad_hidden, grad_out), _scale_(grad_weight, grad_out),
                    _scale_(grad_bias, grad_out)) + (None,) * 7
        hidden, weight, bias, ids, logprobs, weights, labels, mask = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grads = _recompute_grads(hidden, weight, bias, ids, logprobs, weights, labels, mask,
                                 ctx.options, ctx.chunk_rows, grad_out, need)
        return grads + (None,) * 7


def _recompute_grads(hidden, weight, bias, ids, logprobs, weights, labels, mask, options,
                     chunk_rows, grad_rows, need):
    """Reduction "none": each chunk's logits again, their gradient times grad_rows, the matmuls."""
    grad_hidden = hidden.new_empty(hidden.shape) if need[0] else None
    grad_weight = weight.new_zeros(weight.shape) if need[1] else None
    grad_bias = _bias_accumulator(bias) if need[2] else None
    for start in range(0, hidden.shape[0], chunk_rows):
        part = slice(start, start + chunk_rows)
        h = hidden[part]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        _, grad = chunk_loss(
            logits, ids[:, part], logprobs[:, part], _rows_of(weights, part)
            if weights is not None and weights.dim() == 2 else weights,
            _rows_of(labels, part), _rows_of(mask, part), options, None, True)
        del logits
        grad = grad.mul_(grad_rows[part, None].to(grad.dtype))
        if grad_hidden is not None:
            torch.mm(grad, weight, out=grad_hidden[part])
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, h)
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0, dtype=grad_bias.dtype)
        del grad
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def fused_linear_sparse_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_rows: Optional[int] = None,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    alpha: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """`fused_sparse_kd_loss(hidden @ weight.T + bias, teacher_ids, teacher_logprobs, ...)`
    computed in row chunks, so that no (N, V) tensor is ever alive whole.

    Args:
        hidden: (N, H) float tensor, the student's last hidden states.
        weight: (V, H) the student's output layer, in hidden's dtype; bias: None or (V,).
        chunk_rows: rows per chunk (default: a chunk's logits about the size of `hidden`).
        The other arguments are `fused_sparse_kd_loss`'s.

    Returns the loss (float32, float64 for float64 inputs); gradients flow to hidden, weight and
    bias, in their dtypes.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D float tensor")
    N, H = hidden.shape
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight must be (V, {H}) with V >= 1, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be None or a ({V},) tensor")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match hidden "
                             f"({hidden.dtype}, {hidden.device})")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, V, H, "cuda" if runs_triton(hidden) else "cpu")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    check_sparse_kd_arguments(
        N, V, hidden.device, teacher_ids, teacher_logprobs, temperature=temperature,
        weights=weights, labels=labels, alpha=alpha, reduction=reduction,
        ignore_index=ignore_index, mask=mask,
    )
    if runs_triton(hidden):
        refuse_forward_ad(hidden, "fused_linear_sparse_kd_loss")
        refuse_forward_ad(weight, "fused_linear_sparse_kd_loss")
    options = LossOptions(float(temperature), float(alpha), reduction, int(ignore_index))
    detach = lambda t: None if t is None else t.detach()  # noqa: E731  teachers take no gradient
    return _FusedLinearSparseKD.apply(
        hidden, weight, bias, detach(teacher_ids), detach(teacher_logprobs), detach(weights),
        labels, mask, options, chunk_rows)
