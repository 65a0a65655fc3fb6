"""`mtkd verify`: read every chunk of a store once and say what is damaged; optionally repair it.

    report = verify_store("train.zarr")                 # report.clean, report.findings
    report = verify_store("train.zarr", repair=True)    # drops the records of damaged blocks

What is checked, per teacher and row block (a block is one chunk of each of the teacher's arrays:
dense `logits`, or `topk_ids`, `topk_logprobs`, `lse`, `label_logprob`, and format 2's per-block
`block_stats`):
- a recorded block's chunks are all there ("record-without-chunk"), decode ("checksum": the crc32c
  codec's mismatch, format 2; "unreadable": a truncated or resized chunk), hold finite values
  ("non-finite"; `label_logprob` is NaN exactly where a row has no label, by design), top-k ids
  inside the teacher's vocabulary ("invalid"), and are the chunks the block's record names
  ("misplaced": copied from another block or store, swapped, a record from elsewhere);
- labels and sequences/offsets, chunk by chunk: there, readable, and the data every bound record of a
  block names (labels copied from other data: "misplaced");
- a chunk without its completion record ("chunk-without-record"): damage when the teacher says it is
  complete (its record was lost); otherwise the leftover of an interrupted write that `mtkd infer`
  recomputes, reported but not damage;
- attributes against the arrays and records ("attribute"): the structural check every reader makes
  at open (store.structure_problems: num_rows, chunk_rows, num_classes against the arrays; a
  teacher's layout, dtype, vocab_size, top_k and temperatures against what its records name and its
  arrays hold), plus every array's shape and chunks and its `logical_dtype` against the dtype stored
  (float16 bits read as bfloat16 would train on garbage), and a token store's offsets against its rows;
- records of an earlier mtkd ("unbound-records", a note): they name no chunk, so checksums alone.

Repair (`--repair`) makes the store say only what is true, so that rerunning the same `mtkd infer`
recomputes exactly the damaged blocks: a damaged block loses its record (first) and its chunks; a
teacher with damage loses `complete` (and its stats, which described the damaged data); a damaged
labels or offsets chunk is dropped, and the same `mtkd infer` rewrites it from the data. A wrong
attribute is restored from what proves it, never by dropping good blocks: a teacher's layout
attributes from its records (or, for unbound records, its arrays' widths and stored dtype), a
store-level count from the arrays when they all agree. What nothing proves is said so, unrepaired.

What verify cannot see: a record and all its block's chunks replaced together by those of the same
teacher (same spec and weights) on the same data and rows, which are the same bytes; and, in
unbound records, chunks in the wrong place.

Readers (stage two, `mtkd inspect`) refuse a NaN/inf in a recorded block as they read it
(`LogitStore.read_logits`); their errors point here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mtkd.pipeline.data import IGNORE_LABEL
from mtkd.pipeline.layouts import FEATURES, STORAGE
from mtkd.pipeline.store import (
    LOGICAL_OF_STORED,
    OFFSETS,
    UNBOUND,
    LogitStore,
    decode_chunk,
    misplaced_message,
    nonfinite_message,
    open_store,
    store_problems,
    teacher_problems,
)
from mtkd.pipeline.errors import CorruptStoreError
from mtkd.pipeline.storage import is_remote, zarr_store

CHECKSUM = "checksum"
UNREADABLE = "unreadable"
NON_FINITE = "non-finite"
NO_CHUNK = "record-without-chunk"
NO_RECORD = "chunk-without-record"
ATTRIBUTE = "attribute"
INVALID = "invalid"  # top-k ids outside [0, vocab_size) in a recorded block (the -1 fill, or garbage)
MISPLACED = "misplaced"  # an intact chunk that is not the one its block's record names (copied, moved, swapped)
UNBOUND_RECORDS = "unbound-records"  # records of an earlier mtkd: they name no chunk (a note, not damage)

RECORDS = "done"  # the teacher's completion-record array (checked by listing, not reading)
PER_BLOCK = ("block_stats",)  # format 2: one entry per block (the block's stats sums), checked like rows
# Arrays whose NaN means "no label" (sparse teachers' log p(label)), finite wherever a label exists.
NAN_WITHOUT_LABEL = ("label_logprob",)


@dataclass(frozen=True)
class Finding:
    """One thing wrong (or, with damage False, merely unfinished) in a store."""

    kind: str
    message: str  # one line, naming store, teacher and block
    teacher: str | None = None  # None: the store as a whole
    block: int | None = None  # None: the teacher (or store) as a whole
    damage: bool = True
    array: str | None = None  # the array concerned, where one is: "labels", "sequences/offsets", "topk_ids", ...
    fix: dict[str, Any] | None = field(default=None, compare=False)  # attribute findings: what repair writes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("fix")
        return out


@dataclass
class VerifyReport:
    """What `verify_store` found (and repaired). `clean`: no damage was found."""

    store: str
    blocks: int
    teachers: list[dict[str, Any]]  # name, complete, blocks_recorded, blocks_checked, damaged_blocks
    findings: list[Finding]
    repaired: list[str] = field(default_factory=list)  # one line per repair done
    unrepaired: list[str] = field(default_factory=list)  # damage that repair could not undo

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    @property
    def clean(self) -> bool:
        return not self.damage

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "clean": self.clean,
            "blocks": self.blocks,
            "teachers": self.teachers,
            "findings": [f.to_dict() for f in self.findings],
            "repaired": self.repaired,
            "unrepaired": self.unrepaired,
        }


def verify_store(
    path: str | os.PathLike, *, repair: bool = False, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check every chunk and attribute of the store at `path`; with `repair`, undo what can be undone.

    `progress(done, total)` counts (teacher, block) pairs read. Raises BadInputError when `path` is
    not a store at all; everything else is a finding.
    """
    store = open_store(path, mode="r+" if repair else "r", check=False)  # what the check refuses is reported here
    findings = list(_store_findings(store))
    store = _as_fixed(store, findings)
    teachers = [_Teacher.open(store, name) for name in store.teachers]
    for teacher in teachers:
        findings += teacher.attribute_findings()
    if not any(f.teacher is None and f.fix is None for f in findings):
        findings += _data_findings(store)
        findings += _target_findings(store)
    total = store.num_blocks * len(teachers)
    summaries = []
    # Blocks are only meaningful when the store's own counts hold: otherwise they are not checked.
    check_blocks = not any(f.teacher is None and f.fix is None for f in findings)
    done = 0
    for teacher in teachers:
        damaged: list[int] = []
        if check_blocks and teacher.arrays:
            for block in range(store.num_blocks):
                block_findings = teacher.block_findings(block)
                findings += block_findings
                if any(f.damage for f in block_findings):
                    damaged.append(block)
                done += 1
                if progress is not None:
                    progress(done, total)
        summaries.append(
            {
                "name": teacher.name,
                "complete": teacher.complete,
                "blocks_recorded": len(teacher.recorded),
                "blocks_checked": len(teacher.recorded) if check_blocks else 0,
                "damaged_blocks": damaged,
            }
        )
    report = VerifyReport(store=str(store.path), blocks=store.num_blocks, teachers=summaries, findings=findings)
    if repair and not report.clean:
        _repair(store, report)
    return report


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


def _store_findings(store: LogitStore) -> Iterator[Finding]:
    """The store's counts against its arrays, and teacher folders that are not teachers.

    A count is restored (fix) from the arrays when they all agree on it: labels for num_rows, the
    teachers' row arrays for chunk_rows, the dense teachers' logits for num_classes.
    """
    where = f"store {str(store.path)!r}"
    try:
        labels = zarr.open_array(zarr_store(store.path / "labels"), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing/broken array
        yield Finding(ATTRIBUTE, f"{where}: the labels array does not open ({type(e).__name__})")
        return
    for problem in store_problems(store):  # the counts, as every reader checks them at open
        yield Finding(ATTRIBUTE, problem.message, fix=problem.fix)
    if (store.path / "sequences" / "offsets" / "zarr.json").is_file():  # tokens: sequences tile the rows
        try:
            offsets = store.stored_data(OFFSETS)
        except CorruptStoreError:
            pass  # a missing or damaged chunk: `_data_findings` names it
        else:
            if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != store.num_rows or (np.diff(offsets) < 0).any():
                yield Finding(ATTRIBUTE, f"{where}: sequences/offsets do not run from 0 to num_rows {store.num_rows} in order")
    folder = store.path / "teachers"
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if child.is_dir() and not (child / "zarr.json").is_file():
            if is_remote(child):  # no rename there: a teacher is uploaded with its zarr.json last (storage.create_once)
                yield Finding(ATTRIBUTE, f"{where}: teachers/{child.name} has no zarr.json yet (being added, or its adder was "
                              "killed: the same `mtkd infer` finishes it)", child.name, damage=False)
            else:
                yield Finding(ATTRIBUTE, f"{where}: teachers/{child.name} has no zarr.json (not a readable teacher)", child.name)


def _target_findings(store: LogitStore) -> list[Finding]:
    """A regression store's `targets` (v3): every chunk reads (crc32c). Repair cannot rewrite them
    (they are written once, with the store): a damaged one is unrepaired damage."""
    if not store.regression:
        return []
    try:
        store.targets()
    except CorruptStoreError as e:
        kind = CHECKSUM if "checksum" in str(e.__cause__).lower() else UNREADABLE
        return [Finding(kind, f"{e} ({_first_line(e.__cause__)}); write the store anew with `mtkd infer`", array="targets")]
    return []


def _data_findings(store: LogitStore) -> list[Finding]:
    """labels and (tokens) sequences/offsets, chunk by chunk: each there and readable, and each
    recorded block's labels and offsets those its teachers' bound records name. Repair drops a
    damaged chunk; the same `mtkd infer` rewrites it from the data."""
    where = f"store {str(store.path)!r}"
    rerun = "the same `mtkd infer` rewrites it from the data"
    found = []
    for key in ("labels", OFFSETS) if store.kind == "tokens" else ("labels",):
        array = zarr.open_array(zarr_store(store.path / key), mode="r")
        (n,), (rows,) = array.shape, array.metadata.chunk_grid.chunk_shape
        parts, broken = [], False
        for i in range(-(-n // rows)):
            path = store.path / key / array.metadata.encode_chunk_key((i,))
            what = f"{where}: {key} chunk {i} (entries {i * rows}..{min(n, (i + 1) * rows) - 1})"
            try:
                parts.append(decode_chunk(array, (i,), path.read_bytes()))
            except FileNotFoundError:
                found.append(Finding(NO_CHUNK, f"{what} is missing; {rerun}", block=i, array=key, fix={"drop": key, "chunk": i}))
                broken = True
            except Exception as e:  # noqa: BLE001 - the codec's checksum error, or a chunk of the wrong size
                kind = CHECKSUM if "checksum" in str(e).lower() else UNREADABLE
                found.append(Finding(kind, f"{what} does not read ({type(e).__name__}: {_first_line(e)})", block=i, array=key,
                                     fix={"drop": key, "chunk": i}))
                broken = True
        if broken or not parts:
            continue
        values = np.concatenate(parts)[:n]
        field_name = "offsets" if key == OFFSETS else "labels"
        bad_chunks: dict[int, str] = {}
        for block in range(store.num_blocks):
            start, stop = store.block_range(block)
            named = set()
            for name in store.teachers:
                try:
                    record = store.record(name, block)
                except CorruptStoreError:
                    continue
                if record is not None and record is not UNBOUND and record.get(field_name) is not None:
                    named.add(record[field_name])
            if not named:
                continue
            digest = store.data_digest(key, values, start, stop)
            if digest not in named:  # no teacher's record names these: the data array is what changed
                if key == OFFSETS:
                    chunks = sorted({int(i) // rows for i in np.flatnonzero((values >= start) & (values <= stop))} or {0})
                else:
                    chunks = list(range(start // rows, (stop - 1) // rows + 1))
                for i in chunks:
                    bad_chunks.setdefault(i, f"block {block} (rows {start}..{stop - 1})")
        for i, first in sorted(bad_chunks.items()):
            found.append(Finding(
                MISPLACED, f"{where}: {key} chunk {i} is not what the teachers' completion records name, from {first} on "
                f"(copied from other data?); {rerun}", block=i, array=key, fix={"drop": key, "chunk": i},
            ))
    return found


def _as_fixed(store: LogitStore, findings: list[Finding]) -> LogitStore:
    """The store as its arrays say it is, for checking teachers and blocks against the truth."""
    fixes = {k: v for f in findings if f.teacher is None and f.fix for k, v in f.fix.items()}
    if not fixes:
        return store
    meta = {**dict(zarr.open_group(zarr_store(store.path), mode="r").attrs["mtkd"]), **fixes}
    return LogitStore(store.path, meta, store.mode)


@dataclass
class _Array:
    key: str  # e.g. "logits", "topk_ids", "block_stats"
    array: zarr.Array
    logical: str  # the dtype its values are, as implied by the stored dtype
    per_block: bool = False  # one entry per block (block_stats), not per row

    def chunk_file(self, folder: Path, block: int) -> Path:
        coords = (block,) + (0,) * (len(self.array.shape) - 1)
        return folder / self.key / self.array.metadata.encode_chunk_key(coords)


class _Teacher:
    """One teacher's group as it is on disk: its row arrays, records and attributes."""

    def __init__(self, store: LogitStore, name: str, attrs: dict[str, Any], arrays: list[_Array], problems: list[Finding]):
        self.store, self.name, self.attrs, self.arrays, self.problems = store, name, attrs, arrays, problems
        self.folder = store.path / "teachers" / name
        self.complete = bool(attrs.get("complete", False))
        self.recorded = store.done_blocks(name)
        self.where = f"store {str(store.path)!r}: teacher {name!r}"
        self._labels: np.ndarray | None = None

    @classmethod
    def open(cls, store: LogitStore, name: str) -> _Teacher:
        folder = store.path / "teachers" / name
        group = zarr.open_group(zarr_store(folder), mode="r")
        attrs = dict(group.attrs)
        arrays, problems = [], []
        where = f"store {str(store.path)!r}: teacher {name!r}"
        children = []
        for child in sorted(folder.iterdir()):
            if child.name == FEATURES and child.is_dir():  # v3: features/<module>, one array each
                children += sorted(c for c in child.iterdir() if c.is_dir())
            else:
                children.append(child)
        for child in children:
            key = child.relative_to(folder).as_posix()
            if not child.is_dir() or key == RECORDS:
                continue
            if not (child / "zarr.json").is_file():
                problems.append(Finding(ATTRIBUTE, f"{where}: array {key} has no zarr.json", teacher=name))
                continue
            try:
                array = zarr.open_array(zarr_store(child), mode="r")
            except Exception as e:  # noqa: BLE001
                problems.append(Finding(ATTRIBUTE, f"{where}: array {key} does not open ({type(e).__name__})", teacher=name))
                continue
            stored = np.dtype(array.dtype)
            # What the values are follows from how they are stored, whatever the attribute says.
            logical = LOGICAL_OF_STORED.get(stored, stored.name) if "logical_dtype" in array.attrs else stored.name
            arrays.append(_Array(key, array, logical, per_block=key in PER_BLOCK))
        if not arrays and not problems:
            problems.append(Finding(ATTRIBUTE, f"{where}: holds no arrays", teacher=name))
        return cls(store, name, attrs, arrays, problems)

    # -- attributes ---------------------------------------------------------------------------------

    def attribute_findings(self) -> list[Finding]:
        found = list(self.problems)
        store, name, where = self.store, self.name, self.where
        for a in self.arrays:
            shape, chunks = tuple(a.array.shape), tuple(a.array.metadata.chunk_grid.chunk_shape)
            length, unit, what = (store.num_blocks, 1, "blocks") if a.per_block else (store.num_rows, store.chunk_rows, "rows")
            if shape[0] != length:
                found.append(Finding(ATTRIBUTE, f"{where}: {a.key} has {shape[0]} {what}; the store has {length}", name))
            if chunks[0] != unit or chunks[1:] != shape[1:]:
                found.append(Finding(
                    ATTRIBUTE, f"{where}: {a.key} is chunked {chunks}; blocks are ({unit}, {', '.join(map(str, shape[1:]))})", name,
                ))
            if "logical_dtype" in a.array.attrs:
                stated = a.array.attrs["logical_dtype"]
                stored = np.dtype(a.array.dtype)
                if a.logical not in STORAGE:
                    found.append(Finding(ATTRIBUTE, f"{where}: {a.key} is stored as {stored}, which no logical dtype uses", name))
                elif stated != a.logical:
                    found.append(Finding(
                        ATTRIBUTE,
                        f"{where}: {a.key} says logical_dtype {stated!r} but is stored as {stored} ({a.logical})",
                        name, fix={"array": a.key, "logical_dtype": a.logical},
                    ))
        # The layout attributes against the records and the arrays (the check every reader makes at
        # open); what they prove is the truth the blocks are checked against, and what repair writes.
        for problem in teacher_problems(store, name):
            found.append(Finding(ATTRIBUTE, problem.message, name, fix=problem.fix))
            self.attrs.update(problem.fix or {})
        try:
            unbound = sum(record is UNBOUND for record in store.records(name).values())
        except CorruptStoreError:
            unbound = 0  # a record that does not read: its block's finding names it
        if unbound:
            found.append(Finding(UNBOUND_RECORDS, f"{where}: {unbound} unbound records (written by an earlier mtkd: they name "
                                 "no chunk, so those blocks are checked by their checksums alone)", name, damage=False))
        records = self.folder / RECORDS
        if (records / "zarr.json").is_file():
            shape = tuple(zarr.open_array(zarr_store(records), mode="r").shape)
            if shape != (store.num_blocks,):
                found.append(Finding(ATTRIBUTE, f"{where}: the completion records cover {shape} blocks; the store has {store.num_blocks}", name))
        return found

    # -- blocks -------------------------------------------------------------------------------------

    def block_findings(self, block: int) -> list[Finding]:
        start, stop = self.store.block_range(block)
        where = f"{self.where}, block {block} (rows {start}..{stop - 1})"
        present = [a for a in self.arrays if a.chunk_file(self.folder, block).is_file()]
        if block not in self.recorded:
            if not present:
                if self.complete:
                    return [Finding(NO_RECORD, f"{where}: marked complete but neither recorded nor written", self.name, block)]
                return []  # simply not written yet
            if self.complete:
                return [Finding(NO_RECORD, f"{where}: written but its completion record is gone (the teacher says complete)", self.name, block)]
            return [Finding(NO_RECORD, f"{where}: written but not recorded (an interrupted write; `mtkd infer` recomputes it)",
                            self.name, block, damage=False)]
        missing = [a.key for a in self.arrays if a not in present]
        if missing:
            return [Finding(NO_CHUNK, f"{where}: recorded but its {', '.join(missing)} chunk is missing", self.name, block, array=missing[0])]
        try:
            bound = self.store.record(self.name, block) is not UNBOUND
        except CorruptStoreError as e:  # a record that does not parse names nothing: the block is recomputed
            return [Finding(MISPLACED, f"{where}: its completion record does not read ({_first_line(e.__cause__ or e)})",
                            self.name, block, array=RECORDS)]
        found = []
        for a in self.arrays:
            path = a.chunk_file(self.folder, block)
            raw = path.read_bytes()
            try:
                values = decode_chunk(a.array, (block,) + (0,) * (len(a.array.shape) - 1), raw)
                values = values[: 1 if a.per_block else stop - start]
            except Exception as e:  # noqa: BLE001 - the codec's checksum error, or a chunk of the wrong size
                kind = CHECKSUM if "checksum" in str(e).lower() else UNREADABLE
                detail = "checksum mismatch" if kind == CHECKSUM else f"does not decode ({type(e).__name__}: {_first_line(e)})"
                found.append(Finding(kind, f"{where}: {a.key} chunk {detail}", self.name, block, array=a.key))
                continue
            problem = self._value_finding(a, values, start, where, block)
            if problem is None and bound:
                why = self.store.binding_error(self.name, block, a.key, raw)
                if why is not None:
                    problem = Finding(MISPLACED, misplaced_message(self.store.path, self.name, block, why, hint=False), self.name, block)
            if problem is not None:
                found.append(Finding(problem.kind, problem.message, self.name, block, array=a.key))
        return found

    def _value_finding(self, a: _Array, values: np.ndarray, start: int, where: str, block: int) -> Finding | None:
        """NaN/inf where the values must be finite, top-k ids outside the vocabulary."""
        if a.per_block:
            return None  # the stats sums: that they read (checksum) is what can be checked
        if a.key in ("topk_ids", "tail_ids"):
            vocab = int(self.attrs.get("vocab_size") or self.store.num_classes)
            rows = ((values < 0) | (values >= vocab)).any(axis=1)
            if rows.any():
                row = start + int(np.flatnonzero(rows)[0])
                return Finding(INVALID, f"{where}: {a.key} outside [0, {vocab}) at row {row}", self.name, block)
            return None
        if not np.issubdtype(values.dtype, np.floating) and a.logical not in STORAGE:
            return None
        allowed = self._unlabelled(start, start + len(values)) if a.key in NAN_WITHOUT_LABEL else None
        bad = _nonfinite_rows(_as_logical(values, a.logical), allowed_nan=allowed)
        if bad is not None:
            return Finding(NON_FINITE, nonfinite_message(self.store.path, self.name, block, a.key, start + bad), self.name, block)
        return None

    def _unlabelled(self, start: int, stop: int) -> np.ndarray:
        if self._labels is None:
            try:
                self._labels = self.store.stored_data("labels")
            except CorruptStoreError:  # damaged labels (`_data_findings` names them): any NaN may be "no label"
                self._labels = np.full(self.store.num_rows, IGNORE_LABEL, dtype=np.int64)
        return self._labels[start:stop] == IGNORE_LABEL


def _as_logical(values: np.ndarray, logical: str) -> np.ndarray:
    """Values whose non-finiteness numpy can see: bfloat16 bits (uint16) as float32."""
    if logical == "bfloat16" and values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _nonfinite_rows(values: np.ndarray, *, allowed_nan: np.ndarray | None = None) -> int | None:
    """Index of the first row holding NaN/inf (None: all finite). Integer arrays are always finite."""
    if not np.issubdtype(values.dtype, np.floating):
        return None
    bad = ~np.isfinite(values)
    if allowed_nan is not None:  # NaN is the value of a row without label (and only of such a row)
        bad &= ~(np.isnan(values) & allowed_nan.reshape((-1,) + (1,) * (values.ndim - 1)))
    rows = bad.reshape(len(values), -1).any(axis=1) if values.ndim > 1 else bad
    return int(np.flatnonzero(rows)[0]) if rows.any() else None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ---------------------------------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------------------------------


def _repair(store: LogitStore, report: VerifyReport) -> None:
    """Drop what is damaged so that `mtkd infer` recomputes it; fix attributes the arrays determine."""
    store_fixes: dict[str, Any] = {}
    dirty: set[str] = set()  # teachers that lose `complete`
    for f in report.damage:
        if f.fix is not None and "drop" in f.fix:  # a labels or offsets chunk: stage one rewrites it from the data
            array = zarr.open_array(zarr_store(store.path / f.fix["drop"]), mode="r")
            (store.path / f.fix["drop"] / array.metadata.encode_chunk_key((f.fix["chunk"],))).unlink(missing_ok=True)
            report.repaired.append(f"{f.fix['drop']} chunk {f.fix['chunk']} dropped ({f.kind}); the same `mtkd infer` rewrites it from the data")
            continue
        if f.kind == ATTRIBUTE:
            if f.fix is None:
                report.unrepaired.append(f.message)
            elif f.teacher is None:
                store_fixes.update(f.fix)
            else:
                fix = dict(f.fix)
                array = fix.pop("array", None)
                target = store.path / "teachers" / f.teacher / (array or "")
                _update_attrs(target, fix, is_array=array is not None)
                report.repaired.append(f"teacher {f.teacher!r}: {array or 'teacher'} attribute set to {fix}")
            continue
        if f.block is not None and f.kind != NO_RECORD:  # checksum, unreadable, non-finite, invalid, no chunk
            store.drop_block(f.teacher, f.block)
            report.repaired.append(f"teacher {f.teacher!r}: block {f.block} dropped ({f.kind})")
        dirty.add(f.teacher)
    for name in sorted(dirty):
        store.mark_incomplete(name)
        report.repaired.append(f"teacher {name!r}: no longer complete; rerun `mtkd infer` to recompute its dropped blocks")
    if store_fixes:
        meta = dict(zarr.open_group(zarr_store(store.path), mode="r").attrs["mtkd"])
        meta.update(store_fixes)
        zarr.open_group(zarr_store(store.path, "r+"), mode="r+").attrs["mtkd"] = meta
        report.repaired.append(f"store attributes set to {store_fixes}")


def _update_attrs(path: Path, attrs: dict[str, Any], *, is_array: bool) -> None:
    node = zarr.open_array(zarr_store(path, "r+"), mode="r+") if is_array else zarr.open_group(zarr_store(path, "r+"), mode="r+")
    node.attrs.update(attrs)
