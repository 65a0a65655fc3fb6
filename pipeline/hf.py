"""The few places where mtkd meets Hugging Face models (without importing transformers itself).

- `from_pretrained` factories (`transformers:AutoModelForCausalLM.from_pretrained`, any
  `MODULE:Class.from_pretrained`): the directory they load resolves against the TOML's folder,
  must be local (mtkd never downloads), and its weight files are what the store's sha256 covers.
- Outputs: a tensor, or an object with `.logits` (a `CausalLMOutput`), unwrapped by `logits_of`.
- Inputs: models that take an `attention_mask` get one; a model spread over GPUs by
  `device_map="auto"` keeps its placement and gets its inputs on the device of its embeddings.
- The hidden/head split for students: `hidden_and_head` gives the final hidden states function and
  the output Linear (mtkd's own LMs: `.hidden` and `.lm_head`; Hugging Face: the base model and
  `get_output_embeddings()`), so stage two can fuse the head into the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtkd.pipeline.errors import SpecError

PRETRAINED_KEY = "pretrained_model_name_or_path"
# What a from_pretrained directory's weights are: the tensors and the config that shapes them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_EXTRA_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_from_pretrained(factory: str | None) -> bool:
    return bool(factory) and factory.rsplit(":", 1)[-1].split(".")[-1] == "from_pretrained"


def resolve_kwargs(factory: str | None, kwargs: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    """For a from_pretrained factory: the directory made absolute (relative to the TOML) and checked local."""
    if not is_from_pretrained(factory):
        return kwargs
    where = kwargs.get(PRETRAINED_KEY)
    if not isinstance(where, str):
        raise SpecError(f"model {name!r}: factory {factory} needs kwargs.{PRETRAINED_KEY} = \"a local directory\"")
    path = (folder / where).resolve()
    if not path.is_dir():
        raise SpecError(f"model {name!r}: {PRETRAINED_KEY} {where!r} is not a local directory ({path}); mtkd never downloads models")
    return {**kwargs, PRETRAINED_KEY: str(path)}


def pretrained_dir(factory: str | None, kwargs: dict[str, Any]) -> Path | None:
    if not is_from_pretrained(factory) or not isinstance(kwargs.get(PRETRAINED_KEY), str):
        return None
    return Path(kwargs[PRETRAINED_KEY])


def weight_files(directory: Path) -> list[Path]:
    """The files of a from_pretrained directory that decide its weights, in name order."""
    files = [p for p in directory.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_EXTRA_FILES)]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise SpecError(f"from_pretrained directory {str(directory)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return sorted(files, key=lambda p: p.name)


def logits_of(out: Any) -> Any:
    """A model's output as its logits tensor: Hugging Face outputs carry them as `.logits`."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


def takes_attention_mask(model: torch.nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # TorchScript and C++ modules have no Python signature
        return False


def is_placed_by_hf(model: torch.nn.Module) -> bool:
    """True for a model that `device_map=...` spread over devices: mtkd must not move it."""
    return getattr(model, "hf_device_map", None) is not None


def input_device(model: torch.nn.Module, default: torch.device) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings when Hugging Face placed it."""
    if not is_placed_by_hf(model):
        return default
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def hidden_and_head(model: torch.nn.Module) -> tuple[Callable[..., torch.Tensor], torch.nn.Linear]:
    """(hidden(input_ids, attention_mask=None) -> (B, L, H), head Linear with weight (V, H)).

    mtkd's own LMs expose `.hidden` and `.lm_head`; a Hugging Face causal LM its base model
    (`.model`/`.transformer`, through `base_model`) and `get_output_embeddings()`.
    """
    if callable(getattr(model, "hidden", None)) and isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return model.hidden, model.lm_head
    get_head = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, torch.nn.Linear) and isinstance(base, torch.nn.Module) and base is not model:

        def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return hidden, head
    raise SpecError(
        f"model {type(model).__name__} exposes no hidden states and output layer separately "
        "(give it .hidden(input_ids) and .lm_head, or use a Hugging Face causal LM)"
    )
