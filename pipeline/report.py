"""What stage one records as a teacher's stats, and what `mtkd inspect` shows, computed from a store.

Stats (recorded per block while stage one writes, summed when the teacher completes): from each row's
summary (layouts.RowSummary: label log-probability, top-1 class and its log-probability, and for
top-k teachers the tail mass at each stored temperature), as float64 sums
    [labelled rows, correct top-1, -sum log p(label), rows, ECE bins (count, confidence, correct) x 15,
     tail mass sum per stored temperature]
so that blocks written by any process, in any order, add up to the same stats.

Inspect streams over the store's row blocks (one chunk per array per teacher at a time), so a store
larger than memory is measured in one pass. Dense rows get the full classification metrics
(`metrics.RunningMetrics`); top-k teachers and tokens the metrics their stored values determine
(accuracy / next-token accuracy, NLL, perplexity, ECE) from the same sums as the stats. Rows with
label -100 are left out of everything that needs a label.

Regression stores (v3, teachers stored as values): MSE, MAE and R^2 per output and averaged for each
teacher and the complete teachers fused by mean and by median (`inspect_regression`).

Complementary teachers (v3): per complete teacher, the fraction of labelled rows (tokens: also of
sequences, by their summed label log-probability) on which it is the best teacher, the one `--fusion
best` picks (the lowest on ties); and the ensemble under each fusion (fusion.py at its defaults:
uniform prior, tau 1, each row on its own): mean, posterior, best, entropy (where every complete
teacher stores entropies) and, for tokens, best per sequence (exact from per-sequence sums: one
teacher a sequence). posterior and best know the label: what they show is the most a student can
gain from targets that select, not a model's held-out score.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mtkd.pipeline import storage
from mtkd.pipeline.config import Fusion
from mtkd.pipeline.data import IGNORE_LABEL
from mtkd.pipeline.fusion import fused_values, fusion_weights
from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.layouts import FEATURES, Dense, Layout, RowSummary, SampledTopK, TopK, format_temperatures
from mtkd.pipeline.metrics import ECE_BINS, RunningMetrics, fuse_log_probs, regression_metrics
from mtkd.pipeline.store import LogitStore

_N, _CORRECT, _NLL, _ROWS = range(4)
_BINS = 4  # the ECE bins start here: count, confidence, correct (ECE_BINS each)
_TAIL = _BINS + 3 * ECE_BINS


class StatsSums:
    """The stats of a teacher as additive float64 sums over rows (layout described in the module doc)."""

    @staticmethod
    def width(layout: Layout) -> int:
        return _TAIL + (len(layout.temperatures) if isinstance(layout, TopK) else 0)

    @staticmethod
    def of_block(summary: RowSummary, labels: torch.Tensor, layout: Layout) -> np.ndarray:
        """The sums of one block's rows (host tensors)."""
        sums = np.zeros(StatsSums.width(layout))
        sums[_ROWS] = len(labels)
        if summary.tail is not None:
            sums[_TAIL:] = summary.tail.double().sum(dim=0).numpy()
        keep = labels != IGNORE_LABEL
        if bool(keep.any()):
            correct = (summary.top1[keep] == labels[keep]).double()
            confidence = summary.top1_logprob[keep].double().exp()
            index = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
            sums[_N] = int(keep.sum())
            sums[_CORRECT] = float(correct.sum())
            sums[_NLL] = -float(summary.label_logprob[keep].double().sum())
            sums[_BINS : _BINS + ECE_BINS] = torch.bincount(index, minlength=ECE_BINS).double().numpy()
            sums[_BINS + ECE_BINS : _BINS + 2 * ECE_BINS] = torch.bincount(index, weights=confidence, minlength=ECE_BINS).numpy()
            sums[_BINS + 2 * ECE_BINS : _TAIL] = torch.bincount(index, weights=correct, minlength=ECE_BINS).numpy()
        return sums

    @staticmethod
    def total(block_sums: np.ndarray) -> np.ndarray:
        """(num_blocks, S) recorded sums -> (S,), added in block order (the same bits whoever adds)."""
        if not np.isfinite(block_sums).all():
            raise ValueError("a block's stats record is missing or not finite")
        total = np.zeros(block_sums.shape[1])
        for row in block_sums:
            total += row
        return total

    @staticmethod
    def stats(sums: np.ndarray, layout: Layout, kind: str) -> dict[str, Any]:
        """Sums -> the stats SPEC's inspect reports: n, accuracy, nll, ece (+ perplexity for tokens, tail mass for top-k)."""
        n = int(sums[_N])
        nan = float("nan")
        out: dict[str, Any] = {
            "n": n,
            "accuracy": sums[_CORRECT] / n if n else nan,
            "nll": sums[_NLL] / n if n else nan,
            "ece": float(np.abs(sums[_BINS + ECE_BINS : _BINS + 2 * ECE_BINS] - sums[_BINS + 2 * ECE_BINS : _TAIL]).sum() / n) if n else nan,
        }
        if kind == "tokens":
            out["perplexity"] = math.exp(out["nll"]) if n else nan
        if isinstance(layout, TopK):
            rows = sums[_ROWS]
            out["tail_mass"] = {format_temperatures([t]): (sums[_TAIL + i] / rows if rows else nan) for i, t in enumerate(layout.temperatures)}
        return out


def teacher_stats(store: LogitStore, name: str) -> dict[str, Any]:
    """A complete teacher's stats recomputed from its stored arrays (what stage one records)."""
    store.require_complete([name])
    layout = store.layout(name)
    labels = torch.from_numpy(store.labels())
    total = np.zeros(StatsSums.width(layout))
    for block in range(store.num_blocks):
        start, stop = store.block_range(block)
        arrays = _read_block(store, name, layout, block)
        total += StatsSums.of_block(layout.summarize(arrays, labels[start:stop]), labels[start:stop], layout)
    return StatsSums.stats(total, layout, store.kind)


def inspect_store(store: LogitStore, progress: Callable[[int, int], None] | None = None,
                  ensemble_of: list[str] | None = None) -> dict[str, Any]:
    """Kind, teachers (layout, dtype, vocabulary, k, temperatures), completeness, bytes per row;
    per-teacher and fused-ensemble metrics; pairwise top-1 agreement; mean tail mass (top-k);
    "selection": who is best where and the ensemble under each fusion (complete teachers; see the module doc).

    `progress(blocks_done, blocks)` is called after each row block. A teacher's metrics cover the
    rows it has written; the ensemble (mean of the teachers' probabilities) covers the complete
    teachers (`ensemble_of`: those of them); agreement between two teachers covers the rows both have written.
    """
    if store.regression:
        return inspect_regression(store, progress, ensemble_of)
    names = store.teachers
    infos = {name: store.teacher(name) for name in names}
    layouts = {name: infos[name].layout for name in names}
    done = {name: store.done_blocks(name) for name in names}
    complete = [name for name in names if len(done[name]) == store.num_blocks]
    fused = complete if ensemble_of is None else _subset(store, ensemble_of, complete)
    labels = torch.from_numpy(store.labels())
    # Dense rows keep the full classification metrics; everything else what its stored values give.
    full = store.kind == "rows" and all(isinstance(layout, Dense) for layout in layouts.values())

    per_teacher = {name: RunningMetrics(store.num_classes) if full else np.zeros(StatsSums.width(layouts[name])) for name in names}
    ensemble = RunningMetrics(store.num_classes) if full else _EnsembleSums()
    selection = _SelectionSums(fused, layouts, store.offsets() if store.kind == "tokens" else None) if fused else None
    pairs = list(itertools.combinations(names, 2))
    agree = {pair: [0, 0] for pair in pairs}  # (rows agreeing, rows compared)
    for block in range(store.num_blocks):
        present = [name for name in names if block in done[name]]
        if not present:
            continue
        start, stop = store.block_range(block)
        y = labels[start:stop]
        arrays, preds, summaries = {}, {}, {}
        for name in present:
            arrays[name] = _read_block(store, name, layouts[name], block)
            summary = summaries[name] = layouts[name].summarize(arrays[name], y)
            preds[name] = summary.top1
            if full:
                per_teacher[name].update(torch.log_softmax(arrays[name]["logits"].double(), dim=1), y)
            else:
                per_teacher[name] += StatsSums.of_block(summary, y, layouts[name])
        for a, b in pairs:
            if a in preds and b in preds:
                agree[(a, b)][0] += int((preds[a] == preds[b]).sum())
                agree[(a, b)][1] += stop - start
        if fused and full:
            ensemble.update(fuse_log_probs(torch.stack([arrays[name]["logits"] for name in fused])), y)
        elif fused:
            ensemble.update([arrays[name] for name in fused], [layouts[name] for name in fused], y)
        if selection is not None:
            selection.update(start, arrays, summaries, y)
        if progress is not None:
            progress(block + 1, store.num_blocks)

    def metrics(name: str) -> dict[str, Any]:
        return per_teacher[name].result() if full else StatsSums.stats(per_teacher[name], layouts[name], store.kind)

    return {
        "store": str(store.path),
        "format": store.format,
        "kind": store.kind,
        "num_rows": store.num_rows,
        "num_sequences": len(store.offsets()) - 1 if store.kind == "tokens" else None,
        "num_classes": store.num_classes,
        "chunk_rows": store.chunk_rows,
        "num_blocks": store.num_blocks,
        "labelled_rows": int((labels != IGNORE_LABEL).sum()),
        "dataset": {"spec": store.dataset_spec, "fingerprint": store.fingerprint},
        "teachers": [
            {
                "name": name,
                **layouts[name].attrs(),
                "weights_sha256": infos[name].weights_sha256,
                "complete": name in complete,
                "rows_complete": sum(stop - start for start, stop in map(store.block_range, done[name])),
                "blocks_complete": len(done[name]),
                "bytes_per_row": _bytes_per_row(store, name, done[name]),
                **({"feature_bytes_per_row": _feature_bytes_per_row(store, name, done[name])} if store.layout(name).features else {}),
                "metrics": metrics(name),
            }
            for name in names
        ],
        "ensemble": {"teachers": fused, "metrics": ensemble.result(store.kind) if not full else ensemble.result()} if fused else None,
        "selection": None if selection is None else selection.result(store.kind),
        "agreement": [
            {"a": a, "b": b, "agreement": agree[(a, b)][0] / agree[(a, b)][1] if agree[(a, b)][1] else float("nan"), "rows": agree[(a, b)][1]}
            for a, b in pairs
        ],
    }


REGRESSION_INSPECT_FUSIONS = (Fusion.MEAN, Fusion.MEDIAN)  # weighted needs --teacher-weights: a train option


def inspect_regression(store: LogitStore, progress: Callable[[int, int], None] | None = None,
                       ensemble_of: list[str] | None = None) -> dict[str, Any]:
    """`inspect_store` of a regression store (v3, teachers stored as layout "values"): per teacher
    and for the ensemble of the complete ones under each regression fusion (mean, median), MSE, MAE
    and R^2 per output and averaged (metrics.regression_metrics) against the stored targets, over
    the rows with a known target; a teacher's metrics cover the blocks it has written. The values
    are read whole ((N, D) float32 a teacher: regression outputs are narrow)."""
    names = store.teachers
    infos = {name: store.teacher(name) for name in names}
    done = {name: store.done_blocks(name) for name in names}
    complete = [name for name in names if len(done[name]) == store.num_blocks]
    fused = complete if ensemble_of is None else _subset(store, ensemble_of, complete)
    targets = torch.from_numpy(store.targets())
    values: dict[str, torch.Tensor] = {}
    per_teacher = {}
    for i, name in enumerate(names):
        blocks = sorted(done[name])
        rows = [torch.arange(*store.block_range(b)) for b in blocks]
        rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.int64)
        values[name] = store.read_values(name, 0, store.num_rows)  # unwritten blocks read as NaN, and are left out
        per_teacher[name] = regression_metrics(values[name][rows], targets[rows])
        if progress is not None:
            progress(i + 1, len(names))
    ensemble = None
    if fused:
        stacked = torch.stack([values[name] for name in fused])  # (K, N, D)
        ensemble = {"teachers": fused, "metrics": {f.value: regression_metrics(fused_values(f, stacked), targets)
                                                   for f in REGRESSION_INSPECT_FUSIONS}}
    return {
        "store": str(store.path),
        "format": store.format,
        "kind": store.kind,
        "task": "regression",
        "num_rows": store.num_rows,
        "num_sequences": None,
        "num_classes": store.num_classes,
        "num_outputs": store.num_classes,
        "chunk_rows": store.chunk_rows,
        "num_blocks": store.num_blocks,
        "labelled_rows": int((~torch.isnan(targets)).any(dim=1).sum()),
        "dataset": {"spec": store.dataset_spec, "fingerprint": store.fingerprint},
        "teachers": [
            {
                "name": name,
                **infos[name].layout.attrs(),
                "weights_sha256": infos[name].weights_sha256,
                "complete": name in complete,
                "rows_complete": sum(stop - start for start, stop in map(store.block_range, done[name])),
                "blocks_complete": len(done[name]),
                "bytes_per_row": _bytes_per_row(store, name, done[name]),
                "metrics": per_teacher[name],
            }
            for name in names
        ],
        "ensemble": ensemble,
        "selection": None,
        "agreement": [],
    }


def _subset(store: LogitStore, chosen: list[str], complete: list[str]) -> list[str]:
    """`inspect --teachers`: the named teachers, each of the store and complete."""
    for name in chosen:
        if name not in store.teachers:
            raise BadInputError(f"--teachers: store {str(store.path)!r} has no teacher {name!r} (it has {', '.join(store.teachers)})")
        if name not in complete:
            raise BadInputError(f"--teachers: teacher {name!r} of store {str(store.path)!r} is incomplete; the ensemble needs every row")
    return list(dict.fromkeys(chosen))


def _read_block(store: LogitStore, name: str, layout: Layout, block: int) -> dict[str, torch.Tensor]:
    """One recorded block of a teacher as tensors (the store refuses NaN/inf in it: damage, never a metric)."""
    only = tuple(a.name for a in layout.arrays() if not a.name.startswith(FEATURES + "/"))  # the stats never need the features
    return layout.tensors(store.read(name, *store.block_range(block), only=only))


class _EnsembleSums:
    """The fused ensemble (the mean of the teachers' probabilities) where the store holds only what
    the teachers' stored values determine: its NLL exactly (the mean of the label probabilities),
    its top-1 from the mean of the listed probabilities (a class a teacher does not list counts 0)."""

    def __init__(self) -> None:
        self.n, self.correct, self.nll = 0, 0.0, 0.0

    def update(self, arrays: list[dict[str, torch.Tensor]], layouts: list[Layout], labels: torch.Tensor) -> None:
        ids, probs, label_lp = [], [], []
        for a, layout in zip(arrays, layouts):
            summary = layout.summarize(a, labels)
            label_lp.append(summary.label_logprob.double())
            if isinstance(layout, TopK):
                ids.append(a["topk_ids"].long())
                probs.append(a["topk_logprobs"].double().exp())
                if isinstance(layout, SampledTopK):  # the drawn classes, each once, with their exact p
                    drawn = a["tail_ids"].long()
                    repeat = torch.zeros_like(drawn, dtype=torch.bool)
                    repeat[:, 1:] = drawn[:, 1:] == drawn[:, :-1]
                    ids.append(drawn)
                    probs.append(torch.where(repeat, 0.0, a["tail_logprobs"].double().exp()))
            else:
                lp = torch.log_softmax(a["logits"].double(), dim=1)
                ids.append(torch.arange(lp.shape[1]).expand_as(lp))
                probs.append(lp.exp())
        keep = labels != IGNORE_LABEL
        if not bool(keep.any()):
            return
        k = len(arrays)
        mixed_label = torch.logsumexp(torch.stack(label_lp), dim=0) - math.log(k)  # log mean p(label)
        top1 = _top_of_mixture(torch.cat(ids, dim=1), torch.cat(probs, dim=1) / k)
        self.n += int(keep.sum())
        self.nll -= float(mixed_label[keep].sum())
        self.correct += float((top1[keep] == labels[keep]).sum())

    def result(self, kind: str) -> dict[str, Any]:
        nan = float("nan")
        nll = self.nll / self.n if self.n else nan
        out = {"n": self.n, "accuracy": self.correct / self.n if self.n else nan, "nll": nll}
        if kind == "tokens":
            out["perplexity"] = math.exp(nll) if self.n else nan
        return out


class _SelectionSums:
    """Whether the complete teachers are complementary (see the module doc), summed block by block:
    per teacher the labelled rows it is best on; per fusion the ensemble's n, correct top-1 and NLL;
    for tokens, per sequence and teacher the summed label log-probability and correct top-1 count."""

    def __init__(self, names: list[str], layouts: dict[str, Layout], offsets: np.ndarray | None):
        self.names, self.layouts, self.offsets = names, [layouts[n] for n in names], offsets
        k = len(names)
        self.fusions = [Fusion.MEAN, Fusion.POSTERIOR, Fusion.BEST] + ([Fusion.ENTROPY] if all(lay.entropy for lay in self.layouts) else [])
        self.sums = {f.value: [0, 0.0, 0.0] for f in self.fusions}  # n, correct, nll
        self.best_rows = np.zeros(k, dtype=np.int64)
        if offsets is not None:
            s = len(offsets) - 1
            self.seq_score, self.seq_correct = np.zeros((k, s)), np.zeros((k, s))
            self.seq_labelled = np.zeros(s, dtype=np.int64)

    def update(self, start: int, arrays: dict[str, dict[str, torch.Tensor]], summaries: dict[str, RowSummary], labels: torch.Tensor) -> None:
        keep = labels != IGNORE_LABEL
        if not bool(keep.any()):
            return
        k, y = len(self.names), labels[keep]
        score = torch.stack([summaries[n].label_logprob.double()[keep] for n in self.names])  # (K, n)
        correct = torch.stack([(summaries[n].top1[keep] == y) for n in self.names]).double()  # (K, n)
        self.best_rows += np.bincount(score.argmax(dim=0).numpy(), minlength=k)
        ids, probs = [], []  # each teacher's listed classes and probabilities, for the mixture's top-1
        for name, layout in zip(self.names, self.layouts):
            a = arrays[name]
            if isinstance(layout, TopK):
                ids.append(a["topk_ids"].long()[keep])
                probs.append(a["topk_logprobs"].double()[keep].exp())
                if "tail_ids" in a:  # sampled classes are known exactly too (each once: draws repeat, ascending)
                    tail_ids, tail_p = a["tail_ids"].long()[keep], a["tail_logprobs"].double()[keep].exp()
                    tail_p[:, 1:] = torch.where(tail_ids[:, 1:] == tail_ids[:, :-1], 0.0, tail_p[:, 1:])
                    ids[-1], probs[-1] = torch.cat([ids[-1], tail_ids], dim=1), torch.cat([probs[-1], tail_p], dim=1)
            else:
                p = torch.softmax(a["logits"].double()[keep], dim=1)
                ids.append(torch.arange(p.shape[1]).expand_as(p))
                probs.append(p)
        entropies = torch.stack([arrays[n]["entropy"][keep] for n in self.names]) if Fusion.ENTROPY in self.fusions else None
        for fusion in self.fusions:
            if fusion is Fusion.MEAN:
                w = torch.full((len(y), k), 1.0 / k, dtype=torch.float64)
            else:
                w = fusion_weights(fusion, scores=score.float(), entropies=entropies, labelled=torch.ones_like(y, dtype=torch.bool)).double()
            label_p = (w * score.T.exp()).sum(dim=1)  # (n,) the ensemble's probability of the label
            top1 = _top_of_mixture(torch.cat(ids, dim=1), torch.cat([p * w[:, j : j + 1] for j, p in enumerate(probs)], dim=1))
            sums = self.sums[fusion.value]
            sums[0] += len(y)
            sums[1] += float((top1 == y).sum())
            sums[2] -= float(label_p.log().sum())
        if self.offsets is not None:
            rows = start + np.flatnonzero(keep.numpy())
            seq = np.searchsorted(self.offsets, rows, side="right") - 1
            for j in range(k):
                np.add.at(self.seq_score[j], seq, score[j].numpy())
                np.add.at(self.seq_correct[j], seq, correct[j].numpy())
            np.add.at(self.seq_labelled, seq, 1)

    def result(self, kind: str) -> dict[str, Any]:
        nan = float("nan")

        def metrics(n: int, correct: float, nll: float) -> dict[str, Any]:
            out = {"n": n, "accuracy": correct / n if n else nan, "nll": nll / n if n else nan}
            if kind == "tokens":
                out["perplexity"] = math.exp(nll / n) if n else nan
            return out

        rows = int(self.best_rows.sum())
        out: dict[str, Any] = {
            "teachers": self.names,
            "rows": rows,
            "best_rows": {n: (int(c) / rows if rows else nan) for n, c in zip(self.names, self.best_rows)},
            "fusions": {name: metrics(*sums) for name, sums in self.sums.items()},
        }
        if self.offsets is not None:
            has = self.seq_labelled > 0
            best = self.seq_score[:, has].argmax(axis=0)  # the teacher of each sequence (lowest on ties)
            count = np.bincount(best, minlength=len(self.names))
            seqs = int(has.sum())
            out["sequences"] = seqs
            out["best_sequences"] = {n: (int(c) / seqs if seqs else nan) for n, c in zip(self.names, count)}
            picked = np.arange(len(best))
            out["fusions"]["best_sequence"] = metrics(
                int(self.seq_labelled.sum()), float(self.seq_correct[:, has][best, picked].sum()),
                -float(self.seq_score[:, has][best, picked].sum()),
            )
        return out


def _top_of_mixture(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(n, M) class ids (repeats across teachers) and their weighted probabilities -> (n,) the class
    with the largest summed probability. Sorted by id, each run of equal ids is one class; its sum is
    the cumulative sum at the run's end minus that at the previous run's end."""
    ids_sorted, order = ids.sort(dim=1)
    cumulative = probs.gather(1, order).cumsum(dim=1)
    ends = torch.ones_like(ids_sorted, dtype=torch.bool)
    ends[:, :-1] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
    before = torch.zeros_like(cumulative)
    before[:, 1:] = torch.where(ends[:, :-1], cumulative[:, :-1], torch.zeros_like(cumulative[:, :-1]))
    before = before.cummax(dim=1).values  # probabilities are >= 0: the cumulative sum never decreases
    sums = torch.where(ends, cumulative - before, torch.full_like(cumulative, -1.0))
    return ids_sorted.gather(1, sums.argmax(dim=1, keepdim=True)).squeeze(1)


def _bytes_per_row(store: LogitStore, name: str, done: set[int]) -> float | None:
    """Bytes on disk of the teacher's recorded chunks (its layout's arrays, checksums included) per row."""
    rows = sum(stop - start for start, stop in map(store.block_range, done))
    if not rows:
        return None
    return sum(_array_bytes(store, name, a.name) for a in store.layout(name).arrays()) / rows


def _feature_bytes_per_row(store: LogitStore, name: str, done: set[int]) -> dict[str, dict[str, float | None]]:
    """Per stored feature: bytes on disk per row ("stored") and uncompressed ("raw") - what dominates a store with features."""
    rows = sum(stop - start for start, stop in map(store.block_range, done))
    layout = store.layout(name)
    raw = layout.feature_row_bytes()
    return {module: {"stored": _array_bytes(store, name, f"{FEATURES}/{module}") / rows if rows else None, "raw": raw[module]}
            for module, _ in layout.features}


def _array_bytes(store: LogitStore, name: str, key: str) -> int:
    return storage.total_bytes(store.path / "teachers" / name / key / "c")
