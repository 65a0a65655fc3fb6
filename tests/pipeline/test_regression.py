"""Regression (SPEC v3 "Features and regression"): float labels, teachers stored as layout "values",
the regression fusions and losses against float64 numpy, eval/inspect metrics, shards and resume,
and the refusals (exit 2, one line, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.config import Fusion, TrainConfig
from mtkd.pipeline.data import load_data
from mtkd.pipeline.evaluate import run_eval
from mtkd.pipeline.fusion import fused_values
from mtkd.pipeline.infer import Shard, run_infer
from mtkd.pipeline.layouts import Values
from mtkd.pipeline.metrics import regression_metrics
from mtkd.pipeline.objective import Objective
from mtkd.pipeline.report import inspect_store
from mtkd.pipeline.specs import load_teacher_specs
from mtkd.pipeline.store import open_store
from mtkd.pipeline.train import run_train
from tests.pipeline.conftest import FEATURES, refused, snapshot

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
D = 2  # regression outputs per row


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- the maths against float64 numpy ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 4])
def test_fused_values_are_numpy_mean_weighted_mean_and_median(k):
    rng = np.random.default_rng(k)
    values = rng.standard_normal((k, 37, 3)) * 10
    pi = rng.uniform(0.1, 2.0, k)
    v = torch.from_numpy(values.astype(np.float32))
    got = {f: fused_values(f, v, torch.from_numpy(pi.astype(np.float32))).double().numpy() for f in Fusion if f in
           (Fusion.MEAN, Fusion.WEIGHTED, Fusion.MEDIAN)}
    stored = values.astype(np.float32).astype(np.float64)  # what the fusions see
    np.testing.assert_allclose(got[Fusion.MEAN], stored.mean(axis=0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[Fusion.WEIGHTED], np.average(stored, axis=0, weights=pi), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[Fusion.MEDIAN], np.median(stored, axis=0), rtol=1e-6, atol=1e-5)


def test_median_of_two_teachers_and_one_gone_wild_is_one_of_the_two():
    rng = np.random.default_rng(0)
    good = rng.standard_normal((2, 50, D)).astype(np.float32)
    wild = np.where(rng.random((50, D)) < 0.5, 1e6, -1e6).astype(np.float32)  # garbage of either sign
    median = fused_values(Fusion.MEDIAN, torch.from_numpy(np.concatenate([good, wild[None]]))).numpy()
    # Never the garbage: the larger of the good two where it is +1e6, the smaller where -1e6.
    np.testing.assert_array_equal(median, np.where(wild > 0, good.max(axis=0), good.min(axis=0)))
    mean = fused_values(Fusion.MEAN, torch.from_numpy(np.concatenate([good, wild[None]]))).numpy()
    assert np.abs(mean).min() > 1e5  # the mean is carried away by it


def _numpy_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    out = {"mse": [], "mae": [], "r2": []}
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        e = p[known, j] - y[known, j]
        out["mse"].append(float(np.mean(e**2)))
        out["mae"].append(float(np.mean(np.abs(e))))
        out["r2"].append(float(1 - np.sum(e**2) / np.sum((y[known, j] - y[known, j].mean()) ** 2)))
    return out


def test_regression_metrics_per_output_and_averaged_are_numpy_float64():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((200, 3)) * [1.0, 5.0, 0.1]
    p = y + rng.standard_normal((200, 3)) * 0.5
    y[rng.random((200, 3)) < 0.2] = np.nan
    y[7] = np.nan  # a row with no known target
    m = regression_metrics(torch.from_numpy(p), torch.from_numpy(y))
    ref = _numpy_metrics(p, y)
    for key in ("mse", "mae", "r2"):
        np.testing.assert_allclose(m[f"{key}_per_output"], ref[key], rtol=1e-12)
        assert m[key] == pytest.approx(np.mean(ref[key]), rel=1e-12)
    assert m["n"] == int((~np.isnan(y)).any(axis=1).sum()) and m["n_per_output"] == (~np.isnan(y)).sum(axis=0).tolist()


def _elementwise(loss: str, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    e = s - t
    if loss == "mse":
        return e**2
    if loss == "l1":
        return np.abs(e)
    return np.where(np.abs(e) < 1.0, 0.5 * e**2, np.abs(e) - 0.5)  # huber, delta 1


@pytest.mark.parametrize("loss", ["mse", "huber", "l1"])
@pytest.mark.parametrize("fusion", ["mean", "median"])
def test_objective_is_alpha_fused_term_plus_own_loss_on_known_targets(loss, fusion):
    rng = np.random.default_rng(2)
    b, k, alpha = 16, 3, 0.3
    s = rng.standard_normal((b, D)) * 2
    teachers = rng.standard_normal((k, b, D)) * 2
    y = rng.standard_normal((b, D)) * 2
    y[:5] = np.nan  # unlabelled rows: the fused term alone
    y[6, 1] = np.nan  # a row with one known output
    fused = np.mean(teachers, axis=0) if fusion == "mean" else np.median(teachers, axis=0)
    own = np.nan_to_num(_elementwise(loss, s, np.nan_to_num(y)) * ~np.isnan(y))
    counts = np.maximum((~np.isnan(y)).sum(axis=1), 1)
    expected = np.mean(alpha * _elementwise(loss, s, fused).mean(axis=1) + (1 - alpha) * own.sum(axis=1) / counts)
    objective = Objective(distil=True, fusion=fusion, weights=None, temperature=None, alpha=alpha, loss=loss, regression=True)
    student = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    got = objective.values(student, torch.from_numpy(teachers), torch.from_numpy(y))
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert torch.isfinite(student.grad).all()  # NaN targets never reach the gradient
    hard = Objective(distil=False, fusion="mean", weights=None, temperature=None, alpha=1.0, loss=loss, regression=True)
    known = ~np.isnan(y)
    assert float(hard.values(torch.from_numpy(s), None, torch.from_numpy(y))) == pytest.approx(
        _elementwise(loss, s, np.nan_to_num(y))[known].mean(), rel=1e-6)


# -- stage one, the store, stage two, eval and inspect on a tiny regression world -----------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """labelled.npz (40 rows, targets (40, 2), some NaN), transfer.npz (48 rows, all NaN), classes.npz
    (the transfer inputs with int labels), three teacher MLPs of different widths (D outputs)."""
    root = tmp_path_factory.mktemp("regression")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, FEATURES)).astype(np.float32)
    y = np.stack([x[:, 0] * 2 + x[:, 1], np.sin(x[:, 2])], axis=1).astype(np.float32)
    y[::9, 1] = np.nan
    np.savez(root / "labelled.npz", x=x, y=y)
    xt = rng.standard_normal((48, FEATURES)).astype(np.float32)
    np.savez(root / "transfer.npz", x=xt, y=np.full((48, D), np.nan, dtype=np.float32))
    np.savez(root / "classes.npz", x=xt, y=rng.integers(0, D, 48))
    lines = []
    for i, hidden in enumerate([[8], [16], [4, 4]]):
        torch.manual_seed(i)
        from mtkd.pipeline.models import mlp

        torch.save(mlp(FEATURES, hidden, D).state_dict(), root / f"t{i}.pt")
        lines += ["[[teachers]]", f'name = "t{i}"', 'factory = "mtkd.pipeline.models:mlp"',
                  f"kwargs = {{ in_features = {FEATURES}, hidden = {hidden}, num_classes = {D} }}", f'checkpoint = "t{i}.pt"', ""]
    (root / "teachers.toml").write_text("\n".join(lines))
    (root / "student.toml").write_text(f'[student]\nname = "s"\nfactory = "mtkd.pipeline.models:mlp"\n'
                                       f"kwargs = {{ in_features = {FEATURES}, hidden = [8], num_classes = {D} }}\n")
    run_infer(root / "teachers.toml", str(root / "transfer.npz"), root / "transfer.zarr", chunk_rows=16, batch_size=64, device="cpu")
    run_infer(root / "teachers.toml", str(root / "labelled.npz"), root / "labelled.zarr", chunk_rows=16, batch_size=64, device="cpu")
    return root


def _outputs(root, name, x):
    spec = next(s for s in load_teacher_specs(root / "teachers.toml") if s.name == name)
    with torch.inference_mode():
        return spec.build().eval()(torch.from_numpy(x)).float().numpy()


def test_stored_values_are_the_teachers_outputs_readable_with_plain_zarr(world):
    group = zarr.open_group(world / "transfer.zarr", mode="r")
    x = np.load(world / "transfer.npz")["x"]
    for name in ("t0", "t1", "t2"):
        attrs = dict(group[f"teachers/{name}"].attrs)
        assert (attrs["layout"], attrs["dtype"], attrs["vocab_size"], attrs["complete"]) == ("values", "float32", D, True)
        stored = group[f"teachers/{name}/values"][...]
        assert stored.dtype == np.float32 and stored.shape == (48, D)
        # One batch holds every row: the stored values are the forward's float32 outputs, bit for bit.
        np.testing.assert_array_equal(stored.view(np.uint32), _outputs(world, name, x).view(np.uint32))
    assert np.isnan(group["targets"][...]).all() and group["targets"].shape == (48, D)
    labelled = zarr.open_group(world / "labelled.zarr", mode="r")
    np.testing.assert_array_equal(labelled["targets"][...], np.load(world / "labelled.npz")["y"])  # NaN where unknown
    assert (labelled["labels"][...] == -100).all()  # no class labels
    assert open_store(world / "transfer.zarr").layout("t0") == Values("float32", D)


def test_values_stores_resume_and_shard_bit_identically(world, tmp_path):
    data, toml = str(world / "transfer.npz"), world / "teachers.toml"
    run_infer(toml, data, tmp_path / "one.zarr", chunk_rows=8, batch_size=5, device="cpu")
    for i in (2, 0, 1):
        run_infer(toml, data, tmp_path / "many.zarr", chunk_rows=8, batch_size=5, device="cpu", shard=Shard(i, 3))
    assert snapshot(tmp_path / "many.zarr") == snapshot(tmp_path / "one.zarr")
    result = invoke("verify", tmp_path / "many.zarr", "--json")
    assert result.exit_code == 0, result.output


def test_verify_names_a_damaged_values_chunk(world, tmp_path):
    import shutil

    store = shutil.copytree(world / "transfer.zarr", tmp_path / "s.zarr")
    chunk = store / "teachers" / "t1" / "values" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    result = invoke("verify", store)
    assert result.exit_code == 2 and "t1" in result.output and "values" in result.output, result.output


def test_verify_names_damaged_targets(world, tmp_path):
    import shutil

    store = shutil.copytree(world / "labelled.zarr", tmp_path / "s.zarr")
    chunk = store / "targets" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    result = invoke("verify", store)
    assert result.exit_code == 2 and "targets" in result.output, result.output
    refused(invoke("inspect", store), "targets")


def test_inspect_and_eval_give_numpy_metrics_of_teachers_and_fused_ensembles(world):
    data = np.load(world / "labelled.npz")
    x, y = data["x"], data["y"].astype(np.float64)
    outputs = {name: _outputs(world, name, x).astype(np.float64) for name in ("t0", "t1", "t2")}
    report = inspect_store(open_store(world / "labelled.zarr"))
    assert report["task"] == "regression" and report["labelled_rows"] == 40
    for t in report["teachers"]:
        ref = _numpy_metrics(outputs[t["name"]], y)
        np.testing.assert_allclose(t["metrics"]["mse_per_output"], ref["mse"], rtol=1e-6)
        np.testing.assert_allclose(t["metrics"]["r2_per_output"], ref["r2"], rtol=1e-6)
        evaluated = run_eval(str(world / "labelled.npz"), model=world / "teachers.toml", teacher=t["name"], device="cpu")
        assert evaluated["mse"] == pytest.approx(t["metrics"]["mse"], rel=1e-6)
        assert evaluated["mae"] == pytest.approx(t["metrics"]["mae"], rel=1e-6)
    stacked = np.stack(list(outputs.values()))
    for fusion, fused in (("mean", stacked.mean(axis=0)), ("median", np.median(stacked, axis=0))):
        ref = _numpy_metrics(fused, y)
        got = report["ensemble"]["metrics"][fusion]
        np.testing.assert_allclose([got["mse"], got["mae"], got["r2"]], [np.mean(ref[k]) for k in ("mse", "mae", "r2")], rtol=1e-5)
    told = invoke("eval", "--model", world / "teachers.toml", "--teacher", "t0", "--data", world / "labelled.npz")
    assert told.exit_code == 0 and "40 rows with targets" in told.output and "per output" in told.output, told.output
    shown = invoke("inspect", world / "labelled.zarr")
    assert shown.exit_code == 0 and "median (3)" in shown.output and "R^2" in shown.output, shown.output


def test_hard_label_fit_and_distillation_from_the_median(world, tmp_path):
    base = dict(student=world / "student.toml", epochs=6, batch_size=8, lr=0.01, device="cpu")
    fit = run_train(TrainConfig(data=str(world / "labelled.npz"), out=tmp_path / "fit", val_data=str(world / "labelled.npz"), **base))
    record = json.loads((tmp_path / "fit" / "config.json").read_text())
    assert record["loss"] == "mse" and record["task"] == "regression" and record["loss_function"] == "mse of the outputs"
    assert fit["best"]["val_mse"] < json.loads((tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()[0])["val_mse"]
    kd = dict(data=str(world / "transfer.npz"), store=world / "transfer.zarr", fusion="median", loss="huber", **base)
    run_train(TrainConfig(out=tmp_path / "kd", **kd))
    # The student moves towards the teachers' median: its MSE against it falls well below the start's.
    x = np.load(world / "transfer.npz")["x"]
    target = np.median(np.stack([_outputs(world, n, x) for n in ("t0", "t1", "t2")]), axis=0)
    from mtkd.pipeline.specs import load_student_spec

    net = load_student_spec(world / "student.toml").build()
    torch.manual_seed(0)
    start = load_student_spec(world / "student.toml").build()
    net.load_state_dict(torch.load(tmp_path / "kd" / "student.pt", weights_only=True))
    with torch.no_grad():
        after = float(((net(torch.from_numpy(x)).numpy() - target) ** 2).mean())
        before = float(((start(torch.from_numpy(x)).numpy() - target) ** 2).mean())
    assert after < 0.5 * before


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_batches_hold_the_stored_values_and_targets_of_their_rows(world, stream):
    from mtkd.pipeline.loader import BatchLoader

    store, data = open_store(world / "labelled.zarr"), load_data(str(world / "labelled.npz"))
    names = ["t0", "t1", "t2"]
    values = torch.stack([store.read_values(t, 0, store.num_rows) for t in names])  # (K, N, D)
    loader = BatchLoader(data.x, data.targets, batch_size=8, seed=3, store=store, teachers=names, stream=stream,
                         window_bytes=1, read_bytes=1)
    seen = []
    for _, _, batch in loader.batches(0, 1):
        assert torch.equal(batch.logits, values[:, batch.rows]) and batch.labels.dtype == torch.float32
        torch.testing.assert_close(batch.labels, torch.from_numpy(data.targets)[batch.rows], equal_nan=True, rtol=0, atol=0)
        seen.append(batch.rows)
    assert sorted(torch.cat(seen).tolist()) == list(range(40)) and loader.mode == ("stream" if stream else "memory")


@pytest.mark.slow
def test_a_regression_run_resumed_after_sigkill_ends_with_the_same_weights(world, tmp_path):
    from tests.pipeline.test_train import VENV_BIN, kill_and_resume

    def command(out, *extra):
        return [str(VENV_BIN / "mtkd"), "train", "--student", str(world / "student.toml"), "--data", str(world / "labelled.npz"),
                "--store", str(world / "labelled.zarr"), "--fusion", "median", "--loss", "huber", "--alpha", "0.5",
                "--out", str(out), "--epochs", "150", "--batch-size", "8", "--lr", "0.01", "--checkpoint-every", "5",
                "--quiet", *extra]

    kill_and_resume(command, tmp_path, epochs=150)


# -- refusals: exit 2, one line, nothing written ----------------------------------------------------------


def train_args(world, out, data, store, *extra):
    return ["train", "--student", world / "student.toml", "--data", world / data, "--store", world / store,
            "--out", out, "--epochs", "1", "--quiet", *extra]


@pytest.mark.parametrize("extra, culprits", [
    (("--temperature", "2"), ("--temperature",)),
    (("--fusion", "confidence"), ("--fusion confidence", "median")),
    (("--fusion", "vote"), ("--fusion vote",)),
    (("--loss", "kl"), ("--loss kl",)),
])
def test_classification_options_on_a_values_store_are_refused(world, tmp_path, extra, culprits):
    before = snapshot(world / "transfer.zarr")
    refused(invoke(*train_args(world, tmp_path / "run", "transfer.npz", "transfer.zarr", *extra)), *culprits)
    assert not (tmp_path / "run").exists() and snapshot(world / "transfer.zarr") == before


def test_float_labels_with_a_classification_store_and_the_reverse_are_refused(world, tmp_path, make_teachers):
    # A classification store of the transfer inputs (int labels), then the float-labelled data against it.
    toml = make_teachers([{"name": "c", "num_classes": D}])
    assert invoke("infer", "--teachers", toml, "--data", world / "classes.npz", "--out", tmp_path / "c.zarr", "--quiet").exit_code == 0
    before = snapshot(tmp_path / "c.zarr")
    refused(invoke("train", "--student", world / "student.toml", "--data", world / "transfer.npz", "--store", tmp_path / "c.zarr",
                   "--out", tmp_path / "run", "--quiet"), "c.zarr", "class labels", "transfer.npz")
    refused(invoke("infer", "--teachers", world / "teachers.toml", "--data", world / "transfer.npz", "--out", tmp_path / "c.zarr",
                   "--quiet"), "class labels", "transfer.npz")
    assert snapshot(tmp_path / "c.zarr") == before
    before = snapshot(world / "transfer.zarr")
    refused(invoke(*train_args(world, tmp_path / "run", "classes.npz", "transfer.zarr")), "regression targets", "classes.npz")
    assert not (tmp_path / "run").exists() and snapshot(world / "transfer.zarr") == before


def test_regression_only_options_on_classification_data_and_top_k_on_regression_data_are_refused(world, tmp_path, make_teachers):
    toml = make_teachers([{"name": "c", "num_classes": D}])
    assert invoke("infer", "--teachers", toml, "--data", world / "classes.npz", "--out", tmp_path / "c.zarr", "--quiet").exit_code == 0
    for extra, culprit in ((("--fusion", "median"), "--fusion median"), (("--loss", "huber"), "--loss huber")):
        refused(invoke("train", "--student", world / "student.toml", "--data", world / "classes.npz", "--store", tmp_path / "c.zarr",
                       "--out", tmp_path / "run", "--quiet", *extra), culprit)
        assert not (tmp_path / "run").exists()
    refused(invoke("infer", "--teachers", world / "teachers.toml", "--data", world / "transfer.npz", "--out", tmp_path / "v.zarr",
                   "--top-k", "1", "--quiet"), "--top-k", "regression")
    refused(invoke("infer", "--teachers", world / "teachers.toml", "--data", world / "transfer.npz", "--out", tmp_path / "v.zarr",
                   "--tail-samples", "4", "--quiet"), "--tail-samples", "regression")
    assert not (tmp_path / "v.zarr").exists()


def test_float_labels_of_a_bad_shape_and_inf_are_refused(tmp_path):
    x = np.zeros((5, 3), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.zeros((5, 2, 2), dtype=np.float32))
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0, 1, np.inf, 0, 0], dtype=np.float32))
    for name, culprit in (("a.npz", "(5, 2, 2)"), ("b.npz", "row 2")):
        with pytest.raises(Exception, match=r"regression|inf") as error:
            load_data(str(tmp_path / name))
        assert culprit in str(error.value)
