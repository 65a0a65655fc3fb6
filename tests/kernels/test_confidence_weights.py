"""confidence_weights: CA-MKD per-sample teacher weights, dense (logits) and sparse (label
log-probabilities)."""

import math

import pytest
import torch

from mtkd.kernels import confidence_weights, kd_loss_ref, kd_sparse_loss_ref


def test_dense_weights_are_ca_mkds_one_minus_softmax_of_the_cross_entropies():
    K, N, V = 3, 5, 7
    z = torch.randn(K, N, V, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, -100, 6, 2])
    w = confidence_weights(z, y)
    assert w.shape == (N, K) and w.dtype == torch.float64
    torch.testing.assert_close(w.sum(dim=1), torch.ones(N, dtype=torch.float64))
    for n in (0, 1, 3, 4):
        # SPEC: w_k = (1 - softmax_k(CE_k)) / (K - 1), CE_k = -log softmax(z_k)[y]
        ce = torch.stack([-torch.log_softmax(z[k, n], dim=0)[y[n]] for k in range(K)])
        torch.testing.assert_close(w[n], (1 - torch.softmax(ce, dim=0)) / (K - 1))
    torch.testing.assert_close(w[2], torch.full((K,), 1 / K, dtype=torch.float64))  # no label
    # The most confident teacher on the label weighs most.
    best = torch.stack([torch.log_softmax(z[k], -1)[torch.arange(N), y.clamp(min=0)]
                        for k in range(K)]).argmax(0)
    assert (w.argmax(1)[y != -100] == best[y != -100]).all()


def test_sparse_form_equals_the_dense_one_from_label_log_probabilities():
    K, N, V = 4, 6, 9
    z = torch.randn(K, N, V) * 3
    y = torch.tensor([1, -100, 8, 0, 4, -100])
    label_logprobs = torch.log_softmax(z, dim=-1).gather(2, y.clamp(min=0).expand(K, N)[..., None])
    label_logprobs = label_logprobs.squeeze(2).masked_fill(y == -100, math.nan)  # as a store keeps it
    w = confidence_weights(label_logprobs=label_logprobs)
    torch.testing.assert_close(w, confidence_weights(z, y))
    torch.testing.assert_close(confidence_weights(label_logprobs=label_logprobs, labels=y), w)


def test_a_single_teacher_weighs_one():
    torch.testing.assert_close(
        confidence_weights(label_logprobs=torch.tensor([[-0.5, math.nan]])), torch.ones(2, 1))


def test_a_teacher_that_rules_out_the_label_gets_no_weight():
    z = torch.zeros(3, 2, 4)
    z[0, :, 1] = -math.inf  # teacher 0 rules out class 1
    z[:, 1, 2] = -math.inf  # every teacher rules out class 2 in row 1
    w = confidence_weights(z, torch.tensor([1, 2]))
    torch.testing.assert_close(w[0], torch.tensor([0.0, 0.5, 0.5]))  # the others share it
    torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))  # nobody believes it: uniform


def test_weights_feed_the_losses():
    z = torch.randn(3, 4, 10, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 3])
    w = confidence_weights(z, y)
    s = torch.randn(4, 10, dtype=torch.float64)
    assert torch.isfinite(kd_loss_ref(s, z, weights=w, labels=y, alpha=0.5))
    top = torch.log_softmax(z, -1).topk(4, dim=-1)
    assert torch.isfinite(kd_sparse_loss_ref(s, top.indices, top.values, weights=w, labels=y))


@pytest.mark.parametrize("args, error", [
    (dict(teacher_logits=torch.randn(2, 3, 5), labels=torch.tensor([0, 5, 1])), ValueError),
    (dict(teacher_logits=torch.randn(2, 3, 5), labels=torch.tensor([0, 1])), ValueError),
    (dict(teacher_logits=torch.randn(2, 3, 5), labels=torch.tensor([0.0, 1.0, 2.0])), TypeError),
    (dict(teacher_logits=torch.randn(3, 5), labels=torch.tensor([0, 1, 2])), TypeError),
    (dict(teacher_logits=torch.randn(2, 3, 5)), TypeError),
    (dict(label_logprobs=torch.randn(3)), TypeError),
    (dict(label_logprobs=torch.randn(2, 3), teacher_logits=torch.randn(2, 3, 5)), TypeError),
    (dict(), TypeError),
])
def test_bad_arguments_are_refused(args, error):
    with pytest.raises(error, match="labels|teacher_logits|label_logprobs"):
        confidence_weights(**args)
