"""The store: format 2 on disk (rows and tokens, dense and top-k), checksums, round trips, completion
records, creation races, format-1 stores, errors."""

from __future__ import annotations

import json
import math
import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.pipeline.errors import BadInputError, CorruptStoreError, IncompleteStoreError, StoreMismatchError
from mtkd.pipeline.data import make_row_data, make_token_data
from mtkd.pipeline.infer import write_logits_block
from mtkd.pipeline.layouts import BF16_NAN_BITS, DTYPES, STORAGE, Dense, TopK
from mtkd.pipeline.report import StatsSums, inspect_store
from mtkd.pipeline.store import TARGET_CHUNK_BYTES, create_store, default_chunk_rows, open_store


def _data(n: int = 10, seed: int = 0, labelled: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n) if labelled else None
    return make_row_data(f"test-data-{seed}", rng.standard_normal((n, 4)), y)


def _add(store, name: str, layout) -> bool:
    return store.add_teacher(name, spec={"name": name}, weights_sha256="ab" * 32, layout=layout, stats_width=StatsSums.width(layout))


def _store(tmp: Path, *, n: int = 10, v: int = 3, chunk_rows: int = 4, teachers=(("a", "float16"),)):
    store, created = create_store(tmp / "s.zarr", data=_data(n), num_classes=v, chunk_rows=chunk_rows)
    assert created
    for name, dtype in teachers:
        assert _add(store, name, Dense(dtype, v))
    return store


def _write(store, name: str, block: int, logits: torch.Tensor) -> None:
    start, stop = store.block_range(block)
    write_logits_block(store, name, block, logits, torch.from_numpy(store.labels()[start:stop]))


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
    assert default_chunk_rows(Dense("float16", classes).row_bytes(), rows) == expected


@given(classes=st.integers(1, 2**20))
def test_default_chunk_rows_gives_chunks_of_1_to_2_mib_at_16_bits(classes):
    rows = default_chunk_rows(2 * classes, 10**9)
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
        "format": 2,
        "kind": "rows",
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
        assert logits.compressors == (Crc32cCodec(),)  # a checksum, no compression
        assert logits.attrs["logical_dtype"] == {"a": "float16", "b": "bfloat16", "c": "float32"}[name]
        attrs = group[f"teachers/{name}"].attrs
        assert set(attrs) == {"spec", "weights_sha256", "layout", "dtype", "vocab_size", "top_k", "temperatures", "complete", "stats"}
        assert attrs["complete"] is False and attrs["weights_sha256"] == "ab" * 32
        assert (attrs["layout"], attrs["vocab_size"], attrs["top_k"], attrs["temperatures"]) == ("dense", 3, None, None)
        assert group[f"teachers/{name}/done"].shape == (3,)
    assert store.teachers == ["a", "b", "c"]


def test_unlabelled_data_stores_minus_100(tmp_path):
    store, _ = create_store(tmp_path / "s.zarr", data=_data(5, labelled=False), num_classes=2, chunk_rows=4)
    np.testing.assert_array_equal(store.labels(), np.full(5, -100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unwritten_rows_read_as_nan(tmp_path, dtype):
    store = _store(tmp_path, teachers=(("a", dtype),))
    _write(store, "a", 1, _logits(4, 3, dtype))
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
        store, _ = create_store(Path(tmp) / "s.zarr", data=_data(rows, labelled=False), num_classes=classes, chunk_rows=chunk_rows)
        _add(store, "t", Dense(dtype, classes))
        full = _logits(rows, classes, dtype, seed)
        order = data.draw(st.permutations(range(store.num_blocks)))
        for block in order:
            start, stop = store.block_range(block)
            _write(store, "t", block, full[start:stop].clone())
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
    _add(store, "t", Dense("bfloat16", v, entropy=False))
    labels = torch.full((n,), -100)
    for block in range(store.num_blocks):
        start, stop = store.block_range(block)
        arrays = {"logits": logits[start:stop].view(torch.int16).numpy().view(np.uint16)}
        store.write_block("t", block, arrays, np.zeros(StatsSums.width(Dense("bfloat16", v))))  # infinities included: no finiteness check here
    back = store.read_logits("t", 0, n)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), logits.view(torch.int16))
    raw = zarr.open_array(tmp_path / "s.zarr" / "teachers/t/logits", mode="r")[...]
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.view(np.int16), logits.view(torch.int16).numpy())


def test_write_block_refuses_wrong_shape_and_dtype(tmp_path):
    store = _store(tmp_path)
    stats = np.zeros(StatsSums.width(Dense("float16", 3)))
    entropy = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"needs \(4, 3\) float16"):
        store.write_block("a", 0, {"logits": np.zeros((3, 3), np.float16), "entropy": entropy}, stats)
    with pytest.raises(ValueError, match=r"needs \(4, 3\) float16"):
        store.write_block("a", 0, {"logits": np.zeros((4, 3), np.float32), "entropy": entropy}, stats)
    with pytest.raises(ValueError, match=r"entropy needs \(4,\) float32"):
        store.write_block("a", 0, {"logits": np.zeros((4, 3), np.float16), "entropy": entropy.astype(np.float16)}, stats)
    with pytest.raises(ValueError, match="needs arrays"):
        store.write_block("a", 0, {"ids": np.zeros((4, 3), np.float16)}, stats)
    assert store.missing_blocks("a") == [0, 1, 2]


# -- completion records ----------------------------------------------------------------------------


def test_completion_is_one_file_per_block(tmp_path):
    store = _store(tmp_path)
    assert store.missing_blocks("a") == [0, 1, 2] and store.rows_complete("a") == 0
    _write(store, "a", 2, _logits(2, 3, "float16"))  # the last block holds rows 8..9
    _write(store, "a", 0, _logits(4, 3, "float16"))
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
                _write(mine, "a", b, _logits(1, 3, "float16", seed=b))
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
        _write(store, "a", block, _logits(stop - start, 3, "float16"))
    _write(store, "b", 0, _logits(4, 3, "float16"))
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
        _write(store, "a", block, _logits(stop - start, 3, "float16"))
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
    create_store(tmp_path / "s.zarr", data=_data(10, seed=0), num_classes=3, chunk_rows=4)
    with pytest.raises(StoreMismatchError, match="test-data-0.*test-data-1"):
        create_store(tmp_path / "s.zarr", data=_data(10, seed=1), num_classes=3, chunk_rows=4)
    with pytest.raises(StoreMismatchError, match="3 classes"):
        create_store(tmp_path / "s.zarr", data=_data(10, seed=0), num_classes=5, chunk_rows=4)


def test_create_into_an_empty_folder(tmp_path):
    (tmp_path / "s.zarr").mkdir()
    _, created = create_store(tmp_path / "s.zarr", data=_data(10), num_classes=3, chunk_rows=4)
    assert created


def test_add_teacher_race_has_one_winner(tmp_path):
    store = _store(tmp_path, teachers=())
    results = []
    barrier = threading.Barrier(4)

    def add():
        barrier.wait()
        results.append(_add(store, "t", Dense("float32", 3)))

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
        _write(store, "a", 0, _logits(4, 3, "float16"))


def test_store_pickles_for_dataloader_workers(tmp_path):
    store = _store(tmp_path)
    _write(store, "a", 0, _logits(4, 3, "float16"))
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
@pytest.mark.parametrize("layout", ["dense", "topk"])
def test_chunks_are_byte_for_byte_what_zarr_itself_writes(tmp_path, dtype, layout):
    # write_block encodes and writes chunk files directly; zarr writing the same rows must give the same files.
    store, _ = create_store(tmp_path / "s.zarr", data=_data(10), num_classes=6, chunk_rows=4)
    _add(store, "a", Dense(dtype, 6) if layout == "dense" else TopK(dtype, 6, 3, (1.0, 2.0)))
    logits = _logits(10, 6, "float32")
    for block in range(3):
        start, stop = store.block_range(block)
        _write(store, "a", block, logits[start:stop])
    for array in store.layout("a").arrays():
        source = zarr.open_array(tmp_path / f"s.zarr/teachers/a/{array.name}", mode="r")
        twin = zarr.create_array(
            tmp_path / f"twin-{array.name}", shape=source.shape, chunks=source.chunks, dtype=source.dtype,
            fill_value=source.fill_value, compressors=source.compressors, filters=source.filters,
        )
        twin[...] = source[...]
        for block in range(3):
            key = "/".join(["c", str(block)] + ["0"] * len(array.row_shape))
            assert (tmp_path / f"s.zarr/teachers/a/{array.name}/{key}").read_bytes() == (tmp_path / f"twin-{array.name}/{key}").read_bytes()


# -- format 2: tokens, top-k, checksums; format 1 -----------------------------------------------------


def _tokens():
    return make_token_data("tokens-spec", [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 0, 1])])


def test_token_store_holds_sequences_and_next_token_labels(tmp_path):
    data = _tokens()
    store, _ = create_store(tmp_path / "t.zarr", data=data, num_classes=8, chunk_rows=4)
    group = zarr.open_group(tmp_path / "t.zarr", mode="r")
    assert group.attrs["mtkd"]["kind"] == "tokens" and store.kind == "tokens" and store.num_rows == 9
    np.testing.assert_array_equal(group["sequences/offsets"][...], [0, 4, 6, 9])
    np.testing.assert_array_equal(group["labels"][...], [2, 3, 4, -100, 6, -100, 0, 1, -100])
    assert group["labels"].compressors == (Crc32cCodec(),) and group["sequences/offsets"].compressors == (Crc32cCodec(),)
    np.testing.assert_array_equal(store.offsets(), data.offsets)
    with pytest.raises(StoreMismatchError, match="holds tokens.*is rows"):
        store.check_data(_data(9))
    rows_store = _store(tmp_path)
    with pytest.raises(StoreMismatchError, match="holds rows.*is tokens"):
        rows_store.check_data(data)
    with pytest.raises(BadInputError, match="not token sequences"):
        rows_store.offsets()


def test_topk_arrays_rebuild_the_teachers_probabilities_from_plain_zarr(tmp_path):
    data = _tokens()
    store, _ = create_store(tmp_path / "t.zarr", data=data, num_classes=8, chunk_rows=4)
    layout = TopK("float32", 8, 3, (1.0, 0.5, 4.0))
    _add(store, "lm", layout)
    z = _logits(9, 8, "float32", seed=3)
    for block in range(store.num_blocks):
        start, stop = store.block_range(block)
        _write(store, "lm", block, z[start:stop])
    g = zarr.open_group(tmp_path / "t.zarr", mode="r")
    t = g["teachers/lm"]
    assert (t.attrs["layout"], t.attrs["top_k"], t.attrs["temperatures"], t.attrs["vocab_size"]) == ("topk", 3, [1.0, 0.5, 4.0], 8)
    ids, lp, lse, label_lp = (t[k][...] for k in ("topk_ids", "topk_logprobs", "lse", "label_logprob"))
    assert ids.dtype == np.int32 and ids.shape == (9, 3) and lse.shape == (9, 3) and label_lp.shape == (9,)
    for name in ("topk_ids", "topk_logprobs", "lse", "label_logprob"):
        assert isinstance(t[name].compressors[-1], Crc32cCodec)
    zd = z.double()
    for j, temp in enumerate((1.0, 0.5, 4.0)):
        p = torch.softmax(zd / temp, dim=1)
        rebuilt = np.exp((lp.astype(np.float64) + lse[:, :1]) / temp - lse[:, j : j + 1])  # SPEC's formula
        np.testing.assert_allclose(rebuilt, p.gather(1, torch.from_numpy(ids).long()).numpy(), rtol=1e-5)
        sparse = store.read_topk("lm", 0, 9, temperature=temp)
        np.testing.assert_allclose(sparse.logprobs.exp().numpy(), rebuilt, rtol=1e-5)
    assert (np.sort(ids, axis=1)[:, 1:] != np.sort(ids, axis=1)[:, :-1]).all()  # distinct per row
    labels = store.labels()
    has = labels >= 0
    np.testing.assert_allclose(label_lp[has], torch.log_softmax(zd, 1).numpy()[has.nonzero()[0], labels[has]], rtol=1e-5)
    assert np.isnan(label_lp[~has]).all()
    with pytest.raises(BadInputError, match=r"temperature 3 is not stored \(stored: 1,0.5,4\)"):
        store.read_topk("lm", 0, 9, temperature=3.0)
    with pytest.raises(BadInputError, match="not dense logits"):
        store.read_logits("lm", 0, 9)


@pytest.mark.parametrize("layout", ["dense", "topk"])
def test_a_flipped_byte_is_an_error_never_data(tmp_path, layout):
    store, _ = create_store(tmp_path / "s.zarr", data=_data(8), num_classes=5, chunk_rows=4)
    _add(store, "a", Dense("float16", 5) if layout == "dense" else TopK("float16", 5, 2, (1.0, 2.0)))
    for block in range(2):
        _write(store, "a", block, _logits(4, 5, "float32", seed=block))
    name = "logits" if layout == "dense" else "topk_logprobs"
    chunk = tmp_path / f"s.zarr/teachers/a/{name}/c/1/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    store.read("a", 0, 4)  # the other block still reads
    with pytest.raises(CorruptStoreError, match=rf"teacher 'a', block 1: the {name} do not read .*checksum.*mtkd verify"):
        store.read("a", 0, 8)


def _format_1_store(path: Path, data, logits: np.ndarray) -> None:
    """A store exactly as format 1 wrote it: no kind, no checksums, `checkpoint_sha256`."""
    meta = {"format": 1, "num_rows": len(data), "num_classes": logits.shape[1], "chunk_rows": 4,
            "dataset": {"spec": data.spec, "fingerprint": data.fingerprint}}
    root = zarr.open_group(path, mode="w", attributes={"mtkd": meta})
    root.create_array("labels", shape=(len(data),), chunks=(len(data),), dtype="int64", fill_value=-100)[...] = data.labels
    t = root.create_group("teachers").create_group(
        "old", attributes={"spec": {"name": "old"}, "checkpoint_sha256": "cd" * 32, "dtype": "float16", "complete": True, "stats": {}}
    )
    arr = t.create_array("logits", shape=logits.shape, chunks=(4, logits.shape[1]), dtype="float16", fill_value=float("nan"),
                         compressors=None, attributes={"logical_dtype": "float16"})
    arr[...] = logits.astype(np.float16)
    done = t.create_array("done", shape=(math.ceil(len(data) / 4),), chunks=(1,), dtype="uint8", fill_value=0, compressors=None)
    done[...] = 1


def test_format_1_stores_still_open_and_inspect_but_are_not_written(tmp_path):
    data = _data(10)
    logits = _logits(10, 3, "float32").numpy()
    _format_1_store(tmp_path / "old.zarr", data, logits)
    store = open_store(tmp_path / "old.zarr")
    info = store.teacher("old")
    assert store.format == 1 and store.kind == "rows" and info.weights_sha256 == "cd" * 32 and info.complete
    assert isinstance(info.layout, Dense) and info.layout.vocab_size == 3
    assert torch.equal(store.read_logits("old", 0, 10), torch.from_numpy(logits).half())
    report = inspect_store(store)
    assert report["format"] == 1 and report["teachers"][0]["layout"] == "dense" and report["teachers"][0]["metrics"]["n"] == 10
    with pytest.raises(StoreMismatchError, match="format 1.*writes only format 2"):
        open_store(tmp_path / "old.zarr", mode="r+")
