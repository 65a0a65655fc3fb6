"""Stage one's per-position work on a GPU: one Triton program per row, the teacher's logits read once.

The maths, for one row (z: V teacher logits in float32, temperatures T_1 = 1, T_2, ..., y: label):

    m      = max_v z_v                                          (the row's maximum)
    S_j    = sum_v exp((z_v - m) / T_j),   lse_j = log S_j + m / T_j = logsumexp(z / T_j)
    H      = -sum_v p_v log p_v  at T = 1,  p_v = exp(z_v - m) / S_1
           = log S_1 - W / S_1,   W = sum_v exp(z_v - m) (z_v - m)  (terms with exp(z_v - m) = 0 count 0)
    lp_y   = z_y - lse_1  (NaN where the row has no label, y < 0)

One pass over V in blocks (online softmax): the program keeps the running maximum m and, per T,
the running sum S_j, and at T = 1 the running W. When a block raises the maximum from m to m',
every running quantity is rescaled: S_j <- S_j exp((m - m') / T_j), and, since
z - m' = (z - m) + (m - m'),  W <- exp(m - m') (W + (m - m') S_1).  While the maximum is -inf
(every logit so far -inf) nothing has been summed and nothing is rescaled. The label's logit is one
more load. A row with a NaN or +inf logit gives non-finite outputs (stage one refuses such rows).

Bytes moved: the (N, V) logits read once (4, 2 or 2 bytes each as given, converted to float32 in
registers), O(N * T) written. The top-k is left to torch.topk (one fast CUDA kernel that reads the
logits once more): a fused top-k needs per-row selection state of k entries across V blocks, which
Triton does not express well (no sort of a running set); it is not done here.

`stage_one_ref` is the same in plain PyTorch: the yardstick of the tests and of bench/kernel.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtkd.kernels.launch import MAX, SUM, device_of, launchable, next_pow2, runs_triton

BLOCK_V = 2048  # classes per step of the online pass (x next_pow2(len(temperatures)) float32 in registers)
MAX_TEMPERATURES = 16


def stage_one_ref(logits: Tensor, labels: Tensor, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(N, V) logits, (N,) labels (-100 or any negative: none), temperatures with 1 first ->
    lse (N, len(temperatures)), label_logprob (N,), entropy (N,) at T = 1, maximum (N,); float32."""
    z = logits.float()
    lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in temperatures], dim=1)
    logp = z - lse[:, :1]
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)
    has = labels >= 0
    picked = z.gather(1, labels.clamp(min=0).long().view(-1, 1)).squeeze(1) - lse[:, 0]
    label_logprob = torch.where(has, picked, torch.full_like(picked, math.nan))
    return lse, label_logprob, entropy, z.amax(dim=1)


def stage_one_rows(logits: Tensor, labels: Tensor, temperatures: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As `stage_one_ref`, by the Triton kernel on CUDA tensors (or CPU ones under TRITON_INTERPRET=1);
    otherwise the reference. temperatures[0] must be 1 (the entropy's and the label's)."""
    if not temperatures or temperatures[0] != 1.0:
        raise ValueError(f"temperatures must start with 1, got {temperatures}")
    if len(temperatures) > MAX_TEMPERATURES or any(not (t > 0 and math.isfinite(t)) for t in temperatures):
        raise ValueError(f"1 to {MAX_TEMPERATURES} positive finite temperatures, got {temperatures}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, V) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not runs_triton(logits):
        return stage_one_ref(logits, labels, temperatures)
    return _launch(logits, labels, temperatures)


def _launch(logits: Tensor, labels: Tensor, temperatures: tuple[float, ...]):
    n, vocab = logits.shape
    dev = logits.device
    lse = torch.empty((n, len(temperatures)), dtype=torch.float32, device=dev)
    label_logprob = torch.empty((n,), dtype=torch.float32, device=dev)
    entropy = torch.empty((n,), dtype=torch.float32, device=dev)
    top = torch.empty((n,), dtype=torch.float32, device=dev)
    if n == 0:
        return lse, label_logprob, entropy, top
    inverse = torch.tensor([1.0 / t for t in temperatures], dtype=torch.float32, device=dev)
    labels = labels.to(device=dev, dtype=torch.int64)
    block_t = next_pow2(len(temperatures))
    block_v = min(BLOCK_V, triton.next_power_of_2(vocab))
    with device_of(logits):
        launchable(_stage_one_kernel)[(n,)](
            logits, logits.stride(0), logits.stride(1), labels, inverse, len(temperatures), vocab,
            lse, lse.stride(0), label_logprob, entropy, top,
            BLOCK_T=block_t, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
    return lse, label_logprob, entropy, top


# (tl.reduce with launch's combine functions, not tl.max / tl.sum: those are @triton.jit functions
# whose flavour is frozen at import, and the tests switch the interpreter on per test.)
@triton.jit
def _stage_one_kernel(z_ptr, stride_n, stride_v, labels_ptr, inv_ptr, num_t, vocab,
           lse_ptr, stride_lse, label_ptr, entropy_ptr, top_ptr,
           BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ts = tl.arange(0, BLOCK_T)
    inv = tl.load(inv_ptr + ts, mask=ts < num_t, other=1.0)  # (BLOCK_T,) 1 / T
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((BLOCK_T,), 0.0, tl.float32)  # running sum of exp((z - m) / T), per T
    w = tl.full((), 0.0, tl.float32)  # running sum of exp(z - m) (z - m), T = 1
    s1 = tl.full((), 0.0, tl.float32)
    base = z_ptr + row * stride_n
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols * stride_v, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.reduce(z, 0, MAX))
        finite = m_new > float("-inf")  # something with mass seen: there is a maximum to shift by
        shift = tl.where(finite, m_new, 0.0)
        step = tl.where(m > float("-inf"), m - shift, 0.0)  # (m - m'), 0 while nothing summed
        d = z - shift  # (BLOCK_V,), -inf for -inf logits (and padding)
        e = tl.exp(d[None, :] * inv[:, None])  # (BLOCK_T, BLOCK_V)
        e1 = tl.exp(d)
        grow = tl.exp(step * inv)  # (BLOCK_T,) rescale of the running sums
        grow1 = tl.exp(step)
        w = grow1 * (w + step * s1) + tl.reduce(tl.where(e1 > 0, e1 * d, 0.0), 0, SUM)
        s1 = s1 * grow1 + tl.reduce(e1, 0, SUM)
        s = s * grow + tl.reduce(e, 1, SUM)
        m = m_new
    lse = tl.log(s) + m * inv
    tl.store(lse_ptr + row * stride_lse + ts, lse, mask=ts < num_t)
    lse1 = tl.log(s1) + m
    tl.store(entropy_ptr + row, tl.log(s1) - w / s1)
    tl.store(top_ptr + row, m)
    y = tl.load(labels_ptr + row)
    zy = tl.load(base + tl.maximum(y, 0) * stride_v).to(tl.float32)
    tl.store(label_ptr + row, tl.where(y >= 0, zy - lse1, float("nan")))
