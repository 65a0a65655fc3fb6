"""Stage two's watch for a training loss that turns NaN/inf.

Each batch updates one flag on the device (no host sync); the host looks at it only where it
synchronises anyway, before every checkpoint and at every epoch's end, so a checkpoint or a
student.pt is never written from a step that saw a non-finite loss, and the last good checkpoint
stays on disk. The error (NonFiniteLossError, exit 1) names the epoch and batch where the loss
first turned non-finite. Under DDP every rank checks at the same points and the flags are
all-reduced, so all ranks stop together.

(Teacher values need no such watch: the store refuses a NaN/inf in a recorded block as it is read,
on the host, before it reaches a device; see LogitStore.read_logits.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtkd.pipeline.errors import NonFiniteLossError


class LossGuard:
    """`add` each batch's loss (on the device); `check` raises on the host if one was NaN/inf."""

    def __init__(self, device: torch.device, *, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        self.first_bad = torch.zeros((), dtype=torch.float64, device=device)  # global batch index + 1; 0: none

    def add(self, epoch: int, batch: int, loss: Tensor) -> None:
        index = float(epoch * self.batches_per_epoch + batch + 1)
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(loss.detach()), index, self.first_bad)

    def check(self, world_size: int) -> None:
        """Raise if any rank saw a non-finite loss (every rank calls this at the same points)."""
        first_bad = self.first_bad.clone()
        if world_size > 1:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)  # of the ranks' first bad batches, the latest
        if first_bad.item():
            epoch, batch = divmod(int(first_bad.item()) - 1, self.batches_per_epoch)
            raise NonFiniteLossError(
                f"the training loss turned NaN/inf at epoch {epoch + 1}, batch {batch + 1}; stopped without saving "
                "that state: the last good checkpoint is kept (lower --lr, or check the data)"
            )
