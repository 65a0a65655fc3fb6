"""`mtkd eval`: measure a model (a run directory, or a model spec plus checkpoint) on labelled data.

    run_eval("mnist1d:test", run="runs/mlp")
    run_eval("mnist1d:test", model="student.toml", checkpoint="runs/mlp/student.pt")
    run_eval("val.npz", model="teachers.toml", teacher="llama")     # a teacher table, its own weights

Metrics (metrics.py): rows, accuracy, macro precision/recall/F1, NLL and ECE over the rows whose
label is known; regression rows (float labels, v3), MSE, MAE and R^2 per output and averaged; tokens, perplexity, next-token accuracy and NLL over every position that has a next
token. Stage two's per-epoch validation uses `predict_log_probs` / `token_metrics` too.
"""

from __future__ import annotations

import json
import tomllib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkd.pipeline.errors import BadInputError, CheckpointError, SpecError
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.hf import logits_of, takes_attention_mask
from mtkd.pipeline.loader import SequenceLoader, as_tensor
from mtkd.pipeline.metrics import TokenMetrics, classification_metrics, regression_metrics
from mtkd.pipeline.progress import progress_bar
from mtkd.pipeline.data import TokenData, load_data
from mtkd.pipeline.specs import ModelSpec, load_checkpoint, load_student_spec, load_teacher_specs, run_student_folder

EVAL_BATCH_SIZE = 1024  # rows per forward pass
EVAL_TOKEN_BATCH_SIZE = 16  # sequences per forward pass: about as many positions as a batch of rows


def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of a language model (a tensor, or Hugging Face's output with .logits);
    the attention mask is passed to models that take one."""
    kwargs = {"attention_mask": attention_mask.long()} if takes_attention_mask(model) else {}
    return logits_of(model(input_ids, **kwargs))


@torch.no_grad()
def token_metrics(
    model: torch.nn.Module, data: TokenData, *, device: torch.device, batch_size: int = EVAL_TOKEN_BATCH_SIZE,
    progress: Any = None, task: Any = None,
) -> dict[str, float | int]:
    """Perplexity, next-token accuracy, NLL (and n, the positions with a next token) of an LM on
    every sequence of `data`, in eval mode."""
    was_training = model.training
    model.eval()
    running = TokenMetrics()
    loader = SequenceLoader(data.tokens, data.offsets, labels=data.given_labels, batch_size=batch_size, seed=0, device=device)
    try:
        for batch in loader.epoch(0):  # one rank: every sequence once
            logits = lm_logits(model, batch.input_ids, batch.attention_mask)  # (B, L, V)
            running.update(logits[batch.attention_mask], batch.labels[batch.attention_mask])
            if progress is not None:
                progress.advance(task, len(batch))
    finally:
        model.train(was_training)
    return running.result()


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


@torch.no_grad()
def predict_values(model: torch.nn.Module, x: np.ndarray | torch.Tensor, *, device: torch.device,
                   batch_size: int = EVAL_BATCH_SIZE, progress: Any = None, task: Any = None) -> torch.Tensor:
    """A regression model's raw outputs over all rows of `x`: (N, D) float64 on the CPU, eval mode."""
    was_training = model.training
    model.eval()
    x = as_tensor(x)
    out = []
    try:
        for start in range(0, len(x), batch_size):
            out.append(model(x[start : start + batch_size].to(device)).double().reshape(min(batch_size, len(x) - start), -1).cpu())
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
    teacher: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    quiet: bool = True,
) -> dict[str, Any]:
    """Measure a model on labelled `data`: rows, accuracy, precision_macro, recall_macro, f1_macro,
    nll, ece; tokens, perplexity, accuracy (next token), nll; and n, the labelled rows or positions.

    Give either `run` (a `mtkd train` run directory: its config's student, its student.pt) or
    `model`: a student TOML with `checkpoint` (a state_dict file), or a teachers TOML (a teacher
    table carries its own weights; `teacher` names one when the file has several).
    `batch_size` counts rows (default EVAL_BATCH_SIZE) or sequences (default EVAL_TOKEN_BATCH_SIZE).
    """
    spec, weights = _resolve_model(run, model, checkpoint, teacher)
    if batch_size is not None and batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    dataset = load_data(data)
    tokens = dataset.kind == "tokens"
    if batch_size is None:
        batch_size = EVAL_TOKEN_BATCH_SIZE if tokens else EVAL_BATCH_SIZE
    if not dataset.labelled_rows:
        raise BadInputError(f"data {data!r} has no labels to evaluate against")
    net = spec.build(load_weights=weights is None)
    if weights is not None:
        load_checkpoint(net, weights, name=spec.name)
    net.to(dev)
    started = time.perf_counter()
    with progress_bar(quiet) as bar:
        task = bar.add_task(f"eval {spec.name}", total=dataset.num_seqs if tokens else len(dataset))
        try:
            if tokens:
                metrics = token_metrics(net, dataset, device=dev, batch_size=batch_size, progress=bar, task=task)
            elif dataset.regression:
                values = predict_values(net, dataset.x, device=dev, batch_size=batch_size, progress=bar, task=task)
            else:
                log_probs = predict_log_probs(net, dataset.x, device=dev, batch_size=batch_size, progress=bar, task=task)
        except Exception as e:
            shape = f"{dataset.num_seqs} sequences" if tokens else f"inputs {dataset.x.shape}"
            raise SpecError(f"model {spec.name!r} fails on data {data!r} ({shape}): {type(e).__name__}: {e}") from e
    if dataset.regression:  # v3: MSE, MAE, R^2 per output and averaged
        if values.shape[1] != dataset.num_outputs:
            raise BadInputError(f"data {data!r} has {dataset.num_outputs} regression targets per row but model {spec.name!r} "
                                f"gives {values.shape[1]} outputs")
        metrics = regression_metrics(values, as_tensor(dataset.targets))
    elif not tokens:
        labels = as_tensor(dataset.labels)
        if log_probs.shape[1] <= int(labels.max()):
            raise BadInputError(
                f"data {data!r} has label {int(labels.max())} but model {spec.name!r} outputs {log_probs.shape[1]} classes"
            )
        metrics = classification_metrics(log_probs, labels)
    return {
        "model": spec.name,
        "checkpoint": None if weights is None else str(weights),
        "data": data,
        "kind": dataset.kind,
        **metrics,
        "seconds": time.perf_counter() - started,
    }


def _resolve_model(
    run: str | Path | None, model: str | Path | None, checkpoint: str | Path | None, teacher: str | None
) -> tuple[ModelSpec, Path | None]:
    """The model to measure and the state_dict to load into it (None: the spec loads its own weights)."""
    if (run is None) == (model is None):
        raise BadInputError("give either a run directory or --model (with --checkpoint for a student)")
    if model is not None:
        if _is_teachers_file(model):
            if checkpoint is not None:
                raise BadInputError(f"--model {str(model)!r} is a teachers file: its tables name their weights; --checkpoint does not apply")
            specs = load_teacher_specs(model)
            names = [s.name for s in specs]
            if teacher is None and len(specs) > 1:
                raise BadInputError(f"--model {str(model)!r} has teachers {', '.join(names)}: choose one with --teacher")
            chosen = [s for s in specs if teacher is None or s.name == teacher]
            if not chosen:
                raise BadInputError(f"--teacher {teacher!r}: --model {str(model)!r} has teachers {', '.join(names)}")
            return chosen[0], None
        if teacher is not None:
            raise BadInputError("--teacher goes with a teachers file as --model")
        if checkpoint is None:
            raise BadInputError("--model needs --checkpoint (a state_dict saved with torch.save)")
        spec = load_student_spec(model)
        if spec.torchscript is not None:
            raise BadInputError(f"--model {str(model)!r}: a TorchScript student carries its own weights; --checkpoint does not apply")
        return spec, Path(checkpoint)
    if checkpoint is not None or teacher is not None:
        raise BadInputError("--checkpoint and --teacher go with --model, not with a run directory")
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
            folder=run_student_folder(config, run),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"run {str(run)!r}: config.json is unreadable ({type(e).__name__}: {e})") from e
    weights = run / "student.pt"
    if not weights.is_file():
        raise CheckpointError(f"run {str(run)!r} has no student.pt yet (training unfinished?)")
    return spec, weights


def _is_teachers_file(path: str | Path) -> bool:
    """True for a TOML with [[teachers]] tables (else it is read as a student file, which reports errors)."""
    try:
        return "teachers" in tomllib.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
