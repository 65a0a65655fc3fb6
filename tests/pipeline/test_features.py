"""Features (SPEC v3): stage one stores module outputs beside the logits; the hint loss of stage two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline.errors import BadInputError, StoreMismatchError, TeacherOutputError
from mtkd.pipeline.features import FeatureTap, Pair, build_hints, feature_loss, parse_pair
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.specs import load_teacher_specs
from mtkd.pipeline.store import open_store
from mtkd.pipeline.verify import verify_store
from tests.pipeline.conftest import snapshot

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

BITS = {"float16": torch.int16, "bfloat16": torch.int16, "float32": torch.int32}


def _captured(toml, name, x, modules):
    """The teacher's module outputs captured directly by plain hooks, float32."""
    spec = next(s for s in load_teacher_specs(toml) if s.name == name)
    model = spec.build().eval()
    named = dict(model.named_modules())
    out = {}
    hooks = [named[m].register_forward_hook(lambda mod, a, o, m=m: out.__setitem__(m, o)) for m in modules]
    with torch.inference_mode():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_stored_features_are_the_module_outputs_at_the_stored_dtype(tmp_path, make_data, make_teachers, dtype):
    data = make_data(70)
    toml = make_teachers([{"name": "a", "kwargs": {"hidden": [16, 12]}, "features": ["1", "3"]}, {"name": "b", "seed": 1}])
    run_infer(toml, str(data), tmp_path / "s.zarr", batch_size=32, chunk_rows=16, dtype=dtype, device="cpu")
    store = open_store(tmp_path / "s.zarr")
    x = np.load(data)["x"]
    expected = _captured(toml, "a", x, ["1", "3"])
    assert dict(store.layout("a").features) == {"1": (16,), "3": (12,)} and store.layout("b").features == ()
    raw = store.read("a", 0, 70)
    tensors = store.layout("a").tensors(raw)
    for module in ("1", "3"):
        stored = tensors[f"features/{module}"]
        assert stored.shape == (70, expected[module].shape[1])
        want = expected[module].to(stored.dtype)
        assert torch.equal(stored.view(BITS[dtype]), want.view(BITS[dtype]))
        # plain zarr reads them: teachers/<name>/features/<module>, rows first
        plain = zarr.open_array(tmp_path / "s.zarr" / "teachers" / "a" / "features" / module, mode="r")
        assert plain.shape == (70, want.shape[1]) and plain.chunks == (16, want.shape[1])
        np.testing.assert_array_equal(plain[...], raw[f"features/{module}"])
    report = verify_store(tmp_path / "s.zarr")
    assert report.clean and not report.findings, report.findings


# -- stage two: the hint loss ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_and_gradient_match_plain_torch(kind):
    torch.manual_seed(0)
    pairs = [parse_pair("h=a:l1"), parse_pair("h=b:l2")]
    hints = build_hints(pairs, {"h": (3, 5)}, {pairs[0]: (3, 7), pairs[1]: (3, 4)}, seed=1)
    h = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    t = {pairs[0]: torch.randn(6, 3, 7), pairs[1]: torch.randn(6, 3, 4)}
    w = {"a": torch.rand(6), "b": torch.rand(6)}
    mask = torch.tensor([True, True, False, True, False, True])
    got = feature_loss(hints, {"h": h.float()}, t, kind, weights=w, mask=mask)
    got.backward()
    g_got = h.grad.clone()
    h.grad = None
    # plain torch, float64, spelled out
    total, norm = 0.0, w["a"].double() + w["b"].double()
    for p, name in zip(pairs, ("a", "b")):
        lin = hints.project.__self__.projections[p.key.replace(".", "\u00b7")]
        proj = h @ lin.weight.double().T + lin.bias.double()
        ref = t[p].double()
        if kind == "mse":
            d = ((proj - ref) ** 2).mean(dim=(1, 2))
        else:
            cos = (proj * ref).sum(-1) / (proj.norm(dim=-1) * ref.norm(dim=-1))
            d = (1 - cos).mean(dim=1)
        total = total + w[name].double() / norm * d
    expected = total[mask].sum() / mask.sum()
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(g_got, h.grad, rtol=1e-4, atol=1e-6)
    assert (g_got[~mask] == 0).all()


def test_pairs_that_cannot_pair_are_refused_naming_both_sides():
    p = parse_pair("layer2=cnn:layer3")
    with pytest.raises(BadInputError, match=r"layer2.*\(4, 8\).*cnn.*layer3.*\(5, 8\)"):
        build_hints([p], {"layer2": (4, 8)}, {p: (5, 8)})
    with pytest.raises(BadInputError, match="STUDENT_MODULE=TEACHER:MODULE"):
        parse_pair("layer2:cnn")


def test_tap_takes_first_element_of_tuple_outputs_and_refuses_unknown_modules():
    gru = torch.nn.GRU(3, 4, batch_first=True)
    model = torch.nn.Sequential(gru)
    tap = FeatureTap(model, ["0"])
    x = torch.randn(2, 5, 3)
    out, _ = gru(x)
    model(x)
    assert torch.equal(tap.take()["0"], out)
    with pytest.raises(BadInputError, match="no module 'nope'"):
        FeatureTap(model, ["nope"], "teacher 'x'")


# -- stage two through run_train ----------------------------------------------------------------------


def _hint_world(tmp_path, make_data, make_teachers):
    data = make_data(96)
    toml = make_teachers([{"name": "a", "kwargs": {"hidden": [16]}, "features": ["1"]}, {"name": "b", "seed": 1}])
    run_infer(toml, str(data), tmp_path / "s.zarr", chunk_rows=32, device="cpu")
    return data, _student(tmp_path)


def _student(tmp_path):
    from tests.pipeline.conftest import CLASSES, FEATURES

    student = tmp_path / "student.toml"
    student.write_text('[student]\nname = "thin"\nfactory = "mtkd.pipeline.models:mlp"\n'
                       f"kwargs = {{ in_features = {FEATURES}, hidden = [8], num_classes = {CLASSES} }}\n")
    return student


def test_hint_training_saves_projections_and_refuses_bad_pairs(tmp_path, make_data, make_teachers):
    from mtkd.pipeline.config import TrainConfig
    from mtkd.pipeline.train import run_train

    data, student = _hint_world(tmp_path, make_data, make_teachers)
    base = dict(student=student, data=str(data), store=tmp_path / "s.zarr", epochs=2, batch_size=32, device="cpu",
                temperature=2.0, alpha=0.5)
    result = run_train(TrainConfig(out=tmp_path / "run", features=("2=a:1",), feature_weight=0.5, **base))
    saved = torch.load(tmp_path / "run" / "projections.pt", weights_only=True)
    assert {tuple(v.shape) for v in saved.values()} == {(16, 8), (16,)}
    assert "projections" not in "".join(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    assert result["steps"] == 6
    for pair, match in (("2=a:nope", "stores no feature 'nope'"), ("2=zz:1", "no teacher 'zz'"),
                        ("9=a:1", "no module .9.")):
        out = tmp_path / f"bad-{pair.replace(':', '_').replace('=', '_')}"
        with pytest.raises(BadInputError, match=match):
            run_train(TrainConfig(out=out, features=(pair,), **base))
        assert not out.exists()


def test_hint_run_killed_and_resumed_ends_with_the_same_student_and_projections(tmp_path, make_data, make_teachers):
    from tests.pipeline.test_train import SUBPROCESS_ENV, VENV_BIN, kill_and_resume  # noqa: F401 - the same helper as for logits

    data, student = _hint_world(tmp_path, make_data, make_teachers)

    def command(out, *extra):
        return [str(VENV_BIN / "mtkd"), "train", "--student", str(student), "--data", str(data), "--store", str(tmp_path / "s.zarr"),
                "--out", str(out), "--epochs", "30", "--batch-size", "8", "--temperature", "2", "--alpha", "0.5",
                "--feature", "2=a:1", "--feature-loss", "cosine", "--feature-weight", "0.5", "--checkpoint-every", "3",
                "--device", "cpu", "--quiet", *extra]

    kill_and_resume(command, tmp_path, epochs=30)
    a = torch.load(tmp_path / "reference" / "projections.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "projections.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_teachers_on_one_student_module_train(tmp_path, make_data, make_teachers):
    from mtkd.pipeline.config import TrainConfig
    from mtkd.pipeline.train import run_train

    data = make_data(64)
    toml = make_teachers([{"name": "a", "kwargs": {"hidden": [16]}, "features": ["1"]},
                          {"name": "b", "seed": 1, "kwargs": {"hidden": [12]}, "features": ["2"]}])
    run_infer(toml, str(data), tmp_path / "s.zarr", device="cpu")
    student = _student(tmp_path)
    result = run_train(TrainConfig(student=student, data=str(data), store=tmp_path / "s.zarr", out=tmp_path / "run", epochs=1,
                                   batch_size=16, device="cpu", temperature=2.0, alpha=0.5, fusion="confidence",
                                   features=("2=a:1", "2=b:2")))
    saved = torch.load(tmp_path / "run" / "projections.pt", weights_only=True)
    assert sorted(tuple(v.shape) for v in saved.values()) == [(12,), (12, 8), (16,), (16, 8)]
    assert result["steps"] == 4


def test_inspect_shows_bytes_per_row_per_feature(tmp_path, make_data, make_teachers):
    import json

    from typer.testing import CliRunner

    from mtkd.pipeline.cli import app

    toml = make_teachers([{"name": "a", "kwargs": {"hidden": [16, 12]}, "features": ["1", "3"]}])
    run_infer(toml, str(make_data(40)), tmp_path / "s.zarr", device="cpu", chunk_rows=16)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tmp_path / "s.zarr"), "--json"])
    assert result.exit_code == 0, result.output
    sizes = json.loads(result.stdout.strip().splitlines()[-1])["teachers"][0]["feature_bytes_per_row"]
    assert {m: s["raw"] for m, s in sizes.items()} == {"1": 32, "3": 24}  # float16: 2 bytes an element
    # uncompressed chunks plus a 4-byte crc32c each; the last of 3 blocks is padded to 16 rows: 48 rows stored for 40
    assert sizes["1"]["stored"] == pytest.approx((3 * (16 * 32 + 4)) / 40)
    table = runner.invoke(app, ["inspect", str(tmp_path / "s.zarr")])
    assert table.exit_code == 0 and "a features/1:" in table.stdout and "32 B/row uncompressed" in table.stdout


def test_a_hugging_face_teachers_hidden_states_one_row_per_real_position(tmp_path, make_tokens):
    transformers = pytest.importorskip("transformers")
    from mtkd.pipeline.data import load_data
    from mtkd.pipeline.infer import BatchGrid
    from tests.pipeline.conftest import LM_VOCAB

    config = transformers.GPT2Config(vocab_size=LM_VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "models" / "tiny")  # built from a config here: nothing is downloaded
    (tmp_path / "hf.toml").write_text(
        '[[teachers]]\nname = "tiny"\nfactory = "transformers:AutoModelForCausalLM.from_pretrained"\n'
        'kwargs = { pretrained_model_name_or_path = "models/tiny" }\nfeatures = ["hidden_states.1", "transformer.h.1"]\n')
    path = make_tokens(7)
    run_infer(tmp_path / "hf.toml", str(path), tmp_path / "t.zarr", top_k=4, batch_size=4, chunk_rows=8, device="cpu")
    store = open_store(tmp_path / "t.zarr")
    data = load_data(str(path))
    assert dict(store.layout("tiny").features) == {"hidden_states.1": (8,), "transformer.h.1": (8,)}
    grid = BatchGrid(data, 4)
    hidden, block = [], []
    hook = model.transformer.h[1].register_forward_hook(lambda m, a, o: block.append(o[0] if isinstance(o, tuple) else o))
    with torch.inference_mode():  # the same padded batches stage one ran, captured directly
        for j in range(len(grid)):
            b = grid.batch(j, torch.device("cpu"))
            out = model(b.inputs, attention_mask=b.attention_mask, output_hidden_states=True)
            hidden.append(out.hidden_states[1].reshape(-1, 8)[b.real])
            block[-1] = block[-1].reshape(-1, 8)[b.real]
    hook.remove()
    stored = store.layout("tiny").tensors(store.read("tiny", 0, data.num_rows))
    for key, want in (("features/hidden_states.1", torch.cat(hidden)), ("features/transformer.h.1", torch.cat(block))):
        assert stored[key].shape == (data.num_rows, 8)
        assert torch.equal(stored[key].view(torch.int16), want.to(torch.float16).view(torch.int16))
    assert verify_store(tmp_path / "t.zarr").clean


def test_bad_feature_specs_are_refused_before_anything_is_written(tmp_path, make_data, make_teachers):
    data = make_data(20)
    for entry, error, match in (
        ({"name": "a", "features": ["nope"]}, BadInputError, "teacher 'a' has no module 'nope'"),
        ({"name": "a", "features": ["hidden_states.2"]}, TeacherOutputError, "hidden_states"),
    ):
        toml = make_teachers([entry])
        with pytest.raises(error, match=match):
            run_infer(toml, str(data), tmp_path / "s.zarr", device="cpu")
        assert not (tmp_path / "s.zarr").exists()
    # a stored teacher resumed with other features: refused, the store untouched
    run_infer(make_teachers([{"name": "a", "features": ["1"]}]), str(data), tmp_path / "s.zarr", device="cpu")
    before = snapshot(tmp_path / "s.zarr")
    with pytest.raises(StoreMismatchError, match="features"):
        run_infer(make_teachers([{"name": "a", "features": ["0"]}]), str(data), tmp_path / "s.zarr", device="cpu")
    assert snapshot(tmp_path / "s.zarr") == before
    # ... or its features (float16, the default) asked at another dtype: refused, the store untouched
    with pytest.raises(StoreMismatchError, match="float32"):
        run_infer(make_teachers([{"name": "a", "features": ["1"]}]), str(data), tmp_path / "s.zarr", device="cpu", dtype="float32")
    assert snapshot(tmp_path / "s.zarr") == before


def test_nan_features_are_refused_and_nothing_is_written(tmp_path, make_data, make_teachers, monkeypatch):
    data = make_data(20)
    toml = make_teachers([{"name": "a", "features": ["1"]}])
    original = FeatureTap.take

    def poisoned(self):  # the logits stay finite: only the stored feature is NaN, at row 3
        out = original(self)
        return {k: v.clone().index_fill_(0, torch.tensor([3]), float("nan")) for k, v in out.items()}

    monkeypatch.setattr(FeatureTap, "take", poisoned)
    with pytest.raises(TeacherOutputError, match="NaN/inf at row 3"):
        run_infer(toml, str(data), tmp_path / "s.zarr", device="cpu")
    assert not (tmp_path / "s.zarr").exists()
