"""verify_store: each kind of damage found, repaired, and recomputed by `mtkd infer` to the very bytes of
a store that was never damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline.errors import CorruptStoreError, StoreMismatchError
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.store import open_store
from mtkd.pipeline.verify import (
    ATTRIBUTE,
    CHECKSUM,
    INVALID,
    NO_CHUNK,
    NO_RECORD,
    NON_FINITE,
    verify_store,
)
from tests.pipeline.conftest import snapshot

ROWS, CHUNK_ROWS = 40, 8  # 5 blocks


@pytest.fixture
def pristine(tmp_path, make_data, make_teachers):
    """(store path, a function that reruns the same `mtkd infer` on it, an untouched copy's snapshot)."""
    data, toml = make_data(ROWS), make_teachers([{"name": "a"}, {"name": "b", "seed": 1}])
    path = tmp_path / "s.zarr"

    def infer(dtype_of=None):
        for name, dtype in (("a", "float16"), ("b", "bfloat16")):
            only = make_teachers([{"name": name, "seed": 0 if name == "a" else 1}], filename=f"{name}.toml")
            run_infer(only, str(data), path, chunk_rows=CHUNK_ROWS, batch_size=5, device="cpu", dtype=dtype)

    infer()
    del toml
    return path, infer, snapshot(path)


def _chunk(path: Path, teacher: str, block: int) -> Path:
    return path / "teachers" / teacher / "logits" / "c" / str(block) / "0"


def _record(path: Path, teacher: str, block: int) -> Path:
    return path / "teachers" / teacher / "done" / "c" / str(block)


def _delete_chunk(path):
    _chunk(path, "a", 2).unlink()


def _truncate_chunk(path):
    chunk = _chunk(path, "b", 3)
    chunk.write_bytes(chunk.read_bytes()[:10])


def _nan_through_zarr(path):
    # A NaN that every codec accepts (written through zarr itself): what a buggy writer would leave.
    array = zarr.open_array(path / "teachers" / "a" / "logits", mode="r+")
    array[13, 1] = np.nan


def _delete_record(path):
    _record(path, "b", 0).unlink()


def _edit_logical_dtype(path):
    # float16 bits declared bfloat16: read as bfloat16, they are garbage of the same size.
    meta_path = path / "teachers" / "a" / "logits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["logical_dtype"] = "bfloat16"
    meta_path.write_text(json.dumps(meta, indent=2))


def _flip_a_byte(path):
    chunk = _chunk(path, "b", 4)
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x01  # a bit of a value: still a number, so only the checksum can tell
    chunk.write_bytes(bytes(raw))


DAMAGES = {
    "deleted chunk": (_delete_chunk, NO_CHUNK, "a", 2),
    "flipped byte": (_flip_a_byte, CHECKSUM, "b", 4),
    "truncated chunk": (_truncate_chunk, CHECKSUM, "b", 3),  # format 2: every chunk ends in its crc32c
    "NaN values": (_nan_through_zarr, NON_FINITE, "a", 1),
    "deleted record": (_delete_record, NO_RECORD, "b", 0),
    "edited logical_dtype": (_edit_logical_dtype, ATTRIBUTE, "a", None),
    # v3: the entropies are one of the teacher's arrays, checked like the logits
    "NaN entropy": (lambda p: zarr.open_array(p / "teachers" / "b" / "entropy", mode="r+").__setitem__(20, np.nan), NON_FINITE, "b", 2),
    "deleted entropy chunk": (lambda p: (p / "teachers" / "a" / "entropy" / "c" / "1").unlink(), NO_CHUNK, "a", 1),
}


def test_an_undamaged_store_is_clean(pristine):
    path, _, before = pristine
    calls = []
    report = verify_store(path, progress=lambda done, total: calls.append((done, total)))
    assert report.clean and report.findings == []
    assert [t["blocks_recorded"] for t in report.teachers] == [5, 5]
    assert calls[-1] == (10, 10)  # every (teacher, block) read once
    assert verify_store(path, repair=True).repaired == []
    assert snapshot(path) == before  # verify (even --repair) writes nothing to a clean store


@pytest.mark.parametrize("damage", DAMAGES)
def test_each_damage_is_found_repaired_and_recomputed_bit_identically(pristine, damage):
    path, infer, before = pristine
    make_damage, kind, teacher, block = DAMAGES[damage]
    make_damage(path)

    found = verify_store(path)
    assert not found.clean
    assert [(f.kind, f.teacher, f.block) for f in found.damage] == [(kind, teacher, block)]
    message = found.damage[0].message
    assert str(path) in message and repr(teacher) in message and "\n" not in message
    if block is not None:
        assert f"block {block}" in message

    repaired = verify_store(path, repair=True)
    assert not repaired.clean and repaired.repaired and not repaired.unrepaired
    after = verify_store(path)
    assert after.clean, after.findings
    if block is not None:  # the damaged block is now missing, and only it
        assert open_store(path).missing_blocks(teacher) == [block]
        assert not open_store(path).teacher(teacher).complete

    infer()  # the same `mtkd infer` as before
    assert verify_store(path).clean
    assert snapshot(path) == before


@pytest.fixture
def sparse_pristine(tmp_path, make_data, make_teachers):
    """A finished store of one top-k teacher (k=2 of 3 classes, temperatures 1 and 2)."""
    data, toml = make_data(ROWS), make_teachers([{"name": "k", "seed": 2}])
    path = tmp_path / "sparse.zarr"

    def infer():
        run_infer(toml, str(data), path, chunk_rows=CHUNK_ROWS, batch_size=5, device="cpu", top_k=2, temperatures="1,2")

    infer()
    return path, infer, snapshot(path)


def _array(path, name):
    return zarr.open_array(path / "teachers" / "k" / name, mode="r+")


def _flip_sparse(path):
    chunk = path / "teachers" / "k" / "topk_logprobs" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))


def _labelled_nan(path):
    labels = open_store(path).labels()
    row = int(np.flatnonzero(labels[16:24] != -100)[0]) + 16  # a labelled row of block 2
    _array(path, "label_logprob")[row] = np.nan


SPARSE_DAMAGES = {
    "flipped byte in topk_logprobs": (_flip_sparse, CHECKSUM, 1),
    "NaN in lse": (lambda p: _array(p, "lse").__setitem__((35, 1), np.nan), NON_FINITE, 4),
    "NaN label log-probability of a labelled row": (_labelled_nan, NON_FINITE, 2),
    "an id outside the vocabulary": (lambda p: _array(p, "topk_ids").__setitem__((3, 0), 7), INVALID, 0),
    "the -1 fill in a recorded block": (lambda p: _array(p, "topk_ids").__setitem__((9, 1), -1), INVALID, 1),
    "deleted block_stats chunk": (lambda p: (p / "teachers" / "k" / "block_stats" / "c" / "3" / "0").unlink(), NO_CHUNK, 3),
    "NaN in entropy": (lambda p: _array(p, "entropy").__setitem__(30, np.nan), NON_FINITE, 3),
}


@pytest.mark.parametrize("damage", SPARSE_DAMAGES)
def test_top_k_damage_is_found_repaired_and_recomputed_bit_identically(sparse_pristine, damage):
    path, infer, before = sparse_pristine
    assert verify_store(path).clean
    make_damage, kind, block = SPARSE_DAMAGES[damage]
    make_damage(path)
    found = verify_store(path)
    assert [(f.kind, f.teacher, f.block) for f in found.damage] == [(kind, "k", block)]
    verify_store(path, repair=True)
    assert verify_store(path).clean and open_store(path).missing_blocks("k") == [block]
    infer()
    assert snapshot(path) == before


def test_unlabelled_rows_may_hold_nan_label_log_probabilities(sparse_pristine):
    path, _, _ = sparse_pristine
    labels = open_store(path).labels()
    assert (labels == -100).any()  # the fixture's data leaves every 7th row unlabelled
    assert np.isnan(np.asarray(_array(path, "label_logprob")[...])[labels == -100]).all()
    assert verify_store(path).clean


def test_chunks_without_records_of_an_unfinished_teacher_are_noted_not_damage(pristine):
    path, _, _ = pristine
    _record(path, "a", 4).unlink()
    zarr.open_group(path / "teachers" / "a", mode="r+").attrs["complete"] = False  # as a killed writer leaves it
    report = verify_store(path)
    assert report.clean
    assert [(f.kind, f.block, f.damage) for f in report.findings] == [(NO_RECORD, 4, False)]


def test_a_store_count_that_contradicts_the_arrays_is_restored_from_them(pristine):
    path, _, before = pristine
    group = zarr.open_group(path, mode="r+")
    group.attrs["mtkd"] = {**group.attrs["mtkd"], "num_rows": ROWS + 8}
    report = verify_store(path)
    assert [f.kind for f in report.damage] == [ATTRIBUTE] and "num_rows" in report.damage[0].message
    verify_store(path, repair=True)
    assert verify_store(path).clean
    assert snapshot(path) == before


def test_verify_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreMismatchError, match="not an mtkd store"):
        verify_store(tmp_path / "x")


def test_readers_refuse_a_non_finite_value_of_a_recorded_block_naming_it(pristine):
    path, _, _ = pristine
    _nan_through_zarr(path)
    store = open_store(path)
    with pytest.raises(CorruptStoreError, match=r"teacher 'a', block 1: logits hold NaN/inf \(row 13\).*mtkd verify"):
        store.read_logits("a", 0, ROWS)  # a read of several blocks names the damaged one
    assert torch.isfinite(store.read_logits("a", 0, 8).float()).all()
    (path / "teachers" / "a" / "done" / "c" / "1").unlink()  # unrecorded: the NaN is just "not written"
    assert torch.isnan(open_store(path).read_logits("a", 8, 16).float()).any()


def test_copy_of_a_store_verifies_like_the_original(pristine, tmp_path):
    # Nothing in verify depends on the store's absolute path (a moved store is still itself).
    path, _, _ = pristine
    moved = tmp_path / "moved.zarr"
    shutil.copytree(path, moved)
    assert verify_store(moved).clean
