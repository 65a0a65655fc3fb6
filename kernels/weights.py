"""Per-sample teacher weights for confidence fusion (stage two's `--fusion confidence`).

CA-MKD (Zhang et al., "Confidence-Aware Multi-Teacher Knowledge Distillation", 2022), as SPEC
version 2 states it: a teacher counts for a sample the less, the larger its cross-entropy against
that sample's label is relative to the other teachers',

    w_nk = (1 - softmax_k(CE_nk)) / (K - 1),    CE_nk = -log softmax(z_kn)[y_n]

(w_n1 = 1 for a single teacher). The dense form takes teacher logits (K, N, V); the sparse form
takes each teacher's stored label log-probability (K, N), i.e. -CE_nk itself (NaN where the row
has no label). A teacher that rules the label out (CE = +inf) takes the whole softmax and so gets
weight 0; rows without a label get uniform weights 1/K, and so do rows where every teacher rules
the label out. The result feeds `weights=` of the losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtkd.kernels.reference import FLOAT_DTYPES, accumulation_dtype, check_labels


@torch.no_grad()
def confidence_weights(
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    *,
    label_logprobs: Tensor | None = None,
) -> Tensor:
    """(N, K) weights, each row summing to one.

    Dense: `confidence_weights(teacher_logits (K, N, V), labels (N,))`.
    Sparse: `confidence_weights(label_logprobs=(K, N))` (log softmax(z_kn)[y_n], NaN without a
    label, as a sparse store keeps them), optionally with `labels` (rows equal to ignore_index are
    then unlabelled too).

    Computed in float32 (float64 for float64 inputs), one teacher at a time. Label values are
    checked eagerly for CPU tensors and with `torch._assert_async` for CUDA tensors.
    """
    if (teacher_logits is None) == (label_logprobs is None):
        raise TypeError("confidence_weights takes teacher_logits (dense) or label_logprobs "
                        "(sparse), exactly one of them")
    if teacher_logits is not None:
        z = teacher_logits
        if (not isinstance(z, Tensor) or z.dtype not in FLOAT_DTYPES or z.dim() != 3
                or z.shape[0] < 1):
            raise TypeError("teacher_logits must be a float tensor of shape (K, N, V) with K >= 1")
        if labels is None:
            raise TypeError("the dense form needs labels (N,)")
        K, N, V = z.shape
        check_labels(labels, N, V, z.device, ignore_index)
        acc = accumulation_dtype(z)
        labelled = labels != ignore_index
        y = torch.where(labelled, labels, 0).long()[:, None]  # (N, 1)
        log_conf = torch.empty(K, N, dtype=acc, device=z.device)
        for k in range(K):
            # log softmax(z_k)[y] per row. One (N, V) temporary at a time.
            zk = z[k].to(acc)
            log_conf[k] = (zk.gather(1, y) - torch.logsumexp(zk, dim=-1, keepdim=True)).squeeze(1)
    else:
        lp = label_logprobs
        if (not isinstance(lp, Tensor) or lp.dtype not in FLOAT_DTYPES or lp.dim() != 2
                or lp.shape[0] < 1):
            raise TypeError("label_logprobs must be a float tensor of shape (K, N) with K >= 1")
        K, N = lp.shape
        labelled = ~lp.isnan().any(dim=0)
        if labels is not None:
            check_labels(labels, N, math.inf, lp.device, ignore_index)
            labelled = labelled & (labels != ignore_index)
        log_conf = lp.to(accumulation_dtype(lp))
    return _weights_from_log_confidence(log_conf, labelled)


def _weights_from_log_confidence(log_conf: Tensor, labelled: Tensor) -> Tensor:
    """(N, K) weights (1 - softmax_k(CE_nk)) / (K - 1) from log_conf = -CE (K, N); uniform where
    unlabelled, or where every teacher gives the label probability 0."""
    K = log_conf.shape[0]
    uniform = torch.full((log_conf.shape[1], K), 1.0 / K, dtype=log_conf.dtype, device=log_conf.device)
    if K == 1:
        return torch.ones_like(uniform)
    ce = -log_conf.T  # (N, K), +inf where a teacher rules the label out
    ruled_out = ce == math.inf
    # softmax_k(CE) with +inf entries: in the limit they share the whole mass (torch would give NaN).
    share = torch.where(ruled_out.any(dim=1, keepdim=True),
                        ruled_out.to(ce.dtype) / ruled_out.sum(dim=1, keepdim=True).clamp(min=1),
                        torch.softmax(torch.where(ruled_out, 0.0, ce), dim=1))
    weights = (1.0 - share) / (K - 1)
    usable = labelled[:, None] & ~ruled_out.all(dim=1, keepdim=True) & ~torch.isnan(ce).any(dim=1, keepdim=True)
    return torch.where(usable, weights, uniform)
