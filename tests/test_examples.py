"""The example configs under examples/ run as their first line says (with one epoch instead of many),
the cluster scripts do what they claim (sharded stage one equals one process, torchrun trains), and
the bring-your-own-data example (examples/own-data) runs command by command as README shows it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.store import open_store

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BIN = Path(sys.executable).parent


def command_of(config: Path) -> list[str]:
    """The command a config file starts with: its first line, `# mtkd ...`."""
    first = config.read_text().splitlines()[0]
    assert first.startswith("# mtkd "), f"{config} must start with the command that runs it"
    return shlex.split(first[2:])[1:]


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"mtkd {shlex.join(args)} exited {result.exit_code}:\n{result.output}"


def one_epoch(args: list[str]) -> list[str]:
    if "--epochs" in args:
        i = args.index("--epochs")
        args = args[:i] + args[i + 2 :]
    return [*args, "--epochs", "1", "--quiet"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_examples_run_as_documented(workdir):
    # Teachers on labels, stage one, stage two: the commands the configs start with.
    run_cli(one_epoch(command_of(workdir / "examples/teachers/cnn.toml")))
    run_cli(one_epoch(command_of(workdir / "examples/teachers/gru.toml")))
    run_cli([*command_of(workdir / "examples/teachers.toml"), "--quiet"])
    run_cli(one_epoch(command_of(workdir / "examples/student.toml")))
    assert (workdir / "runs/student/student.pt").is_file()
    store = open_store(workdir / "stores/train")
    assert sorted(store.teachers) == ["cnn", "gru"]
    store.require_complete(store.teachers)

    # The sbatch array script, as two array tasks one after the other, makes the same store.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "STORE": "stores/sharded",
           "SLURM_ARRAY_TASK_COUNT": "2"}
    for task in ("0", "1"):
        subprocess.run(["bash", "examples/infer.sbatch"], env={**env, "SLURM_ARRAY_TASK_ID": task}, check=True,
                       capture_output=True, timeout=300)
    sharded = open_store(workdir / "stores/sharded")
    for name in store.teachers:
        single = store.read_logits(name, 0, store.num_rows).view(-1).numpy().view(np.uint8)
        assert np.array_equal(single, sharded.read_logits(name, 0, store.num_rows).view(-1).numpy().view(np.uint8))

    # The torchrun script: two CPU processes (gloo), one run directory.
    subprocess.run(["bash", "examples/train.torchrun.sh"], env={**env, "EPOCHS": "1", "RUN": "runs/ddp"}, check=True,
                   capture_output=True, timeout=300)
    assert (workdir / "runs/ddp/student.pt").is_file()


OWN_DATA = EXAMPLES / "own-data"


def own_data_commands() -> list[str]:
    """The commands of examples/own-data/run.sh, in order (what README's bring-your-own-data shows)."""
    return [line for line in (OWN_DATA / "run.sh").read_text().splitlines() if line and not line.startswith(("#", "set "))]


def test_readme_shows_every_own_data_command():
    readme = (EXAMPLES.parent / "README.md").read_text()
    for command in own_data_commands():
        assert command in readme, f"README's bring-your-own-data example lacks: {command}"


@pytest.mark.slow
def test_own_data_example_runs_as_documented(tmp_path, monkeypatch):
    # Every command of run.sh from the example's folder, `mtkd` ones in process, the students with 10
    # epochs instead of 30 (the teachers as written); data and models come from the user's `shapes`.
    shutil.copytree(OWN_DATA, tmp_path / "own-data")
    monkeypatch.chdir(tmp_path / "own-data")
    monkeypatch.delitem(sys.modules, "shapes", raising=False)
    accuracy = {}
    for command in own_data_commands():
        args = shlex.split(command)
        if args[0] == "python":
            subprocess.run([sys.executable, *args[1:]], check=True, capture_output=True, timeout=120)
            continue
        assert args[0] == "mtkd", command
        args = args[1:]
        if args[:3] == ["train", "--student", "student.toml"]:
            args[args.index("--epochs") + 1] = "10"
        result = CliRunner().invoke(app, [*args, "--quiet", "--json"])
        assert result.exit_code == 0, f"{command} exited {result.exit_code}:\n{result.output}"
        report = json.loads(result.stdout.strip().splitlines()[-1])
        if args[0] == "eval":
            accuracy[args[1]] = report["accuracy"]
            assert report["n"] == 2000
    monkeypatch.delitem(sys.modules, "shapes", raising=False)
    store = open_store(Path("stores/transfer"))
    assert sorted(store.teachers) == ["cnn", "pooled"] and store.num_rows == 5500
    store.require_complete(store.teachers)
    assert set(accuracy) == {"runs/cnn", "runs/pooled", "runs/student", "runs/baseline"}
    # The CNN teacher is far above chance (0.25), and its student learns from it in 10 epochs.
    assert accuracy["runs/cnn"] >= 0.8 and accuracy["runs/student"] >= 0.45, accuracy


REGRESSION = EXAMPLES / "regression"


def test_regression_example_configs_run_as_their_first_lines_say(tmp_path, monkeypatch):
    # examples/regression: the data from friedman.py, then each config's own command (one epoch), in
    # run.sh's order: the three teachers, stage one on the transfer set, the median student.
    shutil.copytree(REGRESSION, tmp_path / "regression", ignore=shutil.ignore_patterns("data", "runs", "stores"))
    monkeypatch.chdir(tmp_path / "regression")
    monkeypatch.delitem(sys.modules, "friedman", raising=False)
    subprocess.run([sys.executable, "friedman.py"], check=True, capture_output=True, timeout=120)
    for name in ("teacher-wide", "teacher-narrow", "teacher-quadratic"):
        run_cli(one_epoch(command_of(Path(f"{name}.toml"))))
    run_cli([*command_of(Path("teachers.toml")), "--quiet"])
    run_cli(one_epoch(command_of(Path("student.toml"))))
    monkeypatch.delitem(sys.modules, "friedman", raising=False)
    store = open_store(Path("stores/transfer"))
    assert store.regression and sorted(store.teachers) == ["narrow", "quadratic", "wide"] and store.num_rows == 5000
    assert {store.layout(t).name for t in store.teachers} == {"values"}
    result = CliRunner().invoke(app, ["eval", "runs/median", "--data", "data/test.npz", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n"] == 2000 and np.isfinite([report["mse"], report["mae"], report["r2"]]).all()
