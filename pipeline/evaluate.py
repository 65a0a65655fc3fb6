"""`mtkd eval`: measure a student (a run directory, or a model spec plus checkpoint) on labelled data.

    run_eval("mnist1d:test", run="runs/mlp")
    run_eval("mnist1d:test", model="student.toml", checkpoint="runs/mlp/student.pt")

Metrics (metrics.py): accuracy, macro precision/recall/F1, NLL and ECE over the rows whose label is
known. Stage two's per-epoch validation uses `predict_log_probs` and `classification_metrics` too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkd.pipeline.errors import BadInputError, CheckpointError, SpecError
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.loader import as_tensor
from mtkd.pipeline.metrics import classification_metrics
from mtkd.pipeline.progress import progress_bar
from mtkd.pipeline.data import IGNORE_LABEL, load_data
from mtkd.pipeline.specs import ModelSpec, load_checkpoint, load_student_spec

EVAL_BATCH_SIZE = 1024


@torch.no_grad()
def predict_log_probs(
    model: torch.nn.Module,
    x: np.ndarray | torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: Any = None,
    task: Any = None,
) -> torch.Tensor:
    """log_softmax of the model's logits over all rows of `x`: (N, V) float64 on the CPU, eval mode."""
    was_training = model.training
    model.eval()
    x = as_tensor(x)
    out = []
    try:
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size].to(device))
            out.append(torch.log_softmax(logits.double(), dim=-1).cpu())
            if progress is not None:
                progress.advance(task, min(batch_size, len(x) - start))
    finally:
        model.train(was_training)
    return torch.cat(out)


def run_eval(
    data: str,
    *,
    run: str | Path | None = None,
    model: str | Path | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    device: str = "auto",
    quiet: bool = True,
) -> dict[str, Any]:
    """Accuracy, precision_macro, recall_macro, f1_macro, nll, ece (and n, the labelled rows) on `data`.

    Give either `run` (a `mtkd train` run directory: its config's student, its student.pt) or
    `model` (a student TOML) with `checkpoint` (a state_dict file).
    """
    spec, weights = _resolve_student(run, model, checkpoint)
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    dataset = load_data(data)
    if dataset.y is None or not (dataset.y != IGNORE_LABEL).any():
        raise BadInputError(f"data {data!r} has no labels to evaluate against")
    net = spec.build(load_weights=False)
    load_checkpoint(net, weights, name=spec.name)
    net.to(dev)
    started = time.perf_counter()
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"eval {spec.name}", total=len(dataset))
        try:
            log_probs = predict_log_probs(net, dataset.x, device=dev, batch_size=batch_size, progress=bar, task=task)
        except Exception as e:
            raise SpecError(f"model {spec.name!r} fails on data {data!r} (inputs {dataset.x.shape}): {type(e).__name__}: {e}") from e
    labels = as_tensor(dataset.labels)
    if log_probs.shape[1] <= int(labels.max()):
        raise BadInputError(
            f"data {data!r} has label {int(labels.max())} but model {spec.name!r} outputs {log_probs.shape[1]} classes"
        )
    metrics = classification_metrics(log_probs, labels)
    return {
        "model": spec.name,
        "checkpoint": str(weights),
        "data": data,
        **metrics,
        "seconds": time.perf_counter() - started,
    }


def _resolve_student(
    run: str | Path | None, model: str | Path | None, checkpoint: str | Path | None
) -> tuple[ModelSpec, Path]:
    if (run is None) == (model is None):
        raise BadInputError("give either a run directory or --model with --checkpoint")
    if model is not None:
        if checkpoint is None:
            raise BadInputError("--model needs --checkpoint (a state_dict saved with torch.save)")
        spec = load_student_spec(model)
        if spec.torchscript is not None:
            raise BadInputError(f"--model {str(model)!r}: a TorchScript student carries its own weights; --checkpoint does not apply")
        return spec, Path(checkpoint)
    if checkpoint is not None:
        raise BadInputError("--checkpoint goes with --model, not with a run directory")
    run = Path(run)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise BadInputError(f"run {str(run)!r} is not a `mtkd train` run directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
        student = config["student"]
        spec = ModelSpec(
            name=student["name"],
            source=config_path,
            factory=student["factory"],
            kwargs=dict(student.get("kwargs") or {}),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"run {str(run)!r}: config.json is unreadable ({type(e).__name__}: {e})") from e
    weights = run / "student.pt"
    if not weights.is_file():
        raise CheckpointError(f"run {str(run)!r} has no student.pt yet (training unfinished?)")
    return spec, weights
