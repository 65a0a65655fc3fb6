"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd.pipeline.metrics import agreement, classification_metrics, fuse_log_probs

# Three labelled rows (one ignored), two classes:
#   probabilities        label  prediction  confidence  ECE bin (of 15)
#   [0.9, 0.1]           0      0 (right)   0.9         13
#   [0.2, 0.8]           1      1 (right)   0.8         12
#   [0.6, 0.4]           1      0 (wrong)   0.6          9
#   [0.3, 0.7]           -100   (left out)
PROBS = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, -100])


def test_classification_metrics_by_hand():
    m = classification_metrics(PROBS.log(), LABELS)
    assert m["n"] == 3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    # class 0: predicted twice, right once (P 1/2), actual once (R 1); class 1: P 1/1, R 1/2
    assert m["precision_macro"] == pytest.approx(0.75)
    assert m["recall_macro"] == pytest.approx(0.75)
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_macro_averages_skip_classes_never_seen():
    padded = torch.cat([PROBS, torch.zeros(4, 1, dtype=torch.float64)], 1)  # a third class, never seen
    m = classification_metrics(padded.log(), LABELS)
    assert m["precision_macro"] == pytest.approx(0.75) and m["f1_macro"] == pytest.approx(2 / 3)


def test_no_labelled_rows_gives_nan():
    m = classification_metrics(PROBS.log(), torch.full((4,), -100))
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in ("accuracy", "nll", "ece", "f1_macro"))


def test_ece_of_a_calibrated_model_is_zero():
    # Always 75% sure of class 0, right on 3 rows of 4: calibrated. Always sure and right: calibrated.
    sure = torch.tensor([[0.75, 0.25]]).repeat(4, 1).log()
    assert classification_metrics(sure, torch.tensor([0, 0, 0, 1]))["ece"] == pytest.approx(0.0, abs=1e-6)
    certain = torch.log(torch.tensor([[1.0, 0.0]])).repeat(5, 1)
    assert classification_metrics(certain, torch.zeros(5, dtype=torch.long))["ece"] == 0.0


def test_fuse_log_probs_is_the_log_of_the_mean_probability():
    a = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 3.0, 0.0]], dtype=torch.float64)
    pa, pb = a.softmax(1), b.softmax(1)
    fused = fuse_log_probs(torch.stack([a, b]))
    assert torch.allclose(fused.exp(), (pa + pb) / 2)
    weighted = fuse_log_probs(torch.stack([a, b]), torch.tensor([2.0, 1.0]))
    assert torch.allclose(weighted.exp(), (2 * pa + pb) / 3)
    assert torch.allclose(fuse_log_probs(a[None]), a.log_softmax(1))


def test_agreement():
    assert agreement(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
