"""`mtkd export`: a trained student out of its run directory, in the form its users load.

    run_export("runs/kd", "export/kd")

- A Hugging Face student (a model with `save_pretrained`, e.g. from a `from_pretrained` factory): the trained weights as a `save_pretrained`
  folder (safetensors, config), which `AutoModelForCausalLM.from_pretrained(DIR)` loads to the
  same logits `mtkd eval` measured. The tokenizer goes with it: the one the run's data was made
  with (the `mtkd tokenize` record in the data's Parquet, checked against its sha256), else the
  tokenizer files of the student's own folder, if it has any.
- Any other student: `student.toml` (its `[student]` table, `checkpoint = "student.pt"`) and
  `student.pt` (the state_dict), which `mtkd eval --model student.toml --checkpoint student.pt`
  and a `[[teachers]]` table load. Its factory must stay importable where it is used (a module of
  mtkd's, or one on the path).

DIR is written under a temporary name and renamed when complete: a refusal leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtkd.pipeline import hf
from mtkd.pipeline.demos.rows import toml_table  # the demos' writer of the TOML tables they train from
from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.specs import ModelSpec, run_student_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json")


def run_export(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the student of `run` into the new folder `out` (see the module docstring); a summary."""
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {str(out)!r} exists and is not empty; choose another folder")
    spec = run_student_spec(run)
    config = json.loads((run / "config.json").read_text())
    spec = replace(spec, name=str(config["student"].get("name") or spec.name))
    model = spec.build()  # the factory's model with the run's student.pt loaded (weights_only)
    # Hugging Face's form for a transformers model (from_pretrained or from_config alike), else mtkd's.
    pretrained = callable(getattr(model, "save_pretrained", None))
    tokenizer = _tokenizer_source(config, spec) if pretrained else None
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if pretrained:
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer["save"](tmp)
            form = "hugging-face"
        else:
            shutil.copyfile(run / "student.pt", tmp / "student.pt")
            table = {"name": spec.name, "factory": spec.factory, "kwargs": spec.kwargs, "checkpoint": "student.pt"}
            (tmp / "student.toml").write_text(
                "# mtkd eval --model student.toml --checkpoint student.pt --data DATA\n" + toml_table("[student]", table))
            form = "torch"
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"run": str(run), "out": str(out), "form": form, "student": spec.name, "factory": spec.factory,
            "files": sorted(p.name for p in out.iterdir()),
            "tokenizer": None if tokenizer is None else {k: v for k, v in tokenizer.items() if k != "save"}}


def _tokenizer_source(config: dict[str, Any], spec: ModelSpec) -> dict[str, Any] | None:
    """Where the exported tokenizer comes from: the data's `mtkd tokenize` record, or the student's folder."""
    from mtkd.pipeline.tokenize import load_tokenizer, read_record, tokenizer_sha256

    data = (config.get("paths") or {}).get("data")
    record = read_record(data) if isinstance(data, str) else None
    if record is not None:
        path = Path(record["tokenizer"]["path"])
        if not path.exists():
            raise BadInputError(f"the tokenizer that made the run's data {data!r} is gone: {str(path)!r}")
        if tokenizer_sha256(path) != record["tokenizer"]["sha256"]:
            raise BadInputError(f"tokenizer {str(path)!r} changed since `mtkd tokenize` made {data!r} (sha256 differs)")
        tokenizer, _ = load_tokenizer(path)
        return {"source": "data", "path": str(path), "sha256": record["tokenizer"]["sha256"],
                "save": lambda folder: tokenizer.save_pretrained(str(folder))}
    folder = hf.pretrained_dir(spec.factory, spec.kwargs)
    files = [folder / name for name in TOKENIZER_FILES if folder is not None and (folder / name).is_file()]
    if not files:
        return None

    def copy(target: Path) -> None:
        for f in files:
            shutil.copyfile(f, target / f.name)

    return {"source": "student folder", "path": str(folder), "sha256": None, "save": copy}
