"""`mtkd verify`: read every chunk of a store once and say what is damaged; optionally repair it.

    report = verify_store("train.zarr")                 # report.clean, report.findings
    report = verify_store("train.zarr", repair=True)    # drops the records of damaged blocks

What is checked, per teacher and row block (a block is one chunk of each of the teacher's arrays:
dense `logits`, or `topk_ids`, `topk_logprobs`, `lse`, `label_logprob`, and format 2's per-block
`block_stats`):
- a recorded block's chunks are all there ("record-without-chunk"), decode ("checksum": the crc32c
  codec's mismatch, format 2; "unreadable": a truncated or resized chunk), hold finite values
  ("non-finite"; `label_logprob` is NaN exactly where a row has no label, by design) and top-k ids
  inside the teacher's vocabulary ("invalid");
- a chunk without its completion record ("chunk-without-record"): damage when the teacher says it is
  complete (its record was lost); otherwise the leftover of an interrupted write that `mtkd infer`
  recomputes, reported but not damage;
- attributes against the arrays ("attribute"): `num_rows` and `chunk_rows` against every array's
  shape and chunks, a dense teacher's width against its vocabulary, `top_k` against the ids kept,
  `logical_dtype` and the teacher's `dtype` against the dtype actually stored (float16 bits read as
  bfloat16 would train on garbage), a token store's sequence offsets against its rows.

Repair (`--repair`) makes the store say only what is true, so that rerunning the same `mtkd infer`
recomputes exactly the damaged blocks: a damaged block loses its record (first) and its chunks; a
teacher with damage loses `complete` (and its stats, which described the damaged data); an attribute
that contradicts the stored dtype is rewritten from it, and a store-level count from the arrays when
they all agree. What cannot be repaired (arrays that disagree with one another) is said so.

What verify cannot see: a whole chunk moved to another block's place (its checksum is its own).

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
from mtkd.pipeline.layouts import STORAGE
from mtkd.pipeline.store import LogitStore, nonfinite_message, open_store

CHECKSUM = "checksum"
UNREADABLE = "unreadable"
NON_FINITE = "non-finite"
NO_CHUNK = "record-without-chunk"
NO_RECORD = "chunk-without-record"
ATTRIBUTE = "attribute"
INVALID = "invalid"  # top-k ids outside [0, vocab_size) in a recorded block (the -1 fill, or garbage)

RECORDS = "done"  # the teacher's completion-record array (checked by listing, not reading)
PER_BLOCK = ("block_stats",)  # format 2: one entry per block (the block's stats sums), checked like rows
# The logical dtype each stored dtype can only be (bfloat16 is kept bit-exact as uint16).
LOGICAL_OF_STORED = {np.dtype(stored): name for name, (stored, _, _) in STORAGE.items()}
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
    store = open_store(path, mode="r+" if repair else "r")
    findings = list(_store_findings(store))
    store = _as_fixed(store, findings)
    teachers = [_Teacher.open(store, name) for name in store.teachers]
    for teacher in teachers:
        findings += teacher.attribute_findings()
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
        labels = zarr.open_array(store.path / "labels", mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises several types for a missing/broken array
        yield Finding(ATTRIBUTE, f"{where}: the labels array does not open ({type(e).__name__})")
        return
    rows, chunks, widths = {int(labels.shape[0])}, set(), set()
    for name in store.teachers:
        for key, array in zarr.open_group(store.path / "teachers" / name, mode="r").arrays():
            if key == RECORDS or key in PER_BLOCK:
                continue
            rows.add(int(array.shape[0]))
            chunks.add(int(array.metadata.chunk_grid.chunk_shape[0]))
            if key == "logits" and len(array.shape) == 2:
                widths.add(int(array.shape[1]))
    for attr, stated, seen, what in (
        ("num_rows", store.num_rows, rows, "the arrays' rows"),
        ("chunk_rows", store.chunk_rows, chunks, "the teachers' chunks"),
        ("num_classes", store.num_classes, widths, "the dense teachers' classes"),
    ):
        if seen and seen != {stated}:
            fix = {attr: next(iter(seen))} if len(seen) == 1 else None  # arrays that disagree: no fix
            yield Finding(ATTRIBUTE, f"{where}: attribute {attr} is {stated} but {what} are {sorted(seen)}", fix=fix)
    if (store.path / "sequences" / "offsets" / "zarr.json").is_file():  # tokens: sequences tile the rows
        try:
            offsets = np.asarray(zarr.open_array(store.path / "sequences" / "offsets", mode="r")[...])
        except Exception as e:  # noqa: BLE001 - a checksum mismatch or a broken chunk
            yield Finding(ATTRIBUTE, f"{where}: sequences/offsets do not read ({type(e).__name__}: {_first_line(e)})")
        else:
            if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != store.num_rows or (np.diff(offsets) < 0).any():
                yield Finding(ATTRIBUTE, f"{where}: sequences/offsets do not run from 0 to num_rows {store.num_rows} in order")
    folder = store.path / "teachers"
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if child.is_dir() and not (child / "zarr.json").is_file():
            yield Finding(ATTRIBUTE, f"{where}: teachers/{child.name} has no zarr.json (not a readable teacher)", child.name)


def _as_fixed(store: LogitStore, findings: list[Finding]) -> LogitStore:
    """The store as its arrays say it is, for checking teachers and blocks against the truth."""
    fixes = {k: v for f in findings if f.teacher is None and f.fix for k, v in f.fix.items()}
    if not fixes:
        return store
    meta = {**dict(zarr.open_group(store.path, mode="r").attrs["mtkd"]), **fixes}
    return LogitStore(store.path, meta, store.mode)


@dataclass
class _Array:
    key: str  # e.g. "logits", "topk_ids", "block_stats"
    array: zarr.Array
    logical: str  # the dtype its values are, as implied by the stored dtype
    per_block: bool = False  # one entry per block (block_stats), not per row

    def block(self, store: LogitStore, block: int) -> np.ndarray:
        start, stop = (block, block + 1) if self.per_block else store.block_range(block)
        return np.asarray(self.array[start:stop])

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
        group = zarr.open_group(folder, mode="r")
        attrs = dict(group.attrs)
        arrays, problems = [], []
        where = f"store {str(store.path)!r}: teacher {name!r}"
        for child in sorted(folder.iterdir()):
            if not child.is_dir() or child.name == RECORDS:
                continue
            if not (child / "zarr.json").is_file():
                problems.append(Finding(ATTRIBUTE, f"{where}: array {child.name} has no zarr.json", teacher=name))
                continue
            try:
                array = zarr.open_array(child, mode="r")
            except Exception as e:  # noqa: BLE001
                problems.append(Finding(ATTRIBUTE, f"{where}: array {child.name} does not open ({type(e).__name__})", teacher=name))
                continue
            stored = np.dtype(array.dtype)
            # What the values are follows from how they are stored, whatever the attribute says.
            logical = LOGICAL_OF_STORED.get(stored, stored.name) if "logical_dtype" in array.attrs else stored.name
            arrays.append(_Array(child.name, array, logical, per_block=child.name in PER_BLOCK))
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
        by_key = {a.key: a for a in self.arrays}
        dense = by_key.get("logits")
        if dense is not None:
            width = dense.array.shape[1] if len(dense.array.shape) > 1 else None
            expected = self.attrs.get("vocab_size") or store.num_classes
            if width != expected:
                found.append(Finding(ATTRIBUTE, f"{where}: logits have {width} classes; the attributes say {expected}", name))
        ids = by_key.get("topk_ids")
        if ids is not None and len(ids.array.shape) == 2 and ids.array.shape[1] != self.attrs.get("top_k"):
            found.append(Finding(ATTRIBUTE, f"{where}: topk_ids keep {ids.array.shape[1]} ids; attribute top_k is {self.attrs.get('top_k')!r}", name))
        # The teacher's dtype is that of its 16-bit-or-float32 values (dense logits, top-k log-probabilities).
        valued = next((a for a in self.arrays if "logical_dtype" in a.array.attrs), None)
        if valued is not None and valued.logical in STORAGE and self.attrs.get("dtype") != valued.logical:
            found.append(Finding(
                ATTRIBUTE, f"{where}: attribute dtype is {self.attrs.get('dtype')!r} but {valued.key} are stored as {valued.logical}",
                name, fix={"dtype": valued.logical},
            ))
        records = self.folder / RECORDS
        if (records / "zarr.json").is_file():
            shape = tuple(zarr.open_array(records, mode="r").shape)
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
            return [Finding(NO_CHUNK, f"{where}: recorded but its {', '.join(missing)} chunk is missing", self.name, block)]
        found = []
        for a in self.arrays:
            try:
                values = a.block(self.store, block)
            except Exception as e:  # noqa: BLE001 - the codec's checksum error, or a chunk of the wrong size
                kind = CHECKSUM if "checksum" in str(e).lower() else UNREADABLE
                detail = "checksum mismatch" if kind == CHECKSUM else f"does not decode ({type(e).__name__}: {_first_line(e)})"
                found.append(Finding(kind, f"{where}: {a.key} chunk {detail}", self.name, block))
                continue
            if a.per_block:
                continue  # the stats sums: that they read (checksum) is what can be checked
            if a.key in ("topk_ids", "tail_ids"):
                vocab = int(self.attrs.get("vocab_size") or self.store.num_classes)
                rows = ((values < 0) | (values >= vocab)).any(axis=1)
                if rows.any():
                    row = start + int(np.flatnonzero(rows)[0])
                    found.append(Finding(INVALID, f"{where}: {a.key} outside [0, {vocab}) at row {row}", self.name, block))
                continue
            allowed = self._unlabelled(start, stop) if a.key in NAN_WITHOUT_LABEL else None
            bad = _nonfinite_rows(_as_logical(values, a.logical), allowed_nan=allowed)
            if bad is not None:
                found.append(Finding(NON_FINITE, nonfinite_message(self.store.path, self.name, block, a.key, start + bad), self.name, block))
        return found

    def _unlabelled(self, start: int, stop: int) -> np.ndarray:
        if self._labels is None:
            self._labels = self.store.labels()
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
        meta = dict(zarr.open_group(store.path, mode="r").attrs["mtkd"])
        meta.update(store_fixes)
        zarr.open_group(store.path, mode="r+").attrs["mtkd"] = meta
        report.repaired.append(f"store attributes set to {store_fixes}")


def _update_attrs(path: Path, attrs: dict[str, Any], *, is_array: bool) -> None:
    node = zarr.open_array(path, mode="r+") if is_array else zarr.open_group(path, mode="r+")
    node.attrs.update(attrs)
