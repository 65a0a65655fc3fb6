"""Where models run: the `--device` choice every command shares, and what it resolves to."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from mtkd.pipeline.errors import BadInputError

if TYPE_CHECKING:
    import torch


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; refuses cuda without a CUDA device."""
    import torch  # here, not at the top: every command's signature imports Device, and --help stays light

    device = device.value if isinstance(device, Device) else device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available")
    return torch.device(device)
