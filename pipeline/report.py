"""What `mtkd inspect` shows and what stage one records as a teacher's stats, computed from a store.

Everything streams over the store's row blocks (one chunk per teacher at a time), so a store larger
than memory is measured in one pass. Metrics are `metrics.RunningMetrics`, the same as
`classification_metrics`, from running sums; rows with label -100 are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from mtkd.pipeline.metrics import RunningMetrics, fuse_log_probs
from mtkd.pipeline.specs import IGNORE_LABEL
from mtkd.pipeline.store import LogitStore


def teacher_stats(store: LogitStore, name: str) -> dict[str, float | int]:
    """A complete teacher's metrics against the store's labels (what stage one records as `stats`)."""
    store.require_complete([name])
    labels = torch.from_numpy(store.labels())
    running = RunningMetrics(store.num_classes)
    for block in range(store.num_blocks):
        start, stop = store.block_range(block)
        if (labels[start:stop] == IGNORE_LABEL).all():
            continue
        log_probs = torch.log_softmax(store.read_logits(name, start, stop).double(), dim=1)
        running.update(log_probs, labels[start:stop])
    return running.result()


def inspect_store(store: LogitStore, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Teachers, completeness, per-teacher and fused-ensemble metrics, pairwise agreement.

    `progress(blocks_done, blocks)` is called after each row block. A teacher's metrics cover the rows it has written; the ensemble (mean of probabilities) covers the
    complete teachers; agreement between two teachers covers the rows both have written.
    """
    names = store.teachers
    infos = {name: store.teacher(name) for name in names}
    done = {name: store.done_blocks(name) for name in names}
    complete = [name for name in names if len(done[name]) == store.num_blocks]
    labels = torch.from_numpy(store.labels())

    per_teacher = {name: RunningMetrics(store.num_classes) for name in names}
    ensemble = RunningMetrics(store.num_classes)
    pairs = list(itertools.combinations(names, 2))
    agree = {pair: [0, 0] for pair in pairs}  # (rows agreeing, rows compared)
    for block in range(store.num_blocks):
        present = [name for name in names if block in done[name]]
        if not present:
            continue
        start, stop = store.block_range(block)
        y = labels[start:stop]
        log_probs, preds = {}, {}
        for name in present:
            logits = store.read_logits(name, start, stop)
            log_probs[name] = torch.log_softmax(logits.double(), dim=1)  # (B, V)
            preds[name] = log_probs[name].argmax(1)
            per_teacher[name].update(log_probs[name], y)
        for a, b in pairs:
            if a in preds and b in preds:
                agree[(a, b)][0] += int((preds[a] == preds[b]).sum())
                agree[(a, b)][1] += stop - start
        if complete:
            stacked = torch.stack([store.read_logits(name, start, stop) for name in complete])  # (K, B, V)
            ensemble.update(fuse_log_probs(stacked), y)
        if progress is not None:
            progress(block + 1, store.num_blocks)

    return {
        "store": str(store.path),
        "num_rows": store.num_rows,
        "num_classes": store.num_classes,
        "chunk_rows": store.chunk_rows,
        "num_blocks": store.num_blocks,
        "labelled_rows": int((labels != IGNORE_LABEL).sum()),
        "dataset": {"spec": store.dataset_spec, "fingerprint": store.fingerprint},
        "teachers": [
            {
                "name": name,
                "dtype": infos[name].dtype,
                "checkpoint_sha256": infos[name].checkpoint_sha256,
                "complete": name in complete,
                "rows_complete": sum(stop - start for start, stop in map(store.block_range, done[name])),
                "blocks_complete": len(done[name]),
                "metrics": per_teacher[name].result(),
            }
            for name in names
        ],
        "ensemble": {"teachers": complete, "metrics": ensemble.result()} if complete else None,
        "agreement": [
            {"a": a, "b": b, "agreement": agree[(a, b)][0] / agree[(a, b)][1] if agree[(a, b)][1] else float("nan"), "rows": agree[(a, b)][1]}
            for a, b in pairs
        ],
    }
