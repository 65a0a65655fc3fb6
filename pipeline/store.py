"""The store: one Zarr v3 group holding what every teacher said about one data set (SPEC "Store").

    STORE/                        attrs["mtkd"]: format=2, kind "rows"|"tokens", num_rows, num_classes,
                                  chunk_rows, dataset{spec, fingerprint}
      labels                      (N,) int64: class (rows) or next token (tokens); -100 where none
      sequences/offsets           (S + 1,) int64, tokens only: sequence i is rows offsets[i]..offsets[i+1]-1
      teachers/<name>             attrs: spec, weights_sha256, layout, dtype, vocab_size, top_k,
                                  temperatures, complete, stats
      teachers/<name>/<array>     the layout's arrays (layouts.py): dense `logits`, or `topk_ids`,
                                  `topk_logprobs`, `lse`, `label_logprob`
      teachers/<name>/block_stats (num_blocks, S) float64: the sums each block adds to the teacher's stats
      teachers/<name>/done        (num_blocks,) uint8: 1 once the block's rows are written (one file per block)

This module knows blocks, records, chunks and checksums; what the arrays hold is the layout's.
Rows are grouped into blocks of `chunk_rows` rows; one block is one chunk of every array of every
teacher (whole rows), so stage two reads the same rows of K teachers as K whole chunks each.

Why it is built this way:
- A block is only ever written whole, by one writer: Zarr loses data silently when two processes write
  parts of the same chunk. Shards are sets of blocks.
- Completion is one object per block (`done`, chunks of one element, i.e. one file each), written after
  the block's data and its stats sums are on disk. Writers never rewrite a shared object, so none can
  lose another's record; a block without its record is simply computed again. The teacher's
  `complete` and `stats` attributes are derived from the records by whoever sees the last one,
  idempotently (the same bytes every time: the sums are added in block order).
- Every array's chunks end in zarr's crc32c checksum (Crc32cCodec), so a damaged chunk is an error
  on read, never data. Floats are filled with NaN (bfloat16: the bits of a bfloat16 NaN), ids with
  -1, so a row never written cannot pass as data.
- Creation is atomic: a store (or a teacher added to one) is built in a hidden sibling folder and
  renamed into place. When several processes start together one rename wins; the others find the
  winner's store and check that it is the one they would have made.

Every file is written to a temporary file and renamed into place (zarr's LocalStore does this for
metadata; `write_block` does it for chunks and records, which it encodes with the arrays' own zarr
codecs and writes directly: through zarr's async machinery one small chunk costs ~1.6 ms of CPU), so
a process killed at any moment leaves either the old or the new file, never half of one.

Format-1 stores (dense rows, no checksums, `weights_sha256`) open, inspect and train as before;
they are not written to.
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
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from mtkd.pipeline.data import Data
from mtkd.pipeline.errors import BadInputError, CorruptStoreError, IncompleteStoreError, StoreMismatchError
from mtkd.pipeline.layouts import Dense, Layout, SparseRows, TopK, layout_from_attrs
from mtkd.pipeline.staging import remove_stale, staging_dir

FORMAT = 2
READABLE_FORMATS = (1, 2)
KINDS = ("rows", "tokens")
TARGET_CHUNK_BYTES = 2 << 20  # uncompressed bytes of a chunk of the largest array: 1-4 MiB
LABEL_CHUNK_ROWS = 1 << 17  # 1 MiB of int64 labels per chunk


def default_chunk_rows(row_bytes: int, num_rows: int) -> int:
    """Rows per block: the largest power of two whose rows of `row_bytes` fit TARGET_CHUNK_BYTES.

    Capped at `num_rows`, so a small store is one small chunk rather than one padded 2 MiB file.
    """
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    return max(1, min(1 << (rows.bit_length() - 1), num_rows))


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher's attributes, as stored."""

    name: str
    spec: dict[str, Any]
    weights_sha256: str | None
    layout: Dense | TopK
    complete: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        """The logical dtype of its 16/32-bit values: "float16" | "bfloat16" | "float32"."""
        return self.layout.dtype


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
    if meta.get("format") not in READABLE_FORMATS:
        raise StoreMismatchError(
            f"store {str(path)!r} has format {meta.get('format')!r}; this mtkd reads formats {', '.join(map(str, READABLE_FORMATS))}"
        )
    if mode == "r+" and meta["format"] != FORMAT:
        raise StoreMismatchError(
            f"store {str(path)!r} has format {meta['format']}; this mtkd reads it but writes only format {FORMAT} stores: "
            "write the teachers into a new store"
        )
    return LogitStore(path, meta, mode)


def create_store(path: str | os.PathLike, *, data: Data, num_classes: int, chunk_rows: int) -> tuple[LogitStore, bool]:
    """Create an empty store for `data` (labels and sequences written, no teachers), or find the one
    a racer made.

    Returns (store opened "r+", whether this call created it). A store already at `path` (made by a
    process that started at the same time) is accepted only if it holds the same data and class count.
    """
    path = Path(path)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = data.num_rows
    meta = {
        "format": FORMAT,
        "kind": data.kind,
        "num_rows": n,
        "num_classes": int(num_classes),
        "chunk_rows": int(chunk_rows),
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
    }
    tmp = _staging_dir(path)
    try:
        root = zarr.open_group(tmp, mode="w", attributes={"mtkd": meta})
        labels = root.create_array(
            "labels", shape=(n,), chunks=(min(n, LABEL_CHUNK_ROWS),), dtype="int64", fill_value=-100,
            compressors=[Crc32cCodec()], dimension_names=["row"],
        )
        labels[...] = data.labels
        if data.kind == "tokens":
            offsets = root.create_group("sequences").create_array(
                "offsets", shape=data.offsets.shape, chunks=(min(len(data.offsets), LABEL_CHUNK_ROWS),), dtype="int64",
                fill_value=-1, compressors=[Crc32cCodec()], dimension_names=["sequence_boundary"],
            )
            offsets[...] = data.offsets
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
        self.format: int = int(meta["format"])
        self.kind: str = meta.get("kind", "rows")
        self.num_rows: int = int(meta["num_rows"])
        self.num_classes: int = int(meta["num_classes"])
        self.chunk_rows: int = int(meta["chunk_rows"])
        self.num_blocks: int = math.ceil(self.num_rows / self.chunk_rows)
        self.fingerprint: str = meta["dataset"]["fingerprint"]
        self.dataset_spec: str = meta["dataset"]["spec"]
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, Dense | TopK] = {}

    # Picklable for DataLoader workers: zarr handles are reopened lazily on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrays = {}

    def __repr__(self) -> str:
        return f"LogitStore({str(self.path)!r}, {self.kind}, rows={self.num_rows}, classes={self.num_classes}, teachers={self.teachers})"

    # -- reading ------------------------------------------------------------------------------------

    @property
    def teachers(self) -> list[str]:
        """Names of the teachers in the store, sorted."""
        folder = self.path / "teachers"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())

    def labels(self) -> np.ndarray:
        """(N,) int64: class or next token, -100 where none."""
        return np.asarray(self._array("labels")[...], dtype=np.int64)

    def offsets(self) -> np.ndarray:
        """(num_seqs + 1,) int64 (token stores): sequence i is rows offsets[i] .. offsets[i + 1] - 1."""
        if self.kind != "tokens":
            raise BadInputError(f"store {str(self.path)!r} holds {self.kind}, not token sequences")
        return np.asarray(self._array("sequences/offsets")[...], dtype=np.int64)

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
        if "dtype" not in attrs:
            raise StoreMismatchError(f"store {str(self.path)!r}: teacher {name!r} has no dtype attribute")
        return TeacherInfo(
            name=name,
            spec=attrs.get("spec") or {},
            weights_sha256=attrs.get("weights_sha256", attrs.get("checkpoint_sha256")),  # format 1's name
            # v3 teachers store `entropy`; those written before do not (an optional array, SPEC "Store").
            layout=layout_from_attrs(attrs, self.num_classes, entropy=(self.path / "teachers" / name / "entropy" / "zarr.json").is_file()),
            complete=bool(attrs.get("complete", False)),
            stats=attrs.get("stats") or {},
        )

    def layout(self, name: str) -> Dense | TopK:
        """A teacher's layout (fixed once the teacher exists, so it is read once)."""
        if name not in self._layouts:
            self._layouts[name] = self.teacher(name).layout
        return self._layouts[name]

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

    def check_data(self, data: Data) -> None:
        """Raise StoreMismatchError unless `data` is the data set the store was made from."""
        if data.kind != self.kind:
            raise StoreMismatchError(
                f"store {str(self.path)!r} holds {self.kind} (from {self.dataset_spec!r}); data {data.spec!r} is {data.kind}"
            )
        if data.num_rows != self.num_rows or data.fingerprint != self.fingerprint:
            raise StoreMismatchError(
                f"store {str(self.path)!r} was made from data {self.dataset_spec!r} "
                f"({self.num_rows} rows, fingerprint {self.fingerprint[:12]}), not from {data.spec!r} "
                f"({data.num_rows} rows, fingerprint {data.fingerprint[:12]})"
            )

    def read(self, name: str, start: int, stop: int, *, only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every array of a teacher (or of the arrays named in `only`), as
        stored (checksums verified by zarr).

        A chunk that does not read (checksum mismatch, truncated, missing metadata), or bits declared
        another logical dtype, raises CorruptStoreError naming the teacher and the first bad block."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range (store has {self.num_rows})")
        out = {}
        for spec in self.layout(name).arrays():
            if only is not None and spec.name not in only:
                continue
            key = f"teachers/{name}/{spec.name}"
            try:
                array = self._array(key)
                self._check_logical_dtype(name, array, spec)
                out[spec.name] = np.ascontiguousarray(array[start:stop])
            except (ValueError, OSError) as e:  # Crc32cCodec: "Stored and computed checksum do not match"
                first, last = start // self.chunk_rows, max(stop - 1, start) // self.chunk_rows
                for block in range(first, last + 1) if first < last else ():
                    self.read(name, *self.block_range(block))  # raises naming the block that fails
                blocks = f"block {first}" if first == last else f"blocks {first}..{last}"
                raise CorruptStoreError(
                    f"store {str(self.path)!r}: teacher {name!r}, {blocks}: the {spec.name} do not read "
                    f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); run `mtkd verify {self.path}`"
                ) from e
            if spec.name in FINITE_ARRAYS:
                self._require_finite(name, start, out[spec.name], spec.logical_dtype or "float32", spec.name)
        return out

    def _require_finite(self, name: str, start: int, raw: np.ndarray, dtype: str, what: str) -> None:
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
            raise CorruptStoreError(nonfinite_message(self.path, name, damaged[0], what, row))

    def _check_logical_dtype(self, name: str, array: zarr.Array, spec: Any) -> None:
        # Bits read as another dtype of the same size would be garbage, never an error: refuse them.
        if spec.logical_dtype is None:
            return
        logical = array.attrs.get("logical_dtype")
        if logical != spec.logical_dtype or np.dtype(array.dtype) != spec.dtype:
            raise CorruptStoreError(
                f"store {str(self.path)!r}: teacher {name!r} says logical_dtype {logical!r} but its {spec.name} are stored as "
                f"{np.dtype(array.dtype)} and the teacher's dtype is {spec.logical_dtype}; run `mtkd verify {self.path} --repair`"
            )

    def read_logits(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a dense teacher's logits, (stop-start, V), in its logical dtype (bf16 bit-exact)."""
        layout = self.layout(name)
        if not isinstance(layout, Dense):
            raise BadInputError(f"store {str(self.path)!r}: teacher {name!r} is stored {layout.name}, not dense logits")
        return layout.decode(self.read(name, start, stop))

    def read_topk(self, name: str, start: int, stop: int, temperature: float = 1.0) -> SparseRows:
        """Rows [start, stop) of a top-k teacher: ids (n, k) int64, log-probabilities (n, k) float32
        at `temperature` (one of the stored ones), label log-probabilities (n,) float32 at T = 1."""
        layout = self.layout(name)
        if not isinstance(layout, TopK):
            raise BadInputError(f"store {str(self.path)!r}: teacher {name!r} is stored {layout.name}, not top-k")
        return layout.decode(self.read(name, start, stop), temperature)

    def read_entropy(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a teacher's stored entropies at T = 1, (stop-start,) float32 (v3 teachers)."""
        if not self.layout(name).entropy:
            raise BadInputError(f"store {str(self.path)!r}: teacher {name!r} stores no entropies (written before mtkd stored them)")
        return torch.from_numpy(self.read(name, start, stop, only=("entropy",))["entropy"])

    def block_stats(self, name: str) -> np.ndarray:
        """(num_blocks, S) float64: each recorded block's stats sums (rows of unwritten blocks: NaN)."""
        return np.asarray(self._array(f"teachers/{name}/block_stats")[...])

    # -- writing (stage one) ------------------------------------------------------------------------

    def add_teacher(self, name: str, *, spec: dict[str, Any], weights_sha256: str | None, layout: Layout, stats_width: int) -> bool:
        """Create teachers/<name> (empty, incomplete) with `layout`'s arrays; False if it already exists.

        Built in a staging folder and renamed into place, so racing processes see all of it or none.
        The caller checks an existing teacher's weights and layout (see `teacher`).
        """
        self._require_writable()
        target = self.path / "teachers" / name
        if (target / "zarr.json").is_file():
            return False
        tmp = _staging_dir(self.path)
        try:
            attrs = {"spec": spec, "weights_sha256": weights_sha256, **layout.attrs(), "complete": False, "stats": {}}
            group = zarr.open_group(tmp, mode="w", attributes=attrs)
            for a in layout.arrays():
                group.create_array(
                    a.name,
                    shape=(self.num_rows, *a.row_shape),
                    chunks=(self.chunk_rows, *a.row_shape),
                    dtype=a.dtype,
                    fill_value=a.fill,
                    compressors=a.codecs(),
                    attributes={"logical_dtype": a.logical_dtype} if a.logical_dtype else {},
                    dimension_names=list(a.dims),
                )
            group.create_array(
                "block_stats", shape=(self.num_blocks, stats_width), chunks=(1, stats_width), dtype="float64",
                fill_value=float("nan"), compressors=[Crc32cCodec()], dimension_names=["block", "sum"],
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

    def write_block(self, name: str, block: int, arrays: dict[str, np.ndarray], stats: np.ndarray) -> None:
        """Write one whole block of every array of `name` and its stats sums, then its completion record.

        Each chunk is encoded by the array's own zarr codecs (compressor, then crc32c), written to a
        temporary file, flushed to disk and renamed into place. Only then is the record written, so
        a record never points at data a crash could lose.
        """
        self._require_writable()
        start, stop = self.block_range(block)
        folder = self.path / "teachers" / name
        specs = self.layout(name).arrays()
        if set(arrays) != {a.name for a in specs}:
            raise ValueError(f"block {block} of {name!r} needs arrays {sorted(a.name for a in specs)}, got {sorted(arrays)}")
        for a in specs:
            values = arrays[a.name]
            if values.shape != (stop - start, *a.row_shape) or values.dtype != a.dtype:
                raise ValueError(
                    f"block {block} of {name!r}: {a.name} needs {(stop - start, *a.row_shape)} {a.dtype}, got {values.shape} {values.dtype}"
                )
            self._write_chunk(folder, a.name, (block,) + (0,) * len(a.row_shape), values, durable=True)
        self._write_chunk(folder, "block_stats", (block, 0), np.asarray(stats, dtype=np.float64)[None], durable=True)
        # Synced too: a record that a crash could turn into an empty file must not depend on the file
        # system's mount options for what it says (one more fsync per block, small beside the chunks').
        done = self._array(f"teachers/{name}/done")
        _write_file(folder / "done" / done.metadata.encode_chunk_key((block,)), b"\x01", durable=True)

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
        """Forget a (damaged) block: its record first, then its chunk of every array (stats sums
        included), so that `mtkd infer` recomputes it. Used by `mtkd verify --repair`."""
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

    def _write_chunk(self, folder: Path, key: str, coords: tuple[int, ...], values: np.ndarray, *, durable: bool) -> None:
        """Encode one whole chunk with the array's codecs (zarr's own) and write it atomically."""
        array = self._array(f"teachers/{folder.name}/{key}")
        chunk_shape = array.metadata.chunk_grid.chunk_shape
        if values.shape != chunk_shape:  # the last block: zarr stores edge chunks padded to full size
            padded = np.full(chunk_shape, array.metadata.fill_value, dtype=values.dtype)
            padded[tuple(slice(0, n) for n in values.shape)] = values
            values = padded
        _write_file(folder / key / array.metadata.encode_chunk_key(coords), _encode(array, coords, values), durable=durable)

    def _array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            mode = "r+" if self.mode == "r+" else "r"
            self._arrays[key] = zarr.open_array(self.path / key, mode=mode)
        return self._arrays[key]

    def _require_teacher(self, name: str) -> None:
        if not (self.path / "teachers" / name / "zarr.json").is_file():
            raise BadInputError(f"store {str(self.path)!r} has no teacher {name!r} (it has: {', '.join(self.teachers) or 'none'})")

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise PermissionError(f"store {str(self.path)!r} is open read-only")


# Arrays whose every recorded value is finite (label_logprob is NaN by design where there is no label).
FINITE_ARRAYS = ("logits", "topk_logprobs", "lse", "entropy")
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


def _encode(array: zarr.Array, coords: tuple[int, ...], values: np.ndarray) -> memoryview:
    """One chunk's bytes exactly as zarr would write them: the array's own codecs in order (filters,
    bytes, compressors, crc32c), each through its synchronous encoder (zarr's async pipeline costs
    more CPU per small chunk than the encoding itself)."""
    async_array = array._async_array
    spec = async_array.metadata.get_chunk_spec(coords, async_array.config, default_buffer_prototype())
    data: Any = default_buffer_prototype().nd_buffer.from_numpy_array(values)
    for codec in array.metadata.codecs:
        encode = getattr(codec, "_encode_sync", None)
        data = encode(data, spec) if encode is not None else zarr_sync(codec._encode_single(data, spec))
        spec = codec.resolve_metadata(spec)
    return memoryview(data.as_numpy_array()).cast("B")


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
