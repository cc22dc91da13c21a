"""Output Size follows the model: by default the frames (and the turntable camera) are the size the selected
model was trained at, read from its folder; a custom size, or the CLI's --size, overrides it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import bpy
import pytest

import addon
from addon import job_runner, job_writer, model_manager
from blender_tests.helpers import PORTRAIT, fake_model_folder
from dp3d_core import preflight


@pytest.fixture
def scene(empty_scene, tmp_path):
    addon.register()
    empty_scene.cursor.location = (0.0, 0.0, 0.0)
    assert bpy.ops.portrait3d.add_head_anchor() == {'FINISHED'}
    s = empty_scene.portrait3d
    s.reference_image = str(PORTRAIT)
    s.use_reference_prep = False  # no worker Python here: the size is decided before any worker runs
    s.output_folder = str(tmp_path / "out") + os.sep
    s.turntable_frames = 2
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def model_at(folder: Path, sample_size: int, vae_blocks: int = 4) -> Path:
    """A fake model folder whose configs say it was trained at sample_size x 2^(vae_blocks - 1) px."""
    fake_model_folder(folder)
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32] * vae_blocks}))
    return folder


def turntable_and_job(scene) -> tuple[int, int]:
    """(the turntable camera's render size, the job's size)."""
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    render = scene.render
    assert render.resolution_x == render.resolution_y and render.resolution_percentage == 100
    prepared = job_writer.prepare_job(bpy.context)
    written = json.loads((prepared.job_dir / "job.json").read_text())
    assert written["settings"]["size"] == prepared.job.settings.size
    return render.resolution_x, prepared.job.settings.size


def test_untouched_settings_use_the_bundled_models_resolution(scene):
    s = scene.portrait3d
    assert not s.is_property_set("size_mode") and not s.is_property_set("output_size")
    assert s.size_mode == 'MODEL' and s.model_folder == ""
    bundled = model_manager.bundled_model()
    assert job_writer.model_folder(bpy.context) == bundled
    assert model_manager.model_resolution(bundled) == preflight.trained_size(bundled) == 64  # one reader
    assert turntable_and_job(scene) == (64, 64)
    assert job_writer.output_size_and_source(bpy.context) == (64, "from the model small")
    frames = sorted((Path(s.output_folder) / ".job" / "conditions").glob("*.png"))
    assert frames and bpy.data.images.load(str(frames[0])).size[:] == (64, 64)


def test_the_size_follows_the_selected_model(scene, tmp_path):
    s = scene.portrait3d
    s.model_folder = str(model_at(tmp_path / "m128", 16)) + os.sep
    assert turntable_and_job(scene) == (128, 128)
    s.model_folder = str(model_at(tmp_path / "m256", 32, vae_blocks=3)) + os.sep
    assert job_writer.output_size(bpy.context) == 128  # 32 x 2^2
    # A model trained at a size generation cannot use says so and what to do (before anything is rendered).
    s.model_folder = str(model_at(tmp_path / "m40", 5)) + os.sep
    with pytest.raises(job_writer.JobSetupError, match=r"model's resolution \(40 px.*Custom with 64 px"):
        job_writer.prepare_job(bpy.context)
    # A model whose configs do not say (the add-on's completeness check only needs the files): 512.
    s.model_folder = str(fake_model_folder(tmp_path / "silent")) + os.sep
    assert job_writer.output_size(bpy.context) == job_writer.FALLBACK_SIZE == 512
    s.model_folder = str(tmp_path / "missing") + os.sep
    assert job_writer.output_size_and_source(bpy.context) == (512, "no usable model found yet")


def test_a_custom_size_is_respected(scene, tmp_path):
    s = scene.portrait3d
    s.output_size = 128  # setting a size means a custom one
    assert s.size_mode == 'CUSTOM'
    assert turntable_and_job(scene) == (128, 128)
    s.size_mode = 'MODEL'
    assert s.output_size == 128 and job_writer.output_size(bpy.context) == 64


def test_cli_size_overrides_and_defaults_to_the_models(scene, tmp_path):
    out = tmp_path / "cli"
    base = ["--frames", "2", "--out", str(out), "--reference", str(PORTRAIT), "--poses-only", "--no-prepare"]
    assert job_runner.cli_main(base) == 0
    assert scene.portrait3d.size_mode == 'MODEL' and scene.render.resolution_x == 64
    assert job_runner.cli_main(base + ["--size", "192"]) == 0
    s = scene.portrait3d
    assert (s.size_mode, s.output_size, scene.render.resolution_x) == ('CUSTOM', 192, 192)
    model = model_at(tmp_path / "m128", 16)
    assert job_runner.cli_main(base + ["--model", str(model)]) == 0
    assert scene.portrait3d.size_mode == 'MODEL' and scene.render.resolution_x == 128


def test_panel_shows_where_the_size_comes_from(scene):
    from addon.panel import PORTRAIT3D_PT_turntable
    from blender_tests.test_rig_and_poses import _FakeLayout

    def draw() -> _FakeLayout:
        layout = _FakeLayout()
        PORTRAIT3D_PT_turntable.draw(type("P", (), {"layout": layout})(), bpy.context)
        return layout

    shown = draw()
    assert "64 px (from the model small)" in shown.labels
    assert "size_mode" in [n for _, n in shown.props] and "output_size" not in [n for _, n in shown.props]
    scene.portrait3d.output_size = 256
    shown = draw()
    assert "output_size" in [n for _, n in shown.props] and not any("px (" in t for t in shown.labels)
