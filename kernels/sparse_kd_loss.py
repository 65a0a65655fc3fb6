"""Sparse (top-k) multi-teacher knowledge-distillation loss: one Triton program per row.

The maths, for one row (s: V student logits, T: temperature, K teachers each listing k ids S_k with
log-probabilities lp_k at T, weights w_k normalised to sum to one, y: label):

    a = s / T,  log q_v = a_v - logsumexp(a)                           student at temperature T
    p_kv = exp(lp_kv) for v in S_k (ids >= V are not in S_k: their mass is tail)
    r_k = max(0, 1 - sum_{S_k} p_kv)                                   each teacher's tail
    1 - Q_k = sum of q over the classes of [0, V) that teacher k does not list
    KD = T^2 sum_k w_k [ sum_{S_k} p_kv log(p_kv / q_v) + r_k log(r_k / (1 - Q_k)) ]
    CE = logsumexp(s) - s_y                              (temperature 1; labelled rows only)
    L  = alpha KD + (1 - alpha) CE                       (0 for rows outside the mask)
    dL/ds_v = alpha T (q_v - p~_v) + (1 - alpha)(softmax(s)_v - [v == y]),
        p~_v = sum_k w_k (p_kv if v in S_k else q_v rho_k),   rho_k = r_k / (1 - Q_k)

A teacher listing every class of [0, V) has no tail bucket (the reference's header says why).

The gradient is written in the forward pass: first, for every class, the unlisted form
    g_v = alpha T q_v (1 - C),   C = sum_k w_k rho_k,
then, for each listed id, its own value alpha T (q_v (1 - sum_{j not listing v} w_j rho_j)
- sum_{j listing v} w_j p_jv), summed in that order: rho_j reaches 1e6 for a confident student,
and q_v (1 - C) + q_v rho_j would lose the result to cancellation. Which teachers list an id is
found by comparing the row's K x k ids with
each other (K^2 k^2 comparisons per row: at K = 4, k = 64 a sixth of the V = 128k work; the
kernel assumes ids distinct per teacher and row, as the SPEC says, and does not check it). Every
listed copy of an id writes the same bits, so duplicates across teachers are harmless. Each value is
rounded once to the student's dtype; the backward only rescales in place (mtkd.kernels.launch).

1 - Q_k without cancellation. A confident student (Q_k > 1 - 1e-6) makes 1 - sum q a difference
of two numbers equal to float32 precision. Instead, with M the row's largest a, each class's
e_v = exp(a_v - M) is computed as 2^floor(y) * exp2(y - floor(y)), y = (a_v - M) log2(e), and
summed in float64: Z = sum_v e_v. The listed classes' e_v are recomputed from the same a_v by the
same instructions (fused multiply-add contraction is switched off for this kernel so that both
places round alike), so they are the very same float64 numbers, and Z - sum_{S_k} e_v is the sum
of the unlisted ones up to float64 rounding (~1e-16 Z): 1 - Q_k keeps ~1e-10 relative accuracy at
Q_k = 1 - 1e-6. The power-of-two split keeps classes down to e^-708 below the maximum (float32
would flush them at e^-87, which T = 0.05 reaches with logits of a few units). A tail below 2^-30
of Z is beyond what the difference resolves (Z's own float64 rounding is ~1e-16 Z): for those
teachers the tail is summed directly, in log space, over the classes each does not list, found by
comparing every class with its ids (V * K * k comparisons for that row: a slow path for very
confident students or small T, exact to float32 in log space). log Z itself is as precise as a
max-shifted float32 logsumexp.

Passes over the row: (0) its maximum, (1) Z in float64 (and the temperature-1 sum for CE when
T != 1), (2) the gradient. Passes 1 and 2 re-read the row right after the previous pass, while it
is likely still in L2.

Bytes it must move, with e_s the student's element size, e_i and e_p those of ids and
log-probabilities:

    student       N * V * e_s            read
    gradient      N * V * e_s            written (only when the student requires grad)
    teachers      K * N * k * (e_i + e_p) read (the overlap step re-reads them, from L1/L2)
    O(N) more: labels, weights, mask, per-row losses.

The gradient may be written over the student's own logits (`grad_out=student_logits`): the
fused-linear loss does that with each chunk's logits. Every value the later steps need from the
row (the listed classes' and the label's logits) is read before pass 2 overwrites it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtkd.kernels.launch import (
    BAD_NONFINITE,
    MAX,
    SUM,
    check_teacher_report,
    device_of,
    launchable,
    next_pow2,
    refuse_forward_ad,
    register_gradient_in_forward,
    runs_triton,
)
from mtkd.kernels.reference import (
    NONFINITE_TEACHER,
    accumulation_dtype,
    check_sparse_kd_arguments,
    check_student_logits,
)
from mtkd.kernels.sparse_cpu import sparse_kd_loss_cpu

# Classes per block of the passes over V, at most; and how many (listed id, other teacher's id)
# pairs the overlap step compares at once (its 3-D tile).
_BLOCK_V = 4096
_PAIR_TILE = 4096


@triton.jit
def _sparse_kd_loss_kernel(
    s_ptr,  # (N, V) student logits, fp16 / bf16 / fp32 / fp64, any strides
    ids_ptr,  # (K, N, k) listed class ids, int32 or int64, any strides
    lp_ptr,  # (K, N, k) their log-probabilities at T, any float dtype, any strides
    w_ptr,  # (N, K) or (K,) non-negative teacher weights; read only if HAS_WEIGHTS
    y_ptr,  # (N,) integer labels; read only if HAS_LABELS
    m_ptr,  # (N,) bool row mask; read only if HAS_MASK
    count_ptr,  # () the mean's divisor (rows counted); read only if MEAN_OVER_COUNT
    loss_ptr,  # (N,) out: L_n times the reduction's row scale, in ACC_DTYPE
    bad_ptr,  # (N,) int8 out: 0, or BAD_NONFINITE for a NaN / +inf log-probability
    grad_ptr,  # (N, V) out: dL/ds_n times the row scale, in s's dtype; if HAS_GRAD (may be s_ptr)
    stride_sn,  # elements between two student rows
    stride_sv,  # elements between two student classes
    stride_ik,  # elements between two teachers' ids
    stride_in,  # elements between two rows of ids
    stride_il,  # elements between two listed ids
    stride_pk,  # elements between two teachers' log-probabilities
    stride_pn,  # elements between two rows of log-probabilities
    stride_pl,  # elements between two listed log-probabilities
    stride_wn,  # elements between two weight rows (0 for (K,) weights)
    stride_wk,  # elements between two teachers' weights
    stride_y,  # elements between two labels
    stride_m,  # elements between two mask entries
    stride_gn,  # elements between two gradient rows
    stride_gv,  # elements between two gradient classes
    K,  # number of teachers
    V,  # number of student classes
    L,  # ids listed per teacher and row (k)
    inv_temperature,  # 1 / T
    kd_loss_scale,  # alpha * T^2
    kd_grad_scale,  # alpha * T
    ce_scale,  # 1 - alpha
    mean_divisor,  # N for "mean" without a mask, else 1 (MEAN_OVER_COUNT reads count_ptr instead)
    ignore_index,  # label of rows without a CE term
    BLOCK_K: tl.constexpr,  # next power of two >= K
    BLOCK_L: tl.constexpr,  # next power of two >= k
    BLOCK_J: tl.constexpr,  # another teacher's ids compared with the row's at once (overlap step)
    BLOCK_F: tl.constexpr,  # classes compared with the row's ids at once (deep-tail step)
    BLOCK_V: tl.constexpr,  # classes per block (a power of two)
    HAS_WEIGHTS: tl.constexpr,  # weights given (else: uniform 1 / K)
    HAS_LABELS: tl.constexpr,  # labels given: rows labelled ignore_index have no CE term
    HAS_MASK: tl.constexpr,  # mask given: rows outside it are skipped
    USE_KD: tl.constexpr,  # alpha > 0: the teachers are read at all
    USE_CE: tl.constexpr,  # labels given and alpha < 1
    CE_AT_T: tl.constexpr,  # T == 1 and USE_KD: CE reuses the KD softmax statistics
    HAS_GRAD: tl.constexpr,  # write the gradient
    MEAN_OVER_COUNT: tl.constexpr,  # "mean" with a divisor tensor: scale by 1 / max(count, 1)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 when an input is float64
):
    NEG_INF: tl.constexpr = float("-inf")
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)  # int64 before any offset
    s_row = s_ptr + row * stride_sn
    g_row = grad_ptr + row * stride_gn

    if HAS_MASK:
        counted = tl.load(m_ptr + row * stride_m) != 0
    else:
        counted = row >= 0
    if HAS_LABELS:
        label = tl.load(y_ptr + row * stride_y).to(tl.int64)
        labelled = counted & (label != ignore_index)
    else:
        label = row * 0 - 1
        labelled = row < 0
    # Rows outside the mask load nothing: their loads see zeros, which keeps their arithmetic
    # finite. (Bounds, not `mask & counted`: the interpreter turns `tensor & 0-d bool` into ints.)
    load_limit = tl.where(counted, V, 0)
    listed_limit = tl.where(counted, L, 0)
    if MEAN_OVER_COUNT:
        scale = 1.0 / tl.maximum(tl.load(count_ptr).to(ACC_DTYPE), 1.0)
    else:
        # Not mean_divisor.to(): triton specialises an int argument equal to 1 into a constexpr.
        scale = tl.full([], 1.0, ACC_DTYPE) / mean_divisor

    # Everything later steps need from the row, read before pass 2 may overwrite it (in place).
    if USE_CE:
        s_y = tl.load(s_row + label * stride_sv, mask=labelled, other=0.0).to(ACC_DTYPE)
    k_offs = tl.arange(0, BLOCK_K)
    k_in = k_offs < K
    if USE_KD:
        l_offs = tl.arange(0, BLOCK_L)
        slot = k_in[:, None] & (l_offs < listed_limit)[None, :]  # (BLOCK_K, BLOCK_L)
        ids = tl.load(ids_ptr + row * stride_in + k_offs[:, None].to(tl.int64) * stride_ik
                      + l_offs[None, :] * stride_il, mask=slot, other=0).to(tl.int64)
        ids = tl.where(slot, ids, V)  # an empty slot is no class of the student
        lp = tl.load(lp_ptr + row * stride_pn + k_offs[:, None].to(tl.int64) * stride_pk
                     + l_offs[None, :] * stride_pl, mask=slot, other=NEG_INF).to(ACC_DTYPE)
        listed = slot & (ids < V)  # (BLOCK_K, BLOCK_L): classes of [0, V) a teacher lists
        s_l = tl.load(s_row + ids * stride_sv, mask=listed, other=0.0).to(ACC_DTYPE)

        # Teacher weights, normalised per row; 0 for the padding teachers k >= K.
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + row * stride_wn + k_offs * stride_wk, mask=k_in, other=0.0)
            w = w.to(ACC_DTYPE)
        else:
            w = tl.where(k_in, 1.0, 0.0).to(ACC_DTYPE)
        w_sum = tl.reduce(w, 0, SUM)
        w = w / tl.where(w_sum > 0, w_sum, 1.0)  # (a masked row's weights may be all 0)
        w_on = w > 0  # a zero-weight teacher is left out of the row, whatever its values
        bad = slot & w_on[:, None] & ((lp != lp) | (lp == float("inf")))
        nonfinite = tl.reduce(tl.reduce(tl.where(bad, 1, 0), 1, MAX), 0, MAX)
        p = tl.where(listed, tl.exp(lp), 0.0)  # (BLOCK_K, BLOCK_L)

    # Pass 0: the row's largest logit (0 instead of -inf for a row with none).
    s_run = tl.full([BLOCK_V], NEG_INF, ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0).to(ACC_DTYPE)
        s_run = tl.maximum(s_run, tl.where(cols < V, s, NEG_INF))
    s_max = tl.reduce(s_run, 0, MAX)
    s_max = tl.where(s_max == NEG_INF, 0.0, s_max)
    a_max = s_max * inv_temperature  # = max(s / T): rounding is monotonic

    # Pass 1: Z = sum_v exp(a_v - a_max) in float64 from split exponentials (header), and the
    # temperature-1 sum for CE when T != 1.
    z_acc = tl.full([BLOCK_V], 0.0, tl.float64)
    ce_acc = tl.full([BLOCK_V], 0.0, ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0).to(ACC_DTYPE)
        s = tl.where(cols < V, s, NEG_INF)
        if USE_KD:
            y = tl.maximum((s * inv_temperature - a_max) * LOG2E, -1100.0)
            y_int = tl.floor(y)
            two_n = ((tl.maximum(y_int, -1023.0).to(tl.int32) + 1023).to(tl.int64) << 52)
            z_acc += tl.exp2(y - y_int).to(tl.float64) * two_n.to(tl.float64, bitcast=True)
        if USE_CE:
            if not CE_AT_T:
                ce_acc += tl.exp(s - s_max)
    if USE_KD:
        z_sum = tl.reduce(z_acc, 0, SUM)  # >= 1 on a counted row: its maximum gives exactly 1
        log_z = tl.log(z_sum).to(ACC_DTYPE)
    if USE_CE:
        if CE_AT_T:
            s_lsum = log_z
        else:
            s_lsum = tl.log(tl.reduce(ce_acc, 0, SUM))

    loss = tl.full([], 0.0, ACC_DTYPE)
    if USE_KD:
        b_l = s_l * inv_temperature - a_max  # (BLOCK_K, BLOCK_L)
        # The listed classes' share of Z, by the very instructions of pass 1.
        y = tl.maximum(b_l * LOG2E, -1100.0)
        y_int = tl.floor(y)
        two_n = ((tl.maximum(y_int, -1023.0).to(tl.int32) + 1023).to(tl.int64) << 52)
        e_l = tl.exp2(y - y_int).to(tl.float64) * two_n.to(tl.float64, bitcast=True)
        z_listed = tl.reduce(tl.where(listed, e_l, 0.0), 1, SUM)  # (BLOCK_K,) float64
        z_tail = tl.maximum(z_sum - z_listed, 0.0)
        log_tail_q = (tl.log(z_tail) - tl.log(z_sum)).to(ACC_DTYPE)  # log(1 - Q_k), -inf if none
        has_tail = tl.reduce(tl.where(listed, 1, 0), 1, SUM) < V
        # Below 2^-30 of Z the difference is no longer trustworthy (float64 rounding of Z is
        # ~1e-16 Z): such teachers' tails are summed directly, in log space, over the classes
        # they do not list (found by comparing each class with their ids). Rare outside very
        # confident students or small T; costs V * K * k comparisons for the row.
        deep = has_tail & (z_tail < z_sum * 9.313225746154785e-10)
        if tl.reduce(tl.where(deep, 1, 0), 0, MAX) > 0:
            t_run = tl.full([BLOCK_K], NEG_INF, ACC_DTYPE)
            t_sum = tl.full([BLOCK_K], 0.0, ACC_DTYPE)
            for v0 in range(0, V, BLOCK_F):
                cols = (v0 + tl.arange(0, BLOCK_F)).to(tl.int64)
                s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0)
                x = tl.where(cols < V, s.to(ACC_DTYPE) * inv_temperature - a_max, NEG_INF)
                match = ids[:, :, None] == cols[None, None, :]  # (BLOCK_K, BLOCK_L, BLOCK_F)
                is_listed = tl.reduce(tl.where(match, 1, 0), 1, MAX)  # (BLOCK_K, BLOCK_F)
                x_out = tl.where(is_listed > 0, NEG_INF, x[None, :])
                new_run = tl.maximum(t_run, tl.reduce(x_out, 1, MAX))
                safe = tl.where(new_run == NEG_INF, 0.0, new_run)
                t_sum = t_sum * tl.exp(t_run - safe)
                t_sum += tl.reduce(tl.exp(x_out - safe[:, None]), 1, SUM)
                t_run = new_run
            direct = tl.where(t_run == NEG_INF, NEG_INF, t_run + tl.log(t_sum)) - log_z
            log_tail_q = tl.where(deep, direct, log_tail_q)
        r = tl.where(has_tail, tl.maximum(1.0 - tl.reduce(p, 1, SUM), 0.0), 0.0)  # (BLOCK_K,)
        log_r = tl.log(tl.where(r > 0, r, 1.0))
        log_q_l = b_l - log_z
        kl = tl.reduce(tl.where(p > 0, p * (lp - log_q_l), 0.0), 1, SUM)
        kl += tl.where(r > 0, r * (log_r - log_tail_q), 0.0)
        loss += kd_loss_scale * tl.reduce(tl.where(w_on, w * kl, 0.0), 0, SUM)
        # log(r_k / (1 - Q_k)), kept in log space: a student tail below float32's range (~1e-40
        # at T = 0.1) makes the ratio itself overflow, while q_v times it never exceeds r_k <= 1.
        log_rho = tl.where(r > 0, log_r - log_tail_q, NEG_INF)
        t_w = tl.where(w_on, tl.log(tl.where(w_on, w, 1.0)) + log_rho, NEG_INF)  # log(w_k rho_k)
        t_wmax = tl.reduce(t_w, 0, MAX)
        t_wsafe = tl.where(t_wmax == NEG_INF, 0.0, t_wmax)
        log_spread = t_wsafe + tl.log(tl.reduce(tl.exp(t_w - t_wsafe), 0, SUM))  # log C, -inf if 0
    if USE_CE:
        loss += tl.where(labelled, ce_scale * (s_lsum - (s_y - s_max)), 0.0)
    tl.store(loss_ptr + row, tl.where(counted, loss * scale, 0.0))
    code = tl.full([], 0, tl.int32)
    if USE_KD:
        code = tl.where(counted & (nonfinite > 0), BAD_NONFINITE, 0)
    tl.store(bad_ptr + row, code.to(tl.int8))

    if HAS_GRAD:
        # Pass 2: every class in its unlisted form, rounded once.
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0)
            s = tl.where(cols < V, s.to(ACC_DTYPE), NEG_INF)
            g = tl.full([BLOCK_V], 0.0, ACC_DTYPE)
            if USE_KD:
                log_q = (s * inv_temperature - a_max) - log_z
                q = tl.exp(log_q)
                g += kd_grad_scale * (q - tl.exp(log_q + log_spread))  # q (1 - C)
            if USE_CE:
                if CE_AT_T:
                    soft = q
                else:
                    soft = tl.exp((s - s_max) - s_lsum)
                g += tl.where(labelled, ce_scale * (soft - tl.where(cols == label, 1.0, 0.0)), 0.0)
            g = tl.where(counted, g * scale, 0.0)
            if grad_ptr.dtype.element_ty != tl.float64:
                g = g.to(tl.float32)  # interpreter quirk: fp64 -> bf16 casts reinterpret bits
            tl.store(g_row + cols * stride_gv, g.to(grad_ptr.dtype.element_ty), mask=cols < V)

        if USE_KD:
            # The listed classes' exact values, over pass 2's (after it: a barrier orders the
            # program's own stores to the same addresses).
            tl.debug_barrier()
            q_l = tl.exp(log_q_l)
            # For each listed id: the weight of the teachers that do not list it, times their rho
            # (a sum of non-negative terms: forming q (1 - C) and adding q rho_j back would cancel
            # catastrophically when a confident student makes rho_j large), and the mixed
            # probability of those that do.
            q_spread_l = tl.full([BLOCK_K, BLOCK_L], 0.0, ACC_DTYPE)  # q times that sum
            p_mix_l = tl.full([BLOCK_K, BLOCK_L], 0.0, ACC_DTYPE)
            for j in range(0, K):
                is_j = k_offs == j
                w_j = tl.reduce(tl.where(is_j, w, 0.0), 0, SUM)
                log_rho_j = tl.reduce(tl.where(is_j, log_rho, NEG_INF), 0, MAX)
                listed_by_j = tl.full([BLOCK_K, BLOCK_L], 0, tl.int32)
                p_j_l = tl.full([BLOCK_K, BLOCK_L], 0.0, ACC_DTYPE)
                for c in range(0, L, BLOCK_J):
                    jl = c + tl.arange(0, BLOCK_J)
                    j_in = jl < listed_limit
                    id_j = tl.load(ids_ptr + row * stride_in + j * stride_ik + jl * stride_il,
                                   mask=j_in, other=0).to(tl.int64)
                    id_j = tl.where(j_in, id_j, -1)  # matches nothing
                    lp_j = tl.load(lp_ptr + row * stride_pn + j * stride_pk + jl * stride_pl,
                                   mask=j_in, other=NEG_INF).to(ACC_DTYPE)
                    p_j = tl.where(id_j < V, tl.exp(lp_j), 0.0)  # (BLOCK_J,)
                    match = ids[:, :, None] == id_j[None, None, :]  # (BLOCK_K, BLOCK_L, BLOCK_J)
                    listed_by_j = tl.maximum(listed_by_j,
                                             tl.reduce(tl.where(match, 1, 0), 2, MAX))
                    p_j_l += tl.reduce(tl.where(match, p_j[None, None, :], 0.0), 2, SUM)
                if w_j > 0:
                    q_spread_l += tl.where(listed_by_j == 0, w_j * tl.exp(log_q_l + log_rho_j), 0.0)
                    p_mix_l += w_j * p_j_l
            g_l = kd_grad_scale * ((q_l - q_spread_l) - p_mix_l)
            if USE_CE:
                if CE_AT_T:
                    soft_l = q_l
                else:
                    soft_l = tl.exp((s_l - s_max) - s_lsum)
                g_l += tl.where(labelled,
                                ce_scale * (soft_l - tl.where(ids == label, 1.0, 0.0)), 0.0)
            g_l = g_l * scale
            if grad_ptr.dtype.element_ty != tl.float64:
                g_l = g_l.to(tl.float32)  # same interpreter quirk
            tl.store(g_row + ids * stride_gv, g_l.to(grad_ptr.dtype.element_ty), mask=listed)


def sparse_kd_loss_forward(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    count: Optional[Tensor],
    *,
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    need_grad: bool,
    grad_out: Optional[Tensor] = None,
    block_v: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch `_sparse_kd_loss_kernel`: (per-row losses (N,), gradient (N, V) or (0,) without
    need_grad, per-row report of bad teacher inputs (N,) int8).

    The losses and the gradient are already multiplied by the reduction's row scale: for "mean",
    1 / max(count, 1) with `count` a device tensor (the rows counted; the fused-linear loss passes
    the whole batch's count to each chunk), or 1 / N when count is None. `grad_out` receives the
    gradient (it may be `student_logits` itself); by default a new contiguous tensor does.
    Arguments are assumed valid. `block_v` (a power of two) overrides the V block.
    """
    s, ids, lp = student_logits, teacher_ids, teacher_logprobs
    K, N, L = ids.shape
    V = s.shape[1]
    acc = accumulation_dtype(s, lp, weights)
    rows = torch.empty(N, dtype=acc, device=s.device)
    if need_grad and grad_out is None:
        grad_out = torch.empty((N, V), dtype=s.dtype, device=s.device)
    grad = grad_out if need_grad else torch.empty((0,), dtype=s.dtype, device=s.device)
    bad = torch.empty(N, dtype=torch.int8, device=s.device)
    if N == 0:
        return rows, grad, bad
    mean_over_count = reduction == "mean" and count is not None
    block_k, block_l = next_pow2(K), next_pow2(L)
    if block_v is None:
        block_v = min(next_pow2(V), _BLOCK_V)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_j = max(1, min(block_l, _PAIR_TILE // (block_k * block_l)))
    block_f = max(1, _PAIR_TILE // (block_k * block_l))
    num_warps = 4 if block_v <= 1024 else 8
    w_strides = (0, 0) if weights is None else (
        (0, weights.stride(0)) if weights.dim() == 1 else (weights.stride(0), weights.stride(1)))
    kernel = launchable(_sparse_kd_loss_kernel)
    T = float(temperature)
    with device_of(s):
        kernel[(N,)](
            s, ids, lp,
            rows if weights is None else weights,
            rows if labels is None else labels,
            rows if mask is None else mask,
            count if mean_over_count else rows,
            rows, bad,
            grad if need_grad else rows,
            s.stride(0), s.stride(1),
            *ids.stride(), *lp.stride(),
            *w_strides,
            0 if labels is None else labels.stride(0),
            0 if mask is None else mask.stride(0),
            *(grad.stride() if need_grad else (0, 0)),
            K, V, L,
            1.0 / T, alpha * T * T, alpha * T, 1.0 - alpha,
            N if reduction == "mean" and count is None else 1,
            ignore_index,
            BLOCK_K=block_k,
            BLOCK_L=block_l,
            BLOCK_J=block_j,
            BLOCK_F=block_f,
            BLOCK_V=block_v,
            HAS_WEIGHTS=weights is not None,
            HAS_LABELS=labels is not None,
            HAS_MASK=mask is not None,
            USE_KD=alpha > 0,
            USE_CE=labels is not None and alpha < 1,
            CE_AT_T=T == 1.0 and alpha > 0,
            HAS_GRAD=need_grad,
            MEAN_OVER_COUNT=mean_over_count,
            ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=num_warps,
            # Off: the listed classes' exp(a - M) must round exactly as pass 1's (header).
            enable_fp_fusion=False,
        )
    return rows, grad, bad


# The autograd wrapper is the dense kernel's (see kd_loss.py): an opaque custom op with a fake
# implementation, its gradient computed in the forward and rescaled in place by the backward.
@torch.library.custom_op("mtkd::sparse_kd_loss_forward", mutates_args=())
def _sparse_kd_loss_op(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    count = mask.sum() if reduction == "mean" and mask is not None else None
    return sparse_kd_loss_forward(
        student_logits, teacher_ids, teacher_logprobs, weights, labels, mask, count,
        temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
        need_grad=need_grad,
    )


@_sparse_kd_loss_op.register_fake
def _sparse_kd_loss_op_fake(student_logits, teacher_ids, teacher_logprobs, weights, labels, mask,
                            temperature, alpha, reduction, ignore_index, need_grad):
    N, V = student_logits.shape
    acc = accumulation_dtype(student_logits, teacher_logprobs, weights)
    rows = student_logits.new_empty(N, dtype=acc)
    grad = student_logits.new_empty((N, V) if need_grad else (0,))
    return rows, grad, student_logits.new_empty(N, dtype=torch.int8)


register_gradient_in_forward(_sparse_kd_loss_op, num_inputs=11)


@torch.library.custom_op("mtkd::sparse_kd_loss_in_place", mutates_args=("logits",))
def sparse_kd_loss_in_place(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    count: Optional[Tensor],
    temperature: float,
    alpha: float,
    reduction: str,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(rows, report), with the gradient written over `logits` when need_grad (the fused-linear
    loss's chunks); "mean" divides by `count`, the whole batch's."""
    rows, _, report = sparse_kd_loss_forward(
        logits, teacher_ids, teacher_logprobs, weights, labels, mask, count,
        temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=ignore_index,
        need_grad=need_grad, grad_out=logits,
    )
    return rows, report


@sparse_kd_loss_in_place.register_fake
def _sparse_kd_loss_in_place_fake(logits, teacher_ids, teacher_logprobs, weights, labels, mask,
                                  count, temperature, alpha, reduction, ignore_index, need_grad):
    acc = accumulation_dtype(logits, teacher_logprobs, weights)
    N = logits.shape[0]
    return logits.new_empty(N, dtype=acc), logits.new_empty(N, dtype=torch.int8)


TEACHER_MESSAGES = {BAD_NONFINITE: NONFINITE_TEACHER.format(name="teacher_logprobs")}


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
    """Sparse multi-teacher KD loss (SPEC "Kernels"), fused with its gradient to the student.

    Args:
        student_logits: (N, V) float tensor (fp16, bf16, fp32 or fp64), any strides.
        teacher_ids: (K, N, k) integer ids (int32 or int64), distinct per teacher and row (the
            reference checks it, the kernel assumes it); ids at or beyond V count as the
            teacher's tail mass.
        teacher_logprobs: (K, N, k) float, each listed class's log-probability under its teacher
            at this temperature (-inf: probability 0).
        temperature: T > 0.
        weights: None (uniform), (K,) or (N, K) non-negative teacher weights, normalised per row;
            a teacher with weight 0 is left out of that row.
        labels: (N,) integer labels for the CE term; rows equal to `ignore_index` drop the CE term
            only (they still distil).
        alpha: weight of KD in [0, 1]; CE gets 1 - alpha.
        reduction: "mean" over the rows in `mask` (0 when none), "sum", or "none" (N,).
        mask: (N,) bool or None: rows with False contribute nothing and are not counted; their
            inputs are not looked at (padding).

    Returns:
        The loss in float32 (float64 if an input is float64): a scalar, or (N,) for "none".
        Gradients flow to `student_logits` only, in its dtype.

    On CUDA tensors, or CPU tensors while TRITON_INTERPRET=1, this runs the Triton kernel;
    otherwise the same loss and gradient in PyTorch ops (`sparse_cpu.sparse_kd_loss_cpu`). Nothing waits for the GPU: bad values (NaN or
    +inf log-probabilities, negative ids, bad weights or labels) raise ValueError for CPU tensors
    and a device-side assert (`torch._assert_async`) for CUDA tensors. Forward-mode AD raises on
    the kernel path.
    """
    s = student_logits
    check_student_logits(s)
    check_sparse_kd_arguments(
        *s.shape, s.device, teacher_ids, teacher_logprobs, temperature=temperature,
        weights=weights, labels=labels, alpha=alpha, reduction=reduction,
        ignore_index=ignore_index, mask=mask,
    )
    if not runs_triton(s):
        return sparse_kd_loss_cpu(
            s, teacher_ids, teacher_logprobs, temperature=temperature, weights=weights,
            labels=labels, alpha=alpha, reduction=reduction, ignore_index=ignore_index, mask=mask,
        )
    refuse_forward_ad(s, "fused_sparse_kd_loss")
    need_grad = s.requires_grad and torch.is_grad_enabled()
    rows, _, report = _sparse_kd_loss_op(
        s, teacher_ids.detach(), teacher_logprobs.detach(),
        None if weights is None else weights.detach(), labels, mask, float(temperature),
        float(alpha), reduction, int(ignore_index), need_grad,
    )
    check_teacher_report(report, TEACHER_MESSAGES)
    # The kernel has already applied the mean's 1 / count to every row.
    return rows if reduction == "none" else rows.sum()
