"""bench/kernel.py's harness: the smoke run on CPU writes the JSON the README's tables come from."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("mtkd_bench_kernel", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_json_schema(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "bench.json"
    bench = load_bench()
    assert bench.main(["--smoke", "--K", "2", "--V", "17", "--json", str(out)]) == 0
    assert "TRITON_INTERPRET" not in os.environ  # the smoke run put it back
    results = json.loads(out.read_text())
    assert {"gpu", "torch", "triton", "copy_gbps", "rows"} <= results.keys()
    rows = results["rows"]
    # 2 dtypes x 2 providers (mtkd, torch_eager) x 2 modes
    assert len(rows) == 8
    keys = {"K", "N", "V", "dtype", "provider", "mode", "ms_median", "ms_p20", "ms_p80", "gbps",
            "peak_mem_mb"}
    for row in rows:
        assert keys <= row.keys()
        assert row["K"] == 2 and row["V"] == 17 and row["ms_median"] > 0 and row["gbps"] > 0
    assert {r["provider"] for r in rows} == {"mtkd", "torch_eager"}


def test_minimal_bytes_count_each_tensor_once():
    bench = load_bench()
    K, N, V = 4, 8192, 32000
    assert bench.minimal_bytes(K, N, V, torch.bfloat16, "fwd") == (K + 1) * N * V * 2
    assert bench.minimal_bytes(K, N, V, torch.float32, "fwd_bwd") == (K + 2) * N * V * 4


def test_without_a_gpu_it_refuses_unless_smoke(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert load_bench().main(["--K", "1"]) != 0
    assert "CUDA" in capsys.readouterr().err
