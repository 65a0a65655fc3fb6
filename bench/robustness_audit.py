"""The robustness audit of issue 11, rerunnable: bad inputs, corruptions of a finished store, kill -9s.

    python bench/robustness_audit.py [--kills 8] [--json audit.json]

1. Bad inputs: each is one real `mtkd` invocation (in process, through typer's CliRunner) that must
   exit 2 with one line on stderr starting "error: " (typer's own usage errors, which print a box,
   are counted apart), no traceback, and nothing written: the working folder's files are the same
   bytes before and after.
2. Corruptions of a finished store (two teachers, float16 and bfloat16): each must make
   `mtkd verify` exit 2; then `verify --repair` and the same `mtkd infer` must bring the store back
   to the bytes of the undamaged store.
3. Kills: `mtkd infer` in a subprocess, SIGKILLed at a random moment, then run again to the end;
   the store must equal, byte for byte, one that was never interrupted.
4. Token-path corruptions (issue 16) of a finished top-k store (two GRU LMs, V 256, k 16, T 1 and 2,
   8 blocks) and a second store of other data: chunks copied from the other store or swapped between
   blocks, a whole block copied, labels copied, a teacher's arrays swapped between blocks, vocab_size /
   top_k / temperatures edited, damaged labels and offsets chunks, a deleted topk_ids chunk. Each must
   make `mtkd verify` exit 2 and `mtkd train` (and `mtkd inspect`) exit 2 without a traceback; then
   `verify --repair` and the same `mtkd infer` must give back the undamaged store's bytes.

Prints one line per case that does not hold and a summary table; `--json` writes every case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from typer.testing import CliRunner

from mtkd.pipeline.cli import app

FEATURES, CLASSES, ROWS, CHUNK = 8, 3, 40, 8
runner = CliRunner()


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


class World:
    """Data files, teacher TOMLs, a student and a finished store, under one folder."""

    def __init__(self, root: Path):
        self.root = root
        rng = np.random.default_rng(0)
        x = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
        y = rng.integers(0, CLASSES, ROWS)
        np.savez(root / "data.npz", x=x, y=y)
        np.savez(root / "other.npz", x=x + 1, y=y)
        np.savez(root / "unlabelled.npz", x=x)
        np.savez(root / "big_labels.npz", x=x, y=np.full(ROWS, CLASSES + 2))
        for name, bad in (("nan", np.nan), ("inf", np.inf)):
            z = x.copy()
            z[11, 2] = bad
            np.savez(root / f"{name}.npz", x=z, y=y)
        (root / "file").write_text("")
        (root / "odd_teachers.py").write_text(ODD)
        sys.path.insert(0, str(root))
        self.teachers = self.toml("teachers.toml", [("a", "float16", 0), ("b", "bfloat16", 1)])
        self.a_only = self.toml("a.toml", [("a", "float16", 0)])
        self.b_only = self.toml("b.toml", [("b", "bfloat16", 1)])
        self.a_other = self.toml("a_other.toml", [("a", "float16", 7)])
        self.student = root / "student.toml"
        self.student.write_text('[student]\nname = "m"\nfactory = "mtkd.pipeline.models:mlp"\n'
                                f"kwargs = {{ in_features = {FEATURES}, hidden = [8], num_classes = {CLASSES} }}\n")
        self.student5 = root / "student5.toml"
        self.student5.write_text(self.student.read_text().replace(f"num_classes = {CLASSES}", "num_classes = 5"))
        self.store = root / "store.zarr"
        self.infer(self.store)
        self.pristine = snapshot(self.store)
        self.run = root / "run"
        assert invoke("train", "--student", self.student, "--data", root / "data.npz", "--store", self.store,
                      "--out", self.run, "--epochs", 1, "--batch-size", 16, "--quiet").exit_code == 0

    def toml(self, filename: str, entries: list[tuple[str, str, int]], extra: str = "") -> Path:
        lines = []
        for name, _, seed in entries:
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, CLASSES))
            torch.save(model.state_dict(), self.root / f"w{seed}.pt")
            lines += ["[[teachers]]", f'name = "{name}"', 'factory = "mtkd.pipeline.models:mlp"',
                      f"kwargs = {{ in_features = {FEATURES}, hidden = [16], num_classes = {CLASSES} }}",
                      f'checkpoint = "w{seed}.pt"', ""]
        path = self.root / filename
        path.write_text("\n".join(lines) + extra)
        return path

    def teacher_toml(self, filename: str, body: str) -> Path:
        path = self.root / filename
        path.write_text(textwrap.dedent(body))
        return path

    def infer(self, store: Path) -> None:
        # One teacher per dtype: the same two calls whenever the store is (re)built.
        for toml, dtype in ((self.a_only, "float16"), (self.b_only, "bfloat16")):
            result = invoke("infer", "--teachers", toml, "--data", self.root / "data.npz", "--out", store,
                            "--chunk-rows", CHUNK, "--batch-size", 4, "--dtype", dtype, "--quiet")
            assert result.exit_code == 0, result.output


ODD = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Odd(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.linear, self.mode = nn.Linear(8, 3), mode

        def forward(self, x):
            out = self.linear(x)
            return {"nan": out * float("nan"), "shape": out[:, :2], "rows": out[1:]}[self.mode]
    """
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- 1. bad inputs -----------------------------------------------------------------------------------


def bad_inputs(w: World) -> list[tuple[str, list]]:
    r, d = w.root, w.root / "data.npz"
    infer = ["infer", "--teachers", w.teachers, "--data", d, "--out", r / "new.zarr", "--quiet"]
    train = ["train", "--student", w.student, "--data", d, "--store", w.store, "--out", r / "new_run", "--quiet"]

    def with_(args, flag, value):
        i = args.index(flag)
        return args[: i + 1] + [value] + args[i + 2 :]

    def named(name):
        return with_(infer, "--teachers", w.toml(f"name_{len(name)}_{abs(hash(name))}.toml", [(name, "float16", 0)]))

    def odd(mode):
        return with_(infer, "--teachers", w.teacher_toml(
            f"odd_{mode}.toml", f'[[teachers]]\nname = "o"\nfactory = "odd_teachers:Odd"\nkwargs = {{ mode = "{mode}" }}\n'))

    return [
        ("infer: data file missing", with_(infer, "--data", r / "missing.npz")),
        ("infer: NaN in data", with_(infer, "--data", r / "nan.npz")),
        ("infer: inf in data", with_(infer, "--data", r / "inf.npz")),
        ("infer: data spec of no known form", with_(infer, "--data", "what")),
        ("infer: mnist1d split unknown", with_(infer, "--data", "mnist1d:valid")),
        ("infer: teacher named .", named(".")),
        ("infer: teacher named ..", named("..")),
        ("infer: teacher named zarr.json", named("zarr.json")),
        ("infer: teacher name of 101 chars", named("t" * 101)),
        ("infer: teacher name with a slash", named("a/b")),
        ("infer: teachers TOML not TOML", with_(infer, "--teachers", w.teacher_toml("bad.toml", "[[teachers]\n"))),
        ("infer: duplicate teacher names", with_(infer, "--teachers", w.teacher_toml("dup.toml", w.a_only.read_text() * 2))),
        ("infer: missing checkpoint", with_(infer, "--teachers", w.teacher_toml("nockpt.toml", w.a_only.read_text().replace("w0.pt", "gone.pt")))),
        ("infer: checkpoint of another architecture", with_(infer, "--teachers", w.teacher_toml(
            "arch.toml", w.a_only.read_text().replace("hidden = [16]", "hidden = [32]")))),
        ("infer: factory not importable", with_(infer, "--teachers", w.teacher_toml(
            "imp.toml", '[[teachers]]\nname = "x"\nfactory = "no_such_module:f"\n'))),
        ("infer: teacher returns NaN", odd("nan")),
        ("infer: teacher returns the wrong width", odd("shape")),
        ("infer: teacher returns the wrong rows", odd("rows")),
        ("infer: labels beyond the classes", with_(infer, "--data", r / "big_labels.npz")),
        ("infer: --out below a file", with_(infer, "--out", r / "file" / "s.zarr")),
        ("infer: --out a folder that is no store", with_(infer, "--out", r)),
        ("infer: store of other data", with_(with_(infer, "--out", w.store), "--data", r / "other.npz")),
        ("infer: same-named teacher, other weights", with_(with_(infer, "--out", w.store), "--teachers", w.a_other)),
        ("infer: --batch-size 0", infer + ["--batch-size", "0"]),
        ("infer: --shard 3/2", infer + ["--shard", "3/2"]),
        ("infer: --shard x", infer + ["--shard", "x"]),
        ("infer: --dtype float8", infer + ["--dtype", "float8"]),
        ("infer: --device tpu", infer + ["--device", "tpu"]),
        ("train: NaN in data", with_(train, "--data", r / "nan.npz")),
        ("train: store of other data", with_(train, "--data", r / "other.npz")),
        ("train: store missing", with_(train, "--store", r / "nowhere.zarr")),
        ("train: --store a folder that is no store", with_(train, "--store", r)),
        ("train: --out below a file", with_(train, "--out", r / "file" / "run")),
        ("train: --out a finished run, no --resume", with_(train, "--out", w.run)),
        ("train: --temperature 0", train + ["--temperature", "0"]),
        ("train: --alpha 2", train + ["--alpha", "2"]),
        ("train: --teachers unknown", train + ["--teachers", "zzz"]),
        ("train: --teacher-weights malformed", train + ["--fusion", "weighted", "--teacher-weights", "a=x"]),
        ("train: --teacher-weights without weighted", train + ["--teacher-weights", "a=1,b=1"]),
        ("train: --fusion unknown", train + ["--fusion", "median"]),
        ("train: student of other width", with_(train, "--student", w.student5)),
        ("train: --val-data without labels", train + ["--val-data", str(r / "unlabelled.npz")]),
        ("train: hard labels on unlabelled data", ["train", "--student", w.student, "--data", r / "unlabelled.npz",
                                                   "--out", r / "new_run", "--quiet"]),
        ("eval: NaN in data", ["eval", w.run, "--data", r / "nan.npz"]),
        ("eval: run folder without config.json", ["eval", r, "--data", d]),
        ("eval: --model without --checkpoint", ["eval", "--model", w.student, "--data", d]),
        ("eval: data without labels", ["eval", w.run, "--data", r / "unlabelled.npz"]),
        ("inspect: not a store", ["inspect", r, "--quiet"]),
        ("verify: not a store", ["verify", r, "--quiet"]),
        ("verify: no such path", ["verify", r / "nowhere", "--quiet"]),
    ]


def check_bad_input(w: World, label: str, args: list) -> dict:
    before = snapshot(w.root)
    result = invoke(*args)
    after = snapshot(w.root)
    message = result.stderr.strip()
    usage = "Usage:" in message or "Invalid value" in message  # typer's own parser (a box, not one line)
    traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
    ok = result.exit_code == 2 and not traceback and after == before and (usage or (message.startswith("error: ") and "\n" not in message))
    written = sorted(set(after) ^ set(before)) + [k for k in before if k in after and before[k] != after[k]]
    return {"case": label, "ok": ok, "exit": result.exit_code, "usage_error": usage, "traceback": traceback,
            "written": written[:5], "message": message.splitlines()[0] if message else repr(result.exception)}


# -- 2. corruptions ----------------------------------------------------------------------------------


def _chunk(store: Path, teacher: str, block: int) -> Path:
    return store / "teachers" / teacher / "logits" / "c" / str(block) / "0"


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def corruptions() -> dict:
    def flip(store):
        c = _chunk(store, "a", 1)
        raw = bytearray(c.read_bytes())
        raw[5] ^= 0x10
        c.write_bytes(bytes(raw))

    def nan(store):
        zarr.open_array(store / "teachers" / "a" / "logits", mode="r+")[9, 0] = np.nan

    def inf(store):
        zarr.open_array(store / "teachers" / "a" / "logits", mode="r+")[30, 1] = np.inf

    def nan_bytes(store):  # NaN bits written into the chunk file (a bfloat16 NaN: 0x7FC0)
        c = _chunk(store, "b", 2)
        raw = bytearray(c.read_bytes())
        raw[0:2] = (0x7FC0).to_bytes(2, "little")
        c.write_bytes(bytes(raw))

    def all_records(store):
        for p in (store / "teachers" / "b" / "done" / "c").iterdir():
            p.unlink()

    return {
        "chunk deleted": lambda s: _chunk(s, "a", 0).unlink(),
        "last chunk deleted": lambda s: _chunk(s, "b", 4).unlink(),
        "chunk truncated": lambda s: _chunk(s, "a", 3).write_bytes(_chunk(s, "a", 3).read_bytes()[:7]),
        "chunk emptied": lambda s: _chunk(s, "b", 1).write_bytes(b""),
        "chunk grown": lambda s: _chunk(s, "a", 2).write_bytes(_chunk(s, "a", 2).read_bytes() + b"\0" * 8),
        "byte flipped": flip,
        "NaN bytes in a chunk": nan_bytes,
        "NaN written through zarr": nan,
        "inf written through zarr": inf,
        "record deleted": lambda s: (s / "teachers" / "a" / "done" / "c" / "2").unlink(),
        "every record deleted": all_records,
        "logical_dtype edited": lambda s: _edit_json(s / "teachers" / "a" / "logits" / "zarr.json",
                                                     lambda m: m["attributes"].update(logical_dtype="bfloat16")),
        "teacher dtype edited": lambda s: _edit_json(s / "teachers" / "b" / "zarr.json",
                                                     lambda m: m["attributes"].update(dtype="float16")),
        "num_rows edited": lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"]["mtkd"].update(num_rows=ROWS + 8)),
        "chunk_rows edited": lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"]["mtkd"].update(chunk_rows=CHUNK * 2)),
        "chunks of two blocks swapped": lambda s: _swap(_chunk(s, "a", 0), _chunk(s, "a", 1)),
    }


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def check_corruption(w: World, label: str, damage) -> dict:
    store = w.root / "damaged.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(w.store, store)
    damage(store)
    found = invoke("verify", store, "--json", "--quiet")
    detected = found.exit_code == 2
    kinds = []
    if found.stdout.strip():
        kinds = sorted({f["kind"] for f in json.loads(found.stdout.strip().splitlines()[-1])["findings"]})
    invoke("verify", store, "--repair", "--quiet")
    clean = invoke("verify", store, "--quiet").exit_code == 0
    w.infer(store)
    identical = snapshot(store) == w.pristine
    return {"case": label, "detected": detected, "kinds": kinds, "clean_after_repair": clean, "identical_after_rerun": identical}


# -- 4. token-path corruptions (issue 16) ------------------------------------------------------------

VOCAB, SEQS, SEQ_LEN, TOKEN_CHUNK = 256, 48, 12, 64


class TokenWorld:
    """Token data (and other data), two GRU LM teachers with checkpoints, a student, and two finished
    top-k stores: `store` of the data and `other` of the other data."""

    def __init__(self, root: Path):
        from mtkd.pipeline.models import gru_lm

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        for name, seed in (("tokens.npz", 0), ("other_tokens.npz", 1)):
            ids = np.random.default_rng(seed).integers(0, VOCAB, (SEQS, SEQ_LEN))
            mask = np.ones_like(ids)
            mask[::5, SEQ_LEN - 3 :] = 0  # some shorter sequences
            np.savez(root / name, input_ids=ids, attention_mask=mask)
        del rng
        lines = []
        for seed, name in enumerate(("g1", "g2")):
            torch.manual_seed(seed)
            torch.save(gru_lm(VOCAB, hidden=16).state_dict(), root / f"{name}.pt")
            lines += ["[[teachers]]", f'name = "{name}"', 'factory = "mtkd.pipeline.models:gru_lm"',
                      f"kwargs = {{ vocab_size = {VOCAB}, hidden = 16 }}", f'checkpoint = "{name}.pt"', ""]
        self.teachers = root / "lm_teachers.toml"
        self.teachers.write_text("\n".join(lines))
        self.student = root / "lm_student.toml"
        self.student.write_text(f'[student]\nname = "s"\nfactory = "mtkd.pipeline.models:gru_lm"\n'
                                f"kwargs = {{ vocab_size = {VOCAB}, hidden = 8 }}\n")
        self.store, self.other = root / "lm.zarr", root / "lm_other.zarr"
        self.infer(self.store)
        self.infer(self.other, root / "other_tokens.npz")
        self.pristine = snapshot(self.store)

    def infer(self, store: Path, data: Path | None = None):
        result = invoke("infer", "--teachers", self.teachers, "--data", data or self.root / "tokens.npz", "--out", store,
                        "--top-k", 16, "--temperatures", "1,2", "--chunk-rows", TOKEN_CHUNK, "--batch-size", 8,
                        "--device", "cpu", "--quiet")
        assert result.exit_code == 0, result.output
        return result

    def train(self, store: Path, *extra):
        return invoke("train", "--student", self.student, "--data", self.root / "tokens.npz", "--store", store,
                      "--out", self.root / "lm_run", "--max-steps", 2, "--batch-size", 8, "--device", "cpu", "--quiet", *extra)


def _chunk_path(store: Path, teacher: str, array: str, block: int) -> Path:
    folder = store / "teachers" / teacher / array / "c" / str(block)
    return folder if folder.is_file() else folder / "0"


def _copy_from(other: Path, rel: str, store: Path) -> None:
    shutil.copyfile(other / rel, store / rel)


def token_corruptions(w: TokenWorld) -> dict:
    o = w.other
    rows_arrays = ("topk_ids", "topk_logprobs", "lse", "label_logprob", "block_stats")

    def chunk_from_other(store):
        shutil.copyfile(_chunk_path(o, "g1", "topk_ids", 2), _chunk_path(store, "g1", "topk_ids", 2))

    def block_from_other(store):  # every array's chunk and the record: a whole block of other data
        for a in rows_arrays:
            shutil.copyfile(_chunk_path(o, "g1", a, 3), _chunk_path(store, "g1", a, 3))
        shutil.copyfile(o / "teachers/g1/done/c/3", store / "teachers/g1/done/c/3")

    def block_arrays_from_other(store):  # every array's chunk, the record kept
        for a in rows_arrays:
            shutil.copyfile(_chunk_path(o, "g1", a, 3), _chunk_path(store, "g1", a, 3))

    def labels_from_other(store):
        shutil.copyfile(o / "labels/c/0", store / "labels/c/0")

    def arrays_swapped(store):  # a teacher's arrays swapped between blocks 1 and 5 (records kept)
        for a in rows_arrays:
            _swap(_chunk_path(store, "g2", a, 1), _chunk_path(store, "g2", a, 5))

    def attr(key, value):
        return lambda s: _edit_json(s / "teachers" / "g1" / "zarr.json", lambda m: m["attributes"].update({key: value}))

    def damage(path: Path):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x20
        path.write_bytes(bytes(raw))

    return {
        "tokens: topk_ids chunk copied from a store of other data": chunk_from_other,
        "tokens: whole block (chunks and record) copied from a store of other data": block_from_other,
        "tokens: a block's five arrays copied from a store of other data": block_arrays_from_other,
        "tokens: labels copied from a store of other data": labels_from_other,
        "tokens: two topk_logprobs chunks swapped": lambda s: _swap(_chunk_path(s, "g1", "topk_logprobs", 0), _chunk_path(s, "g1", "topk_logprobs", 6)),
        "tokens: a teacher's arrays swapped between two blocks": arrays_swapped,
        "tokens: vocab_size edited 256 -> 128": attr("vocab_size", 128),
        "tokens: top_k edited 16 -> 8": attr("top_k", 8),
        "tokens: temperatures relabelled [1, 2] -> [1, 3]": attr("temperatures", [1.0, 3.0]),
        "tokens: damaged labels chunk": lambda s: damage(s / "labels/c/0"),
        "tokens: damaged offsets chunk": lambda s: damage(s / "sequences/offsets/c/0"),
        "tokens: topk_ids chunk of a recorded block deleted": lambda s: _chunk_path(s, "g2", "topk_ids", 4).unlink(),
    }


def check_token_corruption(w: TokenWorld, label: str, damage) -> dict:
    store = w.root / "lm_damaged.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(w.root / "lm_run", ignore_errors=True)
    shutil.copytree(w.store, store)
    damage(store)
    found = invoke("verify", store, "--json", "--quiet")
    kinds = []
    if found.stdout.strip():
        kinds = sorted({f["kind"] for f in json.loads(found.stdout.strip().splitlines()[-1])["findings"] if f["damage"]})
    train = w.train(store, *(["-T", "3"] if "temperatures" in label else []))
    inspect = invoke("inspect", store, "--quiet", "--json")
    traceback = any(r.exception is not None and not isinstance(r.exception, SystemExit) for r in (found, train, inspect))
    repair = invoke("verify", store, "--repair", "--quiet")
    w.infer(store)
    after = invoke("verify", store, "--quiet")
    return {"case": label, "detected": found.exit_code == 2, "kinds": kinds, "train_exit": train.exit_code,
            "train_message": (train.stderr.strip().splitlines() or [""])[-1][:300], "inspect_exit": inspect.exit_code,
            "traceback": traceback, "repaired": repair.stdout.count("repaired "), "clean_after_rerun": after.exit_code == 0,
            "identical_after_rerun": snapshot(store) == w.pristine}


# -- 3. kills ----------------------------------------------------------------------------------------


def check_kills(w: World, kills: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    slow = w.teacher_toml("slow.toml", w.teachers.read_text() + "")
    # A slow teacher module, so that a kill lands mid-run: every forward sleeps 50 ms.
    (w.root / "slow_teachers.py").write_text(textwrap.dedent(
        """
        import time
        from mtkd.pipeline.models import mlp

        def slow_mlp(**kwargs):
            model = mlp(**kwargs)
            forward = model.forward
            def slowed(x):
                time.sleep(0.05)
                return forward(x)
            model.forward = slowed
            return model
        """))
    slow.write_text(w.teachers.read_text().replace("mtkd.pipeline.models:mlp", "slow_teachers:slow_mlp"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(w.root), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "mtkd.pipeline.cli", "infer", "--teachers", str(slow), "--data", str(w.root / "data.npz"),
            "--chunk-rows", str(CHUNK), "--batch-size", "2", "--quiet"]
    reference = w.root / "reference.zarr"
    subprocess.run([*args, "--out", str(reference)], check=True, env=env, cwd=w.root, capture_output=True)
    expected = snapshot(reference)
    results = []
    records = ROWS // CHUNK * 2
    for i in range(kills):
        store = w.root / f"killed{i}.zarr"
        proc = subprocess.Popen([*args, "--out", str(store)], env=env, cwd=w.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill mid-run: once a chosen number of records exist, after a random part of a block's time.
        target, extra = rng.randint(0, records - 1), rng.uniform(0.0, 0.5)
        while proc.poll() is None and len(list(store.glob("teachers/*/done/c/*"))) < target:
            time.sleep(0.01)
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        blocks = len(list(store.glob("teachers/*/done/c/*"))) if store.exists() else 0
        rerun = subprocess.run([*args, "--out", str(store)], env=env, cwd=w.root, capture_output=True, text=True)
        results.append({"case": f"kill at {blocks} of {records} records ({extra:.2f} s after record {target})",
                        "rerun_exit": rerun.returncode, "identical": rerun.returncode == 0 and snapshot(store) == expected})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        w = World(Path(tmp))
        bad = [check_bad_input(w, label, args) for label, args in bad_inputs(w)]
        corrupt = [check_corruption(w, label, damage) for label, damage in corruptions().items()]
        tw = TokenWorld(Path(tmp) / "tokens")
        assert tw.train(tw.store).exit_code == 0, "training on the undamaged token store must work"
        tokens = [check_token_corruption(tw, label, damage) for label, damage in token_corruptions(tw).items()]
        kills = check_kills(w, a.kills, a.seed)
    for r in bad:
        if not r["ok"]:
            print(f"bad input NOT refused cleanly: {r['case']}: exit {r['exit']}, traceback {r['traceback']}, wrote {r['written']}: {r['message']}")
    for r in corrupt:
        if not (r["detected"] and r["identical_after_rerun"]):
            print(f"corruption: {r['case']}: detected {r['detected']} {r['kinds']}, identical after repair and rerun {r['identical_after_rerun']}")
    for r in tokens:
        if not (r["detected"] and r["train_exit"] == 2 and not r["traceback"] and r["identical_after_rerun"]):
            print(f"token corruption: {r['case']}: detected {r['detected']} {r['kinds']}, train exit {r['train_exit']}, "
                  f"inspect exit {r['inspect_exit']}, traceback {r['traceback']}, identical after repair and rerun {r['identical_after_rerun']}")
    for r in kills:
        if not r["identical"]:
            print(f"kill: {r['case']}: rerun exit {r['rerun_exit']}, not identical")
    usage = sum(r["ok"] and r["usage_error"] for r in bad)
    print(f"bad inputs: {len(bad)} tried, {sum(r['ok'] for r in bad)} refused cleanly ({usage} of them by typer's parser)")
    print(f"corruptions: {len(corrupt)} tried, {sum(r['detected'] for r in corrupt)} detected by verify, "
          f"{sum(r['identical_after_rerun'] for r in corrupt)} bit-identical after verify --repair and the rerun")
    print(f"token corruptions: {len(tokens)} tried, {sum(r['detected'] for r in tokens)} detected by verify, "
          f"{sum(r['train_exit'] == 2 for r in tokens)} refused by train (exit 2), {sum(r['inspect_exit'] == 2 for r in tokens)} by inspect, "
          f"{sum(r['traceback'] for r in tokens)} tracebacks, {sum(r['identical_after_rerun'] for r in tokens)} bit-identical after "
          "verify --repair and the same infer")
    print(f"kills: {len(kills)} tried, {sum(r['identical'] for r in kills)} resumed bit-identical")
    if a.json:
        a.json.write_text(json.dumps({"bad_inputs": bad, "corruptions": corrupt, "token_corruptions": tokens, "kills": kills}, indent=2))


if __name__ == "__main__":
    main()
