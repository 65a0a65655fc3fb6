"""Bring your own data: mtkd on data of your own, with models of your own (README, "Bring your own data").

The data: 12x12 grey images, inputs of shape (N, 1, 12, 12) float32, of four classes (0 a horizontal
bar, 1 a vertical bar, 2 a cross, 3 a hollow square) of random size, brightness and position, in
noise. Few labels (500), many unlabelled images (5000): the setting distillation is for.

    python shapes.py      # writes data/train.npz, data/val.npz, data/test.npz (x, y: labelled)

The unlabelled images come from a function instead of a file: `--data shapes:transfer` (MODULE:FUNCTION;
mtkd imports `shapes` from the current directory or from the folder of the TOML that names it).

The models, named in the TOMLs as `factory = "shapes:NAME"`, each a function returning an nn.Module
that maps a (B, 1, 12, 12) float32 batch to (B, 4) logits:
    cnn(channels, kernel_size)   teacher: two convolutions, global max pooling
    pooled_cnn(channels)         teacher: convolution, 2x2 pooling, convolution, a linear layer
    student(hidden)              the student: a small MLP on the 144 pixels
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

SIZE, CLASSES = 12, 4
LABELLED, UNLABELLED = 500, 5000


def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 1, 12, 12) float32 and their labels (n,) int64, the same for the same seed."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0.0, 0.35, (n, 1, SIZE, SIZE)).astype(np.float32)
    for i, label in enumerate(y):
        side = int(rng.integers(5, 9))
        top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        mid = side // 2
        shape = np.zeros((side, side), np.float32)
        if label == 0:
            shape[mid, :] = 1
        elif label == 1:
            shape[:, mid] = 1
        elif label == 2:
            shape[mid, :] = shape[:, mid] = 1
        else:
            shape[0, :] = shape[-1, :] = shape[:, 0] = shape[:, -1] = 1
        x[i, 0, top:top + side, left:left + side] += rng.uniform(0.6, 1.2) * shape
    return x, y.astype(np.int64)


def transfer() -> dict[str, np.ndarray]:
    """The transfer set for stage one and distillation: the 500 labelled training images, then 5000
    unlabelled ones (label -100: unknown). A data function may return x, (x, y), {"x", "y"} or a
    torch Dataset of (x, y) pairs; x of any shape whose first axis is the sample."""
    x_train, y_train = make(LABELLED, seed=0)
    x_more, _ = make(UNLABELLED, seed=3)
    return {"x": np.concatenate([x_train, x_more]),
            "y": np.concatenate([y_train, np.full(UNLABELLED, -100, dtype=np.int64)])}


def cnn(channels: int = 32, kernel_size: int = 3, num_classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size, padding=kernel_size // 2), nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes),
    )


def pooled_cnn(channels: int = 16, num_classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * channels, num_classes),
    )


def student(hidden: int = 64, num_classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


if __name__ == "__main__":
    Path("data").mkdir(exist_ok=True)
    for name, n, seed in (("train", LABELLED, 0), ("val", 500, 1), ("test", 2000, 2)):
        x, y = make(n, seed)
        np.savez(f"data/{name}.npz", x=x, y=y)
        print(f"data/{name}.npz: x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
