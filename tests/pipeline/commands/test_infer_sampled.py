"""`mtkd infer --tail-samples` through the real CLI: refusals (exit 2, nothing written), and real
processes (killed with SIGKILL and resumed, concurrent shards) giving the bytes of one run."""

from __future__ import annotations

import json
import os

import pytest

from tests.pipeline.commands.test_infer import SLOW, _infer_process, _kill_once_recorded, invoke
from tests.pipeline.conftest import LM_VOCAB, refused, snapshot

SAMPLED = ("--top-k", "1", "--tail-samples", "5", "--seed", "9")  # the test teachers have 3 classes


def _reference(tmp_path, name="reference.zarr"):
    proc = _infer_process(tmp_path, name, *SAMPLED)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return snapshot(tmp_path / name)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, make_data, make_teachers, odd_teachers):
    make_data(80)
    make_teachers([{"name": "fast"}, {"name": "slow", **SLOW}])
    expected = _reference(tmp_path)
    assert any(key.startswith("teachers/slow/tail_ids/c/") for key in expected)
    proc = _infer_process(tmp_path, "s.zarr", *SAMPLED)
    _kill_once_recorded(proc, tmp_path / "s.zarr", 3)
    assert 3 <= len(os.listdir(tmp_path / "s.zarr/teachers/slow/done/c")) < 20, "the kill came too late to test anything"
    rerun = _infer_process(tmp_path, "s.zarr", *SAMPLED, "--json")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["blocks_skipped"] >= 2
    assert snapshot(tmp_path / "s.zarr") == expected


@pytest.mark.slow
def test_concurrent_shard_processes_equal_one_run(tmp_path, make_data, make_teachers, odd_teachers):
    make_data(80)
    make_teachers([{"name": "fast"}, {"name": "slow", **SLOW}])
    expected = _reference(tmp_path)
    procs = [_infer_process(tmp_path, "s.zarr", *SAMPLED, "--shard", f"{i}/3") for i in range(3)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert snapshot(tmp_path / "s.zarr") == expected


LM = {"factory": "mtkd.pipeline.models:gru_lm", "kwargs": {"vocab_size": LM_VOCAB, "hidden": 8}}


@pytest.mark.parametrize(("extra", "culprits"), [
    (("--top-k", "4", "--tail-samples", "-1"), ("--tail-samples must be at least 0", "-1")),
    (("--top-k", "0"), ("--top-k must be at least 1", "--tail-samples")),
    (("--tail-samples", "8"), ("--tail-samples applies to top-k teachers only", "'lm'")),  # V = 40: tokens stored dense
])
def test_bad_tail_options_exit_2_and_write_nothing(tmp_path, make_tokens, make_teachers, extra, culprits):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    refused(invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", *extra), *culprits)
    assert not (tmp_path / "t.zarr").exists()


def test_tail_samples_on_a_dense_store_exit_2_untouched(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    args = ("--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", "--quiet")
    assert invoke("infer", *args).exit_code == 0  # dense (V = 40)
    before = snapshot(tmp_path / "t.zarr")
    refused(invoke("infer", *args, "--tail-samples", "4"), "teacher 'lm'", "0 tail samples", "--tail-samples 4")
    assert snapshot(tmp_path / "t.zarr") == before


def test_the_table_and_inspect_show_the_samples(tmp_path, make_tokens, make_teachers):
    toml = make_teachers([{"name": "lm", **LM}], filename="lm.toml")
    result = invoke("infer", "--teachers", toml, "--data", make_tokens(4), "--out", tmp_path / "t.zarr", "--top-k", "4", "--tail-samples", "6")
    assert result.exit_code == 0, result.output
    assert "top-4 + 6 samples of 40" in result.stdout
    shown = invoke("inspect", tmp_path / "t.zarr")
    assert shown.exit_code == 0 and "top-4+6s" in shown.stdout
    report = json.loads(invoke("inspect", tmp_path / "t.zarr", "--json").stdout.strip().splitlines()[-1])
    assert report["teachers"][0]["tail_samples"] == 6 and report["teachers"][0]["bytes_per_row"] > 0
