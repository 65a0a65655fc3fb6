"""The SPEC's multi-teacher KD losses in plain PyTorch through autograd: the yardstick for every test,
and the dense loss's CPU path (the sparse loss's CPU path is `sparse_cpu.py`, checked against it).

Common to both: student logits s (N, V), temperature T, per-row teacher weights w_nk (normalised to
sum to one over k), labels y (N,), mask (N,) bool. For each row n:

    q_n  = softmax(s_n / T)
    CE_n = logsumexp(s_n) - s_n[y_n]      (temperature 1; 0 without labels or where y_n == ignore_index)
    L_n  = alpha * KD_n + (1 - alpha) * CE_n,   and 0 (with a zero gradient) where mask_n is False

Dense (`kd_loss_ref`), teacher logits z (K, N, V):

    fusion "prob":   log p_n = logsumexp_k(z_kn / T - logsumexp(z_kn / T) + log w_nk)
    fusion "logit":  log p_n = log_softmax(sum_k w_nk z_kn / T)
    KD_n = T^2 * sum_v p_nv (log p_nv - log q_nv),   with 0 log 0 = 0

Sparse (`kd_sparse_loss_ref`), teacher ids and log-probabilities (K, N, k); S_kn the listed ids of
teacher k for row n that lie in [0, V); p_knv = exp(logprob); r_kn = max(0, 1 - sum_{S_kn} p_knv)
the teacher's tail; Q_kn = sum_{S_kn} q_nv:

    KD_n = T^2 * sum_k w_nk [ sum_{v in S_kn} p_knv log(p_knv / q_nv) + r_kn log(r_kn / (1 - Q_kn)) ]
    dKD_n / ds_n = T (q_n - p~_n),   p~_nj = sum_k w_nk (p_knj if j in S_kn else q_nj r_kn / (1 - Q_kn))

    log(1 - Q_kn) is the logsumexp of log q over the unlisted classes, never 1 minus a sum: a
    confident student (Q_kn > 1 - 1e-6) keeps its tail exactly. A teacher listing every class of
    [0, V) has no tail bucket: the student can put no mass there, so the term would be r log(r / 0),
    infinite for any rounding residue r > 0 (or mass on ids >= V) and independent of the student; it
    is left out. The gradient is the SPEC's T (q - p~), which sums to zero over the classes; where
    rounding makes sum p exceed 1 (r clamped to 0), or a tail bucket is left out, that differs from
    the formula's own derivative by T (1 - sum p - r) q, which `_spec_gradient_term` supplies.

Reductions: "mean" divides the sum over the rows in `mask` (all rows without one) by their number
(0, never NaN, when there are none), "sum", "none" -> (N,).

Arithmetic is float32 (float64 when any float input is float64). Teachers are folded in one at a
time, so besides the student's (N, V) temporaries at most one teacher's exist at once. Gradients
flow to `student_logits` only, through autograd. Rows outside `mask` are never looked at: their
inputs are replaced by harmless values first, so that garbage there (padding) cannot reach a
gradient, and no value check applies to them.

`check_kd_arguments` / `check_sparse_kd_arguments` are the one place that says what a valid call is;
the fused losses use them too. Value checks (weights, labels, teacher inputs) run eagerly for CPU
tensors (ValueError) and as `torch._assert_async` for CUDA tensors (no host synchronisation).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FUSIONS = ("prob", "logit")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

NONFINITE_TEACHER = "{name} must be finite or -inf: NaN or +inf in a counted row"
EMPTY_TEACHER_ROW = "{name}: a counted row of a teacher with weight > 0 has no finite logit"
EMPTY_LOGIT_MIX = "{name}: under fusion='logit' a counted row's mixed logits are all -inf"


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


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_student_logits(student_logits: Tensor) -> None:
    s = student_logits
    if not isinstance(s, Tensor):
        raise TypeError("student_logits must be a torch.Tensor")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"student_logits must be a float tensor, got {s.dtype}")
    if s.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got shape {tuple(s.shape)}")
    if s.shape[1] < 1:
        raise ValueError("student_logits must have at least one class (V >= 1)")


def check_common_arguments(
    N: int,
    V: int,
    device: torch.device,
    K: int,
    *,
    temperature: float,
    weights: Tensor | None,
    labels: Tensor | None,
    alpha: float,
    reduction: str,
    ignore_index: int,
    mask: Tensor | None,
) -> None:
    """The checks both losses share, for N rows of V student classes on `device`: the scalars,
    weights, labels and mask.

    Values of weights (finite, non-negative, positive sum per row) and labels (in [0, V) or
    ignore_index) are checked on the rows in `mask` only.
    """
    _check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    _check_real("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor of shape (N,)")
        if tuple(mask.shape) != (N,):
            raise ValueError(f"mask must have shape ({N},), got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device}, the student on {device}")
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.dtype not in FLOAT_DTYPES:
            raise TypeError("weights must be a float tensor of shape (K,) or (N, K)")
        if tuple(weights.shape) not in ((K,), (N, K)):
            raise ValueError(
                f"weights must have shape ({K},) or ({N}, {K}), got {tuple(weights.shape)}")
        if weights.device != device:
            raise ValueError(f"weights is on {weights.device}, the student on {device}")
        if weights.numel() > 0:
            w = weights.detach()
            ok = (torch.isfinite(w) & (w >= 0)).all(dim=-1) & (w.sum(dim=-1) > 0)
            if mask is not None and w.dim() == 2:
                ok = ok | ~mask
            check_value(ok.all(), "weights must be finite and non-negative with a positive sum "
                                  "per counted row")
    if labels is not None:
        check_labels(labels, N, V, device, ignore_index, mask)


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
    mask: Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the argument when a dense KD loss call is malformed.

    Shapes, dtypes, devices and scalars are checked on the host; values as `check_common_arguments`
    says. The teachers' values (finite or -inf) are checked where they are read: by the kernel
    (no extra pass over (K, N, V)) or by the reference.
    """
    s, z = student_logits, teacher_logits
    check_student_logits(s)
    if not isinstance(z, Tensor):
        raise TypeError("teacher_logits must be a torch.Tensor")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"teacher_logits must be a float tensor, got {z.dtype}")
    if z.dim() != 3 or z.shape[0] < 1 or tuple(z.shape[1:]) != tuple(s.shape):
        raise ValueError(
            f"teacher_logits must be (K, N, V) = (K, {s.shape[0]}, {s.shape[1]}) with K >= 1, "
            f"got shape {tuple(z.shape)}"
        )
    if z.device != s.device:
        raise ValueError(f"teacher_logits is on {z.device}, student_logits on {s.device}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    check_common_arguments(
        *s.shape, s.device, z.shape[0], temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )


def check_sparse_kd_arguments(
    N: int,
    V: int,
    device: torch.device,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float,
    weights: Tensor | None,
    labels: Tensor | None,
    alpha: float,
    reduction: str,
    ignore_index: int,
    mask: Tensor | None = None,
) -> None:
    """Raise TypeError/ValueError naming the argument when a sparse KD loss call on a student of
    N rows and V classes on `device` is malformed (the student's own tensor, where there is one, is
    checked by `check_student_logits`; the fused-linear loss has none).

    Ids must be >= 0 on the rows in `mask`; the log-probabilities' values (finite or -inf) are
    checked where they are read, by the kernel or the reference; that ids are distinct per teacher
    and row is checked by the reference only (the kernel assumes it).
    """
    ids, lp = teacher_ids, teacher_logprobs
    if not isinstance(ids, Tensor) or not is_integer_dtype(ids.dtype):
        raise TypeError("teacher_ids must be an integer tensor of shape (K, N, k)")
    if not isinstance(lp, Tensor) or lp.dtype not in FLOAT_DTYPES:
        raise TypeError("teacher_logprobs must be a float tensor of shape (K, N, k)")
    if ids.dim() != 3 or ids.shape[0] < 1 or ids.shape[2] < 1 or ids.shape[1] != N:
        raise ValueError(f"teacher_ids must be (K, N, k) = (K, {N}, k) with K, k >= 1, got shape "
                         f"{tuple(ids.shape)}")
    if tuple(lp.shape) != tuple(ids.shape):
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape {tuple(ids.shape)}, got "
                         f"{tuple(lp.shape)}")
    for name, t in (("teacher_ids", ids), ("teacher_logprobs", lp)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the student on {device}")
    check_common_arguments(
        N, V, device, ids.shape[0], temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    if ids.numel() > 0:
        negative = (ids.detach() < 0).any(dim=2).any(dim=0)  # (N,)
        if mask is not None:
            negative = negative & mask
        check_value(~negative.any(), "teacher_ids must be >= 0 in every counted row")


def check_labels(labels: Tensor, N: int, V: int, device: torch.device, ignore_index: int,
                 mask: Tensor | None = None) -> None:
    """labels: an integer (N,) tensor on `device`, each in [0, V) or ignore_index (rows outside
    `mask` are not looked at)."""
    if not isinstance(labels, Tensor) or not is_integer_dtype(labels.dtype):
        raise TypeError("labels must be an integer tensor of shape (N,)")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"labels must have shape ({N},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device}, the logits on {device}")
    if N > 0:
        ok = (labels == ignore_index) | ((labels >= 0) & (labels < V))
        if mask is not None:
            ok = ok | ~mask
        check_value(ok.all(), f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")


def normalised_log_weights(
    weights: Tensor | None, K: int, N: int, dtype: torch.dtype, device: torch.device,
    mask: Tensor | None = None,
) -> Tensor:
    """log w_nk with each row normalised to sum to one: (N, K) in `dtype` (expanded from (K,)).
    Rows outside `mask` get uniform weights (theirs may be anything, zeros included)."""
    if weights is None:
        return torch.full((1, K), -math.log(K), dtype=dtype, device=device).expand(N, K)
    w = weights.detach().to(dtype)
    if mask is not None and w.dim() == 2:
        w = torch.where(mask[:, None], w, 1.0)
    w = w / w.sum(dim=-1, keepdim=True)
    return torch.log(w).reshape(-1, K).expand(N, K)


def _masked_student(student_logits: Tensor, mask: Tensor | None, acc: torch.dtype) -> Tensor:
    """s in `acc`, differentiable, with rows outside `mask` replaced by zeros (zero gradient)."""
    s = student_logits.to(acc)
    return s if mask is None else torch.where(mask[:, None], s, 0.0)


def _add_ce_and_mask(rows: Tensor, s_acc: Tensor, labels: Tensor | None, alpha: float,
                     ignore_index: int, mask: Tensor | None) -> Tensor:
    """rows + (1 - alpha) CE on labelled rows; then 0 outside `mask`."""
    if labels is not None and alpha < 1:
        labelled = labels != ignore_index
        if mask is not None:
            labelled = labelled & mask  # a masked row's label may be anything
        y = torch.where(labelled, labels, 0).long()
        ce = torch.logsumexp(s_acc, dim=-1) - s_acc.gather(1, y[:, None]).squeeze(1)
        # where(), not a product: an unlabelled row's inf must not turn into NaN.
        rows = rows + (1 - alpha) * torch.where(labelled, ce, 0.0)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    return rows


def fused_teacher_log_probs(z: Tensor, weights: Tensor | None, T: float, fusion: str,
                            mask: Tensor | None, acc: torch.dtype) -> Tensor:
    """log p (N, V) of the K dense teachers z (K, N, V) fused at temperature T ("prob": the
    weighted mixture of their softmaxes; "logit": the softmax of their weighted logits), in `acc`;
    rows outside `mask` read as zeros. Raises ValueError on a counted row's NaN/+inf, a teacher
    row with no finite logit, or an all -inf mix. Shared by the reference and the CPU path."""
    K, N, V = z.shape
    log_w = normalised_log_weights(weights, K, N, acc, z.device, mask)  # (N, K)
    keep = None if mask is None else mask[:, None]
    nonfinite = torch.zeros(N, dtype=torch.bool, device=z.device)
    if fusion == "prob":
        empty = nonfinite.clone()
        log_p = None
        for k in range(K):
            # log(w_k softmax(z_k / T)); a teacher with w_k = 0 is left out of the row (-inf,
            # which logaddexp absorbs), whatever its logits, even an all -inf row.
            log_wk = log_w[:, k : k + 1]
            on = log_wk[:, 0] > -math.inf
            zk = z[k].to(acc) if keep is None else torch.where(keep, z[k].to(acc), 0.0)
            nonfinite |= on & (zk.isnan() | (zk == math.inf)).any(dim=-1)
            empty |= on & (zk.amax(dim=-1) == -math.inf)
            term = torch.log_softmax(zk / T, dim=-1) + log_wk
            term = torch.where(log_wk == -math.inf, -math.inf, term)
            log_p = term if log_p is None else torch.logaddexp(log_p, term)
            del term, zk  # one teacher's temporaries at a time
        check_value(~empty.any(), EMPTY_TEACHER_ROW.format(name="teacher_logits"))
    else:
        fused = torch.zeros(N, V, dtype=acc, device=z.device)
        w = log_w.exp()
        for k in range(K):
            wk = w[:, k : k + 1]
            zk = z[k].to(acc) if keep is None else torch.where(keep, z[k].to(acc), 0.0)
            nonfinite |= (wk[:, 0] > 0) & (zk.isnan() | (zk == math.inf)).any(dim=-1)
            # where(): a zero weight must silence the teacher even where its logit is -inf.
            fused += torch.where(wk > 0, wk * zk, 0.0)
            del zk
        check_value(~(fused.amax(dim=-1) == -math.inf).any(),
                    EMPTY_LOGIT_MIX.format(name="teacher_logits"))
        log_p = torch.log_softmax(fused / T, dim=-1)
        del fused
    check_value(~nonfinite.any(), NONFINITE_TEACHER.format(name="teacher_logits"))
    # Renormalised: the weights' log-sum is 0 only up to rounding, and a single class (V = 1)
    # must give exactly p = 1 and KD = 0.
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_p


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
    mask: Tensor | None = None,
) -> Tensor:
    """Per-row dense losses L_n (N,), 0 outside `mask`. Arguments are assumed valid
    (`check_kd_arguments`); the teachers' values are checked here."""
    z = teacher_logits.detach()
    K, N, V = z.shape
    acc = accumulation_dtype(student_logits, z, weights)
    T = float(temperature)
    s_acc = _masked_student(student_logits, mask, acc)  # (N, V), differentiable
    rows = s_acc[:, :0].sum(dim=-1)  # (N,) zeros that are part of the graph (zero gradient)

    if alpha > 0:
        log_q = torch.log_softmax(s_acc / T, dim=-1)  # (N, V)
        log_p = fused_teacher_log_probs(z, weights, T, fusion, mask, acc)
        p = log_p.exp()
        # 0 log 0 = 0: a class the teachers rule out contributes nothing, whatever the student says.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        rows = rows + alpha * T * T * kl
    return _add_ce_and_mask(rows, s_acc, labels, alpha, ignore_index, mask)


def check_sparse_teacher_values(ids: Tensor, logprobs: Tensor, on: Tensor) -> None:
    """Distinct ids per (teacher, row) and log-probabilities finite or -inf, for teachers `on`
    (N, K) in a row. ids and logprobs (K, N, k) have had rows outside the mask replaced."""
    nonfinite = (logprobs.isnan() | (logprobs == math.inf)).any(dim=2) & on.T  # (K, N)
    check_value(~nonfinite.any(), NONFINITE_TEACHER.format(name="teacher_logprobs"))
    if ids.shape[2] > 1:
        ordered = ids.sort(dim=2).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
        check_value(~repeated, "teacher_ids must be distinct per teacher and row")


def _spec_gradient_term(coefficient: Tensor, a: Tensor) -> Tensor:
    """0 in value, with gradient coefficient * softmax(a) with respect to a: what turns the KD
    formula's own derivative into the SPEC's gradient T (q - p~) (see the module's header)."""
    lse = torch.logsumexp(a, dim=-1)
    return coefficient * (lse - lse.detach())


def kd_sparse_loss_rows_ref(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-row sparse losses L_n (N,), 0 outside `mask`. Arguments are assumed valid
    (`check_sparse_kd_arguments`); the teachers' values are checked here."""
    K, N, k = teacher_ids.shape
    V = student_logits.shape[1]
    acc = accumulation_dtype(student_logits, teacher_logprobs, weights)
    T = float(temperature)
    s_acc = _masked_student(student_logits, mask, acc)  # (N, V), differentiable
    rows = s_acc[:, :0].sum(dim=-1)  # (N,) zeros in the graph

    if alpha > 0:
        ids = teacher_ids.detach().long()
        lp = teacher_logprobs.detach().to(acc)
        if mask is not None:  # rows outside the mask: distinct ids, no teacher mass
            keep = mask[None, :, None]
            ids = torch.where(keep, ids, torch.arange(k, device=ids.device))
            lp = torch.where(keep, lp, -math.inf)
        log_w = normalised_log_weights(weights, K, N, acc, s_acc.device, mask)  # (N, K)
        w = log_w.exp()
        check_sparse_teacher_values(ids, lp, w > 0)
        a = s_acc / T
        log_q = torch.log_softmax(a, dim=-1)  # (N, V)
        in_range = ids < V  # ids at or beyond V are tail mass
        safe_ids = torch.where(in_range, ids, 0)
        p = torch.where(in_range, lp.exp(), 0.0)  # (K, N, k)
        kd = rows
        for t in range(K):  # one teacher's (N, V) temporaries at a time
            listed = torch.zeros(N, V, dtype=acc, device=s_acc.device)
            listed = listed.scatter_add_(1, safe_ids[t], in_range[t].to(acc)) > 0  # (N, V)
            has_tail = listed.sum(dim=-1) < V  # some class of [0, V) is unlisted
            P = p[t].sum(dim=-1)
            r = torch.where(has_tail, (1 - P).clamp(min=0), 0.0)
            listed_kl = torch.where(p[t] > 0, p[t] * (lp[t] - log_q.gather(1, safe_ids[t])), 0.0)
            # log(1 - Q): the student's unlisted log-probabilities summed in log space. Rows
            # without a tail take the whole row instead, so that no logsumexp of only -inf (whose
            # gradient is NaN) is ever formed.
            log_tail = torch.logsumexp(
                torch.where(listed & has_tail[:, None], -math.inf, log_q), dim=-1)
            tail_kl = torch.where(r > 0, r * (torch.log(r) - log_tail), 0.0)
            term = listed_kl.sum(dim=-1) + tail_kl + _spec_gradient_term(1 - P - r, a)
            kd = kd + torch.where(w[:, t] > 0, w[:, t] * term, 0.0)
            del listed
        rows = rows + alpha * T * T * kd
    return _add_ce_and_mask(rows, s_acc, labels, alpha, ignore_index, mask)


def reduce_rows(rows: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Apply the SPEC's reduction to per-row losses (mean over the rows in mask, 0 when none)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(rows.shape[0], 1)
    return total / mask.sum().clamp(min=1)  # a device tensor: no host sync


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
    mask: Tensor | None = None,
) -> Tensor:
    """The dense multi-teacher KD loss of the SPEC in plain PyTorch (`fused_kd_loss`'s signature).

    Returns a scalar for "mean"/"sum" and (N,) for "none", in float32 (float64 if any input is
    float64). Differentiable with respect to `student_logits` only.
    """
    check_kd_arguments(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    rows = kd_loss_rows_ref(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, ignore_index=ignore_index, mask=mask,
    )
    return reduce_rows(rows, mask, reduction)


def kd_sparse_loss_ref(
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
    """The sparse (top-k) multi-teacher KD loss of the SPEC in plain PyTorch
    (`fused_sparse_kd_loss`'s signature).

    teacher_ids (K, N, k) integer, distinct per teacher and row (checked); ids at or beyond V are
    tail mass. teacher_logprobs (K, N, k): each listed class's log-probability at this temperature.
    Returns float32 (float64 if any input is float64); differentiable in `student_logits` only.
    """
    check_student_logits(student_logits)
    check_sparse_kd_arguments(
        *student_logits.shape, student_logits.device, teacher_ids, teacher_logprobs,
        temperature=temperature, weights=weights,
        labels=labels, alpha=alpha, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    rows = kd_sparse_loss_rows_ref(
        student_logits, teacher_ids, teacher_logprobs, temperature=temperature, weights=weights,
        labels=labels, alpha=alpha, ignore_index=ignore_index, mask=mask,
    )
    return reduce_rows(rows, mask, reduction)
