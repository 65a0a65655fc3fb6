"""Per-sample teacher weights for confidence fusion (stage two's `--fusion confidence`).

CA-MKD style (Zhang et al., "Confidence-Aware Multi-Teacher Knowledge Distillation", 2022): a
teacher counts for a sample in proportion to how well it predicts that sample's label,

    w_nk = softmax_k( -CE(z_kn, y_n) ) = softmax_k( log softmax(z_kn)[y_n] ),

i.e. w_nk is proportional to the probability teacher k gives the true label. Rows without a label
(y_n == ignore_index) get uniform weights 1/K. The result feeds `fused_kd_loss(weights=...)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtkd.kernels.reference import FLOAT_DTYPES, accumulation_dtype, check_labels


@torch.no_grad()
def confidence_weights(teacher_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """(N, K) weights, each row summing to one, from teacher logits (K, N, V) and labels (N,).

    Computed in float32 (float64 for float64 logits), one teacher at a time. Label values are
    checked eagerly for CPU tensors and with `torch._assert_async` for CUDA tensors.
    """
    z = teacher_logits
    if not isinstance(z, Tensor) or z.dtype not in FLOAT_DTYPES or z.dim() != 3 or z.shape[0] < 1:
        raise TypeError("teacher_logits must be a float tensor of shape (K, N, V) with K >= 1")
    K, N, V = z.shape
    check_labels(labels, z, "teacher_logits", ignore_index)
    acc = accumulation_dtype(z)
    if N == 0:
        return torch.empty(0, K, dtype=acc, device=z.device)
    counted = labels != ignore_index
    y = torch.where(counted, labels, 0).long()[:, None]  # (N, 1)
    log_conf = torch.empty(N, K, dtype=acc, device=z.device)
    for k in range(K):
        # -CE of teacher k on each row: log softmax(z_k)[y]. One (N, V) temporary at a time.
        zk = z[k].to(acc)
        log_conf[:, k] = (zk.gather(1, y) - torch.logsumexp(zk, dim=-1, keepdim=True)).squeeze(1)
    weights = torch.softmax(log_conf, dim=1)
    # Uniform where there is no label, or where every teacher rules the label out (all -inf: NaN).
    usable = counted[:, None] & ~torch.isnan(weights).any(dim=1, keepdim=True)
    return torch.where(usable, weights, torch.full_like(weights, 1.0 / K))
