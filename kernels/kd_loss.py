"""Fused multi-teacher knowledge-distillation loss: one Triton program per row, loss and gradient.

The maths, for one row (s: V student logits, z: K x V teacher logits, T: temperature, w: K teacher
weights normalised to sum to one, y: label):

    log q_v = s_v / T - logsumexp(s / T)                               student at temperature T
    "prob":  log p_v = logsumexp_k(z_kv / T - logsumexp_v(z_k / T) + log w_k)   mixed softmaxes
    "logit": log p_v = u_v - logsumexp(u),  u_v = sum_k w_k z_kv / T       softmax of mixed logits
    KD = T^2 * sum_v p_v (log p_v - log q_v)              (terms with p_v = 0 are 0: 0 log 0 = 0)
    CE = logsumexp(s) - s_y                               (temperature 1; only with labels)
    L  = alpha * KD + (1 - alpha) * CE                    (0 for rows whose label is ignore_index)
    dL/ds_v = alpha * T * (q_v - p_v) + (1 - alpha) * (softmax(s)_v - [v == y])

Everything is computed in float32 (float64 when an input is float64), in log space: a teacher's
-inf logit is an exact zero probability, and a teacher with weight 0 is left out of its row.

The gradient is computed in the forward pass, already multiplied by the reduction's row scale
(1 / number of counted rows for "mean"; that number is a device tensor the kernel reads, so the
host never waits), and rounded once to the student's dtype with the label's -1 folded in. The
backward multiplies it in place by the incoming gradient and skips rows where that is exactly 1
(what `loss.backward()` sends through a mean or a sum), so backward usually moves no bytes at all.

Bytes it must move, with e_z and e_s the element sizes of teachers and student:

    teachers   K * N * V * e_z   read
    student        N * V * e_s   read
    gradient       N * V * e_s   written (only when the student requires grad)
    O(N) more: labels, weights, per-row losses.

Rows whose teacher tile (next_pow2(K) x next_pow2(V)) fits `_TILE_ELEMENTS` are done whole: every
byte above moves once. Longer rows (V up to 256k and beyond) take an online softmax over V blocks
in two passes: pass one keeps per-teacher and student running max / sum of exponentials, pass two
forms p, the KL and the gradient. Pass two re-reads the row right after pass one, while it is still
likely in L2, so HBM traffic stays close to the minimum. Rows of ignored labels read nothing.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtkd.kernels.launch import (
    BAD_EMPTY_LOGIT_MIX,
    BAD_EMPTY_TEACHER_ROW,
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
from mtkd.kernels.dense_cpu import kd_loss_cpu
from mtkd.kernels.reference import (
    EMPTY_LOGIT_MIX,
    EMPTY_TEACHER_ROW,
    NONFINITE_TEACHER,
    accumulation_dtype,
    check_kd_arguments,
)

# Rows whose teacher tile (BLOCK_K x BLOCK_V elements) fits _TILE_ELEMENTS are done whole; longer
# ones in V blocks of that size. With 16 warps on sm_90 (compiled here without a GPU and read back
# with cuobjdump) these tiles stay in registers, no spills; past 16 teachers the 2-D reductions
# need more registers, hence half the tile. Not yet tuned on hardware for speed.
_TILE_ELEMENTS = 8192
_TILE_ELEMENTS_MANY_TEACHERS = 4096

# Fused multiply-add contraction, stated rather than left to triton's default, which 3.9 warns
# will change in 3.10: the numerics should not move with a triton upgrade.
_FP_FUSION = True


@triton.jit
def _kd_loss_kernel(
    s_ptr,  # (N, V) student logits, fp16 / bf16 / fp32 / fp64, any strides
    z_ptr,  # (K, N, V) teacher logits, any float dtype, any strides
    w_ptr,  # (N, K) or (K,) non-negative teacher weights; read only if HAS_WEIGHTS
    y_ptr,  # (N,) integer labels; read only if HAS_LABELS
    m_ptr,  # (N,) bool row mask; read only if HAS_MASK
    count_ptr,  # () number of rows in the mask; read only if MEAN_OVER_COUNT
    loss_ptr,  # (N,) out: L_n times the reduction's row scale, in ACC_DTYPE
    bad_ptr,  # (N,) int8 out: 0, or which teacher input of a counted row is bad (BAD_* codes)
    grad_ptr,  # (N, V) out, contiguous: dL/ds_n times the row scale, in s's dtype; if HAS_GRAD
    stride_sn,  # elements between two student rows
    stride_sv,  # elements between two student classes
    stride_zk,  # elements between two teachers
    stride_zn,  # elements between two teacher rows
    stride_zv,  # elements between two teacher classes
    stride_wn,  # elements between two weight rows (0 for (K,) weights)
    stride_wk,  # elements between two teachers' weights
    stride_y,  # elements between two labels
    stride_m,  # elements between two mask entries
    K,  # number of teachers
    V,  # number of classes
    inv_temperature,  # 1 / T
    kd_loss_scale,  # alpha * T^2: the KL term's factor in the loss
    kd_grad_scale,  # alpha * T: the factor of (q - p) in the gradient
    ce_scale,  # 1 - alpha
    mean_divisor,  # N for "mean" without a mask, else 1 (MEAN_OVER_COUNT reads count_ptr instead)
    ignore_index,  # label of rows without a CE term
    BLOCK_K: tl.constexpr,  # teachers per tile: next power of two >= K
    BLOCK_V: tl.constexpr,  # classes per tile (a power of two)
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_V >= V: the row is one tile and is read once
    FUSION_PROB: tl.constexpr,  # mix teacher probabilities (else: mix teacher logits)
    HAS_WEIGHTS: tl.constexpr,  # weights given (else: uniform 1 / K)
    HAS_LABELS: tl.constexpr,  # labels given: rows labelled ignore_index have no CE term
    HAS_MASK: tl.constexpr,  # mask given: rows outside it are skipped
    USE_KD: tl.constexpr,  # alpha > 0: the teachers are read at all
    USE_CE: tl.constexpr,  # labels given and alpha < 1
    HAS_GRAD: tl.constexpr,  # write the gradient
    MEAN_OVER_COUNT: tl.constexpr,  # "mean" with a mask: scale by 1 / max(count, 1)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 when an input is float64
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)  # int64 before any offset: K * N * V can exceed 2^31
    s_row = s_ptr + row * stride_sn
    z_row = z_ptr + row * stride_zn
    grad_row = grad_ptr + row * V
    k_offs = tl.arange(0, BLOCK_K)
    k_in = k_offs < K
    z_k = k_offs.to(tl.int64) * stride_zk  # (BLOCK_K,) teacher offsets

    # Which row counts, whether it has a CE term, and the reduction's scale for it.
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
    # Ignored rows load nothing: their loads see only zeros, which keeps their arithmetic finite.
    # (A bound, not `mask & counted`: the interpreter turns `tensor & 0-d bool` into ints.)
    load_limit = tl.where(counted, V, 0)
    if MEAN_OVER_COUNT:
        scale = 1.0 / tl.maximum(tl.load(count_ptr).to(ACC_DTYPE), 1.0)
    else:
        # Not mean_divisor.to(): triton specialises an int argument equal to 1 into a constexpr.
        scale = tl.full([], 1.0, ACC_DTYPE) / mean_divisor

    # Teacher weights, normalised per row; 0 for the padding teachers k >= K.
    if HAS_WEIGHTS:
        w = tl.load(w_ptr + row * stride_wn + k_offs * stride_wk, mask=k_in, other=0.0)
        w = w.to(ACC_DTYPE)
    else:
        w = tl.where(k_in, 1.0, 0.0).to(ACC_DTYPE)
    w = w / tl.reduce(w, 0, SUM)
    w_on = w > 0  # a zero-weight teacher is left out of the row, whatever its logits
    log_w = tl.log(tl.where(w_on, w, 1.0))

    # Softmax statistics of the row, each as a maximum m (0 instead of -inf) and the log of
    # sum(exp(x - m)): for the teachers (prob) or the fused logits (logit), for the student at
    # temperature T, and at temperature 1 (for CE). Kept apart, not added into one logsumexp:
    # log softmax(x) = (x - m) - log_sum stays exact for x near a large m (logits ~ 1e4), as in
    # PyTorch's log_softmax. The whole-row path takes them from the tile in hand, the online path
    # from pass one.
    z_max = tl.full([BLOCK_K], 0.0, ACC_DTYPE)
    z_lsum = tl.full([BLOCK_K], 0.0, ACC_DTYPE)
    u_max = tl.full([], 0.0, ACC_DTYPE)
    u_lsum = tl.full([], 0.0, ACC_DTYPE)
    a_max = tl.full([], 0.0, ACC_DTYPE)
    a_lsum = tl.full([], 0.0, ACC_DTYPE)
    s_max = tl.full([], 0.0, ACC_DTYPE)
    s_lsum = tl.full([], 0.0, ACC_DTYPE)

    if not SINGLE_BLOCK:
        # Pass one: running maximum (..._run) and sum of exp(x - maximum) (..._sum) over V blocks;
        # "safe" is the maximum with -inf replaced by 0, so that no (-inf) - (-inf) appears.
        z_run = tl.full([BLOCK_K], NEG_INF, ACC_DTYPE)
        z_sum = tl.full([BLOCK_K], 0.0, ACC_DTYPE)
        u_run = tl.full([], NEG_INF, ACC_DTYPE)
        u_sum = tl.full([], 0.0, ACC_DTYPE)
        a_run = tl.full([], NEG_INF, ACC_DTYPE)
        a_sum = tl.full([], 0.0, ACC_DTYPE)
        s_run = tl.full([], NEG_INF, ACC_DTYPE)
        s_sum = tl.full([], 0.0, ACC_DTYPE)
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_in = cols < V
            s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0).to(ACC_DTYPE)
            s = tl.where(v_in, s, NEG_INF)
            if USE_KD:
                a = s * inv_temperature
                new_run = tl.maximum(a_run, tl.reduce(a, 0, MAX))
                safe = tl.where(new_run == NEG_INF, 0.0, new_run)
                a_sum = a_sum * tl.exp(a_run - safe) + tl.reduce(tl.exp(a - safe), 0, SUM)
                a_run = new_run
                tile_in = k_in[:, None] & v_in[None, :]
                z = tl.load(z_row + z_k[:, None] + cols[None, :] * stride_zv,
                            mask=k_in[:, None] & (cols < load_limit)[None, :], other=0.0)
                z = z.to(ACC_DTYPE)  # (BLOCK_K, BLOCK_V)
                if FUSION_PROB:
                    x = tl.where(tile_in, z * inv_temperature, NEG_INF)  # (BLOCK_K, BLOCK_V)
                    new_zrun = tl.maximum(z_run, tl.reduce(x, 1, MAX))
                    zsafe = tl.where(new_zrun == NEG_INF, 0.0, new_zrun)
                    z_sum = z_sum * tl.exp(z_run - zsafe)
                    z_sum += tl.reduce(tl.exp(x - zsafe[:, None]), 1, SUM)
                    z_run = new_zrun
                else:
                    u = tl.reduce(tl.where(w_on[:, None], w[:, None] * z, 0.0), 0, SUM)
                    u = tl.where(v_in, u * inv_temperature, NEG_INF)
                    new_urun = tl.maximum(u_run, tl.reduce(u, 0, MAX))
                    usafe = tl.where(new_urun == NEG_INF, 0.0, new_urun)
                    u_sum = u_sum * tl.exp(u_run - usafe) + tl.reduce(tl.exp(u - usafe), 0, SUM)
                    u_run = new_urun
            if USE_CE:
                new_srun = tl.maximum(s_run, tl.reduce(s, 0, MAX))
                ssafe = tl.where(new_srun == NEG_INF, 0.0, new_srun)
                s_sum = s_sum * tl.exp(s_run - ssafe) + tl.reduce(tl.exp(s - ssafe), 0, SUM)
                s_run = new_srun
        z_max = tl.where(z_run == NEG_INF, 0.0, z_run)
        z_lsum = tl.log(z_sum)
        u_max = tl.where(u_run == NEG_INF, 0.0, u_run)
        u_lsum = tl.log(u_sum)
        a_max = tl.where(a_run == NEG_INF, 0.0, a_run)
        a_lsum = tl.log(a_sum)
        s_max = tl.where(s_run == NEG_INF, 0.0, s_run)
        s_lsum = tl.log(s_sum)

    # Pass two (the only pass when SINGLE_BLOCK): p, the KL and the gradient, block by block.
    # It also watches the teachers' values: any NaN or +inf (nonfinite), each teacher's largest
    # logit (z_seen) or the largest mixed logit (u_seen), so that a row nothing finite can be
    # learnt from is reported (bad_ptr) rather than turned into a NaN gradient.
    kl = tl.full([], 0.0, ACC_DTYPE)
    nonfinite = tl.full([], 0, tl.int32)
    z_seen = tl.full([BLOCK_K], NEG_INF, ACC_DTYPE)
    u_seen = tl.full([], NEG_INF, ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_in = cols < V
        s = tl.load(s_row + cols * stride_sv, mask=cols < load_limit, other=0.0).to(ACC_DTYPE)
        s = tl.where(v_in, s, NEG_INF)
        if USE_CE:
            if SINGLE_BLOCK:
                s_max = tl.reduce(s, 0, MAX)
                s_max = tl.where(s_max == NEG_INF, 0.0, s_max)
                s_lsum = tl.log(tl.reduce(tl.exp(s - s_max), 0, SUM))
        if HAS_GRAD:
            g = tl.full([BLOCK_V], 0.0, ACC_DTYPE)
        if USE_KD:
            a = s * inv_temperature
            if SINGLE_BLOCK:
                a_max = tl.reduce(a, 0, MAX)
                a_max = tl.where(a_max == NEG_INF, 0.0, a_max)
                a_lsum = tl.log(tl.reduce(tl.exp(a - a_max), 0, SUM))
            log_q = (a - a_max) - a_lsum
            tile_in = k_in[:, None] & v_in[None, :]
            z = tl.load(z_row + z_k[:, None] + cols[None, :] * stride_zv,
                        mask=k_in[:, None] & (cols < load_limit)[None, :], other=0.0)
            z = z.to(ACC_DTYPE)  # (BLOCK_K, BLOCK_V)
            bad = tile_in & w_on[:, None] & ((z != z) | (z == float("inf")))
            nonfinite = tl.maximum(nonfinite, tl.reduce(tl.reduce(tl.where(bad, 1, 0), 1, MAX),
                                                        0, MAX))
            if FUSION_PROB:
                x = tl.where(tile_in, z * inv_temperature, NEG_INF)  # (BLOCK_K, BLOCK_V)
                z_seen = tl.maximum(z_seen, tl.reduce(x, 1, MAX))
                if SINGLE_BLOCK:
                    z_max = tl.reduce(x, 1, MAX)
                    z_max = tl.where(z_max == NEG_INF, 0.0, z_max)
                    z_lsum = tl.log(tl.reduce(tl.exp(x - z_max[:, None]), 1, SUM))
                # log(w_k softmax(z_k / T)), -inf for left-out teachers; then logsumexp over k.
                t = (x - z_max[:, None]) - z_lsum[:, None] + log_w[:, None]
                t = tl.where(w_on[:, None], t, NEG_INF)
                t_max = tl.reduce(t, 0, MAX)
                t_max = tl.where(t_max == NEG_INF, 0.0, t_max)
                log_p = t_max + tl.log(tl.reduce(tl.exp(t - t_max[None, :]), 0, SUM))
            else:
                u = tl.reduce(tl.where(w_on[:, None], w[:, None] * z, 0.0), 0, SUM)
                u = tl.where(v_in, u * inv_temperature, NEG_INF)
                u_seen = tl.maximum(u_seen, tl.reduce(u, 0, MAX))
                if SINGLE_BLOCK:
                    u_max = tl.reduce(u, 0, MAX)
                    u_max = tl.where(u_max == NEG_INF, 0.0, u_max)
                    u_lsum = tl.log(tl.reduce(tl.exp(u - u_max), 0, SUM))
                log_p = (u - u_max) - u_lsum
            p = tl.exp(log_p)
            kl += tl.reduce(tl.where(p > 0, p * (log_p - log_q), 0.0), 0, SUM)
            if HAS_GRAD:
                g += kd_grad_scale * (tl.exp(log_q) - p)
        if HAS_GRAD:
            if USE_CE:
                # The label's -1 is folded in here, before the one rounding to the output dtype.
                ce_g = tl.exp((s - s_max) - s_lsum) - tl.where(cols == label, 1.0, 0.0)
                g += tl.where(labelled, ce_scale * ce_g, 0.0)
            g = tl.where(counted, g * scale, 0.0)
            if grad_ptr.dtype.element_ty != tl.float64:
                # Interpreter quirk (TRITON_INTERPRET): fp64 -> bf16 casts reinterpret bits; going
                # through fp32 is exact enough and costs the compiled kernel nothing.
                g = g.to(tl.float32)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=v_in)

    loss = tl.full([], 0.0, ACC_DTYPE)
    if USE_KD:
        loss += kd_loss_scale * kl
    if USE_CE:
        s_y = tl.load(s_row + label * stride_sv, mask=labelled, other=0.0).to(ACC_DTYPE)
        loss += tl.where(labelled, ce_scale * (s_lsum - (s_y - s_max)), 0.0)
    tl.store(loss_ptr + row, tl.where(counted, loss * scale, 0.0))
    code = tl.full([], 0, tl.int32)
    if USE_KD:
        if FUSION_PROB:
            empty = tl.reduce(tl.where(w_on & (z_seen == NEG_INF), 1, 0), 0, MAX) > 0
            code = tl.where(empty, BAD_EMPTY_TEACHER_ROW, 0)
        else:
            code = tl.where(u_seen == NEG_INF, BAD_EMPTY_LOGIT_MIX, 0)
        code = tl.where(nonfinite > 0, BAD_NONFINITE, code)
        code = tl.where(counted, code, 0)
    tl.store(bad_ptr + row, code.to(tl.int8))


def kd_loss_forward(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor] = None,
    *,
    temperature: float,
    alpha: float,
    fusion: str,
    reduction: str,
    ignore_index: int,
    need_grad: bool,
    block_v: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch `_kd_loss_kernel`: (per-row losses (N,), gradient (N, V) or (0,) without need_grad,
    per-row report of bad teacher inputs (N,) int8: see BAD_*).

    The losses and the gradient are already multiplied by the reduction's row scale. Arguments are
    assumed valid (`check_kd_arguments`). `block_v` (a power of two) overrides the V block; one
    smaller than V forces the two-pass online path (tests use it to cover that path with small V).
    """
    s, z = student_logits, teacher_logits
    K, N, V = z.shape
    acc = accumulation_dtype(s, z, weights)
    rows = torch.empty(N, dtype=acc, device=s.device)
    grad = torch.empty((N, V) if need_grad else (0,), dtype=s.dtype, device=s.device)
    bad = torch.empty(N, dtype=torch.int8, device=s.device)
    if N == 0:
        return rows, grad, bad
    mean_over_count = reduction == "mean" and mask is not None
    # A device tensor the kernel reads: the host never learns how many rows count.
    count = mask.sum() if mean_over_count else rows
    block_k = next_pow2(K)
    if block_v is None:
        budget = _TILE_ELEMENTS if block_k <= 16 else _TILE_ELEMENTS_MANY_TEACHERS
        block_v = min(next_pow2(V), max(budget // block_k, 16))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    tile = block_k * block_v
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16
    w_strides = (0, 0) if weights is None else (
        (0, weights.stride(0)) if weights.dim() == 1 else (weights.stride(0), weights.stride(1)))
    kernel = launchable(_kd_loss_kernel)
    T = float(temperature)
    with device_of(s):
        kernel[(N,)](
            s, z,
            rows if weights is None else weights,
            rows if labels is None else labels,
            rows if mask is None else mask,
            count, rows, bad,
            grad if need_grad else rows,
            s.stride(0), s.stride(1),
            z.stride(0), z.stride(1), z.stride(2),
            *w_strides,
            0 if labels is None else labels.stride(0),
            0 if mask is None else mask.stride(0),
            K, V,
            1.0 / T, alpha * T * T, alpha * T, 1.0 - alpha,
            N if reduction == "mean" and mask is None else 1,
            ignore_index,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
            SINGLE_BLOCK=block_v >= V,
            FUSION_PROB=fusion == "prob",
            HAS_WEIGHTS=weights is not None,
            HAS_LABELS=labels is not None,
            HAS_MASK=mask is not None,
            USE_KD=alpha > 0,
            USE_CE=labels is not None and alpha < 1,
            HAS_GRAD=need_grad,
            MEAN_OVER_COUNT=mean_over_count,
            ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            num_warps=num_warps,
            enable_fp_fusion=_FP_FUSION,
        )
    return rows, grad, bad


# The autograd wrapper: torch.library.custom_op with register_autograd, rather than an
# autograd.Function launching the kernel or torch.library.triton_op. torch.compile (torch 2.11 to
# 2.13) then sees one opaque op with a fake (shape-only) implementation and never traces the
# Triton launch, so the launcher stays plain Python: it picks the kernel's flavour (compiled or
# interpreted) per call and passes strides and constexprs as it likes; there is nothing around
# this kernel for inductor to fuse anyway. No output aliases an input and nothing syncs the host,
# so CUDA graphs capture it as is. Checked here: torch.compile(fullgraph=True) with aot_eager and
# inductor on CPU under the interpreter.
@torch.library.custom_op("mtkd::kd_loss_forward", mutates_args=())
def _kd_loss_op(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    temperature: float,
    alpha: float,
    fusion: str,
    reduction: str,
    ignore_index: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return kd_loss_forward(
        student_logits, teacher_logits, weights, labels, mask, temperature=temperature, alpha=alpha,
        fusion=fusion, reduction=reduction, ignore_index=ignore_index, need_grad=need_grad,
    )


@_kd_loss_op.register_fake
def _kd_loss_op_fake(student_logits, teacher_logits, weights, labels, mask, temperature, alpha,
                     fusion, reduction, ignore_index, need_grad):
    N, V = student_logits.shape
    acc = accumulation_dtype(student_logits, teacher_logits, weights)
    rows = student_logits.new_empty(N, dtype=acc)
    grad = student_logits.new_empty((N, V) if need_grad else (0,))
    return rows, grad, student_logits.new_empty(N, dtype=torch.int8)


register_gradient_in_forward(_kd_loss_op, num_inputs=11)

# The kernel's report codes, as the reference words them.
TEACHER_MESSAGES = {
    BAD_NONFINITE: NONFINITE_TEACHER.format(name="teacher_logits"),
    BAD_EMPTY_TEACHER_ROW: EMPTY_TEACHER_ROW.format(name="teacher_logits"),
    BAD_EMPTY_LOGIT_MIX: EMPTY_LOGIT_MIX.format(name="teacher_logits"),
}


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    weights: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    alpha: float = 1.0,
    fusion: str = "prob",
    reduction: str = "mean",
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Multi-teacher KD loss (SPEC "Kernels"), fused with its gradient with respect to the student.

    Args:
        student_logits: (N, V) float tensor (fp16, bf16, fp32 or fp64), any strides.
        teacher_logits: (K, N, V) float tensor, any float dtype and strides (never copied).
        temperature: T > 0, applied to student and teachers in the KD term.
        weights: None (uniform), (K,) or (N, K) non-negative teacher weights, normalised per row
            here; a teacher with weight 0 is left out of that row.
        labels: (N,) integer labels for the CE term; rows equal to `ignore_index` have no CE term
            but still distil. Without labels there is no CE term: L = alpha * KD.
        alpha: weight of KD in [0, 1]; CE gets 1 - alpha.
        fusion: "prob" (mix teacher probabilities) or "logit" (softmax of mixed logits).
        reduction: "mean" over the rows in `mask` (0 when none), "sum", or "none" (N,).
        mask: (N,) bool or None: rows with False contribute nothing (loss 0, gradient 0), are not
            counted by "mean", and their inputs are not looked at (padding).

    Returns:
        The loss in float32 (float64 if an input is float64): a scalar, or (N,) for "none".
        Gradients flow to `student_logits` only, in its dtype.

    On CUDA tensors, or CPU tensors while TRITON_INTERPRET=1, this runs the Triton kernel;
    otherwise the same loss and gradient in PyTorch ops (`dense_cpu.kd_loss_cpu`, checked against
    `mtkd.kernels.reference`). Nothing waits for the GPU: invalid
    weights, labels or teacher values (NaN, +inf, a row with no finite logit) are caught eagerly for
    CPU tensors (ValueError) and by `torch._assert_async` for CUDA tensors (a device-side assert,
    reported at the next synchronisation). Forward-mode AD raises on the kernel path.
    """
    if not runs_triton(student_logits):  # checks the arguments itself
        return kd_loss_cpu(
            student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
            alpha=alpha, fusion=fusion, reduction=reduction, ignore_index=ignore_index, mask=mask,
        )
    check_kd_arguments(
        student_logits, teacher_logits, temperature=temperature, weights=weights, labels=labels,
        alpha=alpha, fusion=fusion, reduction=reduction, ignore_index=ignore_index, mask=mask,
    )
    refuse_forward_ad(student_logits, "fused_kd_loss")
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    rows, _, report = _kd_loss_op(
        student_logits, teacher_logits, weights, labels, mask, float(temperature), float(alpha),
        fusion, reduction, int(ignore_index), need_grad,
    )
    check_teacher_report(report, TEACHER_MESSAGES)
    # The kernel has already applied the mean's 1 / count to every row.
    return rows if reduction == "none" else rows.sum()


