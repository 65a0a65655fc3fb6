"""Data specs (`--data`) -> `RowData` (classification, in memory) or `TokenData` (language models).

Rows (SPEC.md, "Two kinds of data"): sample i is store row i.
    PATH.npz                 arrays `x`, optional integer `y` (-100 where unknown); a float `y` (N,)
                             or (N, D), NaN where unknown, makes it a regression data set (v3)
    PATH.npy                 inputs only
    PATH (a Zarr array)      inputs only
    mnist1d:train | mnist1d:test | mnist1d:unlabeled, optionally `?n=5000&seed=42`
    MODULE:FUNCTION          returns x, (x, y), {"x":..., "y":...} or a torch Dataset
Tokens: sample i is a token sequence and every position of it is one store row; the label of a
position is the next token of its sequence (-100 for the last).
    PATH.npz                 integer `input_ids` (N, L), optional `attention_mask` (N, L): 1 = real
                             token, the real tokens a prefix of each row
    PATH.parquet             an `input_ids` column of integer lists (ragged; needs pyarrow), or a
                             folder of .parquet shards (one data set, in name order)
    either, optionally       `labels` (Hugging Face's convention): position t's label is labels[t + 1],
                             -100 = not trained on (stored unlabelled, masked in stage two like padding)
    MODULE:FUNCTION          returns a list of 1-D integer arrays, or {"input_ids": ..., "attention_mask": ...}
The kind is told by the arrays' names (`input_ids` vs `x`) or a list of sequences, never by dtypes.
Rows are loaded whole. Token files are not: an uncompressed .npz (np.savez) is memory-mapped and
Parquet read by row group, so stage two can stream a corpus larger than memory (see TokenSource).

Both kinds carry a fingerprint (a sha256 of what the store's rows are made from: the input bytes, or
the tokens and the sequence boundaries) that ties a store to its data.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import math
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import numpy as np
import torch

from mtkd.pipeline.errors import SpecError
from mtkd.pipeline.specs import brief, import_object
from mtkd.pipeline.storage import is_url, location, zarr_store
from mtkd.pipeline.storage import read as read_object

IGNORE_LABEL = -100

MNIST1D_SPLITS = ("train", "test", "unlabeled")
# The standard MNIST-1D draw (4000 train / 1000 test) is seed 42, 5000 samples. The unlabelled
# transfer set is drawn with another seed so that none of its samples repeat a labelled one.
MNIST1D_DEFAULTS = {"train": (5000, 42), "test": (5000, 42), "unlabeled": (50000, 1234)}


@dataclass(frozen=True)
class RowData:
    """Rows in memory: inputs `x` (N, ...) float32 (or int64), class labels `y` (N,) int64 or None.

    Regression data (v3, a float `y`) has `y` None (no class labels: `labels` is all -100) and its
    `targets` (N, D) float32, NaN where unknown ((N,) given: D = 1)."""

    kind: ClassVar[str] = "rows"
    spec: str
    x: np.ndarray
    y: np.ndarray | None
    fingerprint: str = field(repr=False)
    targets: np.ndarray | None = field(default=None, repr=False)

    @property
    def regression(self) -> bool:
        return self.targets is not None

    @property
    def num_outputs(self) -> int:
        """D of the regression targets (0 for classification data)."""
        return 0 if self.targets is None else int(self.targets.shape[1])

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_rows(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> np.ndarray:
        """Labels with IGNORE_LABEL where unknown (all of them when the data has none)."""
        if self.y is None:
            return np.full(len(self.x), IGNORE_LABEL, dtype=np.int64)
        return self.y

    @property
    def labelled_rows(self) -> int:
        """Rows with a label (regression: with at least one known target)."""
        if self.targets is not None:
            return int((~np.isnan(self.targets)).any(axis=1).sum())
        return 0 if self.y is None else int((self.y != IGNORE_LABEL).sum())

    @property
    def max_label(self) -> int:
        """The largest label, IGNORE_LABEL when there is none."""
        return IGNORE_LABEL if self.y is None else int(self.y.max())


@dataclass(frozen=True)
class TokenData:
    """Token sequences, concatenated: sequence i is rows `offsets[i]:offsets[i + 1]` of `tokens`.

    Store row r is position r of this concatenation; its label is the next token of its sequence.
    `tokens` is a TokenSource (below): sliced, `tokens[lo:hi]`, it reads those rows as int64, from
    memory or from the file, so a corpus larger than memory is never loaded whole. Only the
    offsets (8 bytes a sequence) are held.
    """

    kind: ClassVar[str] = "tokens"
    spec: str
    tokens: TokenSource
    offsets: np.ndarray  # (num_seqs + 1,) int64, offsets[0] == 0, strictly increasing
    fingerprint: str = field(repr=False)
    max_label: int = IGNORE_LABEL  # the largest label (a token that follows another), IGNORE_LABEL if none
    # The data's own `labels` (Hugging Face convention), aligned with the tokens: position t's label is
    # given[t + 1]; -100 = not trained on (no CE, no KD: masked in stage two like padding). None: the next token.
    given_labels: TokenSource | None = field(default=None, repr=False)
    num_labelled: int = -1  # with given_labels: the positions whose label is not -100

    targets: ClassVar[None] = None  # regression targets are rows-only (RowData.targets)
    regression: ClassVar[bool] = False
    num_outputs: ClassVar[int] = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    @property
    def labelled_rows(self) -> int:
        """Positions with a label: every one but each sequence's last (or those `labels` gives)."""
        return self.num_rows - self.num_seqs if self.given_labels is None else self.num_labelled

    @property
    def masks_unlabelled(self) -> bool:
        """True when the data's `labels` say which positions are trained on: -100 ones are masked."""
        return self.given_labels is not None

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """(num_rows,) int64: the next token of the same sequence, IGNORE_LABEL at each sequence's end.

        Held whole (stage one writes them into the store); stage two never asks for them.
        """
        labels = np.empty(self.num_rows, dtype=np.int64)
        source = self.tokens if self.given_labels is None else self.given_labels  # shifted by one either way
        for lo in range(0, self.num_rows, SCAN_ROWS):
            hi = min(lo + SCAN_ROWS + 1, self.num_rows)
            labels[lo : hi - 1] = source[lo + 1 : hi]
        labels[self.offsets[1:] - 1] = IGNORE_LABEL
        return labels

    def sequences_in(self, start: int, stop: int) -> range:
        """The sequences holding any of rows [start, stop)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        return range(first, last)


# -- where a corpus's tokens live --------------------------------------------------------------------
#
# A corpus may be larger than memory (issue 10: stage two streams "the token inputs too"), so the
# tokens stay where they are and a TokenSource reads rows [lo, hi) of the concatenation on demand:
#   ArrayTokens    an in-memory concatenation (lists of sequences: MODULE:FUNCTION, make_token_data)
#   PaddedTokens   (N, L) input_ids and the sequence offsets: a .npz member memory-mapped in place
#                  when it is stored uncompressed (np.savez; np.load's mmap_mode does not map
#                  inside a zip), else the array np.load returns (a np.savez_compressed member
#                  cannot be mapped, so it is read whole)
#   ParquetTokens  an `input_ids` list column, read by row group, the last few groups cached
# Loading reads the tokens once, in pieces of SCAN_ROWS, for the fingerprint and the checks.

SCAN_ROWS = 1 << 20  # tokens per piece of a pass over the data (8 MB as int64)
# Decoded Parquet row groups kept for the next reads (the loader reads a window's sequences, which
# lie in a few units of the corpus): a group bigger than this is still read, and kept alone.
PARQUET_CACHE_BYTES = 64 << 20


class TokenSource:
    """Rows of a corpus's token concatenation, read on demand: `source[lo:hi]` -> (hi - lo,) int64."""

    num_rows: int
    resident = False  # True: the tokens are in memory already (holding them costs nothing more)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a fresh int64 array."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("token rows are read by slices, tokens[lo:hi]")
        lo, hi, step = key.indices(self.num_rows)
        if step != 1:
            raise TypeError("token rows are read by contiguous slices")
        return self.read(lo, max(lo, hi))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every token, in memory (for small data and tests; the loader reads in pieces)."""
        whole = self.read(0, self.num_rows)
        return whole if dtype is None else whole.astype(dtype)


class ArrayTokens(TokenSource):
    resident = True

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens  # (num_rows,) int64
        self.num_rows = len(tokens)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi].copy()


class PaddedTokens(TokenSource):
    """(N, L) input_ids whose row i holds sequence i in its first offsets[i + 1] - offsets[i] columns."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets
        self.lengths = np.diff(offsets)
        self.num_rows = int(offsets[-1])
        self.resident = not isinstance(ids, np.memmap)

    def read(self, lo: int, hi: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi, side="left"))
        if hi <= lo:
            return np.empty(0, dtype=np.int64)
        block = np.asarray(self.ids[first:last])  # (s, L): only these rows are read from the file
        real = np.arange(block.shape[1])[None, :] < self.lengths[first:last, None]
        start = lo - int(self.offsets[first])
        return block[real][start : start + hi - lo].astype(np.int64)


class ParquetTokens(TokenSource):
    """A column of integer lists in one or more Parquet files (shards of one data set, in order):
    `groups[g]..groups[g + 1]` are the sequences of row group g, counted across the files, and
    `parts[g]` its (file, row group in that file)."""

    def __init__(self, paths: list[Path], parts: list[tuple[int, int]], groups: np.ndarray, offsets: np.ndarray,
                 column: str = "input_ids"):
        self.paths, self.parts, self.groups, self.offsets, self.column = paths, parts, groups, offsets, column
        self.num_rows = int(offsets[-1])
        self._files: dict[int, Any] = {}
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # the loader's reader thread and the trainer may both read

    def read(self, lo: int, hi: int) -> np.ndarray:
        if hi <= lo:
            return np.empty(0, dtype=np.int64)
        first_seq = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last_seq = int(np.searchsorted(self.offsets, hi, side="left"))
        g0 = int(np.searchsorted(self.groups, first_seq, side="right")) - 1
        g1 = int(np.searchsorted(self.groups, last_seq, side="left"))
        parts = []
        with self._lock:
            for g in range(g0, g1):
                base = int(self.offsets[self.groups[g]])  # the group's first row
                values = self._group(g)
                parts.append(values[max(lo - base, 0) : max(min(hi - base, len(values)), 0)])
        return np.concatenate(parts)

    def _group(self, g: int) -> np.ndarray:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        f, rg = self.parts[g]
        if f not in self._files:
            import pyarrow.parquet as pq

            self._files[f] = pq.ParquetFile(self.paths[f])
        column = self._files[f].read_row_group(rg, columns=[self.column]).column(0).combine_chunks()
        values = column.flatten().to_numpy().astype(np.int64)  # flatten: the lists' values, in order
        expected = int(self.offsets[self.groups[g + 1]] - self.offsets[self.groups[g]])
        if len(values) != expected:  # the file changed since it was loaded
            raise SpecError(f"data {str(self.paths[f])!r}: row group {rg} now holds {len(values)} {self.column}, not {expected}")
        self._cache[g] = values
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > PARQUET_CACHE_BYTES:
            self._cache.popitem(last=False)
        return values


Data = RowData | TokenData


def fingerprint(x: np.ndarray) -> str:
    """sha256 over the inputs' dtype, shape and bytes: the identity of a data set of rows."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def _scan_tokens(spec: str, source: TokenSource, offsets: np.ndarray, labels: TokenSource | None = None) -> TokenData:
    """Read the tokens once, in pieces: refuse negative ids, find the largest label, and fingerprint.

    The fingerprint is a sha256 over the tokens and the sequence boundaries (the same tokens cut
    otherwise differ), as int64 with their shapes: the same bytes whether the tokens came from
    memory, a mapped .npz or Parquet row groups. Given `labels` (aligned with the tokens) are checked
    (>= 0 or -100), give max_label, and join the fingerprint (the store holds them).
    """
    n = source.num_rows
    h = hashlib.sha256(b"mtkd-tokens")
    h.update(f"{(n,)}".encode())
    top = IGNORE_LABEL
    counted, label_hash = 0, hashlib.sha256()
    firsts = offsets[:-1]  # each sequence's first token is no position's label
    for lo in range(0, n, SCAN_ROWS):
        hi = min(lo + SCAN_ROWS, n)
        piece = source.read(lo, hi)
        if len(piece) != hi - lo:
            raise SpecError(f"data {spec!r}: rows {lo}..{hi} read {len(piece)} tokens")
        if int(piece.min()) < 0:
            at = lo + int(np.flatnonzero(piece < 0)[0])
            seq = int(np.searchsorted(offsets, at, side="right")) - 1
            raise SpecError(f"data {spec!r}: sequence {seq} holds a negative token id {int(piece[at - lo])}")
        h.update(memoryview(np.ascontiguousarray(piece, dtype="<i8")).cast("B"))
        labelled = np.ones(hi - lo, dtype=bool)
        labelled[firsts[np.searchsorted(firsts, lo) : np.searchsorted(firsts, hi)] - lo] = False
        if labels is not None:  # the labels take the place of the next tokens
            piece = labels.read(lo, hi)
            bad = (piece < 0) & (piece != IGNORE_LABEL)
            if bad.any():
                at = lo + int(np.flatnonzero(bad)[0])
                seq = int(np.searchsorted(offsets, at, side="right")) - 1
                raise SpecError(f"data {spec!r}: labels of sequence {seq} hold {int(piece[at - lo])} (token ids, or -100 for none)")
            labelled &= piece != IGNORE_LABEL
            counted += int(labelled.sum())
            label_hash.update(memoryview(np.ascontiguousarray(piece, dtype="<i8")).cast("B"))
        top = max(top, int(np.max(piece, where=labelled, initial=IGNORE_LABEL)))  # no copy of the piece
    h.update(f"{offsets.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(offsets, dtype="<i8")).cast("B"))
    if labels is not None:  # data without `labels` keeps the fingerprint it always had
        h.update(b"labels" + label_hash.digest())
    return TokenData(spec=spec, tokens=source, offsets=offsets, fingerprint=h.hexdigest(), max_label=top,
                     given_labels=labels, num_labelled=counted if labels is not None else -1)


def _offsets(spec: str, lengths: np.ndarray) -> np.ndarray:
    """(num_seqs + 1,) int64 boundaries of sequences of these lengths; empty sequences refused."""
    if len(lengths) == 0:
        raise SpecError(f"data {spec!r}: token data needs a non-empty list of sequences")
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise SpecError(f"data {spec!r}: sequence {int(empty[0])} is empty")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def make_row_data(spec: str, x: Any, y: Any = None) -> RowData:
    """Validate and normalise inputs/labels from any source into a RowData."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if x.ndim < 1 or len(x) == 0:
        raise SpecError(f"data {spec!r}: inputs must be a non-empty array with rows, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise SpecError(f"data {spec!r}: inputs must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)  # once, before any stage writes a byte
        if not finite.all():
            raise SpecError(f"data {spec!r}: row {int(np.flatnonzero(~finite)[0])} holds NaN/inf (inputs must be finite)")
    x = np.ascontiguousarray(x)
    if y is not None:
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        if np.issubdtype(y.dtype, np.floating):  # v3: float labels make a regression data set
            return RowData(spec=spec, x=x, y=None, fingerprint=fingerprint(x), targets=_regression_targets(spec, y, len(x)))
        if y.shape != (len(x),):
            raise SpecError(f"data {spec!r}: labels must have shape ({len(x)},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise SpecError(f"data {spec!r}: labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        bad = (y < 0) & (y != IGNORE_LABEL)
        if bad.any():
            raise SpecError(
                f"data {spec!r}: label {int(y[bad][0])} at row {int(np.flatnonzero(bad)[0])} is negative "
                f"(use {IGNORE_LABEL} for unknown)"
            )
    return RowData(spec=spec, x=x, y=y, fingerprint=fingerprint(x))


def _regression_targets(spec: str, y: np.ndarray, n: int) -> np.ndarray:
    """A float `y` (N,) or (N, D) -> (N, D) float32 targets, NaN where unknown; inf is refused."""
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] < 1):
        raise SpecError(f"data {spec!r}: float labels (regression targets) must have shape ({n},) or ({n}, D), got {y.shape}")
    targets = np.ascontiguousarray(y.reshape(n, -1), dtype=np.float32)
    bad = np.isinf(targets).any(axis=1)
    if bad.any():
        raise SpecError(f"data {spec!r}: target row {int(np.flatnonzero(bad)[0])} holds inf (use NaN for unknown)")
    return targets


def make_token_data(spec: str, sequences: Any) -> TokenData:
    """A list of 1-D integer token arrays (one per sequence, none empty) -> TokenData, in memory."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise SpecError(f"data {spec!r}: token data needs a non-empty list of sequences")
    arrays = []
    for i, seq in enumerate(sequences):
        a = np.asarray(seq.detach().cpu() if isinstance(seq, torch.Tensor) else seq)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise SpecError(f"data {spec!r}: sequence {i} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        arrays.append(a.astype(np.int64, copy=False))
    offsets = _offsets(spec, np.array([len(a) for a in arrays], dtype=np.int64))
    tokens = np.ascontiguousarray(np.concatenate(arrays))
    tokens.flags.writeable = False  # read through the source only
    return _scan_tokens(spec, ArrayTokens(tokens), offsets)


def _padded_token_data(spec: str, input_ids: Any, attention_mask: Any = None, labels: Any = None) -> TokenData:
    """(N, L) input_ids with an optional (N, L) attention_mask whose 1s are a prefix of each row, and
    optional (N, L) integer labels (Hugging Face's: -100 where not trained on).

    Either may be a memory map: both are read in pieces of about SCAN_ROWS tokens.
    """
    ids = input_ids if isinstance(input_ids, np.ndarray) else np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SpecError(f"data {spec!r}: input_ids must be an (N, L) integer array, got shape {ids.shape} dtype {ids.dtype}")
    n, width = ids.shape
    if attention_mask is None:
        lengths = np.full(n, width, dtype=np.int64)
    else:
        mask = attention_mask if isinstance(attention_mask, np.ndarray) else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise SpecError(f"data {spec!r}: attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        lengths = np.empty(n, dtype=np.int64)
        step = max(1, SCAN_ROWS // max(width, 1))
        for lo in range(0, n, step):
            m = np.asarray(mask[lo : lo + step])
            if not np.isin(m, (0, 1)).all():
                raise SpecError(f"data {spec!r}: attention_mask must hold only 0 and 1")
            lengths[lo : lo + len(m)] = m.sum(axis=1)
            prefix = np.arange(width)[None, :] < lengths[lo : lo + len(m), None]
            bad = np.flatnonzero((prefix != m.astype(bool)).any(axis=1))
            if len(bad):
                raise SpecError(f"data {spec!r}: attention_mask row {lo + int(bad[0])} is not a prefix of 1s (pad on the right)")
    offsets = _offsets(spec, lengths)
    given = None
    if labels is not None:
        given = labels if isinstance(labels, np.ndarray) else np.asarray(labels)
        if given.shape != ids.shape or not np.issubdtype(given.dtype, np.integer):
            raise SpecError(f"data {spec!r}: labels must be an integer array of input_ids' shape {ids.shape}, "
                            f"got shape {given.shape} dtype {given.dtype}")
        given = PaddedTokens(given, offsets)
    return _scan_tokens(spec, PaddedTokens(ids, offsets), offsets, given)


def load_data(spec: str, storage_options: dict[str, Any] | None = None) -> Data:
    """Parse a data spec and load it (see the module docstring for the forms). A file or Zarr array
    may be named by URL (`s3://...`, SPEC "Where a store lives"), opened with `storage_options`."""
    if is_url(spec):
        return _load_url(spec, storage_options or {})
    if spec.startswith("mnist1d:"):
        return _load_mnist1d(spec)
    path = Path(spec)
    if spec.endswith(".npz"):
        return _load_npz(spec, path)
    if spec.endswith(".parquet") or (path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())):
        return _load_parquet(spec, path)  # a file, or a folder of shards
    if spec.endswith(".npy"):
        if not path.is_file():
            raise SpecError(f"data {spec!r}: no such file")
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as e:  # corrupt file, pickled object array
            raise SpecError(f"data {spec!r}: cannot read it: {brief(e)}") from e
        return make_row_data(spec, x)
    if path.is_dir():
        return _load_zarr(spec, path)
    if ":" in spec and not path.exists():
        return _load_function(spec)
    raise SpecError(
        f"data {spec!r}: not a .npz/.npy/.parquet file, a Zarr array, mnist1d:SPLIT or MODULE:FUNCTION"
    )


# The arrays an .npz may hold, by the kind its first array names (SPEC v3: unknown arrays are an error).
NPZ_ARRAYS = {"x": ("x", "y"), "input_ids": ("input_ids", "attention_mask", "labels")}


def _check_npz_arrays(spec: str, names: list[str]) -> None:
    """One kind per file, and no array that kind does not know: a stray array is never ignored."""
    kinds = [key for key in NPZ_ARRAYS if key in names]
    if len(kinds) > 1:
        raise SpecError(f"data {spec!r} holds both 'x' (rows) and 'input_ids' (tokens): one kind of data per file")
    unknown = sorted(set(names) - set(NPZ_ARRAYS[kinds[0]])) if kinds else []
    if unknown:
        raise SpecError(f"data {spec!r}: unknown arrays {unknown} beside {kinds[0]!r} (known: {', '.join(NPZ_ARRAYS[kinds[0]])})")


def _load_url(spec: str, options: dict[str, Any]) -> Data:
    """Data at a URL: an .npz or .npy read into memory whole (an object store has no memory map),
    or a Zarr array through zarr's own FsspecStore; the same checks as on a disk."""
    loc = location(spec, options)  # BadInputError: a scheme without its backend, an unreachable bucket
    if spec.endswith((".npz", ".npy")):
        try:
            raw = io.BytesIO(bytes(read_object(loc)))
        except FileNotFoundError:
            raise SpecError(f"data {spec!r}: no such object") from None
        if spec.endswith(".npz"):
            return _load_npz(spec, raw)
        try:
            x = np.load(raw, allow_pickle=False)
        except Exception as e:  # corrupt file, pickled object array
            raise SpecError(f"data {spec!r}: cannot read it: {brief(e)}") from e
        return make_row_data(spec, x)
    if (loc / "zarr.json").is_file():
        return _load_zarr(spec, zarr_store(loc))
    raise SpecError(f"data {spec!r}: not an .npz/.npy object or a Zarr array (other forms are read from a local path)")


def _load_npz(spec: str, path: Path | io.BytesIO) -> Data:
    local = isinstance(path, Path)  # else the bytes of an object read whole (_load_url)
    if local and not path.is_file():
        raise SpecError(f"data {spec!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            _check_npz_arrays(spec, list(f.files))
            if "input_ids" in f:
                members = ("input_ids", "attention_mask", "labels")
                mapped = {name: _mapped_member(path, name) if local else None for name in members if name in f}
                # A member stored compressed cannot be mapped: np.load reads it whole.
                ids = mapped["input_ids"] if mapped["input_ids"] is not None else f["input_ids"]
                mask = mapped.get("attention_mask")
                if mask is None and "attention_mask" in f:
                    mask = f["attention_mask"]
                given = mapped.get("labels")
                if given is None and "labels" in f:
                    given = f["labels"]
                x = y = None
            elif "x" in f:
                x, y = f["x"], f["y"] if "y" in f else None
            else:
                raise SpecError(f"data {spec!r}: no array named 'x' or 'input_ids' (found {sorted(f.files)})")
    except SpecError:
        raise
    except Exception as e:  # not a zip, truncated, pickled object arrays, a CRC mismatch
        raise SpecError(f"data {spec!r}: cannot read it: {brief(e)}") from e
    if x is None:
        return _padded_token_data(spec, ids, mask, given)
    return make_row_data(spec, x, y)


def _mapped_member(path: Path, name: str) -> np.ndarray | None:
    """Member `name` of an .npz as a read-only memory map, or None when it is stored compressed.

    np.savez stores members uncompressed, so an array's bytes lie contiguous in the zip: after the
    member's local header (30 bytes, its name, its extra field) comes the .npy header, then the
    data. The member's CRC-32 is checked first, reading it once in pieces, so a flipped byte is an
    error as it is through np.load (which checks it on read).
    """
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:  # compressed or encrypted
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"member {info.filename} has no local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        crc, left = 0, info.file_size
        while left:
            piece = f.read(min(left, SCAN_ROWS * 8))  # the scan's piece size: the check holds no more
            if not piece:
                raise ValueError(f"member {info.filename} is truncated")
            crc, left = zlib.crc32(piece, crc), left - len(piece)
        if crc != info.CRC:
            raise ValueError(f"member {info.filename} fails its CRC-32 check (a damaged file)")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        data_start = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename} holds Python objects")
    if data_start - start + math.prod(shape) * dtype.itemsize > info.file_size:
        raise ValueError(f"member {info.filename} is truncated")
    if math.prod(shape) == 0:  # an empty array cannot be mapped; nothing to map either
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=data_start)


def _load_parquet(spec: str, path: Path) -> TokenData:
    """An `input_ids` column of integer lists (and optionally `labels`, lists of the same lengths),
    in one file or a folder of `.parquet` shards (one data set, the shards in name order), read
    one row group at a time (never the whole file).

    One pass reads each group's list lengths (the offsets) and checks for nulls; the scan then
    reads the tokens again for the fingerprint (its hash starts with the token count).
    """
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    elif path.is_file():
        paths = [path]
    else:
        raise SpecError(f"data {spec!r}: no such file")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SpecError(f"data {spec!r}: reading .parquet needs pyarrow (pip install 'mtkd[hf]')") from e
    files, has_labels = [], None
    for p in paths:
        where = spec if len(paths) == 1 else f"{spec}/{p.name}"
        try:
            file = pq.ParquetFile(p)
            kinds = {name: file.schema_arrow.field(name).type for name in ("input_ids", "labels")
                     if name in file.schema_arrow.names or name == "input_ids"}
        except Exception as e:  # not parquet, no such column
            raise SpecError(f"data {where!r}: cannot read an 'input_ids' column: {brief(e)}") from e
        for name, kind in kinds.items():
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
                raise SpecError(f"data {where!r}: {name} must be a column of integer lists, got {kind}")
        if has_labels is not None and has_labels != ("labels" in kinds):
            raise SpecError(f"data {where!r}: has {'a' if 'labels' in kinds else 'no'} labels column, unlike the shards before it")
        has_labels = "labels" in kinds
        files.append(file)
    lengths, groups, parts = [], [0], []
    for f, (p, file) in enumerate(zip(paths, files)):
        where = spec if len(paths) == 1 else f"{spec}/{p.name}"
        try:
            for g in range(file.num_row_groups):
                table = file.read_row_group(g, columns=["input_ids", "labels"] if has_labels else ["input_ids"])
                column = table.column(0).combine_chunks()
                if column.null_count:
                    raise SpecError(f"data {where!r}: input_ids has {column.null_count} null rows (row group {g})")
                if column.flatten().null_count:
                    raise SpecError(f"data {where!r}: input_ids holds null token ids (row group {g})")
                counts = np.diff(column.offsets.to_numpy()).astype(np.int64)
                if has_labels:
                    given = table.column(1).combine_chunks()
                    if given.null_count or given.flatten().null_count or not np.array_equal(np.diff(given.offsets.to_numpy()), counts):
                        raise SpecError(f"data {where!r}: labels must be lists of input_ids' lengths, without nulls (row group {g})")
                lengths.append(counts)
                groups.append(groups[-1] + len(column))
                parts.append((f, g))
        except SpecError:
            raise
        except Exception as e:  # a damaged page
            raise SpecError(f"data {where!r}: cannot read an 'input_ids' column: {brief(e)}") from e
    offsets = _offsets(spec, np.concatenate(lengths) if lengths else np.empty(0, np.int64))
    groups_at = np.array(groups, dtype=np.int64)
    given = ParquetTokens(paths, parts, groups_at, offsets, "labels") if has_labels else None
    return _scan_tokens(spec, ParquetTokens(paths, parts, groups_at, offsets), offsets, given)


def _load_zarr(spec: str, path: Any) -> RowData:
    """A Zarr array at `path` (a local path, or zarr's store for a URL) as rows."""
    import zarr  # imported here: only this spec form needs it at parse time

    try:
        arr = zarr.open_array(path, mode="r")
    except Exception as e:  # zarr raises several unrelated types for "not an array"
        raise SpecError(f"data {spec!r}: not a Zarr array ({brief(e)})") from e
    return make_row_data(spec, arr[...])


def _load_mnist1d(spec: str) -> RowData:
    body, _, query = spec[len("mnist1d:") :].partition("?")
    if body not in MNIST1D_SPLITS:
        raise SpecError(f"data {spec!r}: mnist1d split must be one of {', '.join(MNIST1D_SPLITS)}")
    n, seed = MNIST1D_DEFAULTS[body]
    try:
        options = parse_qsl(query, strict_parsing=True) if query else []
    except ValueError as e:
        raise SpecError(f"data {spec!r}: options are ?n=INT&seed=INT ({brief(e)})") from e
    for key, value in options:
        if key not in ("n", "seed") or not value.isdigit():
            raise SpecError(f"data {spec!r}: options are n=INT and seed=INT, got {key}={value}")
        n, seed = (int(value), seed) if key == "n" else (n, int(value))
    if n < 10:
        raise SpecError(f"data {spec!r}: n must be at least 10 (one sample per class), got {n}")
    try:
        d = _mnist1d_arrays(n, seed)
    except ImportError as e:
        raise SpecError(f"data {spec!r}: needs the mnist1d package (pip install 'mtkd[demo]')") from e
    if body == "train":
        return make_row_data(spec, d["x"], d["y"])
    if body == "test":
        return make_row_data(spec, d["x_test"], d["y_test"])
    return make_row_data(spec, np.concatenate([d["x"], d["x_test"]]))


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """One MNIST-1D draw, kept per process: the demo reads the same splits several times."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = n, seed
    # make_dataset generates locally from templates shipped with the package; it never downloads.
    d = make_dataset(args, template=None)
    for key in ("x", "x_test", "y", "y_test"):
        d[key].flags.writeable = False  # shared between callers: nobody may change it in place
    return d


def _load_function(spec: str) -> Data:
    fn = import_object(spec, what="data")
    try:
        out = fn()
    except Exception as e:
        raise SpecError(f"data {spec!r}: calling it failed: {brief(e)}") from e
    if isinstance(out, list):  # SPEC: a list of 1-D integer arrays is token data
        return make_token_data(spec, out)
    if isinstance(out, dict):
        if "input_ids" in out:
            ids = out["input_ids"]
            if isinstance(ids, list) and "attention_mask" not in out and "labels" not in out:
                return make_token_data(spec, ids)
            return _padded_token_data(spec, ids, out.get("attention_mask"), out.get("labels"))
        if "x" not in out:
            raise SpecError(f"data {spec!r}: returned a dict without 'x' or 'input_ids'")
        return make_row_data(spec, out["x"], out.get("y"))
    if isinstance(out, tuple) and len(out) == 2:
        return make_row_data(spec, *out)
    if isinstance(out, torch.utils.data.Dataset):
        return _materialise_dataset(spec, out)
    return make_row_data(spec, out)


def _materialise_dataset(spec: str, ds: torch.utils.data.Dataset) -> RowData:
    # A Dataset is read once, in order, into memory: the fingerprint needs every input byte anyway.
    try:
        items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
    except TypeError as e:
        raise SpecError(f"data {spec!r}: the Dataset must support len() and indexing") from e
    if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2:
        xs = torch.stack([torch.as_tensor(a) for a, _ in items])
        ys = torch.as_tensor([int(b) for _, b in items], dtype=torch.int64)
        return make_row_data(spec, xs, ys)
    return make_row_data(spec, torch.stack([torch.as_tensor(a) for a in items]))
