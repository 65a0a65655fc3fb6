"""How a block reaches the disk, tested directly: the order of the steps, their atomicity and their
durability, with a fault injected between the steps (a kill -9 almost never lands inside a tiny write).

A block is safe when (1) its chunk and its record are each written to a temporary file, flushed to
disk (fsync) and renamed into place, never written in place, and (2) the record is written only
after the chunk is in place. Each property is what one realistic bug would break: the tests below
fail on a removed fsync, an in-place write, and a record written before its data.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd.pipeline.data import make_row_data
from mtkd.pipeline.infer import write_logits_block
from mtkd.pipeline.layouts import Dense
from mtkd.pipeline.report import StatsSums
from mtkd.pipeline.store import create_store, open_store

ROWS, CLASSES, CHUNK_ROWS = 12, 3, 4

# File events of the code under test, recorded by one audit hook (hooks cannot be removed: the
# hook does nothing unless a test has put a list here).
_events: list[tuple] | None = None


def _audit(event: str, args: tuple) -> None:
    if _events is not None and event in ("open", "os.rename"):
        path, mode = args[0], args[1]
        if isinstance(path, (str, bytes, os.PathLike)):
            _events.append((event, os.fsdecode(path), os.fsdecode(mode) if isinstance(mode, (str, bytes)) else mode))


sys.addaudithook(_audit)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    data = make_row_data("durability", rng.standard_normal((ROWS, 4)), rng.integers(0, CLASSES, ROWS))
    store, _ = create_store(tmp_path / "s.zarr", data=data, num_classes=CLASSES, chunk_rows=CHUNK_ROWS)
    layout = Dense("float16", CLASSES)
    store.add_teacher("a", spec={"name": "a"}, weights_sha256=None, layout=layout, stats_width=StatsSums.width(layout))
    return store


def _write(store, block, logits):
    """One block through stage one's writer: its chunk, its stats sums, then its record."""
    start, stop = store.block_range(block)
    write_logits_block(store, "a", block, logits[: stop - start], torch.from_numpy(store.labels()[start:stop]))


@pytest.fixture
def trace(monkeypatch):
    """The file events of a write, fsyncs included (by the path of the synced descriptor)."""
    global _events
    events: list[tuple] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), None))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _events = events
    yield events
    _events = None


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(CHUNK_ROWS, CLASSES, generator=torch.Generator().manual_seed(seed)).half()


def _chunk(store, block: int) -> Path:
    return store.path / "teachers" / "a" / "logits" / "c" / str(block) / "0"


def _record(store, block: int) -> Path:
    return store.path / "teachers" / "a" / "done" / "c" / str(block)


def _durable_replacements(events: list[tuple], final: Path) -> list[str]:
    """Check that `final` was written only as: open(tmp, w) ... fsync(tmp) ... rename(tmp, final).

    Returns the temporary names used; fails if `final` itself was ever opened for writing or if a
    temporary file was renamed onto it without an fsync in between.
    """
    final = str(final)
    assert not [e for e in events if e[0] == "open" and e[1] == final and any(c in str(e[2]) for c in "wax+")], (
        f"{final} was opened for writing in place"
    )
    temps = []
    for i, (kind, src, dst) in enumerate(events):
        if kind == "os.rename" and os.fsdecode(dst) == final:
            opened = [j for j, e in enumerate(events[:i]) if e[0] == "open" and e[1] == src]
            assert opened, f"{src} renamed onto {final} but never opened here"
            synced = [e for e in events[opened[-1] : i] if e[0] == "fsync" and e[1] == src]
            assert synced, f"{src} renamed onto {final} without an fsync: a crash could publish an empty file"
            temps.append(src)
    assert temps, f"{final} was never renamed into place"
    return temps


def _rename_index(events: list[tuple], final: Path) -> int:
    return next(i for i, e in enumerate(events) if e[0] == "os.rename" and os.fsdecode(e[2]) == str(final))


def test_chunk_and_record_are_each_synced_to_a_temporary_file_and_renamed_into_place(store, trace):
    _write(store, 1, _logits())  # (os.replace raises the audit event "os.rename")
    _durable_replacements(trace, _chunk(store, 1))
    _durable_replacements(trace, _record(store, 1))


def test_the_record_is_written_only_after_the_chunk_is_in_place(store, trace):
    _write(store, 2, _logits())
    chunk_in_place = _rename_index(trace, _chunk(store, 2))
    record_opened = [i for i, e in enumerate(trace) if e[0] == "open" and os.path.dirname(e[1]) == str(_record(store, 2).parent)]
    assert record_opened and min(record_opened) > chunk_in_place, "the record was started before the chunk was in place"


class _Fault(OSError):
    """The injected failure (an I/O error at the chosen step)."""


def _fail_rename_onto(monkeypatch, target: Path, error: OSError):
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.fsdecode(dst) == str(target):
            raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", replace)


def _leftovers(store) -> list[str]:
    return sorted(str(p.relative_to(store.path)) for p in store.path.rglob("*.partial"))


def test_a_fault_between_chunk_and_record_leaves_the_block_unrecorded_and_its_chunk_whole(store, monkeypatch):
    _fail_rename_onto(monkeypatch, _record(store, 0), _Fault(errno.EIO, "injected"))
    with pytest.raises(OSError, match="injected"):
        _write(store, 0, _logits(7))
    monkeypatch.undo()
    reopened = open_store(store.path)
    assert reopened.missing_blocks("a") == [0, 1, 2]  # not recorded: `mtkd infer` computes it again
    assert torch.equal(reopened.read_logits("a", 0, CHUNK_ROWS), _logits(7))  # the chunk itself is whole
    assert _leftovers(store) == []


def test_a_fault_before_the_chunk_is_in_place_leaves_neither_chunk_nor_record(store, monkeypatch):
    _write(store, 1, _logits(1))
    before = _chunk(store, 1).read_bytes()
    _record(store, 1).unlink()  # as if block 1 were being rewritten after a repair
    _fail_rename_onto(monkeypatch, _chunk(store, 1), _Fault(errno.EIO, "injected"))
    with pytest.raises(OSError, match="injected"):
        _write(store, 1, _logits(2))
    monkeypatch.undo()
    assert _chunk(store, 1).read_bytes() == before  # the old file, not half of the new one
    assert not _record(store, 1).exists()  # and no record of data that never landed
    assert _leftovers(store) == []


def test_a_full_disk_while_syncing_leaves_nothing_half_written(store, monkeypatch):
    real = os.fsync

    def full(fd):
        if "/logits/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        _write(store, 2, _logits())
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not _chunk(store, 2).exists() and not _record(store, 2).exists()
    assert _leftovers(store) == []
