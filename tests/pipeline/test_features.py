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
