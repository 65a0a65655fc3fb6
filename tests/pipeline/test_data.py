"""Data specs: every form SPEC lists for rows and for tokens, including what they refuse."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline.data import IGNORE_LABEL, fingerprint, load_data, make_row_data, make_token_data
from mtkd.pipeline.errors import SpecError

DATA_MODULE = textwrap.dedent(
    """
    import numpy as np
    import torch

    X = np.arange(24, dtype=np.float64).reshape(6, 4)
    Y = np.array([0, 1, 2, 0, 1, -100])

    def inputs():
        return X

    def pair():
        return X, Y

    def mapping():
        return {"x": torch.from_numpy(X), "y": torch.from_numpy(Y)}

    def no_x():
        return {"y": Y}

    def broken():
        raise RuntimeError("disk on fire")

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.from_numpy(X[i]), torch.tensor(Y[i])

    class Inputs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.from_numpy(X[i])

    def dataset_pairs():
        return Pairs()

    def dataset_inputs():
        return Inputs()

    NOT_CALLABLE = 3

    def token_lists():
        return [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]

    def token_dict():
        return {"input_ids": np.array([[5, 6, 7], [8, 0, 0], [9, 10, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])}

    def token_floats():
        return [np.array([0.5, 1.0])]
    """
)

X = np.arange(24, dtype=np.float32).reshape(6, 4)
Y = np.array([0, 1, 2, 0, 1, -100])


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "mtkd_test_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


# -- data specs ------------------------------------------------------------------------------------


def test_npz_with_and_without_labels(tmp_path):
    np.savez(tmp_path / "a.npz", x=X.astype(np.float64), y=Y)
    np.savez(tmp_path / "b.npz", x=X)
    a, b = load_data(str(tmp_path / "a.npz")), load_data(str(tmp_path / "b.npz"))
    assert a.x.dtype == np.float32 and np.array_equal(a.x, X) and np.array_equal(a.y, Y) and a.y.dtype == np.int64
    assert b.y is None and np.array_equal(b.labels, np.full(6, IGNORE_LABEL))
    assert a.fingerprint == b.fingerprint == fingerprint(X) and len(a) == 6 and a.spec == str(tmp_path / "a.npz")


def test_npy_and_zarr_array(tmp_path):
    np.save(tmp_path / "x.npy", X)
    z = zarr.open_array(tmp_path / "x.zarr", mode="w", shape=X.shape, dtype="float32")
    z[...] = X
    for spec in (tmp_path / "x.npy", tmp_path / "x.zarr"):
        data = load_data(str(spec))
        assert np.array_equal(data.x, X) and data.y is None and data.fingerprint == fingerprint(X)


@pytest.mark.parametrize("function", ["inputs", "pair", "mapping", "dataset_pairs", "dataset_inputs"])
def test_module_function_forms(data_module, function):
    data = load_data(f"mtkd_test_data:{function}")
    assert np.array_equal(data.x, X) and data.x.dtype == np.float32
    if function in ("pair", "mapping", "dataset_pairs"):
        assert np.array_equal(data.y, Y)
    else:
        assert data.y is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mtkd_test_data:no_x", "without 'x' or 'input_ids'"),
        ("mtkd_test_data:token_floats", "1-D integer array"),
        ("mtkd_test_data:broken", "RuntimeError: disk on fire"),
        ("mtkd_test_data:missing", "has no attribute 'missing'"),
        ("mtkd_test_data:NOT_CALLABLE", "not callable"),
        ("mtkd_no_such_module:f", "cannot import mtkd_no_such_module"),
    ],
)
def test_module_function_refusals(data_module, spec, message):
    with pytest.raises(SpecError, match=message) as e:
        load_data(spec)
    assert spec in str(e.value)


def test_mnist1d_splits_are_generated_locally():
    train = load_data("mnist1d:train?n=100")
    test = load_data("mnist1d:test?n=100")
    unlabeled = load_data("mnist1d:unlabeled?n=100&seed=7")
    assert train.x.shape == (80, 40) and test.x.shape == (20, 40) and unlabeled.x.shape == (100, 40)
    assert set(np.unique(train.y)) <= set(range(10)) and unlabeled.y is None
    assert load_data("mnist1d:train?n=100").fingerprint == train.fingerprint  # same seed, same data
    assert load_data("mnist1d:train?n=100&seed=1").fingerprint != train.fingerprint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist1d:validation", "split must be one of"),
        ("mnist1d:train?n=abc", "n=INT"),
        ("mnist1d:train?size=5", "n=INT"),
        ("mnist1d:train?n", "n=INT"),
        ("mnist1d:train?n=3", "at least 10"),
    ],
)
def test_mnist1d_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        load_data(spec)


def test_file_refusals(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.savez(tmp_path / "noxy.npz", inputs=X)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    for name, message in [
        ("missing.npz", "no such file"),
        ("missing.npy", "no such file"),
        ("junk.npz", "cannot read it"),
        ("junk.npy", "cannot read it"),
        ("objects.npy", "cannot read it"),
        ("noxy.npz", r"no array named 'x' or 'input_ids' \(found \['inputs'\]\)"),
        ("group.zarr", "not a Zarr array"),
        ("plain-name", "not a .npz/.npy/.parquet file"),
    ]:
        with pytest.raises(SpecError, match=message):
            load_data(str(tmp_path / name))


def test_array_validation():
    with pytest.raises(SpecError, match="non-empty"):
        make_row_data("s", np.zeros((0, 3)))
    with pytest.raises(SpecError, match="numeric"):
        make_row_data("s", np.array(["a", "b"]))
    with pytest.raises(SpecError, match=r"shape \(6,\)"):
        make_row_data("s", X, Y[:5])
    float_labels = make_row_data("s", X, Y.astype(np.float32))  # v3: float labels make a regression data set
    assert float_labels.regression and float_labels.y is None and float_labels.targets.shape == (6, 1)
    assert (float_labels.labels == -100).all() and float_labels.labelled_rows == 6
    with pytest.raises(SpecError, match="integers"):
        make_row_data("s", X, np.array(["a"] * 6))
    with pytest.raises(SpecError, match="label -3 at row 2"):
        make_row_data("s", X, np.array([0, 1, -3, 0, 1, 2]))
    ints = make_row_data("s", np.arange(6).reshape(6, 1))
    assert ints.x.dtype == np.int64  # token ids stay integers


def test_fingerprint_is_the_bytes_dtype_and_shape():
    assert fingerprint(X) == fingerprint(X.copy())
    assert fingerprint(X) != fingerprint(X.reshape(4, 6))
    assert fingerprint(X) != fingerprint(X.astype(np.float64))
    changed = X.copy()
    changed[5, 3] = np.nextafter(changed[5, 3], np.inf)
    assert fingerprint(X) != fingerprint(changed)
    assert fingerprint(X[:, ::2]) == fingerprint(np.ascontiguousarray(X[:, ::2]))


# -- token data ------------------------------------------------------------------------------------

SEQS = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]


def _check_tokens(data):
    assert data.kind == "tokens" and data.num_rows == len(data) == 6 and data.num_seqs == 3
    assert data.tokens[:].tolist() == [5, 6, 7, 8, 9, 10] and data.offsets.tolist() == [0, 3, 4, 6]
    # the label of a position is the next token of its sequence; -100 at each sequence's end
    assert data.labels.tolist() == [6, 7, -100, -100, 10, -100]
    assert data.fingerprint == make_token_data("other name", SEQS).fingerprint


def test_token_npz_with_and_without_attention_mask(tmp_path):
    ids = np.array([[5, 6, 7], [8, 1, 1], [9, 10, 1]])
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    _check_tokens(load_data(str(tmp_path / "t.npz")))
    np.savez(tmp_path / "full.npz", input_ids=ids)
    full = load_data(str(tmp_path / "full.npz"))
    assert full.num_rows == 9 and full.offsets.tolist() == [0, 3, 6, 9]


def test_token_parquet_and_module_function(tmp_path, data_module):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [s.tolist() for s in SEQS], "text": ["a", "b", "c"]}), tmp_path / "t.parquet")
    _check_tokens(load_data(str(tmp_path / "t.parquet")))
    _check_tokens(load_data("mtkd_test_data:token_lists"))
    _check_tokens(load_data("mtkd_test_data:token_dict"))


def test_token_fingerprint_covers_tokens_and_boundaries():
    base = make_token_data("s", SEQS).fingerprint
    assert make_token_data("s", [np.array([5, 6]), np.array([7, 8]), np.array([9, 10])]).fingerprint != base  # same tokens, cut otherwise
    assert make_token_data("s", [np.array([5, 6, 7]), np.array([8]), np.array([9, 11])]).fingerprint != base
    assert make_token_data("s", SEQS).fingerprint != fingerprint(np.concatenate(SEQS))  # never equal to a rows set


def test_sequences_in_a_row_range():
    data = make_token_data("s", SEQS)
    assert list(data.sequences_in(0, 6)) == [0, 1, 2]
    assert list(data.sequences_in(2, 4)) == [0, 1] and list(data.sequences_in(3, 4)) == [1] and list(data.sequences_in(4, 5)) == [2]


def test_token_refusals(tmp_path):
    bad = {
        "ragged_mask.npz": ({"input_ids": np.ones((2, 3), int), "attention_mask": np.array([[1, 0, 1], [1, 1, 1]])}, "row 0 is not a prefix"),
        "mask_shape.npz": ({"input_ids": np.ones((2, 3), int), "attention_mask": np.ones((2, 2), int)}, "attention_mask has shape"),
        "mask_values.npz": ({"input_ids": np.ones((2, 3), int), "attention_mask": np.full((2, 3), 2)}, "only 0 and 1"),
        "float_ids.npz": ({"input_ids": np.ones((2, 3))}, "integer array"),
        "empty_seq.npz": ({"input_ids": np.ones((2, 3), int), "attention_mask": np.array([[1, 1, 0], [0, 0, 0]])}, "sequence 1 is empty"),
        "negative.npz": ({"input_ids": -np.ones((2, 3), int)}, "negative token id"),
    }
    for name, (arrays, message) in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(SpecError, match=message) as e:
            load_data(str(tmp_path / name))
        assert name in str(e.value)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(SpecError, match="cannot read an 'input_ids' column"):
        load_data(str(tmp_path / "junk.parquet"))
    with pytest.raises(SpecError, match="non-empty list"):
        make_token_data("s", [])


# -- token files are read where they lie ------------------------------------------------------------


def random_sequences(n: int, *, seed: int = 0, vocab: int = 40, longest: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(1, longest + 1))) for _ in range(n)]


def padded(seqs: list[np.ndarray], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids, mask = np.zeros((len(seqs), width), dtype), np.zeros((len(seqs), width), np.int8)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def same_tokens(data, reference):
    assert data.fingerprint == reference.fingerprint and data.max_label == reference.max_label
    assert np.array_equal(data.offsets, reference.offsets) and np.array_equal(np.asarray(data.tokens), np.asarray(reference.tokens))
    assert np.array_equal(data.labels, reference.labels)


def test_token_npz_and_parquet_load_in_pieces_never_whole(tmp_path, monkeypatch):
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    import mtkd.pipeline.data as data_module

    seqs = random_sequences(1500, longest=200)
    reference = make_token_data("in memory", seqs)
    whole = reference.num_rows * 8  # ~1.2 MB of int64 tokens
    ids, mask = padded(seqs)
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)  # stored, not deflated: mapped
    pq.write_table(pa.table({"input_ids": [s.tolist() for s in seqs]}), tmp_path / "t.parquet", row_group_size=100)
    monkeypatch.setattr(data_module, "SCAN_ROWS", 1024)  # pieces of 8 KB
    monkeypatch.setattr(data_module, "PARQUET_CACHE_BYTES", 1)  # keep one decoded row group (~80 KB)
    for name in ("t.npz", "t.parquet"):
        load_data(str(tmp_path / name))  # once untraced: the modules Arrow imports lazily are no data
        tracemalloc.start()
        try:
            data = load_data(str(tmp_path / name))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # numpy's allocations are traced, Arrow's own buffers are not: for Parquet this holds the
        # int64 copies of the row groups. What stays is the offsets, 8 bytes a sequence.
        assert peak < whole / 4, (name, peak, whole)
        same_tokens(data, reference)
        assert data.tokens[5:30000].tolist() == reference.tokens[5:30000].tolist()  # across sequences and row groups


def test_a_compressed_npz_is_read_whole_to_the_same_tokens(tmp_path):
    seqs = random_sequences(50, seed=1)
    ids, mask = padded(seqs, np.int32)
    np.savez_compressed(tmp_path / "c.npz", input_ids=ids, attention_mask=mask)  # deflated: cannot be mapped
    same_tokens(load_data(str(tmp_path / "c.npz")), make_token_data("s", seqs))


def test_the_largest_label_skips_each_sequences_first_token():
    data = make_token_data("s", [np.array([39, 1, 2]), np.array([38, 4])])
    assert data.max_label == int(data.labels.max()) == 4 and data.labelled_rows == 3


def test_a_flipped_byte_in_a_mapped_npz_is_refused(tmp_path):
    ids, mask = padded(random_sequences(40, seed=2))
    path = tmp_path / "t.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    raw = bytearray(path.read_bytes())
    at = raw.find(ids.tobytes()[:64]) + ids.nbytes // 2  # inside input_ids' data
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(SpecError, match="input_ids.npy fails its CRC-32 check") as e:
        load_data(str(path))
    assert "t.npz" in str(e.value)
