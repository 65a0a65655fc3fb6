"""Small built-in models: factories for model TOML files.

Classifiers of vector and 1-D sequence inputs (rows):
    factory = "mtkd.pipeline.models:mlp"     kwargs = { in_features = 40, hidden = [100, 100] }
    factory = "mtkd.pipeline.models:cnn1d"   kwargs = { channels = 32 }
    factory = "mtkd.pipeline.models:gru"     kwargs = { hidden = 64 }
Causal language models (tokens; see the end of this file): `gru_lm`, `transformer_lm`.

Inputs are (B, L) vectors (read as a one-channel sequence by the CNN and GRU) or (B, C, L) sequences.
`mlp(40, [100, 100], 10)` is the MNIST-1D paper's student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_features: int = 40, hidden: Sequence[int] = (100, 100), num_classes: int = 10) -> nn.Module:
    """A ReLU MLP on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _AsSequence(nn.Module):
    """(B, L) -> (B, 1, L); (B, C, L) passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


def cnn1d(
    in_channels: int = 1, channels: int = 32, num_classes: int = 10, kernel_size: int = 5, depth: int = 3
) -> nn.Module:
    """Strided 1-D convolutions, global average and max pooling, a linear head."""
    layers: list[nn.Module] = [_AsSequence()]
    width = in_channels
    for i in range(depth):
        layers += [
            nn.Conv1d(width, channels, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        ]
        width = channels
    return nn.Sequential(*layers, _GlobalPool(), nn.Linear(2 * channels, num_classes))


class _GlobalPool(nn.Module):
    """(B, C, L) -> (B, 2C): average and max over positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(-1), x.amax(-1)], dim=1)


class GRUClassifier(nn.Module):
    """A bidirectional GRU over the positions of a 1-D sequence, classifying its last states."""

    def __init__(self, in_channels: int = 1, hidden: int = 64, num_classes: int = 10, layers: int = 1):
        super().__init__()
        self.as_sequence = _AsSequence()
        self.gru = nn.GRU(in_channels, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.as_sequence(x).transpose(1, 2)  # (B, L, C)
        _, h = self.gru(seq)  # h: (layers * 2, B, hidden)
        return self.head(torch.cat([h[-2], h[-1]], dim=1))


def gru(in_channels: int = 1, hidden: int = 64, num_classes: int = 10, layers: int = 1) -> nn.Module:
    return GRUClassifier(in_channels, hidden, num_classes, layers)


# -- causal language models: (B, L) token ids -> (B, L, V) logits -----------------------------------
# Each keeps its final hidden states and its output layer apart (`.hidden(input_ids)` -> (B, L, H),
# `.lm_head`: Linear(H, V)), so stage two can fuse the head into the sparse loss and never hold
# (tokens, V) logits; `forward` is `lm_head(hidden(input_ids))`, as Hugging Face causal LMs return.
#
#     factory = "mtkd.pipeline.models:gru_lm"          kwargs = { vocab_size = 512, hidden = 128 }
#     factory = "mtkd.pipeline.models:transformer_lm"  kwargs = { vocab_size = 512, d_model = 128, layers = 2 }


class GRULM(nn.Module):
    """Token embedding, a unidirectional GRU (causal by construction), a linear head."""

    def __init__(self, vocab_size: int, hidden: int = 128, layers: int = 1, embed: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed or hidden)
        self.gru = nn.GRU(embed or hidden, hidden, num_layers=layers, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab_size)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(input_ids))  # (B, L, H)
        return out

    def get_input_embeddings(self) -> nn.Embedding:  # Hugging Face's name: stage one checks ids against it
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids))  # (B, L, V)


def gru_lm(vocab_size: int, hidden: int = 128, layers: int = 1, embed: int | None = None) -> nn.Module:
    return GRULM(vocab_size, hidden, layers, embed)


class TransformerLM(nn.Module):
    """A pre-norm causal Transformer: token and learned position embeddings, `layers` blocks of
    causal self-attention and MLP, a final LayerNorm, a linear head. Right padding needs no mask:
    under the causal mask a real position never attends to the padding after it."""

    def __init__(self, vocab_size: int, d_model: int = 128, layers: int = 2, heads: int = 4, max_len: int = 512, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def get_input_embeddings(self) -> nn.Embedding:  # Hugging Face's name: stage one checks ids against it
        return self.embed

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_len {self.max_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids) + self.position(positions)  # (B, L, D)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device, dtype=x.dtype)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids))  # (B, L, V)


def transformer_lm(vocab_size: int, d_model: int = 128, layers: int = 2, heads: int = 4, max_len: int = 512, dropout: float = 0.0) -> nn.Module:
    return TransformerLM(vocab_size, d_model, layers, heads, max_len, dropout)
