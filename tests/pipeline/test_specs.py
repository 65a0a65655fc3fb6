"""Model TOML specs: paths, factories (MODULE:CALLABLE, MODULE:Class.method), `run =`, weight hashing, refusals."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
import torch

from mtkd.pipeline.errors import CheckpointError, SpecError
from mtkd.pipeline.specs import load_student_spec, load_teacher_specs, spec_differences

# TorchScript is deprecated by recent torch but is a model format SPEC accepts.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


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
        "run": None,
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


def test_spec_differences_name_what_builds_another_model_and_ignore_where_files_lie():
    stored = {"name": "a", "factory": "m:f", "kwargs": {"hidden": [16], "depth": 2}, "checkpoint": "/old/a.pt",
              "torchscript": None, "run": None}
    moved = {**stored, "checkpoint": "/new/place/a.pt"}
    assert spec_differences(stored, moved) == []
    assert spec_differences(stored, {**stored, "kwargs": {"hidden": (16,), "depth": 2}}) == []  # as JSON stores it
    assert spec_differences(stored, {**stored, "kwargs": {"hidden": [32]}}) == [
        "kwargs.depth 2, not (not given)", "kwargs.hidden [16], not [32]"]
    assert spec_differences(stored, {**stored, "factory": "m:g"}) == ['factory "m:f", not "m:g"']
    assert spec_differences({"name": "a"}, moved) == []  # a spec that records no factory or kwargs
    hub = {"name": "h", "factory": "transformers:AutoModelForCausalLM.from_pretrained",
           "kwargs": {"pretrained_model_name_or_path": "/old/dir"}}
    assert spec_differences(hub, {**hub, "kwargs": {"pretrained_model_name_or_path": "/new/dir"}}) == []
