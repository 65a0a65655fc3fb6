"""`mtkd demo rows`: offline multi-teacher distillation end to end on MNIST-1D, and what it buys.

Every step is the library function behind a command, called as a user would call the command:

    data       mnist1d:train (4000 labelled), mnist1d:test (1000), a validation draw (1000 labelled
               rows of another seed), and a transfer set: the 4000 labelled rows plus N unlabelled
               ones drawn in chunks with other seeds (labels -100), as transfer.npz
    teachers   `mtkd train` on the labels: a 1-D CNN, a bidirectional GRU, a wide-kernel 1-D CNN, each
               on its own part of the 4000 labelled rows (data/part-NAME.npz): complementary teachers,
               as groups that each collected their own data train them. Each group labelled mostly its
               own classes (class c belongs to teacher c mod 3: {0,3,6,9}, {1,4,7}, {2,5,8}): 90% of a
               class's rows are in its owner's part, the rest spread over the others (`own_share`)
    infer      `mtkd infer` of the three teachers over the transfer set
    distil     `mtkd train --store --fusion posterior`: the paper's MLP student (40-100-100-10) on the
               fused teachers
    single     the same, from each teacher alone (`--teachers NAME`): what the other teachers add
    baseline   `mtkd train`: the same MLP on the 4000 hard labels
    eval       `mtkd eval` of every model on the test split; `mtkd infer` over the test split and
               the store's fused ensemble (what `mtkd inspect` reports) for the ensemble

Students train once per seed (`seeds`: initialisation and data order) and are reported as the mean
and sample standard deviation over seeds; each keeps its best epoch by accuracy on the validation
draw (never on the test split, which only measures). Teachers train once.

The defaults below are the ones we measured (README, "The demo"): fixed, not tuned per run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtkd.pipeline.errors import BadInputError
from mtkd.pipeline.progress import progress_bar

MODELS = "mtkd.pipeline.models"
TRANSFER_CHUNK = 5000  # rows per generated chunk of the transfer set: one step of the data bar
TRANSFER_SEED = 1234  # chunk i is drawn with seed TRANSFER_SEED + i (the labelled splits use 42)
PARTS_SEED = 99  # the draw that puts each labelled row in one teacher's part (teacher_parts)


@dataclass(frozen=True)
class Recipe:
    """A model of a demo and how `mtkd train` trains it: factory, kwargs, epochs, lr (both demos)."""

    name: str
    factory: str
    kwargs: dict[str, Any]
    epochs: int
    lr: float
    data: str | None = None  # what it trains on where a demo's models differ: an lm demo domain; None: all


@dataclass(frozen=True)
class RowsDemoConfig:
    transfer_size: int = 50_000
    teachers: tuple[Recipe, ...] = (
        Recipe("cnn", f"{MODELS}:cnn1d", {"channels": 64}, epochs=30, lr=3e-3),
        Recipe("gru", f"{MODELS}:gru", {"hidden": 64}, epochs=40, lr=1e-2),
        Recipe("cnn_wide", f"{MODELS}:cnn1d", {"channels": 32, "kernel_size": 9}, epochs=30, lr=3e-3),
    )
    student_kwargs: dict[str, Any] = field(default_factory=lambda: {"in_features": 40, "hidden": [100, 100], "num_classes": 10})
    # Distillation: T=2, KD term only, 30 epochs at lr 1e-2. Fusion `posterior`: on a labelled row
    # each teacher weighs by how well it explains the label, on an unlabelled one by its certainty
    # (the entropy fallback), so a weak teacher does not dilute the others as under `mean`.
    fusion: str = "posterior"
    temperature: float = 2.0
    alpha: float = 1.0
    distil_epochs: int = 30
    distil_lr: float = 1e-2
    distil_batch_size: int = 256
    # The baseline gets the best of the same small search we gave the student (lr, epochs).
    baseline_epochs: int = 30
    baseline_lr: float = 1e-2
    batch_size: int = 128
    infer_batch_size: int = 256  # on 2 CPU cores these teachers forward 1.6x faster at 256 rows than at 512
    # Complementary teachers, as real ones come from different groups with their own data: class c
    # belongs to teacher c mod K, whose part holds `own_share` of the class's labelled rows; the rest
    # are spread evenly over the other teachers (every labelled row in exactly one part; a fixed draw,
    # PARTS_SEED). 1/K gives random disjoint parts; 1.0, teachers that never see another's classes;
    # None: every teacher on all the labelled rows.
    own_share: float | None = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)  # one run of every student per seed; the teachers use seeds[0]
    val_data: str = "mnist1d:test?seed=7"  # a labelled draw of its own: picks each student's best epoch
    device: str = "auto"


def toml_table(header: str, fields: dict[str, Any]) -> str:
    """One TOML table (`[student]`, `[[teachers]]`) from a flat dict of strings, numbers, lists, tables."""
    lines = [header]
    for key, value in fields.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and numbers: JSON's forms are TOML's


def student_runs(config: RowsDemoConfig) -> dict[str, list[str]]:
    """The students' run names per row of the table: baseline, one per teacher, the distilled one."""
    runs = {"baseline": [f"baseline-s{s}" for s in config.seeds]}
    for recipe in config.teachers:
        runs[f"single-{recipe.name}"] = [f"single-{recipe.name}-s{s}" for s in config.seeds]
    runs["distilled"] = [f"distilled-s{s}" for s in config.seeds]
    return runs


def run_rows_demo(out: str | Path, config: RowsDemoConfig = RowsDemoConfig(), *, quiet: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo under `out`; return accuracies (fractions) and wall time per stage."""
    # The stages (torch, zarr) are imported when the demo runs, not when `mtkd demo --help` reads the
    # defaults above.
    import numpy as np

    from mtkd.pipeline.evaluate import run_eval
    from mtkd.pipeline.infer import run_infer
    from mtkd.pipeline.report import inspect_store
    from mtkd.pipeline.data import IGNORE_LABEL, load_data
    from mtkd.pipeline.store import open_store

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Every stage would refuse a finished run or a store of other data halfway through; say so first.
        raise BadInputError(f"--out {str(out)!r} exists and is not an empty folder: choose another, or remove it")
    if config.transfer_size < 0:
        raise BadInputError(f"transfer size must be >= 0, got {config.transfer_size}")
    if not config.seeds:
        raise BadInputError("the demo needs at least one seed")
    if config.own_share is not None and not 0.0 <= config.own_share <= 1.0:
        raise BadInputError(f"own_share must be in [0, 1] (or None: every teacher on all rows), got {config.own_share}")
    for sub in ("data", "models", "runs", "stores"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    runs = out / "runs"

    # -- data: the standard labelled splits, a validation draw, and the transfer set -----------------
    t0 = time.perf_counter()
    train, test = "mnist1d:train", "mnist1d:test"
    chunks = [min(TRANSFER_CHUNK, config.transfer_size - start) for start in range(0, config.transfer_size, TRANSFER_CHUNK)]
    with progress_bar(quiet) as bars:
        bar = bars.bar("generate", "MNIST-1D", total=2 + len(chunks))
        labelled = load_data(train)  # test is the same draw's other part: it comes with it
        bar.advance()
        load_data(config.val_data)
        bar.advance()
        x_parts, y_parts = [labelled.x], [labelled.labels]
        for i, n in enumerate(chunks):
            unlabelled = load_data(f"mnist1d:unlabeled?n={n}&seed={TRANSFER_SEED + i}")
            x_parts.append(unlabelled.x)
            y_parts.append(np.full(len(unlabelled), IGNORE_LABEL, dtype=np.int64))
            bar.advance()
    transfer = out / "data" / "transfer.npz"
    np.savez(transfer, x=np.concatenate(x_parts), y=np.concatenate(y_parts))
    transfer_rows = len(labelled) + config.transfer_size
    wall["data"] = time.perf_counter() - t0
    log(f"data: {len(labelled)} labelled + {config.transfer_size} unlabelled rows ({wall['data']:.1f} s)")

    # -- teachers: trained on the labels with `mtkd train`, each on its own part of them --------------
    t0 = time.perf_counter()
    split = config.own_share is not None
    teacher_data = teacher_parts(out / "data", labelled.x, labelled.labels, config) if split \
        else {r.name: train for r in config.teachers}
    teacher_tables = []
    for recipe in config.teachers:
        spec = out / "models" / f"{recipe.name}.toml"
        data = teacher_data[recipe.name]
        shown = f"../data/{Path(data).name}" if split else data
        spec.write_text(
            f"# mtkd train --student {spec.name} --data {shown} --epochs {recipe.epochs} --lr {recipe.lr} "
            f"--out ../runs/teacher-{recipe.name}\n"
            + toml_table("[student]", {"name": recipe.name, "factory": recipe.factory, "kwargs": recipe.kwargs})
        )
        _train(spec, data, runs / f"teacher-{recipe.name}", epochs=recipe.epochs, lr=recipe.lr,
               batch_size=config.batch_size, seed=config.seeds[0], device=config.device, quiet=quiet)
        teacher_tables.append(
            toml_table("[[teachers]]", {"name": recipe.name, "factory": recipe.factory, "kwargs": recipe.kwargs,
                                         "checkpoint": f"../runs/teacher-{recipe.name}/student.pt"})
        )
        log(f"teacher {recipe.name}: trained ({time.perf_counter() - t0:.1f} s so far)")
    teachers_toml = out / "models" / "teachers.toml"
    teachers_toml.write_text(
        f"# mtkd infer --teachers {teachers_toml.name} --data ../data/transfer.npz --out ../stores/transfer\n\n"
        + "\n".join(teacher_tables)
    )
    wall["teachers"] = time.perf_counter() - t0

    # -- stage one: every teacher over the transfer set (and the test set, for the ensemble) ---------
    t0 = time.perf_counter()
    transfer_store, test_store = out / "stores" / "transfer", out / "stores" / "test"
    _infer(run_infer, teachers_toml, str(transfer), transfer_store, config, quiet)
    wall["infer"] = time.perf_counter() - t0
    log(f"infer: {transfer_rows} rows x {len(config.teachers)} teachers ({wall['infer']:.1f} s)")

    # -- stage two: the students, one run per seed ---------------------------------------------------
    student = out / "models" / "student.toml"
    student.write_text(
        "# mtkd train --student student.toml --data ../data/transfer.npz --store ../stores/transfer "
        f"--temperature {config.temperature} --val-data '{config.val_data}' --out ../runs/distilled-s0\n"
        + toml_table("[student]", {"name": "mlp", "factory": f"{MODELS}:mlp", "kwargs": config.student_kwargs})
    )
    distil = {"store": transfer_store, "fusion": config.fusion, "temperature": config.temperature,
              "alpha": config.alpha, "epochs": config.distil_epochs, "lr": config.distil_lr,
              "batch_size": config.distil_batch_size, "val_data": config.val_data, "device": config.device,
              "quiet": quiet}
    for stage, name, teachers in [("distil", "distilled", None),
                                  *(("single_teacher", f"single-{r.name}", [r.name]) for r in config.teachers)]:
        t0 = time.perf_counter()
        for seed in config.seeds:
            _train(student, str(transfer), runs / f"{name}-s{seed}", teachers=teachers, seed=seed, **distil)
        wall[stage] = wall.get(stage, 0.0) + time.perf_counter() - t0
        log(f"{name}: {len(config.seeds)} seeds ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    for seed in config.seeds:
        _train(student, train, runs / f"baseline-s{seed}", epochs=config.baseline_epochs, lr=config.baseline_lr,
               batch_size=config.batch_size, val_data=config.val_data, seed=seed, device=config.device, quiet=quiet)
    wall["baseline"] = time.perf_counter() - t0
    log(f"baseline: {len(config.seeds)} seeds ({wall['baseline']:.1f} s)")

    # -- evaluation on the test split ----------------------------------------------------------------
    t0 = time.perf_counter()
    _infer(run_infer, teachers_toml, test, test_store, config, quiet)
    students = student_runs(config)
    names = [f"teacher-{r.name}" for r in config.teachers] + [run for seeded in students.values() for run in seeded]
    accuracy = {name: run_eval(test, run=runs / name, device=config.device)["accuracy"] for name in names}
    ensemble = inspect_store(open_store(test_store))["ensemble"]["metrics"]["accuracy"]
    wall["eval"] = time.perf_counter() - t0
    wall["total"] = sum(wall.values())

    per_seed = {row: [accuracy[run] for run in seeded] for row, seeded in students.items()}
    result = {
        "teachers": {r.name: accuracy[f"teacher-{r.name}"] for r in config.teachers},
        "ensemble": ensemble,
        "baseline_student": statistics.fmean(per_seed["baseline"]),
        "single_teacher_students": {r.name: statistics.fmean(per_seed[f"single-{r.name}"]) for r in config.teachers},
        "distilled_student": statistics.fmean(per_seed["distilled"]),
        "seeds": list(config.seeds),
        # the students' spread over seeds: sample standard deviation (0 with one seed), then each seed's
        "std": _by_row(config, {row: _std(values) for row, values in per_seed.items()}),
        "per_seed": _by_row(config, per_seed),
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "out": str(out),
        "config": {
            "transfer_size": config.transfer_size, "fusion": config.fusion, "temperature": config.temperature,
            "alpha": config.alpha, "distil_epochs": config.distil_epochs, "distil_lr": config.distil_lr,
            "val_data": config.val_data, "own_share": config.own_share,
        },
    }
    from mtkd.pipeline.demos.plot import plot_rows_demo

    result["plot"] = plot_rows_demo(out, result, students)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def teacher_parts(folder: Path, x, labels, config: RowsDemoConfig) -> dict[str, str]:
    """Write part-NAME.npz per teacher under `folder` and return name -> path: every labelled row in
    exactly one part, the row of class c in its owner's part (teacher c mod K) with probability
    `config.own_share`, otherwise in one of the other K - 1 parts, uniformly (a fixed draw, PARTS_SEED)."""
    import numpy as np

    k, n = len(config.teachers), len(labels)
    rng = np.random.default_rng(PARTS_SEED)
    owner = labels % k
    # (owner + 1..k-1) mod k is each other teacher with the same chance; with one teacher, itself
    other = (owner + rng.integers(1, k, size=n)) % k if k > 1 else owner
    part = np.where(rng.random(n) < config.own_share, owner, other)
    paths = {}
    for i, recipe in enumerate(config.teachers):
        rows = np.flatnonzero(part == i)
        paths[recipe.name] = str(folder / f"part-{recipe.name}.npz")
        np.savez(paths[recipe.name], x=x[rows], y=labels[rows])
    return paths


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _by_row(config: RowsDemoConfig, rows: dict[str, Any]) -> dict[str, Any]:
    """{baseline, single-NAME..., distilled} -> the result's shape: baseline_student,
    single_teacher_students {NAME: ...}, distilled_student."""
    return {
        "baseline_student": rows["baseline"],
        "single_teacher_students": {r.name: rows[f"single-{r.name}"] for r in config.teachers},
        "distilled_student": rows["distilled"],
    }


def _train(student: Path, data: str, out: Path, **options: Any) -> dict[str, Any]:
    """`mtkd train` with the demo's options; `quiet` is the display's, the rest the run's config."""
    from mtkd.pipeline.config import TrainConfig
    from mtkd.pipeline.train import run_train

    quiet = options.pop("quiet")
    return run_train(TrainConfig(student, data, out, **options), quiet=quiet)


def _infer(run_infer, teachers: Path, data: str, out: Path, config: RowsDemoConfig, quiet: bool) -> None:
    with progress_bar(quiet) as bars:
        bar = bars.bar("infer", f"{out.name} ({len(config.teachers)} teachers)")
        run_infer(teachers, data, out, batch_size=config.infer_batch_size, device=config.device,
                  progress=lambda done, total: bar.update(completed=done, total=total))
