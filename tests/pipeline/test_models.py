"""The built-in factories: shapes for vector and sequence inputs, the paper's MLP, TorchScript."""

from __future__ import annotations

import pytest
import torch

from mtkd.pipeline.models import cnn1d, gru, mlp

# TorchScript is deprecated by recent torch but is a model format SPEC accepts.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

FACTORIES = {
    "mlp": lambda c: mlp(in_features=c * 40, num_classes=7),
    "cnn1d": lambda c: cnn1d(in_channels=c, channels=8, num_classes=7),
    "gru": lambda c: gru(in_channels=c, hidden=8, num_classes=7),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("shape", [(5, 40), (5, 1, 40), (5, 3, 40)])
def test_output_is_batch_by_classes(name, shape):
    channels = shape[1] if len(shape) == 3 else 1
    model = FACTORIES[name](channels).eval()
    assert model(torch.randn(shape)).shape == (5, 7)


@pytest.mark.parametrize("name", FACTORIES)
def test_trains_and_scripts(name):
    model = FACTORIES[name](1)
    x, y = torch.randn(6, 40), torch.tensor([0, 1, 2, 3, 4, 5])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    assert torch.allclose(torch.jit.script(model)(x), model(x))  # usable as a torchscript teacher


def test_mlp_is_the_mnist1d_papers_student():
    model = mlp(40, [100, 100], 10)
    assert sum(p.numel() for p in model.parameters()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_rows_are_independent_in_eval_mode():
    # Stage one relies on it: a row's logits do not depend on the other rows of its batch.
    x = torch.randn(8, 40)
    for model in (mlp(), cnn1d(channels=8), gru(hidden=8)):
        model.eval()
        with torch.inference_mode():
            assert torch.allclose(model(x)[2:3], model(x[2:3]), atol=1e-6)


@pytest.mark.parametrize("factory", ["gru_lm", "transformer_lm"])
def test_language_models_expose_hidden_states_and_head_and_are_causal(factory):
    from mtkd.pipeline import hf, models

    torch.manual_seed(0)
    model = getattr(models, factory)(vocab_size=30, **({"hidden": 8} if factory == "gru_lm" else {"d_model": 8, "heads": 2, "max_len": 12})).eval()
    ids = torch.randint(0, 30, (3, 9))
    with torch.inference_mode():
        logits = model(ids)
        hidden, head = hf.hidden_and_head(model)
        assert logits.shape == (3, 9, 30) and isinstance(head, torch.nn.Linear) and head.weight.shape[0] == 30
        assert torch.allclose(head(hidden(ids)), logits)
        # causal: a position's logits do not depend on later tokens
        assert torch.allclose(model(ids[:, :5]), logits[:, :5], atol=1e-5)


def test_transformer_lm_refuses_sequences_beyond_max_len():
    from mtkd.pipeline.models import transformer_lm

    with pytest.raises(ValueError, match="longer than max_len 4"):
        transformer_lm(10, d_model=8, heads=2, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
