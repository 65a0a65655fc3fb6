"""Same bits before and after a change: digests of what stage one writes and stage two trains.

    PYTHONPATH=/path/to/old/.pyroot python bench/identical.py --json /tmp/old.json
    python bench/identical.py --json /tmp/new.json --compare /tmp/old.json   # exit 1 on any difference

Runs, at tiny sizes on the CPU (fixed seeds, `--threads` torch threads), the library calls of both
stages for rows and for tokens:
  rows    stage one (three demo teachers, random weights, dense float16) on 2,048 MNIST-1D rows,
          then stage two (the demo's MLP, 3 epochs) streaming and in memory;
  tokens  stage one (two tiny Transformer LMs, top-16 at T = 1, 2) on 64 random sequences, then
          stage two at T = 2 streaming and in memory through the fused-linear loss, and in memory
          through the student's logits;
(the last only where --loss-path exists);
  stage_one  the per-row work alone (layouts' `reduce`) of top-k (k = 64, T = 1, 2 and 1, 2, 4, 0.5), top-k plus
          16 tail draws and pure sampling, on random logits at V = 8192 and 32000 (and 2053: not a multiple of
          the top-k's groups) with ties, -inf and signed zeros, every storable row's arrays digested;
and writes the sha256 of every file of each store (zarr metadata, chunks, records), of every tensor
of each student.pt, and every epoch's loss. Two runs of the same code give the same digests; a
change that keeps behaviour bit for bit keeps them too. Compare with --compare (the old JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mtkd.pipeline.config import TrainConfig
from mtkd.pipeline.data import make_token_data
from mtkd.pipeline.demos.rows import RowsDemoConfig, toml_table
from mtkd.pipeline.infer import run_infer
from mtkd.pipeline.specs import import_object
from mtkd.pipeline.train import run_train


def _store_digest(path: Path, work: Path) -> dict[str, str]:
    """sha256 per file; the (temporary) work folder's name, which metadata records in paths, made constant."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes().replace(str(work).encode(), b"WORK")).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _run_digest(run: Path) -> dict:
    state = torch.load(run / "student.pt", map_location="cpu", weights_only=True)
    tensors = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in state.items()}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {"student": tensors, "losses": losses, "loss_function": json.loads((run / "config.json").read_text()).get("loss_function")}


def _teachers_toml(work: Path, name: str, recipes: list[tuple[str, str, dict]]) -> Path:
    tables = []
    for i, (teacher, factory, kwargs) in enumerate(recipes):
        torch.manual_seed(i)
        torch.save(import_object(factory, what="teacher factory")(**kwargs).state_dict(), work / f"{teacher}.pt")
        tables.append(toml_table("[[teachers]]", {"name": teacher, "factory": factory, "kwargs": kwargs, "checkpoint": f"{teacher}.pt"}))
    path = work / name
    path.write_text("\n".join(tables))
    return path


def rows(work: Path) -> dict:
    config = RowsDemoConfig()
    teachers = _teachers_toml(work, "rows.toml", [(r.name, r.factory, r.kwargs) for r in config.teachers])
    student = work / "rows-student.toml"
    student.write_text(toml_table("[student]", {"name": "mlp", "factory": "mtkd.pipeline.models:mlp", "kwargs": config.student_kwargs}))
    data = "mnist1d:unlabeled?n=2048"
    run_infer(teachers, data, work / "rows-store", batch_size=256, device="cpu", dtype="float16")
    out = {"store": _store_digest(work / "rows-store", work)}
    for mode in (True, False):
        run = work / f"rows-{'stream' if mode else 'memory'}"
        run_train(TrainConfig(student, data, run, store=work / "rows-store", epochs=3, batch_size=128, seed=0,
                              device="cpu", stream=mode))
        out[run.name] = _run_digest(run)
    return out


def tokens(work: Path) -> dict:
    vocab, length = 64, 32
    lm = "mtkd.pipeline.models:transformer_lm"
    teachers = _teachers_toml(work, "lm.toml", [
        ("lm_a", lm, {"vocab_size": vocab, "d_model": 32, "layers": 1, "heads": 2, "max_len": length}),
        ("lm_b", lm, {"vocab_size": vocab, "d_model": 24, "layers": 2, "heads": 2, "max_len": length}),
    ])
    rng = np.random.default_rng(0)
    np.savez(work / "tokens.npz", input_ids=rng.integers(0, vocab, (64, length)))
    data = str(work / "tokens.npz")
    run_infer(teachers, data, work / "lm-store", batch_size=16, device="cpu", dtype="float16", top_k=16, temperatures="1,2")
    out = {"store": _store_digest(work / "lm-store", work)}
    student = work / "lm-student.toml"
    student.write_text(toml_table("[student]", {"name": "lm", "factory": lm,
                                                "kwargs": {"vocab_size": vocab, "d_model": 16, "layers": 1, "heads": 2, "max_len": length}}))
    runs = [("fused", True), ("fused", False)]
    if "loss_path" in TrainConfig.__dataclass_fields__:  # versions with --loss-path: the logits path too
        runs.append(("logits", False))
    for path, mode in runs:
        run = work / f"lm-{path}-{'stream' if mode else 'memory'}"
        extra = {"loss_path": path} if path == "logits" else {}
        run_train(TrainConfig(student, data, run, store=work / "lm-store", epochs=3, batch_size=8, seed=0, temperature=2.0,
                              alpha=0.8, device="cpu", stream=mode, **extra))
        out[run.name] = _run_digest(run)
    return out


def stage_one(work: Path) -> dict:
    """sha256 of every array `reduce` gives, on its storable rows (refused rows are never written)."""
    import math

    from mtkd.pipeline.layouts import SampledTopK, TopK

    out = {}
    for vocab, n in ((2053, 300), (8192, 600), (32000, 160)):
        g = torch.Generator().manual_seed(vocab)
        z = 3 * torch.randn(n, vocab, generator=g)
        z[n // 2 :] = (z[n // 2 :] * 2).round() / 2  # ties
        z[::11, ::5] = -math.inf
        z[3], z[5, ::2] = 0.0, -0.0
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[::7], labels[1] = -100, vocab - 1
        rows = torch.arange(n) + 12345
        for name, layout in (("top64", TopK("float16", vocab, 64, (1.0, 2.0))),
                             ("top64-T4", TopK("bfloat16", vocab, 64, (1.0, 2.0, 4.0, 0.5))),
                             ("top64-tail16", SampledTopK("float16", vocab, 64, (1.0, 2.0), 16, 7)),
                             ("tail16", SampledTopK("float16", vocab, 0, (1.0, 2.0), 16, 7))):
            if isinstance(layout, SampledTopK):
                arrays, summary = layout.reduce(z, labels, rows=rows, teacher="teacher")
            else:
                arrays, summary = layout.reduce(z, labels)
            keep = ~summary.nonfinite
            out[f"V={vocab},{name}"] = {k: hashlib.sha256(v[keep].contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                                        for k, v in sorted(arrays.items())}
            out[f"V={vocab},{name}"]["storable_rows"] = int(keep.sum())
    return out


def compare(old: dict, new: dict, where: str = "") -> list[str]:
    """Keys whose values differ (a key in only one of them is skipped: a figure one version lacks)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old.keys() & new.keys() for d in compare(old[k], new[k], f"{where}/{k}")]
    return [] if old == new else [where]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", dest="json_path", type=Path, required=True, help="write the digests here")
    parser.add_argument("--compare", type=Path, help="digests of another version: report every difference")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the same on both sides)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="mtkd-identical-"))
    try:
        result = {"threads": args.threads, "stage_one": stage_one(work), "rows": rows(work), "tokens": tokens(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.compare is None:
        return 0
    differ = compare(json.loads(args.compare.read_text()), result)
    print("identical" if not differ else f"{len(differ)} differences: " + ", ".join(differ[:20]))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
