"""The stage-two loader: coverage, determinism, DDP split, streaming vs in memory, whole-chunk reads."""

from __future__ import annotations

import math
import threading
from contextlib import closing
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd.pipeline.loader import BatchLoader
from mtkd.pipeline.store import open_store

from .conftest import KD_TEACHERS, write_store

MODES = {"memory": False, "stream": True}


class RecordingStore:
    """A real store that records every read (name, start, stop)."""

    def __init__(self, store):
        self.store, self.reads = store, []
        self.num_rows, self.num_classes, self.chunk_rows = store.num_rows, store.num_classes, store.chunk_rows

    def teacher(self, name):
        return self.store.teacher(name)

    def read_logits(self, name, start, stop):
        self.reads.append((name, start, stop))
        return self.store.read_logits(name, start, stop)


def make_loader(kd_world, *, mode="memory", seed=0, batch_size=32, rank=0, world_size=1, teachers=KD_TEACHERS,
                store=None, window_bytes=1, read_bytes=1, **kwargs):
    # window_bytes=1, read_bytes=1: read units of one chunk and windows of the minimum, 8 units, so
    # that even this tiny store has several windows.
    return BatchLoader(
        kd_world.x["labelled"], kd_world.y["labelled"], batch_size=batch_size, seed=seed,
        store=store or open_store(kd_world.store["labelled"]), teachers=list(teachers), rank=rank,
        world_size=world_size, stream=MODES[mode], window_bytes=window_bytes, read_bytes=read_bytes, **kwargs,
    )


def epoch_batches(loader, epoch, start=0):
    with closing(loader.epoch(epoch, start)) as batches:
        return list(batches)


def rows_of(batches):
    return torch.cat([b.rows for b in batches])


@pytest.mark.parametrize("mode", MODES)
def test_every_row_once_per_epoch_with_its_own_inputs_logits_and_labels(kd_world, mode):
    loader = make_loader(kd_world, mode=mode, batch_size=37)
    stack = kd_world.teacher_stack("labelled").half()
    batches = epoch_batches(loader, epoch=0)
    assert [len(b) for b in batches] == [37] * 10 + [384 - 370]
    assert len(batches) == loader.batches_per_epoch
    assert sorted(rows_of(batches).tolist()) == list(range(kd_world.rows))
    for b in batches:
        assert b.logits.shape == (3, len(b), 5) and b.logits.dtype == torch.float16
        assert torch.equal(b.x, torch.from_numpy(kd_world.x["labelled"])[b.rows])
        assert torch.equal(b.labels, torch.from_numpy(kd_world.y["labelled"])[b.rows])
        assert torch.equal(b.logits, stack[:, b.rows])


@pytest.mark.parametrize("mode", MODES)
def test_order_depends_only_on_seed_and_epoch(kd_world, mode):
    first = rows_of(epoch_batches(make_loader(kd_world, mode=mode, seed=3), epoch=2))
    again = rows_of(epoch_batches(make_loader(kd_world, mode=mode, seed=3), epoch=2))
    assert torch.equal(first, again)
    assert not torch.equal(first, rows_of(epoch_batches(make_loader(kd_world, mode=mode, seed=3), epoch=3)))
    assert not torch.equal(first, rows_of(epoch_batches(make_loader(kd_world, mode=mode, seed=4), epoch=2)))
    assert not torch.equal(first, torch.arange(kd_world.rows))  # shuffled


@pytest.mark.parametrize("mode", MODES)
def test_resuming_at_a_batch_gives_the_rest_of_the_epoch(kd_world, mode):
    loader = make_loader(kd_world, mode=mode, batch_size=30)
    full = epoch_batches(loader, epoch=1)
    rest = epoch_batches(loader, epoch=1, start=5)
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.logits, b.logits) and torch.equal(a.x, b.x)
    assert epoch_batches(loader, epoch=1, start=loader.batches_per_epoch) == []


@pytest.mark.parametrize("mode", MODES)
def test_one_iterator_over_several_epochs_matches_epoch_by_epoch(kd_world, mode):
    loader = make_loader(kd_world, mode=mode, batch_size=30)
    with closing(loader.batches(1, 4, start_batch=3)) as batches:
        spanned = [(epoch, b, batch.rows) for epoch, b, batch in batches]
    expected = [(epoch, b, batch.rows) for epoch in (1, 2, 3)
                for b, batch in enumerate(epoch_batches(loader, epoch)) if epoch > 1 or b >= 3]
    assert [(e, b) for e, b, _ in spanned] == [(e, b) for e, b, _ in expected]
    assert all(torch.equal(r, s) for (_, _, r), (_, _, s) in zip(spanned, expected))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_get_equal_batches_of_disjoint_rows(kd_world, mode, world_size):
    per_rank = [epoch_batches(make_loader(kd_world, mode=mode, rank=r, world_size=world_size, batch_size=25), epoch=0)
                for r in range(world_size)]
    assert len({tuple(len(b) for b in batches) for batches in per_rank}) == 1  # same count and sizes everywhere
    rows = torch.cat([rows_of(batches) for batches in per_rank])
    assert len(rows) == kd_world.rows // world_size * world_size
    assert len(set(rows.tolist())) == len(rows)  # disjoint


def test_streaming_and_memory_give_the_same_rows_each_epoch(kd_world):
    for epoch in range(3):
        seen = {}
        for mode in MODES:
            batches = epoch_batches(make_loader(kd_world, mode=mode), epoch)
            seen[mode] = {int(r): (b.x[i].tolist(), b.logits[:, i].tolist(), int(b.labels[i]))
                          for b in batches for i, r in enumerate(b.rows)}
        assert seen["memory"] == seen["stream"]


def test_streaming_reads_whole_chunks_once_per_epoch(kd_world, tmp_path):
    # Chunks of 7 rows: the short last chunk lands mid-sequence, so later windows start mid-chunk.
    x, y, n, cr = kd_world.x["labelled"], kd_world.y["labelled"], kd_world.rows, 7
    path = write_store(tmp_path / "fine.zarr", x, y, kd_world.logits["labelled"], chunk_rows=cr)
    recording = RecordingStore(open_store(path))
    loader = make_loader(kd_world, mode="stream", store=recording)
    assert loader.window_rows == 8 * cr  # several windows
    for epoch in range(3):
        recording.reads.clear()
        assert sorted(rows_of(epoch_batches(loader, epoch)).tolist()) == list(range(n))
        whole = [(t, s, min(s + cr, n)) for t in KD_TEACHERS for s in range(0, n, cr)]
        assert sorted(recording.reads) == sorted(whole)


def test_tiny_chunks_are_read_several_at_a_time_still_whole(kd_world, tmp_path):
    x, y, n, cr = kd_world.x["labelled"], kd_world.y["labelled"], kd_world.rows, 7
    path = write_store(tmp_path / "fine.zarr", x, y, kd_world.logits["labelled"], chunk_rows=cr)
    recording = RecordingStore(open_store(path))
    # 3 chunks of 7 rows x 5 classes x 2 bytes = 210 bytes: one read unit.
    loader = make_loader(kd_world, mode="stream", store=recording, read_bytes=200)
    assert loader.read_rows == 3 * cr
    assert sorted(rows_of(epoch_batches(loader, 0)).tolist()) == list(range(n))
    assert all(start % cr == 0 and stop == min(start + 3 * cr, n) for _, start, stop in recording.reads)
    assert len(recording.reads) == 3 * math.ceil(n / (3 * cr))  # every unit once per teacher


def test_memory_mode_reads_the_store_once(kd_world):
    recording = RecordingStore(open_store(kd_world.store["labelled"]))
    loader = make_loader(kd_world, mode="memory", store=recording)
    epoch_batches(loader, epoch=0)
    epoch_batches(loader, epoch=1)
    n, cr = kd_world.rows, kd_world.chunk_rows
    assert recording.reads == [(t, s, min(s + cr, n)) for t in KD_TEACHERS for s in range(0, n, cr)]


def test_mode_follows_the_memory_budget(kd_world):
    logits_bytes = 3 * kd_world.rows * 5 * 2
    store = open_store(kd_world.store["labelled"])
    x, y = kd_world.x["labelled"], kd_world.y["labelled"]
    fits = BatchLoader(x, y, batch_size=8, seed=0, store=store, teachers=KD_TEACHERS, memory_budget=logits_bytes)
    too_big = BatchLoader(x, y, batch_size=8, seed=0, store=store, teachers=KD_TEACHERS, memory_budget=logits_bytes - 1)
    assert (fits.mode, too_big.mode, fits.logits_bytes) == ("memory", "stream", logits_bytes)


def test_a_subset_of_teachers_in_the_given_order(kd_world):
    loader = make_loader(kd_world, teachers=("c", "a"))
    batch = epoch_batches(loader, 0)[0]
    assert torch.equal(batch.logits, kd_world.teacher_stack("labelled", ("c", "a")).half()[:, batch.rows])


def test_leaving_a_streamed_epoch_early_stops_its_thread(kd_world):
    loader = make_loader(kd_world, mode="stream", batch_size=4)
    before = threading.active_count()
    with closing(loader.epoch(0)) as batches:
        next(batches)
    assert threading.active_count() == before


def test_without_a_store_batches_carry_inputs_and_labels_only(kd_world):
    loader = BatchLoader(kd_world.x["labelled"], kd_world.y["labelled"], batch_size=100, seed=0)
    batches = epoch_batches(loader, 0)
    assert loader.mode == "memory" and all(b.logits is None for b in batches)
    assert sorted(rows_of(batches).tolist()) == list(range(kd_world.rows))


class ArraySource:
    """An in-memory stand-in for a store (the loader's LogitSource protocol), for fast property tests."""

    def __init__(self, n, v, k, chunk_rows):
        self.num_rows, self.num_classes, self.chunk_rows = n, v, chunk_rows
        self.logits = {f"t{i}": torch.arange(n * v, dtype=torch.float32).reshape(n, v) + 1e6 * i for i in range(k)}

    def teacher(self, name):
        return SimpleNamespace(dtype="float32")

    def read_logits(self, name, start, stop):
        assert start % self.chunk_rows == 0 and (stop % self.chunk_rows == 0 or stop == self.num_rows), "partial chunk"
        return self.logits[name][start:stop].clone()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200), chunk_rows=st.integers(1, 40), batch_size=st.integers(1, 50), world_size=st.integers(1, 4),
    window_chunks=st.integers(1, 12), read_chunks=st.integers(1, 4), stream=st.booleans(), epoch=st.integers(0, 5),
)
def test_any_shape_splits_into_disjoint_equal_rank_shares(n, chunk_rows, batch_size, world_size, window_chunks, read_chunks,
                                                         stream, epoch):
    if n < world_size:
        return
    source = ArraySource(n, 3, 2, chunk_rows)
    x = np.arange(n, dtype=np.float32)[:, None]
    window_bytes = window_chunks * chunk_rows * 2 * 3 * 4
    shares = []
    for rank in range(world_size):
        loader = BatchLoader(x, np.zeros(n, dtype=np.int64), batch_size=batch_size, seed=7, store=source,
                             teachers=["t0", "t1"], rank=rank, world_size=world_size, stream=stream, window_bytes=window_bytes,
                             read_bytes=read_chunks * chunk_rows * 3 * 4)
        batches = epoch_batches(loader, epoch)
        assert len(batches) == loader.batches_per_epoch
        for b in batches:
            assert torch.equal(b.x[:, 0].long(), b.rows)
            assert torch.equal(b.logits, torch.stack([source.logits[t][b.rows] for t in ("t0", "t1")]))
        shares.append(rows_of(batches))
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == n // world_size
    every = torch.cat(shares)
    assert len(set(every.tolist())) == len(every)


def test_a_batch_spanning_three_windows_keeps_every_row():
    # Found by the property above: 33 rows, batches of 11, windows of 8 rows: the last batch is cut
    # from three windows, and the first part of it used to be dropped.
    n = 33
    source = ArraySource(n, 3, 2, 1)
    loader = BatchLoader(np.arange(n, dtype=np.float32)[:, None], np.zeros(n, dtype=np.int64), batch_size=11, seed=7,
                         store=source, teachers=["t0", "t1"], stream=True, window_bytes=24, read_bytes=12)
    batches = epoch_batches(loader, 0)
    assert sorted(rows_of(batches).tolist()) == list(range(n))


# -- token sequences --------------------------------------------------------------------------------

from mtkd.pipeline.data import load_data  # noqa: E402
from mtkd.pipeline.loader import SequenceLoader, TeacherRows  # noqa: E402

from .token_world import TEACHERS as LM_TEACHERS  # noqa: E402
from .token_world import token_world  # noqa: E402, F401


def sequence_loader(world, *, mode="memory", temperature=1.0, **kwargs):
    data = load_data(str(world.data["train"]))
    rows = TeacherRows(open_store(world.store), LM_TEACHERS, temperature)
    options = dict(batch_size=7, seed=3, stream=MODES[mode], window_bytes=1, read_bytes=1)
    return data, SequenceLoader(data.tokens, data.offsets, teachers=rows, **{**options, **kwargs})


@pytest.mark.parametrize("mode", MODES)
def test_every_sequence_once_per_epoch_with_its_own_tokens_and_retempered_teachers(token_world, mode):
    data, loader = sequence_loader(token_world, mode=mode, temperature=2.0)
    store = open_store(token_world.store)
    batches = epoch_batches(loader, 1)
    seqs = torch.cat([b.seqs for b in batches])
    assert sorted(seqs.tolist()) == list(range(data.num_seqs))
    for batch in batches[:3]:
        for j, s in enumerate(batch.seqs.tolist()):
            lo, hi = int(data.offsets[s]), int(data.offsets[s + 1])
            n = hi - lo
            assert batch.attention_mask[j].tolist() == [True] * n + [False] * (batch.input_ids.shape[1] - n)
            assert batch.input_ids[j, :n].tolist() == data.tokens[lo:hi].tolist()
            assert batch.labels[j, : n - 1].tolist() == data.tokens[lo + 1 : hi].tolist()
            assert (batch.labels[j, n - 1 :] == -100).all()  # the last position and the padding
        # Teachers' rows at the real positions, in the order of input_ids[attention_mask].
        rows = np.concatenate([np.arange(data.offsets[s], data.offsets[s + 1]) for s in batch.seqs.tolist()])
        for k, name in enumerate(LM_TEACHERS):
            expected = store.read_topk(name, 0, store.num_rows, 2.0)
            assert torch.equal(batch.teachers["ids"][k], expected.ids[rows])
            assert torch.equal(batch.teachers["logprobs"][k], expected.logprobs[rows].float())
            torch.testing.assert_close(batch.teachers["label_logprob"][k], expected.label_logprob[rows], equal_nan=True,
                                       rtol=0, atol=0)  # NaN at each sequence's end


@pytest.mark.parametrize("mode", MODES)
def test_sequence_order_depends_only_on_seed_and_epoch_and_resumes_at_a_batch(token_world, mode):
    _, a = sequence_loader(token_world, mode=mode)
    _, b = sequence_loader(token_world, mode=mode)
    first, again = epoch_batches(a, 2), epoch_batches(b, 2)
    assert [x.seqs.tolist() for x in first] == [x.seqs.tolist() for x in again]
    assert [x.seqs.tolist() for x in epoch_batches(a, 3)] != [x.seqs.tolist() for x in first]
    _, other_seed = sequence_loader(token_world, mode=mode, seed=4)
    assert [x.seqs.tolist() for x in epoch_batches(other_seed, 2)] != [x.seqs.tolist() for x in first]
    _, fresh = sequence_loader(token_world, mode=mode)  # epoch 3 without the epochs before: the same order
    assert [x.seqs.tolist() for x in epoch_batches(fresh, 3)] == [x.seqs.tolist() for x in epoch_batches(a, 3)]
    rest = epoch_batches(b, 2, start=3)
    assert [x.seqs.tolist() for x in rest] == [x.seqs.tolist() for x in first[3:]]
    assert all(torch.equal(x.teachers["logprobs"], y.teachers["logprobs"]) for x, y in zip(rest, first[3:]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batches_of_disjoint_sequences(token_world, mode, world_size):
    shares = []
    for rank in range(world_size):
        data, loader = sequence_loader(token_world, mode=mode, rank=rank, world_size=world_size)
        batches = epoch_batches(loader, 0)
        assert len(batches) == loader.batches_per_epoch
        shares.append(torch.cat([x.seqs for x in batches]).tolist())
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == data.num_seqs // world_size
    flat = [s for share in shares for s in share]
    assert len(flat) == len(set(flat))


def test_streaming_and_memory_give_the_same_sequences_each_epoch(token_world):
    _, stream = sequence_loader(token_world, mode="stream")
    _, memory = sequence_loader(token_world, mode="memory")
    for epoch in (0, 1):
        a, b = epoch_batches(stream, epoch), epoch_batches(memory, epoch)
        assert sorted(torch.cat([x.seqs for x in a]).tolist()) == sorted(torch.cat([x.seqs for x in b]).tolist())
    assert [x.seqs.tolist() for x in epoch_batches(stream, 0)] != [x.seqs.tolist() for x in epoch_batches(memory, 0)]


# -- token inputs larger than memory ------------------------------------------------------------------


class RecordingTokens:
    """A corpus's tokens that are not in memory (as a mapped .npz or Parquet), recording every read."""

    resident = False

    def __init__(self, tokens):
        self.tokens, self.reads = tokens, []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.tokens[key]


def assert_same_token_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("seqs", "input_ids", "attention_mask", "labels"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert x.teachers.keys() == y.teachers.keys()
        for k in x.teachers:  # bit for bit; label_logprob is NaN at each sequence's end
            torch.testing.assert_close(x.teachers[k], y.teachers[k], rtol=0, atol=0, equal_nan=True)


def test_tokens_beyond_the_memory_budget_stream_in_windows_bit_for_bit(tmp_path):
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 40, int(rng.integers(1, 30))) for _ in range(500)]
    ids, mask = np.zeros((len(seqs), 29), np.int32), np.zeros((len(seqs), 29), np.int8)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask)
    data = load_data(str(tmp_path / "t.npz"))  # memory-mapped
    tokens = RecordingTokens(data.tokens)
    options = dict(batch_size=16, seed=4, read_bytes=64 * 8, window_bytes=1)  # units of 64 positions, windows of 8 units
    assert SequenceLoader(tokens, data.offsets, memory_budget=data.num_rows * 8, **options).mode == "memory"
    loader = SequenceLoader(tokens, data.offsets, memory_budget=data.num_rows * 8 - 1, **options)
    assert loader.mode == "stream" and loader.read_rows == 64
    in_memory = np.concatenate(seqs)  # the same tokens, held: the path before streaming
    held = SequenceLoader(in_memory, data.offsets, stream=True, **options)
    for epoch in (0, 1):
        tokens.reads.clear()
        assert_same_token_batches(epoch_batches(loader, epoch), epoch_batches(held, epoch))
        # Read a unit at a time (the sequences starting in its 64 positions), each position once an epoch.
        assert sum(hi - lo for lo, hi in tokens.reads) == data.num_rows
        assert max(hi - lo for lo, hi in tokens.reads) < 64 + 29 < data.num_rows / 40
    # The same sequences and tokens as in memory mode, which orders them otherwise.
    memory = SequenceLoader(in_memory, data.offsets, stream=False, **options)

    def contents(batches):
        return {int(s): b.input_ids[j][b.attention_mask[j]].tolist() for b in batches for j, s in enumerate(b.seqs)}

    assert contents(epoch_batches(loader, 2)) == contents(epoch_batches(memory, 2)) == {i: s.tolist() for i, s in enumerate(seqs)}


def test_a_streamed_store_streams_the_tokens_with_it(token_world):
    data = load_data(str(token_world.data["train"]))
    rows = TeacherRows(open_store(token_world.store), LM_TEACHERS, 2.0)
    tokens = RecordingTokens(data.tokens)
    held = data.num_rows * (rows.row_bytes + 8)  # the teachers' rows and the tokens
    options = dict(batch_size=7, seed=3, window_bytes=1, read_bytes=1)
    fits = SequenceLoader(tokens, data.offsets, teachers=rows, memory_budget=held, **options)
    loader = SequenceLoader(tokens, data.offsets, teachers=rows, memory_budget=held - 1, **options)
    assert (fits.mode, loader.mode) == ("memory", "stream")
    in_memory = SequenceLoader(data.tokens[:], data.offsets, teachers=rows, stream=True, **options)
    assert_same_token_batches(epoch_batches(loader, 1), epoch_batches(in_memory, 1))
    assert sum(hi - lo for lo, hi in tokens.reads) == data.num_rows
    assert max(hi - lo for lo, hi in tokens.reads) <= token_world.chunk_rows + 16  # a unit is one chunk


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=60), batch_size=st.integers(1, 12), world_size=st.integers(1, 3),
    read_rows=st.integers(1, 20), window_units=st.integers(1, 10), stream=st.booleans(), epoch=st.integers(0, 3),
    start=st.integers(0, 3),
)
def test_any_token_shape_splits_into_disjoint_equal_sequence_shares(lengths, batch_size, world_size, read_rows, window_units,
                                                                   stream, epoch, start):
    if len(lengths) < world_size:
        return
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(offsets[-1], dtype=np.int64) % 97  # position-dependent ids
    shares = []
    for rank in range(world_size):
        loader = SequenceLoader(RecordingTokens(tokens), offsets, batch_size=batch_size, seed=11, rank=rank,
                                world_size=world_size, stream=stream, read_bytes=read_rows * 8,
                                window_bytes=window_units * read_rows * 8)
        batches = epoch_batches(loader, epoch)
        assert len(batches) == loader.batches_per_epoch
        for b in batches:
            for j, s in enumerate(b.seqs.tolist()):
                assert b.input_ids[j][b.attention_mask[j]].tolist() == tokens[offsets[s] : offsets[s + 1]].tolist()
        resumed = epoch_batches(loader, epoch, start=min(start, loader.batches_per_epoch))
        assert [b.seqs.tolist() for b in resumed] == [b.seqs.tolist() for b in batches[min(start, len(batches)):]]
        shares.append(torch.cat([b.seqs for b in batches]).tolist())
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(lengths) // world_size
    every = [s for share in shares for s in share]
    assert len(set(every)) == len(every)
