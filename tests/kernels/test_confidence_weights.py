"""confidence_weights: CA-MKD style per-sample teacher weights."""

import math

import pytest
import torch

from mtkd.kernels import confidence_weights, kd_loss_ref


def test_weights_are_proportional_to_each_teachers_probability_of_the_label():
    K, N, V = 3, 5, 7
    z = torch.randn(K, N, V) * 2
    y = torch.tensor([0, 3, -100, 6, 2])
    w = confidence_weights(z, y)
    assert w.shape == (N, K) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(dim=1), torch.ones(N))
    for n in (0, 1, 3, 4):
        # softmax_k(-CE_k) = q_k(y) / sum_j q_j(y), with q_k = softmax(z_k)
        q_label = torch.stack([torch.softmax(z[k, n].double(), dim=0)[y[n]] for k in range(K)])
        torch.testing.assert_close(w[n].double(), q_label / q_label.sum())
    torch.testing.assert_close(w[2], torch.full((K,), 1 / K))  # no label: uniform


def test_a_teacher_that_rules_out_the_label_gets_no_weight():
    z = torch.zeros(2, 2, 4)
    z[0, :, 1] = -math.inf  # teacher 0 rules out class 1
    z[:, 1, 2] = -math.inf  # every teacher rules out class 2 in row 1
    w = confidence_weights(z, torch.tensor([1, 2]))
    torch.testing.assert_close(w[0], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))  # nobody believes it: uniform


def test_weights_feed_the_loss():
    z = torch.randn(3, 4, 10, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 3])
    w = confidence_weights(z, y)
    assert w.dtype == torch.float64
    loss = kd_loss_ref(torch.randn(4, 10, dtype=torch.float64), z, weights=w, labels=y, alpha=0.5)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("z, y, error", [
    (torch.randn(2, 3, 5), torch.tensor([0, 5, 1]), ValueError),
    (torch.randn(2, 3, 5), torch.tensor([0, 1]), ValueError),
    (torch.randn(2, 3, 5), torch.tensor([0.0, 1.0, 2.0]), TypeError),
    (torch.randn(3, 5), torch.tensor([0, 1, 2]), TypeError),
])
def test_bad_arguments_are_refused(z, y, error):
    with pytest.raises(error, match="labels|teacher_logits"):
        confidence_weights(z, y)
