"""Staging folders of killed creators are removed by the next process that creates or extends the
store; a live creator's folder, or another host's, is never touched."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from mtkd.pipeline.data import make_row_data
from mtkd.pipeline.layouts import Dense
from mtkd.pipeline.report import StatsSums
from mtkd.pipeline.staging import MARK, _HOST, process_start, remove_stale, staging_dir
from mtkd.pipeline.store import create_store


def _data():
    rng = np.random.default_rng(0)
    return make_row_data("staging", rng.standard_normal((10, 4)), rng.integers(0, 3, 10))


def _folder_of(target, pid, start, host=_HOST):
    folder = target.parent / f".{target.name}{MARK}{host}.{pid}.{start}.0123abcd"
    (folder / "teachers").mkdir(parents=True)
    (folder / "zarr.json").write_text("{}")
    return folder


def test_a_dead_creators_folder_is_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "s.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        dead = _folder_of(target, victim.pid, process_start(victim.pid))
        victim.kill()
        victim.wait()
        live = _folder_of(target, sleeper.pid, process_start(sleeper.pid))
        reused = _folder_of(target, sleeper.pid, "1")  # the pid lives on, but in another process
        elsewhere = _folder_of(target, 1, "1", host="another-host")
        old_style = target.parent / f".{target.name}{MARK}0123456789ab"
        old_style.mkdir()

        store, created = create_store(target, data=_data(), num_classes=3, chunk_rows=4)
        assert created
        assert not dead.exists() and not reused.exists()
        assert live.exists() and elsewhere.exists() and old_style.exists()

        sleeper.kill()
        sleeper.wait()
        store.add_teacher("a", spec={"name": "a"}, weights_sha256=None, layout=Dense("float16", 3), stats_width=StatsSums.width(Dense("float16", 3)))  # extends the store
        assert not live.exists() and elsewhere.exists()
    finally:
        sleeper.kill()


def test_a_new_staging_folder_names_its_living_creator(tmp_path):
    target = tmp_path / "s.zarr"
    folder = staging_dir(target)
    folder.mkdir()
    assert remove_stale(target) == [] and folder.exists()
