"""The logit store: layout on disk, round trips, completion records, creation races, errors."""

from __future__ import annotations

import json
import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.pipeline.errors import BadInputError, IncompleteStoreError, StoreMismatchError
from mtkd.pipeline.specs import make_array_data
from mtkd.pipeline.store import (
    BF16_NAN_BITS,
    DTYPES,
    STORAGE,
    TARGET_CHUNK_BYTES,
    create_store,
    default_chunk_rows,
    open_store,
)


def _data(n: int = 10, seed: int = 0, labelled: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n) if labelled else None
    return make_array_data(f"test-data-{seed}", rng.standard_normal((n, 4)), y)


def _store(tmp: Path, *, n: int = 10, v: int = 3, chunk_rows: int = 4, teachers=(("a", "float16"),)):
    store, created = create_store(tmp / "s.zarr", data=_data(n), num_classes=v, chunk_rows=chunk_rows)
    assert created
    for name, dtype in teachers:
        assert store.add_teacher(name, spec={"name": name}, checkpoint_sha256="ab" * 32, dtype=dtype)
    return store


def _logits(rows: int, v: int, dtype: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, v, generator=g) * 5).to(STORAGE[dtype][1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


# -- chunking --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "rows", "expected"),
    [(10, 10**6, 65536), (1000, 10**6, 1024), (32000, 10**6, 32), (2**21, 10, 1), (10, 4000, 4000), (10, 1, 1)],
)
def test_default_chunk_rows(classes, rows, expected):
    assert default_chunk_rows(classes, rows) == expected


@given(classes=st.integers(1, 2**20))
def test_default_chunk_rows_gives_chunks_of_1_to_2_mib_at_16_bits(classes):
    rows = default_chunk_rows(classes, 10**9)
    assert rows & (rows - 1) == 0  # a power of two
    if classes <= TARGET_CHUNK_BYTES // 2:
        assert TARGET_CHUNK_BYTES // 2 < rows * classes * 2 <= TARGET_CHUNK_BYTES


# -- layout ----------------------------------------------------------------------------------------


def test_layout_is_readable_with_plain_zarr(tmp_path):
    store = _store(tmp_path, n=10, v=3, chunk_rows=4, teachers=(("a", "float16"), ("b", "bfloat16"), ("c", "float32")))
    data = _data(10)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    meta = group.attrs["mtkd"]
    assert meta == {
        "format": 1,
        "num_rows": 10,
        "num_classes": 3,
        "chunk_rows": 4,
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
    }
    np.testing.assert_array_equal(group["labels"][...], data.labels)
    assert group["labels"].dtype == np.int64
    for name, stored in (("a", np.float16), ("b", np.uint16), ("c", np.float32)):
        logits = group[f"teachers/{name}/logits"]
        assert logits.shape == (10, 3) and logits.chunks == (4, 3) and logits.dtype == stored
        assert logits.compressors == ()
        assert logits.attrs["logical_dtype"] == {"a": "float16", "b": "bfloat16", "c": "float32"}[name]
        attrs = group[f"teachers/{name}"].attrs
        assert set(attrs) == {"spec", "checkpoint_sha256", "dtype", "complete", "stats"}
        assert attrs["complete"] is False and attrs["checkpoint_sha256"] == "ab" * 32
        assert group[f"teachers/{name}/done"].shape == (3,)
    assert store.teachers == ["a", "b", "c"]


def test_unlabelled_data_stores_minus_100(tmp_path):
    store, _ = create_store(tmp_path / "s.zarr", data=_data(5, labelled=False), num_classes=2)
    np.testing.assert_array_equal(store.labels(), np.full(5, -100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unwritten_rows_read_as_nan(tmp_path, dtype):
    store = _store(tmp_path, teachers=(("a", dtype),))
    store.write_block("a", 1, _logits(4, 3, dtype))
    out = store.read_logits("a", 0, 10)
    assert out.dtype == STORAGE[dtype][1]
    assert torch.isnan(out[:4]).all() and torch.isnan(out[8:]).all() and not torch.isnan(out[4:8]).any()
    if dtype == "bfloat16":
        raw = zarr.open_array(tmp_path / "s.zarr" / "teachers/a/logits", mode="r")
        assert raw.fill_value == BF16_NAN_BITS and (raw[:4] == BF16_NAN_BITS).all()


# -- round trips -----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 40),
    classes=st.integers(1, 9),
    chunk_rows=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_round_trip_returns_exactly_what_was_written(dtype, rows, classes, chunk_rows, seed, data):
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = create_store(Path(tmp) / "s.zarr", data=_data(rows), num_classes=classes, chunk_rows=chunk_rows)
        store.add_teacher("t", spec={}, checkpoint_sha256=None, dtype=dtype)
        full = _logits(rows, classes, dtype, seed)
        order = data.draw(st.permutations(range(store.num_blocks)))
        for block in order:
            start, stop = store.block_range(block)
            store.write_block("t", block, full[start:stop].clone())
        start = data.draw(st.integers(0, rows))
        stop = data.draw(st.integers(start, rows))
        again = open_store(Path(tmp) / "s.zarr")
        assert torch.equal(_bits(again.read_logits("t", start, stop)), _bits(full[start:stop]))
        assert again.missing_blocks("t") == []


def test_bfloat16_is_bit_exact_for_every_kind_of_value(tmp_path):
    # Every finite 16-bit pattern: -0.0, subnormals, the extremes. (NaN/inf are never stored: a
    # recorded block holding one is damage, which read_logits refuses.)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    v = 7
    n = len(values) // v
    logits = values[: n * v].reshape(n, v).contiguous()
    store, _ = create_store(tmp_path / "s.zarr", data=_data(n), num_classes=v, chunk_rows=1024)
    store.add_teacher("t", spec={}, checkpoint_sha256=None, dtype="bfloat16")
    for block in range(store.num_blocks):
        start, stop = store.block_range(block)
        store.write_block("t", block, logits[start:stop].clone())
    back = store.read_logits("t", 0, n)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), logits.view(torch.int16))
    raw = zarr.open_array(tmp_path / "s.zarr" / "teachers/t/logits", mode="r")[...]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.view(np.int16), logits.view(torch.int16).numpy())


def test_write_block_refuses_wrong_shape_and_dtype(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        store.write_block("a", 0, _logits(3, 3, "float16"))
    with pytest.raises(TypeError, match="float16"):
        store.write_block("a", 0, _logits(4, 3, "float32"))
    assert store.missing_blocks("a") == [0, 1, 2]


# -- completion records ----------------------------------------------------------------------------


def test_completion_is_one_file_per_block(tmp_path):
    store = _store(tmp_path)
    assert store.missing_blocks("a") == [0, 1, 2] and store.rows_complete("a") == 0
    store.write_block("a", 2, _logits(2, 3, "float16"))  # the last block holds rows 8..9
    store.write_block("a", 0, _logits(4, 3, "float16"))
    assert store.missing_blocks("a") == [1]
    assert store.done_blocks("a") == {0, 2}
    assert store.rows_complete("a") == 6
    records = sorted(p.name for p in (tmp_path / "s.zarr/teachers/a/done/c").iterdir())
    assert records == ["0", "2"]
    # The records are an ordinary Zarr array too.
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "s.zarr/teachers/a/done", mode="r")[...], [1, 0, 1])


def test_leftover_partial_files_are_not_records(tmp_path):
    store = _store(tmp_path)
    folder = tmp_path / "s.zarr/teachers/a/done/c"
    folder.mkdir(parents=True)
    (folder / "1.0123abcd.partial").write_bytes(b"")  # what a writer killed mid-write leaves
    assert store.missing_blocks("a") == [0, 1, 2]


def test_concurrent_writers_keep_every_record(tmp_path):
    store = _store(tmp_path, n=64, chunk_rows=1)
    errors: list[BaseException] = []

    def write(blocks):
        try:
            mine = open_store(tmp_path / "s.zarr", mode="r+")  # one handle per writer, as processes have
            for b in blocks:
                mine.write_block("a", b, _logits(1, 3, "float16", seed=b))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(range(i, 64, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.missing_blocks("a") == []
    for b in range(64):
        assert torch.equal(_bits(store.read_logits("a", b, b + 1)), _bits(_logits(1, 3, "float16", seed=b)))


def test_require_complete_names_teacher_and_rows(tmp_path):
    store = _store(tmp_path, teachers=(("a", "float16"), ("b", "float16")))
    for block in range(3):
        start, stop = store.block_range(block)
        store.write_block("a", block, _logits(stop - start, 3, "float16"))
    store.write_block("b", 0, _logits(4, 3, "float16"))
    store.require_complete(["a"])
    with pytest.raises(IncompleteStoreError, match=r"teacher 'b' is missing 6 of 10 rows.*first at row 4"):
        store.require_complete(["a", "b"])
    with pytest.raises(BadInputError, match=r"no teacher 'zz' \(it has: a, b\)"):
        store.require_complete(["zz"])


def test_mark_complete_is_idempotent_and_needs_every_block(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(IncompleteStoreError, match="'a'"):
        store.mark_complete("a", {"accuracy": 1.0})
    for block in range(3):
        start, stop = store.block_range(block)
        store.write_block("a", block, _logits(stop - start, 3, "float16"))
    (tmp_path / "s.zarr/teachers/a/logits/c/0/0.deadbeef.partial").write_bytes(b"junk")
    stats = {"n": 0, "accuracy": float("nan"), "nll": 1.5}
    store.mark_complete("a", stats)
    meta = tmp_path / "s.zarr/teachers/a/zarr.json"
    first = meta.read_bytes()
    store.mark_complete("a", stats)
    assert meta.read_bytes() == first
    assert json.loads(first)["attributes"]["stats"] == {"n": 0, "accuracy": None, "nll": 1.5}
    info = store.teacher("a")
    assert info.complete and info.stats["nll"] == 1.5 and info.dtype == "float16"
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


# -- creation and opening --------------------------------------------------------------------------


def test_create_finds_a_racers_store(tmp_path):
    results = []
    barrier = threading.Barrier(4)

    def create():
        barrier.wait()
        results.append(create_store(tmp_path / "s.zarr", data=_data(10), num_classes=3, chunk_rows=4)[1])

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no staging folders left behind
    assert open_store(tmp_path / "s.zarr").num_rows == 10


def test_create_refuses_a_racers_store_of_other_data(tmp_path):
    create_store(tmp_path / "s.zarr", data=_data(10, seed=0), num_classes=3)
    with pytest.raises(StoreMismatchError, match="test-data-0.*test-data-1"):
        create_store(tmp_path / "s.zarr", data=_data(10, seed=1), num_classes=3)
    with pytest.raises(StoreMismatchError, match="3 classes"):
        create_store(tmp_path / "s.zarr", data=_data(10, seed=0), num_classes=5)


def test_create_into_an_empty_folder(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    _, created = create_store(tmp_path / "s.zarr", data=_data(10), num_classes=3)
    assert created


def test_add_teacher_race_has_one_winner(tmp_path):
    store = _store(tmp_path, teachers=())
    results = []
    barrier = threading.Barrier(4)

    def add():
        barrier.wait()
        results.append(store.add_teacher("t", spec={}, checkpoint_sha256="x", dtype="float32"))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert store.teachers == ["t"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_check_data_names_both_sides(tmp_path):
    store = _store(tmp_path)
    store.check_data(_data(10))
    with pytest.raises(StoreMismatchError, match=r"'test-data-0' \(10 rows.*'test-data-1' \(10 rows"):
        store.check_data(_data(10, seed=1))
    with pytest.raises(StoreMismatchError, match="12 rows"):
        store.check_data(_data(12))


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        open_store(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreMismatchError, match="folder.*not an mtkd store"):
        open_store(tmp_path / "folder")
    zarr.open_group(tmp_path / "group", mode="w")
    with pytest.raises(StoreMismatchError, match="group.*not an mtkd store"):
        open_store(tmp_path / "group")
    g = zarr.open_group(tmp_path / "future", mode="w")
    g.attrs["mtkd"] = {"format": 99}
    with pytest.raises(StoreMismatchError, match="format 99"):
        open_store(tmp_path / "future")


def test_read_only_store_refuses_writes(tmp_path):
    _store(tmp_path)
    store = open_store(tmp_path / "s.zarr")
    with pytest.raises(PermissionError):
        store.write_block("a", 0, _logits(4, 3, "float16"))


def test_store_pickles_for_dataloader_workers(tmp_path):
    store = _store(tmp_path)
    store.write_block("a", 0, _logits(4, 3, "float16"))
    store.read_logits("a", 0, 4)  # opens a zarr handle that must not travel
    again = pickle.loads(pickle.dumps(store))
    assert torch.equal(again.read_logits("a", 0, 4), _logits(4, 3, "float16"))
    assert (again.num_rows, again.num_blocks, again.fingerprint) == (store.num_rows, store.num_blocks, store.fingerprint)


def test_read_logits_range_checked(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(IndexError):
        store.read_logits("a", 5, 11)
    with pytest.raises(BadInputError, match="no teacher 'b'"):
        store.read_logits("b", 0, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_are_byte_for_byte_what_zarr_itself_writes(tmp_path, dtype):
    # write_block writes chunk files directly; zarr writing the same rows must give the same files.
    store = _store(tmp_path, n=10, v=3, chunk_rows=4, teachers=(("a", dtype),))
    logits = _logits(10, 3, dtype)
    for block in range(3):
        start, stop = store.block_range(block)
        store.write_block("a", block, logits[start:stop].clone())
    source = zarr.open_array(tmp_path / "s.zarr/teachers/a/logits", mode="r")
    twin = zarr.create_array(
        tmp_path / "twin", shape=source.shape, chunks=source.chunks, dtype=source.dtype, fill_value=source.fill_value, compressors=None
    )
    twin[...] = source[...]
    for block in range(3):
        ours = (tmp_path / f"s.zarr/teachers/a/logits/c/{block}/0").read_bytes()
        assert ours == (tmp_path / f"twin/c/{block}/0").read_bytes()
