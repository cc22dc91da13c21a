"""DiffPortrait360 in the add-on, on a tiny random-weight 360 model through the REAL worker subprocess.

The model folder's family decides the turntable (a closed full turn, no beyond-90-degree warnings) and offers the
back view: Generate Back View / Regenerate / Use Photo... / Accept are recorded in job.json's ``back`` and change
the job hash; Generate without an accepted back view runs the back stage first (its ``back_view`` event shows the
view in the panel) and returns frames; cancel + Generate again resumes; the command line writes a closed-loop
turntable with a contact sheet. Small sizes and few steps: the whole file runs in about a minute.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image

import addon
from addon import back_view, job_runner, job_writer, model_family, operators, poses, rig
from blender_tests.helpers import PORTRAIT, ROOT, fake_model_folder, setup_generation_scene, wrap_deg
from dp3d_core import cameras, job as jobspec
from dp3d_core.denoise_state import MANIFEST, STATE_DIR

FRAMES, SIZE, STEPS = 8, 64, 2
_tiny360: Path | None = None


def tiny_360_model() -> Path:
    """A tiny random DiffPortrait360 model folder (view model + back_head/), made once per test process by the
    real ``python -m dp3d_core.tiny OUT --family DiffPortrait360``; 8x8 latents keep the worker fast."""
    global _tiny360
    if _tiny360 is None:
        path = Path(tempfile.mkdtemp(prefix="p3d-tiny360-")) / "tiny 360"
        subprocess.run([sys.executable, "-m", "dp3d_core.tiny", str(path), "--family", "DiffPortrait360",
                        "--sample-size", "8"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=300)
        _tiny360 = path
    return _tiny360


@pytest.fixture
def scene(empty_scene, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model is fastest on one thread
    addon.register()
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def _setup(scene, out: Path, model: Path, **kw):
    """The generation scene, then the turntable rebuilt now that the model (and so its family) is set."""
    s = setup_generation_scene(scene, out=out, model=model, frames=FRAMES, size=SIZE, steps=STEPS, **kw)
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    return s


def _job(out: Path) -> dict:
    return json.loads((out / job_writer.JOB_SUBDIR / jobspec.JOB_FILE).read_text())


def _hash(prepared: job_writer.PreparedJob) -> str:
    return jobspec.job_hash(prepared.job, prepared.job_dir)


# ---------------------------------------------------------------- the family decides the turntable

def test_family_is_read_from_the_model_folder_and_cached(tmp_path):
    fam = model_family.family_of(tiny_360_model())
    assert fam.is_360 and fam.back_head
    assert model_family.family_of(tiny_360_model()) is fam  # cached: the JSON is not read on every redraw
    assert not model_family.family_of(fake_model_folder(tmp_path / "dp3d")).is_360


def test_360_turntable_is_a_closed_full_turn_without_warnings(scene, tmp_path):
    s = _setup(scene, tmp_path / "out", tiny_360_model())
    labels = poses.scene_poses(scene, scene.camera, s.head_anchor, range(scene.frame_start, scene.frame_end + 1),
                               all_around=True)
    assert len(labels) == FRAMES and (scene.frame_start, scene.frame_end) == (1, FRAMES)
    assert [p.yaw for p in labels] == pytest.approx([wrap_deg(360.0 * i / FRAMES) for i in range(FRAMES)], abs=1e-3)
    for got, want in zip(labels, rig.expected_labels(FRAMES, 0.0, 0.0, full_turn=True)):
        assert np.allclose(got.label, want, atol=1e-5)
    assert poses.is_full_turn(labels)  # last frame one step before the first: no duplicate
    _, written = operators.export_poses(scene)
    assert [w for p in written for w in p.warnings] == []  # the back of the head is fine for a 360 model

    prepared = job_writer.prepare_job(bpy.context)
    job = _job(tmp_path / "out")
    assert job["settings"]["closed_loop"] is True and prepared.job.settings.closed_loop
    assert job["back"]["image"] is None and job["back"]["origin"] == "generated" and job["back"]["seed"] == 0
    # the back condition: the camera straight behind the head, at the turntable's pitch and radius
    back = np.array(job["back"]["label"])
    assert np.allclose(back, rig.orbit_label(math.pi, 0.0), atol=1e-6)
    cond = Image.open(prepared.job_dir / job["back"]["condition"])
    assert cond.size == (SIZE, SIZE) and np.asarray(cond).std() > 1.0  # a rendered head, not an empty image


def test_full_turn_yaws_from_the_photo_view_and_loop_detection():
    start = math.radians(20.0)
    yaws = rig.turntable_yaws(6, 0.0, start, full_turn=True)
    assert [math.degrees(y) for y in yaws] == pytest.approx([20.0 + 60.0 * i for i in range(6)])

    def frames(yaw_list, pitch=0.0):
        return [poses.FramePose(i, [], wrap_deg(y), pitch) for i, y in enumerate(yaw_list)]
    assert poses.is_full_turn(frames([60.0 * i for i in range(6)]))
    assert poses.is_full_turn(frames([-60.0 * i for i in range(6)]))  # the other way round
    assert not poses.is_full_turn(frames([60.0 * i for i in range(7)]))  # the first view repeated at the end
    assert not poses.is_full_turn(frames([-30.0, -10.0, 10.0, 30.0]))    # a sweep
    assert not poses.is_full_turn([*frames([0.0, 120.0]), *frames([240.0], pitch=10.0)])  # pitch changes


def test_dp3d_model_keeps_the_sweep_and_the_warnings(scene, tmp_path):
    s = _setup(scene, tmp_path / "out", fake_model_folder(tmp_path / "dp3d"))
    yaws = [p.yaw for p in poses.scene_poses(scene, scene.camera, s.head_anchor, range(1, FRAMES + 1))]
    assert yaws[0] == pytest.approx(-30.0, abs=1e-3) and yaws[-1] == pytest.approx(30.0, abs=1e-3)
    s.turntable_yaw_range = math.radians(150.0)
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    _, written = operators.export_poses(scene)
    assert any("beyond" in w for p in written for w in p.warnings)
    behind = rig.orbit_label(math.radians(135.0), 0.0)
    assert any("beyond" in w for w in poses.pose_warnings(behind))
    assert not poses.pose_warnings(behind, all_around=True)


def test_full_turn_off_uses_the_yaw_range_and_no_closed_loop(scene, tmp_path):
    s = _setup(scene, tmp_path / "out", tiny_360_model())
    s.turntable_full_turn = False
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    prepared = job_writer.prepare_job(bpy.context)
    assert not prepared.job.settings.closed_loop
    assert [p.yaw for p in prepared.poses][0] == pytest.approx(-30.0, abs=1e-3)


def _draw_back_panel():
    from addon.panel import PORTRAIT3D_PT_back_view
    from blender_tests.test_rig_and_poses import _FakeLayout

    layout = _FakeLayout()
    PORTRAIT3D_PT_back_view.draw(type("P", (), {"layout": layout})(), bpy.context)
    return layout


def test_back_view_panel_only_for_360_models(scene, tmp_path):
    from addon.panel import PORTRAIT3D_PT_back_view

    s = _setup(scene, tmp_path / "out", fake_model_folder(tmp_path / "dp3d"))
    assert not PORTRAIT3D_PT_back_view.poll(bpy.context)
    s.model_folder = str(tiny_360_model())
    assert PORTRAIT3D_PT_back_view.poll(bpy.context)
    shown = _draw_back_panel()
    assert {"portrait3d.generate_back_view", "portrait3d.regenerate_back_view", "portrait3d.use_back_photo",
            "portrait3d.accept_back_view"} <= set(shown.operators)
    assert any(text.startswith("None yet") for text in shown.labels)


# ---------------------------------------------------------------- the back view

def test_back_view_generate_regenerate_photo_accept(scene, tmp_path):
    out = tmp_path / "out"
    s = _setup(scene, out, tiny_360_model())
    hashes = {"none": _hash(job_writer.prepare_job(bpy.context))}

    # Generate Back View: the worker's back stage only, with seed 0; shown in the panel, not accepted yet
    assert bpy.ops.portrait3d.generate_back_view() == {'FINISHED'}
    run = job_runner.last_run()
    assert run.status.state == "done" and run.prepared.back_only, run.status.message
    first = Path(s.back_view)
    assert first.name == "back_seed0.png" and first.is_file()
    assert s.back_origin == 'GENERATED' and s.back_view_seed == 0 and not s.back_accepted
    assert back_view.shown_image() is not None
    assert not list(out.glob("frame_*.png"))
    assert "Generated, seed 0: not accepted: Generate uses seed 0" in _draw_back_panel().labels

    # Regenerate: the next seed, another picture
    assert bpy.ops.portrait3d.regenerate_back_view() == {'FINISHED'}
    second = Path(s.back_view)
    assert second.name == "back_seed1.png" and s.back_view_seed == 1 and s.back_seed == 1
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    pending = job_writer.prepare_job(bpy.context)
    assert pending.job.back.image is None and pending.job.back.seed == 1
    hashes["seed 1"] = _hash(pending)

    # Accept: job.json names that image
    assert bpy.ops.portrait3d.accept_back_view() == {'FINISHED'} and s.back_accepted
    accepted = job_writer.prepare_job(bpy.context)
    assert accepted.job.back.origin == "generated"
    assert (accepted.job_dir / accepted.job.back.image).resolve() == second.resolve()
    hashes["accepted"] = _hash(accepted)

    # Use Photo...: the artist's photo as it is
    photo = tmp_path / "back photo.png"
    Image.fromarray(np.full((96, 80, 3), 90, np.uint8)).save(photo)
    assert bpy.ops.portrait3d.use_back_photo(filepath=str(photo)) == {'FINISHED'}
    with_photo = job_writer.prepare_job(bpy.context)
    assert with_photo.job.back.origin == "photo" and Path(with_photo.job.back.image) == photo.resolve()
    assert _job(out)["back"]["origin"] == "photo"
    hashes["photo"] = _hash(with_photo)
    assert len(set(hashes.values())) == len(hashes), hashes

    # a broken photo is refused before anything runs; a new photo (reference) makes a generated view stale
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match="back photo"):
        bpy.ops.portrait3d.use_back_photo(filepath=str(bad))
    assert s.back_origin == 'PHOTO' and Path(s.back_view) == photo.resolve()


def test_cancel_while_the_back_view_is_generated(scene, tmp_path):
    s = _setup(scene, tmp_path / "out", tiny_360_model())
    s.steps = 50
    run = job_runner.start_generation(bpy.context, back_only=True)
    deadline = time.monotonic() + 300
    while not run.update(bpy.context) and time.monotonic() < deadline:
        if run.status.step >= 1 and not run.worker.cancel_requested:
            assert job_runner.progress_text(run.status).startswith("back view | step ")
            assert bpy.context.window_manager.portrait3d_progress.back_stage
            assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
        time.sleep(0.02)
    assert run.status.state == "cancelled", (run.status.message, run.status.log_tail)
    assert run.status.step < 50 and s.back_origin == 'NONE' and not s.back_view
    assert not list((run.prepared.job_dir / "back").glob("*.png"))


def test_proxies_project_the_back_view_here_and_in_a_background_blender(scene, tmp_path, monkeypatch):
    """3D-aware noise with the artist's back photo (plain blue): the proxy views show it from behind, not from the
    front, and a background Blender (the UI's path) renders the same images as this process."""
    from addon import background_render
    from blender_tests.helpers import fake_worker_python

    monkeypatch.setattr(background_render, "COMMAND", [sys.executable])  # the bpy module stands in for blender -b
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    s = _setup(scene, tmp_path / "child", tiny_360_model())
    s.use_proxy_views = True
    photo = tmp_path / "blue back.png"
    Image.fromarray(np.tile(np.array([20, 40, 230], np.uint8), (96, 96, 1))).save(photo)
    assert bpy.ops.portrait3d.use_back_photo(filepath=str(photo)) == {'FINISHED'}

    run = job_runner.begin_generation(bpy.context)
    while run.preparing:
        run.update(bpy.context)
        time.sleep(0.01)
    assert run.worker is not None, run.status.message
    assert run.preparation.frames_rendered == 0 and not run.prepared.warnings, run.prepared.warnings
    child = run.prepared.job.resolve(run.prepared.job_dir)
    job_runner.stop_all()

    def blue(path) -> float:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return float(((rgb[..., 2] > 150) & (rgb[..., 0] < 90)).mean())
    front, behind = child.frames[0], child.frames[FRAMES // 2]
    assert blue(behind.proxy) > 0.1 and blue(front.proxy) < 0.01, (blue(behind.proxy), blue(front.proxy))

    s.output_folder = str(tmp_path / "here") + os.sep
    here = job_writer.prepare_job(bpy.context)
    here_job = here.job.resolve(here.job_dir)
    for a, b in zip(child.frames, here_job.frames):
        assert Path(a.proxy).read_bytes() == Path(b.proxy).read_bytes()
        assert Path(a.condition).read_bytes() == Path(b.condition).read_bytes()


def test_model_without_back_head_needs_a_photo(scene, tmp_path):
    import shutil

    model = tmp_path / "no back head"
    shutil.copytree(tiny_360_model(), model)
    shutil.rmtree(model / model_family.BACK_HEAD_DIR)
    _setup(scene, tmp_path / "out", model)
    with pytest.raises(job_writer.JobSetupError, match="Use Photo"):
        job_writer.prepare_job(bpy.context)
    assert not (tmp_path / "out" / job_writer.JOB_SUBDIR / jobspec.JOB_FILE).exists()


def test_generate_runs_the_back_stage_first_then_cancel_and_resume(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("DP3D_CHECKPOINT_EVERY_STEPS", "1")
    out = tmp_path / "out"
    s = _setup(scene, out, tiny_360_model(), seed=3)
    s.steps = 4

    # Generate with no back view: one worker run makes the back view (shown), then cancel during the views
    run = job_runner.start_generation(bpy.context)
    cancelled_at, deadline = None, time.monotonic() + 300

    def views_step() -> int:
        return max((e["step"] for e in run.worker.events if e.kind == "progress" and e.get("stage") == "views"),
                   default=0)
    while not run.update(bpy.context) and time.monotonic() < deadline:
        if cancelled_at is None and views_step() >= 2:
            cancelled_at = views_step()
            assert s.back_view  # the back view was shown before the views were denoised
            assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
        time.sleep(0.02)
    assert cancelled_at is not None, run.status.message
    assert run.status.state == "cancelled", (run.status.message, run.status.log_tail)
    kinds = [(e.kind, e.get("stage")) for e in run.worker.events]
    assert kinds.index(("back_view", None)) < kinds.index(("progress", "views"))
    assert Path(s.back_view).name == "back_seed0.png" and not s.back_accepted
    assert not list(out.glob("frame_*.png"))
    saved = json.loads((run.prepared.job_dir / STATE_DIR / MANIFEST).read_text())["step"]

    # Generate again: the same job (back view reused), resumed from the saved step, frames written and imported
    assert bpy.ops.portrait3d.generate() == {'FINISHED'}
    rerun = job_runner.last_run()
    assert rerun.status.state == "done", (rerun.status.message, rerun.status.log_tail)
    resumed = [e for e in rerun.worker.events if e.kind == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == saved
    frames = sorted(out.glob("frame_*.png"))
    assert len(frames) == FRAMES and Image.open(frames[0]).size == (SIZE, SIZE)
    assert _job(out)["settings"]["closed_loop"] is True
    assert rerun.imported and not rerun.import_error


def test_cli_with_3d_aware_noise_makes_the_back_view_first(scene, tmp_path):
    """Headless, 3D-aware noise, no back view: the back stage runs first (a --back-only worker), the proxies
    project the photo and that back view, then the views; a closed loop with a contact sheet."""
    out = tmp_path / "cli"
    result = job_runner.run_turntable_job(out, frames=FRAMES, reference=str(PORTRAIT), size=SIZE, steps=STEPS,
                                          model=str(tiny_360_model()), worker_python=sys.executable, device="cpu",
                                          prepare=False, proxy_views=True, back_seed=2, previews=True)
    assert result.closed_loop and len(result.frames) == FRAMES and all(f.is_file() for f in result.frames)
    assert result.contact_sheet.is_file() and result.gif.is_file()
    assert result.back_view == result.job_dir / "back" / "back_seed2.png" and result.back_view.is_file()
    job = _job(out)
    assert job["back"]["image"] is None and job["back"]["seed"] == 2 and job["settings"]["closed_loop"] is True
    # the views' worker found the back view the back stage had made (its back_view event names that file) ...
    assert Path(result.status.back_view) == result.back_view
    # ... which existed before the proxies were rendered (they project it)
    proxies = [result.job_dir / f["proxy"] for f in job["frames"]]
    assert all(p.is_file() for p in proxies)
    assert result.back_view.stat().st_mtime <= min(p.stat().st_mtime for p in proxies)
    labels = [item[1] for item in json.loads((out / poses.DATASET_FILE).read_text())["labels"]]
    yaws = [cameras.yaw_pitch_from_cam2world(np.array(label[:16]).reshape(4, 4))[0] for label in labels]
    assert yaws == pytest.approx([wrap_deg(360.0 * i / FRAMES) for i in range(FRAMES)], abs=1e-3)


def test_cli_refuses_360_flags_for_a_dp3d_model(scene, tmp_path):
    code = job_runner.cli_main(["--out", str(tmp_path / "o"), "--reference", str(PORTRAIT), "--full-turn",
                                "--model", str(fake_model_folder(tmp_path / "dp3d")), "--no-prepare"])
    assert code == 1
    assert not (tmp_path / "o").exists()
    args = job_runner.cli_parser().parse_args(["--out", "o", "--no-full-turn", "--back-image", "b.png",
                                               "--back-seed", "7"])
    assert (args.full_turn, args.back_image, args.back_seed) == (False, "b.png", 7)
    assert job_runner.cli_parser().parse_args(["--out", "o"]).full_turn is None  # the model's family decides
