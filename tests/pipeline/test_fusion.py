"""The fusions that select (SPEC v3 "Fusion"): their weights against a float64 statement of the SPEC's
formulas on random stores (dense and top-k, unlabelled rows, sequences of different lengths, a
non-uniform prior, tau != 1), `best` picking a teacher's exact target, the sequence scope, the
fallback counts in config.json, the refusals, and tiny `mtkd train` runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtkd.kernels import fused_kd_loss, fused_sparse_kd_loss
from mtkd.pipeline.cli import app
from mtkd.pipeline.data import make_row_data, make_token_data
from mtkd.pipeline.infer import write_logits_block
from mtkd.pipeline.layouts import Dense, TopK
from mtkd.pipeline.loader import SequenceLoader, TeacherRows
from mtkd.pipeline.objective import Objective
from mtkd.pipeline.report import StatsSums
from mtkd.pipeline.store import create_store, open_store

from .token_world import token_world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

K, V = 3, 9
NAMES = ("a", "b", "c")
PI = np.array([3.0, 1.0, 0.5])
TAU = 0.7
SELECTING = ("posterior", "best", "entropy")


# -- random stores ------------------------------------------------------------------------------------


def random_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """(K, n, V) float32 logits of different sharpness per teacher and row."""
    scale = rng.uniform(0.3, 4.0, size=(K, n, 1))
    return (rng.standard_normal((K, n, V)) * scale).astype(np.float32)


def write_teachers(store, z: np.ndarray, layout) -> None:
    labels = torch.from_numpy(store.labels())
    for k, name in enumerate(NAMES):
        store.add_teacher(name, spec={"name": name}, weights_sha256=None, layout=layout, stats_width=StatsSums.width(layout))
        for block in range(store.num_blocks):
            start, stop = store.block_range(block)
            write_logits_block(store, name, block, torch.from_numpy(z[k, start:stop]), labels[start:stop])
        store.mark_complete(name, {})


def layout_of(kind: str, entropy: bool = True):
    return Dense("float32", V, entropy=entropy) if kind == "dense" else TopK("float32", V, 4, (1.0, 2.0), entropy=entropy)


def token_store(root: Path, kind: str, *, seed: int = 0, entropy: bool = True):
    """Sequences of lengths 1..7 (a 1-token sequence has no labelled position), K random teachers."""
    rng = np.random.default_rng(seed)
    lengths = [1, 5, 2, 7, 3, 1, 6, 4]
    data = make_token_data(f"fusion-test-{seed}", [rng.integers(0, V, n) for n in lengths])
    store, _ = create_store(root / f"{kind}.zarr", data=data, num_classes=V, chunk_rows=8)
    z = random_logits(rng, data.num_rows)
    write_teachers(store, z, layout_of(kind, entropy))
    return open_store(store.path), data, z


def row_store(root: Path, *, entropy: bool = True, seed: int = 1, n: int = 40):
    """Rows with every third unlabelled; x and y saved as root/rows.npz (its data spec)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    y = rng.integers(0, V, n)
    y[::3] = -100
    spec = str(root / "rows.npz")
    np.savez(spec, x=x, y=y)
    data = make_row_data(spec, x, y)
    store, _ = create_store(root / "rows.zarr", data=data, num_classes=V, chunk_rows=16)
    z = random_logits(rng, n)
    write_teachers(store, z, layout_of("dense", entropy))
    return open_store(store.path), data, z


# -- the SPEC's formulas in float64 numpy, written out independently ----------------------------------


def reference_weights(fusion: str, z: np.ndarray, labels: np.ndarray, pi: np.ndarray, tau: float,
                      sequences: list[range] | None = None) -> np.ndarray:
    """(N, K) float64 weights of SPEC v3 "Fusion" from (K, N, V) logits."""
    z = z.astype(np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    entropy = -(np.exp(logp) * logp).sum(-1).T  # (N, K)
    labelled = labels != -100
    score = np.zeros((len(labels), K))
    for n in np.flatnonzero(labelled):
        score[n] = logp[:, n, labels[n]]
    if sequences is not None:  # each position takes its sequence's sums over its labelled positions
        score_s, entropy_s, labelled_s = score.copy(), entropy.copy(), labelled.copy()
        for seq in sequences:
            rows = [n for n in seq if labelled[n]] or list(seq)  # no labelled position: all of them (for H)
            for n in seq:
                score_s[n] = score[[r for r in seq if labelled[r]]].sum(0)
                entropy_s[n] = entropy[rows].sum(0)
                labelled_s[n] = any(labelled[r] for r in seq)
        score, entropy, labelled = score_s, entropy_s, labelled_s
    prior = pi / pi.sum()

    def normalised(logw):
        w = np.exp(logw - logw.max())
        return w / w.sum()

    out = np.zeros((len(labels), K))
    for n in range(len(labels)):
        by_entropy = normalised(np.log(prior) - entropy[n] / tau)  # pi_k exp(-H_nk / tau), normalised
        if fusion == "entropy" or not labelled[n]:
            out[n] = by_entropy
        elif fusion == "posterior":
            out[n] = normalised(np.log(prior) + score[n] / tau)  # pi_k exp(score_nk / tau), normalised
        else:  # best: the highest pi_k exp(score_nk / tau), the first on ties
            out[n, int(np.argmax(np.log(prior) + score[n] / tau))] = 1.0
    return out


def objective(fusion: str, *, scope: str = "row", pi=PI, tau=TAU, temperature: float = 1.0) -> Objective:
    prior = None if pi is None else torch.tensor(pi, dtype=torch.float32)
    return Objective(distil=True, fusion=fusion, weights=prior, temperature=temperature, alpha=1.0, loss="kl",
                     fusion_temperature=tau, fusion_scope=scope)


def assert_weights(got: torch.Tensor, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double().sum(1), torch.ones(len(expected), dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.double(), torch.from_numpy(expected), rtol=1e-4, atol=2e-5)


# -- weights against the formulas ---------------------------------------------------------------------


@pytest.mark.parametrize("fusion", SELECTING)
@pytest.mark.parametrize("kind", ["dense", "topk"])
@pytest.mark.parametrize("scope", ["row", "sequence"])
def test_token_weights_equal_the_float64_formula(tmp_path, fusion, kind, scope):
    store, data, z = token_store(tmp_path, kind)
    labels = data.labels  # the next token; -100 at each sequence's end (and the whole of a 1-token one)
    rows = TeacherRows(store, NAMES, 1.0, entropy=True).read(0, data.num_rows)  # (K, N, ...)
    segments = torch.from_numpy(np.repeat(np.arange(data.num_seqs), np.diff(data.offsets)))
    obj = objective(fusion, scope=scope)
    y = torch.from_numpy(labels)
    if kind == "dense":
        _, w = obj.target(rows["logits"], y, rows["entropy"], segments if scope == "sequence" else None)
    else:
        _, _, w = obj.sparse_target(rows, y, segments if scope == "sequence" else None)
    sequences = [range(a, b) for a, b in zip(data.offsets[:-1], data.offsets[1:])] if scope == "sequence" else None
    assert_weights(w, reference_weights(fusion, z, labels, PI, TAU, sequences))
    if scope == "sequence":  # every position of a sequence takes its sequence's weights
        for seq in sequences:
            assert (w[list(seq)] == w[seq.start]).all()


@pytest.mark.parametrize("fusion", SELECTING)
def test_row_weights_equal_the_float64_formula_and_unlabelled_rows_take_entropy_weights(tmp_path, fusion):
    store, data, z = row_store(tmp_path)
    logits = torch.stack([store.read_logits(t, 0, store.num_rows) for t in NAMES])
    entropy = torch.stack([store.read_entropy(t, 0, store.num_rows) for t in NAMES])
    _, w = objective(fusion).target(logits, torch.from_numpy(data.labels), entropy)
    assert_weights(w, reference_weights(fusion, z, data.labels, PI, TAU))


@pytest.mark.parametrize("fusion", ["posterior", "best"])
def test_without_stored_entropies_unlabelled_rows_take_the_prior(tmp_path, fusion):
    store, data, z = row_store(tmp_path, entropy=False)
    logits = torch.stack([store.read_logits(t, 0, store.num_rows) for t in NAMES])
    _, w = objective(fusion).target(logits, torch.from_numpy(data.labels))
    unlabelled = data.labels == -100
    torch.testing.assert_close(w[unlabelled].double(), torch.from_numpy(np.tile(PI / PI.sum(), (unlabelled.sum(), 1))))
    labelled = reference_weights(fusion, z, data.labels, PI, TAU)[~unlabelled]
    assert_weights(w[~unlabelled], labelled)


def test_stored_entropy_is_the_exact_entropy_of_the_float32_logits(tmp_path):
    for kind in ("dense", "topk"):
        store, data, z = token_store(tmp_path / kind, kind)
        z64 = z.astype(np.float64)
        p = np.exp(z64 - z64.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        expected = -(p * np.log(p)).sum(-1)  # (K, N)
        for k, name in enumerate(NAMES):
            got = store.read_entropy(name, 0, store.num_rows)
            assert got.dtype == torch.float32
            np.testing.assert_allclose(got.numpy(), expected[k], rtol=1e-5, atol=1e-5)


def test_a_uniform_prior_and_a_large_tau_tend_to_the_mean(tmp_path):
    store, data, z = row_store(tmp_path)
    logits = torch.stack([store.read_logits(t, 0, store.num_rows) for t in NAMES])
    _, w = objective("posterior", pi=None, tau=1e6).target(logits, torch.from_numpy(data.labels))
    torch.testing.assert_close(w, torch.full_like(w, 1 / K), rtol=0, atol=1e-5)


# -- best picks a teacher's exact target ---------------------------------------------------------------


def test_best_gives_exactly_the_target_of_the_teacher_that_is_the_labels_only_source():
    torch.manual_seed(0)
    n, v = 16, 7
    y = torch.randint(0, v, (n,))
    expert = torch.randn(n, v)
    expert[torch.arange(n), y] += 6.0  # the only teacher that puts mass on the label
    other = torch.randn(n, v)
    other[torch.arange(n), y] = -30.0
    order = torch.arange(n) % 2 == 0  # the expert is teacher 0 on even rows, teacher 1 on odd ones
    z = torch.stack([torch.where(order[:, None], expert, other), torch.where(order[:, None], other, expert)])
    s = torch.randn(n, v)
    obj = objective("best", pi=None, tau=1.0, temperature=2.0)
    _, w = obj.target(z, y)
    assert torch.equal(w, torch.stack([order, ~order], 1).float())
    fused = obj.dense(s, z, y)
    alone = fused_kd_loss(s, expert[None], temperature=2.0, fusion="prob", reduction="mean")
    torch.testing.assert_close(fused, alone, rtol=1e-6, atol=0)
    # sparse: the other teacher does not even list the label
    lp_e, lp_o = torch.log_softmax(expert, -1), torch.log_softmax(other, -1)
    ids_e, ids_o = lp_e.topk(3, -1).indices, lp_o.topk(3, -1).indices
    teachers = {
        "ids": torch.stack([torch.where(order[:, None], ids_e, ids_o), torch.where(order[:, None], ids_o, ids_e)]),
        "label_logprob": torch.stack([torch.where(order, lp_e[torch.arange(n), y], lp_o[torch.arange(n), y]),
                                      torch.where(order, lp_o[torch.arange(n), y], lp_e[torch.arange(n), y])]),
    }
    teachers["logprobs"] = torch.stack([torch.where(order[:, None], lp_e.gather(1, ids_e), lp_o.gather(1, ids_o)),
                                        torch.where(order[:, None], lp_o.gather(1, ids_o), lp_e.gather(1, ids_e))])
    _, _, w = obj.sparse_target(teachers, y)
    assert torch.equal(w, torch.stack([order, ~order], 1).float())
    fused = fused_sparse_kd_loss(s, teachers["ids"], teachers["logprobs"], temperature=1.0, weights=w)
    alone = fused_sparse_kd_loss(s, ids_e[None], lp_e.gather(1, ids_e)[None], temperature=1.0)
    torch.testing.assert_close(fused, alone, rtol=1e-6, atol=0)


def test_best_breaks_ties_to_the_lowest_teacher():
    z = torch.zeros(3, 4, 5)  # every teacher alike: equal scores on every row
    _, w = objective("best", pi=None).target(z, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(w, torch.tensor([[1.0, 0, 0]] * 4))


@pytest.mark.parametrize("stream", [False, True])
def test_sequence_scope_follows_the_loader_batches_position_order(tmp_path, stream):
    store, data, z = token_store(tmp_path, "topk")
    loader = SequenceLoader(data.tokens, data.offsets, batch_size=3, seed=0, stream=stream, read_bytes=1,
                            teachers=TeacherRows(store, NAMES, 1.0, entropy=True))
    assert loader.mode == ("stream" if stream else "memory")
    for batch in loader.epoch(0):
        segments = batch.position_seqs  # (P,): batch row of each real position
        assert torch.equal(segments, torch.repeat_interleave(torch.arange(len(batch)), batch.attention_mask.sum(1)))
        labels = batch.labels[batch.attention_mask]
        _, _, w = objective("posterior", scope="sequence").sparse_target(batch.teachers, labels, segments)
        # The global rows of the batch's positions: the same weights as over the whole store.
        rows = np.concatenate([np.arange(data.offsets[s], data.offsets[s + 1]) for s in batch.seqs.tolist()])
        sequences = [range(a, b) for a, b in zip(data.offsets[:-1], data.offsets[1:])]
        expected = reference_weights("posterior", z, data.labels, PI, TAU, sequences)[rows]
        assert_weights(w, expected)


# -- stage two: config.json, refusals, end to end -------------------------------------------------------


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def row_student(root: Path) -> Path:
    path = root / "student.toml"
    path.write_text(f'[student]\nname = "mlp"\nfactory = "mtkd.pipeline.models:mlp"\n'
                    f"kwargs = {{ in_features = 4, hidden = [8], num_classes = {V} }}\n")
    return path


@pytest.mark.parametrize("fusion", SELECTING)
def test_mtkd_train_selects_on_rows_and_counts_the_fallback_rows(tmp_path, fusion):
    store, data, _ = row_store(tmp_path)
    out = tmp_path / "run"
    result = invoke("train", "--student", row_student(tmp_path), "--data", tmp_path / "rows.npz", "--store", store.path,
                    "--out", out, "--fusion", fusion, "--teacher-weights", "a=3,b=1,c=0.5", "--fusion-temperature", "0.7",
                    "--alpha", "0.5", "--epochs", "2", "--batch-size", "8", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["fusion"] == fusion and config["fusion_temperature"] == 0.7 and config["fusion_scope"] == "row"
    assert config["teacher_weights"] == {"a": 3.0, "b": 1.0, "c": 0.5}
    assert "--fusion-temperature 0.7 --fusion-scope row" in config["command"]
    unlabelled = int((data.labels == -100).sum())
    if fusion == "entropy":
        assert "fusion_fallback" not in config
    else:
        assert config["fusion_fallback"] == {"entropy": unlabelled, "prior": 0}
    assert math.isfinite(json.loads(result.stdout.strip().splitlines()[-1])["last"]["loss"])


def test_without_stored_entropies_the_fallback_rows_take_the_prior(tmp_path):
    store, data, _ = row_store(tmp_path, entropy=False)
    out = tmp_path / "run"
    result = invoke("train", "--student", row_student(tmp_path), "--data", tmp_path / "rows.npz", "--store", store.path,
                    "--out", out, "--fusion", "posterior", "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["fusion_fallback"] == {"entropy": 0, "prior": int((data.labels == -100).sum())}


@pytest.mark.parametrize("fusion", SELECTING)
@pytest.mark.parametrize("scope", ["row", "sequence"])
def test_mtkd_train_selects_on_tokens(token_world, tmp_path, fusion, scope):  # noqa: F811
    out = tmp_path / "run"
    result = invoke("train", "--student", token_world.student, "--data", token_world.data["train"], "--store",
                    token_world.store, "--out", out, "--fusion", fusion, "--fusion-scope", scope, "--temperature", "2",
                    "--alpha", "0.8", "--epochs", "1", "--batch-size", "16", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["fusion_scope"] == scope and config["loss_function"] == "fused_linear_sparse_kd_loss"
    if fusion != "entropy":
        offsets = np.load(token_world.data["train"])["attention_mask"].sum(1)
        # row: each sequence's last position; sequence: none (every sequence has >= 3 tokens)
        expected = int(len(offsets)) if scope == "row" else 0
        assert config["fusion_fallback"] == {"entropy": expected, "prior": 0}
    assert math.isfinite(json.loads(result.stdout.strip().splitlines()[-1])["last"]["loss"])


def test_fallback_counts_with_sequence_scope_are_the_positions_of_sequences_without_a_label(tmp_path):
    from mtkd.pipeline.config import FusionScope
    from mtkd.pipeline.fusion import fallback_rows

    _, data, _ = token_store(tmp_path, "topk")
    assert fallback_rows(data.labels, data.offsets, FusionScope.ROW) == data.num_seqs  # each sequence's last position
    assert fallback_rows(data.labels, data.offsets, FusionScope.SEQUENCE) == 2  # the two 1-token sequences


def test_refusals_exit_2_with_one_line_naming_what_is_missing(tmp_path, token_world):  # noqa: F811
    old, _, _ = row_store(tmp_path / "old", entropy=False)
    student = row_student(tmp_path)
    base = ("train", "--student", student, "--data", tmp_path / "old" / "rows.npz", "--store", old.path, "--epochs", "1")
    cases = {
        "no entropies": ((*base, "--fusion", "entropy"), ["--fusion entropy", "store no entropies", "mtkd infer"]),
        "rows have no sequences": ((*base, "--fusion", "best", "--fusion-scope", "sequence"), ["--fusion-scope sequence", "rows"]),
        "tau": ((*base, "--fusion", "posterior", "--fusion-temperature", "0"), ["--fusion-temperature must be > 0"]),
        "scope without a selecting fusion": ((*base, "--fusion-scope", "sequence"), ["--fusion-scope needs --fusion posterior"]),
        "tau without a selecting fusion": ((*base, "--fusion", "confidence", "--fusion-temperature", "2"), ["--fusion-temperature needs"]),
        "prior for confidence": ((*base, "--fusion", "confidence", "--teacher-weights", "a=1,b=1,c=1"), ["--teacher-weights needs"]),
    }
    for what, (args, words) in cases.items():
        out = tmp_path / what.replace(" ", "-")
        result = invoke(*args, "--out", out)
        assert result.exit_code == 2, (what, result.output)
        message = result.output.strip()
        assert len(message.splitlines()) == 1 and all(w in message for w in words), (what, message)
        assert not out.exists(), what
