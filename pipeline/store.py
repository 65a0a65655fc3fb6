"""The store: one Zarr v3 group holding what every teacher said about one data set (SPEC "Store").

    STORE/                        attrs["mtkd"]: format=2, kind "rows"|"tokens", num_rows, num_classes,
                                  chunk_rows, dataset{spec, fingerprint}
      labels                      (N,) int64: class (rows) or next token (tokens); -100 where none
      targets                     v3, regression rows only: (N, D) float32 targets, NaN where unknown
      sequences/offsets           (S + 1,) int64, tokens only: sequence i is rows offsets[i]..offsets[i+1]-1
      teachers/<name>             attrs: spec, weights_sha256, layout, dtype, vocab_size, top_k,
                                  temperatures, complete, stats
      teachers/<name>/<array>     the layout's arrays (layouts.py): dense `logits`, or `topk_ids`,
                                  `topk_logprobs`, `lse`, `label_logprob`
      teachers/<name>/block_stats (num_blocks, S) float64: the sums each block adds to the teacher's stats
      teachers/<name>/done        (num_blocks,) str: each block's completion record, a JSON document (one
                                  file per block, "" where none; an earlier mtkd's: uint8 1, "unbound")

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
- A block's record binds its chunks to their place (`block_record`): the block's index and rows, the
  store's data (fingerprint), the teacher (digest of its spec and weights), its layout attributes
  (layout, dtype, vocab_size, top_k, temperatures: stored, so that repair can restore an edited one),
  digests of the block's input rows, labels and sequence boundaries, and each chunk's length and the
  crc32c it ends with. Every reader checks each chunk it reads against the record (the bytes in hand:
  no second pass), and the labels and offsets against the records' digests: a chunk copied from
  another block or store, swapped, or labels of other data are errors, never data.
- Opening checks the structure (`structure_problems`, metadata and records only): num_rows,
  chunk_rows, num_classes against the arrays; each teacher's layout attributes against its records
  and arrays. A contradiction is CorruptStoreError pointing at `mtkd verify --repair`.
- Every array's chunks end in zarr's crc32c checksum (Crc32cCodec), so a damaged chunk is an error
  on read, never data. Floats are filled with NaN (bfloat16: the bits of a bfloat16 NaN), ids with
  -1, so a row never written cannot pass as data.
- Creation is atomic: a store (or a teacher added to one) is built in a hidden sibling folder and
  renamed into place. When several processes start together one rename wins; the others find the
  winner's store and check that it is the one they would have made. On an object store (no rename)
  the same deterministic tree is uploaded create-only, its group's zarr.json last (storage.py).

Every file and object goes through storage.py (a local path or a URL: the one place they differ).
On a disk every file is written to a temporary file and renamed into place (zarr's LocalStore does this for
metadata; `write_block` does it for chunks and records, which it encodes with the arrays' own zarr
codecs and writes directly: through zarr's async machinery one small chunk costs ~1.6 ms of CPU), so
a process killed at any moment leaves either the old or the new file, never half of one.

Format-1 stores (dense rows, no checksums, `weights_sha256`) open, inspect and train as before;
they are not written to. Format-2 stores of an earlier mtkd (one-byte records) open, train and verify
as before: their records bind nothing ("unbound records"), so only their checksums are checked; a
teacher of theirs resumed keeps writing such records. The format stays 2: what changed is what a
record holds, and an earlier mtkd, which lists records and never reads them, still reads these stores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from mtkd.pipeline.layouts import FEATURES, STORAGE, Dense, Layout, SparseRows, TopK, Values, layout_from_attrs
from mtkd.pipeline import storage
from mtkd.pipeline.storage import zarr_store

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


def open_store(path: str | os.PathLike, *, mode: str = "r", check: bool = True) -> LogitStore:
    """Open an existing store for reading ("r") or for writing blocks and teachers ("r+").

    `check`: refuse (CorruptStoreError) a store whose attributes contradict its arrays or its
    completion records (`structure_problems`; cheap: metadata and records, no chunk is read).
    Only `mtkd verify` opens without, to report and repair what the check would refuse."""
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = storage.location(path)
    if not path.exists():
        raise BadInputError(f"store {str(path)!r} does not exist")
    if not (path / "zarr.json").is_file():
        raise StoreMismatchError(f"{str(path)!r} is not an mtkd store (no Zarr group there)")
    try:
        group = zarr.open_group(zarr_store(path), mode="r")
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
    store = LogitStore(path, meta, mode)
    if check:
        problems = structure_problems(store)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CorruptStoreError(f"{problems[0].message}{more}; run `mtkd verify {path} --repair`")
    return store


def half_created(path: Path | storage.ObjectPath) -> bool:
    """Whether `path` holds the start of a store whose creator was killed mid-upload: an object store
    (a disk's creator builds beside the store, so it leaves nothing there) with no group zarr.json,
    and nothing under it but what a creator uploads (labels, targets, sequences, teachers)."""
    if not storage.is_remote(path) or (path / "zarr.json").is_file():
        return False
    names = storage.list_names(path)
    return bool(names) and set(names) <= {"labels", TARGETS, "sequences", "teachers"}


def create_store(path: str | os.PathLike, *, data: Data, num_classes: int, chunk_rows: int) -> tuple[LogitStore, bool]:
    """Create an empty store for `data` (labels and sequences written, no teachers), or find the one
    a racer made.

    Returns (store opened "r+", whether this call created it). A store already at `path` (made by a
    process that started at the same time) is accepted only if it holds the same data and class count.
    """
    path = storage.location(path)
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

    def build(tmp: Path) -> None:  # deterministic: every creator of this store writes these same bytes (storage.create_once)
        root = zarr.open_group(tmp, mode="w", attributes={"mtkd": meta})
        labels = root.create_array(
            "labels", shape=(n,), chunks=(min(n, LABEL_CHUNK_ROWS),), dtype="int64", fill_value=-100,
            compressors=[Crc32cCodec()], dimension_names=["row"],
        )
        _write_data_chunks(tmp / "labels", labels, np.asarray(data.labels, dtype=np.int64))  # every chunk, even all -100
        if getattr(data, "regression", False):  # v3: the float targets beside the labels (all -100: no classes); every chunk, even all NaN
            root.create_array(
                TARGETS, shape=data.targets.shape, chunks=(min(n, LABEL_CHUNK_ROWS), data.num_outputs), dtype="float32",
                fill_value=float("nan"), compressors=[Crc32cCodec()], dimension_names=["row", "output"],
                config={"write_empty_chunks": True},
            )[...] = data.targets
        if data.kind == "tokens":
            offsets = root.create_group("sequences").create_array(
                "offsets", shape=data.offsets.shape, chunks=(min(len(data.offsets), LABEL_CHUNK_ROWS),), dtype="int64",
                fill_value=-1, compressors=[Crc32cCodec()], dimension_names=["sequence_boundary"],
            )
            _write_data_chunks(tmp / OFFSETS, offsets, data.offsets)
        root.create_group("teachers")

    created = storage.create_once(path, build, beside=path)
    store = open_store(path, mode="r+")
    store.check_data(data)  # also binds the blocks written through `store` to `data`
    if not created:
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
        self._records: dict[str, dict[int, dict[str, Any]]] = {}  # teacher -> block -> its record (read once)
        self._identities: dict[str, str] = {}  # teacher -> digest of its spec and weights
        self._source: Data | None = None  # the data, once `check_data` accepted it (stage one binds blocks to it)
        self._source_labels: np.ndarray | None = None
        self._checked_labels: np.ndarray | None = None  # labels() once read and checked against the records
        self._stored: tuple[np.ndarray, np.ndarray | None] | None = None  # labels, offsets as stored (writing without data)
        self._prefetched: dict[tuple[str, str, int], bytearray] = {}  # object stores: (teacher, array, block) -> chunk bytes (`prefetch`)

    # Picklable for DataLoader workers: zarr handles are reopened lazily on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_arrays", "_source", "_source_labels", "_stored", "_checked_labels", "_prefetched")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrays, self._source, self._source_labels, self._stored, self._checked_labels = {}, None, None, None, None
        self._prefetched = {}

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

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(N,) int64 (rows [start, stop) when given): class or next token, -100 where none. Every
        chunk must be there and read, and each block's labels must be those its teachers' completion
        records name (CorruptStoreError); checked once per opened store."""
        if self._checked_labels is None:
            values = self.stored_data("labels")
            self._check_data_digests("labels", values)
            self._checked_labels = values
        return self._checked_labels if start == 0 and stop is None else self._checked_labels[start:stop]

    @property
    def regression(self) -> bool:
        """A store of regression rows (v3): it has the `targets` array."""
        return (self.path / TARGETS / "zarr.json").is_file()

    def targets(self) -> np.ndarray:
        """(N, D) float32 regression targets, NaN where unknown (every chunk read, its crc32c checked)."""
        if not self.regression:
            raise BadInputError(f"store {str(self.path)!r} holds classification rows, not regression targets")
        try:
            return np.asarray(zarr.open_array(zarr_store(self.path / TARGETS), mode="r")[...], dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - the codec's checksum error, a missing chunk's file
            raise CorruptStoreError(f"store {str(self.path)!r}: the {TARGETS} array does not read ({type(e).__name__})") from e

    def offsets(self) -> np.ndarray:
        """(num_seqs + 1,) int64 (token stores): sequence i is rows offsets[i] .. offsets[i + 1] - 1.
        Checked like `labels`."""
        if self.kind != "tokens":
            raise BadInputError(f"store {str(self.path)!r} holds {self.kind}, not token sequences")
        values = self.stored_data(OFFSETS)
        self._check_data_digests(OFFSETS, values)
        return values

    def check_labels(self) -> None:
        """Raise CorruptStoreError unless the labels (and offsets) read whole and are those the records
        name (stage two trains on the data's own labels, but never from a store whose labels are damaged)."""
        self.labels()
        if self.kind == "tokens":
            self.offsets()

    def block_range(self, block: int) -> tuple[int, int]:
        """[start, stop) rows of one block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range (store has {self.num_blocks})")
        start = block * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_rows)

    def teacher(self, name: str) -> TeacherInfo:
        """The stored attributes of one teacher (read afresh: other processes may have updated them)."""
        self._require_teacher(name)
        attrs = dict(zarr.open_group(zarr_store(self.path / "teachers" / name), mode="r").attrs)
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
        # A killed writer may leave "<b>.<hex>.partial" behind (a disk's); only whole names count.
        return {int(p) for p in storage.list_names(folder) if p.isdigit() and int(p) < self.num_blocks}

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
        if getattr(data, "regression", False) != self.regression:
            held = "regression targets" if self.regression else "class labels"
            given = "float labels (regression)" if getattr(data, "regression", False) else "no float labels (classification)"
            raise StoreMismatchError(f"store {str(self.path)!r} holds {held}; data {data.spec!r} has {given}")
        if self.regression and data.num_outputs != self.num_classes:
            raise StoreMismatchError(f"store {str(self.path)!r} holds {self.num_classes} regression outputs; "
                                     f"data {data.spec!r} has {data.num_outputs}")
        self._source, self._source_labels = data, None  # blocks written from now on are bound to it

    def read(self, name: str, start: int, stop: int, *, only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every array of a teacher (or of the arrays named in `only`), as stored.

        Each recorded block's chunk is read as one file, checked against its completion record (its
        length and the crc32c it ends with: a chunk copied from another block or store, or swapped,
        is refused), then decoded by the array's codecs (the crc32c verified). A chunk that is missing,
        does not read or is not the recorded one, a NaN/inf, or bits declared another logical dtype,
        raises CorruptStoreError naming the teacher, the array and the first bad block. Rows of
        unrecorded blocks read as the fill (NaN / -1): never data."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) out of range (store has {self.num_rows})")
        blocks = range(start // self.chunk_rows, -(-stop // self.chunk_rows)) if stop > start else range(0)
        out, misplaced = {}, None
        specs = [spec for spec in self.layout(name).arrays() if only is None or spec.name in only]
        fetched = self._fetch(name, specs, blocks) if storage.is_remote(self.path) else {}
        for spec in specs:
            array = self._array(f"teachers/{name}/{spec.name}")
            self._check_logical_dtype(name, array, spec)
            parts = []
            for block in blocks:
                b0, b1 = self.block_range(block)
                values, wrong = self._read_chunk(name, spec.name, array, block, fetched.get((spec.name, block)))
                parts.append(values[max(start, b0) - b0 : min(stop, b1) - b0])
                if wrong is not None and misplaced is None:
                    misplaced = (block, wrong)
            out[spec.name] = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts)) if parts else (
                np.empty((0, *spec.row_shape), dtype=spec.dtype)
            )
            if spec.name in FINITE_ARRAYS or spec.name.startswith(FEATURES + "/"):
                self._require_finite(name, start, out[spec.name], spec.logical_dtype or "float32", spec.name)
        if misplaced is not None:  # after the finite checks: NaN written over a chunk is named as such
            raise CorruptStoreError(misplaced_message(self.path, name, *misplaced))
        return out

    def prefetch(self, names: list[str] | tuple[str, ...], start: int, stop: int) -> None:
        """On an object store, request at once every chunk that reading rows [start, stop) of the
        teachers `names` (read_logits / read_topk: all arrays but entropies and features) takes, so
        that K teachers cost one request latency, not K; the next `read` of each takes them from
        here. On a disk: nothing (a read is a local file)."""
        if not storage.is_remote(self.path) or stop <= start:
            return
        blocks = range(start // self.chunk_rows, -(-stop // self.chunk_rows))
        paths = {}
        for name in names:
            specs = [a for a in self.layout(name).arrays() if a.name != "entropy" and not a.name.startswith(FEATURES + "/")]
            paths.update({(name, *k): p for k, p in self._chunk_paths(name, specs, blocks).items()})
        got = storage.read_many(list(paths.values()))
        self._prefetched = {k: got[p] for k, p in paths.items() if p in got}

    def _chunk_paths(self, name: str, specs: list, blocks: range) -> dict[tuple[str, int], Any]:
        paths = {}
        for spec in specs:
            array = self._array(f"teachers/{name}/{spec.name}")
            for block in blocks:
                coords = (block,) + (0,) * (len(array.shape) - 1)
                paths[(spec.name, block)] = self.path / "teachers" / name / spec.name / array.metadata.encode_chunk_key(coords)
        return paths

    def _fetch(self, name: str, specs: list, blocks: range) -> dict[tuple[str, int], bytearray]:
        """On an object store, the chunks `read` is about to take: those `prefetch` holds, the rest
        requested all at once (several in flight: one request's latency each would dominate);
        (array, block) -> bytes, missing ones left out (the read names them)."""
        paths = self._chunk_paths(name, specs, blocks)
        # pop(key, None) on one dict: the loader's reader threads may prefetch (replace it) meanwhile.
        prefetched = self._prefetched
        have = {k: raw for k in paths if (raw := prefetched.pop((name, *k), None)) is not None}
        missing = {k: p for k, p in paths.items() if k not in have}
        got = storage.read_many(list(missing.values())) if missing else {}
        have.update({k: got[p] for k, p in missing.items() if p in got})
        return have

    def _read_chunk(self, name: str, key: str, array: zarr.Array, block: int, raw: bytearray | None = None) -> tuple[np.ndarray, str | None]:
        """One block's whole chunk of teachers/<name>/<key>, decoded, and why it is not the chunk its
        record names (None: it is, or the record is an earlier mtkd's, which names nothing). `raw`:
        its bytes when already fetched."""
        coords = (block,) + (0,) * (len(array.shape) - 1)
        record = self.record(name, block)
        path = self.path / "teachers" / name / key / array.metadata.encode_chunk_key(coords)
        try:
            raw = storage.read(path) if raw is None else raw
        except FileNotFoundError:
            if record is None:  # not written yet: the fill (NaN, -1), never data
                return np.full(array.metadata.chunk_grid.chunk_shape, array.metadata.fill_value, dtype=array.dtype), None
            raise CorruptStoreError(
                f"store {str(self.path)!r}: teacher {name!r}, block {block}: recorded, but its {key} chunk is missing; "
                f"run `mtkd verify {self.path} --repair`, then `mtkd infer` again"
            ) from None
        try:
            values = decode_chunk(array, coords, raw)
        except Exception as e:  # noqa: BLE001 - Crc32cCodec: "Stored and computed checksum do not match"; a wrong size
            raise CorruptStoreError(
                f"store {str(self.path)!r}: teacher {name!r}, block {block}: the {key} do not read "
                f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); run `mtkd verify {self.path}`"
            ) from e
        return values, self.binding_error(name, block, key, raw)

    # -- completion records: what binds a block's chunks to it -------------------------------------

    def record(self, name: str, block: int) -> dict[str, Any] | None:
        """The completion record of one block (see `block_record`); UNBOUND for one written by an
        earlier mtkd (one byte, naming nothing); None when the block is not recorded. Records are
        never rewritten (repair removes them), so each is read once."""
        cache = self._records.setdefault(name, {})
        if block not in cache:
            done = self._array(f"teachers/{name}/done")
            path = self.path / "teachers" / name / "done" / done.metadata.encode_chunk_key((block,))
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
            cache[block] = parse_record(done, block, raw, f"store {str(self.path)!r}: teacher {name!r}, block {block}", self.path)
        return cache[block]

    def records(self, name: str) -> dict[int, dict[str, Any]]:
        """Every recorded block's record (CorruptStoreError if one does not parse)."""
        return {block: record for block in sorted(self.done_blocks(name)) if (record := self.record(name, block)) is not None}

    def binding_error(self, name: str, block: int, key: str, raw: bytes | memoryview) -> str | None:
        """Why the chunk `raw` of array `key` is not the one block `block`'s record names (None: it is,
        or the record is unbound). Cheap: the record is in hand, the chunk's crc32c ends its bytes."""
        record = self.record(name, block)
        if record is None or record is UNBOUND:
            return None
        start, stop = self.block_range(block)
        if record.get("block") != block or record.get("rows") != [start, stop]:
            return f"its completion record is that of block {record.get('block')} (rows {record.get('rows')})"
        if record.get("store") != self.fingerprint:
            return f"its completion record comes from a store of other data (fingerprint {str(record.get('store'))[:12]})"
        if record.get("teacher") != self.identity(name):
            return "its completion record comes from another teacher (other spec or weights)"
        expected = record.get("chunks", {}).get(key)
        seen = [len(raw), _crc(raw)]
        if expected != seen:
            named = f"{expected[0]} bytes, crc32c {expected[1]:08x}" if isinstance(expected, list) and len(expected) == 2 else "no such chunk"
            return f"its {key} chunk ({seen[0]} bytes, crc32c {seen[1]:08x}) is not the one its record names ({named})"
        return None

    def identity(self, name: str) -> str:
        """A digest of the teacher's spec and weights' hash, as stored (what its records are bound to)."""
        if name not in self._identities:
            attrs = zarr.open_group(zarr_store(self.path / "teachers" / name), mode="r").attrs
            identity = {"spec": attrs.get("spec") or {}, "weights_sha256": attrs.get("weights_sha256")}
            self._identities[name] = _digest(json.dumps(identity, sort_keys=True).encode())
        return self._identities[name]

    def block_record(self, name: str, block: int, chunks: dict[str, bytes | memoryview]) -> dict[str, Any]:
        """What block `block` of `name` records once its `chunks` (array -> stored bytes) are durable:
        its index and rows, the store's data (fingerprint), the teacher (spec and weights), its layout
        attributes, digests of the block's input rows, labels and (tokens) sequence boundaries, and
        each chunk's length and crc32c. The same bytes whoever writes the block, however often."""
        start, stop = self.block_range(block)
        return {
            "block": block,
            "rows": [start, stop],
            "store": self.fingerprint,
            "teacher": self.identity(name),
            "layout": _jsonable(self.layout(name).attrs()),
            **self.data_digests(start, stop),
            "chunks": {key: [len(raw), _crc(raw)] for key, raw in sorted(chunks.items())},
        }

    def data_digests(self, start: int, stop: int) -> dict[str, str | None]:
        """Digests of rows [start, stop): "inputs" (the data's input rows or tokens; None without the
        data in hand), "labels", and "offsets" (tokens: the sequence boundaries in [start, stop]),
        from the data `check_data` accepted, else as stored."""
        data = self._source
        if data is None:  # a tool writing blocks without the data (write_logits_block): as stored, read once
            if self._stored is None:
                self._stored = (self.stored_data("labels"), self.stored_data(OFFSETS) if self.kind == "tokens" else None)
            return {"inputs": None, **_data_digests(*self._stored, start, stop)}
        if self._source_labels is None:
            self._source_labels = np.asarray(data.labels, dtype=np.int64)
        inputs = data.x[start:stop] if self.kind == "rows" else data.tokens[start:stop]
        offsets = data.offsets if self.kind == "tokens" else None
        return {"inputs": _digest(np.ascontiguousarray(inputs)), **_data_digests(self._source_labels, offsets, start, stop)}

    def stored_data(self, key: str) -> np.ndarray:
        """labels or sequences/offsets as stored (not checked against the records), chunk by chunk: each must be there (they are written whole with
        the store) and decode. A missing or damaged one raises CorruptStoreError naming it."""
        try:
            array = self._array(key)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing/broken array
            raise CorruptStoreError(f"store {str(self.path)!r}: the {key} array does not open ({type(e).__name__}); "
                                    f"run `mtkd verify {self.path} --repair`") from e
        (n,), (rows,) = array.shape, array.metadata.chunk_grid.chunk_shape
        parts = []
        for i in range(-(-n // rows)):
            path = self.path / key / array.metadata.encode_chunk_key((i,))
            what = f"store {str(self.path)!r}: {key} chunk {i} (entries {i * rows}..{min(n, (i + 1) * rows) - 1})"
            fix = f"run `mtkd verify {self.path} --repair`, then the same `mtkd infer`: it rewrites it from the data"
            try:
                parts.append(decode_chunk(array, (i,), storage.read(path)))
            except FileNotFoundError:
                raise CorruptStoreError(f"{what} is missing; {fix}") from None
            except Exception as e:  # noqa: BLE001 - the codec's checksum error, or a chunk of the wrong size
                raise CorruptStoreError(f"{what} does not read ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); {fix}") from e
        return np.concatenate(parts)[:n].astype(np.int64, copy=False) if parts else np.empty(0, dtype=np.int64)

    @staticmethod
    def data_digest(key: str, values: np.ndarray, start: int, stop: int) -> str:
        """The digest a record holds of rows [start, stop) of the labels, or of the offsets in it."""
        return (_offsets_digest if key == OFFSETS else _labels_digest)(values, start, stop)

    def _check_data_digests(self, key: str, values: np.ndarray) -> None:
        """Each recorded block's labels (or offsets), as stored, must be those its bound records name."""
        field_name = "offsets" if key == OFFSETS else "labels"
        digests: dict[int, str | None] = {}
        for name in self.teachers:
            for block, record in self.records(name).items():
                if record is UNBOUND:
                    continue
                start, stop = self.block_range(block)
                if block not in digests:
                    digests[block] = self.data_digest(key, values, start, stop)
                if record.get(field_name) != digests[block]:
                    raise CorruptStoreError(
                        f"store {str(self.path)!r}: the {key} of block {block} (rows {start}..{stop - 1}) are not those teacher "
                        f"{name!r}'s completion record names (copied from other data?); run `mtkd verify {self.path} --repair`, "
                        "then the same `mtkd infer` rewrites them"
                    )

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
        return layout.decode(self.read(name, start, stop, only=("logits",)))  # entropies: read_entropy, when a fusion asks

    def read_values(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a regression teacher's outputs, (stop-start, D) float32 (v3 layout "values")."""
        layout = self.layout(name)
        if not isinstance(layout, Values):
            raise BadInputError(f"store {str(self.path)!r}: teacher {name!r} is stored {layout.name}, not values")
        return layout.decode(self.read(name, start, stop, only=("values",)))

    def read_topk(self, name: str, start: int, stop: int, temperature: float = 1.0) -> SparseRows:
        """Rows [start, stop) of a top-k teacher: ids (n, k) int64, log-probabilities (n, k) float32
        at `temperature` (one of the stored ones), label log-probabilities (n,) float32 at T = 1."""
        layout = self.layout(name)
        if not isinstance(layout, TopK):
            raise BadInputError(f"store {str(self.path)!r}: teacher {name!r} is stored {layout.name}, not top-k")
        # Every array but the entropies (read_entropy, only when a fusion asks): none read for nothing per batch.
        needed = tuple(a.name for a in layout.arrays() if a.name != "entropy")
        return layout.decode(self.read(name, start, stop, only=needed), temperature)

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

        def build(tmp: Path) -> None:  # deterministic: racers adding this teacher write the same bytes
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
                dtype=str,  # each record a JSON document (`block_record`); "" where a block is not recorded
                fill_value="",
                compressors=None,
                dimension_names=["block"],
            )

        return storage.create_once(target, build, beside=self.path)

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
        chunks: dict[str, memoryview] = {}  # array -> the bytes written, which the record binds
        if set(arrays) != {a.name for a in specs}:
            raise ValueError(f"block {block} of {name!r} needs arrays {sorted(a.name for a in specs)}, got {sorted(arrays)}")
        for a in specs:
            values = arrays[a.name]
            if values.shape != (stop - start, *a.row_shape) or values.dtype != a.dtype:
                raise ValueError(
                    f"block {block} of {name!r}: {a.name} needs {(stop - start, *a.row_shape)} {a.dtype}, got {values.shape} {values.dtype}"
                )
            chunks[a.name] = self._write_chunk(folder, a.name, (block,) + (0,) * len(a.row_shape), values, durable=True)
        chunks["block_stats"] = self._write_chunk(folder, "block_stats", (block, 0), np.asarray(stats, dtype=np.float64)[None], durable=True)
        # Synced too: a record that a crash could turn into an empty file must not depend on the file
        # system's mount options for what it says (one more fsync per block, small beside the chunks').
        done = self._array(f"teachers/{name}/done")
        if done.dtype.kind == "u":  # a teacher made by an earlier mtkd: its records stay one byte (unbound)
            payload: bytes | memoryview = b"\x01"
        else:
            text = json.dumps(self.block_record(name, block, chunks), sort_keys=True, separators=(",", ":"))
            payload = _encode(done, (block,), np.array([text], dtype=object))
        storage.write(folder / "done" / done.metadata.encode_chunk_key((block,)), payload, durable=True)

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
        # (An object store has none: a PUT is whole or absent.)
        for leftover in folder.rglob("*.partial") if not storage.is_remote(folder) else ():
            leftover.unlink(missing_ok=True)
        attrs = {"complete": True, "stats": _json_safe(stats)}

        def write_attrs() -> None:
            zarr.open_group(zarr_store(folder, "r+"), mode="r+").attrs.update(attrs)

        storage.retry_if_vanished(write_attrs)

    def drop_block(self, name: str, block: int) -> None:
        """Forget a (damaged) block: its record first, then its chunk of every array (stats sums
        included), so that `mtkd infer` recomputes it. Used by `mtkd verify --repair`."""
        self._require_writable()
        self.block_range(block)
        folder = self.path / "teachers" / name
        (folder / "done" / self._array(f"teachers/{name}/done").metadata.encode_chunk_key((block,))).unlink(missing_ok=True)
        self._records.get(name, {}).pop(block, None)
        for child in row_array_folders(folder):
            if child != folder / "done":
                array = self._array(f"teachers/{name}/{child.relative_to(folder).as_posix()}")
                key = array.metadata.encode_chunk_key((block,) + (0,) * (len(array.shape) - 1))
                (child / key).unlink(missing_ok=True)

    def mark_incomplete(self, name: str) -> None:
        """Clear `complete` and the stats (they described data now dropped), as a new teacher has them."""
        self._require_writable()
        self._require_teacher(name)
        zarr.open_group(zarr_store(self.path / "teachers" / name, "r+"), mode="r+").attrs.update({"complete": False, "stats": {}})

    def restore_data(self, data: Data) -> list[str]:
        """Write the labels and (tokens) offsets chunks that are missing (dropped by `mtkd verify
        --repair`) from `data`, which `check_data` accepted; returns what was written. Stage one
        calls it on every run, so that the same `mtkd infer` rewrites them."""
        self._require_writable()
        self.check_data(data)
        written = []
        for key, values in (("labels", np.asarray(data.labels, dtype=np.int64)), (OFFSETS, data.offsets if self.kind == "tokens" else None)):
            if values is not None:
                written += [f"{key} chunk {i}" for i in _write_data_chunks(self.path / key, self._array(key), values, only_missing=True)]
        return written

    def with_attrs(self, fixes: dict[str, Any]) -> LogitStore:
        """This store as if its root attributes held `fixes` (what the arrays prove), for judging the rest."""
        meta = {**dict(zarr.open_group(zarr_store(self.path), mode="r").attrs["mtkd"]), **fixes}
        return LogitStore(self.path, meta, self.mode)

    # -- internals ----------------------------------------------------------------------------------

    def _write_chunk(self, folder: Path, key: str, coords: tuple[int, ...], values: np.ndarray, *, durable: bool) -> memoryview:
        """Encode one whole chunk with the array's codecs (zarr's own) and write it atomically; returns its bytes."""
        array = self._array(f"teachers/{folder.name}/{key}")
        chunk_shape = array.metadata.chunk_grid.chunk_shape
        if values.shape != chunk_shape:  # the last block: zarr stores edge chunks padded to full size
            padded = np.full(chunk_shape, array.metadata.fill_value, dtype=values.dtype)
            padded[tuple(slice(0, n) for n in values.shape)] = values
            values = padded
        raw = _encode(array, coords, values)
        storage.write(folder / key / array.metadata.encode_chunk_key(coords), raw, durable=durable)
        return raw

    def _array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            mode = "r+" if self.mode == "r+" else "r"
            self._arrays[key] = zarr.open_array(zarr_store(self.path / key, mode), mode=mode)
        return self._arrays[key]

    def _require_teacher(self, name: str) -> None:
        if not (self.path / "teachers" / name / "zarr.json").is_file():
            raise BadInputError(f"store {str(self.path)!r} has no teacher {name!r} (it has: {', '.join(self.teachers) or 'none'})")

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise PermissionError(f"store {str(self.path)!r} is open read-only")


# -- the structural check at open ---------------------------------------------------------------------

PER_BLOCK_ARRAYS = ("block_stats", "done")  # one entry per block, not per row


@dataclass(frozen=True)
class Problem:
    """An attribute that contradicts the arrays or the completion records. `fix`: what the arrays
    and records prove it is (None: nothing proves it), for the store (teacher None) or a teacher."""

    message: str
    teacher: str | None = None
    fix: dict[str, Any] | None = None


def structure_problems(store: LogitStore) -> list[Problem]:
    """The store's attributes against its arrays' shapes and its completion records, without reading
    a chunk of data (metadata and the small records only): num_rows, chunk_rows and num_classes
    against the arrays; each teacher's layout attributes (layout, dtype, vocab_size, top_k,
    temperatures) against the layout its records name and its arrays' shapes and dtypes. Shared by
    every reader (`open_store`) and by `mtkd verify`, which repairs from the fixes."""
    problems = store_problems(store)
    fixes = {k: v for p in problems if p.fix for k, v in p.fix.items()}
    if any(p.fix is None for p in problems):
        return problems  # the store's own counts are unknown: its teachers cannot be judged against them
    checked = store.with_attrs(fixes) if fixes else store
    for name in checked.teachers:
        problems += teacher_problems(checked, name)
    return problems


def store_problems(store: LogitStore) -> list[Problem]:
    """num_rows against the labels and the teachers' rows, chunk_rows against the teachers' chunks,
    num_classes against the dense teachers' width; a count is proven when all the arrays agree on it."""
    where = f"store {str(store.path)!r}"
    try:
        labels = zarr.open_array(zarr_store(store.path / "labels"), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing/broken array
        return [Problem(f"{where}: the labels array does not open ({type(e).__name__})")]
    rows, chunks, widths = {int(labels.shape[0])}, set(), set()
    for name in store.teachers:
        try:
            arrays = list(zarr.open_group(zarr_store(store.path / "teachers" / name), mode="r").arrays())
        except Exception as e:  # noqa: BLE001
            return [Problem(f"{where}: teacher {name!r} does not open ({type(e).__name__})", name)]
        for key, array in arrays:
            if key in PER_BLOCK_ARRAYS:
                continue
            rows.add(int(array.shape[0]))
            chunks.add(int(array.metadata.chunk_grid.chunk_shape[0]))
            if key in ("logits", "values") and len(array.shape) == 2:
                widths.add(int(array.shape[1]))
    problems = []
    for attr, stated, seen, what in (
        ("num_rows", store.num_rows, rows, "the arrays' rows"),
        ("chunk_rows", store.chunk_rows, chunks, "the teachers' chunks"),
        ("num_classes", store.num_classes, widths, "the dense teachers' classes"),
    ):
        if seen and seen != {stated}:
            fix = {attr: next(iter(seen))} if len(seen) == 1 else None  # arrays that disagree: no fix
            problems.append(Problem(f"{where}: attribute {attr} is {stated} but {what} are {sorted(seen)}", fix=fix))
    return problems


def teacher_problems(store: LogitStore, name: str) -> list[Problem]:
    """A teacher's layout attributes against what its records name (every bound record names the
    layout it was written with) and what its arrays' shapes and dtypes show. The proof: the records'
    layout when they agree and the arrays fit it; else the arrays' widths (top_k, a dense vocab_size)
    and stored dtype. Unbound records (an earlier mtkd's) prove nothing; neither do arrays a sparse
    vocab_size or the temperatures' values."""
    where = f"store {str(store.path)!r}: teacher {name!r}"
    folder = store.path / "teachers" / name
    attrs = dict(zarr.open_group(zarr_store(folder), mode="r").attrs)
    arrays = {}  # the teacher's row arrays, whatever its layout declares
    for child in row_array_folders(folder):
        key = child.relative_to(folder).as_posix()
        if key not in PER_BLOCK_ARRAYS:
            try:
                arrays[key] = zarr.open_array(zarr_store(child), mode="r")
            except Exception as e:  # noqa: BLE001
                return [Problem(f"{where}: array {child.name} does not open ({type(e).__name__})", name)]
    try:
        named = {json.dumps(r["layout"], sort_keys=True) for r in store.records(name).values() if r is not UNBOUND and "layout" in r}
    except CorruptStoreError:
        named = set()  # a record that does not read: `mtkd verify` names it with its block
    if len(named) > 1:
        return [Problem(f"{where}: its completion records name {len(named)} different layouts", name)]
    proof = {}
    if named:
        recorded = json.loads(next(iter(named)))
        if _arrays_fit(recorded, arrays, store):
            proof = dict(recorded)
        else:
            return [Problem(f"{where}: its completion records name layout {recorded}, which its arrays do not have", name)]
    else:  # what the arrays alone show
        valued = next((a for a in arrays.values() if "logical_dtype" in a.attrs), None)
        if valued is not None and np.dtype(valued.dtype) in LOGICAL_OF_STORED:
            proof["dtype"] = LOGICAL_OF_STORED[np.dtype(valued.dtype)]
        if "logits" in arrays and len(arrays["logits"].shape) == 2:
            proof["vocab_size"] = int(arrays["logits"].shape[1])
        widths = {int(arrays[k].shape[1]) for k in ("topk_ids", "topk_logprobs") if k in arrays and len(arrays[k].shape) == 2}
        if len(widths) == 1:
            proof["top_k"] = widths.pop()
    problems = []
    fix = {k: v for k, v in proof.items() if _jsonable(attrs.get(k)) != v and not (k == "vocab_size" and v == store.num_classes and attrs.get(k) is None)}
    for k, v in fix.items():
        source = "its completion records name" if named else "its arrays hold"
        problems.append(Problem(f"{where}: attribute {k} is {attrs.get(k)!r} but {source} {v!r}", name, fix={k: v}))
    try:
        layout = layout_from_attrs({**attrs, **fix}, store.num_classes)
    except Exception as e:  # noqa: BLE001 - attributes that name no layout at all
        return problems + [Problem(f"{where}: its attributes describe no layout ({type(e).__name__}: {e})", name)]
    if not fix and not _arrays_fit(_jsonable(layout.attrs()), arrays, store):
        shapes = {k: tuple(a.shape[1:]) for k, a in arrays.items()}
        problems.append(Problem(f"{where}: its arrays' row shapes {shapes} are not those of its attributes' layout {layout}", name))
    return problems


def row_array_folders(folder: Path) -> list[Path]:
    """A teacher's array folders: its own, and those of its features/ group (v3)."""
    out = []
    for child in sorted(folder.iterdir()):
        if child.name == FEATURES and child.is_dir():
            out += [c for c in sorted(child.iterdir()) if (c / "zarr.json").is_file()]
        elif (child / "zarr.json").is_file():
            out.append(child)
    return out


# The logical dtype each stored dtype can only be (bfloat16 is kept bit-exact as uint16).
LOGICAL_OF_STORED = {np.dtype(stored): logical for logical, (stored, _, _) in STORAGE.items()}


def _arrays_fit(attrs: dict[str, Any], arrays: dict[str, zarr.Array], store: LogitStore) -> bool:
    """Whether the arrays there have the shapes and stored dtypes of the layout `attrs` describe."""
    try:
        layout = layout_from_attrs(attrs, store.num_classes)
    except Exception:  # noqa: BLE001
        return False
    for spec in layout.arrays():
        a = arrays.get(spec.name)
        if a is None or tuple(a.shape[1:]) != spec.row_shape or np.dtype(a.dtype) != spec.dtype:
            return False
    return True


# Arrays whose every recorded value is finite (label_logprob is NaN by design where there is no label).
FINITE_ARRAYS = ("logits", "topk_logprobs", "lse", "entropy", "tail_logprobs", "values")
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


# -- completion records and chunks, as bytes ----------------------------------------------------------

OFFSETS = "sequences/offsets"
TARGETS = "targets"  # v3: regression rows' float targets
UNBOUND: dict[str, Any] = {"unbound": True}  # a record written by mtkd before records were bound (b"\x01")


def parse_record(done: zarr.Array, block: int, raw: bytes, where: str, store: Path) -> dict[str, Any]:
    """A record file's bytes -> its record (UNBOUND for an earlier mtkd's one byte); CorruptStoreError
    when it is neither."""
    if done.dtype.kind == "u" and raw == b"\x01":
        return UNBOUND
    try:
        # zarr's vlen-utf8 bytes of one string: item count, then its byte length, both uint32 little-endian
        # (read here directly: through the codec machinery a record cost ~0.15 ms, most of an open's check).
        count, length = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
        if done.dtype.kind == "u" or count != 1 or len(raw) != 8 + length:
            raise ValueError(f"{len(raw)} bytes are not one string")
        record = json.loads(bytes(raw[8:]).decode())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except Exception as e:  # noqa: BLE001 - whatever the bytes are, they are not a record
        raise CorruptStoreError(f"{where}: its completion record does not read ({type(e).__name__}); "
                                f"run `mtkd verify {store} --repair`") from e
    return record


def decode_chunk(array: zarr.Array, coords: tuple[int, ...], raw: bytes) -> np.ndarray:
    """One chunk's stored bytes -> its values (the whole chunk), through the array's own codecs in
    reverse (crc32c checked first): `_encode` undone, without zarr's async machinery."""
    async_array = array._async_array
    spec = async_array.metadata.get_chunk_spec(coords, async_array.config, default_buffer_prototype())
    specs = []
    for codec in array.metadata.codecs:
        specs.append(spec)
        spec = codec.resolve_metadata(spec)
    data: Any = default_buffer_prototype().buffer.from_bytes(raw)
    chunk_shape = tuple(array.metadata.chunk_grid.chunk_shape)
    codecs = list(zip(reversed(array.metadata.codecs), reversed(specs)))
    if math.prod(chunk_shape) == 0:  # no values (a top-k of 0): the checksum is all there is to check
        codecs = [(c, sp) for c, sp in codecs if isinstance(c, Crc32cCodec)]
    for codec, spec in codecs:
        decode = getattr(codec, "_decode_sync", None)
        data = decode(data, spec) if decode is not None else zarr_sync(codec._decode_single(data, spec))
    if math.prod(chunk_shape) == 0:
        return np.empty(chunk_shape, dtype=array.dtype)
    values = data.as_numpy_array()
    if not values.flags.writeable:  # decompressed into immutable bytes: torch wants to own writable memory
        values = values.copy()
    if values.shape != tuple(array.metadata.chunk_grid.chunk_shape):
        raise ValueError(f"chunk decodes to shape {values.shape}, not {tuple(array.metadata.chunk_grid.chunk_shape)}")
    return values


def misplaced_message(path: Path, name: str, block: int, why: str, *, hint: bool = True) -> str:
    """The one line every reader gives for a chunk that is not the one its block's record names
    (`hint`: with the commands that repair it; verify's findings name the damage alone)."""
    message = f"store {str(path)!r}: teacher {name!r}, block {block}: {why} (a chunk copied, moved or rewritten)"
    return message + (f"; run `mtkd verify {path} --repair`, then `mtkd infer` again" if hint else "")


def _write_data_chunks(folder: Path, array: zarr.Array, values: np.ndarray, *, only_missing: bool = False) -> list[int]:
    """Write every chunk of a 1-d int64 data array (labels, offsets), or only those missing; returns them."""
    (rows,) = array.metadata.chunk_grid.chunk_shape
    written = []
    for i in range(-(-len(values) // rows)):
        path = folder / array.metadata.encode_chunk_key((i,))
        if only_missing and path.is_file():
            continue
        chunk = np.full(rows, array.metadata.fill_value, dtype=np.int64)
        piece = values[i * rows : (i + 1) * rows]
        chunk[: len(piece)] = piece
        storage.write(path, _encode(array, (i,), chunk), durable=only_missing)
        written.append(i)
    return written


def _crc(raw: bytes | memoryview) -> int:
    """The crc32c a chunk's bytes end with (Crc32cCodec appends it), as an integer."""
    return int.from_bytes(bytes(raw[-4:]), "little") if len(raw) >= 4 else -1


def _digest(values: np.ndarray | bytes) -> str:
    return hashlib.blake2b(memoryview(values).cast("B") if isinstance(values, np.ndarray) else values, digest_size=16).hexdigest()


def _labels_digest(labels: np.ndarray, start: int, stop: int) -> str:
    return _digest(np.ascontiguousarray(labels[start:stop], dtype="<i8"))


def _offsets_digest(offsets: np.ndarray, start: int, stop: int) -> str:
    return _digest(np.ascontiguousarray(offsets[(offsets >= start) & (offsets <= stop)], dtype="<i8"))


def _data_digests(labels: np.ndarray, offsets: np.ndarray | None, start: int, stop: int) -> dict[str, str | None]:
    return {"labels": _labels_digest(labels, start, stop), "offsets": None if offsets is None else _offsets_digest(offsets, start, stop)}


def _jsonable(value: Any) -> Any:
    """As JSON gives it back (tuples as lists), so that a record compares equal to what it was made of."""
    return json.loads(json.dumps(value))


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
