"""The model list's pure logic (addon/model_manager.py, no bpy): resolution, markers, safe deletion, progress."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from addon import model_manager as mm
from blender_tests.helpers import fake_model_folder

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_is_described_from_its_configs():
    entry = mm.describe(ROOT / "models" / "small", "bundled")
    assert (entry.resolution, entry.family, entry.managed, entry.problem) == (64, "DiffPortrait3D", False, "")
    assert entry.size_bytes == sum(f.stat().st_size for f in (ROOT / "models" / "small").rglob("*") if f.is_file())
    assert mm.human_size(17_569_485) == "17.6 MB" and mm.human_size(11e9) == "11.0 GB"


def test_scan_lists_bundled_models_folder_and_added(tmp_path):
    models = tmp_path / "models"
    made = fake_model_folder(models / "converted one")
    mm.write_marker(made, source="convert")
    fake_model_folder(models / ".half.abc123")          # a conversion's hidden staging folder
    (models / "notes").mkdir()                           # not a model
    added = fake_model_folder(tmp_path / "elsewhere")
    entries = mm.scan(models, [added, added])
    assert [(e.name, e.source) for e in entries] == [("small", "bundled"), ("converted one", "converted"),
                                                     ("elsewhere", "added")]
    assert [e.managed for e in entries] == [False, True, False]


def test_delete_refuses_what_it_did_not_make(tmp_path):
    models = tmp_path / "models"
    foreign = fake_model_folder(models / "foreign")
    with pytest.raises(mm.ModelManagerError, match="not made by Portrait 3D"):
        mm.delete_model(foreign, models)
    outside = fake_model_folder(tmp_path / "outside")
    mm.write_marker(outside, source="convert")
    with pytest.raises(mm.ModelManagerError, match="outside the models folder"):
        mm.delete_model(outside, models)
    with pytest.raises(mm.ModelManagerError, match="bundled"):
        mm.delete_model(mm.bundled_model(), models)
    assert foreign.is_dir() and outside.is_dir()
    mine = fake_model_folder(models / "mine")
    mm.write_marker(mine, source="hub")
    mm.delete_model(mine, models)
    assert not mine.exists()


def test_new_names_and_partial_leftovers(tmp_path):
    models = tmp_path / "models"
    (models / "taken").mkdir(parents=True)
    for bad in ("", "../up", "a/b", "taken", " "):
        with pytest.raises(mm.ModelManagerError):
            mm.check_new_name(models, bad)
    assert mm.check_new_name(models, "my model-2") == models / "my model-2"
    (models / ".dp3d.x1y2").mkdir()
    (models / ".dp3d.partial").mkdir()
    assert mm.remove_partial_outputs(models, "dp3d") == [models / ".dp3d.x1y2"]
    assert (models / ".dp3d.partial").is_dir()  # a download's partial folder is kept for resuming


def test_byte_progress_and_eta():
    p = mm.ByteProgress()
    line = lambda phase, done, total: mm.PROGRESS_PREFIX + json.dumps(  # noqa: E731
        {"phase": phase, "done": done, "total": total})
    assert not p.feed("conversion report:") and p.words() == "starting..."
    assert p.feed(line("read", 0, 100), now=0.0) and p.feed(line("read", 100, 100), now=1.0)
    assert p.feed(line("write", 0, 4_000_000_000), now=10.0)
    assert p.eta(now=10.0) is None
    p.feed(line("write", 1_000_000_000, 4_000_000_000), now=30.0)  # 1 GB in 20 s -> 3 GB left = 60 s
    assert p.eta(now=30.0) == pytest.approx(60.0)
    assert p.fraction == 0.25 and p.words(now=30.0) == "write: 1.0 GB of 4.0 GB, about 1m 00s left"
    p.feed(line("write", 4_000_000_000, 4_000_000_000), now=90.0)
    assert p.fraction == 1.0 and "left" not in p.words(now=90.0)
