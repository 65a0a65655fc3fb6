"""Whole-pipeline benchmark: what offline distillation buys, and what the store costs.

    python bench/pipeline.py --lm-seqs 0          # rows figures + infer_vs_forward_tokens: minutes on a CPU
    python bench/pipeline.py --rows 0 --dense-vocabs 100,1000,10000 --dense-rows 20000 --lm-seqs 128 \
        --stream-epochs 3 --threads 1             # the language-model figures as README reports them (CPU, ~7 min)
    python bench/pipeline.py --device cuda --rows 200000 --dense-vocabs 100,1000,10000 --json bench/results/pipeline-h200.json
    python bench/pipeline.py --quick --json /tmp/quick.json   # every figure at ~1/10 size, same code paths (~3 min, 2 cores)
    python bench/pipeline.py --loader-only                   # the loaders alone, no model (below)

Three figures, each a ratio of two things measured side by side in the same run (repeats interleaved,
the median of the pairs' ratios), with the demo's teachers (CNN, bidirectional GRU, wide CNN; random weights: the
cost of a forward pass does not depend on them) and the demo's MLP student on MNIST-1D inputs:

  infer_vs_forward           stage one's rows/s (forward + copy + Zarr writes, `run_infer`) divided by
                             the teachers' bare forward rows/s (`forward_throughput`, same batches).
                             Target >= 0.9.
  infer_vs_forward_tokens    the same for language models: stage one's tokens/s (top-64 ids, log-probabilities,
                             normalisers at T = 1, 2, label log-probabilities written to the store) over the
                             teachers' bare forward tokens/s, at V = --token-vocab (8192) on --token-seqs random
                             sequences of 128 tokens. The teachers are the two Transformer shapes `mtkd demo lm`
                             trains (d_model 128 x 2 layers and 96 x 3, 4 heads), random weights: small LMs, so
                             that stage one's vocabulary-wide work (normalisers over all V, top-k) weighs as
                             much beside the forward as it ever does (a larger model hides it), yet real ones
                             (not a bare embedding + head, which nothing would distil from). Target >= 0.9.
  infer_overhead_passes      stage one's per-position work against its floor, at each V of --overhead-vocabs
                             (8192, 32000): (stage one's loop seconds minus the bare forward's) over one
                             torch.logsumexp pass over the same logits, for top-64 (T = 1, 2) and top-64 +
                             16 tail draws; one teacher (d_model 128 x 2 layers) on --token-seqs sequences.
                             reduce_passes: the layout's reduce alone, same unit. Target <= 3 (CPU).
  infer_vs_forward_dense     (with --dense-vocabs) infer_vs_forward for dense rows at each V given, three MLP
                             teachers on random inputs: what storing V values a row costs. Target >= 0.9 at
                             V = 1000.
  offline_vs_online_speedup  online KD (every teacher run on every batch, for E epochs) wall time,
                             divided by stage one once plus E epochs of stage two (`run_train --store`),
                             wall time of both library calls. Target >= 5.
  stream_overhead            stage two's median epoch time streaming logits from the store, divided by
                             the same with the logits read into memory first, minus 1. Target <= 0.05.

And the same two stage-two figures for language models (`--lm-seqs 0` skips them): token sequences of
random ids (V = 2048, windows of 128 tokens; the cost of a forward pass does not depend on the text), the
three teacher LMs `mtkd demo lm` trains at its sizes (Transformers d_model 128 x 2 layers and 96 x 3, a
GRU of embedding 128 and width 384; random weights), stage one top-k 64 at T = 1, 2, and the demo's
student (a one-layer Transformer of width 48) distilled through `fused_linear_sparse_kd_loss`:

  offline_vs_online_speedup_tokens  online KD (the three teachers on every batch, their dense logits
                             into `fused_kd_loss`) for E epochs, over stage one once plus E epochs of
                             stage two. Target >= 5.
  stream_overhead_tokens     as stream_overhead, for the top-k store. Target <= 0.05.

The loaders alone (`--loader-only`, or beside the others unless --loader-seqs and --loader-rows are
empty/0), no model, no stage one: stores written by stage one's block writer (3 teachers; block 0
from random logits, the rest the same bytes), batches cut by the trainer's loaders:

  loader_tokens   per --loader-seqs S (512 and 5120: 1x and 10x the LM figures') and T = 1, 2:
                  tokens/s of SequenceLoader over a top-k store (k = 64, V = 2048, float16),
                  streaming and in memory, per wall and per CPU second (every thread of the process:
                  on a loaded machine the steadier of the two), and stream over memory epoch time.
                  Targets: >= 1M tokens/s; streaming within 5% of memory.
  loader_dense    per --loader-vocabs V (100, 1000): rows/s and GB/s (3 x V float16 a row) of
                  BatchLoader over a dense store of --loader-rows rows. Target: >= 1 GB/s.
Each is an epoch's time after a first one (in memory the first reads the store whole), median over
--repeats interleaved runs of --loader-epochs epochs.

Every group of figures records the load average (1 min) at its start and end ("load_average_1min")
and its wall seconds ("wall_s"); on a shared machine, the load says how far to trust a rate.

Both sides of every comparison run the same way: the online teachers under stage one's autocast
(`teacher_autocast`: fp16 on CUDA, float32 on the CPU), their batches copied from pinned memory on CUDA
as the loader's are. `--threads N` fixes torch's CPU threads (on a shared machine one thread per side
gives steadier ratios); the JSON records it, with the other conditions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtkd.kernels import fused_kd_loss
from mtkd.pipeline.demos.rows import RowsDemoConfig, toml_table
from mtkd.pipeline.device import resolve_device
from mtkd.pipeline.infer import forward_throughput, load_teacher, run_infer, teacher_autocast
from mtkd.pipeline.data import load_data
from mtkd.pipeline.specs import import_object, load_teacher_specs
from mtkd.pipeline.config import TrainConfig
from mtkd.pipeline.train import run_train


def _setup(work: Path, rows: int) -> tuple[Path, Path, Path]:
    """Teachers (random weights, saved as checkpoints), the student TOML, and the data as .npz."""
    config = RowsDemoConfig()
    tables = []
    for recipe in config.teachers:
        model = import_object(recipe.factory, what="teacher factory")(**recipe.kwargs)
        torch.save(model.state_dict(), work / f"{recipe.name}.pt")
        fields = {"name": recipe.name, "factory": recipe.factory, "kwargs": recipe.kwargs, "checkpoint": f"{recipe.name}.pt"}
        tables.append(toml_table("[[teachers]]", fields))
    teachers = work / "teachers.toml"
    teachers.write_text("\n".join(tables))
    student = work / "student.toml"
    student.write_text(toml_table("[student]", {"name": "mlp", "factory": "mtkd.pipeline.models:mlp", "kwargs": config.student_kwargs}))
    data = load_data(f"mnist1d:unlabeled?n={rows}")
    path = work / "data.npz"
    np.savez(path, x=data.x)
    return teachers, student, path


def _online_kd(teachers: Path, data: Path, *, epochs: int, batch_size: int, lr: float, temperature: float,
               device: torch.device, seed: int) -> float:
    """Wall seconds of online multi-teacher KD: every teacher forwarded on every batch of every epoch."""
    torch.manual_seed(seed)
    models = [load_teacher(spec, device) for spec in load_teacher_specs(teachers)]
    from mtkd.pipeline.models import mlp

    student = mlp(40, [100, 100], 10).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    x_all = torch.from_numpy(np.load(data)["x"])
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_all))
        for start in range(0, len(x_all), batch_size):
            x = _gather(x_all, order[start : start + batch_size], device)
            with torch.inference_mode(), teacher_autocast(device, TEACHER_DTYPE):  # as stage one runs them
                z = torch.stack([m(x) for m in models])  # (K, B, V)
            loss = fused_kd_loss(student(x), z.clone(), temperature=temperature)  # clone: out of inference mode
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _infer_vs_forward_tokens(work: Path, args: argparse.Namespace) -> dict:
    """infer_vs_forward_tokens from interleaved pairs of (bare forward tokens/s, stage-one tokens/s),
    for the demo's two Transformer shapes at V = --token-vocab (module docstring: why these)."""
    from mtkd.pipeline.data import make_token_data
    from mtkd.pipeline.models import transformer_lm

    tables = []
    for i, (d_model, layers) in enumerate(((128, 2), (96, 3))):
        torch.manual_seed(i)
        kwargs = {"vocab_size": args.token_vocab, "d_model": d_model, "layers": layers, "heads": 4, "max_len": args.token_len}
        torch.save(transformer_lm(**kwargs).state_dict(), work / f"lm{i}.pt")
        tables.append(toml_table("[[teachers]]", {"name": f"lm{i}", "factory": "mtkd.pipeline.models:transformer_lm",
                                                  "kwargs": kwargs, "checkpoint": f"lm{i}.pt"}))
    teachers = work / "lm.toml"
    teachers.write_text("\n".join(tables))
    rng = np.random.default_rng(0)
    data = make_token_data("bench tokens", [rng.integers(0, args.token_vocab, args.token_len) for _ in range(args.token_seqs)])
    common = {"batch_size": args.token_batch, "device": args.device, "dtype": TEACHER_DTYPE}
    forward_throughput(teachers, data, **common)  # unmeasured: first-call allocations
    forward, infer = [], []
    for i in range(args.repeats):
        forward.append(forward_throughput(teachers, data, **common))
        infer.append(run_infer(teachers, data, work / f"tokens{i}", top_k=64, temperatures="1,2", **common).rows_per_s)
    return {
        "infer_vs_forward_tokens": statistics.median(i / f for i, f in zip(infer, forward)),
        "measurements_infer_tokens": {"forward_tokens_per_s": forward, "infer_tokens_per_s": infer},
        "conditions_infer_tokens": {"sequences": args.token_seqs, "length": args.token_len, "vocab": args.token_vocab,
                                    "batch_size": args.token_batch, "top_k": 64, "temperatures": [1, 2],
                                    "teachers": ["transformer_lm d_model 128 x 2 layers", "transformer_lm d_model 96 x 3 layers"]},
    }


def _infer_overhead_passes(work: Path, args: argparse.Namespace) -> dict:
    """infer_overhead_passes at each V of --overhead-vocabs: (stage one's loop seconds minus the bare
    forward's) over the seconds of one torch.logsumexp pass over the same logits (every batch's
    (B * L, V) float32 logits once), for top-64 at T = 1, 2 and for top-64 + 16 tail draws; and
    reduce_passes, the per-position reduction alone (the layout's `reduce` on those logits, no forward,
    no writes) in the same unit. One teacher, the demo's Transformer shape (d_model 128 x 2 layers),
    random weights, on --token-seqs random sequences of --token-len tokens, batches of --token-batch;
    interleaved repeats, medians. Target (issue 21): at most 3 passes on a CPU."""
    from mtkd.pipeline.data import make_token_data
    from mtkd.pipeline.layouts import SampledTopK, TopK
    from mtkd.pipeline.models import transformer_lm

    med = statistics.median
    rng = np.random.default_rng(0)
    data = make_token_data("bench overhead", [rng.integers(0, 256, args.token_len) for _ in range(args.token_seqs)])
    batches = -(-args.token_seqs // args.token_batch)
    rows = args.token_batch * args.token_len  # rows of a full batch's logits
    common = {"batch_size": args.token_batch, "device": args.device, "dtype": TEACHER_DTYPE}
    out: dict = {"infer_overhead_passes": {}, "reduce_passes": {}, "measurements_overhead": {}}
    for vocab in args.overhead_vocabs:
        kwargs = {"vocab_size": vocab, "d_model": 128, "layers": 2, "heads": 4, "max_len": args.token_len}
        torch.manual_seed(0)
        torch.save(transformer_lm(**kwargs).state_dict(), work / f"overhead{vocab}.pt")
        teachers = work / f"overhead{vocab}.toml"
        teachers.write_text(toml_table("[[teachers]]", {"name": "lm", "factory": "mtkd.pipeline.models:transformer_lm",
                                                        "kwargs": kwargs, "checkpoint": f"overhead{vocab}.pt"}))
        device = resolve_device(args.device)
        z = (3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))).to(device)
        labels = torch.randint(0, vocab, (rows,), device=device)
        layouts = {"topk": TopK(TEACHER_DTYPE, vocab, 64, (1.0, 2.0)),
                   "topk+tail16": SampledTopK(TEACHER_DTYPE, vocab, 64, (1.0, 2.0), 16, 0)}

        def timed(fn) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started

        def reduce(layout):
            if isinstance(layout, SampledTopK):
                return lambda: layout.reduce(z, labels, rows=torch.arange(rows, device=device), teacher="lm")
            return lambda: layout.reduce(z, labels)

        forward_throughput(teachers, data, **common)  # unmeasured: first-call allocations
        timed(lambda: torch.logsumexp(z, dim=1))
        m: dict[str, list[float]] = {"forward_s": [], "logsumexp_pass_s": [],
                                     **{f"infer_s[{k}]": [] for k in layouts}, **{f"reduce_s[{k}]": [] for k in layouts}}
        for i in range(args.repeats):
            m["forward_s"].append(data.num_rows / forward_throughput(teachers, data, **common))
            m["logsumexp_pass_s"].append(batches * timed(lambda: torch.logsumexp(z, dim=1)))
            for name, layout in layouts.items():
                extra = {"tail_samples": 16, "seed": 0} if isinstance(layout, SampledTopK) else {}
                result = run_infer(teachers, data, work / f"overhead{vocab}-{name}-{i}", top_k=64, temperatures="1,2", **common, **extra)
                m[f"infer_s[{name}]"].append(result.loop_s)
                shutil.rmtree(work / f"overhead{vocab}-{name}-{i}")
                m[f"reduce_s[{name}]"].append(batches * timed(reduce(layout)))
        lse_s, forward_s = med(m["logsumexp_pass_s"]), med(m["forward_s"])
        out["infer_overhead_passes"][str(vocab)] = {k: (med(m[f"infer_s[{k}]"]) - forward_s) / lse_s for k in layouts}
        out["reduce_passes"][str(vocab)] = {k: med(m[f"reduce_s[{k}]"]) / lse_s for k in layouts}
        out["measurements_overhead"][str(vocab)] = m
    out["conditions_overhead"] = {
        "sequences": args.token_seqs, "length": args.token_len, "tokens": data.num_rows, "batch_size": args.token_batch,
        "vocabs": args.overhead_vocabs, "top_k": 64, "temperatures": [1, 2], "tail_samples": {"topk": 0, "topk+tail16": 16},
        "teacher": "transformer_lm d_model 128 x 2 layers, 4 heads, random weights", "repeats": args.repeats,
        "unit": "one torch.logsumexp(dim=1) pass over every batch's (B * L, V) float32 logits",
        "infer_s": "run_infer's loop_s (forward, per-position work, copies, writes)", "forward_s": "forward_throughput's time",
    }
    return out


def _infer_vs_forward_dense(work: Path, args: argparse.Namespace) -> dict:
    """infer_vs_forward at each V of --dense-vocabs: dense rows (SPEC's layout without --top-k), three
    MLP teachers (40 -> h -> h -> V, h = 100, 200, 300) on --dense-rows random unlabelled inputs of 40
    values, batch --batch-size, interleaved pairs as above. The forward is cheap beside the V float16
    values a row stores, so this measures what storing costs: casts, checks, chunk encoding, writes
    and their fsyncs."""
    rng = np.random.default_rng(0)
    np.savez(work / "dense.npz", x=rng.standard_normal((args.dense_rows, 40)).astype(np.float32))
    data = load_data(str(work / "dense.npz"))
    common = {"batch_size": args.batch_size, "device": args.device, "dtype": TEACHER_DTYPE}
    ratios, measured = {}, {}
    for vocab in args.dense_vocabs:
        teachers = work / f"dense-{vocab}.toml"
        teachers.write_text("\n".join(toml_table("[[teachers]]", {
            "name": f"mlp{h}", "factory": "mtkd.pipeline.models:mlp", "kwargs": {"in_features": 40, "hidden": [h, h], "num_classes": vocab},
        }) for h in (100, 200, 300)))
        forward_throughput(teachers, data, **common)  # unmeasured: first-call allocations
        forward, infer = [], []
        for i in range(args.repeats):
            forward.append(forward_throughput(teachers, data, **common))
            infer.append(run_infer(teachers, data, work / f"dense-{vocab}-{i}", **common).rows_per_s)
            shutil.rmtree(work / f"dense-{vocab}-{i}")  # V = 10000: 60 kB a row
        ratios[str(vocab)] = statistics.median(i / f for i, f in zip(infer, forward))
        measured[str(vocab)] = {"forward_rows_per_s": forward, "infer_rows_per_s": infer}
    return {"infer_vs_forward_dense": ratios, "measurements_dense": measured,
            "conditions_dense": {"rows": args.dense_rows, "teachers": "mlp 40-h-h-V, h = 100, 200, 300", "labels": None,
                                 "batch_size": args.batch_size, "dtype": TEACHER_DTYPE}}


TEACHER_DTYPE = "float16"  # stage one's default --dtype, and the autocast it implies on CUDA


def _gather(x: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `index` of host tensor `x` on `device`: through pinned memory on CUDA, as the loader does."""
    if device.type != "cuda":
        return x[index]
    shape = (len(index), *x.shape[1:])
    return torch.index_select(x, 0, index, out=torch.empty(shape, dtype=x.dtype, pin_memory=True)).to(device, non_blocking=True)


# -- tokens ----------------------------------------------------------------------------------------

LM_VOCAB, LM_LENGTH = 2048, 128
LM_TEACHERS = (  # (name, factory, kwargs): the teachers `mtkd demo lm` trains, at its sizes
    ("transformer", "mtkd.pipeline.models:transformer_lm", {"vocab_size": LM_VOCAB, "d_model": 128, "layers": 2, "heads": 4}),
    ("transformer_deep", "mtkd.pipeline.models:transformer_lm", {"vocab_size": LM_VOCAB, "d_model": 96, "layers": 3, "heads": 4}),
    ("gru", "mtkd.pipeline.models:gru_lm", {"vocab_size": LM_VOCAB, "embed": 128, "hidden": 384}),
)
LM_STUDENT = ("mtkd.pipeline.models:transformer_lm", {"vocab_size": LM_VOCAB, "d_model": 48, "layers": 1, "heads": 4})


def _setup_tokens(work: Path, seqs: int) -> tuple[Path, Path, Path]:
    """Teacher LMs (random weights, checkpoints), the student TOML and `seqs` random sequences as .npz."""
    tables = []
    for name, factory, kwargs in LM_TEACHERS:
        model = import_object(factory, what="teacher factory")(**kwargs)
        torch.save(model.state_dict(), work / f"{name}.pt")
        tables.append(toml_table("[[teachers]]", {"name": name, "factory": factory, "kwargs": kwargs, "checkpoint": f"{name}.pt"}))
    teachers = work / "lm-teachers.toml"
    teachers.write_text("\n".join(tables))
    student = work / "lm-student.toml"
    student.write_text(toml_table("[student]", {"name": "gru48", "factory": LM_STUDENT[0], "kwargs": LM_STUDENT[1]}))
    path = work / "tokens.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(0, LM_VOCAB, (seqs, LM_LENGTH)))
    return teachers, student, path


def _online_kd_tokens(teachers: Path, data: Path, *, epochs: int, batch_size: int, lr: float, temperature: float,
                      device: torch.device, seed: int) -> float:
    """Wall seconds of online multi-teacher KD for an LM: every teacher on every batch of sequences,
    its dense logits at every position into fused_kd_loss."""
    torch.manual_seed(seed)
    models = [load_teacher(spec, device) for spec in load_teacher_specs(teachers)]
    student = import_object(LM_STUDENT[0], what="student factory")(**LM_STUDENT[1]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    ids_all = torch.from_numpy(np.load(data)["input_ids"])  # (N, L), every position real
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(ids_all))
        for start in range(0, len(ids_all), batch_size):
            ids = _gather(ids_all, order[start : start + batch_size], device)
            with torch.inference_mode(), teacher_autocast(device, TEACHER_DTYPE):
                z = torch.stack([m(ids) for m in models]).flatten(1, 2)  # (K, B * L, V)
            loss = fused_kd_loss(student(ids).flatten(0, 1), z.clone(), temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _token_figures(work: Path, args: argparse.Namespace, device: torch.device, *, lr: float, temperature: float,
                   seed: int) -> dict:
    """offline_vs_online_speedup_tokens and stream_overhead_tokens, with their measurements."""
    teachers, student, data = _setup_tokens(work, args.lm_seqs)
    common = {"device": args.device, "batch_size": args.lm_batch_size, "lr": lr, "temperature": temperature, "seed": seed}
    offline, online, infer_wall = [], [], []
    for i in range(max(1, args.repeats - 1)):
        store = work / f"lm-store{i}"
        infer_wall.append(run_infer(teachers, str(data), store, batch_size=args.lm_batch_size, device=args.device,
                                    dtype=TEACHER_DTYPE, top_k=64, temperatures="1,2").wall_s)
        started = time.perf_counter()
        run_train(TrainConfig(student, str(data), work / f"lm-offline{i}", store=store, epochs=args.epochs, **common))
        offline.append(infer_wall[i] + time.perf_counter() - started)
        online.append(_online_kd_tokens(teachers, data, epochs=args.epochs, batch_size=args.lm_batch_size, lr=lr,
                                        temperature=temperature, device=device, seed=seed))
    stream, memory = [], []
    for i in range(max(1, args.repeats - 1)):
        for mode, sink in ((True, stream), (False, memory)):
            run = work / f"lm-{'stream' if mode else 'memory'}{i}"
            run_train(TrainConfig(student, str(data), run, store=work / "lm-store0", epochs=args.stream_epochs,
                                  stream=mode, **common))
            sink.append(_epoch_seconds(run))
    med = statistics.median
    return {
        "offline_vs_online_speedup_tokens": med(on / off for on, off in zip(online, offline)),
        "stream_overhead_tokens": med(s / m for s, m in zip(stream, memory)) - 1,
        "measurements_tokens": {"offline_s": offline, "online_s": online, "infer_wall_s": infer_wall,
                                "stream_epoch_s": stream, "memory_epoch_s": memory},
        "conditions_tokens": {"sequences": args.lm_seqs, "length": LM_LENGTH, "vocab": LM_VOCAB, "top_k": 64,
                              "batch_size": args.lm_batch_size, "teachers": [t[0] for t in LM_TEACHERS],
                              "student": "transformer_lm d_model 48, 1 layer",
                              "loss": json.loads((work / "lm-offline0" / "config.json").read_text())["loss_function"]},
    }


def _rows_figures(work: Path, args: argparse.Namespace, device: torch.device, *, lr: float, temperature: float,
                  seed: int) -> dict:
    """infer_vs_forward, offline_vs_online_speedup and stream_overhead, with their measurements."""
    teachers, student, data = _setup(work, args.rows)
    common = {"device": args.device, "batch_size": args.batch_size}
    train = {**common, "lr": lr, "temperature": temperature, "seed": seed}

    # infer_vs_forward: interleaved, so that both see the same machine; one unmeasured forward
    # pass first, so that neither side pays for first-call allocations.
    forward_throughput(teachers, str(data), dtype=TEACHER_DTYPE, **common)
    forward, infer, infer_wall = [], [], []
    for i in range(args.repeats):
        forward.append(forward_throughput(teachers, str(data), dtype=TEACHER_DTYPE, **common))
        result = run_infer(teachers, str(data), work / f"store{i}", dtype=TEACHER_DTYPE, **common)
        infer.append(result.rows_per_s)
        infer_wall.append(result.wall_s)
    store = work / "store0"

    # offline (stage one once + E epochs of stage two) against online KD, alternating.
    offline, online = [], []
    for i in range(max(1, args.repeats - 1)):
        started = time.perf_counter()
        run_train(TrainConfig(student, str(data), work / f"offline{i}", store=store, epochs=args.epochs, **train))
        offline.append(infer_wall[i] + time.perf_counter() - started)
        online.append(_online_kd(teachers, data, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                                 temperature=temperature, device=device, seed=seed))

    # stream_overhead: median epoch time, streaming vs in memory, alternating.
    stream, memory = [], []
    for i in range(max(1, args.repeats - 1)):
        for mode, sink in ((True, stream), (False, memory)):
            run = work / f"{'stream' if mode else 'memory'}{i}"
            run_train(TrainConfig(student, str(data), run, store=store, epochs=args.stream_epochs, stream=mode, **train))
            sink.append(_epoch_seconds(run))
    med = statistics.median
    return {
        # Medians of the ratios of interleaved pairs: on a shared machine the speed drifts by tens of
        # percent from one minute to the next, and a pair sees the same drift.
        "infer_vs_forward": med(i / f for i, f in zip(infer, forward)),
        "offline_vs_online_speedup": med(on / off for on, off in zip(online, offline)),
        "stream_overhead": med(s / m for s, m in zip(stream, memory)) - 1,
        "measurements": {"forward_rows_per_s": forward, "infer_rows_per_s": infer, "infer_wall_s": infer_wall,
                         "offline_s": offline, "online_s": online, "stream_epoch_s": stream, "memory_epoch_s": memory},
    }


# -- stage two streaming from an S3 API -------------------------------------------------------------


@contextlib.contextmanager
def _s3_server():
    """moto's S3 server in a process of its own on a free port of 127.0.0.1 (a separate server, as a
    bucket is: in this process its request handling would compete with training for the GIL), a
    bucket, and the credentials in the environment; yields the endpoint."""
    import socket
    import subprocess

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: env[k] for k in saved})
    try:
        for _ in range(200):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mtkd-bench")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        yield endpoint
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_figures(work: Path, args: argparse.Namespace, device: torch.device, *, lr: float, temperature: float, seed: int) -> dict:
    """stream_overhead_s3: stage two's median epoch time streaming the rows store from a local S3
    server (moto, HTTP on 127.0.0.1), divided by the same streaming from local disk, minus 1; the
    same store (stage one writes it to both), the same student, runs alternating."""
    from mtkd.pipeline.storage import location

    folder = work / "s3"
    folder.mkdir()
    teachers, student, data = _setup(folder, args.s3_rows)
    common = {"device": args.device, "batch_size": args.batch_size}
    train = {**common, "lr": lr, "temperature": temperature, "seed": seed}
    with _s3_server() as endpoint:
        remote = location("s3://mtkd-bench/store.zarr", {"endpoint_url": endpoint})
        run_infer(teachers, str(data), folder / "store", dtype=TEACHER_DTYPE, **common)
        run_infer(teachers, str(data), remote, dtype=TEACHER_DTYPE, **common)
        s3, disk = [], []
        for i in range(max(1, args.repeats - 1)):
            for store, sink, name in ((remote, s3, "s3"), (folder / "store", disk, "disk")):
                run = folder / f"{name}{i}"
                run_train(TrainConfig(student, str(data), run, store=store, epochs=args.stream_epochs, stream=True, **train))
                sink.append(_epoch_seconds(run))
    return {
        "stream_overhead_s3": statistics.median(a / b for a, b in zip(s3, disk)) - 1,
        "measurements_s3": {"rows": args.s3_rows, "s3_epoch_s": s3, "disk_epoch_s": disk, "server": "moto (separate process, 127.0.0.1)"},
    }


# -- the loaders alone ------------------------------------------------------------------------------

LOADER_TEACHERS, LOADER_TOP_K, LOADER_VOCAB = 3, 64, 2048


def _loader_store(path: Path, data, layout, num_classes: int) -> list[str]:
    """A complete store of `data` with LOADER_TEACHERS teachers in `layout`, written by stage one's
    block writer: block 0 from random logits (z ~ 3 N(0, 1), peaked as trained teachers are), the
    other blocks the same bytes (a loader's cost does not depend on the values), so that a store
    of 10x the default size takes seconds to make, not a teacher's forward over every row."""
    from mtkd.pipeline.infer import write_logits_block
    from mtkd.pipeline.report import StatsSums
    from mtkd.pipeline.store import create_store, default_chunk_rows

    store, _ = create_store(path, data=data, num_classes=num_classes, chunk_rows=default_chunk_rows(layout.row_bytes(), data.num_rows))
    labels = torch.from_numpy(data.labels)
    names = [f"teacher{t}" for t in range(LOADER_TEACHERS)]
    for t, name in enumerate(names):
        store.add_teacher(name, spec={"name": name}, weights_sha256=None, layout=layout, stats_width=StatsSums.width(layout))
        g = torch.Generator().manual_seed(t)
        first = store.block_range(0)
        z = 3 * torch.randn(first[1] - first[0], num_classes, generator=g)
        write_logits_block(store, name, 0, z.to(getattr(torch, layout.dtype)) if layout.name == "dense" else z, labels[: first[1]])
        raw, stats = store.read(name, *first), store.block_stats(name)[0]
        for block in range(1, store.num_blocks):
            start, stop = store.block_range(block)
            store.write_block(name, block, {k: v[: stop - start] for k, v in raw.items()}, stats)
        store.mark_complete(name, {})
    return names


def _epochs(loader, epochs: int, count) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds (this process, every thread: on a loaded machine the steadier of the
    two) of each of `epochs` epochs of `loader`, one iterator across them as the trainer runs it
    (streaming, the reader thread runs ahead across epoch ends), and the items an epoch delivers."""
    wall, cpu, items, last = [], [], 0, loader.batches_per_epoch - 1
    with contextlib.closing(loader.batches(0, epochs)) as batches:
        tick, tock = time.perf_counter(), time.process_time()
        for epoch, b, batch in batches:
            items += count(batch) if epoch == 0 else 0
            if b == last:
                wall.append(time.perf_counter() - tick)
                cpu.append(time.process_time() - tock)
                tick, tock = time.perf_counter(), time.process_time()
    return wall, cpu, items


def _loader_figures(work: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """The loaders alone, no model: tokens/s of SequenceLoader over a top-k store (K = 3, k = 64,
    V = 2048) at T = 1 and 2, and rows/s and GB/s of BatchLoader over dense stores, each streaming
    and in memory, interleaved; an epoch's time after a first one (in memory, the first reads the
    store whole; streaming, it starts the reader thread)."""
    from mtkd.pipeline.data import make_row_data, make_token_data
    from mtkd.pipeline.layouts import Dense, TopK
    from mtkd.pipeline.loader import BatchLoader, SequenceLoader, TeacherRows
    from mtkd.pipeline.store import open_store

    med = statistics.median
    epochs = max(2, args.loader_epochs + 1)
    out: dict = {"loader_tokens": {}, "loader_dense": {}}
    rng = np.random.default_rng(0)
    for seqs in args.loader_seqs:
        data = make_token_data(f"bench tokens {seqs}", list(rng.integers(0, LOADER_VOCAB, (seqs, LM_LENGTH))))
        names = _loader_store(work / f"loader-topk-{seqs}", data, TopK("float16", LOADER_VOCAB, LOADER_TOP_K, (1.0, 2.0)), LOADER_VOCAB)
        store = open_store(work / f"loader-topk-{seqs}")
        for temperature in (1.0, 2.0):
            epoch_s: dict[str, list[float]] = {"stream": [], "memory": []}
            cpu_s: dict[str, list[float]] = {"stream": [], "memory": []}
            for _ in range(args.repeats):
                for mode in ("stream", "memory"):
                    loader = SequenceLoader(data.tokens, data.offsets, batch_size=args.lm_batch_size, seed=0, device=device,
                                            teachers=TeacherRows(store, names, temperature), stream=mode == "stream")
                    wall, cpu, tokens = _epochs(loader, epochs, lambda b: b.teachers["ids"].shape[1])
                    epoch_s[mode] += wall[1:]
                    cpu_s[mode] += cpu[1:]
            out["loader_tokens"][f"seqs={seqs},T={temperature:g}"] = {
                "tokens_per_s": {mode: tokens / med(v) for mode, v in epoch_s.items()},
                "tokens_per_cpu_s": {mode: tokens / med(v) for mode, v in cpu_s.items()},
                "stream_over_memory_s": med(epoch_s["stream"]) / med(epoch_s["memory"]),
                "stream_over_memory_cpu_s": med(cpu_s["stream"]) / med(cpu_s["memory"]),
                "epoch_s": epoch_s, "epoch_cpu_s": cpu_s, "tokens": tokens}
    for vocab in args.loader_vocabs if args.loader_rows else ():
        data = make_row_data(f"bench rows {vocab}", rng.standard_normal((args.loader_rows, 4)).astype(np.float32))
        names = _loader_store(work / f"loader-dense-{vocab}", data, Dense("float16", vocab), vocab)
        store = open_store(work / f"loader-dense-{vocab}")
        epoch_s, cpu_s = {"stream": [], "memory": []}, {"stream": [], "memory": []}
        for _ in range(args.repeats):
            for mode in ("stream", "memory"):
                loader = BatchLoader(data.x, data.labels, batch_size=args.batch_size, seed=0, store=store, teachers=names,
                                     device=device, stream=mode == "stream")
                wall, cpu, rows = _epochs(loader, epochs, len)
                epoch_s[mode] += wall[1:]
                cpu_s[mode] += cpu[1:]
        row_bytes = LOADER_TEACHERS * vocab * 2
        out["loader_dense"][str(vocab)] = {
            "rows_per_s": {mode: rows / med(v) for mode, v in epoch_s.items()},
            "gb_per_s": {mode: rows * row_bytes / med(v) / 1e9 for mode, v in epoch_s.items()},
            "gb_per_cpu_s": {mode: rows * row_bytes / med(v) / 1e9 for mode, v in cpu_s.items()},
            "stream_over_memory_s": med(epoch_s["stream"]) / med(epoch_s["memory"]),
            "epoch_s": epoch_s, "epoch_cpu_s": cpu_s, "rows": rows}
    out["conditions_loader"] = {
        "teachers": LOADER_TEACHERS, "top_k": LOADER_TOP_K, "vocab_tokens": LOADER_VOCAB, "sequence_length": LM_LENGTH,
        "sequences": args.loader_seqs, "token_batch_size": args.lm_batch_size, "dense_rows": args.loader_rows,
        "dense_vocabs": args.loader_vocabs, "row_batch_size": args.batch_size, "dtype": "float16",
        "epochs_timed": epochs - 1, "repeats": args.repeats, "device": str(device), "model": None,
        "what": "batches delivered by the loader, no model: epoch time after a first epoch, median over repeats and epochs",
    }
    return out


def _epoch_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return statistics.median(r["seconds"] for r in rows)


def _reader_threads() -> int | None:
    try:
        from mtkd.pipeline import loader
    except ImportError:
        return None
    return getattr(loader, "READER_THREADS", None)  # None: a version that reads one unit at a time


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# --quick: every figure, each at about a tenth of its default size (same code paths): ~3 min on 2 quiet cores.
QUICK = ("--rows", "5000", "--epochs", "3", "--stream-epochs", "2", "--repeats", "2", "--token-seqs", "32",
         "--lm-seqs", "64", "--dense-vocabs", "100,1000", "--dense-rows", "5000", "--loader-seqs", "128",
         "--loader-rows", "10000", "--loader-epochs", "1", "--s3-rows", "5000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="MNIST-1D rows (inputs of 40 values; 0: skip the rows figures)")
    parser.add_argument("--epochs", type=int, default=10, help="stage-two / online KD epochs")
    parser.add_argument("--stream-epochs", type=int, default=4, help="epochs per stream_overhead run")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of every stage and of online KD")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each measurement")
    parser.add_argument("--token-seqs", type=int, default=256,
                        help="infer_vs_forward_tokens: sequences (0: skip it; 256 x 128 tokens are 4 blocks, so that writes "
                             "overlap the forward as in a long run)")
    parser.add_argument("--token-len", type=int, default=128, help="infer_vs_forward_tokens: tokens per sequence")
    parser.add_argument("--token-vocab", type=int, default=8192, help="infer_vs_forward_tokens: the teachers' V")
    parser.add_argument("--token-batch", type=int, default=16, help="infer_vs_forward_tokens: sequences per batch")
    parser.add_argument("--overhead-vocabs", type=_ints, default=[8192, 32000],
                        help="infer_overhead_passes / reduce_passes at these V (on --token-seqs sequences; empty: skip)")
    parser.add_argument("--dense-vocabs", type=lambda text: [int(v) for v in text.split(",") if v], default=[],
                        help="infer_vs_forward_dense at these V, e.g. 100,1000,10000 (default: not measured)")
    parser.add_argument("--dense-rows", type=int, default=50_000, help="rows of infer_vs_forward_dense")
    parser.add_argument("--lm-seqs", type=int, default=512, help="token sequences of the LM figures (0: skip them)")
    parser.add_argument("--lm-batch-size", type=int, default=32, help="sequences per batch of the LM figures (the demo's)")
    parser.add_argument("--loader-seqs", type=_ints, default=[512, 5120],
                        help="loader figures: sequences of the top-k store(s), e.g. 512,5120 (the default: 1x and 10x the LM figures'; empty: none)")
    parser.add_argument("--loader-rows", type=int, default=50_000, help="loader figures: rows of each dense store (0: none)")
    parser.add_argument("--loader-vocabs", type=_ints, default=[100, 1000], help="loader figures: V of the dense stores")
    parser.add_argument("--loader-epochs", type=int, default=2, help="loader figures: epochs timed per run (after a first one)")
    parser.add_argument("--loader-only", action="store_true", help="only the loader figures (no model, no stage one)")
    parser.add_argument("--reader-threads", type=int, help="streaming: units read at once (mtkd.pipeline.loader.READER_THREADS; default: its own)")
    parser.add_argument("--s3-rows", type=int, default=50_000, help="stream_overhead_s3: MNIST-1D rows (0: skip it; needs moto[server], s3fs)")
    parser.add_argument("--s3-only", action="store_true", help="only stream_overhead_s3")
    parser.add_argument("--quick", action="store_true",
                        help=f"every figure at reduced size, the same code paths (minutes on 2 cores): {' '.join(QUICK)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", dest="json_path", type=Path, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes; options given explicitly win over them
        args = parser.parse_args([*QUICK, *(argv if argv is not None else sys.argv[1:])])
    if args.loader_only:
        args.rows = args.token_seqs = args.lm_seqs = args.s3_rows = 0
        args.dense_vocabs = []
    if args.s3_only:
        args.rows = args.token_seqs = args.lm_seqs = args.loader_rows = 0
        args.dense_vocabs, args.loader_seqs = [], []
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reader_threads:
        from mtkd.pipeline import loader

        loader.READER_THREADS = args.reader_threads
    device = resolve_device(args.device)
    lr, temperature, seed = 1e-2, 2.0, 0

    work = Path(tempfile.mkdtemp(prefix="mtkd-bench-"))
    results: dict = {}
    load_before = os.getloadavg()[0]  # on a shared machine, how loaded it was says how far to trust the rates
    # Each group of figures with the load average (1 min) at its start and end, and its wall seconds.
    groups = (
        ("rows", bool(args.rows), lambda: _rows_figures(work, args, device, lr=lr, temperature=temperature, seed=seed)),
        ("dense", bool(args.dense_vocabs), lambda: _infer_vs_forward_dense(work, args)),
        ("infer_tokens", bool(args.token_seqs), lambda: _infer_vs_forward_tokens(work, args)),
        ("overhead", bool(args.token_seqs and args.overhead_vocabs), lambda: _infer_overhead_passes(work, args)),
        ("tokens", bool(args.lm_seqs), lambda: _token_figures(work, args, device, lr=lr, temperature=temperature, seed=seed)),
        ("loader", bool(args.loader_seqs or (args.loader_rows and args.loader_vocabs)), lambda: _loader_figures(work, args, device)),
        ("s3", bool(args.s3_rows), lambda: _s3_figures(work, args, device, lr=lr, temperature=temperature, seed=seed)),
    )
    results["load_average_1min"], results["wall_s"] = {}, {}
    try:
        for name, wanted, measure in groups:
            if not wanted:
                continue
            started, load = time.perf_counter(), os.getloadavg()[0]
            results.update(measure())
            results["load_average_1min"][name] = [load, os.getloadavg()[0]]
            results["wall_s"][name] = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["conditions"] = {
        "rows": args.rows, "epochs": args.epochs, "stream_epochs": args.stream_epochs, "batch_size": args.batch_size,
        "repeats": args.repeats,
        **({"teachers": [r.name for r in RowsDemoConfig().teachers], "student": "mlp 40-100-100-10"} if args.rows else {}),
        "device": str(device), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "load_average_1min": [load_before, os.getloadavg()[0]],  # at the start, at the end
        "quick": args.quick, "loader_only": args.loader_only, "reader_threads": _reader_threads(), "s3_only": args.s3_only,
    }
    targets = {"infer_vs_forward": (">=", 0.9), "infer_vs_forward_tokens": (">=", 0.9), "offline_vs_online_speedup": (">=", 5.0),
               "stream_overhead": ("<=", 0.05), "offline_vs_online_speedup_tokens": (">=", 5.0), "stream_overhead_tokens": ("<=", 0.05),
               "stream_overhead_s3": ("<=", 0.10)}
    print(f"{'figure':<34}{'measured':>10}  {'target':>8}")
    for key, (op, target) in targets.items():
        if key not in results:
            continue
        value = results[key]
        ok = value >= target if op == ">=" else value <= target
        print(f"{key:<34}{value:>10.3f}  {op}{target:>6}  {'ok' if ok else 'MISSED'}")
    for vocab, value in results.get("infer_vs_forward_dense", {}).items():
        print(f"{'infer_vs_forward_dense V=' + vocab:<34}{value:>10.3f}" + (f"  >={0.9:>6}  {'ok' if value >= 0.9 else 'MISSED'}" if vocab == "1000" else ""))
    for vocab, value in results.get("infer_overhead_passes", {}).items():
        reduce = results["reduce_passes"][vocab]
        print(f"{'infer_overhead_passes V=' + vocab:<34}" + ", ".join(f"{k} {v:.2f}" for k, v in value.items())
              + f"  <= 3 {'ok' if max(value.values()) <= 3 else 'MISSED'} (reduce alone: "
              + ", ".join(f"{k} {v:.2f}" for k, v in reduce.items()) + ")")
    for key, value in results.get("loader_tokens", {}).items():
        rates = value["tokens_per_s"]
        print(f"{'loader tokens/s ' + key:<34}{rates['stream']:>10.0f}  stream, {rates['memory']:.0f} memory, "
              f"stream/memory time {value['stream_over_memory_s']:.3f}")
    for vocab, value in results.get("loader_dense", {}).items():
        print(f"{'loader dense GB/s V=' + vocab:<34}{value['gb_per_s']['stream']:>10.3f}  stream, {value['gb_per_s']['memory']:.3f} memory "
              f"({value['rows_per_s']['stream']:.0f} / {value['rows_per_s']['memory']:.0f} rows/s)")
    print(f"({args.rows} rows, {args.token_seqs} + {args.lm_seqs} token sequences, {args.epochs} epochs, {device}, "
          f"{torch.get_num_threads()} threads, load average {results['conditions']['load_average_1min']})")
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
