"""The command line as a user meets it: --help that shows every command's examples whole, flags
without value types, `--json` that ends stdout with one JSON object on failure too, and no heavy
import before a command runs."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from mtkd.pipeline.commands import demo, eval, infer, inspect as inspect_command, train, verify

COMMANDS = {"infer": infer.infer, "inspect": inspect_command.inspect, "verify": verify.verify,
            "train": train.train, "eval": eval.eval_command, "demo": demo.demo}


def help_of(*args: str, columns: int = 100) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def examples(function) -> list[str]:
    """The lines under `Example:` in a command's docstring, as a user copies them."""
    doc = inspect.getdoc(function)
    return [line.strip() for line in doc.split("Example:")[1].splitlines() if line.strip()]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_example_line_whole_in_80_columns(name):
    output = help_of(name, columns=80)
    lines = [line.strip() for line in output.splitlines()]
    for example in examples(COMMANDS[name]):
        assert len(example) <= 76, f"example wider than an 80-column terminal shows: {example!r}"
        assert example in lines, f"{example!r} is wrapped or missing in `mtkd {name} --help`:\n{output}"


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)])
def test_flags_show_no_value_type(args):
    output = help_of(*args)
    assert "<bool>" not in output
    assert "--help" in output


def test_train_example_validates_on_a_validation_split_not_the_test_set():
    for line in examples(train.train):
        assert "--val-data mnist1d:test" not in line


def test_eval_batch_size_default_is_the_library_default():
    from mtkd.pipeline.evaluate import EVAL_BATCH_SIZE

    assert eval.BATCH_SIZE == EVAL_BATCH_SIZE


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_json_on_bad_input_ends_stdout_with_the_error(tmp_path):
    missing = tmp_path / "nope.npz"
    teachers = tmp_path / "t.toml"
    teachers.write_text('[[teachers]]\nname = "a"\nfactory = "mtkd.pipeline.models:mlp"\n')
    result = CliRunner().invoke(app, ["infer", "--teachers", str(teachers), "--data", str(missing),
                                      "--out", str(tmp_path / "s.zarr"), "--json"])
    assert result.exit_code == 2
    error = last_json_line(result.stdout)["error"]
    assert set(error) == {"kind", "message"}
    assert error["kind"].endswith("Error") and str(missing) in error["message"]
    assert result.stderr.startswith("error: ")  # the one line for people, as without --json
    assert not (tmp_path / "s.zarr").exists()


def test_json_on_a_usage_error_ends_stdout_with_the_error():
    result = CliRunner().invoke(app, ["eval", "--json"])  # --data is required
    assert result.exit_code == 2
    error = last_json_line(result.stdout)["error"]
    assert error["kind"] == "MissingParameter" and "--data" in error["message"]


INFER = ["infer", "--teachers", "{toml}", "--data", "x.npz", "--out", "{out}"]


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(("args", "culprit"), [
    ([*INFER, "--top-k", "abc"], "'--top-k'"),
    ([*INFER, "--batch-size", "0"], "'--batch-size': Input should be greater than or equal to 1"),
    ([*INFER, "--dtype", "float64"], "'float64' is not one of"),
    (["infer", "--teachers", "{missing}", "--data", "x.npz", "--out", "{out}"], "'--teachers'"),
    (["train", "--epochs", "-1"], "'--epochs'"),
    (["eval"], "Missing option '--data'"),
    (["--bogus"], "No such option: --bogus"),
    (["infe"], "No such command 'infe'. Did you mean 'infer'?"),
])
def test_usage_errors_are_one_line_like_every_refusal(tmp_path, args, culprit, as_json):
    """click's own errors (a value of the wrong type, out of range, not a choice, a missing file or
    option, an unknown option or command): `error: ...` in one line on stderr, exit 2, never typer's
    boxed usage text; the JSON line under --json."""
    (tmp_path / "t.toml").write_text('[[teachers]]\nname = "a"\nfactory = "mtkd.pipeline.models:mlp"\n')
    places = {"toml": tmp_path / "t.toml", "missing": tmp_path / "missing.toml", "out": tmp_path / "s.zarr"}
    argv = [a.format(**places) for a in args] + (["--json"] if as_json else [])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and culprit in message, message
    assert "Usage:" not in result.output and "╭" not in result.output
    if as_json:
        assert culprit in last_json_line(result.stdout)["error"]["message"]
    else:
        assert not result.stdout.strip()
    assert not (tmp_path / "s.zarr").exists()


def test_json_after_a_bare_double_dash_is_an_argument_not_the_flag(tmp_path):
    result = CliRunner().invoke(app, ["inspect", "--", "--json"])
    assert result.exit_code == 2
    assert not result.stdout.strip()


def test_without_json_failure_prints_no_json(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2
    assert "{" not in result.stdout


def test_help_imports_nothing_heavy():
    # What `mtkd --help` and every `mtkd CMD --help` load; torch alone takes longer than the whole help
    # should (bench/cli.py measures the times).
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mtkd.pipeline.cli import app\n"
        f"for args in ([], *([c] for c in {list(COMMANDS)!r})):\n"
        "    assert CliRunner().invoke(app, [*args, '--help']).exit_code == 0\n"
        "heavy = ('torch', 'zarr', 'numpy', 'mtkd.kernels', 'mtkd.pipeline.train', 'mtkd.pipeline.store')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"--help imported {loaded}"
