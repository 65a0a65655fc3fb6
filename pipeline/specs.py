"""What a user writes to name a model: `[[teachers]]` / `[student]` tables of a TOML file.

    [[teachers]]
    name = "cnn"                                  # unique, [A-Za-z0-9_.-]
    factory = "mtkd.pipeline.models:cnn1d"        # MODULE:CALLABLE or MODULE:Class.method -> nn.Module
    kwargs = { channels = 32 }
    checkpoint = "cnn.pt"                         # a state_dict (weights_only), or:
    # torchscript = "gru.ts"                      # a TorchScript file, or:
    # run = "runs/cnn"                            # an `mtkd train` run: its student spec and student.pt

Relative paths (checkpoint, torchscript, run, a `from_pretrained` directory) resolve against the
TOML's folder; MODULE imports with the current directory and the TOML's folder on sys.path.
`ModelSpec.weights_sha256` hashes every weight file the model loads, so that a store never takes a
changed teacher for the stored one. Data specs live in data.py.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtkd.pipeline import hf
from mtkd.pipeline.errors import CheckpointError, SpecError


def brief(e: BaseException) -> str:
    """An exception as one line (errors reach the user as one line; torch's run to paragraphs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def import_object(ref: str, *, what: str, folder: Path | None = None) -> Any:
    """Import `MODULE:NAME` (NAME may be dotted: `Class.method`), naming `ref` in any error.

    The current directory and `folder` (the spec file's folder) are importable, as SPEC promises.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"{what} {ref!r}: expected MODULE:NAME")
    for place in (os.getcwd(), str(folder) if folder is not None else None):
        if place is not None and place not in sys.path and not (place == os.getcwd() and "" in sys.path):
            sys.path.insert(0, place)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise SpecError(f"{what} {ref!r}: cannot import {module_name}: {brief(e)}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{what} {ref!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{what} {ref!r}: {attr} is not callable")
    return obj


def check_out_path(path: Path, option: str = "--out") -> None:
    """Refuse an output path that cannot be created: one of its parents is a file (BadInputError)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpecError(f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            return


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_NAMES = (".", "..", "zarr.json")
MAX_NAME = 100
MODEL_KEYS = {"name", "factory", "kwargs", "checkpoint", "torchscript", "run", "features"}


@dataclass(frozen=True)
class ModelSpec:
    """One `[[teachers]]` entry or the `[student]` table of a TOML file, paths resolved.

    A `run = ...` table is resolved when parsed: factory and kwargs from the run's config.json,
    checkpoint its student.pt; `run` keeps where they came from.
    """

    name: str
    source: Path  # the TOML file it came from
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    torchscript: Path | None = None
    run: Path | None = None
    folder: Path | None = None  # where MODULE imports from besides the current directory; None: source's folder
    features: tuple[str, ...] = ()  # v3: modules whose outputs stage one stores beside the logits

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as stored in store attributes and run configs."""
        return {
            "name": self.name,
            "factory": self.factory,
            "kwargs": self.kwargs,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "torchscript": str(self.torchscript) if self.torchscript else None,
            "run": str(self.run) if self.run else None,
            **({"features": list(self.features)} if self.features else {}),
        }

    @property
    def weights_file(self) -> Path | None:
        return self.torchscript or self.checkpoint

    def weight_files(self) -> list[Path]:
        """Every file the model's weights come from: its checkpoint or TorchScript file, and for a
        `from_pretrained` factory the weight files (and config) of the directory it loads."""
        files = [self.weights_file] if self.weights_file is not None else []
        pretrained = hf.pretrained_dir(self.factory, self.kwargs)
        if pretrained is not None:
            files += hf.weight_files(pretrained)
        return files

    def weights_sha256(self) -> str | None:
        """sha256 of the weights (None for a freshly initialised model).

        One file: the sha256 of its bytes. Several (a `from_pretrained` directory): the sha256 of the
        lines "<sha256>  <name>", one per file in name order, so a renamed or changed shard counts.
        """
        files = self.weight_files()
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"model {self.name!r}: file {str(path)!r} does not exist")
        if not files:
            return None
        if len(files) == 1:
            return _sha256_file(files[0])
        lines = "".join(f"{_sha256_file(p)}  {p.name}\n" for p in files)
        return hashlib.sha256(lines.encode()).hexdigest()

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
                raise CheckpointError(f"model {self.name!r}: cannot load TorchScript {str(self.torchscript)!r}: {brief(e)}") from e
        factory = import_object(self.factory or "", what=f"model {self.name!r} factory",
                                folder=self.folder if self.folder is not None else self.source.parent)
        try:
            model = factory(**self.kwargs)
        except Exception as e:
            raise SpecError(f"model {self.name!r}: factory {self.factory} failed: {brief(e)}") from e
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"model {self.name!r}: factory {self.factory} returned {type(model).__name__}, not a torch.nn.Module")
        if load_weights and self.checkpoint is not None:
            load_checkpoint(model, self.checkpoint, name=self.name, map_location=map_location)
        return model


# What makes a model, of a stored spec (`ModelSpec.to_dict`): the paths of its weight files are left
# out (a project moved elsewhere is the same teacher), their bytes are what `weights_sha256` compares.
IDENTITY_KEYS = ("factory", "kwargs")


def _identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The identity keys a spec dict records, JSON-normalised (as stored: tuples are lists), with a
    from_pretrained directory's path left out of its kwargs."""
    out = {key: json.loads(json.dumps(spec[key])) for key in IDENTITY_KEYS if key in spec}
    if hf.is_from_pretrained(out.get("factory")) and isinstance(out.get("kwargs"), dict):
        out["kwargs"] = {k: v for k, v in out["kwargs"].items() if k != hf.PRETRAINED_KEY}
    return out


def spec_differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """How a spec dict differs from a stored one in what builds the model ("kwargs.hidden [16], not
    [32]"); empty when it builds the same. Keys a stored spec does not record are not compared."""
    old, new = _identity(stored), _identity(given)
    differences = []
    for key in old:
        a, b = old[key], new.get(key)
        if key == "kwargs" and isinstance(a, dict) and isinstance(b, dict):
            differences += [f"kwargs.{k} {_shown(a, k)}, not {_shown(b, k)}" for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
        elif a != b:
            differences.append(f"{key} {json.dumps(a)}, not {json.dumps(b)}")
    return differences


_ABSENT = object()


def _shown(kwargs: dict[str, Any], key: str) -> str:
    return json.dumps(kwargs[key]) if key in kwargs else "(not given)"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(model: torch.nn.Module, path: Path, *, name: str, map_location: Any = "cpu") -> None:
    """Load a state_dict saved with torch.save into `model`, safely (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"model {name!r}: checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"model {name!r}: checkpoint {str(path)!r} does not load: {brief(e)}") from e


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"model file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"model file {str(path)!r} is not valid TOML: {brief(e)}") from e


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
    checkpoint, torchscript, run = table.get("checkpoint"), table.get("torchscript"), table.get("run")
    for key, value in (("checkpoint", checkpoint), ("torchscript", torchscript), ("run", run)):
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{source}: model {name!r}: {key} must be a path string")
    here = source.parent
    features = table.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features) or len(set(features)) != len(features):
        raise SpecError(f"{source}: model {name!r}: features must be a list of distinct module names, got {features!r}")
    if features and run is not None:
        raise SpecError(f"{source}: model {name!r}: features are not supported with run = ... (give factory and checkpoint)")
    if run is not None:
        if any(table.get(k) is not None for k in ("factory", "kwargs", "checkpoint", "torchscript")):
            raise SpecError(f"{source}: model {name!r} gives run together with factory/kwargs/checkpoint/torchscript")
        return _from_run(name, source, (here / run).resolve())
    if torchscript is not None and (checkpoint is not None or factory is not None):
        raise SpecError(f"{source}: model {name!r} gives torchscript together with factory/checkpoint")
    if torchscript is None and not isinstance(factory, str):
        raise SpecError(f"{source}: model {name!r} needs factory = \"MODULE:CALLABLE\" (or torchscript, or run)")
    if not isinstance(kwargs, dict):
        raise SpecError(f"{source}: model {name!r}: kwargs must be a table")
    return ModelSpec(
        name=name,
        source=source,
        factory=factory,
        kwargs=hf.resolve_kwargs(factory, dict(kwargs), here, name),
        checkpoint=(here / checkpoint).resolve() if checkpoint else None,
        torchscript=(here / torchscript).resolve() if torchscript else None,
        features=tuple(features),
    )


def _from_run(name: str, source: Path, run: Path) -> ModelSpec:
    """A model trained by `mtkd train`: the student spec its config.json records, and its student.pt."""
    config_path, weights = run / "config.json", run / "student.pt"
    if not config_path.is_file() or not weights.is_file():
        raise SpecError(f"{source}: model {name!r}: run {str(run)!r} is not a finished mtkd train run (needs config.json and student.pt)")
    try:
        config = json.loads(config_path.read_text())
        student = config["student"]
        factory, kwargs = student["factory"], dict(student.get("kwargs") or {})
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{source}: model {name!r}: {str(config_path)!r} holds no student spec ({brief(e)})") from e
    if not isinstance(factory, str):
        raise SpecError(f"{source}: model {name!r}: the student of run {str(run)!r} has no factory")
    return ModelSpec(name=name, source=source, factory=factory, kwargs=kwargs, checkpoint=weights, run=run,
                     folder=run_student_folder(config, run))


def run_student_spec(run: str | Path) -> ModelSpec:
    """The student of a finished `mtkd train` run: its recorded spec, with student.pt as checkpoint."""
    run = Path(run)
    return _from_run("student", run / "config.json", run)


def run_student_folder(config: dict[str, Any], run: Path) -> Path:
    """Where a run's student factory imports from: its student TOML's folder, as when it trained
    (config.json's paths.student), else the run directory."""
    student = (config.get("paths") or {}).get("student") if isinstance(config, dict) else None
    return Path(student).parent if isinstance(student, str) else Path(run)


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
