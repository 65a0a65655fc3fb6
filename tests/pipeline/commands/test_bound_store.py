"""Issue 16 through the real CLI on a token store: intact chunks in the wrong place, attributes that
contradict the records, damaged labels/offsets and a deleted chunk are refused by every reader
(exit 2, one line naming teacher, array and block), and `verify --repair` plus the same `mtkd infer`
give back the very bytes of the undamaged store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.conftest import snapshot
from tests.pipeline.token_world import token_world  # noqa: F401 - the fixture

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def world(token_world, tmp_path):  # noqa: F811
    """A copy of the token world's store (3 top-k teachers, k 8, T 1 and 2), its rerun and a copy of other data's."""
    store = tmp_path / "store.zarr"
    shutil.copytree(token_world.store, store)
    infer_args = ["infer", "--teachers", token_world.teachers, "--data", token_world.data["train"], "--out", store,
                  "--top-k", token_world.top_k, "--temperatures", "1,2", "--chunk-rows", token_world.chunk_rows,
                  "--device", "cpu", "--quiet"]
    # Other data of the same shape: the training sequences in reverse order (other labels, other rows per block).
    data = np.load(token_world.data["train"])
    np.savez(tmp_path / "other.npz", input_ids=data["input_ids"][::-1], attention_mask=data["attention_mask"][::-1])
    other = tmp_path / "other.zarr"
    assert invoke(*[other if a == store else tmp_path / "other.npz" if a == token_world.data["train"] else a
                    for a in infer_args]).exit_code == 0
    return store, other, infer_args, snapshot(store), token_world


def _chunk(store: Path, teacher: str, array: str, block: int) -> Path:
    folder = store / "teachers" / teacher / array / "c" / str(block)
    return folder if folder.is_file() else folder / "0"


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _edit(store: Path, teacher: str, **attrs) -> None:
    path = store / "teachers" / teacher / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"].update(attrs)
    path.write_text(json.dumps(meta))


def _train(world, *extra):
    store, _, _, _, w = world
    return invoke("train", "--student", w.student, "--data", w.data["train"], "--store", store, "--out",
                  store.parent / "run", "--max-steps", 1, "--batch-size", 8, "--device", "cpu", "--quiet", *extra)


def _refused(result, *named):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for word in named:
        assert word in line, line


def _repaired_and_rerun(world):
    store, _, infer_args, before, _ = world
    invoke("verify", store, "--repair", "--quiet")  # exit 2 when it found (and repaired) damage, 0 once repaired
    assert invoke(*infer_args).exit_code == 0
    assert invoke("verify", store, "--quiet").exit_code == 0
    assert snapshot(store) == before


# -- item 3: chunks bound to their place ----------------------------------------------------------------


def test_a_chunk_copied_from_a_store_of_other_data_is_refused_and_repaired(world):
    store, other, *_ = world
    shutil.copyfile(_chunk(other, "g1", "topk_ids", 1), _chunk(store, "g1", "topk_ids", 1))
    found = invoke("verify", store, "--json", "--quiet")
    assert found.exit_code == 2
    damage = [f for f in json.loads(found.stdout.strip().splitlines()[-1])["findings"] if f["damage"]]
    assert [(f["kind"], f["teacher"], f["block"], f["array"]) for f in damage] == [("misplaced", "g1", 1, "topk_ids")]
    _refused(_train(world), "'g1'", "block 1", "topk_ids")
    _refused(invoke("inspect", store, "--quiet"), "'g1'", "block 1", "topk_ids")
    _repaired_and_rerun(world)


def test_a_whole_block_copied_from_a_store_of_other_data_is_refused_and_repaired(world):
    store, other, *_ = world
    for array in ("topk_ids", "topk_logprobs", "lse", "label_logprob", "block_stats"):
        shutil.copyfile(_chunk(other, "g2", array, 0), _chunk(store, "g2", array, 0))
    shutil.copyfile(other / "teachers/g2/done/c/0", store / "teachers/g2/done/c/0")  # its record too
    assert invoke("verify", store, "--quiet").exit_code == 2
    _refused(_train(world), "'g2'", "block 0", "other data")
    _repaired_and_rerun(world)


def test_two_chunks_swapped_between_blocks_are_refused_and_repaired(world):
    store, *_ = world
    _swap(_chunk(store, "g3", "topk_logprobs", 0), _chunk(store, "g3", "topk_logprobs", 2))
    assert invoke("verify", store, "--quiet").exit_code == 2
    _refused(_train(world), "'g3'", "block 0", "topk_logprobs")
    _repaired_and_rerun(world)


def test_labels_copied_from_other_data_are_refused_and_rewritten_by_infer(world):
    store, other, *_ = world
    shutil.copyfile(other / "labels/c/0", store / "labels/c/0")
    assert invoke("verify", store, "--quiet").exit_code == 2
    _refused(_train(world), "labels of block 0")
    _refused(invoke("inspect", store, "--quiet"), "labels of block 0")
    _repaired_and_rerun(world)


# -- item 4: one structural check at open -------------------------------------------------------------


@pytest.mark.parametrize(("attr", "value"), [("vocab_size", 20), ("top_k", 4), ("temperatures", [1.0, 3.0])])
def test_an_edited_layout_attribute_is_refused_at_open_and_restored_from_the_records(world, attr, value):
    store, *_ = world
    _edit(store, "g1", **{attr: value})
    extra = ("-T", "3") if attr == "temperatures" else ()
    _refused(_train(world, *extra), "'g1'", attr, "verify")
    _refused(invoke("inspect", store, "--quiet"), "'g1'", attr)
    repair = invoke("verify", store, "--repair", "--quiet")
    assert repair.exit_code == 2 and f"attribute set to {{'{attr}'" in repair.stdout
    assert "dropped" not in repair.stdout  # item 6: no good block is dropped, the attribute is restored
    _repaired_and_rerun(world)


def test_a_teachers_arrays_swapped_between_two_blocks_are_refused(world):
    store, *_ = world
    for array in ("topk_ids", "topk_logprobs", "lse", "label_logprob", "block_stats"):
        _swap(_chunk(store, "g2", array, 1), _chunk(store, "g2", array, 3))
    assert invoke("verify", store, "--quiet").exit_code == 2
    assert _train(world).exit_code == 2
    _repaired_and_rerun(world)


# -- item 5: damaged labels or offsets, a deleted chunk ------------------------------------------------


@pytest.mark.parametrize("array", ["labels", "sequences/offsets"])
def test_a_damaged_labels_or_offsets_chunk_is_named_and_rewritten_by_infer(world, array):
    store, *_ = world
    chunk = store / array / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x08
    chunk.write_bytes(bytes(raw))
    found = invoke("verify", store, "--quiet")
    _refused(found, "1 problems")
    assert f"{array} chunk 0" in found.stdout
    _refused(invoke("inspect", store, "--quiet"), f"{array} chunk 0")
    _refused(_train(world), f"{array} chunk 0")
    _repaired_and_rerun(world)


def test_a_deleted_topk_ids_chunk_of_a_recorded_block_is_refused_by_every_reader(world):
    store, *_ = world
    _chunk(store, "g3", "topk_ids", 1).unlink()
    assert invoke("verify", store, "--quiet").exit_code == 2
    _refused(_train(world), "'g3'", "block 1", "topk_ids", "missing")
    _refused(invoke("inspect", store, "--quiet"), "'g3'", "block 1", "topk_ids", "missing")
    _repaired_and_rerun(world)
