"""Stage two: train a student on hard labels, or distil it from a store of teacher outputs.

    run_train(TrainConfig("student.toml", "mnist1d:unlabeled", "runs/mlp", store="stores/unlabeled", temperature=2.0))

A Trainer reads top to bottom, like torchtune's recipes: `setup` resolves and checks every input
(writing nothing), then creates the run directory or resumes it from its checkpoint; `train` runs
one loop over every remaining batch, from the loader to the loss, checkpointing atomically at the
end of every epoch and every `checkpoint_every` batches; `cleanup` leaves the process group.

The loss of one batch is objective.py's (the fusions' weights come from fusion.py); here the loop.

Optimisation: AdamW; one optimizer step every `grad_accum` batches (the group's batch losses
averaged; an epoch's last group may be shorter); the learning rate per optimizer step, a linear
warm-up over `warmup_steps` then cosine to 0 (or inverse decay). `max_steps` ends the run after
that many optimizer steps, inside an epoch if need be. On CUDA the student's forward runs under
bf16 autocast (the kernels take any float dtype and compute in fp32).

The run directory:
    config.json     everything resolved: the TrainConfig (config.py) and what setup measured
                    (data and store fingerprints, teachers, student spec, loader mode, sizes)
    metrics.jsonl   one line per finished epoch: loss, train accuracy, lr, rows/s, val metrics. Train
                    accuracy is null on the fused-linear path: its loss never holds a batch's logits,
                    and their argmax would cost a second pass over the output layer (a third of
                    the step); --val-data measures the accuracy instead
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

import contextlib
import errno
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mtkd.pipeline.advice import training_warnings
from mtkd.pipeline.config import Fusion, FusionScope, Loss, LossPath, Schedule, TrainConfig, differences, identity
from mtkd.pipeline.features import FEATURES_KEY, FeatureTap, build_hints, check_feature_names, feature_loss, parse_pair
from mtkd.pipeline.fusion import fallback_rows
from mtkd.pipeline.objective import Objective
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.errors import BadInputError, CheckpointError, MtkdError, RunMismatchError, SpecError
from mtkd.pipeline.evaluate import lm_logits, predict_log_probs, predict_values, token_metrics
from mtkd.pipeline.hf import hidden_and_head
from mtkd.pipeline.loader import BatchLoader, SequenceLoader, TeacherRows, as_tensor
from mtkd.pipeline.metrics import classification_metrics, regression_metrics
from mtkd.pipeline.progress import progress_bar
from mtkd.pipeline.guard import LossGuard
from mtkd.pipeline.data import IGNORE_LABEL, RowData, TokenData, load_data
from mtkd.pipeline.specs import ModelSpec, check_out_path, load_student_spec
from mtkd.pipeline.store import LogitStore, open_store
from mtkd.pipeline.storage import parse_options

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = frozenset({"format", "epoch", "batch", "step", "model", "optimizer", "rng", "sums", "history", "best"})


def run_train(config: TrainConfig, *, quiet: bool = True) -> dict[str, Any]:
    """Train `config.student` on `config.data`, distilling from `config.store` if given.

    Writes the run directory `config.out` (see the module docstring) and returns a summary: run,
    student (path), student_pt ("final" | "best"), epochs, steps, last (the last epoch's metrics),
    best, seconds, resumed_from, rank, world_size, loader, mode. Raises BadInputError subclasses,
    before writing anything, for bad input.
    """
    started = time.perf_counter()
    trainer = Trainer(config, quiet=quiet)
    try:
        trainer.setup()
        summary = trainer.train()
    except BaseException:
        trainer.discard_unstarted()
        raise
    finally:
        trainer.cleanup()
    summary["seconds"] = time.perf_counter() - started
    return summary


@dataclass
class Setup:
    """What setup resolved, for train to use: the resolved config and its config.json record, the
    student, the data, the loader, and the checkpoint to resume from (None: a fresh run)."""

    config: TrainConfig
    record: dict[str, Any]
    spec: ModelSpec
    model: torch.nn.Module
    data: RowData | TokenData
    val: RowData | TokenData | None
    store: LogitStore | None
    loader: BatchLoader | SequenceLoader
    plan: Plan
    checkpoint: dict[str, Any] | None
    head: str  # tokens: "fused" (hidden states + output layer into fused_linear_sparse_kd_loss) | "logits"; rows: "logits"
    entropy: Tensor | None = None  # rows: (K, N) stored entropies, when the fusion reads them (tokens: with the teachers' rows)
    warnings: list[str] = field(default_factory=list)  # about the teachers (advice.py), one line each
    hints: dict[str, Any] | None = None  # --feature: pairs, the teachers' stored features (held), shapes


@dataclass(frozen=True)
class Plan:
    """How many batches and optimizer steps the run takes (one rank's view; every rank agrees)."""

    batches_per_epoch: int
    grad_accum: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def group(self, b: int) -> tuple[int, int]:
        """The batches [first, end) of epoch batch b's accumulation group."""
        first = b - b % self.grad_accum
        return first, min(first + self.grad_accum, self.batches_per_epoch)


class Trainer:
    """One run: setup -> train -> cleanup (see the module docstring)."""

    def __init__(self, config: TrainConfig, *, quiet: bool = True):
        self.config = config
        self.quiet = quiet
        self.rank, self.world_size, local_rank = _distributed_env()
        device = resolve_device(config.device)
        self.device = torch.device("cuda", local_rank) if device.type == "cuda" else device
        # A caller's own process group is left to the caller.
        self.owns_group = self.world_size > 1 and not dist.is_initialized()
        if self.owns_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")  # env://, as torchrun sets it
        self.s: Setup | None = None
        self.wrote_config = self.made_out = False  # what setup created, for discard_unstarted

    # -- setup ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Resolve and check everything on every rank (nothing written), then create the run directory."""
        self.s = _agree(self.world_size, self.device, self._resolve)
        if self.rank == 0:
            for line in self.s.warnings:  # before the first step: a run worth stopping is stopped early
                print(f"warning: {line}", file=sys.stderr, flush=True)
        if self.rank == 0 and self.s.checkpoint is None:
            self.made_out = not self.config.out.exists()
            self.config.out.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.config.out / "config.json", json.dumps(self.s.record, indent=2) + "\n")
            self.wrote_config = True

    def discard_unstarted(self) -> None:
        """A run that fails before its first checkpoint (a damaged store, a full disk) leaves nothing:
        its config.json would otherwise make the rerun ask for --resume."""
        out = self.config.out
        if not self.wrote_config or (out / "checkpoint.pt").exists():
            return
        for name in ("config.json", "metrics.jsonl", ".tmp-config.json"):
            (out / name).unlink(missing_ok=True)
        if self.made_out and not any(out.iterdir()):
            out.rmdir()

    def _resolve(self) -> Setup:
        config = self.config
        if config.out.exists() and not config.out.is_dir():
            raise BadInputError(f"--out {str(config.out)!r} is a file, not a run directory")
        check_out_path(config.out)
        spec = load_student_spec(config.student)
        if spec.torchscript is not None:
            raise SpecError(f"student {spec.name!r}: a TorchScript student cannot be trained; give factory = \"MODULE:CALLABLE\"")
        dataset = load_data(config.data, parse_options(config.storage_options))  # options: data at a URL too
        config = config.for_kind(dataset.kind, _recorded_options(config.out) if config.resume else None, regression=dataset.regression)
        tokens = dataset.kind == "tokens"
        labelled = dataset.labelled_rows  # tokens: counted from the offsets, never read whole
        samples = dataset.num_seqs if tokens else len(dataset)

        store: LogitStore | None = None
        teacher_rows: TeacherRows | None = None
        if config.distil:
            store = open_store(config.store)
            config = config.resolved(_choose_teachers(store, config.teachers))
            store.require_complete(list(config.teachers))
            store.check_data(dataset)
            store.check_labels()
            entropy = _fusion_needs(store, config)
            if not dataset.regression:  # (regression rows: the loader reads the teachers' values; check_data matched the store)
                teacher_rows = _teacher_rows(store, config, entropy=entropy)
        elif labelled == 0:
            raise BadInputError(f"data {config.data!r} has no labels: hard-label training needs them (or distil with --store)")
        if samples < self.world_size:
            unit = "sequences" if tokens else "rows"
            raise BadInputError(f"data {config.data!r} has {samples} {unit}, fewer than the {self.world_size} processes")

        # The student, built from the seed, and one forward to learn its output width (and, for
        # tokens, whether the fused-linear loss computes exactly its logits).
        torch.manual_seed(config.seed)
        model = spec.build()
        sparse = tokens and teacher_rows is not None and teacher_rows.sparse
        if tokens:
            num_classes, head = _check_lm(model, dataset, spec.name, fused=sparse and config.loss_path is not LossPath.LOGITS)
        else:
            num_classes, head = _output_width(model, dataset, spec.name), "logits"
        loss_path = _loss_path(config, spec.name, sparse, head)
        if dataset.regression and num_classes != dataset.num_outputs:
            raise BadInputError(f"student {spec.name!r} gives {num_classes} outputs but data {config.data!r} has "
                                f"{dataset.num_outputs} regression targets per row")
        if store is not None and (not tokens or not teacher_rows.sparse) and num_classes != store.num_classes:
            raise BadInputError(
                f"student {spec.name!r} outputs {num_classes} classes but store {str(config.store)!r} holds {store.num_classes}"
            )
        top = dataset.max_label
        if top >= num_classes:
            what = "token" if tokens else "label"
            raise BadInputError(f"data {config.data!r} has {what} {top} but student {spec.name!r} outputs {num_classes} classes")
        val = None
        if config.val_data is not None:
            val = load_data(config.val_data, parse_options(config.storage_options))
            if val.kind != dataset.kind:
                raise BadInputError(f"--val-data {config.val_data!r} holds {val.kind}; --data {config.data!r} holds {dataset.kind}")
            if not val.labelled_rows:
                raise BadInputError(f"--val-data {config.val_data!r} has no labels")
            if val.regression != dataset.regression or val.num_outputs != dataset.num_outputs:
                what = lambda d: f"{d.num_outputs} regression targets" if d.regression else "class labels"  # noqa: E731
                raise BadInputError(f"--val-data {config.val_data!r} has {what(val)}; --data {config.data!r} has {what(dataset)}")
            if val.max_label >= num_classes:
                raise BadInputError(f"--val-data {config.val_data!r} has label {val.max_label}; student outputs {num_classes} classes")
            if not tokens:
                _output_width(model, val, spec.name)

        # The run directory: fresh, or resumable with the same configuration.
        existing = _read_run(config.out)
        if existing is not None and not config.resume:
            state = "a finished" if existing["finished"] else "an unfinished"
            raise RunMismatchError(
                f"--out {str(config.out)!r} already holds {state} run; pass --resume to continue it, or choose another directory"
            )
        if existing is None and config.out.is_dir() and any(config.out.iterdir()) and not _only_leftovers(config.out):
            raise RunMismatchError(f"--out {str(config.out)!r} is not empty and holds no run")
        stream = config.stream
        if existing is not None and stream is None and existing["config"].get("loader") in ("memory", "stream"):
            stream = existing["config"]["loader"] == "stream"  # keep the recorded mode: the modes order rows differently

        # The one place rows and tokens differ in reading: the loader.
        common = dict(batch_size=config.batch_size, seed=config.seed, rank=self.rank, world_size=self.world_size,
                      device=self.device, stream=stream)
        if tokens:
            loader = SequenceLoader(dataset.tokens, dataset.offsets, teachers=teacher_rows, labels=dataset.given_labels, **common)
        else:
            loader = BatchLoader(dataset.x, dataset.targets if dataset.regression else dataset.labels, store=store, teachers=list(config.teachers or ()), **common)
        batches = loader.batches_per_epoch
        steps_per_epoch = math.ceil(batches / config.grad_accum)
        plan = Plan(batches, config.grad_accum, config.max_steps or config.epochs * steps_per_epoch)
        record = {
            **config.to_json(),
            "mode": "distil" if config.distil else "hard-label",
            "kind": dataset.kind,
            "student": spec.to_dict(),
            "num_classes": num_classes,
            "data": {"fingerprint": dataset.fingerprint, "rows": len(dataset), "labelled_rows": labelled,
                     **({"sequences": dataset.num_seqs} if tokens else {})},
            "val_data": None if val is None else {"fingerprint": val.fingerprint, "rows": len(val)},
            "store": None if store is None else {
                "fingerprint": store.fingerprint, "rows": store.num_rows, "chunk_rows": store.chunk_rows,
            },
            "teachers": [
                {"name": t, "weights_sha256": info.weights_sha256, **info.layout.attrs()}
                for t, info in ((t, store.teacher(t)) for t in config.teachers or ())
            ],
            "loss_function": _loss_function(config, teacher_rows, head),
            **_fusion_fallback(config, dataset, teacher_rows),
            "loss_path": loss_path,
            "epochs": plan.epochs,
            "total_steps": plan.total_steps,
            "world_size": self.world_size,
            "loader": loader.mode,
            "batches_per_epoch": batches,
            "autocast": "bfloat16" if self.device.type == "cuda" else None,
            "student_pt": "best" if val is not None else "final",
            "device": self.device.type,
            "versions": {"torch": torch.__version__},
        }
        checkpoint = None
        if existing is not None:
            _require_same(existing["config"], record, config.out)
            checkpoint = existing["checkpoint"]
        row_entropy = None
        if teacher_rows is not None and teacher_rows.entropy and not tokens:  # (K, N) float32: 4 bytes a row and teacher
            row_entropy = torch.stack([store.read_entropy(t, 0, store.num_rows) for t in config.teachers])
        warnings = training_warnings(store, config.teachers, config.temperature) if store is not None and not config.regression else []
        hints = _hint_setup(config, store, dataset, model, spec.name) if config.features else None
        return Setup(config, record, spec, model, dataset, val, store, loader, plan, checkpoint, head, row_entropy, warnings, hints)

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        s, rank, world_size, device = self.s, self.rank, self.world_size, self.device
        config, plan, loader, run = s.config, s.plan, s.loader, s.config.out
        model = s.model.to(device)
        hints = tap = None
        params = list(model.parameters())
        if s.hints is not None:  # --feature: the projections train with the student, saved apart (projections.pt)
            hints = build_hints(s.hints["pairs"], s.hints["student_shapes"], s.hints["teacher_shapes"], seed=config.seed).to(device)
            if s.checkpoint is not None:  # the checkpoint's copy: projections.pt may be a moment newer (a kill between the two)
                if "projections" not in s.checkpoint:
                    raise CheckpointError(f"--resume: {str(run / 'checkpoint.pt')!r} holds no projections for --feature")
                hints.load_state_dict(s.checkpoint["projections"])
            params += list(hints.parameters())
            tap = FeatureTap(model, sorted({p.student for p in s.hints["pairs"]}), f"student {s.spec.name!r}")
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        objective = Objective.from_config(config, device, row_entropy=s.entropy)
        tokens = s.data.kind == "tokens"
        lm = _LanguageModel(model, fused=s.head == "fused") if tokens else model
        lr_at = _schedule(config, plan)

        # State: fresh, or from the checkpoint.
        epoch, start_batch, step = 0, 0, 0
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        sums = _EpochSums(device)
        resumed_from = None
        if s.checkpoint is not None:
            ckpt = s.checkpoint
            try:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise CheckpointError(f"--resume: {str(run / 'checkpoint.pt')!r} does not fit student {s.spec.name!r} ({type(e).__name__}: {first})") from e
            epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
            history, best = list(ckpt["history"]), ckpt["best"]
            if rank == 0:
                sums.load(ckpt["sums"])
            _set_rng_state(ckpt["rng"])
            resumed_from = {"epoch": epoch, "batch": start_batch}
            if rank == 0:
                _write_metrics(run, history)  # drops a line written after the checkpoint, before a kill
        else:
            torch.manual_seed(config.seed)  # the same training randomness with and without resume
        net = lm
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[device.index] if device.type == "cuda" else None)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        guard = LossGuard(device, batches_per_epoch=plan.batches_per_epoch)

        def save_checkpoint(at_epoch: int, at_batch: int, epoch_sums: dict[str, float]) -> None:
            state = {
                "format": CHECKPOINT_FORMAT, "epoch": at_epoch, "batch": at_batch, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                "sums": epoch_sums, "history": history, "best": best,
            }
            if hints is not None:  # in the checkpoint (what resume reads) and as projections.pt (what the run gives)
                state["projections"] = hints.state_dict()
                _save_atomic(run / "projections.pt", hints.state_dict())
            _save_atomic(run / "checkpoint.pt", state)

        def end_epoch(finished: int) -> None:
            """Metrics of epoch `finished` (all ranks), validation, the best student, a checkpoint (rank 0)."""
            nonlocal best
            guard.check(world_size)  # before anything of this epoch is saved: a NaN step never reaches the disk
            totals = sums.reduced(world_size)
            record = {
                "epoch": finished + 1,
                "loss": totals["loss"] / max(totals["rows"], 1),
                "train_accuracy": totals["correct"] / totals["labelled"] if totals["labelled"] and not sums.no_accuracy else None,
                "lr": lr_at(step - 1),
                "rows": int(totals["rows"]),
                "seconds": totals["seconds"],
                "rows_per_s": totals["rows"] / totals["seconds"] if totals["seconds"] > 0 else None,
            }
            if rank != 0:
                return
            if tokens:
                record["tokens_per_s"] = record["rows_per_s"]  # a row is a position
            if s.val is not None:
                if tokens:  # the best by validation perplexity (lower is better)
                    metrics = token_metrics(model, s.val, device=device)
                    key, better = "val_perplexity", lambda new, old: new < old
                elif s.val.regression:  # the best by validation MSE (averaged over the outputs; lower is better)
                    metrics = regression_metrics(predict_values(model, s.val.x, device=device), as_tensor(s.val.targets))
                    metrics = {k: v for k, v in metrics.items() if not isinstance(v, list)}  # the averages
                    key, better = "val_mse", lambda new, old: new < old
                else:  # the best by validation accuracy
                    metrics = classification_metrics(predict_log_probs(model, s.val.x, device=device), as_tensor(s.val.labels))
                    key, better = "val_accuracy", lambda new, old: new > old
                record.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
                if best is None or better(record[key], best[key]):
                    best = {"epoch": record["epoch"], key: record[key]}
                    _save_atomic(run / "student.pt", model.state_dict())  # before the checkpoint that records it
            history.append(record)
            save_checkpoint(finished + 1, 0, _EpochSums(device).as_dict())
            _write_metrics(run, history)

        every = config.checkpoint_every
        nb = plan.batches_per_epoch
        shown = _RunningLoss()
        with progress_bar(self.quiet or rank != 0) as bars, \
                contextlib.closing(loader.batches(epoch, plan.epochs, start_batch)) as batches:
            # "distil mlp 120/400 ... loss 0.4123  val_accuracy 0.912": optimizer steps, the running loss, the last validation.
            bar = bars.bar("distil" if config.distil else "train", s.spec.name, total=plan.total_steps)
            bar.update(completed=step, **_last_validation(history))
            net.train()
            tick = time.perf_counter()
            # One loop over every remaining batch of every epoch: the loader reads ahead across epoch ends.
            for epoch, b, batch in batches:
                first, end = plan.group(b)
                last_of_group = b + 1 == end
                # DDP: reduce gradients once per optimizer step, on the group's last batch.
                sync = net.no_sync() if world_size > 1 and not last_of_group else contextlib.nullcontext()
                with sync:
                    # The one place rows and tokens differ in training: the forward and the loss call.
                    if tokens:
                        with autocast:
                            out = net(batch.input_ids, batch.attention_mask)[batch.attention_mask]  # (P, H) or (P, V)
                        labels = batch.labels[batch.attention_mask]  # (P,): the real positions, padding dropped
                        segments = batch.position_seqs if config.fusion_scope is FusionScope.SEQUENCE else None  # (P,)
                        # Data with its own labels: their -100 positions (a prompt) count for nothing, as padding.
                        trained = labels != IGNORE_LABEL if s.data.masks_unlabelled else None
                        batch_loss = objective.tokens(out, lm.head if s.head == "fused" else None, batch.teachers, labels,
                                                      segments, mask=trained)
                        student_logits = None if s.head == "fused" else out
                    else:
                        with autocast:
                            student_logits = net(batch.x)  # (B, V)
                        labels = batch.labels
                        batch_loss = objective(student_logits, batch)
                        if hints is not None:
                            rows = batch.rows.cpu()
                            teacher = {p: s.hints["table"][p][rows].to(device, non_blocking=True) for p in hints.pairs}
                            weights = _hint_weights(objective, batch, config.teachers) if s.hints["fused"] else None
                            hint = feature_loss(hints, tap.take(), teacher, config.feature_loss, weights=weights)
                            batch_loss = batch_loss + config.feature_weight * hint
                    (batch_loss / (end - first) if end - first > 1 else batch_loss).backward()
                sums.add(batch_loss.detach(), None if student_logits is None else student_logits.detach(), labels)
                guard.add(epoch, b, batch_loss)
                if not last_of_group:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.advance(loss=shown.update(batch_loss.detach()))
                if b + 1 == nb or step == plan.total_steps:
                    sums.seconds += time.perf_counter() - tick
                    end_epoch(epoch)
                    bar.update(**_last_validation(history))
                    sums = _EpochSums(device)
                    tick = time.perf_counter()
                    if step == plan.total_steps:
                        break
                elif every and (b + 1) // every > first // every:  # a multiple of `every` fell in this group
                    guard.check(world_size)
                    epoch_sums = sums.reduced(world_size)  # a collective: every rank takes part
                    if rank == 0:
                        save_checkpoint(epoch, b + 1, {**epoch_sums, "seconds": sums.seconds + time.perf_counter() - tick})
        if rank == 0 and hints is not None:
            _save_atomic(run / "projections.pt", hints.state_dict())
        if rank == 0 and s.val is None:
            _save_atomic(run / "student.pt", model.state_dict())  # (with --val-data: the best, saved on the way)
        return {
            "run": str(run),
            "student": str(run / "student.pt"),
            "student_pt": s.record["student_pt"],
            "epochs": plan.epochs,
            "steps": step,
            "last": history[-1] if history else None,
            "best": best,
            "resumed_from": resumed_from,
            "rank": rank,
            "world_size": world_size,
            "loader": loader.mode,
            "mode": s.record["mode"],
            "warnings": s.warnings,
        }

    # -- cleanup ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Wait for every rank (rank 0 writes last), then leave the process group this trainer made."""
        try:
            if self.world_size > 1 and self.s is not None and dist.is_initialized():
                dist.barrier()
        finally:
            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()


class _RunningLoss:
    """The loss a progress bar shows: an exponential average of the batch losses, sampled at most
    every `every` seconds (reading a loss waits for the GPU; once a batch would stall it)."""

    def __init__(self, every: float = 0.5, decay: float = 0.7):
        self.every, self.decay = every, decay
        self.value: float | None = None
        self.last = -math.inf

    def update(self, batch_loss: Tensor) -> float | None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            x = float(batch_loss)
            self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x
        return self.value


def _last_validation(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last epoch's headline validation metric, for the progress bar."""
    last = history[-1] if history else {}
    return {k: last[k] for k in ("val_perplexity", "val_accuracy", "val_mse") if last.get(k) is not None}


class _EpochSums:
    """Running totals of an epoch, restorable from a checkpoint. Device tensors for what the batches
    compute (no per-batch host sync), host numbers for what the host knows."""

    KEYS = ("loss", "correct", "labelled")

    def __init__(self, device: torch.device):
        self.values = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.rows = 0
        self.seconds = 0.0
        self.no_accuracy = False

    def add(self, batch_loss: Tensor, student_logits: Tensor | None, labels: Tensor) -> None:
        """One batch: its mean loss, its logits (None: not materialised, no accuracy), its labels
        (regression: (B, D) float targets; no accuracy, a row with a known target counts as labelled)."""
        if labels.is_floating_point():
            student_logits, known = None, ~torch.isnan(labels).all(dim=1)
        else:
            known = labels != IGNORE_LABEL
        if student_logits is None:
            self.no_accuracy = True
            correct = torch.zeros((), device=labels.device)
        else:
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


def _schedule(config: TrainConfig, plan: Plan) -> Callable[[int], float]:
    """lr at optimizer step t (0-based): linear warm-up over `warmup_steps`, then cosine to 0 over the
    rest of the run, or lr / (1 + a * t / steps_per_epoch)."""
    lr, warmup, total = config.lr, config.warmup_steps, plan.total_steps
    if config.schedule is Schedule.COSINE:
        decay = lambda t: lr * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(total - warmup, 1)))  # noqa: E731
    else:
        decay = lambda t: lr / (1.0 + config.decay_rate * t / plan.steps_per_epoch)  # noqa: E731
    return lambda t: lr * (t + 1) / warmup if t < warmup else decay(t)


# ---------------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------------


def _hint_setup(config: TrainConfig, store: LogitStore, data: RowData | TokenData, model: torch.nn.Module, student: str) -> dict[str, Any]:
    """--feature pairs checked against the store and the student before anything is written: the
    teacher and its stored feature exist (complete, finite: the store's reads refuse NaN), the student
    module exists and is called in its forward, and the shapes pair (all but the last axis). The
    teachers' stored features are read once and held (float32 of the stored values)."""
    if data.kind == "tokens":
        raise BadInputError("--feature: hint training on token data is not supported yet (row data only)")
    pairs = [parse_pair(text) for text in config.features]
    if len(set(pairs)) != len(pairs):
        raise BadInputError(f"--feature lists a pair twice ({', '.join(config.features)})")
    check_feature_names(model, [p.student for p in pairs], f"student {student!r}")
    table, teacher_shapes = {}, {}
    for p in pairs:
        if p.teacher not in store.teachers:
            raise BadInputError(f"--feature {p}: store {str(store.path)!r} has no teacher {p.teacher!r} (it has: {', '.join(store.teachers)})")
        if p.teacher not in (config.teachers or ()):
            raise BadInputError(f"--feature {p}: teacher {p.teacher!r} is not one of this run's teachers ({', '.join(config.teachers or ())})")
        store.require_complete([p.teacher])
        layout = store.layout(p.teacher)
        stored = dict(layout.features)
        if p.module not in stored:
            raise BadInputError(f"--feature {p}: teacher {p.teacher!r} stores no feature {p.module!r} "
                                f"(it stores: {', '.join(stored) or 'none'}; name modules in its TOML's features = [...] for stage one)")
        key = f"{FEATURES_KEY}/{p.module}"
        raw = store.read(p.teacher, 0, store.num_rows, only=(key,))
        table[p] = layout.tensors(raw)[key].float()
        teacher_shapes[p] = tuple(stored[p.module])
    tap = FeatureTap(model, sorted({p.student for p in pairs}), f"student {student!r}")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            was = model.training
            model.eval()
            model(as_tensor(data.x[:2]))
            model.train(was)
        captured = tap.take()
    finally:
        tap.close()
    student_shapes = {}
    for p in pairs:
        if p.student not in captured:
            raise BadInputError(f"--feature {p}: student {student!r}'s module {p.student!r} is not called in its forward")
        student_shapes[p.student] = tuple(captured[p.student].shape[1:])
    build_hints(pairs, student_shapes, teacher_shapes)  # refuses shapes that cannot pair, naming both sides
    modules = [p.student for p in pairs]
    fused = any(modules.count(m) > 1 for m in modules)  # several teachers on one student module: the run's fusion weights
    return {"pairs": pairs, "table": table, "student_shapes": student_shapes, "teacher_shapes": teacher_shapes, "fused": fused}


def _hint_weights(objective: Objective, batch: Any, teachers: tuple[str, ...]) -> dict[str, Tensor] | None:
    """The run's per-row fusion weights of a row batch, {teacher: (B,)} (None: uniform), as its KD
    term fuses the teachers' logits."""
    entropies = None
    if objective.row_entropy is not None:
        entropies = objective.row_entropy[:, batch.rows].to(batch.labels.device)
    _, w = objective.target(batch.logits, batch.labels, entropies)
    if w is None or batch.logits is None or len(w.reshape(-1)) == 0:
        return None
    w = w.expand(len(batch), len(teachers)) if w.dim() == 1 else w
    return {t: w[:, k] for k, t in enumerate(teachers)}


def _choose_teachers(store: LogitStore, teachers: tuple[str, ...] | None) -> list[str]:
    available = store.teachers
    if not available:
        raise BadInputError(f"store {str(store.path)!r} holds no teachers yet")
    if not teachers:
        return available
    for name in teachers:
        if name not in available:
            raise BadInputError(f"--teachers: store {str(store.path)!r} has no teacher {name!r} (it has: {', '.join(available)})")
    return list(teachers)


def _output_width(model: torch.nn.Module, data: RowData, name: str) -> int:
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


def _fusion_needs(store: LogitStore, config: TrainConfig) -> bool:
    """Whether the run's fusion reads the stored entropies, after refusing what it cannot run on:
    --fusion-scope sequence on a store of rows, --fusion entropy on teachers that store none.
    posterior and best read them where every chosen teacher stores them (for unlabelled rows)."""
    if config.fusion_scope is FusionScope.SEQUENCE and store.kind != "tokens":
        raise BadInputError(
            f"--fusion-scope sequence: store {str(config.store)!r} holds rows, which form no sequences "
            "(token stores only; use --fusion-scope row)"
        )
    if config.fusion not in (Fusion.POSTERIOR, Fusion.BEST, Fusion.ENTROPY):
        return False
    without = [t for t in config.teachers if not store.layout(t).entropy]
    if config.fusion is Fusion.ENTROPY and without:
        raise BadInputError(
            f"--fusion entropy: teacher(s) {', '.join(without)} of store {str(config.store)!r} store no entropies "
            f"(written before mtkd stored them); write the teachers into a new store with this mtkd: "
            f"`mtkd infer --teachers TEACHERS.toml --data {config.data} --out NEW_STORE`"
        )
    return not without


def _fusion_fallback(config: TrainConfig, data: RowData | TokenData, teachers: TeacherRows | None) -> dict[str, Any]:
    """config.json's count of the rows that posterior and best weigh without a label (fusion.py)."""
    if config.fusion not in (Fusion.POSTERIOR, Fusion.BEST):
        return {}
    offsets = data.offsets if data.kind == "tokens" else None
    rows = fallback_rows(np.asarray(data.labels), offsets, config.fusion_scope)
    by_entropy = teachers is not None and teachers.entropy
    return {"fusion_fallback": {"entropy": rows if by_entropy else 0, "prior": 0 if by_entropy else rows}}


def _teacher_rows(store: LogitStore, config: TrainConfig, *, entropy: bool = False) -> TeacherRows:
    """The chosen teachers' reader, after checking that they can be fused at --temperature with --loss."""
    layouts = {t: store.layout(t) for t in config.teachers}
    sparse = [t for t, layout in layouts.items() if layout.name == "topk"]
    if sparse and len(sparse) != len(layouts):
        dense = [t for t in layouts if t not in sparse]
        raise BadInputError(f"--teachers: {', '.join(sparse)} stored top-k and {', '.join(dense)} dense cannot be fused; choose one layout")
    if sparse and store.kind != "tokens":
        raise BadInputError(f"store {str(config.store)!r}: training on top-k rows is not supported; store rows dense (no --top-k)")
    if sparse and config.loss is not Loss.KL:
        raise BadInputError(f"--loss {config.loss.value}: teachers stored top-k distil with --loss kl only")
    for name in sparse:
        stored = layouts[name].temperatures
        if not any(math.isclose(t, config.temperature, rel_tol=0, abs_tol=1e-9) for t in stored):
            raise BadInputError(
                f"--temperature {config.temperature:g}: teacher {name!r} of store {str(config.store)!r} has normalisers "
                f"at {', '.join(f'{t:g}' for t in stored)} only (give one of those, or rerun mtkd infer --temperatures)"
            )
    return TeacherRows(store, config.teachers, config.temperature, entropy=entropy)


class _LanguageModel(torch.nn.Module):
    """The student LM as the trainer calls it, in one forward (what DDP wraps): (B, L, H) hidden
    states when the loss applies the output layer itself (`fused`), else (B, L, V) logits."""

    def __init__(self, model: torch.nn.Module, *, fused: bool):
        super().__init__()
        self.model = model
        self.fused = fused
        # Kept out of the module tree (it is the model's own layer, registered there already).
        self._hidden_and_head = hidden_and_head(model) if fused else None
        # Built-in LMs take the ids alone (causal, right padding harmless); Hugging Face's the mask too.
        self._hidden_mask = fused and "attention_mask" in inspect.signature(self._hidden_and_head[0]).parameters

    @property
    def head(self) -> torch.nn.Linear:
        return self._hidden_and_head[1]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.fused:
            hidden = self._hidden_and_head[0]
            return hidden(input_ids, attention_mask.long()) if self._hidden_mask else hidden(input_ids)
        return lm_logits(self.model, input_ids, attention_mask)


def _check_lm(model: torch.nn.Module, data: TokenData, name: str, *, fused: bool) -> tuple[int, str]:
    """(vocabulary, head) of a student LM from one forward on the first sequences (eval, no grad).

    head is "fused" when the loss may take its hidden states and output layer: only if it exposes
    them and hidden @ weight.T (+ bias) is, on this batch, the model's own logits. A model that
    scales or soft-caps its logits after the output layer would otherwise be trained on the wrong
    loss (TRL PR 6629); it falls back to its logits.
    """
    n = min(2, data.num_seqs)
    lengths = np.diff(data.offsets[: n + 1])
    width = int(lengths.max())
    mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
    ids = torch.zeros((n, width), dtype=torch.int64)
    ids[mask] = torch.from_numpy(data.tokens[: int(data.offsets[n])].astype(np.int64))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                logits = _LanguageModel(model, fused=False)(ids, mask)
            except Exception as e:
                raise SpecError(f"student {name!r} fails on token ids of shape {tuple(ids.shape)} from {data.spec!r}: {type(e).__name__}: {e}") from e
            if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise SpecError(f"student {name!r} must return (batch, length, vocabulary) logits, got {shape}")
            head = "logits"
            if fused:
                try:
                    hidden = _LanguageModel(model, fused=True)
                    h = hidden(ids, mask)
                    lin = hidden.head
                    z = F.linear(h.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
                    real = logits[mask].float()
                    if z.shape[-1] == real.shape[-1] and torch.allclose(z[mask], real, rtol=1e-4, atol=1e-5 * max(1.0, float(real.abs().max()))):
                        head = "fused"
                except (SpecError, TypeError, AttributeError, RuntimeError):
                    head = "logits"  # no separable hidden states and output layer: the logits path
    finally:
        model.train(was_training)
    return int(logits.shape[-1]), head


def _loss_path(config: TrainConfig, name: str, sparse: bool, head: str) -> dict[str, str]:
    """Which way the student's output reaches the loss ("fused": hidden states and output layer;
    "logits") and why, for config.json; --loss-path fused where it cannot run is refused."""
    asked = config.loss_path
    if asked is LossPath.FUSED and not sparse:
        raise BadInputError("--loss-path fused: only token data distilled from top-k teachers has a fused-linear loss "
                            "(give --loss-path auto or logits)")
    if asked is LossPath.FUSED and head != "fused":
        raise BadInputError(f"--loss-path fused: student {name!r} exposes no hidden states and output layer whose product "
                            "is its logits (give --loss-path auto or logits)")
    if asked is not LossPath.AUTO:
        why = f"--loss-path {asked.value}"
    elif not sparse:
        why = "auto: the fused-linear loss is for token students of top-k teachers"
    elif head == "fused":
        why = "auto: the student's hidden states and output layer give its logits (checked on its first sequences)"
    else:
        why = "auto: the student's hidden states and output layer are not exposed or do not give its logits"
    return {"option": asked.value, "ran": head, "why": why}


def _loss_function(config: TrainConfig, teachers: TeacherRows | None, head: str) -> str:
    """Which kernel computes the loss (config.json says so, for the record)."""
    if config.regression:
        return f"{config.loss.value} of the outputs" + (f" against the {config.fusion.value} of the teachers' values" if config.distil else "")
    if teachers is None:
        return "cross_entropy"
    if teachers.sparse:
        return "fused_linear_sparse_kd_loss" if head == "fused" else "fused_sparse_kd_loss"
    return "fused_kd_loss" if config.loss is Loss.KL else "mse"


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
        missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
        if missing or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"--out {str(out)!r}: checkpoint.pt is not an mtkd checkpoint of format {CHECKPOINT_FORMAT} "
                f"(missing {', '.join(sorted(missing)) or 'nothing'}, format {checkpoint.get('format') if isinstance(checkpoint, dict) else None!r})"
            )
    finished = checkpoint is not None and checkpoint["step"] >= config.get("total_steps", math.inf)
    return {"config": config, "checkpoint": checkpoint, "finished": finished}


def _recorded_options(out: Path) -> dict[str, Any] | None:
    """The options a run being resumed recorded (its config.json), or None (_read_run reports a bad one)."""
    try:
        record = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _only_leftovers(out: Path) -> bool:
    # Temporary files of a run killed before it wrote config.json.
    return all(p.name.startswith(".tmp-") for p in out.iterdir())


def _require_same(old: Mapping[str, Any], new: Mapping[str, Any], out: Path) -> None:
    differ = differences(old, new)
    if differ:
        a, b, k = identity(old), identity(new), differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise RunMismatchError(
            f"--resume: run {str(out)!r} was made with {k}={json.dumps(a.get(k))}, now {k}={json.dumps(b.get(k))}{more}"
        )


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
    # 0: fine, 1: failed, 2: refused bad input (exit 2 on every rank, not only on the one that saw it)
    code = 0 if error is None else 2 if isinstance(error, BadInputError) else 1
    failed = torch.tensor([code], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed) == 2:
        raise BadInputError("another process refused the run's input (see its message)")
    if int(failed):
        raise MtkdError("another process failed setting up the run (see its message)")
    return result


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
    _save_atomic(path, text)


def _save_atomic(path: Path, obj: Any) -> None:
    """Write `obj` (text, or anything torch.save takes) to a temporary file, sync it, rename it into
    place; a failure (a full disk) removes the temporary file: never half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w" if isinstance(obj, str) else "wb") as f:
            if isinstance(obj, str):
                f.write(obj)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):  # fsync's error names no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_metrics(run: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpoint's history: a kill never leaves a duplicated or half line.
    _write_atomic(run / "metrics.jsonl", "".join(json.dumps(_finite(r)) + "\n" for r in history))


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
