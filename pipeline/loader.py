"""Stage two's loader: rows of inputs, labels and the chosen teachers' stored logits, in batches.

    loader = BatchLoader(data.x, data.labels, batch_size=256, seed=0, store=store, teachers=["cnn", "gru"])
    with closing(loader.batches(start_epoch, stop_epoch, start_batch)) as batches:
        for epoch, b, batch in batches:  # Batch: x (B, ...), logits (K, B, V), labels (B,), rows (B,)
            ...

Two ways to the same rows (`mode`):

* "memory": when the chosen logits take at most MEMORY_FRACTION of the memory available to each
  process on this node, they are read once, sequentially in whole chunks, into one (K, N, V)
  tensor in the store's dtype. Each epoch is a full permutation of the rows, indexed in memory.
* "stream": otherwise. Each epoch permutes the store's read units (one chunk at the SPEC's chunk
  sizes; a run of consecutive chunks when chunks are tiny, see READ_BYTES), reads whole chunks
  only (partial chunk reads were measured up to 70x slower), and shuffles the rows within a window
  of several units (at least MIN_WINDOW_UNITS, about `window_bytes` of logits). A background
  thread reads the windows and hands them over through a bounded queue (WINDOW_QUEUE); the
  training thread cuts batches from them. The thread runs ahead across epoch ends, so reading
  overlaps training and validation; at most three windows are alive at once.

Both modes assemble a batch the same way in the training thread: the rows' inputs and labels are
gathered from memory (a data spec is loaded whole, see specs.py) and the logits are a gather (in
memory) or a slice of the shuffled window (streaming). Labels come from the data, not the store:
the data given on the command line is what the student trains on.

Determinism: the rows of epoch e, in order, depend only on (seed, e, rank, world_size, mode) and,
streaming, on the store's chunking and the window size, so a run resumed at (epoch, batch index)
sees exactly the batches that an uninterrupted run would. The two modes shuffle differently (same rows per epoch,
different order), which is why a run records its mode and keeps it on resume.

DDP: each of the W ranks takes N // W rows per epoch, so every rank has the same number of
batches (the last one may be short, equally short everywhere) and no row reaches two ranks in one
epoch; the N mod W rows left over are different ones each epoch. In memory the ranks take every
W-th row of the epoch's permutation (as DistributedSampler does); streaming, each rank takes a
contiguous stretch of the permuted unit sequence, so it reads only its own units plus at most
the two it shares with its neighbours.

On CUDA, batches are assembled in pinned host memory and copied with non_blocking=True.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

# The chosen logits are held in memory when they take at most this share of the memory available
# (MemAvailable, divided among the processes of this node): "comfortably" leaves room for the
# inputs, the model, the optimizer and the page cache.
MEMORY_FRACTION = 0.25
# A streaming window (the rows shuffled together) holds about this many bytes of logits ...
WINDOW_BYTES = 64 << 20
# ... and never fewer than this many read units (fewer would shuffle too locally).
MIN_WINDOW_UNITS = 8
# One read: at least this many bytes of one teacher's logits, as a run of consecutive whole chunks.
# At the SPEC's chunk sizes (1-4 MB) a unit is one chunk; tiny chunks are read several at a time,
# because each read costs a fixed ~0.4 ms of (GIL-holding) Zarr overhead.
READ_BYTES = 1 << 20
# Shuffled windows waiting for the trainer: with the one it is cutting batches from and the one
# the reader thread is filling, at most three windows are alive at once.
WINDOW_QUEUE = 1


class LogitSource(Protocol):
    """What the loader needs from a store (mtkd.pipeline.store.LogitStore provides it)."""

    num_rows: int
    num_classes: int
    chunk_rows: int

    def teacher(self, name: str) -> Any: ...  # .dtype: "float16" | "bfloat16" | "float32"

    def read_logits(self, name: str, start: int, stop: int) -> Tensor: ...  # (stop - start, V)


@dataclass(frozen=True)
class Batch:
    """One batch: inputs (B, ...), teacher logits (K, B, V) or None, labels (B,), data rows (B,)."""

    x: Tensor
    logits: Tensor | None
    labels: Tensor
    rows: Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.x), move(self.logits), move(self.labels), self.rows)


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), shared by this node's processes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def as_tensor(a: np.ndarray | Tensor) -> Tensor:
    """A tensor sharing `a`'s memory; read-only arrays (shared data) are fine, nothing writes to them."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.as_tensor(a)
    return torch.as_tensor(a)


def _rng(*key: int) -> np.random.Generator:
    # SeedSequence mixes the whole key: (seed, epoch, 0) and (seed, epoch, 1, rank, window) are
    # independent streams, identical on every machine and rank.
    return np.random.default_rng(list(key))


class BatchLoader:
    """Batches of (inputs, chosen teachers' logits, labels) for one rank, deterministic per epoch.

    x: (N, ...) inputs; labels: (N,) int64 with -100 where unknown. `store` and `teachers` give the
    logits (none: hard-label training, logits None). `stream`: True/False forces a mode, None picks
    one from `memory_budget` (bytes; default MEMORY_FRACTION of the available memory per process).
    Streaming: `window_bytes` of logits are shuffled together; reads cover at least `read_bytes`
    of one teacher. Batches arrive on `device` (pinned host memory and non_blocking on CUDA).
    """

    def __init__(
        self,
        x: np.ndarray | Tensor,
        labels: np.ndarray | Tensor,
        *,
        batch_size: int,
        seed: int,
        store: LogitSource | None = None,
        teachers: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        stream: bool | None = None,
        memory_budget: int | None = None,
        window_bytes: int = WINDOW_BYTES,
        read_bytes: int = READ_BYTES,
    ):
        self.x = as_tensor(x)
        self.labels = as_tensor(labels).long()
        n = len(self.x)
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(self.labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if n < world_size:
            raise ValueError(f"{n} rows cannot be split over {world_size} processes")
        self.teachers = list(teachers)
        if store is None and self.teachers:
            raise ValueError("teachers given without a store")
        if store is not None and not self.teachers:
            raise ValueError("a store needs at least one teacher")
        if store is not None and store.num_rows != n:
            raise ValueError(f"the store has {store.num_rows} rows, the inputs {n}")
        self.store = store
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"

        k, v = len(self.teachers), store.num_classes if store is not None else 0
        dtypes = {store.teacher(t).dtype for t in self.teachers} if store is not None else set()
        # Teachers stored in different dtypes are held together in float32.
        self.logits_dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32 if dtypes else None
        row_bytes = k * v * (torch.finfo(self.logits_dtype).bits // 8 if self.logits_dtype else 0)
        self.logits_bytes = n * row_bytes
        if store is None:
            self.mode = "memory"
        elif stream is not None:
            self.mode = "stream" if stream else "memory"
        else:
            if memory_budget is None:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                memory_budget = int(MEMORY_FRACTION * available_memory() / max(local, 1))
            self.mode = "stream" if self.logits_bytes > memory_budget else "memory"
        if store is not None:
            # The unit of reading and of the per-epoch permutation: consecutive whole chunks.
            cr, teacher_row_bytes = store.chunk_rows, max(row_bytes // k, 1)
            self.read_rows = cr * max(1, math.ceil(read_bytes / (cr * teacher_row_bytes)))
            self.window_rows = max(MIN_WINDOW_UNITS * self.read_rows, window_bytes // max(row_bytes, 1))
        self._in_memory: Tensor | None = None  # (K, N, V), read on first use

    # -- sizes -------------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.x)

    @property
    def rows_per_epoch(self) -> int:
        """Rows this rank sees per epoch (the same on every rank)."""
        return self.num_rows // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.rows_per_epoch / self.batch_size)

    # -- epochs ------------------------------------------------------------------------------------

    def batches(self, start_epoch: int, stop_epoch: int, start_batch: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, batch index, batch) for epochs [start_epoch, stop_epoch), from `start_batch` of the first.

        One iterator spans the epochs so that, streaming, the reader thread runs ahead across an
        epoch's end: the next epoch's first window is read while this one's last batches train
        (and while the trainer validates). Close it (contextlib.closing) when leaving early.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.batches_per_epoch}]")
        build = self._stream if self.mode == "stream" else self._memory
        items = build(start_epoch, stop_epoch, start_batch)
        return items if self.device.type == "cpu" else self._to_device(items)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of one epoch from `start_batch` on (see `batches`)."""
        items = self.batches(epoch, epoch + 1, start_batch)
        try:
            for _, _, batch in items:
                yield batch
        finally:
            items.close()  # stops a reader thread at once

    def _to_device(self, items: Iterator[tuple[int, int, Batch]]) -> Iterator[tuple[int, int, Batch]]:
        try:
            for epoch, b, batch in items:
                yield epoch, b, batch.to(self.device, non_blocking=self.pin)
        finally:
            items.close()

    def _take(self, src: Tensor, dim: int, index: Tensor) -> Tensor:
        """index_select, into pinned memory when the batch is bound for a GPU."""
        if not self.pin:
            return torch.index_select(src, dim, index)
        shape = list(src.shape)
        shape[dim] = len(index)
        out = torch.empty(shape, dtype=src.dtype, pin_memory=True)
        return torch.index_select(src, dim, index, out=out)

    def _batch(self, rows: Tensor, logits: Tensor | None) -> Batch:
        # Inputs are gathered per batch in both modes (a window of inputs could be large).
        return Batch(x=self._take(self.x, 0, rows), logits=logits, labels=self._take(self.labels, 0, rows), rows=rows)

    # -- in memory ---------------------------------------------------------------------------------

    def _memory(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Batch]]:
        logits = self._read_all()  # (K, N, V) or None
        per_rank, bs = self.rows_per_epoch, self.batch_size
        for epoch in range(start_epoch, stop_epoch):
            order = _rng(self.seed, epoch, 0).permutation(self.num_rows)
            mine = torch.from_numpy(order[self.rank : per_rank * self.world_size : self.world_size])
            for b in range(start_batch if epoch == start_epoch else 0, self.batches_per_epoch):
                rows = mine[b * bs : (b + 1) * bs]
                yield epoch, b, self._batch(rows, None if logits is None else self._take(logits, 1, rows))  # (K, B, V)

    def _read_all(self) -> Tensor | None:
        """The chosen logits as one (K, N, V) tensor, read once, sequentially, whole chunks."""
        if self.store is None:
            return None
        if self._in_memory is None:
            n, v, step = self.num_rows, self.store.num_classes, self.read_rows
            out = torch.empty((len(self.teachers), n, v), dtype=self.logits_dtype)
            for k, name in enumerate(self.teachers):
                for start in range(0, n, step):
                    stop = min(start + step, n)
                    out[k, start:stop] = self.store.read_logits(name, start, stop)
            self._in_memory = out
        return self._in_memory

    # -- streaming ---------------------------------------------------------------------------------

    def _stream(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Batch]]:
        """Cut batches from the windows that the reader thread hands over, gathering their logits.

        The shuffle is applied here, per batch, as the in-memory gather is: the same work in the
        training thread in both modes, while the reader thread only reads.
        """
        bs, per_rank = self.batch_size, self.rows_per_epoch
        free: list[np.ndarray] = []  # window buffers done with, for the reader to refill (no page faults)
        windows = _in_background(self._windows(start_epoch, stop_epoch, start_batch, free), capacity=WINDOW_QUEUE)
        try:
            pending: list[tuple[Tensor, Tensor]] = []  # (logits, rows) of a batch that spans several windows
            for epoch, w_lo, w_hi, buffer, logits, order, rows in windows:
                pos = max(w_lo, start_batch * bs) if epoch == start_epoch else w_lo  # this rank's next row
                while pos < w_hi:
                    batch_end = min((pos // bs + 1) * bs, per_rank)
                    lo, hi = pos - w_lo, min(batch_end, w_hi) - w_lo
                    part = (self._take(logits, 1, order[lo:hi]), rows[lo:hi])  # (K, b, V), (b,)
                    pos = hi + w_lo
                    if pos < batch_end:  # the batch goes on in the next window (a batch may span several)
                        pending.append(part)
                        continue
                    yield epoch, (pos - 1) // bs, self._assemble([*pending, part])
                    pending = []
                del logits
                free.append(buffer)  # every row of this window is gathered: the buffer can be refilled
        finally:
            windows.close()

    def _assemble(self, parts: list[tuple[Tensor, Tensor]]) -> Batch:
        if len(parts) == 1:
            logits, rows = parts[0]
        else:
            logits, rows = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
            logits = logits.pin_memory() if self.pin else logits
        return self._batch(rows, logits)

    def _windows(self, start_epoch: int, stop_epoch: int, start_batch: int, free: list[np.ndarray]) -> Iterator[tuple]:
        """(epoch, first, end, buffer, logits, order, rows) per window (reader thread).

        A window is this rank's rows [first, end) of an epoch: `logits` (K, end - first, V) as read
        (a view of `buffer`, taken from `free` when one is there), `order` the window's shuffle
        (positions in `logits`) and `rows` the data rows in that order. Each epoch permutes the read
        units (runs of `read_rows` rows: whole chunks); this rank's stretch of the unit sequence is
        cut into windows of `window_rows`. The thread uses numpy only: a torch op here would start
        a second OpenMP team, competing with the training thread's for the cores.
        """
        store, n, ur, wr = self.store, self.num_rows, self.read_rows, self.window_rows
        k, v, per_rank = len(self.teachers), store.num_classes, self.rows_per_epoch
        base = self.rank * per_rank  # this rank's stretch of the sequence: [base, base + per_rank)
        cached: tuple[int, int, list[np.ndarray]] | None = None  # a unit shared by two windows is read once

        def read_unit(epoch: int, c: int) -> list[np.ndarray]:  # K x (rows, V), whole chunks
            nonlocal cached
            if cached is None or cached[:2] != (epoch, c):
                lo, hi = c * ur, min((c + 1) * ur, n)
                cached = (epoch, c, [_as_numpy(store.read_logits(name, lo, hi), self.logits_dtype) for name in self.teachers])
            return cached[2]

        for epoch in range(start_epoch, stop_epoch):
            # The epoch's unit sequence (the same on every rank) and where each unit starts in it.
            units = _rng(self.seed, epoch, 0).permutation(math.ceil(n / ur))
            seq_start = np.concatenate([[0], np.cumsum(np.minimum(ur, n - units * ur))])
            first = start_batch * self.batch_size if epoch == start_epoch else 0
            for w in range(first // wr, math.ceil(per_rank / wr)):
                w_lo, w_hi = w * wr, min((w + 1) * wr, per_rank)
                a, b = base + w_lo, base + w_hi  # the window's stretch of the unit sequence
                buffer = free.pop() if free else np.empty(k * wr * v, dtype=_NUMPY_STORAGE[self.logits_dtype])
                # Contiguous even for a short window: index_select on a strided view is ~30x slower.
                logits = buffer[: k * (w_hi - w_lo) * v].reshape(k, w_hi - w_lo, v)
                rows = np.empty(w_hi - w_lo, dtype=np.int64)
                for i in range(np.searchsorted(seq_start, a, side="right") - 1, len(units)):
                    if seq_start[i] >= b:
                        break
                    lo, hi = max(a, seq_start[i]) - seq_start[i], min(b, seq_start[i + 1]) - seq_start[i]
                    at = seq_start[i] + lo - a  # where these rows go in the window
                    for t, unit in enumerate(read_unit(epoch, int(units[i]))):
                        logits[t, at : at + hi - lo] = unit[lo:hi]
                    rows[at : at + hi - lo] = np.arange(units[i] * ur + lo, units[i] * ur + hi)
                order = _rng(self.seed, epoch, 1, self.rank, w).permutation(w_hi - w_lo)
                logits = _from_numpy(logits, self.logits_dtype)
                yield epoch, w_lo, w_hi, buffer, logits, torch.from_numpy(order), torch.from_numpy(rows[order])


# Logits travel through the reader thread as numpy arrays; bfloat16 as its 16 bits.
_NUMPY_STORAGE = {torch.float16: np.float16, torch.bfloat16: np.int16, torch.float32: np.float32}


def _as_numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    if t.dtype != dtype:
        t = t.to(dtype)  # teachers stored in different dtypes, held together in float32
    return t.view(torch.int16).numpy() if dtype == torch.bfloat16 else t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _in_background(items: Iterator[Any], *, capacity: int) -> Iterator[Any]:
    """Run `items` in a thread, handing them over through a queue of `capacity`; close to stop it."""
    handoff: queue.Queue = queue.Queue(maxsize=capacity)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failure(e))

    worker = threading.Thread(target=produce, name="mtkd-loader", daemon=True)
    worker.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()
