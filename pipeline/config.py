"""The resolved, typed configuration of one `mtkd train` run: built once, handed down, written once.

    config = TrainConfig(student="mlp.toml", data="mnist1d:unlabeled", out="runs/kd", store="kd.zarr", temperature=2.0)
    run_train(config)

`mtkd train` builds a TrainConfig from its options; a library caller builds one directly. Its
constructor validates every option on its own (a bad value raises a BadInputError naming the
flag); what needs the store (which teachers there are) is checked by the trainer's setup, which
then fills in `teachers` and `teacher_weights` with `resolved(...)`: the config written to
RUN/config.json and compared by `--resume` is that resolved one, never a second copy of the options.

config.json is `to_json()` (the options, paths under "paths") merged with the facts the setup
measured (fingerprints, sizes, loader mode; see train.py). `--resume` compares everything except
`RESUMABLE_KEYS`: where things are and how often to checkpoint, not what is trained.
"""

from __future__ import annotations

import enum
import math
import shlex
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from mtkd.pipeline.errors import BadInputError


class Fusion(str, enum.Enum):
    MEAN = "mean"
    WEIGHTED = "weighted"
    CONFIDENCE = "confidence"
    VOTE = "vote"
    POSTERIOR = "posterior"  # v3: the fusions that select (fusion.py)
    BEST = "best"
    ENTROPY = "entropy"
    MEDIAN = "median"  # v3, regression teachers: the per-output median over the teachers


# The fusions whose weights come from the teachers' stored values through --teacher-weights (the
# prior pi), --fusion-temperature and --fusion-scope (SPEC v3 "Fusion"; pipeline/fusion.py).
SELECTING = (Fusion.POSTERIOR, Fusion.BEST, Fusion.ENTROPY)
# v3 "Features and regression": what a store of regression teachers (layout "values") fuses with.
REGRESSION_FUSIONS = (Fusion.MEAN, Fusion.WEIGHTED, Fusion.MEDIAN)


class FusionScope(str, enum.Enum):
    ROW = "row"  # each row (tokens: each position)
    SEQUENCE = "sequence"  # tokens: one weight per teacher and sequence


class Loss(str, enum.Enum):
    KL = "kl"
    MSE = "mse"
    HUBER = "huber"  # v3, regression: Huber (delta 1) of the outputs
    L1 = "l1"  # v3, regression: absolute error of the outputs


CLASSIFICATION_LOSSES = (Loss.KL, Loss.MSE)
REGRESSION_LOSSES = (Loss.MSE, Loss.HUBER, Loss.L1)


class LossPath(str, enum.Enum):
    """How a student LM's output reaches the sparse loss: its hidden states and output layer
    (`fused_linear_sparse_kd_loss`, no (P, V) logits held), its logits (`fused_sparse_kd_loss`),
    or whichever fits (auto: fused where the hidden states and output layer give the logits)."""

    AUTO = "auto"
    FUSED = "fused"
    LOGITS = "logits"


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    INVERSE = "inverse"


CHECKPOINT_EVERY = 1000  # batches; plus the end of every epoch

# Options whose default depends on the data's kind (None in a TrainConfig: "by the data's kind",
# filled in by for_kind() at setup and written resolved to config.json). Tokens: what the project's
# measurements found best for language models (README, "The language-model demo": T = 2 gave 1.046 x
# the baseline's perplexity where T = 1 gave 0.887, alpha 0.9 worse than 0.8; "Top-k fidelity": pure
# KD lost 9.7% at k = 64 where alpha 0.5 lost 3.0%). Rows: Hinton's T = 2 and pure KD, as before.
KIND_DEFAULTS: dict[str, dict[str, float]] = {"rows": {"temperature": 2.0, "alpha": 1.0},
                                              "tokens": {"temperature": 1.0, "alpha": 0.8}}

# Keys of config.json that may differ on --resume: where things are and how the run is driven,
# not what is trained. ("loader" is compared: the two modes order rows differently.)
RESUMABLE_KEYS = ("command", "device", "checkpoint_every", "versions", "paths")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs from its caller. Fields mirror `mtkd train`'s options (see its --help)."""

    student: Path  # TOML with one [student] table
    data: str  # data spec the student trains on
    out: Path  # run directory
    store: Path | None = None  # None: hard labels; a URL (s3://...) becomes a storage.ObjectPath
    teachers: tuple[str, ...] | None = None  # None: every teacher of the store (filled in by resolved())
    fusion: Fusion = Fusion.MEAN
    teacher_weights: Mapping[str, float] | None = None  # --fusion weighted, or the prior pi of posterior/best/entropy; normalised
    temperature: float | None = None  # None: by the data's kind (KIND_DEFAULTS)
    alpha: float | None = None  # weight of the KD term; 1 - alpha weighs the cross-entropy. None: by kind
    loss: Loss | None = None  # None: kl on classification data, mse on regression data (filled in by for_kind)
    epochs: int = 30
    max_steps: int | None = None  # optimizer steps; when given, ends the run (the epochs it spans are derived)
    batch_size: int = 128  # rows (rows) or sequences (tokens) per batch and process
    grad_accum: int = 1  # batches per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: Schedule = Schedule.COSINE
    decay_rate: float = 1.0  # a of the inverse schedule, per epoch
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps, then the schedule
    seed: int = 0
    device: str = "auto"
    val_data: str | None = None
    resume: bool = False
    stream: bool | None = None  # None: by available memory (loader.py)
    checkpoint_every: int = CHECKPOINT_EVERY
    fusion_temperature: float = 1.0  # tau of --fusion posterior|best|entropy
    fusion_scope: FusionScope = FusionScope.ROW  # sequence: tokens only, posterior|best|entropy
    loss_path: LossPath = LossPath.AUTO  # token students of top-k teachers (train.py says which ran, and why)
    regression: bool = False  # v3: the data has float labels (filled in by for_kind from the data)
    features: tuple[str, ...] = ()  # v3: --feature STUDENT_MODULE=TEACHER:MODULE pairs (hint losses)
    feature_loss: str = "mse"  # --feature-loss mse|cosine
    feature_weight: float = 1.0  # --feature-weight BETA
    storage_options: tuple[str, ...] = ()  # v3: --storage-option KEY=VALUE pairs for a store at a URL

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the given values once, here
        set_(self, "student", Path(self.student))
        set_(self, "out", Path(self.out))
        set_(self, "data", str(self.data))
        set_(self, "storage_options", tuple(self.storage_options))
        if self.store is not None:
            from mtkd.pipeline.storage import is_url, location, parse_options  # a local path stays a Path

            # The options are for whichever of the store and the data (--data, --val-data) lives at a URL.
            data_remote = any(is_url(d) for d in (self.data, self.val_data) if d is not None)
            options = parse_options(self.storage_options) if is_url(self.store) or not data_remote else {}
            set_(self, "store", location(self.store, options))
        if self.teachers is not None:
            names = tuple(self.teachers)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise BadInputError(f"--teachers {','.join(map(str, names))!r}: expected comma-separated names, e.g. cnn,gru")
            set_(self, "teachers", tuple(dict.fromkeys(names)))
        if self.teacher_weights is not None:
            set_(self, "teacher_weights", {str(k): float(v) for k, v in self.teacher_weights.items()})
        for name, kind, flag in (("fusion", Fusion, "--fusion"), ("loss", Loss, "--loss"), ("schedule", Schedule, "--schedule"),
                                 ("fusion_scope", FusionScope, "--fusion-scope")):
            if getattr(self, name) is not None:
                set_(self, name, _choice(getattr(self, name), kind, flag))
        set_(self, "loss_path", _choice(self.loss_path, LossPath, "--loss-path"))
        for name in ("temperature", "alpha", "lr", "weight_decay", "decay_rate", "fusion_temperature"):
            if getattr(self, name) is not None:
                set_(self, name, float(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        if self.features:
            from mtkd.pipeline.features import FEATURE_LOSSES, parse_pair

            for text in self.features:
                parse_pair(text)
            if self.store is None:
                raise BadInputError("--feature needs --store (the teachers' stored features)")
            if self.feature_loss not in FEATURE_LOSSES:
                raise BadInputError(f"--feature-loss {self.feature_loss!r}: choose one of {', '.join(FEATURE_LOSSES)}")
            if not (math.isfinite(float(self.feature_weight)) and self.feature_weight >= 0):
                raise BadInputError(f"--feature-weight must be a finite number >= 0, got {self.feature_weight}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BadInputError(f"--temperature must be > 0, got {self.temperature}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise BadInputError(f"--alpha must lie in [0, 1], got {self.alpha}")
        for flag, value, least in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                   ("--grad-accum", self.grad_accum, 1), ("--seed", self.seed, 0),
                                   ("--checkpoint-every", self.checkpoint_every, 0), ("--warmup-steps", self.warmup_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadInputError(f"{flag} must be an integer >= {least}, got {value!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise BadInputError(f"--max-steps must be an integer >= 1, got {self.max_steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BadInputError(f"--lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise BadInputError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.decay_rate) and self.decay_rate >= 0):
            raise BadInputError(f"--decay-rate must be >= 0, got {self.decay_rate}")
        if self.store is None:
            for flag, given in (("--teachers", self.teachers), ("--teacher-weights", self.teacher_weights)):
                if given:
                    raise BadInputError(f"{flag} needs --store")
            if self.stream:
                raise BadInputError("streaming needs --store (there are no logits to stream)")
            if self.loss_path is LossPath.FUSED:
                raise BadInputError("--loss-path fused needs --store (the fused-linear loss distils from top-k teachers)")
        if not (math.isfinite(self.fusion_temperature) and self.fusion_temperature > 0):
            raise BadInputError(f"--fusion-temperature must be > 0, got {self.fusion_temperature}")
        if self.fusion not in SELECTING:
            for flag, given in (("--fusion-temperature", self.fusion_temperature != 1.0),
                                ("--fusion-scope", self.fusion_scope is not FusionScope.ROW)):
                if given:
                    raise BadInputError(f"{flag} needs --fusion posterior, best or entropy (got --fusion {self.fusion.value})")
        if self.teacher_weights:
            if self.fusion is not Fusion.WEIGHTED and self.fusion not in SELECTING:
                raise BadInputError(
                    f"--teacher-weights needs --fusion weighted, or posterior, best or entropy as their prior (got --fusion {self.fusion.value})"
                )
            for name, w in self.teacher_weights.items():
                if not (math.isfinite(w) and w >= 0):
                    raise BadInputError(f"--teacher-weights: weight of {name!r} must be finite and >= 0, got {w}")
            if sum(self.teacher_weights.values()) <= 0:
                raise BadInputError("--teacher-weights are all zero")
        elif self.fusion is Fusion.WEIGHTED and self.store is not None:
            raise BadInputError("--fusion weighted needs --teacher-weights, e.g. cnn=2,gru=1")

    @property
    def distil(self) -> bool:
        return self.store is not None

    @property
    def selecting(self) -> bool:
        """Distilling through a fusion that selects (posterior, best, entropy)."""
        return self.distil and self.fusion in SELECTING

    def for_kind(self, kind: str, recorded: Mapping[str, Any] | None = None, *, regression: bool = False) -> TrainConfig:
        """This config with the options left None filled in: from `recorded` (the config.json of the run
        being resumed, so that a run keeps the defaults it started with), else KIND_DEFAULTS[kind];
        `regression` (the data has float labels): checks the options a regression run takes (no
        --temperature, a regression --fusion and --loss) and defaults --loss to mse."""
        self._check_task(regression)
        filled: dict[str, Any] = {"regression": regression} if regression else {}
        if self.loss is None:
            filled["loss"] = Loss.MSE if regression else Loss.KL
        for name, default in KIND_DEFAULTS[kind].items():
            if regression and name == "temperature":
                continue  # raw outputs: no softmax, no temperature
            if getattr(self, name) is None:
                kept = (recorded or {}).get(name)
                filled[name] = float(kept) if isinstance(kept, (int, float)) and not isinstance(kept, bool) else default
        return replace(self, **filled) if filled else self

    def _check_task(self, regression: bool) -> None:
        """Options that only one task has: refused on the other, naming the flag."""
        if regression:
            if self.temperature is not None and self.distil:
                raise BadInputError(f"--temperature {self.temperature:g}: regression teachers (float labels, layout values) are raw "
                                    "outputs, fused without softmax or temperature; leave it out")
            if self.distil and self.fusion not in REGRESSION_FUSIONS:
                raise BadInputError(f"--fusion {self.fusion.value} fuses classifiers; regression teachers take "
                                    f"{', '.join(f.value for f in REGRESSION_FUSIONS)}")
            if self.loss is not None and self.loss not in REGRESSION_LOSSES:
                raise BadInputError(f"--loss {self.loss.value} is a classification loss; regression takes "
                                    f"{', '.join(x.value for x in REGRESSION_LOSSES)}")
            if self.features:
                raise BadInputError("--feature: hint training with regression data is not supported yet")
        else:
            if self.fusion is Fusion.MEDIAN and self.distil:
                raise BadInputError("--fusion median fuses regression teachers (float labels, layout values); "
                                    f"data {self.data!r} has class labels")
            if self.loss is not None and self.loss not in CLASSIFICATION_LOSSES:
                raise BadInputError(f"--loss {self.loss.value} is a regression loss; data {self.data!r} has class labels "
                                    f"(classification takes {', '.join(x.value for x in CLASSIFICATION_LOSSES)})")

    def resolved(self, teachers: list[str]) -> TrainConfig:
        """This config with the store's chosen teachers filled in and the weights checked against them."""
        weights = None
        if self.teacher_weights:
            for name in self.teacher_weights:
                if name not in teachers:
                    raise BadInputError(f"--teacher-weights names {name!r}, which is not a chosen teacher ({', '.join(teachers)})")
            missing = [t for t in teachers if t not in self.teacher_weights]
            if missing:
                raise BadInputError(f"--teacher-weights gives no weight for teacher(s) {', '.join(missing)}")
            weights = {t: self.teacher_weights[t] for t in teachers}
        return replace(self, teachers=tuple(teachers), teacher_weights=weights)

    def to_json(self) -> dict[str, Any]:
        """The options as config.json holds them: what is trained at the top, where things are under "paths"."""
        distil = self.distil
        return {
            "command": self.command_line(),
            "fusion": self.fusion.value if distil else None,
            "teacher_weights": dict(self.teacher_weights) if self.teacher_weights else None,
            "fusion_temperature": self.fusion_temperature if self.selecting else None,
            "fusion_scope": self.fusion_scope.value if self.selecting else None,
            "temperature": self.temperature if distil else None,
            "alpha": self.alpha if distil else None,
            "loss": (self.loss or Loss.KL).value if distil or self.regression else "ce",  # unresolved (None): kl, as for_kind fills it
            **({"task": "regression"} if self.regression else {}),
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "optimizer": {"name": "AdamW", "lr": self.lr, "weight_decay": self.weight_decay, "betas": [0.9, 0.999]},
            "schedule": {"name": self.schedule.value, "decay_rate": self.decay_rate if self.schedule is Schedule.INVERSE else None,
                         "warmup_steps": self.warmup_steps, "unit": "optimizer step"},
            "seed": self.seed,
            **({"features": {"pairs": list(self.features), "loss": self.feature_loss, "weight": self.feature_weight}} if self.features else {}),
            "checkpoint_every": self.checkpoint_every,
            "paths": {
                "student": str(self.student), "data": self.data, "out": str(self.out),
                "store": None if self.store is None else str(self.store.resolve()), "val_data": self.val_data,
            },
        }

    def command_line(self) -> str:
        """The `mtkd train` command that makes this run (config.json starts with it)."""
        args = ["mtkd", "train", "--student", str(self.student), "--data", self.data, "--out", str(self.out)]
        if self.store is not None:
            args += ["--store", str(self.store)]
            for pair in self.storage_options:  # a secret's value is not written down
                key = pair.partition("=")[0]
                args += ["--storage-option", pair if not any(w in key.lower() for w in ("secret", "key", "token", "password")) else f"{key}=***"]
            if self.teachers:
                args += ["--teachers", ",".join(self.teachers)]
            args += ["--fusion", self.fusion.value]
            for flag, value in (("--temperature", self.temperature), ("--alpha", self.alpha)):
                args += [] if value is None else [flag, str(value)]  # None: not resolved yet (by the data's kind)
            args += ["--loss", (self.loss or Loss.KL).value]
            if self.teacher_weights:
                args += ["--teacher-weights", ",".join(f"{k}={v:g}" for k, v in self.teacher_weights.items())]
            if self.selecting:
                args += ["--fusion-temperature", f"{self.fusion_temperature:g}", "--fusion-scope", self.fusion_scope.value]
        args += ["--max-steps", str(self.max_steps)] if self.max_steps is not None else ["--epochs", str(self.epochs)]
        args += ["--batch-size", str(self.batch_size)]
        if self.grad_accum != 1:
            args += ["--grad-accum", str(self.grad_accum)]
        args += ["--lr", f"{self.lr:g}", "--weight-decay", f"{self.weight_decay:g}", "--schedule", self.schedule.value]
        if self.schedule is Schedule.INVERSE:
            args += ["--decay-rate", f"{self.decay_rate:g}"]
        if self.warmup_steps:
            args += ["--warmup-steps", str(self.warmup_steps)]
        args += ["--seed", str(self.seed)]
        for pair in self.features:
            args += ["--feature", pair]
        if self.features:
            args += ["--feature-loss", self.feature_loss, "--feature-weight", f"{self.feature_weight:g}"]
        if self.val_data is not None:
            args += ["--val-data", self.val_data]
        if self.loss_path is not LossPath.AUTO:
            args += ["--loss-path", self.loss_path.value]
        return shlex.join(args)


# Every option's default, by name (the CLI's defaults come from here).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What `--resume` compares: a config.json without RESUMABLE_KEYS."""
    return {k: v for k, v in record.items() if k not in RESUMABLE_KEYS}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys of two config.json records whose identities differ, sorted."""
    a, b = identity(old), identity(new)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _choice(value: Any, kind: type[enum.Enum], flag: str) -> enum.Enum:
    if isinstance(value, kind):
        return value
    try:
        return kind(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        raise BadInputError(f"{flag} must be one of {', '.join(c.value for c in kind)}, got {value!r}") from None


__all__ = ["CHECKPOINT_EVERY", "CLASSIFICATION_LOSSES", "DEFAULTS", "KIND_DEFAULTS", "REGRESSION_FUSIONS", "REGRESSION_LOSSES", "Fusion", "FusionScope", "Loss", "LossPath", "RESUMABLE_KEYS", "SELECTING", "Schedule", "TrainConfig", "differences", "identity"]
