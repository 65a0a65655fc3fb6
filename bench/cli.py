"""How long `mtkd --help` and every `mtkd CMD --help` take, against `python -c "import torch"`.

Target: each help faster than importing torch (a command imports torch only when it runs). Each
repeat runs one pair per command, a fresh process each, the two in alternating order so that a
load change on a shared machine hits both sides alike; the figure per command is the median of
its pairs' ratios (help / import torch), with the 20th and 80th percentiles.

    python bench/cli.py                      # 10 pairs per command
    python bench/cli.py --repeats 20 --json bench/results/cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

COMMANDS = ("infer", "inspect", "verify", "train", "eval", "demo")
TORCH = [sys.executable, "-c", "import torch"]


def mtkd_command() -> list[str]:
    """The `mtkd` script beside this Python (what a user runs), else `python -m mtkd.pipeline.cli`."""
    script = Path(sys.executable).parent / "mtkd"
    if script.is_file() or shutil.which("mtkd"):
        return [str(script) if script.is_file() else shutil.which("mtkd")]
    return [sys.executable, "-m", "mtkd.pipeline.cli"]


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"median": statistics.median(ordered), "p20": pick(0.2), "p80": pick(0.8)}


def bench(repeats: int) -> dict:
    mtkd = mtkd_command()
    cases = {"mtkd --help": [*mtkd, "--help"], **{f"mtkd {c} --help": [*mtkd, c, "--help"] for c in COMMANDS}}
    for command in cases.values():  # warm the file cache and fail early on a broken command
        seconds(command)
    seconds(TORCH)
    times: dict[str, dict[str, list[float]]] = {name: {"help": [], "torch": [], "ratio": []} for name in cases}
    load_before = os.getloadavg()
    for repeat in range(repeats):
        for name, command in cases.items():
            if repeat % 2:
                torch_s, help_s = seconds(TORCH), seconds(command)
            else:
                help_s, torch_s = seconds(command), seconds(TORCH)
            times[name]["help"].append(help_s)
            times[name]["torch"].append(torch_s)
            times[name]["ratio"].append(help_s / torch_s)
    results = {
        name: {"help_s": quantiles(t["help"]), "import_torch_s": quantiles(t["torch"]), "ratio": quantiles(t["ratio"])}
        for name, t in times.items()
    }
    return {
        "results": results,
        "repeats": repeats,
        "command": mtkd,
        "conditions": {
            "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "python": platform.python_version(), "torch": metadata.version("torch"),
            "typer": metadata.version("typer"), "machine": platform.machine(), "system": platform.system(),
        },
        "target": "ratio < 1 for every command",
        "met": all(r["ratio"]["median"] < 1 for r in results.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="pairs per command")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    report = bench(args.repeats)
    print(f"{'command':<22}{'help s':>9}{'torch s':>9}{'ratio':>7}  (p20-p80)")
    for name, r in report["results"].items():
        ratio = r["ratio"]
        print(f"{name:<22}{r['help_s']['median']:>9.3f}{r['import_torch_s']['median']:>9.3f}"
              f"{ratio['median']:>7.2f}  ({ratio['p20']:.2f}-{ratio['p80']:.2f})")
    c = report["conditions"]
    print(f"{report['repeats']} pairs per command, {c['cpus']} CPUs, load average "
          f"{c['load_average_before'][0]:.1f} -> {c['load_average_after'][0]:.1f}; target met: {report['met']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
