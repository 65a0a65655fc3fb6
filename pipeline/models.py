"""Small built-in models for vector and 1-D sequence inputs: factories for model TOML files.

    factory = "mtkd.pipeline.models:mlp"     kwargs = { in_features = 40, hidden = [100, 100] }
    factory = "mtkd.pipeline.models:cnn1d"   kwargs = { channels = 32 }
    factory = "mtkd.pipeline.models:gru"     kwargs = { hidden = 64 }

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
