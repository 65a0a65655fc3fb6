"""Classification metrics shared by `mtkd inspect`, `mtkd eval`, stage two's validation and the demo.

All functions take log-probabilities (N, V) — log_softmax of a model's logits, or the log of a fused
ensemble's probabilities — and labels (N,) with -100 for unknown rows, which are left out.
"""

from __future__ import annotations

import torch

from mtkd.pipeline.specs import IGNORE_LABEL

ECE_BINS = 15


def fuse_log_probs(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(K, N, V) teacher logits -> (N, V) log of the weighted mean of their probabilities."""
    k = logits.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    log_p = torch.log_softmax(logits.double(), dim=-1) + w.log().view(k, 1, 1)
    return torch.logsumexp(log_p, dim=0)


def classification_metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """accuracy, macro precision/recall/F1, NLL, ECE over labelled rows (NaN when none are)."""
    keep = labels != IGNORE_LABEL
    log_probs, labels = log_probs[keep].double(), labels[keep].long()
    n, v = log_probs.shape if log_probs.dim() == 2 else (0, 0)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "accuracy": nan, "precision_macro": nan, "recall_macro": nan, "f1_macro": nan, "nll": nan, "ece": nan}
    pred = log_probs.argmax(1)
    correct = (pred == labels).double()
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    # Macro averages over the classes present in labels or predictions (sklearn's convention).
    tp = torch.bincount(labels[pred == labels], minlength=v).double()
    predicted = torch.bincount(pred, minlength=v).double()
    actual = torch.bincount(labels, minlength=v).double()
    present = (predicted + actual) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300), torch.zeros_like(tp))
    return {
        "n": int(n),
        "accuracy": float(correct.mean()),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "nll": float(nll.mean()),
        "ece": expected_calibration_error(log_probs.exp().amax(1), correct),
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Equal-width-bin ECE: sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|."""
    index = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(index, weights=correct.double(), minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / count.sum())


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Fraction of rows on which two models predict the same class."""
    return float((pred_a == pred_b).double().mean())
