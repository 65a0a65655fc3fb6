"""What a user writes on the command line: data specs (`--data`) and model specs (TOML files).

Data specs (SPEC.md, "Specs a user writes"):
    PATH.npz                 arrays `x`, optional integer `y` (-100 where unknown)
    PATH.npy                 inputs only
    PATH (a Zarr array)      inputs only
    mnist1d:train | mnist1d:test | mnist1d:unlabeled, optionally `?n=5000&seed=42`
    MODULE:FUNCTION          returns x, (x, y), {"x":..., "y":...} or a torch Dataset

Every spec becomes an `ArrayData`: inputs and labels in memory plus the fingerprint (a sha256 of the
input bytes) that ties a store to its data. Row i of a store is sample i of its data.

Model specs are TOML files with `[[teachers]]` tables or one `[student]` table; relative paths
resolve against the TOML's folder and the current directory is importable.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
import sys
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from mtkd.pipeline.errors import CheckpointError, SpecError

IGNORE_LABEL = -100


def _brief(e: BaseException) -> str:
    """An exception as one line (errors reach the user as one line; torch's run to paragraphs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

MNIST1D_SPLITS = ("train", "test", "unlabeled")
# The standard MNIST-1D draw (4000 train / 1000 test) is seed 42, 5000 samples. The unlabelled
# transfer set is drawn with another seed so that none of its samples repeat a labelled one.
MNIST1D_DEFAULTS = {"train": (5000, 42), "test": (5000, 42), "unlabeled": (50000, 1234)}


@dataclass(frozen=True)
class ArrayData:
    """A data set in memory: inputs `x` (N, ...) float32, labels `y` (N,) int64 or None."""

    spec: str
    x: np.ndarray
    y: np.ndarray | None
    fingerprint: str = field(repr=False)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> np.ndarray:
        """Labels with IGNORE_LABEL where unknown (all of them when the data has none)."""
        if self.y is None:
            return np.full(len(self.x), IGNORE_LABEL, dtype=np.int64)
        return self.y


def check_out_path(path: Path, option: str = "--out") -> None:
    """Refuse an output path that cannot be created: one of its parents is a file (BadInputError)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpecError(f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            return


def fingerprint(x: np.ndarray) -> str:
    """sha256 over the inputs' dtype, shape and bytes: the identity of a data set."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def make_array_data(spec: str, x: Any, y: Any = None) -> ArrayData:
    """Validate and normalise inputs/labels from any source into an ArrayData."""
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
    return ArrayData(spec=spec, x=x, y=y, fingerprint=fingerprint(x))


def load_data(spec: str) -> ArrayData:
    """Parse a data spec and load it (see the module docstring for the forms)."""
    if spec.startswith("mnist1d:"):
        return _load_mnist1d(spec)
    path = Path(spec)
    if spec.endswith(".npz"):
        return _load_npz(spec, path)
    if spec.endswith(".npy"):
        if not path.is_file():
            raise SpecError(f"data {spec!r}: no such file")
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as e:  # corrupt file, pickled object array
            raise SpecError(f"data {spec!r}: cannot read it: {_brief(e)}") from e
        return make_array_data(spec, x)
    if path.is_dir():
        return _load_zarr(spec, path)
    if ":" in spec and not path.exists():
        return _load_function(spec)
    raise SpecError(
        f"data {spec!r}: not a .npz/.npy file, a Zarr array, mnist1d:SPLIT or MODULE:FUNCTION"
    )


def _load_npz(spec: str, path: Path) -> ArrayData:
    if not path.is_file():
        raise SpecError(f"data {spec!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise SpecError(f"data {spec!r}: no array named 'x' (found {sorted(f.files)})")
            x, y = f["x"], f["y"] if "y" in f else None
    except SpecError:
        raise
    except Exception as e:  # not a zip, truncated, pickled object arrays
        raise SpecError(f"data {spec!r}: cannot read it: {_brief(e)}") from e
    return make_array_data(spec, x, y)


def _load_zarr(spec: str, path: Path) -> ArrayData:
    import zarr  # imported here: only this spec form needs it at parse time

    try:
        arr = zarr.open_array(path, mode="r")
    except Exception as e:  # zarr raises several unrelated types for "not an array"
        raise SpecError(f"data {spec!r}: not a Zarr array ({_brief(e)})") from e
    return make_array_data(spec, arr[...])


def _load_mnist1d(spec: str) -> ArrayData:
    body, _, query = spec[len("mnist1d:") :].partition("?")
    if body not in MNIST1D_SPLITS:
        raise SpecError(f"data {spec!r}: mnist1d split must be one of {', '.join(MNIST1D_SPLITS)}")
    n, seed = MNIST1D_DEFAULTS[body]
    try:
        options = parse_qsl(query, strict_parsing=True) if query else []
    except ValueError as e:
        raise SpecError(f"data {spec!r}: options are ?n=INT&seed=INT ({_brief(e)})") from e
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
        return make_array_data(spec, d["x"], d["y"])
    if body == "test":
        return make_array_data(spec, d["x_test"], d["y_test"])
    return make_array_data(spec, np.concatenate([d["x"], d["x_test"]]))


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


def _load_function(spec: str) -> ArrayData:
    fn = import_object(spec, what="data")
    try:
        out = fn()
    except Exception as e:
        raise SpecError(f"data {spec!r}: calling it failed: {_brief(e)}") from e
    if isinstance(out, dict):
        if "x" not in out:
            raise SpecError(f"data {spec!r}: returned a dict without 'x'")
        return make_array_data(spec, out["x"], out.get("y"))
    if isinstance(out, tuple) and len(out) == 2:
        return make_array_data(spec, *out)
    if isinstance(out, torch.utils.data.Dataset):
        return _materialise_dataset(spec, out)
    return make_array_data(spec, out)


def _materialise_dataset(spec: str, ds: torch.utils.data.Dataset) -> ArrayData:
    # A Dataset is read once, in order, into memory: the fingerprint needs every input byte anyway.
    try:
        items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
    except TypeError as e:
        raise SpecError(f"data {spec!r}: the Dataset must support len() and indexing") from e
    if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2:
        xs = torch.stack([torch.as_tensor(a) for a, _ in items])
        ys = torch.as_tensor([int(b) for _, b in items], dtype=torch.int64)
        return make_array_data(spec, xs, ys)
    return make_array_data(spec, torch.stack([torch.as_tensor(a) for a in items]))


def import_object(ref: str, *, what: str) -> Any:
    """Import `MODULE:NAME` (the current directory importable), naming `ref` in any error."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"{what} {ref!r}: expected MODULE:NAME")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise SpecError(f"{what} {ref!r}: cannot import {module_name}: {_brief(e)}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{what} {ref!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{what} {ref!r}: {attr} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_NAMES = (".", "..", "zarr.json")
MAX_NAME = 100
MODEL_KEYS = {"name", "factory", "kwargs", "checkpoint", "torchscript"}


@dataclass(frozen=True)
class ModelSpec:
    """One `[[teachers]]` entry or the `[student]` table of a TOML file, paths resolved."""

    name: str
    source: Path  # the TOML file it came from
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    torchscript: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as stored in store attributes and run configs."""
        return {
            "name": self.name,
            "factory": self.factory,
            "kwargs": self.kwargs,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "torchscript": str(self.torchscript) if self.torchscript else None,
        }

    @property
    def weights_file(self) -> Path | None:
        return self.torchscript or self.checkpoint

    def weights_sha256(self) -> str | None:
        """sha256 of the checkpoint or TorchScript file (None for a freshly initialised model)."""
        path = self.weights_file
        if path is None:
            return None
        if not path.is_file():
            raise CheckpointError(f"model {self.name!r}: file {str(path)!r} does not exist")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def build(self, *, load_weights: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
        """Construct the module; load its checkpoint (weights_only) or TorchScript file."""
        if self.torchscript is not None:
            if not self.torchscript.is_file():
                raise CheckpointError(f"model {self.name!r}: TorchScript file {str(self.torchscript)!r} does not exist")
            try:
                with warnings.catch_warnings():
                    # Recent torch deprecates TorchScript; SPEC still accepts `torchscript = "..."` files.
                    warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
                    return torch.jit.load(str(self.torchscript), map_location=map_location)
            except Exception as e:
                raise CheckpointError(f"model {self.name!r}: cannot load TorchScript {str(self.torchscript)!r}: {_brief(e)}") from e
        factory = import_object(self.factory or "", what=f"model {self.name!r} factory")
        try:
            model = factory(**self.kwargs)
        except Exception as e:
            raise SpecError(f"model {self.name!r}: factory {self.factory} failed: {_brief(e)}") from e
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"model {self.name!r}: factory {self.factory} returned {type(model).__name__}, not a torch.nn.Module")
        if load_weights and self.checkpoint is not None:
            load_checkpoint(model, self.checkpoint, name=self.name, map_location=map_location)
        return model


def load_checkpoint(model: torch.nn.Module, path: Path, *, name: str, map_location: Any = "cpu") -> None:
    """Load a state_dict saved with torch.save into `model`, safely (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"model {name!r}: checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"model {name!r}: checkpoint {str(path)!r} does not load: {_brief(e)}") from e


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"model file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"model file {str(path)!r} is not valid TOML: {_brief(e)}") from e


def _parse_model(table: Any, source: Path, where: str) -> ModelSpec:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: {where} must be a table")
    unknown = set(table) - MODEL_KEYS
    if unknown:
        raise SpecError(f"{source}: {where} has unknown keys {sorted(unknown)} (allowed: {sorted(MODEL_KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{source}: {where} needs a name of [A-Za-z0-9_.-], got {name!r}")
    if name in RESERVED_NAMES or len(name) > MAX_NAME:
        # A teacher's name is a folder of the store: these would be another file, or too long for one.
        raise SpecError(f"{source}: {where}: name {name!r} is not allowed (not ., .. or zarr.json; at most {MAX_NAME} characters)")
    factory, kwargs = table.get("factory"), table.get("kwargs", {})
    checkpoint, torchscript = table.get("checkpoint"), table.get("torchscript")
    if torchscript is not None and (checkpoint is not None or factory is not None):
        raise SpecError(f"{source}: model {name!r} gives torchscript together with factory/checkpoint")
    if torchscript is None and not isinstance(factory, str):
        raise SpecError(f"{source}: model {name!r} needs factory = \"MODULE:CALLABLE\" (or torchscript)")
    if not isinstance(kwargs, dict):
        raise SpecError(f"{source}: model {name!r}: kwargs must be a table")
    for key, value in (("checkpoint", checkpoint), ("torchscript", torchscript)):
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{source}: model {name!r}: {key} must be a path string")
    here = source.parent
    return ModelSpec(
        name=name,
        source=source,
        factory=factory,
        kwargs=dict(kwargs),
        checkpoint=(here / checkpoint).resolve() if checkpoint else None,
        torchscript=(here / torchscript).resolve() if torchscript else None,
    )


def load_teacher_specs(path: str | Path) -> list[ModelSpec]:
    """The `[[teachers]]` of a TOML file; names unique."""
    path = Path(path).resolve()
    doc = _read_toml(path)
    tables = doc.get("teachers")
    if not isinstance(tables, list) or not tables:
        raise SpecError(f"{path}: needs at least one [[teachers]] table")
    specs = [_parse_model(t, path, f"[[teachers]] #{i + 1}") for i, t in enumerate(tables)]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise SpecError(f"{path}: teacher name {s.name!r} appears twice")
        seen.add(s.name)
    return specs


def load_student_spec(path: str | Path) -> ModelSpec:
    """The one `[student]` table of a TOML file."""
    path = Path(path).resolve()
    doc = _read_toml(path)
    if "student" not in doc:
        raise SpecError(f"{path}: needs a [student] table")
    return _parse_model(doc["student"], path, "[student]")
