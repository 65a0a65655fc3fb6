"""Regression teachers (README, "Regression"): Friedman's #1 function, generated here, never downloaded.

    y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise,   x ~ U[0, 1]^10, noise ~ N(0, 1)

(x6..x10 do not enter y). Few labels (500), many unlabelled rows (5000): the setting distillation is for.

    python friedman.py    # writes data/train.npz, data/val.npz, data/test.npz (x, float y),
                          # data/transfer.npz (x, y all NaN: unlabelled)

A float `y` makes an .npz a regression data set (NaN where unknown); teachers of such data are stored
as raw outputs (layout "values"). The models, named in the TOMLs as `factory = "friedman:NAME"` or
mtkd's own `mtkd.pipeline.models:mlp`, map a (B, 10) float32 batch to (B, 1):
    quadratic()     teacher: a linear model over x, x^2 and every product x_i x_j (65 features)
    mlp             teachers: MLPs of 256x256 and of 32 hidden units; the student: 32 hidden units
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES = 10
LABELLED, UNLABELLED, VAL, TEST = 500, 5000, 500, 2000


def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n rows (n, 10) float32 and their targets (n,) float32, the same for the same seed."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, FEATURES))
    y = 10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4] + rng.normal(size=n)
    return x.astype(np.float32), y.astype(np.float32)


class Quadratic(nn.Module):
    """y = w . [x, x^2, x_i x_j (i < j)] + b: a linear teacher over fixed quadratic features."""

    def __init__(self, in_features: int = FEATURES):
        super().__init__()
        i, j = torch.triu_indices(in_features, in_features, offset=1)
        self.register_buffer("i", i, persistent=False)
        self.register_buffer("j", j, persistent=False)
        self.linear = nn.Linear(2 * in_features + len(i), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, x * x, x[:, self.i] * x[:, self.j]], dim=1))


def quadratic(in_features: int = FEATURES) -> nn.Module:
    return Quadratic(in_features)


if __name__ == "__main__":
    out = Path("data")
    out.mkdir(exist_ok=True)
    for name, n, seed in (("train", LABELLED, 0), ("val", VAL, 1), ("test", TEST, 2)):
        x, y = make(n, seed)
        np.savez(out / f"{name}.npz", x=x, y=y)
    x, _ = make(UNLABELLED, seed=3)
    np.savez(out / "transfer.npz", x=x, y=np.full(len(x), np.nan, dtype=np.float32))  # float and all NaN: unlabelled regression rows
    print(f"wrote {out}/train.npz ({LABELLED}), val.npz ({VAL}), test.npz ({TEST}), transfer.npz ({UNLABELLED} unlabelled)")
