"""The SPEC's multi-teacher KD loss in plain PyTorch: the CPU path and the yardstick for every test.

For student logits s (N, V), teacher logits z (K, N, V), temperature T, per-row teacher weights
w_nk (normalised to sum to one over k) and labels y (N,):

    fusion "prob":   log p_n = logsumexp_k(z_kn / T - logsumexp(z_kn / T) + log w_nk)
    fusion "logit":  log p_n = log_softmax(sum_k w_nk z_kn / T)
    KD_n = T^2 * sum_v p_nv (log p_nv - log softmax(s_n / T)_v),  with 0 log 0 = 0
    CE_n = logsumexp(s_n) - s_n[y_n]                              (temperature 1; labels only)
    L_n  = alpha * KD_n + (1 - alpha) * CE_n,   0 where y_n == ignore_index

Without labels the CE term is absent: L_n = alpha * KD_n (identically 0 for alpha = 0, with a zero
gradient, so that a caller splitting a batch into labelled and unlabelled rows needs no special
case). Reductions: "mean" divides the sum over counted rows by their number (0, never NaN, when
there are none), "sum", "none" -> (N,).

Arithmetic is float32 (float64 when any input is float64). Teachers are folded in one at a time,
so besides the student's (N, V) temporaries at most one teacher's (N, V) temporaries exist at
once. Gradients flow to `student_logits` only, through autograd.

`check_kd_arguments` is the one place that says what a valid call is; `fused_kd_loss` uses it too.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FUSIONS = ("prob", "logit")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the dtype losses are computed in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_value(ok: Tensor, message: str) -> None:
    """Raise ValueError(message) unless `ok` (a bool tensor) is true, without syncing a GPU.

    CPU tensors are checked eagerly (a CPU read costs nothing). CUDA tensors, and anything under
    torch.compile, get `torch._assert_async`: the check runs on the device, a failure surfaces as
    a device-side assert (RuntimeError) at the next synchronisation, and the host never waits.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_kd_arguments(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    weights: Tensor | None,
    labels: Tensor | None,
    alpha: float,
    fusion: str,
    reduction: str,
    ignore_index: int,
) -> None:
    """Raise TypeError/ValueError naming the argument when a KD loss call is malformed.

    Shapes, dtypes, devices and scalars are checked on the host. The values of `weights`
    (finite, non-negative, positive sum per row) and `labels` (in [0, V) or ignore_index) are
    checked eagerly for CPU tensors and with `torch._assert_async` for CUDA tensors, so that
    the hot path never waits for the GPU.
    """
    s, z = student_logits, teacher_logits
    if not isinstance(s, Tensor) or not isinstance(z, Tensor):
        raise TypeError("student_logits and teacher_logits must be torch.Tensor")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"student_logits must be a float tensor, got {s.dtype}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_logits must be a float tensor, got {z.dtype}")
    if s.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(s.shape)}")
    if z.dim() != 3 or z.shape[0] < 1 or tuple(z.shape[1:]) != tuple(s.shape):
        raise ValueError(
            f"teacher_logits must be (K, N, V) = (K, {s.shape[0]}, {s.shape[1]}) with K >= 1, "
            f"got shape {tuple(z.shape)}"
        )
    if z.device != s.device:
        raise ValueError(f"teacher_logits is on {z.device}, student_logits on {s.device}")
    if s.shape[1] < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    K, N, V = z.shape
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.dtype not in FLOAT_DTYPES:
            raise TypeError("weights must be a float tensor of shape (K,) or (N, K)")
        if tuple(weights.shape) not in ((K,), (N, K)):
            raise ValueError(
                f"weights must have shape ({K},) or ({N}, {K}), got {tuple(weights.shape)}")
        if weights.device != s.device:
            raise ValueError(f"weights is on {weights.device}, student_logits on {s.device}")
        if weights.numel() > 0:
            w = weights.detach()
            check_value(
                (torch.isfinite(w) & (w >= 0)).all() & (w.sum(dim=-1) > 0).all(),
                "weights must be finite and non-negative with a positive sum per row",
            )
    if labels is not None:
        check_labels(labels, s, "student_logits", ignore_index)


def check_labels(labels: Tensor, logits: Tensor, logits_name: str, ignore_index: int) -> None:
    """labels: an integer (N,) tensor beside `logits` (..., N, V), each in [0, V) or ignore_index."""
    N, V = logits.shape[-2:]
    if not isinstance(labels, Tensor) or not is_integer_dtype(labels.dtype):
        raise TypeError("labels must be an integer tensor of shape (N,)")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels must have shape ({N},), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device}, {logits_name} on {logits.device}")
    if N > 0:
        check_value(
            ((labels == ignore_index) | ((labels >= 0) & (labels < V))).all(),
            f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}",
        )


def normalised_log_weights(
    weights: Tensor | None, K: int, N: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """log w_nk with each row normalised to sum to one: (N, K) in `dtype` (expanded from (K,))."""
    if weights is None:
        return torch.full((1, K), -math.log(K), dtype=dtype, device=device).expand(N, K)
    w = weights.detach().to(dtype)
    w = w / w.sum(dim=-1, keepdim=True)
    return torch.log(w).reshape(-1, K).expand(N, K)


def kd_loss_rows_ref(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    fusion: str = "prob",
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor | None]:
    """Per-row losses L_n (0 on ignored rows) and the mask of counted rows (None without labels).

    Arguments are assumed valid (see `check_kd_arguments`).
    """
    s, z = student_logits, teacher_logits
    K, N, V = z.shape
    acc = accumulation_dtype(s, z, weights)
    T = float(temperature)
    s_acc = s.to(acc)  # (N, V), differentiable
    rows = s_acc[:, :0].sum(dim=-1)  # (N,) zeros that are part of the graph (zero gradient)

    if alpha > 0:
        log_q = torch.log_softmax(s_acc / T, dim=-1)  # (N, V)
        log_w = normalised_log_weights(weights, K, N, acc, s.device)  # (N, K)
        z = z.detach()
        if fusion == "prob":
            log_p = None
            for k in range(K):
                # log(w_k softmax(z_k / T)); a teacher with w_k = 0 is left out of the row (-inf,
                # which logaddexp absorbs), whatever its logits, even an all -inf row.
                log_wk = log_w[:, k : k + 1]
                term = torch.log_softmax(z[k].to(acc) / T, dim=-1) + log_wk
                term = torch.where(log_wk == -math.inf, -math.inf, term)
                log_p = term if log_p is None else torch.logaddexp(log_p, term)
                del term  # one teacher's temporaries at a time
        else:
            fused = torch.zeros(N, V, dtype=acc, device=s.device)
            w = log_w.exp()
            for k in range(K):
                wk = w[:, k : k + 1]
                # where(): a zero weight must silence the teacher even where its logit is -inf.
                fused += torch.where(wk > 0, wk * z[k].to(acc), 0.0)
            log_p = torch.log_softmax(fused / T, dim=-1)
            del fused
        p = log_p.exp()
        # 0 log 0 = 0: a class the teachers rule out contributes nothing, whatever the student says.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        rows = rows + alpha * T * T * kl

    counted = None
    if labels is not None:
        counted = labels != ignore_index
        if alpha < 1:
            y = torch.where(counted, labels, 0).long()
            ce = torch.logsumexp(s_acc, dim=-1) - s_acc.gather(1, y[:, None]).squeeze(1)
            rows = rows + (1 - alpha) * ce
        # where(), not a product: an ignored row's inf must not turn into NaN.
        rows = torch.where(counted, rows, 0.0)
    return rows, counted


def reduce_rows(rows: Tensor, counted: Tensor | None, reduction: str) -> Tensor:
    """Apply the SPEC's reduction to per-row losses (mean over counted rows, 0 when none)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if counted is None:
        return total / max(rows.shape[0], 1)
    return total / counted.sum().clamp(min=1)  # a device tensor: no host sync


def kd_loss_ref(
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
) -> Tensor:
    """The multi-teacher KD loss of the SPEC in plain PyTorch (same signature as `fused_kd_loss`).

    Returns a scalar for "mean"/"sum" and (N,) for "none", in float32 (float64 if any input is
    float64). Differentiable with respect to `student_logits` only.
    """
    check_kd_arguments(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, reduction=reduction, ignore_index=ignore_index,
    )
    rows, counted = kd_loss_rows_ref(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, ignore_index=ignore_index,
    )
    return reduce_rows(rows, counted, reduction)
