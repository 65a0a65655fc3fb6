"""README's language-model guide, run verbatim: its TOML blocks are written as the files they name,
its bash block's `mtkd` commands run one by one (through the real CLI) on tiny Hugging Face models
built locally (tests/pipeline/hf_world.py: nothing is downloaded), from a .jsonl of text and one of
chat messages to an exported student, which reloads with `from_pretrained` to `mtkd eval`'s
perplexity."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtkd.pipeline.cli import app
from tests.pipeline.hf_world import hf_world

transformers = pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Language models with Hugging Face"


def guide() -> tuple[dict[str, str], list[str]]:
    """The section's TOML files (name -> text, named by their first line) and its mtkd commands."""
    text = README.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start + 1)]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        if lang == "toml":
            name = body.splitlines()[0].removeprefix("# ").split(":")[0]
            files[name] = body
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip().startswith("mtkd "):
                    commands.append(line.strip())
    return files, commands


def test_the_guide_names_each_command_once():
    files, commands = guide()
    assert set(files) == {"teachers.toml", "student.toml"}
    verbs = [shlex.split(c)[1] for c in commands]
    assert [v for i, v in enumerate(verbs) if v not in verbs[:i]] == ["tokenize", "infer", "inspect", "train", "eval", "export"]
    assert all(verbs.count(v) == 1 for v in ("infer", "inspect", "train", "eval", "export"))
    assert "torch_dtype" not in "".join(files.values()) and "dtype" in files["teachers.toml"]


def test_the_guide_runs_verbatim(tmp_path, monkeypatch):
    hf_world(tmp_path)
    monkeypatch.chdir(tmp_path)
    files, commands = guide()
    for name, body in files.items():
        Path(name).write_text(body)
    runner = CliRunner()
    outputs = {}
    for command in commands:
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}"
        outputs[args[0]] = result.stdout
    assert "ensemble (2)" in outputs["inspect"] and "val perplexity" in outputs["train"]
    assert "folder (save_pretrained)" in outputs["export"] and "tokenizer from the data" in outputs["export"]
    assert "column 'messages'" in outputs["tokenize"] or "column 'text'" in outputs["tokenize"]
    assert (tmp_path / "models/student/model.safetensors").is_file()

    # The exported folder: a model and its tokenizer for from_pretrained, measuring what mtkd eval measured.
    tokenizer = transformers.AutoTokenizer.from_pretrained("models/student")
    assert tokenizer("the cat")["input_ids"] == transformers.AutoTokenizer.from_pretrained("models/llama")("the cat")["input_ids"]
    transformers.AutoModelForCausalLM.from_pretrained("models/student")
    Path("exported.toml").write_text('[[teachers]]\nname = "exported"\nfactory = "transformers:AutoModelForCausalLM.from_pretrained"\n'
                                     'kwargs = { pretrained_model_name_or_path = "models/student" }\n')
    run, exported = (runner.invoke(app, [*args, "--data", "data/val.parquet", "--json"])
                     for args in (["eval", "runs/student"], ["eval", "--model", "exported.toml"]))
    assert run.exit_code == 0 and exported.exit_code == 0, run.output + exported.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (run, exported))
    assert a["n"] == b["n"] > 0 and b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
