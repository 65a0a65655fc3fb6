"""Stage two: train a student on hard labels, or distil it from a store of teacher logits.

    run_train("student.toml", "mnist1d:unlabeled", "runs/mlp", store="stores/unlabeled", temperature=2.0)

Reads top to bottom: (1) resolve and validate every input, writing nothing; (2) create the run
directory, or resume it from its checkpoint (rank 0 writes, every rank reads); (3) train, one
batch at a time from the loader to the loss, checkpointing atomically at the end of every epoch
and every `checkpoint_every` batches; (4) write the student.

The loss of one batch of B rows (per-row terms as the SPEC's `fused_kd_loss` defines them):

    L = 1/B * sum_n [ alpha * D_n + (1 - alpha) * CE_n ]         CE_n = 0 where the label is unknown

D_n is the KD term: T^2 KL(p_n || softmax(s_n / T)) for `--loss kl`, sum_v (p_nv - q_nv)^2 with
q = softmax(s / T) for `--loss mse`. So a row without a label (an unlabelled transfer set) trains
on alpha * D_n alone rather than being dropped, which the kernel would do to a row whose label is
ignore_index; the kernel is therefore called with labels only for rows that have one, and with
labels=None for the others (one call when a batch is all one or the other, which is the usual case).
The fused target p_n:
    mean        p = 1/K sum_k softmax(z_k / T)
    weighted    p = sum_k w_k softmax(z_k / T),   w from --teacher-weights, normalised
    confidence  p = sum_k w_nk softmax(z_k / T),  w_nk = mtkd.kernels.confidence_weights per batch
    vote        p_v = fraction of teachers whose argmax is v; fed to the kernel as one pseudo-teacher
                with logits T * log(p) (-inf where p = 0), since softmax(T log p / T) = p exactly.
Without a store: L = mean over labelled rows of CE_n (AdamW, same schedules).

The run directory:
    config.json     everything resolved (data and store fingerprints, teachers, student spec, ...)
    metrics.jsonl   one line per finished epoch: loss, train accuracy, lr, rows/s, val metrics
    checkpoint.pt   model, optimizer, RNG states, epoch and batch position, metrics so far
    student.pt      the student's state_dict: the final one, or with --val-data the best by
                    validation accuracy (config.json's "student_pt" says which)

Resume: the data order depends only on (seed, epoch) (loader.py) and the checkpoint restores every
other piece of state, so a run killed at any moment and resumed ends, on CPU, with bit-for-bit the
weights of an uninterrupted run. Every file is written to a temporary name and renamed into place.

DDP: under torchrun (WORLD_SIZE > 1) the process group comes from the environment (gloo on CPU,
NCCL on CUDA), the student is wrapped in DistributedDataParallel, each rank reads its own disjoint
rows, `batch_size` is per process, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import shlex
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mtkd.kernels import confidence_weights, fused_kd_loss
from mtkd.pipeline.errors import BadInputError, CheckpointError, MtkdError, RunMismatchError, SpecError
from mtkd.pipeline.evaluate import predict_log_probs
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.loader import BatchLoader, as_tensor
from mtkd.pipeline.metrics import classification_metrics
from mtkd.pipeline.progress import progress_bar
from mtkd.pipeline.specs import IGNORE_LABEL, ArrayData, load_data, load_student_spec
from mtkd.pipeline.store import LogitStore, open_store


class Fusion(str, enum.Enum):
    MEAN = "mean"
    WEIGHTED = "weighted"
    CONFIDENCE = "confidence"
    VOTE = "vote"


class Loss(str, enum.Enum):
    KL = "kl"
    MSE = "mse"


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    INVERSE = "inverse"


CHECKPOINT_FORMAT = 1
CHECKPOINT_EVERY = 1000  # batches; plus the end of every epoch
# Keys of config.json that may differ on --resume: where things are, not what is trained.
RESUMABLE_DIFFERENCES = ("command", "device", "checkpoint_every", "versions", "paths")

DEFAULTS: dict[str, Any] = {
    "fusion": "mean",
    "temperature": 2.0,
    "alpha": 1.0,
    "loss": "kl",
    "epochs": 30,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "schedule": "cosine",
    "decay_rate": 1.0,
    "seed": 0,
}


def run_train(
    student: str | Path,
    data: str,
    out: str | Path,
    *,
    store: str | Path | None = None,
    teachers: Sequence[str] | None = None,
    fusion: str = DEFAULTS["fusion"],
    teacher_weights: Mapping[str, float] | None = None,
    temperature: float = DEFAULTS["temperature"],
    alpha: float = DEFAULTS["alpha"],
    loss: str = DEFAULTS["loss"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    schedule: str = DEFAULTS["schedule"],
    decay_rate: float = DEFAULTS["decay_rate"],
    seed: int = DEFAULTS["seed"],
    device: str = "auto",
    val_data: str | None = None,
    resume: bool = False,
    stream: bool | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    quiet: bool = True,
) -> dict[str, Any]:
    """Train `student` (a TOML with a [student] table) on `data`, distilling from `store` if given.

    Writes the run directory `out` (see the module docstring) and returns a summary: run, student
    (path), student_pt ("final" | "best"), epochs, steps, last (the last epoch's metrics), best,
    seconds, resumed_from, rank, world_size, loader. `stream` forces the loader's mode (None: by
    memory, see loader.py). Raises BadInputError subclasses, before writing anything, for bad input.
    """
    started = time.perf_counter()
    fusion, loss, schedule = str(_value(fusion)), str(_value(loss)), str(_value(schedule))
    rank, world_size, local_rank = _distributed_env()
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    owns_group = world_size > 1 and not dist.is_initialized()  # a caller's own group is left to the caller
    if owns_group:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # env://, as torchrun sets it
    try:
        # -- 1. resolve and validate everything; nothing is written ---------------------------------
        setup = _agree(
            world_size,
            dev,
            lambda: _setup(
                student=student, data=data, out=Path(out), store=store, teachers=teachers, fusion=fusion,
                teacher_weights=teacher_weights, temperature=temperature, alpha=alpha, loss=loss, epochs=epochs,
                batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, decay_rate=decay_rate,
                seed=seed, device=dev, val_data=val_data, resume=resume, stream=stream,
                checkpoint_every=checkpoint_every, rank=rank, world_size=world_size,
            ),
        )
        # -- 2. the run directory ---------------------------------------------------------------------
        run = Path(out)
        if rank == 0 and setup["checkpoint"] is None:
            run.mkdir(parents=True, exist_ok=True)
            _write_atomic(run / "config.json", json.dumps(setup["config"], indent=2) + "\n")
        # -- 3. train -----------------------------------------------------------------------------------
        summary = _train(setup, run, rank=rank, world_size=world_size, device=dev, quiet=quiet)
        if world_size > 1:
            dist.barrier()
    finally:
        if owns_group:
            dist.destroy_process_group()
    summary["seconds"] = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------------------------------------------
# 1. Setup: every input resolved and checked before anything is written
# ---------------------------------------------------------------------------------------------------


def _setup(
    *, student, data, out: Path, store, teachers, fusion, teacher_weights, temperature, alpha, loss, epochs,
    batch_size, lr, weight_decay, schedule, decay_rate, seed, device, val_data, resume, stream,
    checkpoint_every, rank, world_size,
) -> dict[str, Any]:
    _check_options(
        fusion=fusion, loss=loss, schedule=schedule, temperature=temperature, alpha=alpha, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, decay_rate=decay_rate, seed=seed,
        checkpoint_every=checkpoint_every,
    )
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {str(out)!r} is a file, not a run directory")
    distil = store is not None
    if not distil:
        if teachers:
            raise BadInputError("--teachers needs --store")
        if teacher_weights:
            raise BadInputError("--teacher-weights needs --store")
        if stream:
            raise BadInputError("streaming needs --store (there are no logits to stream)")

    spec = load_student_spec(student)
    if spec.torchscript is not None:
        raise SpecError(f"student {spec.name!r}: a TorchScript student cannot be trained; give factory = \"MODULE:CALLABLE\"")
    dataset = load_data(data)
    labelled = int((dataset.labels != IGNORE_LABEL).sum())

    logit_store: LogitStore | None = None
    chosen: list[str] = []
    weights: dict[str, float] | None = None
    if distil:
        logit_store = open_store(store)
        chosen = _choose_teachers(logit_store, teachers)
        weights = _resolve_weights(fusion, teacher_weights, chosen)
        logit_store.require_complete(chosen)
        logit_store.check_data(dataset)
        num_classes = logit_store.num_classes
    elif labelled == 0:
        raise BadInputError(f"data {data!r} has no labels: hard-label training needs them (or distil with --store)")
    if len(dataset) < world_size:
        raise BadInputError(f"data {data!r} has {len(dataset)} rows, fewer than the {world_size} processes")

    # The student, built from the seed, and one forward to learn its output width.
    torch.manual_seed(seed)
    model = spec.build()
    width = _output_width(model, dataset, spec.name)
    if distil and width != num_classes:
        raise BadInputError(
            f"student {spec.name!r} outputs {width} classes but store {str(store)!r} holds {num_classes}"
        )
    num_classes = width
    top = int(dataset.labels.max())
    if top >= num_classes:
        raise BadInputError(f"data {data!r} has label {top} but student {spec.name!r} outputs {num_classes} classes")
    val = None
    if val_data is not None:
        val = load_data(val_data)
        if val.y is None or not (val.y != IGNORE_LABEL).any():
            raise BadInputError(f"--val-data {val_data!r} has no labels")
        if int(val.y.max()) >= num_classes:
            raise BadInputError(f"--val-data {val_data!r} has label {int(val.y.max())}; student outputs {num_classes} classes")
        _output_width(model, val, spec.name)

    loader = BatchLoader(
        dataset.x, dataset.labels, batch_size=batch_size, seed=seed, store=logit_store, teachers=chosen,
        rank=rank, world_size=world_size, device=device, stream=stream,
    )
    config = {
        "command": None,  # filled below, from the resolved values
        "mode": "distil" if distil else "hard-label",
        "student": spec.to_dict(),
        "num_classes": num_classes,
        "data": {"fingerprint": dataset.fingerprint, "rows": len(dataset), "labelled_rows": labelled},
        "val_data": None if val is None else {"fingerprint": val.fingerprint, "rows": len(val)},
        "store": None if logit_store is None else {
            "fingerprint": logit_store.fingerprint, "rows": logit_store.num_rows, "chunk_rows": logit_store.chunk_rows,
        },
        "teachers": [
            {"name": t, "checkpoint_sha256": info.checkpoint_sha256, "dtype": info.dtype}
            for t, info in ((t, logit_store.teacher(t)) for t in chosen)
        ],
        "fusion": fusion if distil else None,
        "teacher_weights": weights,
        "temperature": float(temperature) if distil else None,
        "alpha": float(alpha) if distil else None,
        "loss": loss if distil else "ce",
        "epochs": epochs,
        "batch_size": batch_size,
        "world_size": world_size,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay, "betas": [0.9, 0.999]},
        "schedule": {"name": schedule, "decay_rate": decay_rate if schedule == "inverse" else None,
                     "unit": "optimizer step"},
        "seed": seed,
        "loader": loader.mode,
        "batches_per_epoch": loader.batches_per_epoch,
        "student_pt": "best" if val is not None else "final",
        "checkpoint_every": checkpoint_every,
        "device": device.type,
        "paths": {
            "student": str(spec.source), "data": data, "store": None if store is None else str(Path(store).resolve()),
            "val_data": val_data,
        },
        "versions": {"torch": torch.__version__},
    }

    # The run directory: fresh, or resumable with the same configuration.
    checkpoint = None
    existing = _read_run(out)
    if existing is not None and not resume:
        state = "finished" if existing["finished"] else "unfinished"
        raise RunMismatchError(
            f"--out {str(out)!r} already holds an {state} run; pass --resume to continue it, or choose another directory"
        )
    if existing is None and out.is_dir() and any(out.iterdir()) and not _only_leftovers(out):
        raise RunMismatchError(f"--out {str(out)!r} is not empty and holds no run")
    if existing is not None:
        old = existing["config"]
        if stream is None and old.get("loader") in ("memory", "stream") and old.get("loader") != loader.mode:
            # Keep the recorded mode: the two modes order rows differently.
            loader = BatchLoader(
                dataset.x, dataset.labels, batch_size=batch_size, seed=seed, store=logit_store, teachers=chosen,
                rank=rank, world_size=world_size, device=device, stream=old["loader"] == "stream",
            )
            config["loader"] = loader.mode
        _require_same(old, config, out)
        checkpoint = existing["checkpoint"]
    config["command"] = _command_line(config, student, data, out, store, val_data)
    return {
        "config": config, "spec": spec, "model": model, "data": dataset, "val": val, "loader": loader,
        "checkpoint": checkpoint, "store": logit_store, "teachers": chosen, "weights": weights,
        "fusion": fusion, "loss": loss, "temperature": float(temperature), "alpha": float(alpha),
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "decay_rate": decay_rate,
        "seed": seed, "checkpoint_every": checkpoint_every,
    }


def _check_options(*, fusion, loss, schedule, temperature, alpha, epochs, batch_size, lr, weight_decay, decay_rate,
                   seed, checkpoint_every) -> None:
    for flag, value, choices in (("--fusion", fusion, Fusion), ("--loss", loss, Loss), ("--schedule", schedule, Schedule)):
        if value not in {c.value for c in choices}:
            raise BadInputError(f"{flag} must be one of {', '.join(c.value for c in choices)}, got {value!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise BadInputError(f"--temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"--alpha must lie in [0, 1], got {alpha}")
    if epochs < 1:
        raise BadInputError(f"--epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise BadInputError(f"--lr must be > 0, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise BadInputError(f"--weight-decay must be >= 0, got {weight_decay}")
    if not (math.isfinite(decay_rate) and decay_rate >= 0):
        raise BadInputError(f"--decay-rate must be >= 0, got {decay_rate}")
    if seed < 0:
        raise BadInputError(f"--seed must be >= 0, got {seed}")
    if checkpoint_every < 0:
        raise BadInputError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")


def _choose_teachers(store: LogitStore, teachers: Sequence[str] | None) -> list[str]:
    available = store.teachers
    if not available:
        raise BadInputError(f"store {str(store.path)!r} holds no teachers yet")
    if not teachers:
        return available
    chosen = list(dict.fromkeys(teachers))
    for name in chosen:
        if name not in available:
            raise BadInputError(f"--teachers: store {str(store.path)!r} has no teacher {name!r} (it has: {', '.join(available)})")
    return chosen


def _resolve_weights(fusion: str, given: Mapping[str, float] | None, chosen: list[str]) -> dict[str, float] | None:
    if fusion != Fusion.WEIGHTED.value:
        if given:
            raise BadInputError(f"--teacher-weights needs --fusion weighted (got --fusion {fusion})")
        return None
    if not given:
        raise BadInputError("--fusion weighted needs --teacher-weights, e.g. cnn=2,gru=1")
    for name, w in given.items():
        if name not in chosen:
            raise BadInputError(f"--teacher-weights names {name!r}, which is not a chosen teacher ({', '.join(chosen)})")
        if not (math.isfinite(w) and w >= 0):
            raise BadInputError(f"--teacher-weights: weight of {name!r} must be finite and >= 0, got {w}")
    missing = [t for t in chosen if t not in given]
    if missing:
        raise BadInputError(f"--teacher-weights gives no weight for teacher(s) {', '.join(missing)}")
    if sum(given.values()) <= 0:
        raise BadInputError("--teacher-weights are all zero")
    return {t: float(given[t]) for t in chosen}


def _output_width(model: torch.nn.Module, data: ArrayData, name: str) -> int:
    """One forward on two rows (eval mode, no grad) to learn and check the student's output width."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(as_tensor(data.x[:2]))
    except Exception as e:
        raise SpecError(
            f"student {name!r} fails on inputs of shape {tuple(data.x.shape[1:])} from {data.spec!r}: {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != min(2, len(data)):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SpecError(f"student {name!r} must return (batch, classes) logits, got {shape}")
    return int(out.shape[1])


def _read_run(out: Path) -> dict[str, Any] | None:
    """An existing run at `out`: its config, its checkpoint (None if none yet) and whether it finished."""
    config_path = out / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise RunMismatchError(f"--out {str(out)!r}: config.json is unreadable ({e})") from e
    checkpoint = None
    if (out / "checkpoint.pt").is_file():
        try:
            checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"--out {str(out)!r}: checkpoint.pt does not load ({type(e).__name__}: {e})") from e
    finished = checkpoint is not None and checkpoint["epoch"] >= config.get("epochs", math.inf)
    return {"config": config, "checkpoint": checkpoint, "finished": finished}


def _only_leftovers(out: Path) -> bool:
    # Temporary files of a run killed before it wrote config.json.
    return all(p.name.startswith(".tmp-") for p in out.iterdir())


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_DIFFERENCES}


def _require_same(old: Mapping[str, Any], new: Mapping[str, Any], out: Path) -> None:
    a, b = _identity(old), _identity(new)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise RunMismatchError(
            f"--resume: run {str(out)!r} was made with {k}={json.dumps(a.get(k))}, now {k}={json.dumps(b.get(k))}{more}"
        )


def _command_line(config, student, data, out, store, val_data) -> str:
    """The `mtkd train` command that makes this run (config.json starts with it)."""
    args = ["mtkd", "train", "--student", str(student), "--data", data, "--out", str(out)]
    if store is not None:
        args += ["--store", str(store), "--teachers", ",".join(t["name"] for t in config["teachers"]),
                 "--fusion", config["fusion"], "--temperature", str(config["temperature"]),
                 "--alpha", str(config["alpha"]), "--loss", config["loss"]]
        if config["teacher_weights"]:
            args += ["--teacher-weights", ",".join(f"{k}={v:g}" for k, v in config["teacher_weights"].items())]
    opt, sched = config["optimizer"], config["schedule"]
    args += ["--epochs", str(config["epochs"]), "--batch-size", str(config["batch_size"]), "--lr", f"{opt['lr']:g}",
             "--weight-decay", f"{opt['weight_decay']:g}", "--schedule", sched["name"]]
    if sched["name"] == "inverse":
        args += ["--decay-rate", f"{sched['decay_rate']:g}"]
    args += ["--seed", str(config["seed"])]
    if val_data is not None:
        args += ["--val-data", val_data]
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------
# 3. Training
# ---------------------------------------------------------------------------------------------------


def _train(setup: dict[str, Any], run: Path, *, rank: int, world_size: int, device: torch.device, quiet: bool) -> dict[str, Any]:
    config, loader, epochs = setup["config"], setup["loader"], setup["epochs"]
    model: torch.nn.Module = setup["model"].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup["lr"], weight_decay=setup["weight_decay"])
    objective = Objective.from_setup(setup, device)
    steps_per_epoch = loader.batches_per_epoch
    lr_at = _schedule(setup["schedule"], setup["lr"], setup["decay_rate"], steps_per_epoch, epochs * steps_per_epoch)

    # State: fresh, or from the checkpoint.
    epoch, start_batch, step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    sums = _EpochSums(device)
    ckpt = setup["checkpoint"]
    resumed_from = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        history, best = list(ckpt["history"]), ckpt["best"]
        if rank == 0:
            sums.load(ckpt["sums"])
        _set_rng_state(ckpt["rng"])
        resumed_from = {"epoch": epoch, "batch": start_batch}
        if rank == 0:
            _write_metrics(run, history)  # drops a line written after the checkpoint, before a kill
    else:
        torch.manual_seed(setup["seed"])  # the same training randomness with and without resume
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_checkpoint(at_epoch: int, at_batch: int, epoch_sums: dict[str, float]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": at_epoch, "batch": at_batch, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
            "sums": epoch_sums, "history": history, "best": best,
        }
        _save_atomic(run / "checkpoint.pt", state)

    def end_epoch(finished: int) -> None:
        """Metrics of epoch `finished` (all ranks), validation, the best student, a checkpoint (rank 0)."""
        nonlocal best
        totals = sums.reduced(world_size)
        record = {
            "epoch": finished + 1,
            "loss": totals["loss"] / max(totals["rows"], 1),
            "train_accuracy": totals["correct"] / totals["labelled"] if totals["labelled"] else None,
            "lr": lr_at(step - 1),
            "rows": int(totals["rows"]),
            "seconds": totals["seconds"],
            "rows_per_s": totals["rows"] / totals["seconds"] if totals["seconds"] > 0 else None,
        }
        if rank != 0:
            return
        if setup["val"] is not None:
            val = setup["val"]
            metrics = classification_metrics(predict_log_probs(model, val.x, device=device), as_tensor(val.labels))
            record.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
            if best is None or metrics["accuracy"] > best["val_accuracy"]:
                best = {"epoch": record["epoch"], "val_accuracy": metrics["accuracy"]}
                _save_atomic(run / "student.pt", model.state_dict())  # before the checkpoint that records it
        history.append(record)
        save_checkpoint(finished + 1, 0, _EpochSums(device).as_dict())
        _write_metrics(run, history)

    every = setup["checkpoint_every"]
    with progress_bar(quiet or rank != 0) as bar, closing(loader.batches(epoch, epochs, start_batch)) as batches:
        task = bar.add_task("train", total=epochs * steps_per_epoch, completed=epoch * steps_per_epoch + start_batch)
        net.train()
        tick = time.perf_counter()
        # One loop over every remaining batch of every epoch: the loader reads ahead across epoch ends.
        for epoch, b, batch in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            student_logits = net(batch.x)  # (B, V)
            batch_loss = objective(student_logits, batch)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            step += 1
            sums.add(batch_loss.detach(), student_logits.detach(), batch.labels)
            bar.advance(task)
            if b + 1 == steps_per_epoch:
                sums.seconds += time.perf_counter() - tick
                end_epoch(epoch)
                sums = _EpochSums(device)
                tick = time.perf_counter()
            elif every and (b + 1) % every == 0:
                epoch_sums = sums.reduced(world_size)  # a collective: every rank takes part
                if rank == 0:
                    save_checkpoint(epoch, b + 1, {**epoch_sums, "seconds": sums.seconds + time.perf_counter() - tick})
    if rank == 0 and setup["val"] is None:
        _save_atomic(run / "student.pt", model.state_dict())  # (with --val-data: the best, saved on the way)
    return {
        "run": str(run),
        "student": str(run / "student.pt"),
        "student_pt": config["student_pt"],
        "epochs": epochs,
        "steps": step,
        "last": history[-1] if history else None,
        "best": best,
        "resumed_from": resumed_from,
        "rank": rank,
        "world_size": world_size,
        "loader": loader.mode,
        "mode": config["mode"],
    }


class Objective:
    """The loss of one batch: mean over its rows of alpha * D_n + (1 - alpha) * CE_n (see the module doc)."""

    def __init__(
        self, *, distil: bool, fusion: str, weights: Tensor | None, temperature: float, alpha: float, loss: str,
        labels: str,
    ):
        self.distil = distil
        self.fusion = fusion
        self.weights = weights  # (K,) for --fusion weighted
        self.temperature = temperature
        self.alpha = alpha
        self.loss = loss
        self.labels = labels  # "all" | "none" | "some": which rows of the data have labels

    @classmethod
    def from_setup(cls, setup: dict[str, Any], device: torch.device) -> Objective:
        labels = setup["data"].labels != IGNORE_LABEL
        weights = setup["weights"]
        return cls(
            distil=setup["store"] is not None,
            fusion=setup["fusion"],
            weights=None if weights is None else torch.tensor(list(weights.values()), dtype=torch.float32, device=device),
            temperature=setup["temperature"],
            alpha=setup["alpha"],
            loss=setup["loss"],
            labels="all" if labels.all() else "none" if not labels.any() else "some",
        )

    def __call__(self, student_logits: Tensor, batch: Any) -> Tensor:
        s, y = student_logits, batch.labels
        if not self.distil:
            # Hard labels: mean cross-entropy over the batch's labelled rows (0 when none are).
            known = (y != IGNORE_LABEL).sum().clamp(min=1)
            return F.cross_entropy(s, y, ignore_index=IGNORE_LABEL, reduction="sum") / known
        z, w = self.target(batch.logits, y)  # (K', B, V) logits to fuse with weights w (None | (K,) | (B, K))
        if self.loss == Loss.MSE.value:
            return self._mse(s, z, w, y)
        # One kernel call when the batch's rows are all labelled or all unlabelled (the data says
        # so up front: no per-batch look at the labels, which would wait for the GPU).
        if self.alpha == 1.0 or self.labels == "none":
            return self._kd_sum(s, z, w, None) / len(s)
        if self.labels == "all":
            return self._kd_sum(s, z, w, y) / len(s)
        known = y != IGNORE_LABEL
        total = self._kd_sum(s[known], z[:, known], _rows(w, known), y[known])
        total = total + self._kd_sum(s[~known], z[:, ~known], _rows(w, ~known), None)
        return total / len(s)

    def target(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The teachers as the kernel sees them: (K, B, V) logits and their fusion weights."""
        if self.fusion == Fusion.MEAN.value:
            return logits, None
        if self.fusion == Fusion.WEIGHTED.value:
            return logits, self.weights
        if self.fusion == Fusion.CONFIDENCE.value:
            return logits, confidence_weights(logits, labels, ignore_index=IGNORE_LABEL)  # (B, K)
        # vote: one pseudo-teacher whose tempered softmax is exactly the vote fractions.
        k, _, v = logits.shape
        votes = F.one_hot(logits.argmax(dim=-1), v).sum(dim=0).float() / k  # (B, V)
        return (self.temperature * votes.log()).unsqueeze(0), None  # (1, B, V); log 0 = -inf

    def _kd_sum(self, s: Tensor, z: Tensor, w: Tensor | None, y: Tensor | None) -> Tensor:
        return fused_kd_loss(
            s, z, temperature=self.temperature, weights=w, labels=y, alpha=self.alpha, fusion="prob",
            reduction="sum", ignore_index=IGNORE_LABEL,
        )

    def _mse(self, s: Tensor, z: Tensor, w: Tensor | None, y: Tensor) -> Tensor:
        t = self.temperature
        k = z.shape[0]
        w = torch.full((k,), 1.0 / k, device=z.device) if w is None else w / w.sum(dim=-1, keepdim=True)
        w = w.reshape(-1, k).T.unsqueeze(-1)  # (K, B or 1, 1)
        p = (torch.softmax(z.float() / t, dim=-1) * w).sum(dim=0)  # (B, V) fused teacher probabilities
        q = torch.softmax(s.float() / t, dim=-1)
        rows = self.alpha * (p - q).square().sum(dim=-1)
        if self.alpha < 1.0:
            ce = F.cross_entropy(s.float(), y, ignore_index=IGNORE_LABEL, reduction="none")  # 0 where unknown
            rows = rows + (1.0 - self.alpha) * ce
        return rows.mean()


def _rows(w: Tensor | None, keep: Tensor) -> Tensor | None:
    return w[keep] if w is not None and w.dim() == 2 else w


class _EpochSums:
    """Running totals of an epoch, restorable from a checkpoint. Device tensors for what the batches
    compute (no per-batch host sync), host numbers for what the host knows."""

    KEYS = ("loss", "correct", "labelled")

    def __init__(self, device: torch.device):
        self.values = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.rows = 0
        self.seconds = 0.0

    def add(self, batch_loss: Tensor, student_logits: Tensor, labels: Tensor) -> None:
        known = labels != IGNORE_LABEL
        correct = ((student_logits.argmax(dim=-1) == labels) & known).sum()
        self.values += torch.stack([batch_loss.double() * len(labels), correct.double(), known.sum().double()])
        self.rows += len(labels)

    def reduced(self, world_size: int) -> dict[str, float]:
        """Totals over all ranks (an all_reduce under DDP), plus this process's seconds."""
        values = torch.cat([self.values, torch.tensor([float(self.rows)], dtype=torch.float64, device=self.values.device)])
        if world_size > 1:
            dist.all_reduce(values)
        return {**dict(zip((*self.KEYS, "rows"), values.tolist())), "seconds": self.seconds}

    def as_dict(self) -> dict[str, float]:
        return {**dict(zip(self.KEYS, self.values.tolist())), "rows": float(self.rows), "seconds": self.seconds}

    def load(self, saved: Mapping[str, float]) -> None:
        self.values = torch.tensor([saved[k] for k in self.KEYS], dtype=torch.float64, device=self.values.device)
        self.rows = int(saved["rows"])
        self.seconds = float(saved["seconds"])


def _schedule(name: str, lr: float, decay_rate: float, steps_per_epoch: int, total_steps: int):
    """lr at optimizer step t (0-based): cosine to 0 over the run, or lr / (1 + a * t / steps_per_epoch)."""
    if name == Schedule.COSINE.value:
        return lambda t: lr * 0.5 * (1.0 + math.cos(math.pi * t / total_steps))
    return lambda t: lr / (1.0 + decay_rate * t / steps_per_epoch)


# ---------------------------------------------------------------------------------------------------
# Distributed, RNG and file helpers
# ---------------------------------------------------------------------------------------------------


def _distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _agree(world_size: int, device: torch.device, setup):
    """Run `setup` on every rank; if any rank refuses, every rank raises (none waits for the others)."""
    if world_size <= 1:
        return setup()
    error: BaseException | None = None
    result = None
    try:
        result = setup()
    except Exception as e:  # any failure, not only a refusal: the other ranks must not wait forever
        error = e
    failed = torch.tensor([0 if error is None else 1], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed):
        raise MtkdError("another process refused the run (see its message)")
    return result


def _value(choice: Any) -> Any:
    return choice.value if isinstance(choice, enum.Enum) else choice


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_metrics(run: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpoint's history: a kill never leaves a duplicated or half line.
    _write_atomic(run / "metrics.jsonl", "".join(json.dumps(_finite(r)) + "\n" for r in history))


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
