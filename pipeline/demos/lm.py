"""`mtkd demo lm`: offline multi-teacher distillation of a language model, end to end, on the Python
standard library's own source.

Every step is the library function behind a command, called as a user would call the command:

    data       corpus.py: the stdlib's top-level .py files split by file into train and validation,
               a byte-level BPE tokenizer trained on train, windows of tokens as train.npz and
               validation.npz (`input_ids`, `attention_mask`)
    teachers   `mtkd train` on the next tokens: two transformers of different shapes and a GRU
    infer      `mtkd infer --top-k K` of the three teachers over train.npz (a sparse store)
    distil     `mtkd train --store`: a student several times smaller, on the fused teachers mixed with
               the next-token cross-entropy (alpha)
    baseline   `mtkd train`: the same student on the next tokens alone, for the same steps
    eval       `mtkd eval` of every model on validation.npz; `mtkd infer` over validation.npz and the
               store's fused ensemble (what `mtkd inspect` reports) for the ensemble

The defaults below are the ones we measured (README, "The language-model demo"); they are fixed,
not tuned on the validation split per run.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkd.pipeline.demos.corpus import Corpus, CorpusConfig, build_corpus
from mtkd.pipeline.demos.plot import plot_lm_demo
from mtkd.pipeline.demos.rows import Recipe, toml_table
from mtkd.pipeline.errors import BadInputError

MODELS = "mtkd.pipeline.models"


@dataclass(frozen=True)
class LMDemoConfig:
    corpus: CorpusConfig = CorpusConfig()
    teachers: tuple[Recipe, ...] = (
        Recipe("transformer", f"{MODELS}:transformer_lm", {"d_model": 128, "layers": 2, "heads": 4}, epochs=3, lr=3e-3),
        Recipe("transformer_deep", f"{MODELS}:transformer_lm", {"d_model": 96, "layers": 3, "heads": 4}, epochs=3, lr=3e-3),
        Recipe("gru", f"{MODELS}:gru_lm", {"embed": 128, "hidden": 384}, epochs=2, lr=5e-3),
    )
    student: Recipe = Recipe("student", f"{MODELS}:transformer_lm", {"d_model": 32, "layers": 1, "heads": 4},
                                 epochs=2, lr=1e-2)
    top_k: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0)
    temperature: float = 1.0
    alpha: float = 0.8
    fusion: str = "mean"
    batch_size: int = 32  # sequences
    infer_batch_size: int = 64  # sequences
    seeds: tuple[int, ...] = (0,)  # one run of each student per seed (init and order); teachers use seeds[0]
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.temperature not in self.temperatures:
            raise BadInputError(f"temperature {self.temperature} is not among the stored temperatures {self.temperatures}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BadInputError(f"the demo needs one or more distinct seeds, got {self.seeds}")
        if len({t.name for t in self.teachers} | {"student"}) != len(self.teachers) + 1:
            raise BadInputError("the demo's teachers need distinct names, none of them 'student'")


def run_lm_demo(out: str | Path, config: LMDemoConfig = LMDemoConfig(), *, quiet: bool = True, log=print) -> dict[str, Any]:
    """Run the language-model demo under `out`; return perplexities, accuracies, bytes per token and
    wall time per stage (the shape of `mtkd demo lm --json`)."""
    from mtkd.pipeline.config import TrainConfig
    from mtkd.pipeline.evaluate import run_eval
    from mtkd.pipeline.infer import run_infer
    from mtkd.pipeline.report import inspect_store
    from mtkd.pipeline.store import open_store
    from mtkd.pipeline.train import run_train

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--out {str(out)!r} exists and is not an empty folder: choose another, or remove it")
    for sub in ("data", "models", "runs", "stores"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}

    # -- data: corpus, tokenizer, windows ------------------------------------------------------------
    t0 = time.perf_counter()
    corpus = build_corpus(out / "data", config.corpus)
    train, validation = str(corpus.train), str(corpus.validation)
    wall["data"] = time.perf_counter() - t0
    log(f"data: {len(corpus.train_files)} train files ({corpus.train_tokens} tokens), {len(corpus.validation_files)} "
        f"validation files ({corpus.validation_tokens} tokens), vocabulary {corpus.vocab_size} ({wall['data']:.1f} s)")

    def spec_file(recipe: Recipe, command: str) -> Path:
        path = out / "models" / f"{recipe.name}.toml"
        kwargs = {**recipe.kwargs, "vocab_size": corpus.vocab_size}
        path.write_text(f"# {command}\n" + toml_table("[student]", {"name": recipe.name, "factory": recipe.factory,
                                                                   "kwargs": kwargs}))
        return path

    def train_run(recipe: Recipe, run: str, store: Path | None = None, seed: int = config.seeds[0]) -> None:
        spec = spec_file(recipe, f"mtkd train --student {recipe.name}.toml --data ../data/train.npz --out ../runs/{run}")
        options: dict[str, Any] = {}
        if store is not None:
            options = {"store": store, "fusion": config.fusion, "temperature": config.temperature, "alpha": config.alpha}
        run_train(TrainConfig(student=spec, data=train, out=out / "runs" / run, epochs=recipe.epochs, lr=recipe.lr,
                              batch_size=config.batch_size, val_data=validation, seed=seed,
                              device=config.device, **options), quiet=quiet)

    # -- teachers: trained on the next tokens with `mtkd train` --------------------------------------
    t0 = time.perf_counter()
    tables = []
    for recipe in config.teachers:
        train_run(recipe, f"teacher-{recipe.name}")
        tables.append(toml_table("[[teachers]]", {"name": recipe.name, "run": f"../runs/teacher-{recipe.name}"}))
        log(f"teacher {recipe.name}: trained ({time.perf_counter() - t0:.1f} s so far)")
    teachers_toml = out / "models" / "teachers.toml"
    teachers_toml.write_text(
        f"# mtkd infer --teachers teachers.toml --data ../data/train.npz --top-k {config.top_k} "
        f"--temperatures {','.join(f'{t:g}' for t in config.temperatures)} --out ../stores/train\n\n" + "\n".join(tables)
    )
    wall["teachers"] = time.perf_counter() - t0

    # -- stage one: the teachers' top-k over the train windows ---------------------------------------
    t0 = time.perf_counter()
    store = out / "stores" / "train"
    run_infer(teachers_toml, train, store, top_k=config.top_k, temperatures=config.temperatures,
              batch_size=config.infer_batch_size, device=config.device)
    wall["infer"] = time.perf_counter() - t0
    log(f"infer: {corpus.train_tokens} positions x {len(config.teachers)} teachers, top-{config.top_k} ({wall['infer']:.1f} s)")

    # -- stage two: the distilled student, and the same student on the next tokens alone --------------
    # runs/distilled and runs/baseline for the first seed, runs/distilled-seed1 ... for the others.
    students = {kind: [kind if i == 0 else f"{kind}-seed{seed}" for i, seed in enumerate(config.seeds)]
                for kind in ("distilled", "baseline")}
    for kind, stage in (("distilled", "distil"), ("baseline", "baseline")):
        t0 = time.perf_counter()
        for run, seed in zip(students[kind], config.seeds):
            train_run(config.student, run, store if kind == "distilled" else None, seed)
        wall[stage] = time.perf_counter() - t0
        log(f"{stage}: {len(config.seeds)} seed(s) ({wall[stage]:.1f} s)")

    # -- evaluation on the validation split ------------------------------------------------------------
    t0 = time.perf_counter()
    metrics = {
        run: run_eval(validation, run=out / "runs" / run, device=config.device)
        for run in [f"teacher-{r.name}" for r in config.teachers] + students["baseline"] + students["distilled"]
    }
    validation_store = out / "stores" / "validation"
    run_infer(teachers_toml, validation, validation_store, top_k=config.top_k, temperatures=config.temperatures,
              batch_size=config.infer_batch_size, device=config.device)
    report = inspect_store(open_store(validation_store))
    wall["eval"] = time.perf_counter() - t0
    wall["total"] = sum(wall.values())

    pick = lambda m: {"perplexity": m["perplexity"], "accuracy": m["accuracy"]}  # noqa: E731
    # Over seeds: the mean perplexity and accuracy, and each seed's.
    mean = lambda runs: {key: statistics.fmean(metrics[r][key] for r in runs) for key in ("perplexity", "accuracy")}  # noqa: E731
    result = {
        "teachers": {r.name: pick(metrics[f"teacher-{r.name}"]) for r in config.teachers},
        "ensemble": pick(report["ensemble"]["metrics"]),
        "baseline_student": mean(students["baseline"]),
        "distilled_student": mean(students["distilled"]),
        "seeds": list(config.seeds),
        "per_seed": {f"{kind}_student": [pick(metrics[r]) for r in runs] for kind, runs in students.items()},
        "bytes_per_token": _store_bytes(store) / corpus.train_tokens,
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "out": str(out),
        "config": _config_summary(config, corpus),
    }
    result["plot"] = plot_lm_demo(out, result)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _store_bytes(store: Path) -> int:
    """The store's size on disk: every chunk and metadata file (what a user pays to keep it)."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def _config_summary(config: LMDemoConfig, corpus: Corpus) -> dict[str, Any]:
    """What a reader of demo.json needs to know the numbers' conditions."""
    return {
        "corpus": {"train_files": len(corpus.train_files), "validation_files": len(corpus.validation_files),
                   "train_tokens": corpus.train_tokens, "validation_tokens": corpus.validation_tokens,
                   "vocab_size": corpus.vocab_size, "window": config.corpus.window},
        "top_k": config.top_k, "temperature": config.temperature, "alpha": config.alpha, "fusion": config.fusion,
        "student": {"kwargs": config.student.kwargs, "epochs": config.student.epochs, "lr": config.student.lr},
        "batch_size": config.batch_size,
    }
