"""`mtkd train`: stage two, a student trained on hard labels or distilled from a store. Parses options,
hands off to run_train."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mtkd.pipeline.device import Device
from mtkd.pipeline.commands.output import JsonOption, QuietOption, StorageOption, emit
from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.config import CHECKPOINT_EVERY, DEFAULTS, Fusion, FusionScope, Loss, LossPath, Schedule, TrainConfig


class LoaderMode(str, Enum):
    auto = "auto"
    memory = "memory"
    stream = "stream"


def train(
    student: Annotated[
        Path,
        typer.Option("--student", help="Student TOML: one `student` table (name, factory, kwargs, optional initial checkpoint).",
                     exists=True, dir_okay=False, readable=True),
    ],
    data: Annotated[
        str, typer.Option("--data", help="Data spec: PATH.npz, PATH.npy, a Zarr array, mnist1d:SPLIT or MODULE:FUNCTION.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to create (or continue, with --resume).")],
    store: Annotated[
        str | None,
        typer.Option("--store", help="Logit store of --data made by `mtkd infer` (a path or a URL): distil from it. Without: hard labels."),
    ] = None,
    teachers: Annotated[
        str | None, typer.Option("--teachers", help="Comma-separated teachers of the store to use (default: all).")
    ] = None,
    fusion: Annotated[
        Fusion,
        typer.Option("--fusion", help="How teachers combine: mean of probabilities, weighted (--teacher-weights), "
                     "confidence (per row, by the probability each gives the label), vote (fraction of argmaxes); "
                     "selecting: posterior (w ~ pi p_k(label)^(1/tau)), best (all weight on the likeliest teacher), "
                     "entropy (label-free, w ~ pi exp(-H_k / tau)); regression teachers (float labels): mean, "
                     "weighted, median (per output, robust to one bad teacher)."),
    ] = DEFAULTS["fusion"],
    teacher_weights: Annotated[
        str | None, typer.Option("--teacher-weights", help="NAME=WEIGHT pairs for --fusion weighted, or the prior pi of "
                                 "posterior, best and entropy (default uniform), e.g. cnn=2,gru=1.")
    ] = None,
    fusion_temperature: Annotated[
        float, typer.Option("--fusion-temperature", help="tau of --fusion posterior, best and entropy (> 0; large: towards pi).")
    ] = DEFAULTS["fusion_temperature"],
    fusion_scope: Annotated[
        FusionScope, typer.Option("--fusion-scope", help="Weights per row (tokens: per position) or per sequence "
                                  "(tokens: scores summed over its labelled positions).")
    ] = DEFAULTS["fusion_scope"],
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-T", help="Softmax temperature of the KD term (> 0). "
                                   "Default: 1 on token data, 2 on rows; regression teachers take none.")
    ] = DEFAULTS["temperature"],
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="Weight of the KD term in [0, 1]; 1 - alpha weighs cross-entropy "
                                   "on labelled rows. Default: 0.8 on token data, 1 on rows.")
    ] = DEFAULTS["alpha"],
    loss: Annotated[
        Loss | None, typer.Option("--loss", help="KD term: kl (T^2 KL divergence) or mse (squared error of probabilities at T); "
                                  "regression (float labels): mse, huber or l1 of the outputs. Default: kl, regression mse.")
    ] = DEFAULTS["loss"],
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the data.")] = DEFAULTS["epochs"],
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many optimizer steps (wins over --epochs, as in HF's Trainer).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Rows per optimizer step and process (under torchrun: per rank).")
    ] = DEFAULTS["batch_size"],
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", min=1, help="Batches per optimizer step (gradients accumulated).")
    ] = DEFAULTS["grad_accum"],
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = DEFAULTS["lr"],
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = DEFAULTS["weight_decay"],
    schedule: Annotated[
        Schedule, typer.Option("--schedule", help="Learning-rate decay per step: cosine to 0, or inverse lr / (1 + a * epochs).")
    ] = DEFAULTS["schedule"],
    decay_rate: Annotated[
        float, typer.Option("--decay-rate", help="a of --schedule inverse, per epoch.")
    ] = DEFAULTS["decay_rate"],
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", min=0, help="Linear learning-rate warm-up over this many optimizer steps.")
    ] = DEFAULTS["warmup_steps"],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seeds the student's initialisation and the data order.")] = DEFAULTS["seed"],
    device: Annotated[Device, typer.Option("--device", help="auto: cuda when available.")] = Device.auto,
    val_data: Annotated[
        str | None,
        typer.Option("--val-data", help="Labelled data spec to validate on after every epoch; student.pt is then the best."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint (or start it, if there is none).")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=0, help="Also checkpoint every N batches (0: only at epoch ends).")
    ] = CHECKPOINT_EVERY,
    loader: Annotated[
        LoaderMode, typer.Option("--loader", help="Teachers' outputs (and token inputs) in memory or streamed; auto: by available memory.")
    ] = LoaderMode.auto,
    loss_path: Annotated[
        LossPath, typer.Option("--loss-path", help="Token students of top-k teachers: fused (hidden states and output layer "
                               "into the loss, no logits held), logits, or auto (fused where it gives the student's logits).")
    ] = DEFAULTS["loss_path"],
    feature: Annotated[
        list[str] | None, typer.Option("--feature", help="STUDENT_MODULE=TEACHER:MODULE: a hint loss between the student "
                                       "module's output (through a learned projection) and the teacher's stored feature; repeatable.")
    ] = None,
    feature_loss: Annotated[str, typer.Option("--feature-loss", help="mse | cosine")] = "mse",
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="BETA: weight of the summed hint losses.")] = 1.0,
    storage_option: StorageOption = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a student on hard labels, or distil it from a store (stage two).

    Writes OUT/student.pt, OUT/config.json, OUT/metrics.jsonl and
    OUT/checkpoint.pt. Under torchrun it trains with DDP unchanged; rank 0
    writes OUT. With --val-data, student.pt is the best epoch on it: give a
    validation split, never the test set you report.

    Example:
      mtkd train --student mlp.toml --data mnist1d:train --out runs/baseline
      mtkd train --student mlp.toml --data x.npz --store x.zarr -T 2 \\
          --val-data val.npz --out runs/kd
      mtkd train --student lm.toml --data code+prose.npz --store lm.zarr \\
          --fusion best --fusion-scope sequence --alpha 0.8 --out runs/experts
      torchrun --nproc_per_node 4 -m mtkd.pipeline.cli train \\
          --student mlp.toml --data x.npz --store x.zarr --out runs/kd --resume
    """
    config = TrainConfig(
        student=student, data=data, out=out, store=store, teachers=_names(teachers), fusion=fusion,
        teacher_weights=_weights(teacher_weights), temperature=temperature, alpha=alpha, loss=loss, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
        schedule=schedule, decay_rate=decay_rate, warmup_steps=warmup_steps, seed=seed, device=device.value,
        val_data=val_data, resume=resume, stream=None if loader is LoaderMode.auto else loader is LoaderMode.stream,
        checkpoint_every=checkpoint_every, fusion_temperature=fusion_temperature, fusion_scope=fusion_scope,
        loss_path=loss_path, features=tuple(feature or ()), feature_loss=feature_loss, feature_weight=feature_weight,
        storage_options=tuple(storage_option or ()),
    )
    from mtkd.pipeline.train import run_train  # heavy (torch): here, so --help stays fast

    result = run_train(config, quiet=quiet)
    if result["rank"] == 0:  # one report per run, not one per torchrun process
        emit(result, as_json, _render)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise BadInputError(f"--teachers {text!r}: expected comma-separated names, e.g. cnn,gru")
    return names


def _weights(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    weights: dict[str, float] = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or math.isnan(weight):
            raise BadInputError(f"--teacher-weights {text!r}: expected NAME=WEIGHT pairs, e.g. cnn=2,gru=1 (bad: {pair!r})")
        if name.strip() in weights:
            raise BadInputError(f"--teacher-weights {text!r}: teacher {name.strip()!r} appears twice")
        weights[name.strip()] = weight
    return weights


def _render(result: dict) -> None:
    # Short lines (each under 80 columns for the paths of a usual run), one fact per line.
    last = result["last"] or {}
    processes = f"{result['world_size']} process{'es' if result['world_size'] > 1 else ''}"
    lines = [
        f"run {result['run']}: {result['mode']}, {result['epochs']} epochs, {result['steps']} steps, "
        f"{result['seconds']:.1f} s",
        f"  {processes}, logits in {result['loader']}",
    ]
    if result["resumed_from"]:
        lines.append(f"  resumed from epoch {result['resumed_from']['epoch']}, batch {result['resumed_from']['batch']}")
    if last:
        facts = [f"loss {last['loss']:.4f}"]
        if last.get("train_accuracy") is not None:
            facts.append(f"train accuracy {last['train_accuracy']:.4f}")
        if last.get("rows_per_s"):
            facts.append(f"{last['rows_per_s']:.0f} rows/s")
        lines.append("  last epoch: " + ", ".join(facts))
        validation = _validation(last)
        if validation:
            lines.append(f"  last epoch: {validation}")
    best = result["best"]
    which = f"best epoch {best['epoch']}, {_validation(best)}" if best else "final"
    lines.append(f"student: {result['student']}")
    lines.append(f"  ({which})")
    print("\n".join(lines))


def _validation(metrics: dict) -> str:
    # Rows are validated by accuracy (regression: MSE), tokens by perplexity (the key the trainer chose the best by).
    facts = [f"val {name} {metrics[f'val_{name}']:.4f}" for name in ("perplexity", "accuracy", "mse")
             if metrics.get(f"val_{name}") is not None]
    return ", ".join(facts)
