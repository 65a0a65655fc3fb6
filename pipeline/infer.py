"""Stage one: run every teacher over the data once and write what stage two needs into the store.

`run_infer` reads top to bottom:
1. resolve: parse specs, load the data (rows or token sequences), open the store if there is one and
   check it is this data's, decide per teacher (skip: complete with the same weights and layout;
   refuse: other weights, layout, k or temperatures), load every teacher that has work and run the
   first batch through it (shape, vocabulary, labels within it) -> one `InferConfig`;
2. only then create the store or add teachers to it;
3. forward: batch by batch over this shard's missing blocks; each batch of inputs is read once and
   goes through every teacher that still misses a block it touches:
       rows j*B..(j+1)*B-1, or sequences j*B..(j+1)*B-1 padded on the right with their attention mask
       -> device -> teacher (inference mode; autocast on CUDA for 16-bit --dtype) -> logits
       (B, V) or (B, L, V), shape checked -> cut to the real positions (tokens) -> the layout's
       `reduce` on the device in float32 (dense: the logits in the stored dtype; top-k: ids,
       log-probabilities, normalisers, label log-prob)
       -> the real rows' results copied into the host buffers of the blocks they belong to
   A full block is checked finite (as stored: float16 overflow counts), its stats sums computed from
   the rows' summaries, and it goes to the writer threads (a few blocks in flight), which write each
   teacher's part of it at once: one chunk per array, flushed, the sums, then its completion record;
4. finish: a teacher whose blocks are all recorded gets its stats (the recorded sums, added in block
   order) and `complete`, by whichever process sees the last record (the same bytes whoever writes).

Batches and blocks are independent grids: batch j is always the same rows (or sequences) whatever the
blocks, so a block is computed from the same batches whether one process writes the store or many, or
one is killed and rerun (bit-identity), and the batch size is never capped by the block size. A batch
that spans two blocks is forwarded once per process that needs it; a process reuses it for its next
block. The (B, L, V) logits never leave the device: only the layout's per-row results do.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mtkd.pipeline import hf, storage
from mtkd.pipeline.data import Data, RowData, TokenData, load_data
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.errors import BadInputError, StoreMismatchError, TeacherFailedError, TeacherOutputError
from mtkd.pipeline.features import FeatureTap
from mtkd.pipeline.layouts import (
    DEFAULT_TEMPERATURES,
    DEFAULT_TOP_K,
    DENSE_TOKENS_MAX_VOCAB,
    DTYPES,
    FEATURES,
    SEED_MAX,
    STORAGE,
    Dense,
    RowSummary,
    SampledTopK,
    TopK,
    Values,
    format_temperatures,
    parse_temperatures,
    to_storage,
)
from mtkd.pipeline.report import StatsSums
from mtkd.pipeline.specs import ModelSpec, brief, check_out_path, load_teacher_specs, spec_differences
from mtkd.pipeline.store import LogitStore, create_store, default_chunk_rows, half_created, open_store

WRITE_QUEUE_BLOCKS = 2  # full blocks waiting for the writer; bounds host memory to a few blocks
WRITER_THREADS = 4  # block parts written at once (their fsyncs overlap)
DEFAULT_BATCH = {"rows": 512, "tokens": 16}  # rows, or whole sequences, per forward pass
# Said of bad teacher output found once writing began (exit 2 all the same: the input's fault).
RESUMABLE = ("nothing of that block is written; the store is left valid and resumable (the blocks already recorded stay): "
             "fix the teacher and rerun the same `mtkd infer` to continue")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` takes the blocks b with b % count == index."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, block: int) -> bool:
        return block % self.count == self.index


def parse_shard(text: str) -> Shard:
    """'I/N' with 0 <= I < N."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise BadInputError(f"--shard {text!r}: expected I/N, e.g. 0/4")
    shard = Shard(int(index), int(count))
    if shard.count < 1 or not 0 <= shard.index < shard.count:
        raise BadInputError(f"--shard {text!r}: needs 0 <= I < N")
    return shard


@dataclass
class InferResult:
    """What one `run_infer` call did. `rows_per_s` is store rows (token positions, for tokens) through
    all computed teachers per second of the forward-and-write loop (loading and validation excluded),
    comparable to `forward_throughput`."""

    store: str
    shard: str
    kind: str  # "rows" | "tokens"
    teachers: list[str]  # computed (at least partly) by this call
    skipped_teachers: list[str]  # already complete with the same weights: not even loaded
    rows: int  # store rows computed (token positions, for tokens)
    blocks_written: int
    blocks_skipped: int  # blocks of this shard already complete for every teacher
    wall_s: float  # the whole call
    loop_s: float  # the forward-and-write loop
    rows_per_s: float
    complete: dict[str, bool] = field(default_factory=dict)  # every listed teacher, after this call
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # computed teachers: layout attrs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InferConfig:
    """Everything one stage-one run does, resolved and checked once."""

    data: Data
    out: Path
    batch_size: int  # rows, or sequences for token data
    device: torch.device
    dtype: str
    shard: Shard
    layouts: dict[str, Dense | TopK]  # the teachers this run computes
    chunk_rows: int  # of a new store (an existing one keeps its own)
    num_classes: int  # of a new store: the teachers' largest vocabulary


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def run_infer(
    teachers: str | Path | Sequence[ModelSpec],
    data: str | Data,
    out: str | Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    top_k: int | None = None,
    temperatures: str | Sequence[float] | None = None,
    shard: str | Shard = Shard(),
    chunk_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    tail_samples: int = 0,
    seed: int | None = None,
) -> InferResult:
    """Create or resume the store at `out` with the outputs of `teachers` on `data`.

    `teachers` is a TOML path or parsed specs; `data` a data spec or loaded data. `batch_size` counts
    rows, or sequences for token data (default DEFAULT_BATCH). `top_k` stores each row's K most
    probable classes (sparse); without it rows are stored dense and tokens dense only when V <= 1024
    (else top-k DEFAULT_TOP_K). `temperatures` (sparse only, default 1,2; 1 always included) are
    those whose exact normalisers are stored. `chunk_rows` only applies when the store is created.
    `progress(done, total)` is called with rows after every batch. `tail_samples` M > 0 adds M draws
    per row from each top-k teacher's unlisted classes (`top_k` 0: from all of them), a function of
    (`seed`, teacher, row) alone; `seed` (default 0) is recorded per teacher as `tail_seed`.
    Raises BadInputError subclasses, store untouched, for everything that can be checked before writing; a teacher that returns
    NaN/inf later stops the run without recording the block it was in.
    """
    started = time.perf_counter()
    # -- 1. resolve and validate ---------------------------------------------------------------------
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if batch_size is not None and batch_size < 1:
        raise BadInputError(f"--batch-size must be positive, got {batch_size}")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise BadInputError(f"chunk_rows must be positive, got {chunk_rows}")
    if top_k is not None and top_k < 1 and not (top_k == 0 and tail_samples > 0):
        raise BadInputError(f"--top-k must be at least 1 (0 only with --tail-samples), got {top_k}")
    _check_tail_options(tail_samples, seed)
    temps = _temperatures(temperatures)
    specs = list(teachers) if isinstance(teachers, Sequence) and not isinstance(teachers, str) else load_teacher_specs(teachers)
    data = load_data(data) if isinstance(data, str) else data
    dev = resolve_device(device)
    out = storage.location(out)  # a local path, or a URL (storage.py)
    if not storage.is_remote(out):
        check_out_path(out)
    batch_size = batch_size or DEFAULT_BATCH[data.kind]

    store = _open_existing(out)
    if store is not None:
        store.check_data(data)
        store.restore_data(data)  # labels/offsets chunks that `mtkd verify --repair` dropped: rewritten from the data
    weights = {spec.name: spec.weights_sha256() for spec in specs}
    skipped = []
    for spec in specs:
        if store is not None and spec.name in store.teachers:
            info = _check_same_teacher(store, spec, weights[spec.name], dtype, top_k, temps)
            _check_same_tail(store, spec.name, tail_samples, seed)
            if info.complete:
                skipped.append(spec.name)
    todo = [spec for spec in specs if spec.name not in skipped]
    if not todo:
        return _result(store, data, shard, [], skipped, 0, 0, 0, started, 0.0, specs, {})

    models = {spec.name: load_teacher(spec, dev) for spec in todo}
    taps = {spec.name: FeatureTap(models[spec.name], spec.features, f"teacher {spec.name!r}") for spec in todo if spec.features}
    grid = BatchGrid(data, batch_size)
    probe_started = time.perf_counter()
    first_logits, first_features = _probe(models, grid, dev, dtype, taps)
    _synchronize(dev)
    probe_s = time.perf_counter() - probe_started
    layouts = _resolve_layouts(first_logits, data, store, dtype, top_k, temps, temperatures is not None)
    layouts = _with_features(layouts, first_features, grid, store)
    layouts = _with_tail(layouts, store, tail_samples, seed)
    first_rows, first_reduce_s = _check_first_batch(first_logits, first_features, layouts, grid, dev, dtype)
    del first_logits, first_features
    largest = max(layout.row_bytes() for layout in layouts.values())
    config = InferConfig(
        data=data,
        out=out,
        batch_size=batch_size,
        device=dev,
        dtype=dtype,
        shard=shard,
        layouts=layouts,
        chunk_rows=chunk_rows or default_chunk_rows(largest, data.num_rows),
        num_classes=_num_classes(layouts),
    )

    # -- 2. create or extend the store ---------------------------------------------------------------
    if store is None:
        store, _ = create_store(out, data=data, num_classes=config.num_classes, chunk_rows=config.chunk_rows)
    for spec in todo:
        layout = layouts[spec.name]
        added = store.add_teacher(
            spec.name, spec=spec.to_dict(), weights_sha256=weights[spec.name], layout=layout,
            stats_width=StatsSums.width(layout),
        )
        if not added:  # made meanwhile by a racer: it must be the same teacher
            _check_same_teacher(store, spec, weights[spec.name], dtype, top_k, temps)
            if store.layout(spec.name) != layout:
                raise StoreMismatchError(f"store {str(out)!r} holds teacher {spec.name!r} as {store.layout(spec.name)}, not {layout}")

    # -- 3. forward and write ------------------------------------------------------------------------
    done = {name: store.done_blocks(name) for name in models}
    work: dict[int, list[str]] = {}  # block -> teachers missing it, for this shard's blocks
    skipped_blocks = 0
    for block in filter(shard.owns, range(store.num_blocks)):
        missing = [name for name in models if block not in done[name]]
        if missing:
            work[block] = missing
        else:
            skipped_blocks += 1
    total_rows = sum(stop - start for start, stop in map(store.block_range, work))
    if progress is not None:
        progress(0, total_rows)

    loop_started = time.perf_counter()
    rows, reused = _forward(store, config, models, grid, work, first_rows, total_rows, progress, taps)
    # The validation batch's forward and per-position work count as loop time when its outputs were
    # stored (the loop reuses them: without them loop_s missed one batch's reduce, half of a 2-batch run's).
    loop_s = time.perf_counter() - loop_started + (probe_s + first_reduce_s if reused else 0.0)

    # -- 4. finish teachers whose last block is now recorded (by this process or another) ------------
    for name in models:
        if not store.missing_blocks(name) and not store.teacher(name).complete:
            sums = StatsSums.total(store.block_stats(name))
            store.mark_complete(name, StatsSums.stats(sums, layouts[name], store.kind))
    return _result(store, data, shard, list(models), skipped, rows, len(work), skipped_blocks, started, loop_s, specs, layouts)


class Batch(NamedTuple):
    """One batch of the grid, on the device."""

    inputs: torch.Tensor  # rows: (B, ...) inputs; tokens: (B, L) input_ids, padded on the right
    attention_mask: torch.Tensor | None  # tokens: (B, L), 1 = real token
    labels: torch.Tensor  # (B,) or (B * L,) int64, -100 where none (padding included)
    real: torch.Tensor | None  # tokens: (rows,) indices of the real positions in the flattened (B * L)
    row0: int = 0  # the store row of the batch's first (real) row


class BatchGrid:
    """Batch j: rows j*B .. (j+1)*B-1, or the rows of sequences j*B .. (j+1)*B-1 (whole sequences).

    `starts[j]` is batch j's first row, `starts[-1]` the number of rows; the grid depends only on the
    data and the batch size, never on blocks or shards.
    """

    def __init__(self, data: Data, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.labels = data.labels  # once: unlabelled rows build theirs on every access
        if isinstance(data, TokenData):
            firsts = data.offsets[np.arange(0, data.num_seqs, batch_size)]
        else:
            firsts = np.arange(0, data.num_rows, batch_size)
        self.starts = np.append(firsts, data.num_rows).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def rows(self, j: int) -> tuple[int, int]:
        return int(self.starts[j]), int(self.starts[j + 1])

    def overlapping(self, start: int, stop: int) -> range:
        """The batches holding any of rows [start, stop)."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        return range(first, int(np.searchsorted(self.starts, stop, side="left")))

    def batch(self, j: int, dev: torch.device) -> Batch:
        data, (r0, r1) = self.data, self.rows(j)
        pin = dev.type == "cuda"
        if isinstance(data, RowData):
            x = torch.from_numpy(data.x[r0:r1])
            labels = torch.from_numpy(self.labels[r0:r1])
            if pin:
                x, labels = x.pin_memory(), labels.pin_memory()
            return Batch(x.to(dev, non_blocking=True), None, labels.to(dev, non_blocking=True), None, r0)
        seqs = range(j * self.batch_size, min((j + 1) * self.batch_size, data.num_seqs))
        lengths = np.diff(data.offsets[seqs.start : seqs.stop + 1])
        width = int(lengths.max())
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        labels = np.full((len(seqs), width), -100, dtype=np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]  # (B, L) real positions, a prefix of each row
        ids[mask] = data.tokens[r0:r1]
        labels[mask] = self.labels[r0:r1]
        real = np.flatnonzero(mask.reshape(-1))  # row order: sequence by sequence, position by position
        tensors = [torch.from_numpy(a) for a in (ids, mask.astype(np.int64), labels.reshape(-1), real)]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        ids_t, mask_t, labels_t, real_t = (t.to(dev, non_blocking=True) for t in tensors)
        return Batch(ids_t, mask_t, labels_t, real_t, r0)


def run_teacher(name: str, model: torch.nn.Module, batch: Batch, dev: torch.device, tap: FeatureTap | None = None) -> torch.Tensor:
    """A teacher's logits for one batch, shape-checked: (B, V) for rows, (B, L, V) for tokens.
    With a `tap`, its modules' outputs of this forward are then in `tap.take()`."""
    inputs = batch.inputs
    target = hf.input_device(model, dev)
    if target != inputs.device:
        inputs = inputs.to(target)
    extra = tap.call_kwargs() if tap is not None else {}
    if batch.attention_mask is not None and hf.takes_attention_mask(model):
        mask = batch.attention_mask.to(inputs.device)
        raw = model(inputs, attention_mask=mask, **extra)
    else:
        raw = model(inputs, **extra)
    if tap is not None:
        tap.collect(raw)
    out = hf.logits_of(raw)
    want = tuple(inputs.shape[:2]) if batch.attention_mask is not None else (inputs.shape[0],)
    if not isinstance(out, torch.Tensor) or out.dim() != len(want) + 1 or tuple(out.shape[:-1]) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"({', '.join(map(str, want))}, V) logits" + (" for token data (B, L, V)" if batch.attention_mask is not None else "")
        raise TeacherOutputError(f"teacher {name!r} returned {got} for a batch of shape {tuple(inputs.shape)}; expected {what}")
    return out.to(dev) if out.device != dev else out


def _check_width(name: str, layout: Dense | TopK, logits: torch.Tensor, r0: int, r1: int) -> None:
    """Every batch of a teacher gives the vocabulary of its first (the one the store records): a
    column more or fewer would be stored as other classes, or normalised over too few."""
    vocab = int(logits.shape[-1])
    if vocab != layout.vocab_size:
        raise TeacherOutputError(
            f"teacher {name!r} gave {vocab} classes on rows {r0}..{r1 - 1}, but {layout.vocab_size} on its first batch "
            "(as the store records it)")


def _teacher_rows(layout: Dense | TopK, logits: torch.Tensor, batch: Batch, name: str,
                  features: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], RowSummary]:
    """A batch's logits (and captured features) -> the layout's arrays and summary for the batch's
    store rows, on the device. Token batches are cut to their real positions (row order) first:
    padding never reaches the vocabulary-wide work."""
    flat, labels = logits.reshape(-1, logits.shape[-1]), batch.labels
    cut = batch.real is not None and len(batch.real) < len(labels)
    if cut:
        flat, labels = flat[batch.real], labels[batch.real]
    if isinstance(layout, SampledTopK):  # the draws are the rows' own: their store rows and the teacher
        rows = torch.arange(batch.row0, batch.row0 + len(flat), device=flat.device)
        arrays, summary = layout.reduce(flat, labels, rows=rows, teacher=name)
    else:
        arrays, summary = layout.reduce(flat, labels)
    if layout.features:
        arrays, summary = _feature_rows(layout, features or {}, batch, name, arrays, summary, cut)
    return arrays, summary


def _feature_rows(layout: Dense | TopK, features: dict[str, torch.Tensor], batch: Batch, name: str,
                  arrays: dict[str, torch.Tensor], summary: RowSummary, cut: bool) -> tuple[dict[str, torch.Tensor], RowSummary]:
    """The stored features of a batch: each module's output, one row per store row (tokens: per real
    position), cast to the stored dtype; a row with a non-finite stored value is not storable."""
    lead = 2 if batch.attention_mask is not None else 1
    stored = STORAGE[layout.dtype][1]
    nonfinite = summary.nonfinite
    arrays = dict(arrays)
    for module, shape in layout.features:
        out = features.get(module)
        want = (*batch.inputs.shape[:lead], *shape)
        if out is None:
            raise TeacherOutputError(f"teacher {name!r}: module {module!r} was not called in the forward (features = [...] names it)")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TeacherOutputError(f"teacher {name!r}: module {module!r} gave {got} on rows from {batch.row0}; expected {want} "
                                     "(its per-row shape on the first batch, as the store records it)")
        flat = out.reshape(-1, *shape)
        if cut:
            flat = flat[batch.real.to(flat.device)]
        values = flat.to(device=nonfinite.device, dtype=stored)
        nonfinite = nonfinite | ~torch.isfinite(values).reshape(len(values), -1).all(dim=1)
        arrays[f"{FEATURES}/{module}"] = values
    return arrays, summary._replace(nonfinite=nonfinite)


class _Pending:
    """A block being filled: per teacher, host buffers of its arrays (in their stored dtypes: the copy
    casts) and of its rows' summaries, and how many of its rows are filled."""

    def __init__(self, rows: int, names: list[str], layouts: dict[str, Dense | TopK], pin: bool):
        self.rows, self.filled = rows, 0
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.summaries: dict[str, dict[str, torch.Tensor]] = {}
        self.names = names
        self._layouts, self._pin = layouts, pin

    def put(self, name: str, at: int, arrays: dict[str, torch.Tensor], summary: RowSummary) -> None:
        """Copy a batch's rows (already cut to this block) into the buffers at row `at`."""
        if name not in self.buffers:
            dtypes = {a.name: a.torch_dtype for a in self._layouts[name].arrays()}
            self.buffers[name] = {k: self._empty(v, dtypes[k]) for k, v in arrays.items()}
            self.summaries[name] = {k: self._empty(v, v.dtype) for k, v in summary._asdict().items() if v is not None}
        n = next(iter(arrays.values())).shape[0]
        for k, v in arrays.items():
            self.buffers[name][k][at : at + n].copy_(v, non_blocking=True)
        for k, v in summary._asdict().items():
            if v is not None:
                self.summaries[name][k][at : at + n].copy_(v, non_blocking=True)

    def summary(self, name: str) -> RowSummary:
        return RowSummary(**{k: self.summaries[name].get(k) for k in RowSummary._fields})

    def _empty(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((self.rows, *like.shape[1:]), dtype=dtype, pin_memory=self._pin)


def _forward(
    store: LogitStore,
    config: InferConfig,
    models: dict[str, torch.nn.Module],
    grid: BatchGrid,
    work: dict[int, list[str]],
    first_rows: dict[str, tuple[dict[str, torch.Tensor], RowSummary]],
    total_rows: int,
    progress: Callable[[int, int], None] | None,
    taps: dict[str, FeatureTap] | None = None,
) -> tuple[int, bool]:
    """Compute and write the planned blocks; returns the rows computed and whether the probe was used."""
    dev, cuda = config.device, config.device.type == "cuda"
    blocks = sorted(work)
    ranges = {b: store.block_range(b) for b in blocks}
    needed = sorted({j for b in blocks for j in grid.overlapping(*ranges[b])})
    writer = _BlockWriter(store)
    vocabs = input_vocabs(models) if isinstance(grid.data, TokenData) else {}
    pending: dict[int, _Pending] = {}
    next_block = 0  # index into `blocks` of the first block not yet handed to the writer
    rows_done, reused = 0, False
    try:
        with torch.inference_mode(), teacher_autocast(dev, config.dtype):
            for j in needed:
                r0, r1 = grid.rows(j)
                touching = [b for b in blocks[next_block:] if ranges[b][0] < r1 and ranges[b][1] > r0]
                names = [name for name in models if any(name in work[b] for b in touching)]
                batch = grid.batch(j, dev)
                _check_token_ids(grid, j, batch, {name: vocabs[name] for name in names if name in vocabs})
                for name in names:
                    if j == 0 and name in first_rows:
                        arrays, summary = first_rows.pop(name)  # the validation batch: same rows, same outputs
                        reused = True
                    else:
                        try:
                            tap = (taps or {}).get(name)
                            logits = run_teacher(name, models[name], batch, dev, *([tap] if tap is not None else []))
                            features = tap.take() if tap is not None else None
                        except TeacherOutputError:
                            raise
                        except Exception as error:
                            raise TeacherFailedError(
                                f"teacher {name!r} raised on rows {r0}..{r1 - 1} ({brief(error)}); the blocks finished "
                                "before it are written, valid and kept: rerun the same `mtkd infer` to continue"
                            ) from error
                        _check_width(name, config.layouts[name], logits, r0, r1)
                        arrays, summary = _teacher_rows(config.layouts[name], logits, batch, name, features)
                        del logits, features  # (B, L, V) can be the largest tensor alive: free it before the next teacher
                    for b in touching:
                        if name not in work[b]:
                            continue
                        s, e = ranges[b]
                        lo, hi = max(s, r0), min(e, r1)
                        cut = {k: v[lo - r0 : hi - r0] for k, v in arrays.items()}
                        part = RowSummary(*(v[lo - r0 : hi - r0] if v is not None else None for v in summary))
                        pending.setdefault(b, _Pending(e - s, work[b], config.layouts, cuda)).put(name, lo - s, cut, part)
                for b in touching:
                    s, e = ranges[b]
                    pending.setdefault(b, _Pending(e - s, work[b], config.layouts, cuda)).filled += min(e, r1) - max(s, r0)
                    rows_done += min(e, r1) - max(s, r0)
                # Blocks whose rows are all computed go to the writer, in order.
                while next_block < len(blocks) and pending.get(blocks[next_block]) is not None and (
                    pending[blocks[next_block]].filled == pending[blocks[next_block]].rows
                ):
                    block = blocks[next_block]
                    if cuda:
                        torch.cuda.current_stream(dev).synchronize()  # the block's copies have landed
                    writer.put(block, _finish_block(store, config, grid, block, pending.pop(block)))
                    next_block += 1
                if progress is not None:
                    progress(rows_done, total_rows)
    except TeacherOutputError as error:  # bad output found after writing began: say what is kept
        writer.close(raise_error=False)
        raise TeacherOutputError(f"{error}; {RESUMABLE}") from error
    except BaseException:
        writer.close(raise_error=False)  # blocks already handed over are whole and valid: keep them
        raise
    writer.close(raise_error=True)
    return rows_done, reused


def _finish_block(store: LogitStore, config: InferConfig, grid: BatchGrid, block: int, pending: _Pending) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """A full block's arrays as stored and its stats sums, per teacher; refuses non-finite values."""
    start, stop = store.block_range(block)
    labels = torch.from_numpy(grid.labels[start:stop])
    return {name: _stored(name, config.layouts[name], pending.buffers[name], pending.summary(name), labels, start) for name in pending.names}


def _stored(name: str, layout: Dense | TopK, arrays: dict[str, torch.Tensor], summary: RowSummary, labels: torch.Tensor, row0: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Host tensors of one block -> (the numpy arrays written, the block's stats sums)."""
    if bool(summary.nonfinite.any()):
        row = row0 + int(summary.nonfinite.nonzero()[0, 0])
        raise TeacherOutputError(f"teacher {name!r} returned NaN/inf at row {row} (stored as {layout.dtype})")
    specs = {a.name: a for a in layout.arrays()}
    stored = {k: to_storage(v.to(specs[k].torch_dtype), specs[k].dtype) for k, v in arrays.items()}
    return stored, StatsSums.of_block(summary, labels, layout)


def write_logits_block(store: LogitStore, name: str, block: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Store one whole block of a teacher from its (rows, V) logits in hand, as stage one would
    (its layout's arrays, stats sums, record): for tests and tools that have logits already."""
    layout = store.layout(name)
    start, stop = store.block_range(block)
    if isinstance(layout, SampledTopK):
        arrays, summary = layout.reduce(logits, labels, rows=torch.arange(start, stop, device=logits.device), teacher=name)
    else:
        arrays, summary = layout.reduce(logits, labels)
    store.write_block(name, block, *_stored(name, layout, arrays, summary, labels, start))


class _BlockWriter:
    """Threads that write full blocks while the next are computed: each teacher's part of a block
    (its arrays, flushed to disk, then its record: `LogitStore.write_block`) is one task, so the
    fsyncs of several files overlap (one writer thread spent most of its time waiting on them: with
    three dense teachers at V = 1000 the forward then waited on the writer). At most
    WRITE_QUEUE_BLOCKS blocks are in flight, which bounds host memory."""

    def __init__(self, store: LogitStore):
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="mtkd-block-writer")
        self.inflight: collections.deque[list[Future]] = collections.deque()

    def put(self, block: int, teachers: dict[str, tuple[dict[str, np.ndarray], np.ndarray]]) -> None:
        self.inflight.append([self.pool.submit(self.store.write_block, name, block, arrays, stats)
                              for name, (arrays, stats) in teachers.items()])
        while len(self.inflight) > WRITE_QUEUE_BLOCKS or (self.inflight and all(f.done() for f in self.inflight[0])):
            for future in self.inflight.popleft():
                future.result()  # a write's error is raised here, in the main thread

    def close(self, *, raise_error: bool) -> None:
        """Wait for every write handed over (each is whole and valid on its own); raise the first error."""
        self.pool.shutdown(wait=True)
        errors = [f.exception() for futures in self.inflight for f in futures if f.exception() is not None]
        self.inflight.clear()
        if raise_error and errors:
            raise errors[0]


# ---------------------------------------------------------------------------------------------------
# Validation and loading
# ---------------------------------------------------------------------------------------------------


def load_teacher(spec: ModelSpec, dev: torch.device) -> torch.nn.Module:
    """Build a teacher on `dev` in eval mode. A factory without checkpoint starts from a fixed seed, so
    that every shard builds the same weights. A model Hugging Face placed itself (`device_map`) stays
    where it is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build(map_location=dev)
    if not hf.is_placed_by_hf(model):
        model = model.to(dev)
    return model.eval()


def _temperatures(temperatures: str | Sequence[float] | None) -> tuple[float, ...]:
    if temperatures is None:
        return DEFAULT_TEMPERATURES
    if isinstance(temperatures, str):
        return parse_temperatures(temperatures)
    return parse_temperatures(",".join(str(t) for t in temperatures))


def _open_existing(out: Path | storage.ObjectPath) -> LogitStore | None:
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None  # an empty folder is where the store goes
    if half_created(out):
        return None  # a creator killed mid-upload (object store): creating again finishes it (storage.create_once)
    return open_store(out, mode="r+")


def _check_tail_options(tail_samples: int, seed: int | None) -> None:
    if tail_samples < 0:
        raise BadInputError(f"--tail-samples must be at least 0, got {tail_samples}")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise BadInputError(f"--seed must lie in [0, {SEED_MAX}], got {seed}")


def _check_same_tail(store: LogitStore, name: str, tail_samples: int, seed: int | None) -> None:
    """A stored teacher resumes with the draws it was made with: --tail-samples and --seed, when
    given, must be the stored ones (0 / None: not asked, the stored layout is taken)."""
    layout = store.layout(name)
    stored = layout.tail_samples if isinstance(layout, SampledTopK) else 0
    where = f"store {str(store.path)!r} holds teacher {name!r}"
    if tail_samples and tail_samples != stored:
        raise StoreMismatchError(f"{where} with {stored} tail samples, not --tail-samples {tail_samples}; rename the teacher or use another store")
    if seed is not None and isinstance(layout, SampledTopK) and seed != layout.tail_seed:
        raise StoreMismatchError(f"{where} drawn with --seed {layout.tail_seed}, not {seed}; rename the teacher or use another store")


def _with_tail(layouts: dict[str, Dense | TopK], store: LogitStore | None, tail_samples: int, seed: int | None) -> dict[str, Dense | TopK]:
    """New teachers' top-k layouts with `tail_samples` draws; refuses draws from dense teachers or
    from a top-k that lists every class. Stored teachers keep their layout."""
    if not tail_samples:
        return layouts
    out = dict(layouts)
    for name, layout in layouts.items():
        if store is not None and name in store.teachers:
            continue
        if isinstance(layout, Values):
            raise BadInputError(f"--tail-samples applies to top-k teachers only; teacher {name!r} is a regression teacher (float labels: stored as values)")
        if not isinstance(layout, TopK):
            raise BadInputError(f"--tail-samples applies to top-k teachers only; teacher {name!r} is stored dense (add --top-k)")
        if layout.top_k >= layout.vocab_size:
            raise BadInputError(f"--tail-samples: teacher {name!r}'s top-{layout.top_k} lists its whole vocabulary; nothing is left to sample")
        out[name] = SampledTopK(layout.dtype, layout.vocab_size, layout.top_k, layout.temperatures, tail_samples, seed or 0,
                                features=layout.features)
    return out


def _check_same_teacher(store: LogitStore, spec: ModelSpec, weights: str | None, dtype: str, top_k: int | None, temps: tuple[float, ...]):
    """A same-named teacher in the store must be this one: same weights; and the layout asked for
    (when asked: --top-k, --temperatures) and, to resume it, the same dtype."""
    name = spec.name
    info = store.teacher(name)
    where = f"store {str(store.path)!r} holds teacher {name!r}"
    if info.weights_sha256 != weights:
        files = spec.weight_files()
        source = f"checkpoint {files[0]}" if spec.checkpoint else (f"{files[0].parent}" if files else "")
        stored = f"weights sha256 {info.weights_sha256[:12]}" if info.weights_sha256 else "no checkpoint (its factory's own weights)"
        given = f"{source} has sha256 {weights[:12]}" if weights else "this spec gives no checkpoint"
        raise StoreMismatchError(f"{where} from {stored}, but {given}; rename the teacher or use another store")
    differences = spec_differences(info.spec, spec.to_dict())
    if differences:
        raise StoreMismatchError(f"{where} built with {'; '.join(differences)} in this spec; rename the teacher or use another store")
    layout = info.layout
    stored_features = tuple(module for module, _ in layout.features)
    if tuple(spec.features) != stored_features:
        raise StoreMismatchError(f"{where} with features {list(stored_features)}, but its spec names {list(spec.features)}; "
                                 "rename the teacher or use another store")
    if top_k is not None and (not isinstance(layout, TopK) or layout.top_k != top_k):
        stored = f"top-k {layout.top_k}" if isinstance(layout, TopK) else "dense"
        raise StoreMismatchError(f"{where} {stored}, not --top-k {top_k}; rename the teacher or use another store")
    if isinstance(layout, TopK) and temps != DEFAULT_TEMPERATURES and temps != layout.temperatures:
        raise StoreMismatchError(
            f"{where} at temperatures {format_temperatures(layout.temperatures)}, not {format_temperatures(temps)}; "
            "rename the teacher or use another store"
        )
    if layout.features and info.dtype != dtype:  # features asked at another dtype than stored: never skipped silently
        raise StoreMismatchError(f"{where} with features stored as {info.dtype}, not --dtype {dtype}; "
                                 "rename the teacher or use another store")
    if not info.complete and info.dtype != dtype and not isinstance(layout, Values):  # values: always float32
        raise StoreMismatchError(f"{where} as {info.dtype}; resume it with --dtype {info.dtype}, not {dtype}")
    return info


def _probe(models: dict[str, torch.nn.Module], grid: BatchGrid, dev: torch.device, dtype: str,
           taps: dict[str, FeatureTap] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Run batch 0 through every teacher before anything is written: it must run and give logits of
    the right shape. Returns the logits and the tapped features (batch 0 of the forward reuses them)."""
    batch = grid.batch(0, dev)
    _check_token_ids(grid, 0, batch, input_vocabs(models))
    outputs: dict[str, torch.Tensor] = {}
    features: dict[str, dict[str, torch.Tensor]] = {}
    with torch.inference_mode(), teacher_autocast(dev, dtype):
        for name, model in models.items():
            try:
                tap = (taps or {}).get(name)
                outputs[name] = run_teacher(name, model, batch, dev, *([tap] if tap is not None else []))
                if tap is not None:
                    captured = tap.take()
                    missing = [m for m in tap.names if m not in captured]
                    if missing:
                        raise TeacherOutputError(f"teacher {name!r}: module {missing[0]!r} was not called in the forward "
                                                 "(features = [...] names it)")
                    features[name] = {m: captured[m] for m in tap.names}
            except TeacherOutputError:
                raise
            except Exception as e:
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise TeacherOutputError(f"teacher {name!r} fails on the first batch: {type(e).__name__}: {first_line}"
                                         f"{_largest_token(grid, 0, batch)}") from e
    return outputs, features


def _with_features(layouts: dict[str, Dense | TopK], first: dict[str, dict[str, torch.Tensor]], grid: BatchGrid,
                   store: LogitStore | None) -> dict[str, Dense | TopK]:
    """New teachers' layouts with the per-row shapes of their tapped modules on batch 0 (rows: all
    but the batch axis; tokens: all but batch and position). A stored teacher must have stored the
    same features."""
    out = dict(layouts)
    lead = 2 if isinstance(grid.data, TokenData) else 1
    for name, captured in first.items():
        shapes = []
        for module, value in captured.items():
            if not isinstance(value, torch.Tensor) or value.dim() <= lead:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TeacherOutputError(f"teacher {name!r}: module {module!r} gave {got}; a stored feature needs "
                                         f"{'(B, L, ...)' if lead == 2 else '(B, ...)'} with at least one axis per row")
            shapes.append((module, tuple(int(d) for d in value.shape[lead:])))
        if store is not None and name in store.teachers:
            if tuple(layouts[name].features) != tuple(shapes):
                raise StoreMismatchError(f"store {str(store.path)!r} holds teacher {name!r} with features {dict(layouts[name].features)}, "
                                         f"not {dict(shapes)}; rename the teacher or use another store")
            continue
        out[name] = dataclasses.replace(layouts[name], features=tuple(shapes))
    for name, layout in layouts.items():
        if store is not None and name in store.teachers and layout.features and name not in first:
            raise StoreMismatchError(f"store {str(store.path)!r} holds teacher {name!r} with features {dict(layout.features)}, "
                                     "but its spec names none; rename the teacher or use another store")
    return out


def input_vocabs(models: dict[str, torch.nn.Module]) -> dict[str, int]:
    """How many token ids each teacher embeds, where it shows it: the rows of its input embedding
    (Hugging Face's `get_input_embeddings`, else its one nn.Embedding)."""
    vocabs = {}
    for name, model in models.items():
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if embedding is None:
            found = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
            embedding = found[0] if len(found) == 1 else None
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            vocabs[name] = int(weight.shape[0])
    return vocabs


def _check_token_ids(grid: BatchGrid, j: int, batch: Batch, vocabs: dict[str, int]) -> None:
    """Token batch j's ids within the input embedding of every teacher in `vocabs`, before any
    forward: an id beyond it raises an IndexError, or on CUDA a device-side assert that ends the
    process. (Padding is id 0.)"""
    if batch.attention_mask is None or not vocabs:
        return
    ids = batch.inputs
    top = int(ids.max())  # one number per batch: its only host sync
    for name, vocab in vocabs.items():
        if top >= vocab:
            seq, pos = (int(i) for i in (ids >= vocab).nonzero()[0])
            raise TeacherOutputError(
                f"data {grid.data.spec!r}: sequence {j * grid.batch_size + seq} holds token id {int(ids[seq, pos])} at "
                f"position {pos}, beyond teacher {name!r}'s {vocab} token ids (its input embedding)")


def _largest_token(grid: BatchGrid, j: int, batch: Batch) -> str:
    """Where a token batch's largest id is, said after a teacher failed on it ("" for rows)."""
    if batch.attention_mask is None:
        return ""
    ids = batch.inputs
    seq, pos = divmod(int(ids.argmax()), ids.shape[1])
    return f" (the batch's largest token id: {int(ids[seq, pos])}, sequence {j * grid.batch_size + seq} position {pos})"


def _check_first_batch(
    first_logits: dict[str, torch.Tensor], first_features: dict[str, dict[str, torch.Tensor]], layouts: dict[str, Dense | TopK],
    grid: BatchGrid, dev: torch.device, dtype: str
) -> tuple[dict[str, tuple[dict[str, torch.Tensor], RowSummary]], float]:
    """Batch 0's stored values must be finite before the store is made; returns them for reuse, and
    the seconds their per-position work took (the loop's share of this batch, which it skips)."""
    batch = grid.batch(0, dev)
    out, reduce_s = {}, 0.0
    with torch.inference_mode(), teacher_autocast(dev, dtype):
        for name, logits in first_logits.items():
            started = time.perf_counter()
            arrays, summary = _teacher_rows(layouts[name], logits, batch, name, first_features.get(name))
            _synchronize(dev)
            reduce_s += time.perf_counter() - started
            _stored(name, layouts[name], {k: v.cpu() for k, v in arrays.items()},
                    RowSummary(*(v.cpu() if v is not None else None for v in summary)), _batch_labels(grid, 0), 0)
            out[name] = (arrays, summary)
    return out, reduce_s


def _synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock interval holds what it timed."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batch_labels(grid: BatchGrid, j: int) -> torch.Tensor:
    r0, r1 = grid.rows(j)
    return torch.from_numpy(grid.labels[r0:r1])


def _resolve_layouts(
    first_logits: dict[str, torch.Tensor], data: Data, store: LogitStore | None, dtype: str,
    top_k: int | None, temps: tuple[float, ...], temps_given: bool,
) -> dict[str, Dense | TopK]:
    """Each teacher's layout from its vocabulary (V of its first batch) and the options; refuses what
    the store or the data cannot hold."""
    layouts: dict[str, Dense | TopK] = {}
    labels = data.labels
    labelled = labels[labels >= 0]
    top_label = int(labelled.max()) if len(labelled) else -1
    for name, logits in first_logits.items():
        vocab = int(logits.shape[-1])
        if store is not None and name in store.teachers:
            layouts[name] = store.layout(name)  # resuming: the stored layout (checked against the options)
            if layouts[name].vocab_size != vocab:
                raise TeacherOutputError(f"teacher {name!r} gives {vocab} classes; the store holds it with {layouts[name].vocab_size}")
            continue
        if data.regression:  # v3: a regression teacher's raw outputs, float32 whatever --dtype
            if top_k is not None or temps_given:
                raise BadInputError(f"--{'top-k' if top_k is not None else 'temperatures'} applies to classification teachers; "
                                    f"data {data.spec!r} is regression (float labels): teacher {name!r} is stored as values")
            if vocab != data.num_outputs:
                raise TeacherOutputError(f"teacher {name!r} gives {vocab} outputs but data {data.spec!r} has {data.num_outputs} "
                                         "regression targets per row")
            layouts[name] = Values("float32", vocab)
            continue
        sparse = top_k is not None or (data.kind == "tokens" and vocab > DENSE_TOKENS_MAX_VOCAB)
        if sparse:
            k = top_k if top_k is not None else DEFAULT_TOP_K
            if k > vocab:
                raise BadInputError(f"--top-k {k} exceeds teacher {name!r}'s vocabulary of {vocab}")
            layouts[name] = TopK(dtype, vocab, k, temps)
        else:
            if temps_given:
                raise BadInputError(f"--temperatures applies to top-k teachers only; teacher {name!r} is stored dense (add --top-k)")
            layouts[name] = Dense(dtype, vocab)
        if top_label >= vocab:
            raise TeacherOutputError(
                f"data {data.spec!r} has label {top_label} but teacher {name!r} gives {vocab} classes"
            )
    # Dense teachers in one store share one V: the store's num_classes.
    dense = [(name, layout.vocab_size) for name, layout in layouts.items() if isinstance(layout, Dense)]
    if store is not None:
        dense = [(name, store.layout(name).vocab_size) for name in store.teachers if isinstance(store.layout(name), Dense)] + dense
        dense.insert(0, (f"store {str(store.path)!r}", store.num_classes))
    for name, vocab in dense[1:]:
        if vocab != dense[0][1]:
            raise TeacherOutputError(f"teacher {name!r} gives {vocab} classes; {_who(dense[0][0])} gives {dense[0][1]} (dense teachers share one V)")
    return layouts


def _num_classes(layouts: dict[str, Dense | TopK]) -> int:
    """A new store's num_classes: the dense teachers' V, or else the largest top-k vocabulary."""
    dense = [layout.vocab_size for layout in layouts.values() if isinstance(layout, Dense)]
    return dense[0] if dense else max(layout.vocab_size for layout in layouts.values())


def _who(name: str) -> str:
    return name if name.startswith("store ") else f"teacher {name!r}"


@contextlib.contextmanager
def teacher_autocast(dev: torch.device, dtype: str):
    """The autocast stage one runs teachers under for `--dtype`: 16-bit on CUDA only (on the CPU it is
    emulated on most machines and slower than float32, so CPU teachers run in float32 and their
    outputs are rounded to --dtype when stored). Anything that compares itself with stage one (the
    benchmark's online KD) runs its teachers under the same."""
    if dev.type == "cuda" and dtype == "float16":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    elif dev.type == "cuda" and dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _result(store, data, shard, computed, skipped, rows, blocks, skipped_blocks, started, loop_s, specs, layouts) -> InferResult:
    return InferResult(
        store=str(store.path),
        shard=str(shard),
        kind=data.kind,
        teachers=computed,
        skipped_teachers=skipped,
        rows=rows,
        blocks_written=blocks,
        blocks_skipped=skipped_blocks,
        wall_s=time.perf_counter() - started,
        loop_s=loop_s,
        rows_per_s=rows / loop_s if loop_s > 0 else 0.0,
        complete={spec.name: store.teacher(spec.name).complete for spec in specs},
        layouts={name: layout.attrs() for name, layout in layouts.items()},
    )


# ---------------------------------------------------------------------------------------------------
# The yardstick: the same teachers' bare forward throughput (bench/pipeline.py's infer_vs_forward)
# ---------------------------------------------------------------------------------------------------


def forward_throughput(
    teachers: str | Path | Sequence[ModelSpec],
    data: str | Data,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
) -> float:
    """Rows (token positions) per second through every teacher, forward only: the same batches as
    `run_infer` (built and moved to the device before timing), same autocast, outputs discarded.
    `run_infer(...).rows_per_s` divided by this is stage one's efficiency."""
    specs = list(teachers) if isinstance(teachers, Sequence) and not isinstance(teachers, str) else load_teacher_specs(teachers)
    data = load_data(data) if isinstance(data, str) else data
    dev = resolve_device(device)
    models = {spec.name: load_teacher(spec, dev) for spec in specs}
    grid = BatchGrid(data, batch_size or DEFAULT_BATCH[data.kind])
    batches = [grid.batch(j, dev) for j in range(len(grid))]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    started = time.perf_counter()
    with torch.inference_mode(), teacher_autocast(dev, dtype):
        for batch in batches:
            for name, model in models.items():
                run_teacher(name, model, batch, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return data.num_rows / (time.perf_counter() - started)
