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


# ---------------------------------------------------------------------------------------------------
# Token sequences
# ---------------------------------------------------------------------------------------------------
#
# For language models a sample is a whole sequence and every position of it is one store row
# (SPEC "Two kinds of data"). A batch is B sequences, padded on the right to the longest:
#     input_ids (B, L), attention_mask (B, L) bool, labels (B, L) (-100 at each sequence's last
#     position and on padding), and the chosen teachers' rows of its P real positions in row-major
#     order (the order of input_ids[attention_mask]), stacked (K, P, ...) as the sparse kernel takes them:
#     sparse  ids (K, P, k) int64, logprobs (K, P, k) float32 re-tempered to the run's temperature,
#             label_logprob (K, P) float32 (T = 1, NaN without label)
#     dense   logits (K, P, V) in the store's dtype
# Padding positions never reach the loss: the trainer selects the real positions with the mask.
#
# The same two modes as for rows, over sequences instead of rows:
# * "memory": the chosen teachers' rows read once, sequentially; each epoch a full permutation of
#   the sequences; rank r takes every W-th sequence of it (DistributedSampler's split).
# * "stream": the store's rows are cut into read units of whole chunks (about READ_BYTES of one
#   teacher); a sequence belongs to the unit its first row lies in. Each epoch permutes the units;
#   the sequences in that order are cut into equal contiguous stretches per rank, and each rank's
#   stretch into windows of about `window_bytes` (at least MIN_WINDOW_UNITS units' worth), whose
#   sequences are shuffled together. A background thread reads a window's rows (whole chunks:
#   a unit plus the chunk its last sequence runs into) and hands them over; batches are cut in the
#   training thread. The token ids themselves come from the data (in memory: 8 bytes a position
#   against the ~12 * k bytes of each sparse teacher's row).
# Determinism, resume and DDP: as for rows (the order of epoch e depends only on seed, e, rank,
# world size, mode and, streaming, the store's chunking and the window size); each rank gets
# num_seqs // W sequences per epoch.


@dataclass(frozen=True)
class TokenBatch:
    """B padded sequences and their teachers' rows at the P real positions (see above)."""

    input_ids: Tensor  # (B, L) int64, 0 on padding
    attention_mask: Tensor  # (B, L) bool
    labels: Tensor  # (B, L) int64, -100 at each sequence's end and on padding
    teachers: dict[str, Tensor]  # (K, P, ...) per array; empty without a store
    seqs: Tensor  # (B,) sequence ids

    def __len__(self) -> int:
        return len(self.seqs)

    def to(self, device: torch.device, non_blocking: bool = False) -> TokenBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return TokenBatch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                          {k: move(v) for k, v in self.teachers.items()}, self.seqs)


class TeacherRows:
    """Reads rows [lo, hi) of the chosen teachers of a store, stacked (K, n, ...) per array.

    Top-k teachers are re-tempered by the store to `temperature` (one of their stored ones), and
    teachers with smaller k are padded to the largest with ids past any vocabulary and probability
    0 (log 0 = -inf), which the sparse kernel counts as nothing. Dense teachers give their logits.
    """

    # Distinct ids past every vocabulary for padding a teacher's k (ids >= V count as tail, here with p = 0).
    PAD_ID = 2**31 - 1

    def __init__(self, store: Any, teachers: Sequence[str], temperature: float):
        self.store, self.teachers, self.temperature = store, list(teachers), float(temperature)
        layouts = [store.layout(t) for t in self.teachers]
        self.sparse = layouts[0].name == "topk"
        if any((lay.name == "topk") != self.sparse for lay in layouts):
            raise ValueError("teachers stored top-k and dense cannot be fused together")
        self.k = max(lay.top_k for lay in layouts) if self.sparse else 0
        self.vocab = store.num_classes
        dtypes = {lay.dtype for lay in layouts}
        self.logits_dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of every chosen teacher, as held in memory."""
        k = len(self.teachers)
        if self.sparse:
            return k * (self.k * (8 + 4) + 4)
        return k * self.vocab * torch.finfo(self.logits_dtype).bits // 8

    def read(self, lo: int, hi: int) -> dict[str, Tensor]:
        if not self.sparse:
            return {"logits": torch.stack([self.store.read_logits(t, lo, hi).to(self.logits_dtype) for t in self.teachers])}
        ids, logprobs, label_logprob = [], [], []
        for name in self.teachers:
            rows = self.store.read_topk(name, lo, hi, self.temperature)
            pad = self.k - rows.ids.shape[1]
            i, lp = rows.ids, rows.logprobs.float()
            if pad:
                fill = self.PAD_ID - torch.arange(pad, dtype=torch.int64)
                i = torch.cat([i, fill.expand(len(i), pad)], dim=1)
                lp = torch.cat([lp, torch.full((len(lp), pad), -math.inf)], dim=1)
            ids.append(i)
            logprobs.append(lp)
            label_logprob.append(rows.label_logprob.float())
        return {"ids": torch.stack(ids), "logprobs": torch.stack(logprobs), "label_logprob": torch.stack(label_logprob)}


class SequenceLoader:
    """Batches of whole token sequences with their teachers' per-position rows (see above).

    `tokens` (num_rows,) and `offsets` (num_seqs + 1,) are the data (TokenData); `teachers` a
    TeacherRows over a store of the same data, or None for hard-label training.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        teachers: TeacherRows | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        stream: bool | None = None,
        memory_budget: int | None = None,
        window_bytes: int = WINDOW_BYTES,
        read_bytes: int = READ_BYTES,
    ):
        self.tokens = as_tensor(tokens).long()
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        n_seqs = len(self.lengths)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if n_seqs < world_size:
            raise ValueError(f"{n_seqs} sequences cannot be split over {world_size} processes")
        if teachers is not None and teachers.store.num_rows != len(self.tokens):
            raise ValueError(f"the store has {teachers.store.num_rows} rows, the data {len(self.tokens)} positions")
        self.source = teachers
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.teacher_bytes = 0 if teachers is None else len(self.tokens) * teachers.row_bytes
        if teachers is None:
            self.mode = "memory"
        elif stream is not None:
            self.mode = "stream" if stream else "memory"
        else:
            if memory_budget is None:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                memory_budget = int(MEMORY_FRACTION * available_memory() / max(local, 1))
            self.mode = "stream" if self.teacher_bytes > memory_budget else "memory"
        if teachers is not None:
            cr = teachers.store.chunk_rows
            teacher_row_bytes = max(teachers.row_bytes // len(teachers.teachers), 1)
            self.read_rows = cr * max(1, math.ceil(read_bytes / (cr * teacher_row_bytes)))
            # Sequences grouped by the read unit their first row lies in (units may be empty).
            self.unit_of_seq = self.offsets[:-1] // self.read_rows
            self.num_units = math.ceil(len(self.tokens) / self.read_rows)
            rows_per_window = max(MIN_WINDOW_UNITS * self.read_rows, window_bytes // max(teachers.row_bytes, 1))
            self.window_seqs = max(1, math.ceil(rows_per_window * n_seqs / len(self.tokens)))
        self._in_memory: dict[str, Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def seqs_per_epoch(self) -> int:
        """Sequences this rank sees per epoch (the same on every rank)."""
        return self.num_seqs // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.seqs_per_epoch / self.batch_size)

    def batches(self, start_epoch: int, stop_epoch: int, start_batch: int = 0) -> Iterator[tuple[int, int, TokenBatch]]:
        """(epoch, batch index, batch) for epochs [start_epoch, stop_epoch), from `start_batch` of the first
        (as BatchLoader.batches; close it when leaving early)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.batches_per_epoch}]")
        build = self._stream if self.mode == "stream" else self._memory
        items = build(start_epoch, stop_epoch, start_batch)
        return items if self.device.type == "cpu" else _to_device(items, self.device, self.pin)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[TokenBatch]:
        items = self.batches(epoch, epoch + 1, start_batch)
        try:
            for _, _, batch in items:
                yield batch
        finally:
            items.close()

    # -- one batch -----------------------------------------------------------------------------------

    def _batch(self, seqs: np.ndarray, teachers: dict[str, Tensor]) -> TokenBatch:
        """Pad the sequences `seqs` into (B, L); `teachers` are their rows, concatenated in order."""
        lengths = self.lengths[seqs]
        b, width = len(seqs), int(lengths.max())
        starts = self.offsets[seqs]
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])  # (B, L)
        rows = torch.from_numpy(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]))  # (P,)
        input_ids = torch.zeros((b, width), dtype=torch.int64)
        input_ids[mask] = self.tokens[rows]
        labels = torch.full((b, width), -100, dtype=torch.int64)
        labels[:, :-1] = torch.where(mask[:, 1:], input_ids[:, 1:], -100)  # the next token of the same sequence
        if self.pin:
            input_ids, mask, labels = input_ids.pin_memory(), mask.pin_memory(), labels.pin_memory()
            teachers = {k: v.pin_memory() for k, v in teachers.items()}
        return TokenBatch(input_ids, mask, labels, teachers, torch.from_numpy(np.asarray(seqs)))

    def _rows_of(self, seqs: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in seqs])

    # -- in memory -----------------------------------------------------------------------------------

    def _memory(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, TokenBatch]]:
        every = self._read_all()
        per_rank, bs = self.seqs_per_epoch, self.batch_size
        for epoch in range(start_epoch, stop_epoch):
            order = _rng(self.seed, epoch, 0).permutation(self.num_seqs)
            mine = order[self.rank : per_rank * self.world_size : self.world_size]
            for b in range(start_batch if epoch == start_epoch else 0, self.batches_per_epoch):
                seqs = mine[b * bs : (b + 1) * bs]
                teachers = {}
                if every is not None:
                    rows = torch.from_numpy(self._rows_of(seqs))
                    teachers = {k: torch.index_select(v, 1, rows) for k, v in every.items()}  # (K, P, ...)
                yield epoch, b, self._batch(seqs, teachers)

    def _read_all(self) -> dict[str, Tensor] | None:
        """Every row of the chosen teachers, read once, sequentially, in whole read units."""
        if self.source is None:
            return None
        if self._in_memory is None:
            n, step = len(self.tokens), self.read_rows
            parts = [self.source.read(lo, min(lo + step, n)) for lo in range(0, n, step)]
            self._in_memory = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        return self._in_memory

    # -- streaming -----------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's sequence order (the same on every rank): the units permuted, each unit's sequences in order."""
        units = _rng(self.seed, epoch, 0).permutation(self.num_units)
        by_unit = np.argsort(self.unit_of_seq, kind="stable")  # sequences grouped by unit, in order
        counts = np.bincount(self.unit_of_seq, minlength=self.num_units)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return np.concatenate([by_unit[starts[u] : starts[u + 1]] for u in units]).astype(np.int64)

    def _stream(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, TokenBatch]]:
        bs, per_rank = self.batch_size, self.seqs_per_epoch
        windows = _in_background(self._windows(start_epoch, stop_epoch, start_batch), capacity=WINDOW_QUEUE)
        try:
            pending: list[tuple[np.ndarray, dict[str, Tensor]]] = []  # parts of a batch that spans windows
            for epoch, w_lo, w_hi, seqs, seq_rows, teachers in windows:
                pos = max(w_lo, start_batch * bs) if epoch == start_epoch else w_lo  # this rank's next sequence
                while pos < w_hi:
                    batch_end = min((pos // bs + 1) * bs, per_rank)
                    lo, hi = pos - w_lo, min(batch_end, w_hi) - w_lo
                    r_lo, r_hi = seq_rows[lo], seq_rows[hi]  # the window's rows of sequences lo..hi-1
                    pending.append((seqs[lo:hi], {k: v[:, r_lo:r_hi] for k, v in teachers.items()}))
                    pos = hi + w_lo
                    if pos < batch_end:  # the batch goes on in the next window
                        continue
                    parts, pending = pending, []
                    seq_ids = np.concatenate([p[0] for p in parts])
                    rows = {k: torch.cat([p[1][k] for p in parts], dim=1) for k in teachers}
                    yield epoch, (pos - 1) // bs, self._batch(seq_ids, rows)
        finally:
            windows.close()

    def _windows(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple]:
        """(epoch, first, end, seqs, seq_rows, teachers) per window of this rank (reader thread).

        `seqs` are the window's sequences in their shuffled order; `teachers` their rows
        concatenated in that order (K, rows, ...), sequence j's rows being seq_rows[j]..seq_rows[j + 1].
        Rows are read as whole chunks per unit and cut to the window's sequences.
        """
        per_rank, ws, cr, n = self.seqs_per_epoch, self.window_seqs, self.source.store.chunk_rows, len(self.tokens)
        for epoch in range(start_epoch, stop_epoch):
            order = self._epoch_order(epoch)[self.rank * per_rank : (self.rank + 1) * per_rank]
            first = start_batch * self.batch_size if epoch == start_epoch else 0
            for w in range(first // ws, math.ceil(per_rank / ws)):
                w_lo, w_hi = w * ws, min((w + 1) * ws, per_rank)
                seqs = order[w_lo:w_hi]
                # Read each unit's span once, whole chunks: from its first sequence's first row to
                # its last sequence's last row (possibly a chunk into the next unit).
                spans: dict[int, tuple[int, dict[str, Tensor]]] = {}
                for u in np.unique(self.unit_of_seq[seqs]):
                    members = seqs[self.unit_of_seq[seqs] == u]
                    lo = int(self.offsets[members].min()) // cr * cr
                    hi = min(-(-int(self.offsets[members + 1].max()) // cr) * cr, n)
                    spans[int(u)] = (lo, self.source.read(lo, hi))
                shuffled = seqs[_rng(self.seed, epoch, 1, self.rank, w).permutation(len(seqs))]
                pieces: dict[str, list[Tensor]] = {}
                for s in shuffled:
                    lo, rows = spans[int(self.unit_of_seq[s])]
                    a, b = int(self.offsets[s]) - lo, int(self.offsets[s + 1]) - lo
                    for k, v in rows.items():
                        pieces.setdefault(k, []).append(v[:, a:b])
                teachers = {k: torch.cat(v, dim=1) for k, v in pieces.items()}
                seq_rows = np.concatenate([[0], np.cumsum(self.lengths[shuffled])])
                yield epoch, w_lo, w_hi, shuffled, seq_rows, teachers


def _to_device(items: Iterator[tuple[int, int, Any]], device: torch.device, pin: bool) -> Iterator[tuple[int, int, Any]]:
    try:
        for epoch, b, batch in items:
            yield epoch, b, batch.to(device, non_blocking=pin)
    finally:
        items.close()
