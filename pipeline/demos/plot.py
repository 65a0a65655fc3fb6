"""The rows demo's figure, accuracy.png: what each model reaches on the test split, and how each
student's validation accuracy grows epoch by epoch (matplotlib, the `demo` extra; none without it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEACHER, ENSEMBLE, BASELINE, SINGLE, DISTILLED = "#7a9cc6", "#3b6ea8", "#c77c5a", "#d9b26f", "#4f9a5b"


def plot_rows_demo(out: Path, result: dict[str, Any], students: dict[str, list[str]]) -> str | None:
    """Write out/accuracy.png; `students` maps a table row (baseline, single-NAME, distilled) to its
    runs under out/runs, one per seed. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    singles = result["single_teacher_students"]
    std = result["std"]
    bars = [(f"teacher\n{n}", a, 0.0, TEACHER) for n, a in result["teachers"].items()]
    bars.append(("ensemble", result["ensemble"], 0.0, ENSEMBLE))
    bars.append(("baseline", result["baseline_student"], std["baseline_student"], BASELINE))
    bars += [(f"from {n}\nonly", a, std["single_teacher_students"][n], SINGLE) for n, a in singles.items()]
    bars.append(("from all\nteachers", result["distilled_student"], std["distilled_student"], DISTILLED))

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    drawn = left.bar([b[0] for b in bars], [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3,
                     color=[b[3] for b in bars])
    left.bar_label(drawn, labels=[f"{b[1]:.3f}" for b in bars], fontsize=7, padding=2)
    left.set_ylim(0, 1.08)
    left.set_ylabel("test accuracy")
    seeds = len(result["seeds"])
    left.set_title(f"MNIST-1D test accuracy (students: mean ± std over {seeds} seed{'s' * (seeds > 1)})")
    left.tick_params(axis="x", labelsize=7)

    colours = {"baseline": BASELINE, "distilled": DISTILLED}
    labels = {"baseline": "baseline (hard labels)", "distilled": "from all teachers"}
    for row, runs in students.items():
        curves = [_val_accuracy(out / "runs" / run) for run in runs]
        epochs = min(len(c) for c in curves)
        if not epochs:
            continue
        mean = [sum(c[e] for c in curves) / len(curves) for e in range(epochs)]
        label = labels.get(row, row.replace("single-", "from ") + " only")
        style = {} if row in colours else {"linestyle": "--"}
        right.plot(range(1, epochs + 1), mean, label=label, color=colours.get(row), **style)
        if len(curves) > 1:
            right.fill_between(range(1, epochs + 1), [min(c[e] for c in curves) for e in range(epochs)],
                               [max(c[e] for c in curves) for e in range(epochs)], alpha=0.15, color=colours.get(row))
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy")
    right.set_title("students per epoch (mean over seeds; band: min-max)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _val_accuracy(run: Path) -> list[float]:
    """Validation accuracy per epoch from a run's metrics.jsonl (train --val-data writes it)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None]


def plot_lm_demo(out: Path, result: dict[str, Any], runs: dict[str, list[str]]) -> str | None:
    """Write out/perplexity.png: each model's validation perplexity on the mixture and on each domain,
    and every student's validation perplexity per epoch (`runs`: table row -> its runs, first seed
    first). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [(f"teacher\n{n}", m, TEACHER) for n, m in result["teachers"].items()]
    models += [(f"ensemble\n{f}", m, ENSEMBLE) for f, m in result["ensembles"].items()]
    models.append(("baseline", result["baseline_student"], BASELINE))
    models += [(f"from {n}\nonly", m, SINGLE) for n, m in result["single_teacher_students"].items()]
    models += [(f"from all\n{f}", m, DISTILLED) for f, m in result["fused_students"].items()]
    wheres = ["mixture", *next(iter(result["teachers"].values()))["domains"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(wheres)
    for j, where in enumerate(wheres):
        values = [m["perplexity"] if where == "mixture" else m["domains"][where]["perplexity"] for _, m, _ in models]
        xs = [i + (j - (len(wheres) - 1) / 2) * width for i in range(len(models))]
        drawn = left.bar(xs, values, width, color=[c for _, _, c in models], alpha=1.0 - 0.3 * j,
                         edgecolor="black" if j == 0 else "none", label=where)
        left.bar_label(drawn, labels=[f"{v:.0f}" for v in values], fontsize=6, padding=1)
    left.set_xticks(range(len(models)), [label for label, _, _ in models], fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("validation perplexity (lower is better)")
    left.set_title("perplexity per model: " + " / ".join(wheres) + " (left to right)")
    for row, seeded in runs.items():
        curve = _val_metric(out / "runs" / seeded[0], "val_perplexity")
        colour = BASELINE if row == "baseline" else SINGLE if row.startswith("single-") else DISTILLED
        style = "--" if row.startswith("single-") else "-"
        right.plot(range(1, len(curve) + 1), curve, marker="o", linestyle=style, label=row, color=colour)
    right.set_xlabel("epoch")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("validation perplexity (mixture)")
    right.set_yscale("log")
    right.set_title("students per epoch (first seed)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out / "perplexity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _val_metric(run: Path, key: str) -> list[float]:
    """One validation metric per epoch from a run's metrics.jsonl (train --val-data writes it)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if r.get(key) is not None]
