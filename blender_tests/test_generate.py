"""Generate through the REAL worker subprocess (the venv's Python) with a tiny random-weight model.

The worker blends all windows at every denoising step, so every frame becomes final at the last
step and frames are written one by one only then (see dp3d_core/worker.py). Hence:
- cancel: no new frame may appear, the run must stop within one step of the request, and frames
  written by an earlier run stay byte-identical;
- kill + resume: a crash while frames were being written is simulated by deleting the last frames
  of a finished run; the worker is killed (SIGKILL) right after it reports its start, which must
  leave a clear error; the re-run must recompute only the deleted frames.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image

import addon
from addon import frame_import, job_runner, rig
from blender_tests.helpers import PORTRAIT, setup_generation_scene, tiny_model_folder
from dp3d_core import job as jobspec

FRAMES, SIZE, STEPS = 8, 64, 2


@pytest.fixture
def scene(empty_scene, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", sys.executable)
    addon.register()
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _frames(out: Path) -> list[Path]:
    return [out / f"frame_{f:04d}.png" for f in range(1, FRAMES + 1)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One real generation via the Generate operator (blocking: bpy runs in background mode)."""
    old_python = os.environ.get("PORTRAIT3D_WORKER_PYTHON")
    os.environ["PORTRAIT3D_WORKER_PYTHON"] = sys.executable
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon.register()
    try:
        out = tmp_path_factory.mktemp("gen") / "out put ü"  # spaces and non-ASCII must work
        scene = bpy.context.scene
        setup_generation_scene(scene, out=out, model=tiny_model_folder(), frames=FRAMES, size=SIZE, steps=STEPS)
        started = time.monotonic()
        result = bpy.ops.portrait3d.generate()
        run = job_runner.last_run()
        p = bpy.context.window_manager.portrait3d_progress
        info = {
            "result": result, "out": out, "events": list(run.worker.events), "status": run.status,
            "seconds": time.monotonic() - started, "running": p.running, "fraction": p.fraction,
            "frames_done": p.frames_done, "frames_total": p.frames_total, "last_error": p.last_error,
            "card": bpy.data.objects.get(frame_import.CARD_NAME) is not None,
            "expected_labels": [list(x) for x in rig.expected_labels(FRAMES, math.radians(30.0), 0.0)],
            "job_dir": run.prepared.job_dir,
        }
    finally:
        job_runner.stop_all()
        addon.unregister()
        bpy.ops.wm.read_factory_settings(use_empty=True)
        if old_python is None:
            os.environ.pop("PORTRAIT3D_WORKER_PYTHON", None)
        else:
            os.environ["PORTRAIT3D_WORKER_PYTHON"] = old_python
    return info


def test_generate_end_to_end(generated):
    assert generated["result"] == {'FINISHED'}, generated["status"]
    frames = _frames(generated["out"])
    for path in frames:
        with Image.open(path) as im:
            im.load()  # a truncated PNG raises here
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not list(generated["out"].glob(".*.tmp")), "no temporary frame files left"
    kinds = [e.kind for e in generated["events"]]
    assert kinds[0] == "started" and kinds[-1] == "done"
    assert kinds.count("frame") == FRAMES and "progress" in kinds
    # Progress driven by the events, ending at 100 %, and the UI no longer running.
    assert generated["frames_done"] == generated["frames_total"] == FRAMES
    assert generated["fraction"] == pytest.approx(1.0)
    assert not generated["running"] and not generated["last_error"]
    assert generated["card"], "the finished frames were imported as a card"


def test_job_labels_equal_eg3d_sampler(generated):
    job = jobspec.read_job(generated["job_dir"])
    assert [f.scene_frame for f in job.ordered_frames()] == list(range(1, FRAMES + 1))
    np.testing.assert_allclose([f.label for f in job.ordered_frames()], generated["expected_labels"], atol=1e-6)
    assert job.settings.size == SIZE and job.settings.steps == STEPS
    conditions = [job.resolve(generated["job_dir"]).frames[i].condition for i in range(FRAMES)]
    assert all(Path(c).is_file() for c in conditions)
    data = json.loads((generated["out"] / "dataset.json").read_text())
    np.testing.assert_allclose([lab for _, lab in data["labels"]], generated["expected_labels"], atol=1e-6)


def test_cancel_stops_within_a_step_and_keeps_finished_frames(scene, generated):
    out = generated["out"]
    before = {p.name: _digest(p) for p in _frames(out)}
    # Same output folder, another seed and more steps: a different job that would overwrite the frames.
    setup_generation_scene(scene, out=out, model=tiny_model_folder(), frames=FRAMES, size=SIZE, steps=8, seed=1)
    run = job_runner.start_generation(bpy.context)
    cancel_step = None
    deadline = time.monotonic() + 240
    while not run.update(bpy.context) and time.monotonic() < deadline:
        if cancel_step is None and run.status.step >= 1:
            cancel_step = run.status.step
            assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
            assert bpy.context.window_manager.portrait3d_progress.running  # still running until it stops
        time.sleep(0.02)
    assert cancel_step is not None, "the worker never reported a denoising step"
    assert run.status.state == "cancelled", (run.status.message, run.status.log_tail)
    steps_seen = [e["step"] for e in run.worker.events if e.kind == "progress"]
    assert max(steps_seen) <= cancel_step + 1, f"cancelled at step {cancel_step}, ran until {max(steps_seen)}"
    assert max(steps_seen) < run.status.total_steps
    assert not [e for e in run.worker.events if e.kind == "frame"]
    assert {p.name: _digest(p) for p in _frames(out)} == before
    p = bpy.context.window_manager.portrait3d_progress
    assert not p.running and not job_runner.is_running()
    assert bpy.ops.portrait3d.cancel.poll() is False


def test_killed_worker_reports_and_rerun_resumes(scene, generated):
    out = generated["out"]
    frames = _frames(out)
    kept = {p: (p.stat().st_mtime_ns, _digest(p)) for p in frames[:4]}
    for p in frames[4:]:  # as if the worker died while writing frames
        p.unlink()
    setup_generation_scene(scene, out=out, model=tiny_model_folder(), frames=FRAMES, size=SIZE, steps=STEPS)

    run = job_runner.start_generation(bpy.context)
    deadline = time.monotonic() + 60
    while not any(e.kind == "started" for e in run.worker.events) and time.monotonic() < deadline:
        run.update(bpy.context)
        time.sleep(0.02)
    assert run.status.frames_done_at_start == 4
    with pytest.raises(RuntimeError, match="already running"):
        bpy.ops.portrait3d.generate()
    os.kill(run.worker.pid, signal.SIGKILL)
    status = job_runner.wait(run, bpy.context, timeout=30)
    assert status.state == "failed"
    p = bpy.context.window_manager.portrait3d_progress
    assert not p.running and not job_runner.is_running()
    assert "stopped from outside" in p.last_error and "SIGKILL" in p.last_error
    assert "not recomputed" in p.last_hint

    assert bpy.ops.portrait3d.generate() == {'FINISHED'}
    rerun = job_runner.last_run()
    started = next(e for e in rerun.worker.events if e.kind == "started")
    assert started["frames_done"] == 4
    assert sorted(e["scene_frame"] for e in rerun.worker.events if e.kind == "frame") == [5, 6, 7, 8]
    for path, (mtime, digest) in kept.items():
        assert path.stat().st_mtime_ns == mtime and _digest(path) == digest
    assert all(path.is_file() for path in frames)
    assert not p.last_error and p.fraction == pytest.approx(1.0)


def test_reference_path_is_absolute_in_job(generated):
    job = jobspec.read_job(generated["job_dir"])
    assert job.references == [str(PORTRAIT.resolve())]
    assert Path(job.output) == generated["out"].resolve()
