"""Stage one: run every teacher over the data once and write its raw logits into the store.

`run_infer` reads top to bottom:
1. validate: parse specs, load the data, open the store if there is one and check it is this data's,
   decide per teacher (skip: complete with the same checkpoint; refuse: another checkpoint or dtype),
   load every teacher that has work and check one batch of its outputs (shape, class count, finite);
2. only then create the store or add teachers to it;
3. forward: block by block of this shard; each batch of inputs is read once and goes through every
   teacher that still misses that block:
       rows [s, e) of x -> device -> teacher (inference mode; autocast on CUDA for 16-bit --dtype)
       -> (B, V) logits, shape checked -> one copy into the block's host buffer, in the stored dtype
   A full block is checked finite (as stored: float16 overflow counts) and goes to the writer thread
   (bounded queue), which writes one chunk per teacher, flushes it, then writes the block's completion
   record; the next block is computed meanwhile;
4. finish: a teacher whose blocks are all recorded gets its stats and `complete`, by whichever
   process sees the last record (the same bytes whoever writes them).

Blocks are the unit of everything: of resume (a block without its record is computed again), of
sharding (shard I of N takes blocks b with b % N == I) and of bit-identity (a block's rows are
forwarded in the same batches whether one process writes the store or many, or one is killed).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.errors import BadInputError, StoreMismatchError, TeacherFailedError, TeacherOutputError
from mtkd.pipeline.report import teacher_stats
from mtkd.pipeline.specs import IGNORE_LABEL, ArrayData, ModelSpec, _brief, check_out_path, load_data, load_teacher_specs
from mtkd.pipeline.store import DTYPES, STORAGE, LogitStore, create_store, open_store

WRITE_QUEUE_BLOCKS = 2  # full blocks waiting for the writer; bounds host memory to a few blocks


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
    """What one `run_infer` call did. `rows_per_s` is input rows through all computed teachers per
    second of the forward-and-write loop (loading and validation excluded), comparable to
    `forward_throughput`."""

    store: str
    shard: str
    teachers: list[str]  # computed (at least partly) by this call
    skipped_teachers: list[str]  # already complete with the same checkpoint: not even loaded
    rows: int  # input rows forwarded
    blocks_written: int
    blocks_skipped: int  # blocks of this shard already complete for every teacher
    wall_s: float  # the whole call
    loop_s: float  # the forward-and-write loop
    rows_per_s: float
    complete: dict[str, bool] = field(default_factory=dict)  # every listed teacher, after this call

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def run_infer(
    teachers: str | Path | Sequence[ModelSpec],
    data: str | ArrayData,
    out: str | Path,
    *,
    batch_size: int = 512,
    device: str = "auto",
    dtype: str = "float16",
    shard: str | Shard = Shard(),
    chunk_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> InferResult:
    """Create or resume the store at `out` with the logits of `teachers` on `data`.

    `teachers` is a TOML path or parsed specs; `data` a data spec or loaded data. `chunk_rows` only
    applies when the store is created (default: `store.default_chunk_rows`). `progress(done, total)`
    is called with rows after every batch. Raises BadInputError subclasses, store untouched, for
    everything that can be checked before writing; a teacher that returns NaN/inf later stops the run
    without recording the block it was in.
    """
    started = time.perf_counter()
    # -- 1. validate ---------------------------------------------------------------------------------
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be positive, got {batch_size}")
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise BadInputError(f"chunk_rows must be positive, got {chunk_rows}")
    specs = list(teachers) if isinstance(teachers, Sequence) and not isinstance(teachers, str) else load_teacher_specs(teachers)
    data = load_data(data) if isinstance(data, str) else data
    dev = resolve_device(device)
    out = Path(out)
    check_out_path(out)

    store = _open_existing(out)
    if store is not None:
        store.check_data(data)
    checkpoints = {spec.name: spec.weights_sha256() for spec in specs}
    skipped = [spec.name for spec in specs if store is not None and _already_done(store, spec, checkpoints[spec.name], dtype)]
    todo = [spec for spec in specs if spec.name not in skipped]
    if not todo:
        return _result(store, shard, [], skipped, 0, 0, 0, started, 0.0, specs)

    models = {spec.name: load_teacher(spec, dev) for spec in todo}
    probe_started = time.perf_counter()
    num_classes, first_batch = _probe(models, data, batch_size, dev, dtype)
    probe_s = time.perf_counter() - probe_started
    if store is not None and num_classes != store.num_classes:
        raise TeacherOutputError(
            f"teachers {', '.join(models)} give {num_classes} classes; store {str(out)!r} holds {store.num_classes}"
        )
    labelled = data.labels[data.labels != IGNORE_LABEL]
    if len(labelled) and int(labelled.max()) >= num_classes:
        raise TeacherOutputError(
            f"data {data.spec!r} has label {int(labelled.max())} but teachers {', '.join(map(repr, models))} give {num_classes} classes"
        )

    # -- 2. create or extend the store ---------------------------------------------------------------
    if store is None:
        store, _ = create_store(out, data=data, num_classes=num_classes, chunk_rows=chunk_rows)
    for spec in todo:
        if not store.add_teacher(spec.name, spec=spec.to_dict(), checkpoint_sha256=checkpoints[spec.name], dtype=dtype):
            _check_same_teacher(store, spec, checkpoints[spec.name], dtype)  # made meanwhile by a racer

    # -- 3. forward and write ------------------------------------------------------------------------
    done = {name: store.done_blocks(name) for name in models}
    work: list[tuple[int, list[str]]] = []  # (block, teachers missing it)
    skipped_blocks = 0
    for block in filter(shard.owns, range(store.num_blocks)):
        missing = [name for name in models if block not in done[name]]
        if missing:
            work.append((block, missing))
        else:
            skipped_blocks += 1
    total_rows = sum(stop - start for start, stop in (store.block_range(b) for b, _ in work))
    if progress is not None:
        progress(0, total_rows)

    loop_started = time.perf_counter()
    rows, reused = _forward_blocks(store, models, data, work, batch_size, dev, dtype, first_batch, total_rows, progress)
    # The validation batch's forward counts as loop time when its outputs were stored.
    loop_s = time.perf_counter() - loop_started + (probe_s if reused else 0.0)

    # -- 4. finish teachers whose last block is now recorded (by this process or another) ------------
    for name in models:
        if not store.missing_blocks(name) and not store.teacher(name).complete:
            store.mark_complete(name, teacher_stats(store, name))
    return _result(store, shard, list(models), skipped, rows, len(work), skipped_blocks, started, loop_s, specs)


def _forward_blocks(
    store: LogitStore,
    models: dict[str, torch.nn.Module],
    data: ArrayData,
    work: list[tuple[int, list[str]]],
    batch_size: int,
    dev: torch.device,
    dtype: str,
    first_batch: dict[str, torch.Tensor],
    total_rows: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, bool]:
    """Run the planned blocks; returns the input rows forwarded and whether `first_batch` was used."""
    stored_dtype = STORAGE[dtype][1]
    # On CUDA, inputs and outputs go through pinned memory with asynchronous copies, so nothing waits
    # for the GPU until a block is done: pageable copies would synchronise the stream every batch.
    cuda = dev.type == "cuda"
    writer = _BlockWriter(store)
    rows_done, reused = 0, False
    try:
        with torch.inference_mode(), _autocast(dev, dtype):
            for block, names in work:
                start, stop = store.block_range(block)
                inputs = torch.from_numpy(data.x[start:stop])
                if cuda:
                    inputs = inputs.pin_memory()
                buffers = {  # (rows, V) per teacher, in the stored dtype
                    name: torch.empty((stop - start, store.num_classes), dtype=stored_dtype, pin_memory=cuda) for name in names
                }
                for s in range(start, stop, batch_size):
                    e = min(s + batch_size, stop)
                    x = inputs[s - start : e - start].to(dev, non_blocking=True)
                    for name in names:
                        host = buffers[name][s - start : e - start]
                        reuse = first_batch.get(name) if s == 0 else None
                        if reuse is not None and len(reuse) == e - s:
                            host.copy_(reuse)  # the validation batch: these rows, these outputs
                            reused = True
                            continue
                        try:
                            out = models[name](x)
                        except Exception as error:
                            raise TeacherFailedError(
                                f"teacher {name!r} raised on rows {s}..{e - 1} ({_brief(error)}); the blocks finished "
                                "before it are written, valid and kept: rerun the same `mtkd infer` to continue"
                            ) from error
                        _check_shape(name, out, s, e - s, store.num_classes)
                        # The one copy to the host; CUDA casts first (half the bytes over the bus for
                        # 16-bit stores), the CPU casts on the way.
                        host.copy_(out.to(stored_dtype) if cuda else out, non_blocking=True)
                    rows_done += e - s
                    if progress is not None:
                        progress(rows_done, total_rows)
                if cuda:
                    torch.cuda.current_stream(dev).synchronize()  # the block's copies have landed
                for name in names:
                    _check_finite(name, buffers[name], start)
                writer.put(block, buffers)
    except BaseException:
        writer.close(raise_error=False)  # blocks already handed over are whole and valid: keep them
        raise
    writer.close(raise_error=True)
    return rows_done, reused


def _check_shape(name: str, out: Any, row0: int, rows: int, num_classes: int) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = f"({rows}, {num_classes if num_classes >= 0 else 'classes'})"
        raise TeacherOutputError(f"teacher {name!r} returned {got} for rows {row0}..{row0 + rows - 1}; expected {want}")


def _check_finite(name: str, logits: torch.Tensor, row0: int) -> None:
    """Logits as stored (after the cast, so float16 overflow counts) must be finite."""
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        row = row0 + int((~finite).nonzero()[0, 0])
        raise TeacherOutputError(f"teacher {name!r} returned NaN/inf at row {row} (stored as {logits.dtype}); that block is not recorded")


class _BlockWriter:
    """A thread that writes full blocks (one chunk per teacher, then the record) while the next is computed."""

    def __init__(self, store: LogitStore):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BLOCKS)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mtkd-block-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the main thread raises the error at its next put or close
            block, buffers = item
            try:
                for name, logits in buffers.items():
                    self.store.write_block(name, block, logits)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def put(self, block: int, buffers: dict[str, torch.Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((block, buffers))

    def close(self, *, raise_error: bool) -> None:
        self.queue.put(None)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------------------
# Validation and loading
# ---------------------------------------------------------------------------------------------------


def load_teacher(spec: ModelSpec, dev: torch.device) -> torch.nn.Module:
    """Build a teacher on `dev` in eval mode. A factory without checkpoint starts from a fixed seed, so
    that every shard builds the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build(map_location=dev)
    return model.to(dev).eval()


def _open_existing(out: Path) -> LogitStore | None:
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None  # an empty folder is where the store goes
    return open_store(out, mode="r+")


def _already_done(store: LogitStore, spec: ModelSpec, checkpoint: str | None, dtype: str) -> bool:
    """True if `spec` is complete in the store; refuses a same-named teacher that is another one."""
    if spec.name not in store.teachers:
        return False
    info = _check_same_teacher(store, spec, checkpoint, dtype)
    return info.complete


def _check_same_teacher(store: LogitStore, spec: ModelSpec, checkpoint: str | None, dtype: str):
    info = store.teacher(spec.name)
    if info.checkpoint_sha256 != checkpoint:
        stored = f"checkpoint sha256 {info.checkpoint_sha256[:12]}" if info.checkpoint_sha256 else "no checkpoint (its factory's own weights)"
        given = f"{spec.weights_file} has sha256 {checkpoint[:12]}" if checkpoint else "this spec gives no checkpoint"
        raise StoreMismatchError(
            f"store {str(store.path)!r} holds teacher {spec.name!r} from {stored}, but {given}; "
            "rename the teacher or use another store"
        )
    if not info.complete and info.dtype != dtype:
        raise StoreMismatchError(
            f"store {str(store.path)!r} holds teacher {spec.name!r} as {info.dtype}; resume it with --dtype {info.dtype}, not {dtype}"
        )
    return info


def _probe(
    models: dict[str, torch.nn.Module], data: ArrayData, batch_size: int, dev: torch.device, dtype: str
) -> tuple[int, dict[str, torch.Tensor]]:
    """Run the first batch through every teacher: class count, shape and finiteness, before any write.

    Returns V and each teacher's stored-dtype outputs for those rows (block 0's first batch reuses them).
    """
    rows = min(batch_size, len(data))
    x = torch.from_numpy(data.x[:rows]).to(dev)
    outputs: dict[str, torch.Tensor] = {}
    num_classes, first = -1, ""
    with torch.inference_mode(), _autocast(dev, dtype):
        for name, model in models.items():
            try:
                out = model(x)
            except Exception as e:
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise TeacherOutputError(f"teacher {name!r} fails on the first batch: {type(e).__name__}: {first_line}") from e
            if isinstance(out, torch.Tensor) and out.dim() == 2 and num_classes < 0:
                num_classes, first = out.shape[1], name
            elif isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != num_classes:
                raise TeacherOutputError(f"teacher {name!r} gives {out.shape[1]} classes; teacher {first!r} gives {num_classes}")
            _check_shape(name, out, 0, rows, num_classes)
            outputs[name] = out.to(STORAGE[dtype][1]).cpu()
            _check_finite(name, outputs[name], 0)
    return num_classes, outputs


@contextlib.contextmanager
def _autocast(dev: torch.device, dtype: str):
    # 16-bit autocast on CUDA only: on CPU it is emulated on most machines and slower than float32,
    # so CPU teachers run in float32 and their logits are rounded to --dtype when stored.
    if dev.type == "cuda" and dtype == "float16":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    elif dev.type == "cuda" and dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _result(store, shard, computed, skipped, rows, blocks, skipped_blocks, started, loop_s, specs) -> InferResult:
    return InferResult(
        store=str(store.path),
        shard=str(shard),
        teachers=computed,
        skipped_teachers=skipped,
        rows=rows,
        blocks_written=blocks,
        blocks_skipped=skipped_blocks,
        wall_s=time.perf_counter() - started,
        loop_s=loop_s,
        rows_per_s=rows / loop_s if loop_s > 0 else 0.0,
        complete={spec.name: store.teacher(spec.name).complete for spec in specs},
    )


# ---------------------------------------------------------------------------------------------------
# The yardstick: the same teachers' bare forward throughput (bench/pipeline.py's infer_vs_forward)
# ---------------------------------------------------------------------------------------------------


def forward_throughput(
    teachers: str | Path | Sequence[ModelSpec],
    data: str | ArrayData,
    *,
    batch_size: int = 512,
    device: str = "auto",
    dtype: str = "float16",
) -> float:
    """Input rows per second through every teacher, forward only: inputs already on the device (not
    timed), same batch size and autocast as `run_infer`, outputs discarded. `run_infer(...).rows_per_s`
    divided by this is stage one's efficiency."""
    specs = list(teachers) if isinstance(teachers, Sequence) and not isinstance(teachers, str) else load_teacher_specs(teachers)
    data = load_data(data) if isinstance(data, str) else data
    dev = resolve_device(device)
    models = [load_teacher(spec, dev) for spec in specs]
    batches = [torch.from_numpy(data.x[s : s + batch_size]).to(dev) for s in range(0, len(data), batch_size)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    started = time.perf_counter()
    with torch.inference_mode(), _autocast(dev, dtype):
        for x in batches:
            for model in models:
                model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return len(data) / (time.perf_counter() - started)
