"""bench/pipeline.py's harness at tiny sizes: every group of figures runs through the code a full run
takes (stage one, stage two, online KD, the loaders alone) and writes finite figures, each group
with its conditions and the load average it ran under, so that the harness cannot rot unseen."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"
TINY = ["--rows", "256", "--epochs", "1", "--stream-epochs", "1", "--repeats", "1", "--batch-size", "128",
        "--token-seqs", "4", "--token-len", "16", "--token-vocab", "256", "--token-batch", "4", "--overhead-vocabs", "512",
        "--dense-vocabs", "10", "--dense-rows", "256", "--lm-seqs", "4", "--lm-batch-size", "4",
        "--loader-seqs", "8", "--loader-rows", "512", "--loader-vocabs", "10", "--loader-epochs", "1",
        "--s3-rows", "256", "--device", "cpu", "--threads", "1"]
FIGURES = ("infer_vs_forward", "offline_vs_online_speedup", "stream_overhead", "infer_vs_forward_tokens",
           "offline_vs_online_speedup_tokens", "stream_overhead_tokens", "stream_overhead_s3")
GROUPS = ("rows", "dense", "infer_tokens", "overhead", "tokens", "loader", "s3")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mtkd_bench_pipeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _numbers(value, where=""):
    """Every number in a JSON value, with where it is."""
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{where}[{i}]")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(where, value)]
    return []


def test_every_figure_group_runs_at_tiny_sizes_and_writes_finite_figures(bench, tmp_path):
    out = tmp_path / "pipeline.json"
    results = bench.main([*TINY, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for key in FIGURES:
        assert math.isfinite(results[key]), key
    assert results["infer_vs_forward"] > 0 and results["offline_vs_online_speedup"] > 0
    assert set(results["infer_vs_forward_dense"]) == {"10"}
    for key in ("seqs=8,T=1", "seqs=8,T=2"):
        rates = results["loader_tokens"][key]
        assert rates["tokens"] == 8 * bench.LM_LENGTH
        assert rates["tokens_per_s"]["stream"] > 0 and rates["tokens_per_s"]["memory"] > 0
    for key in ("infer_overhead_passes", "reduce_passes"):  # stage one's per-position work in logsumexp passes
        assert set(results[key]) == {"512"} and set(results[key]["512"]) == {"topk", "topk+tail16"}
        assert all(math.isfinite(v) for v in results[key]["512"].values())
    assert all(v > 0 for v in results["reduce_passes"]["512"].values())
    dense = results["loader_dense"]["10"]
    assert dense["rows"] == 512 and dense["gb_per_s"]["stream"] > 0
    # Every group names the load average it ran under and its conditions; nothing is NaN or inf.
    assert set(results["load_average_1min"]) == set(GROUPS) == set(results["wall_s"])
    for key in ("conditions", "conditions_tokens", "conditions_infer_tokens", "conditions_overhead", "conditions_dense", "conditions_loader"):
        assert key in results, key
    assert results["conditions"]["cpu_threads"] == 1
    bad = [(where, v) for where, v in _numbers(results) if not math.isfinite(v)]
    assert not bad, bad


def test_loader_only_measures_no_model_and_quick_shrinks_every_size(bench, tmp_path):
    results = bench.main(["--loader-only", "--loader-seqs", "4", "--loader-rows", "0", "--repeats", "1",
                          "--loader-epochs", "1", "--device", "cpu"])
    assert set(results["load_average_1min"]) == {"loader"}
    assert not any(key in results for key in FIGURES)
    assert set(results["loader_tokens"]) == {"seqs=4,T=1", "seqs=4,T=2"} and results["loader_dense"] == {}
    quick = bench.build_parser().parse_args(list(bench.QUICK))
    default = bench.build_parser().parse_args([])
    for name in ("rows", "epochs", "lm_seqs", "token_seqs", "loader_rows", "s3_rows"):
        assert 0 < getattr(quick, name) < getattr(default, name), name
