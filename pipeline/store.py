"""The logit store: one Zarr v3 group holding every teacher's raw logits for one data set.

    STORE/                      attrs["mtkd"]: format, num_rows, num_classes, chunk_rows, dataset{spec, fingerprint}
      labels                    (N,) int64, -100 where unknown
      teachers/<name>/logits    (N, V) float16 | float32 | uint16 holding bfloat16 (attrs: logical_dtype)
      teachers/<name>/done      (num_blocks,) uint8: 1 once the block's rows are written (one file per block)
      teachers/<name>           attrs: spec, checkpoint_sha256, dtype, complete, stats

Rows are grouped into blocks of `chunk_rows` rows; one block is one chunk of every teacher's `logits`
(whole rows, full V, uncompressed, about 1-4 MB). The store has ONE `chunk_rows`, so the blocks of all
teachers coincide and stage two reads the same rows of K teachers as K whole chunks.

Why it is built this way:
- A block is only ever written whole, by one writer: Zarr loses data silently when two processes write
  parts of the same chunk. Shards are sets of blocks.
- Completion is one object per block (`done`, chunks of one element, i.e. one file each), written after
  the block's data is on disk. Writers never rewrite a shared object, so none can lose another's record;
  a block without its record is simply computed again. The teacher's `complete` and `stats` attributes
  are derived from the records by whoever sees the last one, idempotently (same bytes every time).
- Logits are filled with NaN (for bfloat16: the bit pattern of a bfloat16 NaN), so a row never written
  cannot pass as data.
- Creation is atomic: a store (or a teacher added to one) is built in a hidden sibling folder and
  renamed into place. When several processes start together one rename wins; the others find the
  winner's store and check that it is the one they would have made.

Every file is written to a temporary file and renamed into place (zarr's LocalStore does this for
metadata; `write_block` does it for chunks and records, which it writes directly), so a process
killed at any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from mtkd.pipeline.errors import BadInputError, CorruptStoreError, IncompleteStoreError, StoreMismatchError
from mtkd.pipeline.specs import ArrayData
from mtkd.pipeline.staging import remove_stale, staging_dir

FORMAT = 1
TARGET_CHUNK_BYTES = 2 << 20  # at 2 bytes per logit: fp16/bf16 chunks of 1-2 MiB, fp32 of 2-4 MiB
LABEL_CHUNK_ROWS = 1 << 17  # 1 MiB of int64 labels per chunk

# logical dtype -> (dtype stored in Zarr, torch dtype handed to readers, fill value in the stored dtype)
BF16_NAN_BITS = 0x7FC0  # the canonical bfloat16 quiet NaN, as uint16
STORAGE: dict[str, tuple[np.dtype, torch.dtype, Any]] = {
    "float16": (np.dtype(np.float16), torch.float16, float("nan")),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16, BF16_NAN_BITS),
    "float32": (np.dtype(np.float32), torch.float32, float("nan")),
}
DTYPES = tuple(STORAGE)


def default_chunk_rows(num_classes: int, num_rows: int) -> int:
    """Rows per block: the largest power of two whose rows fit TARGET_CHUNK_BYTES at 2 bytes/logit.

    Capped at `num_rows`, so a small store is one small chunk rather than one padded 2 MiB file.
    """
    rows = max(1, TARGET_CHUNK_BYTES // (2 * max(1, num_classes)))
    return max(1, min(1 << (rows.bit_length() - 1), num_rows))


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher's attributes, as stored."""

    name: str
    spec: dict[str, Any]
    checkpoint_sha256: str | None
    dtype: str  # logical: "float16" | "bfloat16" | "float32"
    complete: bool
    stats: dict[str, Any] = field(default_factory=dict)


def open_store(path: str | os.PathLike, *, mode: str = "r") -> LogitStore:
    """Open an existing store for reading ("r") or for writing blocks and teachers ("r+")."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"store {str(path)!r} does not exist")
    if not (path / "zarr.json").is_file():
        raise StoreMismatchError(f"{str(path)!r} is not an mtkd store (no Zarr group there)")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as e:  # zarr raises several unrelated types for "not a group"
        raise StoreMismatchError(f"{str(path)!r} is not an mtkd store ({type(e).__name__}: {e})") from e
    meta = group.attrs.get("mtkd")
    if not isinstance(meta, dict):
        raise StoreMismatchError(f"{str(path)!r} is a Zarr group but not an mtkd store (no 'mtkd' attribute)")
    if meta.get("format") != FORMAT:
        raise StoreMismatchError(f"store {str(path)!r} has format {meta.get('format')!r}; this mtkd reads format {FORMAT}")
    return LogitStore(path, meta, mode)


def create_store(
    path: str | os.PathLike, *, data: ArrayData, num_classes: int, chunk_rows: int | None = None
) -> tuple[LogitStore, bool]:
    """Create an empty store for `data` (labels written, no teachers), or find the one a racer made.

    Returns (store opened "r+", whether this call created it). A store already at `path` (made by a
    process that started at the same time) is accepted only if it holds the same data and class count.
    """
    path = Path(path)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    chunk_rows = chunk_rows or default_chunk_rows(num_classes, len(data))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "num_rows": len(data),
        "num_classes": int(num_classes),
        "chunk_rows": int(chunk_rows),
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
    }
    tmp = _staging_dir(path)
    try:
        root = zarr.open_group(tmp, mode="w", attributes={"mtkd": meta})
        labels = root.create_array(
            "labels",
            shape=(len(data),),
            chunks=(min(len(data), LABEL_CHUNK_ROWS),),
            dtype="int64",
            fill_value=-100,
            dimension_names=["row"],
        )
        labels[...] = data.labels
        root.create_group("teachers")
        created = _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = open_store(path, mode="r+")
    if not created:
        store.check_data(data)
        if store.num_classes != num_classes:
            raise StoreMismatchError(
                f"store {str(path)!r} holds {store.num_classes} classes; the teachers give {num_classes}"
            )
    return store, created


class LogitStore:
    """An opened store. Reading is what stage two, `mtkd inspect` and tests use; writing is stage one's."""

    def __init__(self, path: Path, meta: dict[str, Any], mode: str):
        self.path = path
        self.mode = mode
        self.num_rows: int = int(meta["num_rows"])
        self.num_classes: int = int(meta["num_classes"])
        self.chunk_rows: int = int(meta["chunk_rows"])
        self.num_blocks: int = math.ceil(self.num_rows / self.chunk_rows)
        self.fingerprint: str = meta["dataset"]["fingerprint"]
        self.dataset_spec: str = meta["dataset"]["spec"]
        self._arrays: dict[str, zarr.Array] = {}

    # Picklable for DataLoader workers: zarr handles are reopened lazily on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrays = {}

    def __repr__(self) -> str:
        return f"LogitStore({str(self.path)!r}, rows={self.num_rows}, classes={self.num_classes}, teachers={self.teachers})"

    # -- reading ------------------------------------------------------------------------------------

    @property
    def teachers(self) -> list[str]:
        """Names of the teachers in the store, sorted."""
        folder = self.path / "teachers"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())

    def labels(self) -> np.ndarray:
        """(N,) int64, -100 where unknown."""
        return np.asarray(self._array("labels")[...], dtype=np.int64)

    def block_range(self, block: int) -> tuple[int, int]:
        """[start, stop) rows of one block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (store has {self.num_blocks})")
        start = block * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def teacher(self, name: str) -> TeacherInfo:
        """The stored attributes of one teacher (read afresh: other processes may have updated them)."""
        self._require_teacher(name)
        attrs = dict(zarr.open_group(self.path / "teachers" / name, mode="r").attrs)
        return TeacherInfo(
            name=name,
            spec=attrs.get("spec") or {},
            checkpoint_sha256=attrs.get("checkpoint_sha256"),
            dtype=attrs["dtype"],
            complete=bool(attrs.get("complete", False)),
            stats=attrs.get("stats") or {},
        )

    def done_blocks(self, name: str) -> set[int]:
        """Blocks whose completion record exists (one file per block, listed rather than read)."""
        self._require_teacher(name)
        folder = self.path / "teachers" / name / "done" / "c"
        if not folder.is_dir():
            return set()
        # A killed writer may leave "<b>.<hex>.partial" behind; only whole names count.
        return {int(p) for p in os.listdir(folder) if p.isdigit() and int(p) < self.num_blocks}

    def missing_blocks(self, name: str) -> list[int]:
        """Blocks of `name` not yet written, ascending."""
        done = self.done_blocks(name)
        return [b for b in range(self.num_blocks) if b not in done]

    def rows_complete(self, name: str) -> int:
        return sum(stop - start for start, stop in map(self.block_range, self.done_blocks(name)))

    def require_complete(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise IncompleteStoreError naming the first teacher with rows not yet written."""
        for name in names:
            missing = self.missing_blocks(name)
            if missing:
                rows = sum(stop - start for start, stop in map(self.block_range, missing))
                first = self.block_range(missing[0])[0]
                raise IncompleteStoreError(
                    f"store {str(self.path)!r}: teacher {name!r} is missing {rows} of {self.num_rows} rows "
                    f"({len(missing)} blocks, first at row {first}); run `mtkd infer` again to complete it"
                )

    def check_data(self, data: ArrayData) -> None:
        """Raise StoreMismatchError unless `data` is the data set the store was made from."""
        if len(data) != self.num_rows or data.fingerprint != self.fingerprint:
            raise StoreMismatchError(
                f"store {str(self.path)!r} was made from data {self.dataset_spec!r} "
                f"({self.num_rows} rows, fingerprint {self.fingerprint[:12]}), not from {data.spec!r} "
                f"({len(data)} rows, fingerprint {data.fingerprint[:12]})"
            )

    def read_logits(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a teacher's logits, (stop-start, V), in its logical dtype (bf16 bit-exact)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range (store has {self.num_rows})")
        try:
            dtype = self._logical_dtype(name)
            raw = np.ascontiguousarray(self._array(f"teachers/{name}/logits")[start:stop])
        except (ValueError, OSError) as e:  # a checksum mismatch, a truncated chunk, a missing zarr.json
            first, last = start // self.chunk_rows, max(stop - 1, start) // self.chunk_rows
            for block in range(first, last + 1) if first < last else ():
                self.read_logits(name, *self.block_range(block))  # raises naming the block that fails
            blocks = f"block {first}" if first == last else f"blocks {first}..{last}"
            detail = (str(e).strip().splitlines() or [""])[0]
            raise CorruptStoreError(
                f"store {str(self.path)!r}: teacher {name!r}, {blocks}: the logits do not read ({type(e).__name__}: "
                f"{detail}); run `mtkd verify {self.path}`"
            ) from e
        self._require_finite(name, start, raw, dtype)
        return _from_storage(raw, dtype)

    def _require_finite(self, name: str, start: int, raw: np.ndarray, dtype: str) -> None:
        """Raise CorruptStoreError if a recorded block holds NaN/inf: stage one never records one, so
        it is damage, and no reader (stage two, inspect, stats) may take it as data. On the host, as
        read (an integer test of the exponent bits, ~0.1 ms per MB): nothing non-finite reaches a GPU.
        Unrecorded blocks read as their NaN fill."""
        bad = nonfinite_rows(raw, dtype)
        if not bad.any():
            return
        rows = start + np.flatnonzero(bad)
        damaged = sorted(set((rows // self.chunk_rows).tolist()) & self.done_blocks(name))
        if damaged:
            row = int(rows[(rows // self.chunk_rows) == damaged[0]][0])
            raise CorruptStoreError(nonfinite_message(self.path, name, damaged[0], "logits", row))

    # -- writing (stage one) ------------------------------------------------------------------------

    def add_teacher(self, name: str, *, spec: dict[str, Any], checkpoint_sha256: str | None, dtype: str) -> bool:
        """Create teachers/<name> (empty, incomplete); returns False if it already exists.

        Built in a staging folder and renamed into place, so racing processes see all of it or none.
        The caller checks an existing teacher's checkpoint and dtype (see `teacher`).
        """
        self._require_writable()
        if dtype not in STORAGE:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        target = self.path / "teachers" / name
        if (target / "zarr.json").is_file():
            return False
        stored, _, fill = STORAGE[dtype]
        tmp = _staging_dir(self.path)
        try:
            attrs = {"spec": spec, "checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "complete": False, "stats": {}}
            group = zarr.open_group(tmp, mode="w", attributes=attrs)
            group.create_array(
                "logits",
                shape=(self.num_rows, self.num_classes),
                chunks=(self.chunk_rows, self.num_classes),
                dtype=stored,
                fill_value=fill,
                compressors=None,  # dense logits barely compress (~1.09x) and decompression slows reads 2-4x
                attributes={"logical_dtype": dtype},
                dimension_names=["row", "class"],
            )
            group.create_array(
                "done",
                shape=(self.num_blocks,),
                chunks=(1,),  # one file per block: concurrent writers never share a record
                dtype="uint8",
                fill_value=0,
                compressors=None,
                dimension_names=["block"],
            )
            return _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_block(self, name: str, block: int, logits: torch.Tensor | np.ndarray) -> None:
        """Write one whole block of logits (in the teacher's logical dtype), then its completion record.

        The block is one chunk file, written whole: to a temporary file, flushed to disk, renamed into
        place. Only then is the record written, so a record never points at data a crash could lose.
        The chunk is the plain little-endian bytes of the (chunk_rows, V) array (the store's arrays
        have no other codec; zarr reads it back), written directly: through zarr's async machinery one
        small chunk costs ~1.6 ms of CPU, taken from the teachers on a small machine.
        """
        self._require_writable()
        start, stop = self.block_range(block)
        dtype = self._logical_dtype(name)
        raw = _to_storage(logits, dtype)
        if raw.shape != (stop - start, self.num_classes):
            raise ValueError(f"block {block} of {name!r} needs shape {(stop - start, self.num_classes)}, got {raw.shape}")
        stored, _, fill = STORAGE[dtype]
        if stop - start < self.chunk_rows:  # the last block: zarr stores edge chunks padded to full size
            padded = np.full((self.chunk_rows, self.num_classes), fill, dtype=stored)
            padded[: stop - start] = raw
            raw = padded
        payload = np.ascontiguousarray(raw, dtype=stored.newbyteorder("<"))
        logits_array, done_array = self._raw_array(f"teachers/{name}/logits"), self._raw_array(f"teachers/{name}/done")
        folder = self.path / "teachers" / name
        _write_file(folder / "logits" / logits_array.metadata.encode_chunk_key((block, 0)), memoryview(payload).cast("B"), durable=True)
        # Synced too: a record that a crash could turn into an empty file must not depend on the file
        # system's mount options for what it says (one more fsync per block, small beside the chunk's).
        _write_file(folder / "done" / done_array.metadata.encode_chunk_key((block,)), b"\x01", durable=True)

    def mark_complete(self, name: str, stats: dict[str, Any]) -> None:
        """Record that every block of `name` is written, with its stats. Idempotent: same bytes each time."""
        self._require_writable()
        missing = self.missing_blocks(name)
        if missing:
            raise IncompleteStoreError(f"store {str(self.path)!r}: teacher {name!r} still misses blocks {missing[:5]}")
        folder = self.path / "teachers" / name
        # Temporary files of writers killed mid-write ("<key>.<hex>.partial", renamed when whole):
        # nobody writes the blocks of a teacher whose blocks are all recorded. A racing process that
        # is finishing the same teacher may lose its temporary zarr.json here; it writes it again.
        for leftover in folder.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        attrs = {"complete": True, "stats": _json_safe(stats)}

        def write_attrs() -> None:
            zarr.open_group(folder, mode="r+").attrs.update(attrs)

        _retry_if_vanished(write_attrs)

    def drop_block(self, name: str, block: int) -> None:
        """Forget a (damaged) block: its record first, then its chunk of every array, so that
        `mtkd infer` recomputes it. Used by `mtkd verify --repair`."""
        self._require_writable()
        self.block_range(block)
        folder = self.path / "teachers" / name
        (folder / "done" / self._array(f"teachers/{name}/done").metadata.encode_chunk_key((block,))).unlink(missing_ok=True)
        for child in sorted(folder.iterdir()):
            if child.name != "done" and (child / "zarr.json").is_file():
                array = self._array(f"teachers/{name}/{child.name}")
                key = array.metadata.encode_chunk_key((block,) + (0,) * (len(array.shape) - 1))
                (child / key).unlink(missing_ok=True)

    def mark_incomplete(self, name: str) -> None:
        """Clear `complete` and the stats (they described data now dropped), as a new teacher has them."""
        self._require_writable()
        self._require_teacher(name)
        zarr.open_group(self.path / "teachers" / name, mode="r+").attrs.update({"complete": False, "stats": {}})

    # -- internals ----------------------------------------------------------------------------------

    def _array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            mode = "r+" if self.mode == "r+" else "r"
            self._arrays[key] = zarr.open_array(self.path / key, mode=mode)
        return self._arrays[key]

    def _raw_array(self, key: str) -> zarr.Array:
        """An array whose chunks are plain little-endian bytes (checked), for writing chunk files directly."""
        array = self._array(key)
        codecs = array.metadata.codecs
        if len(codecs) != 1 or type(codecs[0]).__name__ != "BytesCodec" or getattr(codecs[0].endian, "value", None) not in ("little", None):
            raise StoreMismatchError(f"store {str(self.path)!r}: {key} is not stored as plain bytes (codecs {codecs})")
        return array

    def _logical_dtype(self, name: str) -> str:
        self._require_teacher(name)
        array = self._array(f"teachers/{name}/logits")
        logical = array.attrs.get("logical_dtype")
        # Bits read as another dtype of the same size would be garbage, never an error: refuse them.
        if logical not in STORAGE or STORAGE[logical][0] != np.dtype(array.dtype):
            raise CorruptStoreError(
                f"store {str(self.path)!r}: teacher {name!r} says logical_dtype {logical!r} but its logits are stored as "
                f"{np.dtype(array.dtype)}; run `mtkd verify {self.path} --repair`"
            )
        return logical

    def _require_teacher(self, name: str) -> None:
        if not (self.path / "teachers" / name / "zarr.json").is_file():
            raise BadInputError(f"store {str(self.path)!r} has no teacher {name!r} (it has: {', '.join(self.teachers) or 'none'})")

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise PermissionError(f"store {str(self.path)!r} is open read-only")


# The exponent bits of each stored dtype: all ones is inf or NaN.
_EXPONENT = {"float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80), "float32": (np.uint32, 0x7F800000)}


def nonfinite_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """(rows,) bool: rows of stored values (`dtype` logical) holding NaN/inf, by their exponent bits."""
    bits, mask = _EXPONENT[dtype]
    values = np.ascontiguousarray(raw).view(bits)
    bad = (values & mask) == mask
    return bad.any(axis=tuple(range(1, bad.ndim))) if bad.ndim > 1 else bad


def nonfinite_message(path: Path, name: str, block: int, what: str, row: int) -> str:
    """The one line every reader gives for a NaN/inf in a recorded block (`mtkd verify` repairs it)."""
    return (
        f"store {str(path)!r}: teacher {name!r}, block {block}: {what} hold NaN/inf (row {row}); "
        f"run `mtkd verify {path} --repair`, then `mtkd infer` again"
    )


def _to_storage(logits: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Logits in their logical dtype -> the numpy array Zarr stores (bfloat16 as its uint16 bits)."""
    stored, torch_dtype, _ = STORAGE[dtype]
    if isinstance(logits, np.ndarray):
        if logits.dtype != stored:
            raise TypeError(f"expected {stored} for {dtype} logits, got {logits.dtype}")
        return logits
    if logits.dtype != torch_dtype:
        raise TypeError(f"expected {torch_dtype} logits, got {logits.dtype}")
    logits = logits.detach().cpu().contiguous()
    if dtype == "bfloat16":
        # A view, not a conversion: the 16 bits go to disk exactly as they are.
        return logits.view(torch.int16).numpy().view(np.uint16)
    return logits.numpy()


def _from_storage(raw: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def _staging_dir(path: Path) -> Path:
    # Before making a new one, remove those of creators that were killed (staging.py says how).
    remove_stale(path)
    return staging_dir(path)


def _publish(tmp: Path, target: Path) -> bool:
    """Rename `tmp` onto `target`; False if another process got there first (target not empty)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if target.is_dir() and any(target.iterdir()):
            return False
        raise
    return True


def _write_file(path: Path, payload: bytes | memoryview, *, durable: bool) -> None:
    """Replace `path` atomically (temporary file, then rename), like zarr's LocalStore.

    durable: the bytes are on disk before the rename. The folder is not synced: journaling file
    systems commit renames in order, so a later record's rename never survives a crash that this
    one does not, and a lost pair only means the block is computed again.
    """

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # zarr's naming for the same
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):  # os.fsync's error names no file: name the one being written
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    _retry_if_vanished(write)


def _retry_if_vanished(write, attempts: int = 3) -> None:
    """Run a zarr write again if its temporary file was removed under it (see mark_complete)."""
    for attempt in range(attempts):
        try:
            return write()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def _json_safe(value: Any) -> Any:
    # Zarr attributes are JSON: NaN (a metric without labelled rows) is stored as null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value
