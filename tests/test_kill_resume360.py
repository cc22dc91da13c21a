"""Kill the real worker (SIGKILL) in both stages of a DiffPortrait360 job (tiny random model): inside the back
view's PNG, between the PNG and its record, inside a checkpoint, after a saved step and inside a frame of the
view stage.

After every kill nothing is half-written (the back view is either absent or whole, frames and checkpoints
decode and pass their checks); a back view without its record is made again, never trusted; the view stage
resumes from its checkpoint; the frames and the back view finally written equal an uninterrupted run's.
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
from PIL import Image

from dp3d_core import protocol
from dp3d_core.denoise_state import STATE_DIR
from tests.test_kill_resume import Worker
from tests.test_worker360 import FRAMES, frame_pixels, make_job

STEPS = 3
BACK = Path("back") / "back_seed2.png"


def killed_at(job_dir: Path, pause: str) -> Worker:
    """A worker run that stops inside the write of ``pause`` (a path part) and is killed there."""
    w = Worker(job_dir, **{protocol.TEST_PAUSE_ENV: f"{pause}:60"})
    folder, _, name = pause.rpartition("/")
    w.wait_file(job_dir / folder, f".{name}*.tmp", set())
    w.kill()
    assert w.proc.returncode == -signal.SIGKILL, w.kinds()[-3:]
    return w


def test_kill_in_either_stage_then_resume(tmp_path: Path, model360: Path) -> None:
    job_dir = make_job(tmp_path, model360, "job", steps=STEPS)
    reference_dir = shutil.copytree(job_dir, tmp_path / "reference")
    reference = Worker(reference_dir)  # the uninterrupted run, alongside
    png = job_dir / BACK
    record = png.with_suffix(".json")

    # 1. inside the back view's PNG: no PNG (only its temporary file), no record
    w = killed_at(job_dir, BACK.as_posix())
    assert "back_view" not in w.kinds() and not png.exists() and not record.exists()

    # 2. between the PNG and its record: the PNG is whole, the record missing ...
    killed_at(job_dir, BACK.with_suffix(".json").as_posix())
    with Image.open(png) as im:
        im.load()
    assert not record.exists()

    # 3. ... so the next run makes the back view again instead of trusting it; killed inside a checkpoint
    w = killed_at(job_dir, f"{STATE_DIR}/tensors-")
    stages = [e["stage"] for e in w.events if e.kind == "progress"]
    assert stages[:STEPS] == ["back"] * STEPS and "views" in stages and "back_view" in w.kinds()
    assert record.exists()

    # 4. the back view is reused now (no back-stage step); killed once the view stage has saved a step ...
    w = Worker(job_dir)
    w.wait_event(lambda e: e.kind == "progress" and e.get("stage") == "views" and e["step"] >= 2, "a saved step")
    w.kill()
    assert "back" not in {e.get("stage") for e in w.events if e.kind == "progress"}

    # 5. ... which the next run resumes from; killed inside a frame
    w = killed_at(job_dir, "out/frame_0003")
    assert w.kinds()[:3] == ["started", "back_view", "resumed"] and w.events[2]["step"] >= 1, w.kinds()[:4]
    for frame in (job_dir / "out").glob("frame_*.png"):
        with Image.open(frame) as im:
            im.load()

    # 6. the last run finishes; frames and back view equal the uninterrupted run's
    w = Worker(job_dir)
    assert w.finish() == 0, w.events[-2:]
    assert "resumed" in w.kinds() and w.events[-1]["cancelled"] is False
    assert reference.finish() == 0
    assert png.read_bytes() == (reference_dir / BACK).read_bytes()
    for got, want in zip(frame_pixels(job_dir), frame_pixels(reference_dir)):
        np.testing.assert_array_equal(got, want)
    assert len(list((job_dir / "out").glob("frame_*.png"))) == FRAMES
    assert not (job_dir / STATE_DIR).exists() or not any((job_dir / STATE_DIR).iterdir())
    assert not [p for p in job_dir.rglob(".*.tmp")], "temporary files left behind"
