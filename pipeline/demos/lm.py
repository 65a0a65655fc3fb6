"""`mtkd demo lm`: offline multi-teacher distillation of a language model from complementary
teachers, end to end, on two domains every machine has: the Python standard library's source (code)
and its English help pages, `pydoc_data.topics` (prose).

Every step is the library function behind a command, called as a user would call the command:

    data       corpus.py: each domain split by file or topic into train and validation, a byte-level
               BPE tokenizer trained on both train splits, windows of tokens per domain and their
               mixture (train.npz, validation.npz: `input_ids`, `attention_mask`)
    teachers   `mtkd train` on the next tokens: one expert per domain, trained on that domain only
               (a recipe with no domain trains on the mixture)
    infer      `mtkd infer --top-k K` of the teachers over the mixture's train windows (a sparse store)
    students   `mtkd train --store`: a student several times smaller, on the mixture, from each
               teacher alone (`--teachers NAME`) and from all of them under each of `fusions`, mixed
               with the next-token cross-entropy (alpha); the same student on the next tokens alone
               (the baseline), for the same steps
    eval       `mtkd eval` of every student on each domain's validation windows and on their mixture;
               `mtkd infer` over the same three and `mtkd inspect` for the teachers and the ensemble
               under each fusion

Students train once per seed (initialisation and data order) and are reported as the mean and the
sample standard deviation over seeds; the teachers train once. The defaults below are the ones we
measured (README, "The language-model demo"); they are fixed, not tuned on the validation split per run.
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
GRU = {"embed": 128, "hidden": 384}  # the best teacher per second of training on 2 cores (README)


@dataclass(frozen=True)
class Fusing:
    """One multi-teacher student's fusion: `--fusion NAME --fusion-scope SCOPE`."""

    fusion: str
    scope: str = "row"

    @property
    def label(self) -> str:
        return self.fusion if self.scope == "row" else f"{self.fusion}-{self.scope}"


@dataclass(frozen=True)
class LMDemoConfig:
    corpus: CorpusConfig = CorpusConfig(max_bytes=500_000, prose_max_bytes=500_000)
    teachers: tuple[Recipe, ...] = (
        Recipe("code", f"{MODELS}:gru_lm", GRU, epochs=4, lr=5e-3, data="code"),
        Recipe("prose", f"{MODELS}:gru_lm", GRU, epochs=4, lr=5e-3, data="prose"),
    )
    student: Recipe = Recipe("student", f"{MODELS}:transformer_lm", {"d_model": 32, "layers": 1, "heads": 4},
                             epochs=2, lr=1e-2)
    # The train store: each position's top-32 plus 32 draws from the rest of the teacher's distribution
    # (SPEC v3 "Sparse targets with sampled tails"; tail_samples 0: the head and its tail bucket).
    # Measured on this demo, 3 seeds: every distilled student better than from top-64 (README). The
    # validation stores, which only score the teachers and their ensembles, keep the head alone.
    top_k: int = 32
    tail_samples: int = 32
    temperatures: tuple[float, ...] = (1.0, 2.0)
    temperature: float = 1.0
    alpha: float = 0.8
    # The multi-teacher students, one per fusion; the last is the demo's choice (`distilled_student`).
    fusions: tuple[Fusing, ...] = (Fusing("mean"), Fusing("best", "sequence"))
    fusion_temperature: float = 1.0
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
        if not self.fusions or len({f.label for f in self.fusions}) != len(self.fusions):
            raise BadInputError(f"the demo needs one or more distinct fusions, got {[f.label for f in self.fusions]}")
        domains = self.domains
        for recipe in self.teachers:
            if recipe.data is not None and recipe.data not in domains:
                raise BadInputError(f"teacher {recipe.name!r} trains on domain {recipe.data!r}, not one of {list(domains)}")

    @property
    def domains(self) -> tuple[str, ...]:
        return ("code", "prose") if self.corpus.prose_max_bytes else ("code",)


def student_runs(config: LMDemoConfig) -> dict[str, list[str]]:
    """The students' run names per row of the table: runs/ROW for the first seed, runs/ROW-seedS for
    the others; rows baseline, single-TEACHER per teacher, fused-FUSION per fusion."""
    rows = ["baseline", *(f"single-{r.name}" for r in config.teachers), *(f"fused-{f.label}" for f in config.fusions)]
    return {row: [row if i == 0 else f"{row}-seed{seed}" for i, seed in enumerate(config.seeds)] for row in rows}


def run_lm_demo(out: str | Path, config: LMDemoConfig = LMDemoConfig(), *, quiet: bool = True, log=print) -> dict[str, Any]:
    """Run the language-model demo under `out`; return perplexities and accuracies (on the mixture
    and per domain), bytes per token and wall time per stage (the shape of `mtkd demo lm --json`)."""
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
    train = str(corpus.train)
    # Where every model is measured: the mixture, then each domain.
    evaluations = {"mixture": str(corpus.validation), **{d.name: str(d.validation) for d in corpus.domains.values()}}
    wall["data"] = time.perf_counter() - t0
    log("data: " + "; ".join(f"{d.name} {len(d.train_texts)} train / {len(d.validation_texts)} validation texts "
                             f"({d.train_tokens} / {d.validation_tokens} tokens)" for d in corpus.domains.values())
        + f"; vocabulary {corpus.vocab_size} ({wall['data']:.1f} s)")

    def spec_file(recipe: Recipe, command: str) -> Path:
        path = out / "models" / f"{recipe.name}.toml"
        kwargs = {**recipe.kwargs, "vocab_size": corpus.vocab_size}
        path.write_text(f"# {command}\n" + toml_table("[student]", {"name": recipe.name, "factory": recipe.factory,
                                                                   "kwargs": kwargs}))
        return path

    def train_run(recipe: Recipe, run: str, data: str, seed: int = config.seeds[0], **options: Any) -> None:
        shown = f"../data/{Path(data).name}"
        spec = spec_file(recipe, f"mtkd train --student {recipe.name}.toml --data {shown} --out ../runs/{run}")
        validation = str(corpus.domains[recipe.data].validation) if recipe.data else str(corpus.validation)
        run_train(TrainConfig(student=spec, data=data, out=out / "runs" / run, epochs=recipe.epochs, lr=recipe.lr,
                              batch_size=config.batch_size, val_data=validation, seed=seed,
                              device=config.device, **options), quiet=quiet)

    # -- teachers: each trained on the next tokens of its own domain with `mtkd train` ---------------
    t0 = time.perf_counter()
    tables = []
    for recipe in config.teachers:
        train_run(recipe, f"teacher-{recipe.name}", str(corpus.domains[recipe.data].train) if recipe.data else train)
        tables.append(toml_table("[[teachers]]", {"name": recipe.name, "run": f"../runs/teacher-{recipe.name}"}))
        log(f"teacher {recipe.name} (on {recipe.data or 'the mixture'}): trained ({time.perf_counter() - t0:.1f} s so far)")
    teachers_toml = out / "models" / "teachers.toml"
    teachers_toml.write_text(
        f"# mtkd infer --teachers teachers.toml --data ../data/train.npz --top-k {config.top_k} "
        + (f"--tail-samples {config.tail_samples} " if config.tail_samples else "")
        + f"--temperatures {','.join(f'{t:g}' for t in config.temperatures)} --out ../stores/train\n\n" + "\n".join(tables)
    )
    wall["teachers"] = time.perf_counter() - t0

    # -- stage one: the teachers' top-k over the mixture's train windows -------------------------------
    t0 = time.perf_counter()
    store = out / "stores" / "train"
    run_infer(teachers_toml, train, store, top_k=config.top_k, tail_samples=config.tail_samples,
              temperatures=config.temperatures, batch_size=config.infer_batch_size, device=config.device)
    wall["infer"] = time.perf_counter() - t0
    log(f"infer: {corpus.train_tokens} positions x {len(config.teachers)} teachers, top-{config.top_k}"
        + (f" + {config.tail_samples} tail draws" if config.tail_samples else "") + f" ({wall['infer']:.1f} s)")

    # -- stage two: every student on the mixture, once per seed ----------------------------------------
    runs = student_runs(config)
    distil = {"store": store, "temperature": config.temperature, "alpha": config.alpha}
    stages: list[tuple[str, str, dict[str, Any]]] = [("baseline", "baseline", {})]
    stages += [("single_teacher", f"single-{r.name}", {**distil, "teachers": (r.name,)}) for r in config.teachers]
    stages += [("distil", f"fused-{f.label}", {**distil, "fusion": f.fusion, "fusion_scope": f.scope,
                                                "fusion_temperature": config.fusion_temperature})
               for f in config.fusions]
    for stage, row, options in stages:
        t0 = time.perf_counter()
        for run, seed in zip(runs[row], config.seeds):
            train_run(config.student, run, train, seed, **options)
        wall[stage] = wall.get(stage, 0.0) + time.perf_counter() - t0
        log(f"{row}: {len(config.seeds)} seed(s) ({time.perf_counter() - t0:.1f} s)")

    # -- evaluation: every student on each validation split; teachers and ensembles from stores -------
    t0 = time.perf_counter()
    student_metrics = {run: {where: pick(run_eval(data, run=out / "runs" / run, device=config.device))
                             for where, data in evaluations.items()}
                       for seeded in runs.values() for run in seeded}
    reports, validation_stores = {}, {where: out / "stores" / f"validation-{where}" for where in evaluations}
    for where, data in evaluations.items():
        run_infer(teachers_toml, data, validation_stores[where], top_k=config.top_k, temperatures=config.temperatures,
                  batch_size=config.infer_batch_size, device=config.device)
        reports[where] = inspect_store(open_store(validation_stores[where]))
    wall["eval"] = time.perf_counter() - t0
    wall["total"] = sum(wall.values())

    teachers = {r.name: _by_where({where: pick(next(t["metrics"] for t in report["teachers"] if t["name"] == r.name))
                                   for where, report in reports.items()})
                for r in config.teachers}
    ensembles = {f.label: _by_where({where: fused_ensemble(validation_stores[where], f, config.fusion_temperature)
                                     for where in evaluations})
                 for f in config.fusions}
    seeded_metrics = lambda row: [_by_where(student_metrics[run]) for run in runs[row]]  # noqa: E731
    students = {row: _over_seeds([student_metrics[run] for run in seeded]) for row, seeded in runs.items()}
    chosen = config.fusions[-1].label
    result = {
        "teachers": teachers,
        # the mean of the teachers' probabilities, as `mtkd inspect` reports it (as before)
        "ensemble": _by_where({where: pick(report["ensemble"]["metrics"]) for where, report in reports.items()}),
        "ensembles": ensembles,
        "baseline_student": students["baseline"],
        "single_teacher_students": {r.name: students[f"single-{r.name}"] for r in config.teachers},
        "fused_students": {f.label: students[f"fused-{f.label}"] for f in config.fusions},
        "distilled_student": students[f"fused-{chosen}"],
        "chosen_fusion": chosen,
        "experts": {r.data: r.name for r in config.teachers if r.data},
        "seeds": list(config.seeds),
        # each seed's, in the shape of the means above (as the rows demo's per_seed)
        "per_seed": {
            "baseline_student": seeded_metrics("baseline"),
            "single_teacher_students": {r.name: seeded_metrics(f"single-{r.name}") for r in config.teachers},
            "fused_students": {f.label: seeded_metrics(f"fused-{f.label}") for f in config.fusions},
            "distilled_student": seeded_metrics(f"fused-{chosen}"),
        },
        "bytes_per_token": _store_bytes(store) / corpus.train_tokens,
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "out": str(out),
        "config": _config_summary(config, corpus),
    }
    result["plot"] = plot_lm_demo(out, result, runs)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {"perplexity": metrics["perplexity"], "accuracy": metrics["accuracy"]}


def fused_ensemble(path: Path, fusing: Fusing, tau: float = 1.0, chunk: int = 512) -> dict[str, float]:
    """The ensemble of a top-k token store's teachers under `fusing`, weighted as `mtkd train` weighs
    them (pipeline/fusion.py): perplexity exp(mean_n -log sum_k w_nk p_k(y_n)) over the labelled
    positions, exactly (from the stored label log-probabilities), and next-token accuracy, the
    argmax of sum_k w_nk p_k over the ids the teachers list (an id a teacher does not list counts 0
    for it, as in `mtkd inspect`)."""
    import numpy as np
    import torch

    from mtkd.pipeline.config import Fusion
    from mtkd.pipeline.data import IGNORE_LABEL
    from mtkd.pipeline.fusion import weights_for
    from mtkd.pipeline.store import open_store

    store = open_store(path)
    names, n = store.teachers, store.num_rows
    fields = ("topk_ids", "topk_logprobs", "label_logprob", "entropy")
    arrays = [store.read(name, 0, n, only=fields) for name in names]
    labels = torch.from_numpy(store.labels())
    scores = torch.stack([torch.from_numpy(a["label_logprob"]) for a in arrays])  # (K, N)
    offsets = store.offsets()
    segments = torch.from_numpy(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    weights = weights_for(Fusion(fusing.fusion), labels=labels, prior=None, tau=tau, label_logprob=scores,
                          entropies=torch.stack([torch.from_numpy(a["entropy"]) for a in arrays]),
                          segments=segments if fusing.scope == "sequence" else None)
    k = len(names)
    weights = torch.full((n, k), 1.0 / k) if weights is None else weights.expand(n, k)
    has = labels != IGNORE_LABEL
    nll = -torch.logsumexp(weights.double().log() + scores.T.double(), dim=1)[has]
    ids = torch.from_numpy(np.concatenate([a["topk_ids"] for a in arrays], axis=1)).long()  # (N, K * k)
    probs = torch.cat([torch.from_numpy(a["topk_logprobs"].astype(np.float32)).exp() * weights[:, j, None]
                       for j, a in enumerate(arrays)], dim=1)
    correct = 0
    for start in range(0, n, chunk):
        i, p = ids[start:start + chunk], probs[start:start + chunk]
        mixed = ((i[:, :, None] == i[:, None, :]) * p[:, None, :]).sum(dim=2)  # each listed id's fused probability
        top1 = i.gather(1, mixed.argmax(dim=1, keepdim=True)).squeeze(1)
        correct += int(((top1 == labels[start:start + chunk]) & has[start:start + chunk]).sum())
    return {"perplexity": float(torch.exp(nll.mean())), "accuracy": correct / int(has.sum())}


def _by_where(metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """{mixture, DOMAIN...} -> the mixture's perplexity and accuracy at the top, `domains` below."""
    return {**metrics["mixture"], "domains": {where: m for where, m in metrics.items() if where != "mixture"}}


def _over_seeds(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Each seed's {where: metrics} -> the mean over seeds, with the perplexity's sample std (0 with one seed)."""
    def summary(where: str) -> dict[str, float]:
        values = {key: [m[where][key] for m in per_seed] for key in ("perplexity", "accuracy")}
        ppl = values["perplexity"]
        return {"perplexity": statistics.fmean(ppl), "accuracy": statistics.fmean(values["accuracy"]),
                "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0}

    return _by_where({where: summary(where) for where in per_seed[0]})


def _store_bytes(store: Path) -> int:
    """The store's size on disk: every chunk and metadata file (what a user pays to keep it)."""
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def _config_summary(config: LMDemoConfig, corpus: Corpus) -> dict[str, Any]:
    """What a reader of demo.json needs to know the numbers' conditions."""
    return {
        "corpus": {"train_files": len(corpus.train_files), "validation_files": len(corpus.validation_files),
                   "train_tokens": corpus.train_tokens, "validation_tokens": corpus.validation_tokens,
                   "vocab_size": corpus.vocab_size, "window": config.corpus.window,
                   "domains": {d.name: {"train_texts": len(d.train_texts), "validation_texts": len(d.validation_texts),
                                        "train_tokens": d.train_tokens, "validation_tokens": d.validation_tokens}
                               for d in corpus.domains.values()}},
        "teachers": {r.name: {"data": r.data or "mixture", "factory": r.factory, "kwargs": r.kwargs,
                              "epochs": r.epochs, "lr": r.lr} for r in config.teachers},
        "top_k": config.top_k, "tail_samples": config.tail_samples, "temperature": config.temperature, "alpha": config.alpha,
        "fusions": [f.label for f in config.fusions], "fusion_temperature": config.fusion_temperature,
        "student": {"kwargs": config.student.kwargs, "epochs": config.student.epochs, "lr": config.student.lr},
        "batch_size": config.batch_size,
    }
