"""Classification and token metrics shared by `mtkd inspect`, `mtkd eval`, stage two's validation and the demo.

All functions take log-probabilities (N, V) — log_softmax of a model's logits, or the log of a fused
ensemble's probabilities — and labels (N,) with -100 for unknown rows, which are left out.
"""

from __future__ import annotations

import math

import torch

from mtkd.pipeline.data import IGNORE_LABEL

ECE_BINS = 15


def fuse_log_probs(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(K, N, V) teacher logits -> (N, V) log of the weighted mean of their probabilities."""
    k = logits.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    log_p = torch.log_softmax(logits.double(), dim=-1) + w.log().view(k, 1, 1)
    return torch.logsumexp(log_p, dim=0)


class RunningMetrics:
    """Accuracy, macro precision/recall/F1, NLL and ECE over rows fed block by block (float64 sums),
    so that a store larger than memory is measured in one pass."""

    def __init__(self, num_classes: int, bins: int = ECE_BINS):
        self.bins = bins
        self.n = 0
        self.correct = 0.0
        self.nll = 0.0
        self.tp = torch.zeros(num_classes, dtype=torch.float64)
        self.predicted = torch.zeros(num_classes, dtype=torch.float64)
        self.actual = torch.zeros(num_classes, dtype=torch.float64)
        self.bin_count = torch.zeros(bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(bins, dtype=torch.float64)

    def update(self, log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        """log_probs (B, V), labels (B,) with -100 for rows to leave out."""
        keep = labels != IGNORE_LABEL
        log_probs, labels = log_probs[keep].double(), labels[keep].long()
        if len(labels) == 0:
            return
        v = self.tp.numel()
        pred = log_probs.argmax(1)
        correct = (pred == labels).double()
        confidence = log_probs.amax(1).exp()
        self.n += len(labels)
        self.correct += float(correct.sum())
        self.nll -= float(log_probs.gather(1, labels[:, None]).sum())
        self.tp += torch.bincount(labels[pred == labels], minlength=v).double()
        self.predicted += torch.bincount(pred, minlength=v).double()
        self.actual += torch.bincount(labels, minlength=v).double()
        index = (confidence * self.bins).long().clamp(max=self.bins - 1)
        self.bin_count += torch.bincount(index, minlength=self.bins).double()
        self.bin_conf += torch.bincount(index, weights=confidence, minlength=self.bins)
        self.bin_correct += torch.bincount(index, weights=correct, minlength=self.bins)

    def result(self) -> dict[str, float | int]:
        nan = float("nan")
        if self.n == 0:
            return {"n": 0, "accuracy": nan, "precision_macro": nan, "recall_macro": nan, "f1_macro": nan, "nll": nan, "ece": nan}
        present = (self.predicted + self.actual) > 0
        precision = torch.where(self.predicted > 0, self.tp / self.predicted.clamp(min=1), torch.zeros_like(self.tp))
        recall = torch.where(self.actual > 0, self.tp / self.actual.clamp(min=1), torch.zeros_like(self.tp))
        denom = (precision + recall).clamp(min=1e-300)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / denom, torch.zeros_like(self.tp))
        return {
            "n": self.n,
            "accuracy": self.correct / self.n,
            "precision_macro": float(precision[present].mean()),
            "recall_macro": float(recall[present].mean()),
            "f1_macro": float(f1[present].mean()),
            "nll": self.nll / self.n,
            "ece": float((self.bin_conf - self.bin_correct).abs().sum() / self.n),
        }


class TokenMetrics:
    """Perplexity, next-token accuracy and NLL over the labelled positions fed batch by batch
    (float64 sums): perplexity = exp(mean NLL), natural log."""

    def __init__(self) -> None:
        self.n = 0
        self.nll = 0.0
        self.correct = 0.0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (P, V) of positions, labels (P,) with -100 for positions to leave out."""
        keep = labels != IGNORE_LABEL
        logits, labels = logits[keep], labels[keep].long()
        if len(labels) == 0:
            return
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        self.n += len(labels)
        self.nll -= float(log_probs.gather(1, labels[:, None]).sum())
        self.correct += float((log_probs.argmax(1) == labels).sum())

    def result(self) -> dict[str, float | int]:
        if self.n == 0:
            nan = float("nan")
            return {"n": 0, "perplexity": nan, "accuracy": nan, "nll": nan}
        nll = self.nll / self.n
        return {"n": self.n, "perplexity": math.exp(nll), "accuracy": self.correct / self.n, "nll": nll}


def classification_metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """accuracy, macro precision/recall/F1, NLL, ECE over labelled rows (NaN when none are)."""
    running = RunningMetrics(log_probs.shape[-1])
    running.update(log_probs, labels)
    return running.result()


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Fraction of rows on which two models predict the same class."""
    return float((pred_a == pred_b).double().mean())


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict:
    """(N, D) predictions and targets (NaN where unknown) -> per output and averaged over the outputs:
    MSE, MAE and R^2 = 1 - SS_res / SS_tot (SS_tot about the output's mean of its known targets),
    each output over its rows with a known target, in float64. `n`: rows with any known target;
    `n_per_output`: known targets per output. An output with no known target (or constant targets,
    for R^2) gives NaN, which the averages then are too."""
    p, y = predictions.double().reshape(len(predictions), -1), targets.double().reshape(len(targets), -1)
    if p.shape != y.shape:
        raise ValueError(f"predictions {tuple(p.shape)} and targets {tuple(y.shape)} differ in shape")
    known = ~torch.isnan(y)
    count = known.sum(dim=0).double()  # (D,)
    err = torch.where(known, p - y, torch.zeros((), dtype=torch.float64))
    mse = err.square().sum(dim=0) / count
    mae = err.abs().sum(dim=0) / count
    mean = torch.where(known, y, torch.zeros((), dtype=torch.float64)).sum(dim=0) / count
    ss_tot = torch.where(known, y - mean, torch.zeros((), dtype=torch.float64)).square().sum(dim=0)
    r2 = 1.0 - err.square().sum(dim=0) / ss_tot
    return {
        "n": int(known.any(dim=1).sum()),
        "mse": float(mse.mean()),
        "mae": float(mae.mean()),
        "r2": float(r2.mean()),
        "n_per_output": [int(c) for c in count],
        "mse_per_output": mse.tolist(),
        "mae_per_output": mae.tolist(),
        "r2_per_output": r2.tolist(),
    }
