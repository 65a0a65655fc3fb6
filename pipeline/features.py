"""Intermediate features (SPEC v3 "Features and regression"): capture, hints and their loss.

Stage one: a teacher's TOML names modules (`features = ["layer3", "encoder.layers.5"]`, names from
`named_modules()`, or `"hidden_states.N"` for a Hugging Face model's `output_hidden_states`); a
`FeatureTap` captures their outputs on every forward (a forward hook; a tuple output gives its first
element) and the layout stores them as `features/<module>`, row axis first, trailing shape kept.

Stage two: `--feature STUDENT_MODULE=TEACHER:MODULE` pairs (`parse_pair`); each pair has a learned
projection, a Linear over the last axis from the student's width to the teacher's (`Hints`); several
teachers on one student module are fused by the run's per-row fusion weights. For one student
module s and its teachers k, with P_k the pair's projection and w_nk the fusion weights:

    loss_n = sum_k w_nk * d(P_k(h_s,n), h_k,n)        d: "mse"    mean over the feature's elements of (a - b)^2
                                                      d: "cosine" mean over the feature's leading positions of
                                                                  1 - cos(a, b) along the last axis
    feature_loss = sum over student modules of (sum over counted rows of loss_n) / (number of counted rows)

Rows with mask False (padding) count for nothing; unlabelled rows are hinted like labelled ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtkd.pipeline.errors import BadInputError

FEATURE_LOSSES = ("mse", "cosine")
FEATURES_KEY = "features"  # the store group of a teacher's features (layouts.FEATURES)
HIDDEN_RE = re.compile(r"^hidden_states\.(\d+)$")
PAIR_RE = re.compile(r"^([^=:\s]+)=([A-Za-z0-9_.-]+):([^=:\s]+)$")


def check_feature_names(model: nn.Module, names: Sequence[str], who: str) -> None:
    """Every name is a module of `model` (or hidden_states.N); else BadInputError naming both."""
    modules = dict(model.named_modules())
    for name in names:
        if HIDDEN_RE.match(name) or name in modules:
            continue
        near = [m for m in modules if m and (name in m or m.endswith(name.rsplit(".", 1)[-1]))][:5]
        hint = f" (modules like it: {', '.join(near)})" if near else ""
        raise BadInputError(f"{who} has no module {name!r}{hint}")


class FeatureTap:
    """Forward hooks on `names` of `model`: after a forward, `take()` gives {name: output}.

    `hidden_states.N` names ask the model for its hidden states (`call_kwargs`); `collect(out)` picks
    them from the model's output. A tuple output takes its first element."""

    def __init__(self, model: nn.Module, names: Sequence[str], who: str = "model"):
        check_feature_names(model, names, who)
        self.names, self.who = tuple(names), who
        self._captured: dict[str, torch.Tensor] = {}
        self._hidden = {name: int(m.group(1)) for name in names if (m := HIDDEN_RE.match(name))}
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in names if name not in self._hidden]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._captured[name] = output
        return hook

    def call_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True} if self._hidden else {}

    def collect(self, out: Any) -> None:
        """Pick the hidden states a Hugging Face output carries."""
        if not self._hidden:
            return
        states = getattr(out, "hidden_states", None)
        if states is None and isinstance(out, dict):
            states = out.get("hidden_states")
        if states is None:
            raise BadInputError(f"{self.who}: asked for hidden_states but the model returns none (not a Hugging Face model?)")
        for name, index in self._hidden.items():
            if not 0 <= index < len(states):
                raise BadInputError(f"{self.who}: {name} does not exist (the model returns {len(states)} hidden states)")
            self._captured[name] = states[index]

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs of the last forward (each name once; a module not called is missing)."""
        out, self._captured = self._captured, {}
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- stage two --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One `--feature STUDENT_MODULE=TEACHER:MODULE`."""

    student: str
    teacher: str
    module: str

    def __str__(self) -> str:
        return f"{self.student}={self.teacher}:{self.module}"

    @property
    def key(self) -> str:
        """The projection's name in projections.pt."""
        return str(self)


def parse_pair(text: str) -> Pair:
    m = PAIR_RE.match(text.strip())
    if not m:
        raise BadInputError(f"--feature {text!r}: expected STUDENT_MODULE=TEACHER:MODULE, e.g. layer2=cnn:layer3")
    return Pair(*m.groups())


class Hints(nn.Module):
    """One projection per pair: Linear(student width -> teacher width) over the last axis."""

    def __init__(self, pairs: Sequence[Pair], student_widths: dict[str, int], teacher_widths: dict[Pair, int]):
        super().__init__()
        self.pairs = tuple(pairs)
        self.projections = nn.ModuleDict({_safe(p.key): nn.Linear(student_widths[p.student], teacher_widths[p]) for p in self.pairs})

    def project(self, pair: Pair, h: torch.Tensor) -> torch.Tensor:
        return self.projections[_safe(pair.key)](h)


def _safe(key: str) -> str:
    return key.replace(".", "\u00b7")  # ModuleDict keys may not hold "."


def build_hints(pairs: Sequence[Pair], student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[Pair, tuple[int, ...]],
                seed: int = 0) -> Hints:
    """Projections for `pairs`, the student module's per-row shape against the stored teacher
    feature's: all but the last axis must agree. Initialised from `seed` alone."""
    for p in pairs:
        s, t = tuple(student_shapes[p.student]), tuple(teacher_shapes[p])
        if not s or not t or s[:-1] != t[:-1]:
            raise BadInputError(
                f"--feature {p}: student module {p.student!r} gives rows of shape {s}, teacher {p.teacher!r}'s {p.module!r} "
                f"is stored as {t}: all but the last axis must agree (the projection maps the last)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Hints(pairs, {p.student: student_shapes[p.student][-1] for p in pairs}, {p: teacher_shapes[p][-1] for p in pairs})


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, ...) projected student and teacher features -> (n,) per-row distance (see the module doc)."""
    a, b = a.float(), b.float()
    if kind == "mse":
        return (a - b).pow(2).flatten(1).mean(dim=1)
    if kind == "cosine":
        return (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).reshape(len(a), -1).mean(dim=1)
    raise BadInputError(f"--feature-loss {kind!r}: choose one of {', '.join(FEATURE_LOSSES)}")


def feature_loss(hints: Hints, student: dict[str, torch.Tensor], teacher: dict[Pair, torch.Tensor], kind: str,
                 weights: dict[str, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The summed hint loss over student modules (module doc). `student`: {module: (n, ...)},
    `teacher`: {pair: (n, ...)}, `weights`: {teacher name: (n,)} fusion weights normalised per row
    over the teachers of each student module (None: uniform), `mask` (n,) rows counted."""
    total = None
    by_module: dict[str, list[Pair]] = {}
    for p in hints.pairs:
        by_module.setdefault(p.student, []).append(p)
    for module, pairs in by_module.items():
        h = student[module]
        n = len(h)
        if weights is None:
            w = {p: torch.full((n,), 1.0 / len(pairs), device=h.device) for p in pairs}
        else:
            raw = torch.stack([weights[p.teacher].to(h.device).float() for p in pairs])  # (P, n)
            raw = raw / raw.sum(dim=0, keepdim=True).clamp(min=1e-30)
            w = {p: raw[i] for i, p in enumerate(pairs)}
        per_row = sum(w[p] * distance(hints.project(p, h), teacher[p].to(h.device), kind) for p in pairs)
        if mask is not None:
            m = mask.to(h.device)
            count = m.sum().clamp(min=1)
            part = torch.where(m, per_row, torch.zeros_like(per_row)).sum() / count
        else:
            part = per_row.mean() if n else per_row.sum()
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(())
    return total
