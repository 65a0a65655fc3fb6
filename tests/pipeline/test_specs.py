"""Data specs (every form SPEC lists) and model TOML specs, including what they refuse."""

from __future__ import annotations

import hashlib
import textwrap

import numpy as np
import pytest
import torch
import zarr

from mtkd.pipeline.errors import CheckpointError, SpecError
from mtkd.pipeline.specs import (
    IGNORE_LABEL,
    fingerprint,
    load_data,
    load_student_spec,
    load_teacher_specs,
    make_array_data,
)

# TorchScript is deprecated by recent torch but is a model format SPEC accepts.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DATA_MODULE = textwrap.dedent(
    """
    import numpy as np
    import torch

    X = np.arange(24, dtype=np.float64).reshape(6, 4)
    Y = np.array([0, 1, 2, 0, 1, -100])

    def inputs():
        return X

    def pair():
        return X, Y

    def mapping():
        return {"x": torch.from_numpy(X), "y": torch.from_numpy(Y)}

    def no_x():
        return {"y": Y}

    def broken():
        raise RuntimeError("disk on fire")

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.from_numpy(X[i]), torch.tensor(Y[i])

    class Inputs(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.from_numpy(X[i])

    def dataset_pairs():
        return Pairs()

    def dataset_inputs():
        return Inputs()

    NOT_CALLABLE = 3
    """
)

X = np.arange(24, dtype=np.float32).reshape(6, 4)
Y = np.array([0, 1, 2, 0, 1, -100])


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "mtkd_test_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


# -- data specs ------------------------------------------------------------------------------------


def test_npz_with_and_without_labels(tmp_path):
    np.savez(tmp_path / "a.npz", x=X.astype(np.float64), y=Y)
    np.savez(tmp_path / "b.npz", x=X)
    a, b = load_data(str(tmp_path / "a.npz")), load_data(str(tmp_path / "b.npz"))
    assert a.x.dtype == np.float32 and np.array_equal(a.x, X) and np.array_equal(a.y, Y) and a.y.dtype == np.int64
    assert b.y is None and np.array_equal(b.labels, np.full(6, IGNORE_LABEL))
    assert a.fingerprint == b.fingerprint == fingerprint(X) and len(a) == 6 and a.spec == str(tmp_path / "a.npz")


def test_npy_and_zarr_array(tmp_path):
    np.save(tmp_path / "x.npy", X)
    z = zarr.open_array(tmp_path / "x.zarr", mode="w", shape=X.shape, dtype="float32")
    z[...] = X
    for spec in (tmp_path / "x.npy", tmp_path / "x.zarr"):
        data = load_data(str(spec))
        assert np.array_equal(data.x, X) and data.y is None and data.fingerprint == fingerprint(X)


@pytest.mark.parametrize("function", ["inputs", "pair", "mapping", "dataset_pairs", "dataset_inputs"])
def test_module_function_forms(data_module, function):
    data = load_data(f"mtkd_test_data:{function}")
    assert np.array_equal(data.x, X) and data.x.dtype == np.float32
    if function in ("pair", "mapping", "dataset_pairs"):
        assert np.array_equal(data.y, Y)
    else:
        assert data.y is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mtkd_test_data:no_x", "without 'x'"),
        ("mtkd_test_data:broken", "RuntimeError: disk on fire"),
        ("mtkd_test_data:missing", "has no attribute 'missing'"),
        ("mtkd_test_data:NOT_CALLABLE", "not callable"),
        ("mtkd_no_such_module:f", "cannot import mtkd_no_such_module"),
    ],
)
def test_module_function_refusals(data_module, spec, message):
    with pytest.raises(SpecError, match=message) as e:
        load_data(spec)
    assert spec in str(e.value)


def test_mnist1d_splits_are_generated_locally():
    train = load_data("mnist1d:train?n=100")
    test = load_data("mnist1d:test?n=100")
    unlabeled = load_data("mnist1d:unlabeled?n=100&seed=7")
    assert train.x.shape == (80, 40) and test.x.shape == (20, 40) and unlabeled.x.shape == (100, 40)
    assert set(np.unique(train.y)) <= set(range(10)) and unlabeled.y is None
    assert load_data("mnist1d:train?n=100").fingerprint == train.fingerprint  # same seed, same data
    assert load_data("mnist1d:train?n=100&seed=1").fingerprint != train.fingerprint


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist1d:validation", "split must be one of"),
        ("mnist1d:train?n=abc", "n=INT"),
        ("mnist1d:train?size=5", "n=INT"),
        ("mnist1d:train?n", "n=INT"),
        ("mnist1d:train?n=3", "at least 10"),
    ],
)
def test_mnist1d_refusals(spec, message):
    with pytest.raises(SpecError, match=message):
        load_data(spec)


def test_file_refusals(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.savez(tmp_path / "noxy.npz", inputs=X)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    for name, message in [
        ("missing.npz", "no such file"),
        ("missing.npy", "no such file"),
        ("junk.npz", "cannot read it"),
        ("junk.npy", "cannot read it"),
        ("objects.npy", "cannot read it"),
        ("noxy.npz", r"no array named 'x' \(found \['inputs'\]\)"),
        ("group.zarr", "not a Zarr array"),
        ("plain-name", "not a .npz/.npy file"),
    ]:
        with pytest.raises(SpecError, match=message):
            load_data(str(tmp_path / name))


def test_array_validation():
    with pytest.raises(SpecError, match="non-empty"):
        make_array_data("s", np.zeros((0, 3)))
    with pytest.raises(SpecError, match="numeric"):
        make_array_data("s", np.array(["a", "b"]))
    with pytest.raises(SpecError, match=r"shape \(6,\)"):
        make_array_data("s", X, Y[:5])
    with pytest.raises(SpecError, match="integers"):
        make_array_data("s", X, Y.astype(np.float32))
    with pytest.raises(SpecError, match="label -3 at row 2"):
        make_array_data("s", X, np.array([0, 1, -3, 0, 1, 2]))
    ints = make_array_data("s", np.arange(6).reshape(6, 1))
    assert ints.x.dtype == np.int64  # token ids stay integers


def test_fingerprint_is_the_bytes_dtype_and_shape():
    assert fingerprint(X) == fingerprint(X.copy())
    assert fingerprint(X) != fingerprint(X.reshape(4, 6))
    assert fingerprint(X) != fingerprint(X.astype(np.float64))
    changed = X.copy()
    changed[5, 3] = np.nextafter(changed[5, 3], np.inf)
    assert fingerprint(X) != fingerprint(changed)
    assert fingerprint(X[:, ::2]) == fingerprint(np.ascontiguousarray(X[:, ::2]))


# -- model specs -----------------------------------------------------------------------------------

MLP = 'factory = "mtkd.pipeline.models:mlp"\nkwargs = { in_features = 4, hidden = [5], num_classes = 3 }'


def _mlp():
    from mtkd.pipeline.models import mlp

    return mlp(4, [5], 3)


def test_relative_paths_resolve_against_the_toml(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "w").mkdir(parents=True)
    model = _mlp()
    torch.save(model.state_dict(), tmp_path / "cfg" / "w" / "a.pt")
    (tmp_path / "cfg" / "t.toml").write_text(f'[[teachers]]\nname = "a"\n{MLP}\ncheckpoint = "w/a.pt"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere than the TOML
    (spec,) = load_teacher_specs("cfg/t.toml")
    assert spec.checkpoint == tmp_path / "cfg" / "w" / "a.pt" and spec.source == tmp_path / "cfg" / "t.toml"
    built = spec.build()
    for name, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[name], value)
    assert spec.weights_sha256() == hashlib.sha256((tmp_path / "cfg" / "w" / "a.pt").read_bytes()).hexdigest()
    assert spec.to_dict() == {
        "name": "a",
        "factory": "mtkd.pipeline.models:mlp",
        "kwargs": {"in_features": 4, "hidden": [5], "num_classes": 3},
        "checkpoint": str(tmp_path / "cfg" / "w" / "a.pt"),
        "torchscript": None,
    }


def test_torchscript_teacher(tmp_path):
    model = _mlp().eval()
    torch.jit.script(model).save(str(tmp_path / "a.ts"))
    (tmp_path / "t.toml").write_text('[[teachers]]\nname = "a"\ntorchscript = "a.ts"\n')
    (spec,) = load_teacher_specs(tmp_path / "t.toml")
    x = torch.randn(3, 4)
    assert torch.equal(spec.build()(x), model(x))
    assert spec.weights_file == tmp_path / "a.ts" and spec.weights_sha256() is not None


def test_student_spec_and_model_without_checkpoint(tmp_path):
    (tmp_path / "s.toml").write_text(f'# mtkd train --student s.toml\n[student]\nname = "s"\n{MLP}\n')
    spec = load_student_spec(tmp_path / "s.toml")
    assert spec.name == "s" and spec.checkpoint is None and spec.weights_sha256() is None
    assert isinstance(spec.build(), torch.nn.Module)
    (tmp_path / "t.toml").write_text(f'[[teachers]]\nname = "a"\n{MLP}\n')
    with pytest.raises(SpecError, match=r"needs a \[student\] table"):
        load_student_spec(tmp_path / "t.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[teachers]\nname = 1", "not valid TOML"),
        ("", r"at least one \[\[teachers\]\]"),
        ('[teachers]\nname = "a"', r"at least one \[\[teachers\]\]"),
        (f'[[teachers]]\nname = "a"\n{MLP}\n[[teachers]]\nname = "a"\n{MLP}', "'a' appears twice"),
        (f'[[teachers]]\nname = "a"\n{MLP}\nepochs = 3', r"unknown keys \['epochs'\]"),
        (f'[[teachers]]\nname = "a/b"\n{MLP}', "needs a name"),
        (f"[[teachers]]\n{MLP}", "needs a name"),
        ('[[teachers]]\nname = "a"', "needs factory"),
        (f'[[teachers]]\nname = "a"\n{MLP}\ntorchscript = "a.ts"', "torchscript together with factory"),
        ('[[teachers]]\nname = "a"\nfactory = "m:f"\nkwargs = 3', "kwargs must be a table"),
        ('[[teachers]]\nname = "a"\nfactory = "m:f"\ncheckpoint = 3', "checkpoint must be a path string"),
    ],
)
def test_model_toml_refusals(tmp_path, text, message):
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(SpecError, match=message) as e:
        load_teacher_specs(tmp_path / "t.toml")
    assert "t.toml" in str(e.value)


def test_missing_toml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_teacher_specs(tmp_path / "none.toml")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ('"builtins:len"', "failed: TypeError"),
        ('"builtins:dict"', "returned dict, not a torch.nn.Module"),
        ('"mtkd.pipeline.models:IGNORED"', "has no attribute"),
        ('"nomodule_xyz:f"', "cannot import nomodule_xyz"),
        ('"no-colon"', "expected MODULE:NAME"),
    ],
)
def test_factory_refusals(tmp_path, factory, message):
    (tmp_path / "t.toml").write_text(f'[[teachers]]\nname = "a"\nfactory = {factory}\n')
    (spec,) = load_teacher_specs(tmp_path / "t.toml")
    with pytest.raises(SpecError, match=message):
        spec.build()


def test_checkpoint_refusals(tmp_path):
    torch.save({"not": "weights"}, tmp_path / "wrong.pt")
    torch.save({"evil": _Pickled()}, tmp_path / "pickle.pt")
    (tmp_path / "junk.ts").write_bytes(b"junk")
    for checkpoint, message in [("missing.pt", "does not exist"), ("wrong.pt", "does not load"), ("pickle.pt", "does not load")]:
        (tmp_path / "t.toml").write_text(f'[[teachers]]\nname = "a"\n{MLP}\ncheckpoint = "{checkpoint}"\n')
        (spec,) = load_teacher_specs(tmp_path / "t.toml")
        with pytest.raises(CheckpointError, match=message) as e:
            spec.build()
        assert checkpoint in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "t.toml").write_text('[[teachers]]\nname = "a"\ntorchscript = "junk.ts"\n')
    (spec,) = load_teacher_specs(tmp_path / "t.toml")
    with pytest.raises(CheckpointError, match="cannot load TorchScript"):
        spec.build()
    (tmp_path / "t.toml").write_text('[[teachers]]\nname = "a"\ntorchscript = "gone.ts"\n')
    (spec,) = load_teacher_specs(tmp_path / "t.toml")
    with pytest.raises(CheckpointError, match="does not exist"):
        spec.weights_sha256()


class _Pickled:
    """Not a tensor: loading it needs full unpickling, which weights_only refuses."""
