"""Token data with its own `labels` (Hugging Face's convention, SPEC v3): position t's label is
labels[t + 1], and -100 (a chat prompt) means not trained on: stored unlabelled, and in stage two's
loss worth nothing, neither CE nor KD, as padding.

The "chat" data here is token_world's sequences with a prompt of a few tokens at each start whose
labels are -100; the same tokens without `labels` are the reference: the stores must agree on every
teacher array, and the masked data's loss must be the loss of the completion positions alone.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from mtkd.kernels.reference import kd_sparse_loss_ref
from mtkd.pipeline.cli import app
from mtkd.pipeline.config import TrainConfig
from mtkd.pipeline.data import IGNORE_LABEL, load_data
from mtkd.pipeline.errors import SpecError
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.loader import SequenceLoader, TeacherRows
from mtkd.pipeline.store import open_store
from mtkd.pipeline.train import Objective
from tests.pipeline.token_world import token_world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat(token_world, tmp_path_factory):  # noqa: F811
    """(masked .npz, plain .npz, their stores, the completion mask (num_rows,) of each position's label)."""
    root = tmp_path_factory.mktemp("chat")
    with np.load(token_world.data["train"]) as f:
        ids, mask = f["input_ids"], f["attention_mask"]
    labels = np.where(mask == 1, ids, IGNORE_LABEL)
    prompt = 1 + np.arange(len(ids)) % 3  # prompts of 1-3 tokens
    labels[np.arange(ids.shape[1])[None, :] < prompt[:, None]] = IGNORE_LABEL
    masked, plain = root / "masked.npz", root / "plain.npz"
    np.savez(masked, input_ids=ids, attention_mask=mask, labels=labels)
    np.savez(plain, input_ids=ids, attention_mask=mask)
    stores = {}
    for name, path in (("masked", masked), ("plain", plain)):
        stores[name] = root / f"{name}.zarr"
        run_infer(token_world.teachers, str(path), stores[name], top_k=8, temperatures="1,2", device="cpu", chunk_rows=32)
    # Which positions have a completion label: labels[t + 1] != -100 within the sequence.
    lengths = mask.sum(1)
    completion = np.concatenate([np.append(labels[i, 1 : lengths[i]] != IGNORE_LABEL, False) for i in range(len(ids))])
    return {"masked": masked, "plain": plain, "stores": stores, "completion": completion, "ids": ids, "mask": mask,
            "labels": labels, "root": root}


def test_labels_shift_by_one_and_mask_the_prompt(chat):
    data, plain = load_data(str(chat["masked"])), load_data(str(chat["plain"]))
    assert data.masks_unlabelled and not plain.masks_unlabelled
    keep = chat["completion"]
    assert np.array_equal(data.labels[keep], plain.labels[keep])  # a completion's label is the next token
    assert (data.labels[~keep] == IGNORE_LABEL).all() and data.labelled_rows == int(keep.sum()) < plain.labelled_rows
    assert data.fingerprint != plain.fingerprint  # a store of the plain data is not one of the masked data


def test_the_stores_agree_but_for_the_prompts_labels(chat):
    masked, plain = (open_store(chat["stores"][k]) for k in ("masked", "plain"))
    keep = chat["completion"]
    assert np.array_equal(masked.labels()[keep], plain.labels()[keep]) and (masked.labels()[~keep] == IGNORE_LABEL).all()
    for name in masked.teachers:
        a, b = masked.read_topk(name, 0, masked.num_rows), plain.read_topk(name, 0, plain.num_rows)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)  # the teachers saw the same tokens
        assert torch.equal(a.label_logprob[torch.from_numpy(keep)], b.label_logprob[torch.from_numpy(keep)])
        assert torch.isnan(a.label_logprob[torch.from_numpy(~keep)]).all()
        # inspect's numbers on the masked store are those of the completions alone
        nll = -float(b.label_logprob.double()[torch.from_numpy(keep)].mean())
        assert masked.teacher(name).stats["nll"] == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_the_loss_is_the_completions_loss_alone(chat, alpha):
    data = load_data(str(chat["masked"]))
    store = open_store(chat["stores"]["masked"])
    teachers = TeacherRows(store, store.teachers, temperature=1.0)
    loader = SequenceLoader(data.tokens, data.offsets, teachers=teachers, labels=data.given_labels, batch_size=16, seed=0)
    batch = next(iter(loader.epoch(0)))
    labels = batch.labels[batch.attention_mask]  # (P,)
    trained = labels != IGNORE_LABEL
    assert 0 < int(trained.sum()) < len(labels)
    torch.manual_seed(0)
    out = (3 * torch.randn(len(labels), 40, dtype=torch.float64)).requires_grad_()
    objective = Objective.from_config(TrainConfig(student="s.toml", data="d", out="o", store="s.zarr", temperature=1.0,
                                                  alpha=alpha), torch.device("cpu"))
    loss = objective.tokens(out, None, batch.teachers, labels, mask=trained)
    loss.backward()
    # The reference on the completion positions alone: the prompts' rows never reach it.
    keep = trained
    alone = out.detach()[keep].clone().requires_grad_()
    ref = kd_sparse_loss_ref(alone, batch.teachers["ids"][:, keep], batch.teachers["logprobs"][:, keep], temperature=1.0,
                             labels=labels[keep] if alpha < 1 else None, alpha=alpha)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.grad[keep], alone.grad, rtol=1e-10, atol=1e-12)
    assert (out.grad[~keep] == 0).all()  # a prompt position moves nothing


def test_train_and_eval_count_the_completions_only(chat, token_world, tmp_path):  # noqa: F811
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, [str(a) for a in (
        "train", "--student", token_world.student, "--data", chat["masked"], "--store", chat["stores"]["masked"],
        "--out", run, "--max-steps", 2, "--batch-size", 16, "--alpha", 0.8, "--temperature", 1, "--quiet", "--json")])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["labelled_rows"] == int(chat["completion"].sum())
    ev = runner.invoke(app, ["eval", str(run), "--data", str(chat["masked"]), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout.strip().splitlines()[-1])["n"] == int(chat["completion"].sum())


def test_a_folder_of_parquet_shards_is_one_data_set(chat, tmp_path):
    ids, mask, labels = chat["ids"], chat["mask"], chat["labels"]
    lengths = mask.sum(1)
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard, rows in enumerate((range(0, 25), range(25, len(ids)))):
        table = pa.table({"input_ids": [ids[i, : lengths[i]].tolist() for i in rows],
                          "labels": [labels[i, : lengths[i]].tolist() for i in rows]})
        pq.write_table(table, folder / f"train-{shard:05d}-of-00002.parquet", row_group_size=7)
    shards, npz = load_data(str(folder)), load_data(str(chat["masked"]))
    assert shards.fingerprint == npz.fingerprint and np.array_equal(shards.labels, npz.labels)
    assert np.array_equal(np.asarray(shards.tokens), np.asarray(npz.tokens))


def test_refuses_labels_that_do_not_fit(chat, tmp_path):
    ids, mask = chat["ids"], chat["mask"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=ids, attention_mask=mask, labels=np.full_like(ids, -5))
    with pytest.raises(SpecError, match="labels of sequence 0 hold -5"):
        load_data(str(bad))
    np.savez(bad, input_ids=ids, attention_mask=mask, labels=ids[:, :-1])
    with pytest.raises(SpecError, match="labels must be an integer array of input_ids' shape"):
        load_data(str(bad))


def test_streamed_and_in_memory_batches_carry_the_same_labels(chat):
    data = load_data(str(chat["masked"]))
    store = open_store(chat["stores"]["masked"])
    teachers = TeacherRows(store, store.teachers, temperature=1.0)
    loaders = [SequenceLoader(data.tokens, data.offsets, teachers=teachers, labels=data.given_labels, batch_size=8, seed=3,
                              stream=stream, window_bytes=1 << 12, read_bytes=1 << 10) for stream in (False, True)]
    assert [loader.mode for loader in loaders] == ["memory", "stream"]
    labels, tokens = torch.from_numpy(data.labels), torch.from_numpy(np.asarray(data.tokens))
    for loader in loaders:  # (the two modes order the sequences differently; each batch must hold its own)
        batches = list(loader.epoch(0))
        assert sorted(s for b in batches for s in b.seqs.tolist()) == list(range(data.num_seqs))
        for b in batches:
            rows = torch.from_numpy(np.concatenate([np.arange(data.offsets[s], data.offsets[s + 1]) for s in b.seqs.tolist()]))
            assert torch.equal(b.input_ids[b.attention_mask], tokens[rows])
            assert torch.equal(b.labels[b.attention_mask], labels[rows])  # the labels stage one stored
