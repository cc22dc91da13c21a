"""Cancel from the operator, Generate again: the worker resumes from the saved denoising step (tiny model).

The add-on path end to end: the Generate flow starts the real worker subprocess, Cancel (the operator) stops it
after a few denoising steps, the checkpoint stays in the job folder, and the next Generate continues from it (the
``resumed`` event names the step). The frames equal those of an uninterrupted Generate into another folder.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image

import addon
from addon import job_runner
from blender_tests.helpers import setup_generation_scene, tiny_model_folder
from dp3d_core.denoise_state import MANIFEST, STATE_DIR

FRAMES, SIZE, STEPS = 8, 64, 5  # 5 DDIM steps: exactly 5 timesteps with the official spacing


@pytest.fixture
def scene(empty_scene, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")           # the tiny model is fastest on one thread
    monkeypatch.setenv("DP3D_CHECKPOINT_EVERY_STEPS", "1")  # a checkpoint after every step
    addon.register()
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def _frames(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("frame_*.png"))}


def test_cancel_then_generate_resumes_with_the_same_frames(scene, tmp_path):
    out = tmp_path / "resumed"
    setup_generation_scene(scene, out=out, model=tiny_model_folder(), frames=FRAMES, size=SIZE, steps=STEPS, seed=5)

    # 1. start, cancel through the operator once step 3 runs
    run = job_runner.start_generation(bpy.context)
    cancelled_at = None
    deadline = time.monotonic() + 300
    while not run.update(bpy.context) and time.monotonic() < deadline:
        if cancelled_at is None and run.status.step >= 3:
            cancelled_at = run.status.step
            assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
        time.sleep(0.02)
    assert cancelled_at is not None, "the worker never reached step 3"
    assert run.status.state == "cancelled", (run.status.message, run.status.log_tail)
    assert not list(out.glob("frame_*.png"))
    manifest = json.loads((run.prepared.job_dir / STATE_DIR / MANIFEST).read_text())
    saved = manifest["step"]
    assert 0 < saved < STEPS  # the last completed step was kept

    # 2. Generate again: it resumes from that step and finishes
    assert bpy.ops.portrait3d.generate() == {'FINISHED'}
    rerun = job_runner.last_run()
    assert rerun is not run and rerun.status.state == "done"
    resumed = [e for e in rerun.worker.events if e.kind == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == saved and resumed[0]["total_steps"] == STEPS
    steps = sorted({e["step"] for e in rerun.worker.events if e.kind == "progress"})
    assert steps == list(range(saved + 1, STEPS + 1))  # the finished steps were not run again
    assert not (run.prepared.job_dir / STATE_DIR).exists()

    # 3. the same job without interruption, into another folder: identical frames
    reference = tmp_path / "uninterrupted"
    scene.portrait3d.output_folder = str(reference) + "/"
    assert bpy.ops.portrait3d.generate() == {'FINISHED'}
    assert not [e for e in job_runner.last_run().worker.events if e.kind == "resumed"]
    got, want = _frames(out), _frames(reference)
    assert len(got) == FRAMES and sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
