"""Streaming shuffles rows inside each window, not only the order of the read units: a loader that
handed each unit's rows over in store order would train on runs of neighbouring rows."""

from __future__ import annotations

from contextlib import closing

import numpy as np

from mtkd.pipeline.loader import BatchLoader
from mtkd.pipeline.store import open_store

from .conftest import KD_TEACHERS, write_store


def test_streamed_batches_mix_the_units_of_their_window(kd_world, tmp_path):
    # Chunks of 8 rows, one chunk per read unit, windows of 8 units (64 rows): 6 windows per epoch.
    x, y, cr = kd_world.x["labelled"], kd_world.y["labelled"], 8
    path = write_store(tmp_path / "s.zarr", x, y, kd_world.logits["labelled"], chunk_rows=cr)
    loader = BatchLoader(x, y, batch_size=16, seed=3, store=open_store(path), teachers=list(KD_TEACHERS),
                         stream=True, window_bytes=1, read_bytes=1)
    assert (loader.read_rows, loader.window_rows) == (cr, 8 * cr)
    with closing(loader.epoch(0)) as batches:
        rows = [b.rows.numpy() for b in batches]
    order = np.concatenate(rows)
    # Neighbours in the epoch that are neighbours in the store: about 1 in 64 when the window is
    # shuffled, 7 in 8 when only the units are.
    assert np.mean(np.diff(order) == 1) < 0.1
    # Every batch of 16 rows draws on several units of its window (unshuffled: exactly two).
    assert min(len(np.unique(r // cr)) for r in rows) >= 4
