"""Data specs (`--data`) -> the data in memory: `RowData` (classification) or `TokenData` (language models).

Rows (SPEC.md, "Two kinds of data"): sample i is store row i.
    PATH.npz                 arrays `x`, optional integer `y` (-100 where unknown)
    PATH.npy                 inputs only
    PATH (a Zarr array)      inputs only
    mnist1d:train | mnist1d:test | mnist1d:unlabeled, optionally `?n=5000&seed=42`
    MODULE:FUNCTION          returns x, (x, y), {"x":..., "y":...} or a torch Dataset
Tokens: sample i is a token sequence and every position of it is one store row; the label of a
position is the next token of its sequence (-100 for the last).
    PATH.npz                 integer `input_ids` (N, L), optional `attention_mask` (N, L): 1 = real
                             token, the real tokens a prefix of each row
    PATH.parquet             an `input_ids` column of integer lists (ragged; needs pyarrow)
    MODULE:FUNCTION          returns a list of 1-D integer arrays, or {"input_ids": ..., "attention_mask": ...}
The kind is told by the arrays' names (`input_ids` vs `x`) or a list of sequences, never by dtypes.

Both kinds carry a fingerprint (a sha256 of what the store's rows are made from: the input bytes, or
the tokens and the sequence boundaries) that ties a store to its data.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import numpy as np
import torch

from mtkd.pipeline.errors import SpecError
from mtkd.pipeline.specs import brief, import_object

IGNORE_LABEL = -100

MNIST1D_SPLITS = ("train", "test", "unlabeled")
# The standard MNIST-1D draw (4000 train / 1000 test) is seed 42, 5000 samples. The unlabelled
# transfer set is drawn with another seed so that none of its samples repeat a labelled one.
MNIST1D_DEFAULTS = {"train": (5000, 42), "test": (5000, 42), "unlabeled": (50000, 1234)}


@dataclass(frozen=True)
class RowData:
    """Classification rows in memory: inputs `x` (N, ...) float32 (or int64), labels `y` (N,) int64 or None."""

    kind: ClassVar[str] = "rows"
    spec: str
    x: np.ndarray
    y: np.ndarray | None
    fingerprint: str = field(repr=False)

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


@dataclass(frozen=True)
class TokenData:
    """Token sequences in memory, concatenated: sequence i is `tokens[offsets[i]:offsets[i + 1]]`.

    Store row r is position r of this concatenation; its label is the next token of its sequence.
    """

    kind: ClassVar[str] = "tokens"
    spec: str
    tokens: np.ndarray  # (num_rows,) int64
    offsets: np.ndarray  # (num_seqs + 1,) int64, offsets[0] == 0, strictly increasing
    fingerprint: str = field(repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """(num_rows,) int64: the next token of the same sequence, IGNORE_LABEL at each sequence's end."""
        labels = np.empty(self.num_rows, dtype=np.int64)
        labels[:-1] = self.tokens[1:]
        labels[self.offsets[1:] - 1] = IGNORE_LABEL
        return labels

    def sequences_in(self, start: int, stop: int) -> range:
        """The sequences holding any of rows [start, stop)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        return range(first, last)


Data = RowData | TokenData


def fingerprint(x: np.ndarray) -> str:
    """sha256 over the inputs' dtype, shape and bytes: the identity of a data set of rows."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def token_fingerprint(tokens: np.ndarray, offsets: np.ndarray) -> str:
    """sha256 over the tokens and the sequence boundaries (the same tokens cut otherwise differ)."""
    h = hashlib.sha256(b"mtkd-tokens")
    for a in (tokens, offsets):
        a = np.ascontiguousarray(a, dtype="<i8")
        h.update(f"{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


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


def make_token_data(spec: str, sequences: Any) -> TokenData:
    """A list of 1-D integer token arrays (one per sequence, none empty) -> TokenData."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise SpecError(f"data {spec!r}: token data needs a non-empty list of sequences")
    arrays = []
    for i, seq in enumerate(sequences):
        a = np.asarray(seq.detach().cpu() if isinstance(seq, torch.Tensor) else seq)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise SpecError(f"data {spec!r}: sequence {i} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        if len(a) == 0:
            raise SpecError(f"data {spec!r}: sequence {i} is empty")
        if int(a.min()) < 0:
            raise SpecError(f"data {spec!r}: sequence {i} holds a negative token id {int(a.min())}")
        arrays.append(a.astype(np.int64, copy=False))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    tokens = np.ascontiguousarray(np.concatenate(arrays))
    return TokenData(spec=spec, tokens=tokens, offsets=offsets, fingerprint=token_fingerprint(tokens, offsets))


def _padded_token_data(spec: str, input_ids: Any, attention_mask: Any = None) -> TokenData:
    """(N, L) input_ids with an optional (N, L) attention_mask whose 1s are a prefix of each row."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SpecError(f"data {spec!r}: input_ids must be an (N, L) integer array, got shape {ids.shape} dtype {ids.dtype}")
    if attention_mask is None:
        return make_token_data(spec, list(ids))
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise SpecError(f"data {spec!r}: attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise SpecError(f"data {spec!r}: attention_mask must hold only 0 and 1")
    lengths = mask.sum(axis=1)
    prefix = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    bad = np.flatnonzero((prefix != mask.astype(bool)).any(axis=1))
    if len(bad):
        raise SpecError(f"data {spec!r}: attention_mask row {int(bad[0])} is not a prefix of 1s (pad on the right)")
    return make_token_data(spec, [row[:n] for row, n in zip(ids, lengths)])


def load_data(spec: str) -> Data:
    """Parse a data spec and load it (see the module docstring for the forms)."""
    if spec.startswith("mnist1d:"):
        return _load_mnist1d(spec)
    path = Path(spec)
    if spec.endswith(".npz"):
        return _load_npz(spec, path)
    if spec.endswith(".parquet"):
        return _load_parquet(spec, path)
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


def _load_npz(spec: str, path: Path) -> Data:
    if not path.is_file():
        raise SpecError(f"data {spec!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "input_ids" in f:
                ids, mask = f["input_ids"], f["attention_mask"] if "attention_mask" in f else None
                x = y = None
            elif "x" in f:
                x, y = f["x"], f["y"] if "y" in f else None
            else:
                raise SpecError(f"data {spec!r}: no array named 'x' or 'input_ids' (found {sorted(f.files)})")
    except SpecError:
        raise
    except Exception as e:  # not a zip, truncated, pickled object arrays
        raise SpecError(f"data {spec!r}: cannot read it: {brief(e)}") from e
    if x is None:
        return _padded_token_data(spec, ids, mask)
    return make_row_data(spec, x, y)


def _load_parquet(spec: str, path: Path) -> TokenData:
    if not path.is_file():
        raise SpecError(f"data {spec!r}: no such file")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SpecError(f"data {spec!r}: reading .parquet needs pyarrow (pip install 'mtkd[hf]')") from e
    try:
        table = pq.read_table(path, columns=["input_ids"])
    except Exception as e:  # not parquet, no such column
        raise SpecError(f"data {spec!r}: cannot read an 'input_ids' column: {brief(e)}") from e
    column = table.column("input_ids").combine_chunks()
    import pyarrow as pa

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not pa.types.is_integer(column.type.value_type):
        raise SpecError(f"data {spec!r}: input_ids must be a column of integer lists, got {column.type}")
    if column.null_count:
        raise SpecError(f"data {spec!r}: input_ids has {column.null_count} null rows")
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy().astype(np.int64)[offsets[0] :]
    offsets -= offsets[0]
    return make_token_data(spec, [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])])


def _load_zarr(spec: str, path: Path) -> RowData:
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
            if isinstance(ids, list) and "attention_mask" not in out:
                return make_token_data(spec, ids)
            return _padded_token_data(spec, ids, out.get("attention_mask"))
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
