"""Stage two's watch for NaN/inf: in the teachers' stored values and in the training loss.

Each batch adds two flags on the device (a reduction the size of the batch's logits, no host sync);
the host looks at them only where it synchronises anyway, before every checkpoint and at every
epoch's end, so a checkpoint or a student.pt is never written from a step that saw a non-finite
value, and the last good checkpoint stays on disk:

- a teacher value: CorruptStoreError (exit 2) naming store, teacher and block, found by re-reading
  the chosen teachers (only on this path, so its cost does not matter), pointing at `mtkd verify`;
- a loss: NonFiniteLossError (exit 1) naming the epoch and batch where it first turned non-finite.

Under DDP every rank checks at the same points and the flags are all-reduced, so all ranks stop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mtkd.pipeline.errors import CorruptStoreError, NonFiniteLossError
from mtkd.pipeline.store import LogitStore
from mtkd.pipeline.verify import first_nonfinite


class FiniteGuard:
    """Flags on the device; `check` raises on the host. `batches_per_epoch` decodes the first bad batch."""

    def __init__(self, device: torch.device, *, batches_per_epoch: int, store: LogitStore | None, teachers: list[str]):
        self.store, self.teachers, self.batches_per_epoch = store, teachers, batches_per_epoch
        # [teacher values bad, first bad loss batch + 1 (0: none)] as float64 (all_reduce MAX of both)
        self.flags = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, epoch: int, batch: int, loss: Tensor, logits: Tensor | None) -> None:
        """One batch: its (K, B, V) teacher logits (None without a store) and its loss, on the device."""
        if logits is not None:
            self.flags[0] = torch.maximum(self.flags[0], (~torch.isfinite(logits).all()).double())
        index = float(epoch * self.batches_per_epoch + batch + 1)
        first = torch.where((self.flags[1] == 0) & ~torch.isfinite(loss.detach()), index, self.flags[1])
        self.flags[1] = first

    def check(self, world_size: int) -> None:
        """Raise if any rank saw a non-finite value (call it on every rank at the same points)."""
        flags = self.flags.clone()
        if world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # MAX: of the first bad batches, a late one if ranks differ
        teacher_bad, first_bad_loss = flags.tolist()
        if teacher_bad and self.store is not None:
            found = first_nonfinite(self.store, self.teachers)
            if found is not None:
                raise CorruptStoreError(found.message)
            raise CorruptStoreError(
                f"store {str(self.store.path)!r}: teachers {', '.join(map(repr, self.teachers))} gave NaN/inf in training; "
                f"run `mtkd verify {self.store.path}`"
            )
        if first_bad_loss:
            epoch, batch = divmod(int(first_bad_loss) - 1, self.batches_per_epoch)
            raise NonFiniteLossError(
                f"the training loss turned NaN/inf at epoch {epoch + 1}, batch {batch + 1}; stopped without saving "
                "that state: the last good checkpoint is kept (lower --lr, or check the data)"
            )
