"""The Hugging Face adapters, on tiny models built from a config and saved locally (never downloaded)."""

from __future__ import annotations

import pytest
import torch

from mtkd.pipeline import hf
from mtkd.pipeline.errors import SpecError

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


def test_from_pretrained_directory_resolves_and_lists_its_weight_files(tiny, tmp_path):
    _, folder = tiny
    kwargs = hf.resolve_kwargs("transformers:AutoModelForCausalLM.from_pretrained", {"pretrained_model_name_or_path": "tiny"}, tmp_path, "t")
    assert kwargs["pretrained_model_name_or_path"] == str(folder)
    assert hf.pretrained_dir("transformers:AutoModelForCausalLM.from_pretrained", kwargs) == folder
    names = [p.name for p in hf.weight_files(folder)]
    assert "model.safetensors" in names and "config.json" in names and "generation_config.json" not in names
    assert hf.resolve_kwargs("mtkd.pipeline.models:mlp", {"x": 1}, tmp_path, "t") == {"x": 1}


def test_from_pretrained_refusals(tmp_path):
    factory = "transformers:AutoModelForCausalLM.from_pretrained"
    with pytest.raises(SpecError, match="model 'llama'.*'models/llama-1b' is not a local directory.*never downloads"):
        hf.resolve_kwargs(factory, {"pretrained_model_name_or_path": "models/llama-1b"}, tmp_path, "llama")
    with pytest.raises(SpecError, match="needs kwargs.pretrained_model_name_or_path"):
        hf.resolve_kwargs(factory, {}, tmp_path, "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="holds no weight files"):
        hf.weight_files(tmp_path / "empty")


def test_outputs_inputs_and_the_hidden_head_split(tiny):
    model, _ = tiny
    ids = torch.randint(0, 50, (2, 7))
    with torch.inference_mode():
        out = model(ids)
        assert torch.equal(hf.logits_of(out), out.logits) and hf.logits_of(out.logits) is out.logits
        assert hf.takes_attention_mask(model) and not hf.takes_attention_mask(torch.nn.Linear(2, 2))
        assert not hf.is_placed_by_hf(model) and hf.input_device(model, torch.device("cpu")) == torch.device("cpu")
        hidden, head = hf.hidden_and_head(model)
        assert head is model.lm_head
        assert torch.allclose(head(hidden(ids)), out.logits, atol=1e-5)
    with pytest.raises(SpecError, match="exposes no hidden states"):
        hf.hidden_and_head(torch.nn.Linear(2, 2))
