"""Warnings about a store's teachers that predict a poor student, for `mtkd train` (at setup) and
`mtkd inspect`: one line each, also in `--json` as `warnings`.

- a top-k teacher without tail samples whose mean tail mass (its probability outside the stored
  top-k) is above TAIL_MASS_LIMIT at the training temperature: the tail bucket teaches the student nothing about
  which unlisted class (README, "Top-k fidelity"); more k, or tail samples, help;
- a fused ensemble (the mean of the teachers' probabilities) worse than its best teacher by more
  than DILUTION_LIMIT in perplexity (exp of the NLL; rows too): the others dilute it; a selecting
  fusion or fewer teachers help. The limit sits above the language-model demo's own 1.089
  (ensemble 72.4 against its GRU's 66.5 on validation), which still distils to 0.875 x the baseline;
- a teacher no better than a unigram model of the data (the labels' own frequencies): neither in NLL
  nor in accuracy (the unigram model's is the most frequent label's share). An over-confident but
  accurate teacher is still worth distilling from; one that loses on both is not.

Every number comes from stored values against the stored labels: the teachers' and the mixture's
label log-probabilities. `mtkd inspect` passes its report (the whole store); `mtkd train` reads the
first blocks of the store, up to SAMPLE_ROWS rows, so that its setup stays cheap on any store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtkd.pipeline.data import IGNORE_LABEL
from mtkd.pipeline.layouts import format_temperatures

TAIL_MASS_LIMIT = 0.3
DILUTION_LIMIT = 1.15  # ensemble perplexity / best teacher's
SAMPLE_ROWS = 1 << 18


def warnings_of(
    *, teachers: Mapping[str, Mapping[str, Any]], ensemble_nll: float | None, unigram: tuple[float, float],
    temperature: float, kind: str,
) -> list[str]:
    """The warnings, from per teacher {"nll", "accuracy", "tail_mass": {T: mass} or None}, the mean
    ensemble's NLL (None: fewer than two teachers) and the unigram model's (NLL, accuracy), at `temperature`."""
    out = []
    at = format_temperatures([temperature])
    for name, t in teachers.items():
        tail = (t.get("tail_mass") or {}).get(at)
        if tail is not None and math.isfinite(tail) and tail > TAIL_MASS_LIMIT:
            out.append(f"teacher {name!r} leaves {tail:.2f} of its probability outside its stored top-k at T = {at} "
                       f"(above {TAIL_MASS_LIMIT}): store more (--top-k) or tail samples, or distil at a lower --temperature")
    unigram_nll, unigram_accuracy = unigram
    for name, t in teachers.items():
        nll, accuracy = t.get("nll"), t.get("accuracy")
        if (nll is not None and math.isfinite(nll) and math.isfinite(unigram_nll) and nll >= unigram_nll
                and (accuracy is None or not math.isfinite(accuracy) or accuracy <= unigram_accuracy)):
            what = "perplexity" if kind == "tokens" else "NLL"
            mine, uni = (math.exp(nll), math.exp(unigram_nll)) if kind == "tokens" else (nll, unigram_nll)
            out.append(f"teacher {name!r} is no better than a unigram model of the data ({what} {mine:.4g} against "
                       f"{uni:.4g}): it has little to teach; drop it or train it more")
    nlls = {n: t["nll"] for n, t in teachers.items() if t.get("nll") is not None and math.isfinite(t["nll"])}
    if ensemble_nll is not None and math.isfinite(ensemble_nll) and len(nlls) > 1:
        best = min(nlls, key=nlls.get)
        ratio = math.exp(ensemble_nll - nlls[best])
        if ratio > DILUTION_LIMIT:
            out.append(f"the mean of the teachers is worse than {best!r} alone ({ratio:.3f} x its perplexity): "
                       f"the others dilute it; try --fusion confidence (a per-row choice) or fewer teachers (--teachers {best})")
    return out


def unigram(labels: np.ndarray) -> tuple[float, float]:
    """(NLL, accuracy) of the labels under their own frequencies (the best unigram model of them, in sample)."""
    y = labels[labels != IGNORE_LABEL]
    if not len(y):
        return math.nan, math.nan
    p = np.bincount(y).astype(np.float64)
    p = p[p > 0] / len(y)
    return float(-(p * np.log(p)).sum()), float(p.max())


def report_warnings(report: Mapping[str, Any], labels: np.ndarray, temperature: float) -> list[str]:
    """For `mtkd inspect`: from its report (every stored row) and the store's labels."""
    # A teacher with tail samples has its tail taught by them, not spread as one bucket: no tail warning.
    teachers = {t["name"]: {"nll": t["metrics"].get("nll"), "accuracy": t["metrics"].get("accuracy"),
                            "tail_mass": None if t.get("tail_samples") else t["metrics"].get("tail_mass")}
                for t in report["teachers"] if t["complete"]}
    ensemble = report.get("ensemble")
    nll = ensemble["metrics"]["nll"] if ensemble and len(ensemble["teachers"]) > 1 else None
    return warnings_of(teachers=teachers, ensemble_nll=nll, unigram=unigram(labels), temperature=temperature,
                       kind=report["kind"])


def training_warnings(store: Any, teachers: Sequence[str], temperature: float, rows: int = SAMPLE_ROWS) -> list[str]:
    """For `mtkd train`: the chosen teachers on the store's first blocks (at most `rows` rows, whole blocks)."""
    stop = 0
    for block in range(store.num_blocks):
        stop = store.block_range(block)[1]
        if stop >= rows:
            break
    labels = store.labels(0, stop)
    y = torch.from_numpy(labels)
    keep = y != IGNORE_LABEL
    label_lp, stats = {}, {}
    for name in teachers:
        layout = store.layout(name)
        summary = layout.summarize(layout.tensors(store.read(name, 0, stop)), y)
        label_lp[name] = summary.label_logprob.double()[keep]
        labelled = bool(keep.any())
        stats[name] = {"nll": -float(label_lp[name].mean()) if labelled else math.nan,
                       "accuracy": float((summary.top1[keep] == y[keep]).double().mean()) if labelled else math.nan,
                       "tail_mass": None if getattr(layout, "tail_samples", 0) else (store.teacher(name).stats or {}).get("tail_mass")}
    ensemble = None
    if len(teachers) > 1 and bool(keep.any()):
        mixed = torch.logsumexp(torch.stack([label_lp[n] for n in teachers]), dim=0) - math.log(len(teachers))
        ensemble = -float(mixed.mean())
    return warnings_of(teachers=stats, ensemble_nll=ensemble, unigram=unigram(labels), temperature=temperature,
                       kind=store.kind)
