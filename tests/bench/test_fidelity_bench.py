"""bench/fidelity.py end to end at a toy size (V = 300, a few steps): the real pipeline from corpus
to students, and the k = V control agreeing with the dense store."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fidelity.py"
TOY = ["--max-bytes", "40000", "--vocab", "300", "--window", "32", "--teacher-steps", "2", "--student-steps", "2",
       "--batch-size", "4", "--top-k", "8", "--sampled", "4+4,0+8", "--alphas", "1", "--control-students", "--device", "cpu"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mtkd_bench_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_toy_run_stores_agree_and_the_control_trains_like_dense(bench, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "fidelity.json"
    result = bench.main([*TOY, "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    vocab = result["corpus"]["vocab_size"]
    assert vocab == 300
    control = f"k{vocab}"

    # Stage one wrote the same teacher into every store: top-k values are the dense logits' own.
    checks = result["store_checks"]
    assert set(checks) == {"k8", control, "k4+s4", "s8"}
    for key, row in checks.items():
        if key == "s8":  # no head: only drawn ids, whose log-probabilities are the dense logits' own
            assert row["label_in_topk"] == {n: 0.0 for n in row["label_in_topk"]}
        assert row["logprob_max_abs_err"] < 1e-2 and row["lse_max_abs_err"] < 1e-2  # 16-bit stores
        assert row["topk_id_agreement"] > 0.95  # ties among 16-bit dense logits may swap the k-th id
    assert all(m < 1e-5 for m in checks[control]["tail_mass"]["T=1"].values())
    assert all(0 < m < 1 for m in checks["k8"]["tail_mass"]["T=1"].values())
    assert all(f == 1.0 for f in checks[control]["label_in_topk"].values())
    assert all(0 < f < 1 for f in checks["k8"]["label_in_topk"].values())

    # The fused-linear sparse loss at k = V is the dense loss and gradient; at k = 8 the tail bucket drops mass.
    grads = result["gradient_check"]["T=1"]
    (g,) = grads[control].values()
    assert g["loss"] == pytest.approx(g["dense_loss"], rel=1e-3)
    assert g["grad_cosine"] > 0.9999 and g["grad_rel_err"] < 1e-2
    (g8,) = grads["k8"].values()
    assert g8["loss"] < g8["dense_loss"] and g8["grad_cosine"] < g["grad_cosine"]

    # One student per store and the hard-label one, the same steps, through the path stage two takes.
    runs = {r["store"]: r for r in result["runs"]}
    assert set(runs) == {"hard", "dense", "k8", control, "k4+s4", "s8"}
    assert {r["steps"] for r in runs.values()} == {2} and not any(r["reused"] for r in runs.values())
    assert runs["hard"]["loss_function"] == "cross_entropy"
    assert runs["dense"]["loss_function"] == "fused_kd_loss"
    assert runs["k8"]["loss_function"] == runs[control]["loss_function"] == "fused_sparse_kd_loss"  # --student-head logits
    cell = result["summary"]["alpha=1,T=1"]
    assert cell["dense"]["vs_dense"] == 0
    assert abs(cell[control]["vs_dense"]) < 0.01
    assert cell["k8"]["vs_dense"] == pytest.approx(runs["k8"]["perplexity"] / runs["dense"]["perplexity"] - 1)

    # The sampled layouts: their draws name the next token more often than the head alone, their
    # gradient is near unbiased (bias ~ sqrt(variance / draws)) where top-k's is its whole error, and
    # the goals compare them with the largest top-k at its bytes per token.
    for key in ("k4+s4", "s8"):
        assert runs[key]["loss_function"] == "fused_sparse_kd_loss"
        assert all(checks[key]["label_in_target"][n] > checks[key]["label_in_topk"][n] for n in checks[key]["label_in_topk"])
        (g,) = grads[key].values()
        assert g["draws"] == 8 and g["grad_variance"] > 0
        assert g["grad_bias"] < 3 * (g["grad_variance"] / g["draws"]) ** 0.5 + 0.05
    assert grads["k8"][next(iter(grads["k8"]))]["grad_variance"] == 0
    sizes = result["summary"]["bytes"]
    assert max(sizes["s8"], sizes["k4+s4"], sizes["k8"]) < sizes[control] < sizes["dense"]
    goals = result["summary"]["goals"]
    assert set(goals) == {"k4+s4", "s8"} and goals["s8"]["reference"] == "k8"
    assert goals["s8"]["alpha=1,T=1"]["vs_dense"] == cell["s8"]["vs_dense"]

