"""bench/kernel.py's harness, on CPU: the smoke run goes through the code a GPU run takes (the same
do_bench contract, summarised by triton's own summariser; the copy ceiling; the JSON written row by
row), with only the timer's clock, the compile backend and the memory stats swapped."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import triton.testing

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel.py"
ROW_KEYS = {"loss", "pass_", "provider", "K", "N", "V", "k", "H", "dtype", "ms_median", "ms_p20",
            "ms_p80", "first_ms", "bytes_min", "bytes_moved", "gbps", "achieved_gbps",
            "copy_fraction", "tflops", "peak_mem_mb", "vs_mtkd", "loss_value", "checked"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mtkd_bench_kernel", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_smoke_run_measures_every_loss_and_provider(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    assert "TRITON_INTERPRET" not in os.environ  # the smoke run put it back
    results = json.loads(out.read_text())
    assert results["complete"] is True
    assert {"gpu", "versions", "copy_gbps", "config", "rows", "skipped"} <= results.keys()
    assert {"torch", "triton", "cuda", "liger_kernel"} <= results["versions"].keys()
    assert results["copy_gbps"] > 0
    liger = results["versions"]["liger_kernel"] is not None
    assert ("liger" in results["skipped"]) is not liger
    rows = results["rows"]
    for loss, providers in bench.PROVIDERS.items():
        measured = {(r["provider"], r["pass_"]) for r in rows if r["loss"] == loss}
        expected = {(p, pass_) for p in providers for pass_ in bench.PASSES
                    if p != "liger" or liger}
        assert measured == expected, loss
    for row in rows:
        assert ROW_KEYS <= row.keys() and "error" not in row, row
        assert 0 < row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
        assert row["first_ms"] > 0
        if row["provider"] == "mtkd":
            assert row["vs_mtkd"] == 1
        else:
            assert row["vs_mtkd"] > 0
        # Every provider that states the loss was checked against the yardstick's value.
        assert row["checked"] is (row["provider"] != "matmul_floor" and not (
            row["loss"] == "fused_linear" and row["provider"] == "liger"))
        if row["loss"] == "fused_linear":
            assert row["tflops"] > 0 and row["gbps"] is None
        else:
            assert row["gbps"] > 0 and row["copy_fraction"] == row["gbps"] / results["copy_gbps"]
            dense_kernel = row["loss"] == "dense" and row["provider"] == "mtkd"
            assert (row["achieved_gbps"] is not None) is dense_kernel
        assert row["peak_mem_mb"] is None  # CUDA only


def test_cpu_timer_returns_what_triton_does_bench_returns(bench):
    """The bug this guards against: `do_bench(..., quantiles=[0.5])[0]` on a bare float."""
    ms = bench.cpu_do_bench(lambda: torch.ones(100).sum(), return_mode="median")
    assert isinstance(ms, float) and ms > 0
    quantiles = bench.cpu_do_bench(lambda: torch.ones(100).sum(), quantiles=bench.QUANTILES)
    assert len(quantiles) == 3 and quantiles[1] <= quantiles[0] <= quantiles[2]
    # Triton's summariser, which triton.testing.do_bench ends with, gives the same shapes.
    assert isinstance(triton.testing._summarize_statistics([1.0, 2.0], None, "median"), float)
    assert isinstance(triton.testing._summarize_statistics([1.0, 2.0], [0.5], "mean"), float)


def test_a_disagreeing_provider_is_an_error_row_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    # A yardstick one too high: the reference provider agrees with it, the kernel does not.
    reference = bench.kd_loss_ref
    monkeypatch.setattr(bench, "kd_loss_ref", lambda *args, **kw: reference(*args, **kw) + 1)
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--loss", "dense", "--provider", "mtkd", "torch_eager", "--pass", "fwd",
            "--json", str(out)]
    assert bench.main(argv) == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert "disagrees with torch_eager" in rows["mtkd"]["error"] and "ms_median" not in rows["mtkd"]
    assert "error" not in rows["torch_eager"] and rows["torch_eager"]["ms_median"] > 0


def test_the_json_keeps_the_rows_measured_before_a_crash(bench, tmp_path, monkeypatch):
    real_run_case, calls = bench.run_case, []

    def crash_on_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_run_case(*args, **kwargs)

    monkeypatch.setattr(bench, "run_case", crash_on_the_second_case)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--loss", "dense", "--V", "33", "40", "--provider", "torch_eager",
                    "--pass", "fwd", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert [(r["V"], r["provider"]) for r in results["rows"]] == [(33, "torch_eager")]


def test_bytes_count_what_each_provider_must_move(bench):
    Case = bench.Case
    K, N, V = 4, 8192, 32000
    dense = Case("dense", K, N, V, "bfloat16")
    assert bench.min_bytes(dense, "mtkd", "fwd") == (K + 1) * N * V * 2
    assert bench.min_bytes(dense, "mtkd", "fwd_bwd") == (K + 2) * N * V * 2
    assert bench.min_bytes(dense, "liger", "fwd_bwd") == 3 * N * V * 2  # one fused target
    # V = 32000 is longer than one V block: the kernel reads its inputs twice.
    assert bench.moved_bytes(dense, "mtkd", "fwd_bwd") == 2 * (K + 1) * N * V * 2 + N * V * 2
    assert bench.moved_bytes(Case("dense", 2, N, 100, "float32"), "mtkd", "fwd") == 3 * N * 100 * 4
    assert bench.moved_bytes(dense, "torch_eager", "fwd") is None  # not known
    sparse = Case("sparse", K, N, V, "bfloat16", k=64)
    assert bench.min_bytes(sparse, "mtkd", "fwd_bwd") == 2 * N * V * 2 + K * N * 64 * (4 + 4)
    linear = Case("fused_linear", K, N, V, "bfloat16", k=64, H=4096)
    assert bench.min_bytes(linear, "mtkd", "fwd") is None
    assert bench.flops(linear, "mtkd", "fwd_bwd") == 3 * 2 * N * 4096 * V
    assert bench.flops(linear, "liger", "fwd") == 2 * 2 * N * 4096 * V  # and the teacher's


def test_quick_is_the_headline_shapes(bench):
    grids = bench.parse_args(["--quick"]).grids
    shapes = {loss: bench.cases(loss, grid) for loss, grid in grids.items()}
    assert shapes == {
        "dense": [bench.Case("dense", 4, 8192, 32000, "bfloat16")],
        "sparse": [bench.Case("sparse", 4, 8192, 128256, "bfloat16", k=64)],
        "fused_linear": [bench.Case("fused_linear", 4, 8192, 128256, "bfloat16", k=64, H=4096)],
    }


def test_shape_options_replace_the_presets_where_they_apply(bench):
    grids = bench.parse_args(["--V", "1000", "--k", "8", "--H", "64"]).grids
    assert grids["dense"].V == grids["sparse"].V == grids["fused_linear"].V == (1000,)
    assert grids["dense"].k == (None,) and grids["sparse"].k == (8,)
    assert grids["sparse"].H == (None,) and grids["fused_linear"].H == (64,)
    assert grids["dense"].K == (1, 4, 8)  # the full preset's, untouched


def test_without_a_gpu_it_refuses_unless_smoke(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--loss", "dense"]) == 2
    assert "CUDA" in capsys.readouterr().err
