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
gathered from memory (rows are loaded whole, see data.py) and the logits are a gather (in memory)
or a slice of the shuffled window (streaming). Labels come from the data, not the store: the data
given on the command line is what the student trains on.

Rows and token sequences (SequenceLoader, at the end) share this one mechanism (_Loader): the
order of both modes, the rank shares, the windows and the cutting of batches from them; they
differ in what an item is (a row, a sequence), how a read unit is read and how a batch is laid out.

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
from concurrent.futures import Future, ThreadPoolExecutor
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
# Read units of a window read at once, by this many threads beside the loader's own.
READER_THREADS = 2


class LogitSource(Protocol):
    """What the loader needs from a store (mtkd.pipeline.store.LogitStore provides it)."""

    num_rows: int
    num_classes: int
    chunk_rows: int

    def teacher(self, name: str) -> Any: ...  # .dtype: "float16" | "bfloat16" | "float32"

    def read_logits(self, name: str, start: int, stop: int) -> Tensor: ...  # (stop - start, V)

    # Optional: prefetch(names, start, stop) requests the chunks the teachers' next reads take at
    # once (a store at a URL: one request latency for K teachers); see _prefetch.


def _prefetch(store: Any, names: Sequence[str], lo: int, hi: int) -> None:
    """Ask `store` for the rows [lo, hi) of every teacher at once, where it can (LogitStore.prefetch)."""
    prefetch = getattr(store, "prefetch", None)
    if prefetch is not None:
        prefetch(list(names), lo, hi)


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


def memory_budget_per_process() -> int:
    """MEMORY_FRACTION of the available memory, shared among this node's processes (torchrun's LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(MEMORY_FRACTION * available_memory() / max(local, 1))


def choose_mode(stream: bool | None, held_bytes: int, memory_budget: int | None) -> str:
    """"stream" or "memory": as forced by `stream`, else by whether `held_bytes` fit the budget."""
    if stream is not None:
        return "stream" if stream else "memory"
    budget = memory_budget_per_process() if memory_budget is None else memory_budget
    return "stream" if held_bytes > budget else "memory"


def unit_rows(chunk_rows: int, row_bytes: int, read_bytes: int) -> int:
    """Rows of one read unit: whole chunks, at least `read_bytes` of `row_bytes` rows."""
    return chunk_rows * max(1, math.ceil(read_bytes / (chunk_rows * max(row_bytes, 1))))


class EpochOrder:
    """One epoch's order of a loader's items (rows or sequences), the same on every rank.

    Items are grouped into read units: unit u holds items bounds[u]..bounds[u + 1] - 1 (a unit may
    hold none). The epoch permutes the units by (seed, epoch) and keeps each unit's items in order.
    """

    def __init__(self, bounds: np.ndarray, seed: int, epoch: int):
        self.bounds = bounds
        self.units = _rng(seed, epoch, 0).permutation(len(bounds) - 1)
        self.starts = np.concatenate([[0], np.cumsum(np.diff(bounds)[self.units])])  # where each unit starts in the order

    def pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(unit, first item, end item) of positions [a, b) of the order, in order."""
        out = []
        for i in range(int(np.searchsorted(self.starts, a, side="right")) - 1, len(self.units)):
            if self.starts[i] >= b:
                break
            lo, hi = max(a, self.starts[i]) - self.starts[i], min(b, self.starts[i + 1]) - self.starts[i]
            if hi > lo:
                u = int(self.units[i])
                out.append((u, int(self.bounds[u] + lo), int(self.bounds[u] + hi)))
        return out


class _Loader:
    """What BatchLoader (rows) and SequenceLoader (sequences) share: rank shares, the order of both
    modes, the streaming windows and the cutting of batches from them. A loader's `items` are its
    samples (rows or sequences); a subclass says how to read a unit, lay out a window, and cut
    and assemble a batch.
    """

    what: str  # "rows" | "sequences", for messages
    mode: str  # "memory" | "stream"
    bounds: np.ndarray  # streaming: (num_units + 1,) the first item of each read unit (EpochOrder)
    window_items: int  # streaming: items shuffled together

    def _setup(self, num_items: int, *, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device | str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if num_items < world_size:
            raise ValueError(f"{num_items} {self.what} cannot be split over {world_size} processes")
        self.num_items = num_items
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"

    @property
    def items_per_epoch(self) -> int:
        """Items this rank sees per epoch (the same on every rank)."""
        return self.num_items // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.items_per_epoch / self.batch_size)

    def batches(self, start_epoch: int, stop_epoch: int, start_batch: int = 0) -> Iterator[tuple[int, int, Any]]:
        """(epoch, batch index, batch) for epochs [start_epoch, stop_epoch), from `start_batch` of the first.

        One iterator spans the epochs so that, streaming, the reader thread runs ahead across an
        epoch's end: the next epoch's first window is read while this one's last batches train
        (and while the trainer validates). Close it (contextlib.closing) when leaving early.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.batches_per_epoch}]")
        build = self._stream if self.mode == "stream" else self._memory
        items = build(start_epoch, stop_epoch, start_batch)
        return items if self.device.type == "cpu" else _to_device(items, self.device, self.pin)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """This rank's batches of one epoch from `start_batch` on (see `batches`)."""
        items = self.batches(epoch, epoch + 1, start_batch)
        try:
            for _, _, batch in items:
                yield batch
        finally:
            items.close()  # stops a reader thread at once

    # -- in memory: a full permutation per epoch, rank r takes every W-th item ------------------------

    def _memory(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any]]:
        held = self._read_all()
        per_rank, bs = self.items_per_epoch, self.batch_size
        for epoch in range(start_epoch, stop_epoch):
            order = _rng(self.seed, epoch, 0).permutation(self.num_items)
            mine = order[self.rank : per_rank * self.world_size : self.world_size]
            for b in range(start_batch if epoch == start_epoch else 0, self.batches_per_epoch):
                yield epoch, b, self._gather(mine[b * bs : (b + 1) * bs], held)

    def _read_all(self) -> Any:
        """Everything `_gather` indexes, read once."""
        raise NotImplementedError

    def _gather(self, items: np.ndarray, held: Any) -> Any:
        """The batch of `items` from what `_read_all` holds."""
        raise NotImplementedError

    # -- streaming: windows of the permuted units, shuffled, read ahead by a thread ------------------

    def _stream(self, start_epoch: int, stop_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any]]:
        """Cut batches from the windows that the reader thread hands over (a batch may span several)."""
        bs, per_rank = self.batch_size, self.items_per_epoch
        free: list[np.ndarray] = []  # window buffers done with, for the reader to refill (no page faults)
        windows = _in_background(self._windows(start_epoch, stop_epoch, start_batch, free), capacity=WINDOW_QUEUE)
        try:
            pending: list[Any] = []  # the parts of a batch that spans several windows
            for epoch, w_lo, w_hi, window, buffer in windows:
                pos = max(w_lo, start_batch * bs) if epoch == start_epoch else w_lo  # this rank's next item
                while pos < w_hi:
                    batch_end = min((pos // bs + 1) * bs, per_rank)
                    lo, hi = pos - w_lo, min(batch_end, w_hi) - w_lo
                    part = self._cut(window, lo, hi)
                    pos = hi + w_lo
                    if pos < batch_end:  # the batch goes on in the next window
                        pending.append(part)
                        continue
                    yield epoch, (pos - 1) // bs, self._assemble([*pending, part])
                    pending = []
                window = part = None  # before the buffer goes back: nothing may still view it
                if buffer is not None:
                    free.append(buffer)  # every item of this window is cut: the buffer can be refilled
        finally:
            windows.close()

    def _windows(self, start_epoch: int, stop_epoch: int, start_batch: int, free: list[np.ndarray]) -> Iterator[tuple]:
        """(epoch, first, end, window, buffer) per window of this rank (reader thread).

        A window is this rank's items [first, end) of an epoch's order: each rank takes a contiguous
        stretch of the order, cut into windows of `window_items`, whose items are shuffled by
        (seed, epoch, rank, window). `window` is what `_cut` takes; `buffer` memory that `_lay_out`
        may take back from `free` once the window is done with (or None).
        """
        per_rank, size = self.items_per_epoch, self.window_items
        base = self.rank * per_rank  # this rank's stretch of the order: [base, base + per_rank)
        cached: tuple[int, int, Any] | None = None  # a unit shared by two windows is read once
        # A window's units are read READER_THREADS at a time: decompression, checksums and copies
        # release the GIL, so on an otherwise idle CPU (a GPU's host) the reads overlap.
        with ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="mtkd-read") as pool:
            for epoch in range(start_epoch, stop_epoch):
                order = EpochOrder(self.bounds, self.seed, epoch)
                first = start_batch * self.batch_size if epoch == start_epoch else 0
                for w in range(first // size, math.ceil(per_rank / size)):
                    w_lo, w_hi = w * size, min((w + 1) * size, per_rank)
                    spans = order.pieces(base + w_lo, base + w_hi)
                    reads: dict[int, Any] = {}
                    for u, _, _ in spans:
                        if u not in reads:
                            reads[u] = cached[2] if cached is not None and cached[:2] == (epoch, u) else pool.submit(self._read_unit, u)
                    units = {u: r.result() if isinstance(r, Future) else r for u, r in reads.items()}
                    cached = (epoch, spans[-1][0], units[spans[-1][0]])
                    pieces = [(units[u], u, lo, hi) for u, lo, hi in spans]
                    shuffle = _rng(self.seed, epoch, 1, self.rank, w).permutation(w_hi - w_lo)
                    yield (epoch, w_lo, w_hi, *self._lay_out(pieces, shuffle, free))

    def _read_unit(self, u: int) -> Any:
        """What a window needs of read unit u (whole chunks), read in the reader thread."""
        raise NotImplementedError

    def _lay_out(self, pieces: list[tuple[Any, int, int, int]], shuffle: np.ndarray, free: list[np.ndarray]) -> tuple[Any, np.ndarray | None]:
        """(window, buffer) from the window's pieces (unit data, unit, first item, end item) in
        order and the window's shuffle (positions in that order)."""
        raise NotImplementedError

    def _cut(self, window: Any, lo: int, hi: int) -> Any:
        """The part of a batch that is positions [lo, hi) of the window's shuffled items."""
        raise NotImplementedError

    def _assemble(self, parts: list[Any]) -> Any:
        """One batch from its parts, in order."""
        raise NotImplementedError


class BatchLoader(_Loader):
    """Batches of (inputs, chosen teachers' logits, labels) for one rank, deterministic per epoch.

    x: (N, ...) inputs; labels: (N,) int64 with -100 where unknown. `store` and `teachers` give the
    logits (none: hard-label training, logits None). `stream`: True/False forces a mode, None picks
    one from `memory_budget` (bytes; default MEMORY_FRACTION of the available memory per process).
    Streaming: `window_bytes` of logits are shuffled together; reads cover at least `read_bytes`
    of one teacher. Batches arrive on `device` (pinned host memory and non_blocking on CUDA).
    """

    what = "rows"

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
        labels = as_tensor(labels)
        # v3 regression: float targets (N, D), NaN where unknown, travel as the labels do
        self.labels = labels.float() if labels.is_floating_point() else labels.long()
        n = len(self.x)
        if self.labels.shape[:1] != (n,) or self.labels.dim() != (2 if labels.is_floating_point() else 1):
            want = f"({n}, D) float targets" if labels.is_floating_point() else f"({n},)"
            raise ValueError(f"labels must have shape {want}, got {tuple(self.labels.shape)}")
        self._setup(n, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device)
        self.teachers = list(teachers)
        if store is None and self.teachers:
            raise ValueError("teachers given without a store")
        if store is not None and not self.teachers:
            raise ValueError("a store needs at least one teacher")
        if store is not None and store.num_rows != n:
            raise ValueError(f"the store has {store.num_rows} rows, the inputs {n}")
        self.store = store
        # Regression teachers (layout "values", v3) are read as their (rows, D) values, in place of logits.
        values = store is not None and all(getattr(getattr(store.teacher(t), "layout", None), "name", None) == "values"
                                           for t in self.teachers)
        self._read_rows = (store.read_values if values else store.read_logits) if store is not None else None

        k, v = len(self.teachers), store.num_classes if store is not None else 0
        dtypes = {store.teacher(t).dtype for t in self.teachers} if store is not None else set()
        # Teachers stored in different dtypes are held together in float32.
        self.logits_dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32 if dtypes else None
        row_bytes = k * v * (torch.finfo(self.logits_dtype).bits // 8 if self.logits_dtype else 0)
        self.logits_bytes = n * row_bytes
        # The inputs are in memory already (rows are loaded whole): only the logits count.
        self.mode = "memory" if store is None else choose_mode(stream, self.logits_bytes, memory_budget)
        if store is not None:
            # The unit of reading and of the per-epoch permutation: consecutive whole chunks.
            self.read_rows = unit_rows(store.chunk_rows, row_bytes // k, read_bytes)
            self.window_rows = self.window_items = max(MIN_WINDOW_UNITS * self.read_rows, window_bytes // max(row_bytes, 1))
            self.bounds = np.minimum(np.arange(math.ceil(n / self.read_rows) + 1) * self.read_rows, n)
        self._in_memory: Tensor | None = None  # (K, N, V), read on first use

    @property
    def num_rows(self) -> int:
        return len(self.x)

    @property
    def rows_per_epoch(self) -> int:
        """Rows this rank sees per epoch (the same on every rank)."""
        return self.items_per_epoch

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
                    out[k, start:stop] = self._read_rows(name, start, stop)
            self._in_memory = out
        return self._in_memory

    def _gather(self, rows: np.ndarray, logits: Tensor | None) -> Batch:
        rows = torch.from_numpy(rows)
        return self._batch(rows, None if logits is None else self._take(logits, 1, rows))  # (K, B, V)

    # -- streaming ---------------------------------------------------------------------------------
    # The reader thread uses numpy only: a torch op there would start a second OpenMP team,
    # competing with the training thread's for the cores. The shuffle is applied in the training
    # thread, per batch, as the in-memory gather is: the same work there in both modes.

    def _read_unit(self, u: int) -> list[np.ndarray]:
        """K x (rows, V): the unit's whole chunks of each teacher."""
        lo, hi = int(self.bounds[u]), int(self.bounds[u + 1])
        _prefetch(self.store, self.teachers, lo, hi)
        return [_as_numpy(self._read_rows(name, lo, hi), self.logits_dtype) for name in self.teachers]

    def _lay_out(self, pieces, shuffle, free):
        """The window's logits (K, rows, V) in unit order, copied into a reused buffer; its shuffle;
        the data rows in shuffled order."""
        k, v, size = len(self.teachers), self.store.num_classes, len(shuffle)
        buffer = free.pop() if free else np.empty(k * self.window_rows * v, dtype=_NUMPY_STORAGE[self.logits_dtype])
        # Contiguous even for a short window: index_select on a strided view is ~30x slower.
        logits = buffer[: k * size * v].reshape(k, size, v)
        rows = np.empty(size, dtype=np.int64)
        at = 0
        for unit, u, lo, hi in pieces:
            offset = lo - int(self.bounds[u])  # the piece's first row within its unit
            for t, part in enumerate(unit):
                logits[t, at : at + hi - lo] = part[offset : offset + hi - lo]
            rows[at : at + hi - lo] = np.arange(lo, hi)
            at += hi - lo
        window = (_from_numpy(logits, self.logits_dtype), torch.from_numpy(shuffle), torch.from_numpy(rows[shuffle]))
        return window, buffer

    def _cut(self, window, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        logits, order, rows = window
        return self._take(logits, 1, order[lo:hi]), rows[lo:hi]  # (K, b, V), (b,)

    def _assemble(self, parts: list[tuple[Tensor, Tensor]]) -> Batch:
        if len(parts) == 1:
            logits, rows = parts[0]
        else:
            logits, rows = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
            logits = logits.pin_memory() if self.pin else logits
        return self._batch(rows, logits)


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
# The same two modes and the same mechanism as for rows (_Loader), over sequences instead of rows,
# and with the token ids read like the teachers' rows: a corpus need not fit in memory either.
# * "memory": when the chosen teachers' rows and the tokens (8 bytes a position, unless the data
#   holds them in memory already) fit the budget: both read once, sequentially; each epoch a full
#   permutation of the sequences; rank r takes every W-th sequence of it (DistributedSampler's split).
# * "stream": otherwise. The store's rows are cut into read units of whole chunks (about
#   READ_BYTES of one teacher; of tokens without a store); a sequence belongs to the unit its first
#   row lies in. Each epoch permutes the units; the sequences in that order are cut into equal
#   contiguous stretches per rank, and each rank's stretch into windows of about `window_bytes`
#   (at least MIN_WINDOW_UNITS units' worth), whose sequences are shuffled together. A background
#   thread reads each unit's rows (whole chunks: the unit plus the chunk its last sequence runs
#   into) and its sequences' tokens, and lays out the window's sequences in shuffled order;
#   batches are cut in the training thread. Only the windows alive at once (three, as for rows)
#   hold tokens or teachers' rows.
# Determinism, resume and DDP: as for rows (the order of epoch e depends only on seed, e, rank,
# world size, mode and, streaming, the store's chunking and the window size); each rank gets
# num_seqs // W sequences per epoch.


class Tokens(Protocol):
    """A corpus's tokens concatenated (mtkd.pipeline.data.TokenSource, or an array): `tokens[lo:hi]`
    reads rows [lo, hi) as integers; `resident` says they are in memory already (arrays are)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


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

    @property
    def position_seqs(self) -> Tensor:
        """(P,) int64: the batch row (0..B-1) of each real position, in the order of input_ids[attention_mask]."""
        b, width = self.attention_mask.shape
        return torch.arange(b, device=self.attention_mask.device)[:, None].expand(b, width)[self.attention_mask]

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

    def __init__(self, store: Any, teachers: Sequence[str], temperature: float, *, entropy: bool = False):
        self.store, self.teachers, self.temperature = store, list(teachers), float(temperature)
        self.entropy = entropy  # also read the stored entropies: "entropy" (K, n) float32 (fusion.py)
        layouts = [store.layout(t) for t in self.teachers]
        self.sparse = layouts[0].name == "topk"
        if any((lay.name == "topk") != self.sparse for lay in layouts):
            raise ValueError("teachers stored top-k and dense cannot be fused together")
        self.k = max(lay.target_width for lay in layouts) if self.sparse else 0  # head (+ tail draws)
        self.sampled = any(getattr(lay, "tail_samples", 0) for lay in layouts)
        self.vocab = store.num_classes
        dtypes = {lay.dtype for lay in layouts}
        self.logits_dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of every chosen teacher, as held in memory."""
        k = len(self.teachers)
        extra = 4 if self.entropy else 0
        if self.sparse:
            return k * (self.k * (8 + 4) + 4 + extra)
        return k * (self.vocab * torch.finfo(self.logits_dtype).bits // 8 + extra)

    def read(self, lo: int, hi: int) -> dict[str, Tensor]:
        """Rows [lo, hi) of every chosen teacher, stacked: (K, n, ...) per array."""
        return {key: torch.stack(parts) for key, parts in self.read_parts(lo, hi).items()}

    def read_parts(self, lo: int, hi: int) -> dict[str, list[Tensor]]:
        """Rows [lo, hi) per array, one (n, ...) tensor per chosen teacher (for a caller that copies
        them into memory of its own: stacking them first would copy them twice)."""
        out = self._read(lo, hi)
        if self.entropy:
            out["entropy"] = [self.store.read_entropy(t, lo, hi) for t in self.teachers]  # (n,) each
        return out

    def _read(self, lo: int, hi: int) -> dict[str, list[Tensor]]:
        _prefetch(self.store, self.teachers, lo, hi)
        if not self.sparse:
            return {"logits": [self.store.read_logits(t, lo, hi).to(self.logits_dtype) for t in self.teachers]}
        ids, logprobs, label_logprob, top1 = [], [], [], []
        for name in self.teachers:
            rows = self.store.read_topk(name, lo, hi, self.temperature)
            # The teacher's top-1 from its exact head (a sampled tail's estimates are no teacher's
            # probabilities); with no head, the heaviest estimate. For `vote`.
            if self.sampled:
                head = self.store.layout(name).top_k or rows.ids.shape[1]
                top1.append(rows.ids.gather(1, rows.logprobs[:, :head].argmax(dim=1, keepdim=True)).squeeze(1))
            pad = self.k - rows.ids.shape[1]
            i, lp = rows.ids, rows.logprobs.float()
            if pad:
                fill = self.PAD_ID - torch.arange(pad, dtype=torch.int64)
                i = torch.cat([i, fill.expand(len(i), pad)], dim=1)
                lp = torch.cat([lp, torch.full((len(lp), pad), -math.inf)], dim=1)
            ids.append(i)
            logprobs.append(lp)
            label_logprob.append(rows.label_logprob.float())
        out = {"ids": ids, "logprobs": logprobs, "label_logprob": label_logprob}
        if self.sampled:
            out["top1"] = top1  # K x (n,)
        return out


class SequenceLoader(_Loader):
    """Batches of whole token sequences with their teachers' per-position rows (see above).

    `tokens` (num_rows,) and `offsets` (num_seqs + 1,) are the data (TokenData's); `labels`, where
    the data gives its own (TokenData.given_labels, aligned with the tokens), travel with the tokens
    as a second column and make the batch's labels (position t: labels[t + 1]) instead of the next
    tokens. `teachers` a TeacherRows over a store of the same data, or None for hard-label training.
    The other arguments as BatchLoader's; `memory_budget` covers the teachers' rows and the tokens.
    """

    what = "sequences"
    TOKEN_BYTES = 8  # a position's token id as held (int64)

    def __init__(
        self,
        tokens: Tokens | np.ndarray,
        offsets: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        teachers: TeacherRows | None = None,
        labels: Tokens | np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        stream: bool | None = None,
        memory_budget: int | None = None,
        window_bytes: int = WINDOW_BYTES,
        read_bytes: int = READ_BYTES,
    ):
        self.tokens = tokens
        self.given_labels = labels
        if labels is not None:
            self.TOKEN_BYTES = 2 * SequenceLoader.TOKEN_BYTES  # a position's token id and label
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        n_rows = len(tokens)
        self._setup(len(self.lengths), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device)
        if int(self.offsets[-1]) != n_rows:
            raise ValueError(f"the offsets end at {int(self.offsets[-1])}, the tokens hold {n_rows} positions")
        if teachers is not None and teachers.store.num_rows != n_rows:
            raise ValueError(f"the store has {teachers.store.num_rows} rows, the data {n_rows} positions")
        self.source = teachers
        self.teacher_bytes = 0 if teachers is None else n_rows * teachers.row_bytes
        resident = all(isinstance(t, (np.ndarray, Tensor)) or bool(getattr(t, "resident", False))
                       for t in (tokens, labels) if t is not None)
        self.token_bytes = n_rows * self.TOKEN_BYTES
        held = self.teacher_bytes + (0 if resident else self.token_bytes)
        self.mode = choose_mode(stream, held, memory_budget)  # nothing to hold (tokens in memory, no store): memory
        if teachers is not None:
            # Whole chunks of the store, at least `read_bytes` of one teacher.
            self.chunk_rows = teachers.store.chunk_rows
            self.read_rows = unit_rows(self.chunk_rows, teachers.row_bytes // len(teachers.teachers), read_bytes)
        else:
            self.chunk_rows = 1  # tokens have no chunks to keep whole
            self.read_rows = unit_rows(1, self.TOKEN_BYTES, read_bytes)
        num_units = math.ceil(n_rows / self.read_rows)
        # Unit u's sequences: those whose first row lies in rows [u * read_rows, (u + 1) * read_rows).
        self.bounds = np.searchsorted(self.offsets[:-1], np.arange(num_units + 1) * self.read_rows, side="left")
        row_bytes = (0 if teachers is None else teachers.row_bytes) + self.TOKEN_BYTES
        rows_per_window = max(MIN_WINDOW_UNITS * self.read_rows, window_bytes // row_bytes)
        self.window_seqs = self.window_items = max(1, math.ceil(rows_per_window * self.num_seqs / n_rows))
        self.window_rows = math.ceil(self.window_seqs * n_rows / self.num_seqs)  # a window's positions, on average
        self._in_memory: tuple[Tensor, dict[str, Tensor]] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def seqs_per_epoch(self) -> int:
        """Sequences this rank sees per epoch (the same on every rank)."""
        return self.items_per_epoch

    def _read_tokens(self, lo: int, hi: int) -> Tensor:
        """(P,) token ids of rows [lo, hi), or (P, 2) ids and given labels."""
        a = np.asarray(self.tokens[lo:hi], dtype=np.int64)
        if self.given_labels is not None:
            a = np.stack([a, np.asarray(self.given_labels[lo:hi], dtype=np.int64)], axis=1)
        return torch.from_numpy(a if a.flags.writeable else a.copy())

    def _batch(self, seqs: np.ndarray, tokens: Tensor, teachers: dict[str, Tensor]) -> TokenBatch:
        """Pad the sequences `seqs` into (B, L); `tokens` (P,) and `teachers` (K, P, ...) are their
        positions, concatenated in order."""
        lengths = self.lengths[seqs]
        b, width = len(seqs), int(lengths.max())
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])  # (B, L)
        input_ids = torch.zeros((b, width), dtype=torch.int64)
        following = input_ids  # what position t's label is read from, at t + 1: the next token
        if tokens.ndim == 2:  # (P, 2): ids and the data's own labels
            following = torch.full((b, width), -100, dtype=torch.int64)
            following[mask] = tokens[:, 1]
            tokens = tokens[:, 0]
        input_ids[mask] = tokens
        labels = torch.full((b, width), -100, dtype=torch.int64)
        labels[:, :-1] = torch.where(mask[:, 1:], following[:, 1:], -100)  # within the same sequence
        if self.pin:
            input_ids, mask, labels = input_ids.pin_memory(), mask.pin_memory(), labels.pin_memory()
            teachers = {k: v.pin_memory() for k, v in teachers.items()}
        return TokenBatch(input_ids, mask, labels, teachers, torch.from_numpy(np.asarray(seqs)))

    def _rows_of(self, seqs: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
        """The positions of sequences `seqs`, concatenated in order (from `starts` instead of their offsets)."""
        lengths = self.lengths[seqs]
        starts = self.offsets[seqs] if starts is None else starts
        ends = np.cumsum(lengths)
        return np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)

    # -- in memory -----------------------------------------------------------------------------------

    def _read_all(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The tokens and every row of the chosen teachers, read once, sequentially, in whole read units."""
        if self._in_memory is None:
            n, step = len(self.tokens), self.read_rows
            plain = isinstance(self.tokens, (np.ndarray, Tensor)) and self.given_labels is None
            tokens = as_tensor(self.tokens).long() if plain else self._read_tokens(0, n)
            teachers: dict[str, Tensor] = {}
            if self.source is not None:
                parts = [self.source.read(lo, min(lo + step, n)) for lo in range(0, n, step)]
                teachers = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
            self._in_memory = (tokens, teachers)
        return self._in_memory

    def _gather(self, seqs: np.ndarray, held: tuple[Tensor, dict[str, Tensor]]) -> TokenBatch:
        tokens, teachers = held
        return self._batch(*self._cut((seqs, self.offsets[seqs], tokens, teachers), 0, len(seqs)))

    # -- streaming -----------------------------------------------------------------------------------

    def _read_unit(self, u: int) -> tuple[int, Tensor, int, dict[str, Tensor]]:
        """(first token row, tokens, first teacher row, teachers' rows) of unit u's sequences: the
        tokens exactly, the teachers' rows in whole chunks (possibly a chunk into the next unit)."""
        lo, hi = int(self.offsets[self.bounds[u]]), int(self.offsets[self.bounds[u + 1]])
        teachers: dict[str, Tensor] = {}
        t_lo = lo // self.chunk_rows * self.chunk_rows
        if self.source is not None:
            t_hi = min(-(-hi // self.chunk_rows) * self.chunk_rows, len(self.tokens))
            teachers = self.source.read_parts(t_lo, t_hi)  # one tensor per teacher: `_lay_out` copies them
        return lo, self._read_tokens(lo, hi), t_lo, teachers

    def _lay_out(self, pieces, shuffle, free):
        """The window's tokens (P,) and teachers' rows (K, P, ...) in unit order, the rows copied
        (numpy, in the reader thread) into a buffer reused from window to window; its sequences
        in shuffled order and where each starts in them. The shuffle is applied per batch in the
        training thread (`_cut`), as the in-memory gather does: a shuffled copy of a whole window
        here cost 10x more, most of it page faults on a fresh allocation of that size."""
        seqs = np.concatenate([np.arange(lo, hi) for _, _, lo, hi in pieces])
        lengths = self.lengths[seqs]
        starts = np.cumsum(lengths) - lengths  # each sequence's first position in the window
        units = [(unit, int(self.offsets[lo]), int(self.offsets[hi])) for unit, _, lo, hi in pieces]
        tokens = torch.cat([unit[1][a - unit[0] : b - unit[0]] for unit, a, b in units])
        teachers: dict[str, Tensor] = {}
        buffer = None
        if self.source is not None:
            size = int(lengths.sum())
            like = units[0][0][3]  # array -> one (n, ...) tensor per teacher
            buffer = self._window_buffer(like, size, free)
            # Contiguous (K, size, ...) views of the flat buffers: index_select on a strided view is ~30x slower.
            teachers = {k: buffer[k][: len(v) * size * math.prod(v[0].shape[1:])].view(len(v), size, *v[0].shape[1:])
                        for k, v in like.items()}
            at = 0
            for unit, a, b in units:
                for key, parts in unit[3].items():
                    window = _numpy(teachers[key])
                    for t, rows in enumerate(parts):
                        window[t, at : at + b - a] = _numpy(rows)[a - unit[2] : b - unit[2]]
                at += b - a
        shuffled = np.ascontiguousarray(seqs[shuffle])
        return (shuffled, starts[shuffle], tokens, teachers), buffer

    def _window_buffer(self, like: dict[str, list[Tensor]], rows: int, free: list) -> dict[str, Tensor]:
        """Flat buffers for `rows` positions of K arrays like `like`'s (n, ...): free ones, or new."""
        need = {k: len(v) * rows * math.prod(v[0].shape[1:]) for k, v in like.items()}
        while free:
            buffer = free.pop()
            if all(k in buffer and buffer[k].dtype == v[0].dtype and buffer[k].numel() >= need[k] for k, v in like.items()):
                return buffer
        scale = max(rows, math.ceil(1.1 * self.window_rows)) / max(rows, 1)
        return {k: torch.empty(math.ceil(need[k] * scale), dtype=v[0].dtype) for k, v in like.items()}

    def _cut(self, window, lo: int, hi: int) -> tuple[np.ndarray, Tensor, dict[str, Tensor]]:
        """Sequences lo..hi-1 of the window's (or the held data's) order, gathered: their
        tokens (P,) and teachers' rows (K, P, ...), from `starts`, where each sequence begins."""
        seqs, starts, tokens, teachers = window
        rows = torch.from_numpy(self._rows_of(seqs[lo:hi], starts[lo:hi]))
        return seqs[lo:hi], tokens[rows], {k: torch.index_select(v, 1, rows) for k, v in teachers.items()}  # (K, P, ...)

    def _assemble(self, parts: list[tuple[np.ndarray, Tensor, dict[str, Tensor]]]) -> TokenBatch:
        if len(parts) == 1:  # already gathered into memory of its own
            return self._batch(*parts[0])
        seqs = np.concatenate([p[0] for p in parts])
        tokens = torch.cat([p[1] for p in parts])
        teachers = {k: torch.cat([p[2][k] for p in parts], dim=1) for k in parts[0][2]}
        return self._batch(seqs, tokens, teachers)


def _numpy(t: Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (bfloat16 as its 16 bits), for copies without torch."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _to_device(items: Iterator[tuple[int, int, Any]], device: torch.device, pin: bool) -> Iterator[tuple[int, int, Any]]:
    try:
        for epoch, b, batch in items:
            yield epoch, b, batch.to(device, non_blocking=pin)
    finally:
        items.close()
