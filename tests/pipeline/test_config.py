"""TrainConfig: one validated, frozen configuration; what config.json holds and what --resume compares."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from mtkd.pipeline.config import DEFAULTS, Fusion, FusionScope, Loss, Schedule, TrainConfig, differences
from mtkd.pipeline.errors import BadInputError


def config(**options):
    return TrainConfig("student.toml", "data.npz", "runs/x", **options)


def test_choices_given_as_strings_become_enums_and_the_config_is_frozen():
    c = config(store="s.zarr", fusion="vote", loss="mse", schedule="inverse", temperature=2)
    assert (c.fusion, c.loss, c.schedule) == (Fusion.VOTE, Loss.MSE, Schedule.INVERSE)
    assert isinstance(c.temperature, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0  # type: ignore[misc]


def test_defaults_are_the_fields_defaults():
    c = config()
    assert DEFAULTS["temperature"] is c.temperature is None and DEFAULTS["grad_accum"] == 1 and c.max_steps is None
    assert (c.for_kind("tokens").temperature, c.for_kind("tokens").alpha) == (1.0, 0.8)
    assert (c.for_kind("rows").temperature, c.for_kind("rows").alpha) == (2.0, 1.0)
    assert config(temperature=4).for_kind("tokens").temperature == 4.0  # given: kept
    assert c.for_kind("tokens", {"temperature": 2.0, "alpha": 1.0}).temperature == 2.0  # a resumed run keeps its own


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"temperature": 0}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"alpha": 1.5}, "--alpha"),
        ({"epochs": 0}, "--epochs"),
        ({"max_steps": 0}, "--max-steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"grad_accum": 0}, "--grad-accum"),
        ({"warmup_steps": -1}, "--warmup-steps"),
        ({"lr": 0.0}, "--lr"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"decay_rate": float("inf")}, "--decay-rate"),
        ({"seed": -1}, "--seed"),
        ({"checkpoint_every": -1}, "--checkpoint-every"),
        ({"fusion": "middle"}, "--fusion"),
        ({"loss": "l3"}, "--loss"),
        ({"schedule": "step"}, "--schedule"),
        ({"teachers": ("a",)}, "--teachers needs --store"),
        ({"teachers": ("a", "")}, "--teachers"),
        ({"stream": True}, "streaming needs --store"),
        ({"store": "s.zarr", "teacher_weights": {"a": 1.0}}, "--fusion weighted"),
        ({"store": "s.zarr", "fusion": "weighted"}, "--teacher-weights"),
        ({"store": "s.zarr", "fusion": "weighted", "teacher_weights": {"a": -1.0}}, "'a'"),
        ({"store": "s.zarr", "fusion": "weighted", "teacher_weights": {"a": 0.0}}, "all zero"),
    ],
)
def test_each_bad_option_is_refused_naming_it(options, flag):
    with pytest.raises(BadInputError, match=flag.replace("(", r"\(")):
        config(**options)


def test_for_kind_takes_the_task_regression_options_and_refuses_the_other_tasks():
    assert (config().for_kind("rows").loss, config().for_kind("rows", regression=True).loss) == (Loss.KL, Loss.MSE)
    r = config(store="s.zarr", fusion="median", loss="huber").for_kind("rows", regression=True)
    assert (r.regression, r.temperature, r.alpha, r.fusion, r.loss) == (True, None, 1.0, Fusion.MEDIAN, Loss.HUBER)
    for options, flag in (({"temperature": 2.0}, "--temperature"), ({"fusion": "confidence"}, "--fusion confidence"),
                          ({"loss": "kl"}, "--loss kl")):
        with pytest.raises(BadInputError, match=flag):
            config(store="s.zarr", **options).for_kind("rows", regression=True)
    for options, flag in (({"fusion": "median"}, "--fusion median"), ({"loss": "l1"}, "--loss l1")):
        with pytest.raises(BadInputError, match=flag):
            config(store="s.zarr", **options).for_kind("rows")


def test_resolved_fills_in_the_teachers_and_orders_the_weights_by_them():
    c = config(store="s.zarr", fusion="weighted", teacher_weights={"b": 1, "a": 3})
    r = c.resolved(["a", "b"])
    assert r.teachers == ("a", "b") and list(r.teacher_weights.items()) == [("a", 3.0), ("b", 1.0)]
    assert c.teachers is None  # a new config; the given one is unchanged
    with pytest.raises(BadInputError, match="'b'"):
        config(store="s.zarr", fusion="weighted", teacher_weights={"a": 1, "b": 1}).resolved(["a", "c"])
    with pytest.raises(BadInputError, match="no weight for teacher.*c"):
        config(store="s.zarr", fusion="weighted", teacher_weights={"a": 1}).resolved(["a", "c"])


def test_config_json_starts_with_the_command_that_makes_the_run():
    c = config(store="s.zarr", temperature=3.0, max_steps=50, grad_accum=2, warmup_steps=5, val_data="v.npz").resolved(["a"])
    record = c.to_json()
    assert list(record)[0] == "command"
    args = shlex.split(record["command"])
    assert args[:2] == ["mtkd", "train"]
    pairs = dict(zip(args[2::2], args[3::2]))
    assert pairs["--store"] == "s.zarr" and pairs["--teachers"] == "a" and pairs["--temperature"] == "3.0"
    assert pairs["--max-steps"] == "50" and pairs["--grad-accum"] == "2" and pairs["--warmup-steps"] == "5"
    assert "--epochs" not in pairs and pairs["--val-data"] == "v.npz"
    assert record["schedule"]["warmup_steps"] == 5 and record["max_steps"] == 50 and record["grad_accum"] == 2


def test_hard_label_configs_record_no_kd_options():
    record = config().to_json()
    assert record["loss"] == "ce" and record["fusion"] is None and record["temperature"] is None
    assert "--store" not in record["command"]


def test_resume_compares_what_is_trained_not_where_things_are():
    a = config(store="s.zarr").resolved(["a"]).to_json()
    moved = TrainConfig("elsewhere/student.toml", "data.npz", "other/x", store="t.zarr", checkpoint_every=7,
                        device="cpu").resolved(["a"]).to_json()
    assert differences(a, moved) == []
    assert differences(a, config(store="s.zarr", temperature=3.0).resolved(["a"]).to_json()) == ["temperature"]
    assert differences(a, config(store="s.zarr", grad_accum=2).resolved(["a"]).to_json()) == ["grad_accum"]


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"store": "s.zarr", "fusion": "posterior", "fusion_temperature": 0.0}, "--fusion-temperature must be > 0"),
        ({"store": "s.zarr", "fusion": "entropy", "fusion_temperature": float("inf")}, "--fusion-temperature must be > 0"),
        ({"store": "s.zarr", "fusion": "best", "fusion_scope": "document"}, "--fusion-scope must be one of row, sequence"),
        ({"store": "s.zarr", "fusion_scope": "sequence"}, "--fusion-scope needs --fusion posterior, best or entropy"),
        ({"store": "s.zarr", "fusion": "vote", "fusion_temperature": 2.0}, "--fusion-temperature needs"),
        ({"store": "s.zarr", "fusion": "confidence", "teacher_weights": {"a": 1.0}}, "--teacher-weights needs"),
        ({"store": "s.zarr", "fusion": "posterior", "teacher_weights": {"a": 0.0}}, "all zero"),
    ],
)
def test_each_bad_fusion_option_is_refused_naming_it(options, flag):
    with pytest.raises(BadInputError, match=flag):
        config(**options)


@pytest.mark.parametrize("fusion", ["posterior", "best", "entropy"])
def test_selecting_fusions_take_the_teacher_weights_as_prior_and_record_tau_and_scope(fusion):
    c = config(store="s.zarr", fusion=fusion, teacher_weights={"b": 1, "a": 3}, fusion_temperature=0.5,
               fusion_scope="sequence").resolved(["a", "b"])
    assert c.fusion_scope is FusionScope.SEQUENCE and c.fusion_temperature == 0.5
    record = c.to_json()
    assert (record["fusion"], record["fusion_temperature"], record["fusion_scope"]) == (fusion, 0.5, "sequence")
    assert record["teacher_weights"] == {"a": 3.0, "b": 1.0}
    pairs = dict(zip(*(lambda a: (a[2::2], a[3::2]))(shlex.split(record["command"]))))
    assert pairs["--fusion"] == fusion and pairs["--fusion-temperature"] == "0.5" and pairs["--fusion-scope"] == "sequence"
    assert pairs["--teacher-weights"] == "a=3,b=1"
    assert differences(record, config(store="s.zarr", fusion=fusion, teacher_weights={"a": 3, "b": 1}, fusion_temperature=0.5)
                       .resolved(["a", "b"]).to_json()) == ["fusion_scope"]


def test_the_other_fusions_record_no_tau_or_scope_so_older_runs_resume():
    record = config(store="s.zarr").resolved(["a"]).to_json()
    assert record["fusion_temperature"] is None and record["fusion_scope"] is None
    assert "--fusion-temperature" not in record["command"] and "--fusion-scope" not in record["command"]
    older = {k: v for k, v in record.items() if k not in ("fusion_temperature", "fusion_scope")}  # config.json before v3
    assert differences(older, record) == []
