"""Fixtures for pipeline tests: tiny data files, tiny teachers (TOML + checkpoints), store snapshots.

Teachers are small MLPs (`mtkd.pipeline.models:mlp`, FEATURES -> CLASSES) or, for misbehaviour, the
`Odd` teacher of `odd_teachers` (NaN on marked rows, wrong shapes, slow forwards).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtkd.pipeline.specs import import_object
from tests.pipeline.s3_world import s3, s3_endpoint  # noqa: F401 - fixtures: a real S3 API (moto's server)

FEATURES, CLASSES = 8, 3


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread, and a loaded 2-core machine does not stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
NAN_MARKER = 1e4  # an input row whose first feature is this makes an "Odd" teacher in mode "nan" return NaN

ODD_TEACHERS_SOURCE = textwrap.dedent(
    '''
    """Teachers that misbehave on purpose (written by tests/pipeline/conftest.py).

    Both take `after` (the first `after` forward calls, batches, behave: "wider after batch N") and
    `fixed_by` (a path: once a file is there the teacher behaves, as if its code had been fixed while
    its spec stays the same). Modes "wide" / "narrow" give one class more / fewer.
    """
    import os
    import time

    import torch
    from torch import nn


    class Misbehaving(nn.Module):
        def behaves(self):
            self.calls = getattr(self, "calls", 0) + 1
            fixed = self.fixed_by is not None and os.path.exists(self.fixed_by)
            return self.mode == "ok" or fixed or self.calls <= self.after

        def bent_width(self, out):
            if self.mode == "wide":
                return torch.cat([out, out[..., :1]], dim=-1)
            return out[..., :-1] if self.mode == "narrow" else out


    class Odd(Misbehaving):
        def __init__(self, in_features=8, num_classes=3, mode="ok", sleep=0.0, after=0, fixed_by=None):
            super().__init__()
            self.linear = nn.Linear(in_features, num_classes)
            self.mode, self.sleep, self.after, self.fixed_by = mode, sleep, after, fixed_by

        def forward(self, x):
            if self.sleep:
                time.sleep(self.sleep)
            flat = x.flatten(1)
            out = self.linear(flat)
            if self.behaves():
                return out
            if self.mode in ("wide", "narrow"):
                out = self.bent_width(out)
            elif self.mode == "nan":
                out = out.masked_fill(flat[:, :1] > 1e3, float("nan"))
            elif self.mode == "rows":
                out = out[1:]
            elif self.mode == "3d":
                out = out[:, None]
            return out


    def odd(**kwargs):
        return Odd(**kwargs)


    class OddLM(Misbehaving):
        """A causal LM (each position sees only its own token) that can misbehave: mode "last" returns
        (B, V) (the last position only), "short" one position too few, "nan" NaN at token 13."""

        def __init__(self, vocab_size=40, classes=None, mode="ok", sleep=0.0, after=0, fixed_by=None):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, classes or vocab_size)  # ids < vocab_size -> logits over classes
            self.mode, self.sleep, self.after, self.fixed_by = mode, sleep, after, fixed_by

        def forward(self, input_ids):
            if self.sleep:
                time.sleep(self.sleep)
            out = self.embed(input_ids) * 3.0
            if self.behaves():
                return out
            if self.mode in ("wide", "narrow"):
                out = self.bent_width(out)
            elif self.mode == "last":
                out = out[:, -1]
            elif self.mode == "short":
                out = out[:, :-1]
            elif self.mode == "nan":
                out = out.masked_fill((input_ids == 13)[..., None], float("nan"))
            return out


    def odd_lm(**kwargs):
        return OddLM(**kwargs)
    '''
)

LM_VOCAB = 40  # the token data's vocabulary: ids 0..LM_VOCAB-1


@pytest.fixture
def make_data(tmp_path: Path) -> Callable[..., Path]:
    """make_data(n=..., labelled=True, name="data.npz", seed=0, nan_row=None) -> path of an .npz."""

    def make(n: int = 100, *, labelled: bool = True, name: str = "data.npz", seed: int = 0, nan_row: int | None = None) -> Path:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, FEATURES)).astype(np.float32)
        if nan_row is not None:
            x[nan_row, 0] = NAN_MARKER
        path = tmp_path / name
        if labelled:
            y = rng.integers(0, CLASSES, n)
            y[::7] = -100  # some rows unlabelled
            np.savez(path, x=x, y=y)
        else:
            np.savez(path, x=x)
        return path

    return make


@pytest.fixture
def make_tokens(tmp_path: Path) -> Callable[..., Path]:
    """make_tokens(n=12, name="tokens.npz", seed=0, vocab=LM_VOCAB, lengths=(3, 11)) -> an .npz of
    right-padded input_ids with attention_mask: n sequences of random lengths in [lengths)."""

    def make(n: int = 12, *, name: str = "tokens.npz", seed: int = 0, vocab: int = LM_VOCAB, lengths=(3, 11)) -> Path:
        rng = np.random.default_rng(seed)
        sizes = rng.integers(lengths[0], lengths[1], n)
        ids = np.zeros((n, int(sizes.max())), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, size in enumerate(sizes):
            ids[i, :size] = rng.integers(0, vocab, size)
            mask[i, :size] = 1
        path = tmp_path / name
        np.savez(path, input_ids=ids, attention_mask=mask)
        return path

    return make


@pytest.fixture
def odd_teachers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Writes the module `mtkd_test_teachers` into tmp_path and makes it importable; returns the folder."""
    (tmp_path / "mtkd_test_teachers.py").write_text(ODD_TEACHERS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def make_teachers(tmp_path: Path) -> Callable[..., Path]:
    """make_teachers([{"name": "a"}, {"name": "b", "seed": 1, "num_classes": 4}, ...]) -> TOML path.

    Each entry: name; optional factory ("mtkd.pipeline.models:mlp" or "mtkd_test_teachers:odd"),
    kwargs, seed (of the saved weights), num_classes, torchscript=True, checkpoint (a path to use
    instead of saving one). Checkpoints are written next to the TOML, under relative paths.
    """

    def make(entries: list[dict[str, Any]], *, folder: Path | None = None, filename: str = "teachers.toml") -> Path:
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"# mtkd infer --teachers {filename} --data data.npz --out store.zarr"]
        for entry in entries:
            name = entry["name"]
            factory = entry.get("factory", "mtkd.pipeline.models:mlp")
            kwargs = dict(entry.get("kwargs", {}))
            if factory in ("mtkd.pipeline.models:mlp", "mtkd_test_teachers:odd"):  # row teachers
                kwargs.setdefault("num_classes", entry.get("num_classes", CLASSES))
                kwargs.setdefault("in_features", FEATURES)
            if factory == "mtkd.pipeline.models:mlp":
                kwargs.setdefault("hidden", [16])
            lines.append("[[teachers]]")
            lines.append(f'name = "{name}"')
            if entry.get("features"):  # v3: modules whose outputs stage one stores
                lines.append("features = [" + ", ".join(f'"{m}"' for m in entry["features"]) + "]")
            if "checkpoint" in entry:
                lines += [f'factory = "{factory}"', f"kwargs = {_toml_inline(kwargs)}", f'checkpoint = "{entry["checkpoint"]}"']
                continue
            torch.manual_seed(entry.get("seed", 0))
            model = import_object(factory, what="test factory")(**kwargs)
            if entry.get("torchscript"):
                torch.jit.script(model).save(str(folder / f"{name}.ts"))
                lines.append(f'torchscript = "{name}.ts"')
            else:
                torch.save(model.state_dict(), folder / f"{name}.pt")
                lines += [f'factory = "{factory}"', f"kwargs = {_toml_inline(kwargs)}", f'checkpoint = "{name}.pt"']
            lines.append("")
        path = folder / filename
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def _toml_inline(d: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in d.items()) + " }"


def refused(result: Any, *culprits: Any) -> str:
    """A CLI result that exited 2 with a one-line message (on stderr) naming every culprit."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for culprit in culprits:
        assert str(culprit) in message, message
    return message


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): two equal snapshots are bit-identical trees."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- stage two (loader, train, eval): a tiny distillation world --------------------------------------

KD_FEATURES, KD_CLASSES, KD_TEACHERS = 8, 5, ("a", "b", "c")


def write_store(path: Path, x: np.ndarray, y: np.ndarray | None, logits: dict[str, np.ndarray], *,
                chunk_rows: int, dtype: str = "float16", spec: str | None = None, skip_blocks: tuple[int, ...] = ()) -> Path:
    """A store of `x` holding the given (N, V) logits per teacher (dense), written block by block
    through stage one's block writer. Teachers with `skip_blocks` stay incomplete."""
    from mtkd.pipeline.data import make_row_data
    from mtkd.pipeline.infer import write_logits_block
    from mtkd.pipeline.layouts import Dense
    from mtkd.pipeline.report import StatsSums
    from mtkd.pipeline.store import create_store

    data = make_row_data(spec or str(path), x, y)
    vocab = next(iter(logits.values())).shape[1]
    store, _ = create_store(path, data=data, num_classes=vocab, chunk_rows=chunk_rows)
    labels = torch.from_numpy(data.labels)
    layout = Dense(dtype, vocab)
    for name, z in logits.items():
        store.add_teacher(name, spec={"name": name}, weights_sha256=None, layout=layout, stats_width=StatsSums.width(layout))
        for block in range(store.num_blocks):
            if block in skip_blocks:
                continue
            start, stop = store.block_range(block)
            write_logits_block(store, name, block, torch.from_numpy(z[start:stop]).to(getattr(torch, dtype)), labels[start:stop])
        if not skip_blocks:
            store.mark_complete(name, {})
    return path


def kd_teacher_logits(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Three linear teachers that share most of their rule (so that they mostly agree)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((KD_FEATURES, KD_CLASSES))
    return {
        name: (2.0 * x @ (shared + 0.7 * rng.standard_normal((KD_FEATURES, KD_CLASSES)))).astype(np.float32)
        for name in KD_TEACHERS
    }


class KDWorld:
    """Tiny data sets with stores of three linear teachers, and an MLP student TOML, under `root`.

    labelled.npz (x, y: the teachers' shared rule), unlabelled.npz (x only), val.npz (x, y), each of
    `rows` rows, stores labelled.zarr and unlabelled.zarr (chunks of `chunk_rows` rows, float16).
    """

    rows, chunk_rows = 384, 50

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.student = root / "student.toml"
        self.student.write_text(
            "# mtkd train --student student.toml --data labelled.npz --store labelled.zarr --out run\n"
            "[student]\n"
            'name = "mlp"\n'
            'factory = "mtkd.pipeline.models:mlp"\n'
            f"kwargs = {{ in_features = {KD_FEATURES}, hidden = [32], num_classes = {KD_CLASSES} }}\n"
        )
        self.x, self.y, self.logits, self.data, self.store = {}, {}, {}, {}, {}
        for seed, name in enumerate(("labelled", "unlabelled", "val")):
            rng = np.random.default_rng(100 + seed)
            x = rng.standard_normal((self.rows, KD_FEATURES)).astype(np.float32)
            logits = kd_teacher_logits(x)
            y = np.mean([np.eye(KD_CLASSES)[z.argmax(1)] for z in logits.values()], axis=0).argmax(1)
            self.x[name], self.logits[name] = x, logits
            self.y[name] = y if name != "unlabelled" else None
            self.data[name] = root / f"{name}.npz"
            if name == "unlabelled":
                np.savez(self.data[name], x=x)
            else:
                np.savez(self.data[name], x=x, y=y)
            if name != "val":
                self.store[name] = write_store(root / f"{name}.zarr", x, self.y[name], logits,
                                               chunk_rows=self.chunk_rows, spec=str(self.data[name]))

    def teacher_stack(self, name: str, teachers=KD_TEACHERS) -> torch.Tensor:
        """(K, N, V) float32 of the stored (float16-rounded) logits."""
        return torch.stack([torch.from_numpy(self.logits[name][t]).half().float() for t in teachers])


@pytest.fixture(scope="session")
def kd_world(tmp_path_factory: pytest.TempPathFactory) -> KDWorld:
    return KDWorld(tmp_path_factory.mktemp("kd_world"))
