"""Progress bars name what they measure and show the metrics they are given; silent off a terminal."""

from __future__ import annotations

import io
import sys

from mtkd.pipeline.progress import describe, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_training_bar_names_model_and_stage_and_shows_loss_and_validation(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with progress_bar() as bars:
        bar = bars.bar("distil", "mlp", total=4)
        for loss in (0.9, 0.7, 0.6):
            bar.advance(loss=loss)
        bar.update(val_accuracy=0.9123)
        bar.advance(loss=0.5)
    shown = screen.getvalue()
    assert "distil mlp" in shown
    assert "loss 0.5" in shown and "val_accuracy 0.9123" in shown  # the last loss, the kept validation metric
    assert "4/4" in shown
    assert bar.metrics == {"loss": 0.5, "val_accuracy": 0.9123}


def test_a_metric_set_to_none_is_removed():
    with progress_bar(quiet=True) as bars:
        bar = bars.bar("train", "cnn")
        bar.update(loss=1.0, val_accuracy=0.5)
        bar.update(val_accuracy=None)
    assert bar.metrics == {"loss": 1.0}


def test_quiet_or_not_a_terminal_draws_nothing(monkeypatch):
    screen = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stdout", screen)
    with progress_bar() as bars:
        bars.bar("infer", "store", total=2).advance(2, loss=0.1)
        task = bars.add_task("eval x", total=3)  # rich's own API works on the silent bars too
        bars.update(task, completed=3)
        bars.advance(task)
    assert screen.getvalue() == ""


def test_labels():
    assert describe("train", "cnn") == "train cnn"
    assert describe("generate") == "generate"
