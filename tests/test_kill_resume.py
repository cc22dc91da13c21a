"""Kill the real worker (SIGKILL) at a dozen moments of a 48-frame job on the shipped small model.

After every kill: no file in the job or output folder is corrupt (frames decode, the frames manifest and the
checkpoint parse and pass their checks, previews decode), the next run resumes from the last checkpoint (its
``resumed`` event names that step), and the frames finally written equal those of an uninterrupted run.

Also: a cancelled run keeps its checkpoint, and a changed job (another seed) ignores it with a warning.
Windows: ``DP3D_TEST_PAUSE_WRITE`` (dp3d_core.protocol) stops a chosen write half-way so the kill lands inside it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core import protocol
from dp3d_core.denoise_state import MANIFEST, STATE_DIR, Checkpoints
from dp3d_core.job import FrameSpec, GenerationSettings, Job, job_hash, read_job, write_job
from dp3d_core.live_preview import PREVIEW_DIR
from dp3d_core.protocol import Event, EventReader

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "small"
FRAMES, STEPS, SIZE = 48, 4, 64
WAIT = 300.0  # generous: a loaded 2-core machine
LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DP3D_CHECKPOINT_EVERY_STEPS": "1",
       "DP3D_CHECKPOINT_EVERY_SECONDS": "0", "DP3D_PREVIEW_EVERY_SECONDS": "0"}

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="models/small is not checked out")


def make_job(d: Path, seed: int = 3) -> Path:
    """48 frames; DDIM with eta > 0 (a random draw every step), no guidance and no overlap to keep it cheap."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / "ref.png")
    specs = []
    for i in range(FRAMES):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / f"cond_{i}.png")
        specs.append(FrameSpec(index=i, scene_frame=i + 1, label=list(LABEL), condition=f"cond_{i}.png"))
    write_job(Job(references=["ref.png"], frames=specs, model=str(MODEL), output="out", device="cpu",
                  settings=GenerationSettings(steps=STEPS, seed=seed, size=SIZE, eta=0.5, guidance=1.0, overlap=0)),
              d)
    return d


class Worker:
    """``python -m dp3d_core.worker`` in the background, its events read on a thread."""

    def __init__(self, job_dir: Path, **env: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "dp3d_core.worker", str(job_dir)], cwd=ROOT,
                                     env={**os.environ, **ENV, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.reader = EventReader(self.proc.stdout)
        self.events: list[Event] = []

    def pump(self) -> None:
        self.events += self.reader.poll()

    def wait_event(self, test, what: str) -> Event:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.pump()
            for e in self.events:
                if test(e):
                    return e
            if self.proc.poll() is not None and self.reader.finished:
                self.pump()
                if not any(test(e) for e in self.events):
                    raise AssertionError(f"the worker ended before {what}: {[e.kind for e in self.events][-5:]}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_file(self, folder: Path, pattern: str, old: set[Path]) -> None:
        """Until a file matching ``pattern`` and not in ``old`` (left by an earlier kill) appears."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if folder.is_dir() and set(folder.glob(pattern)) - old:
                return
            assert self.proc.poll() is None, f"the worker ended before writing {folder / pattern}"
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {folder / pattern}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.reader.join(10)
        self.pump()

    def finish(self) -> int:
        rc = self.proc.wait(timeout=WAIT)
        self.reader.join(10)
        self.pump()
        return rc

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def check_files(job_dir: Path, digest: str, checkpoints: Checkpoints) -> int:
    """Every complete-looking file is sound; returns the step of the valid checkpoint (0 when none)."""
    out = job_dir / "out"
    for png in list(out.glob("frame_*.png")) + list((job_dir / PREVIEW_DIR).glob("*.png")):
        with Image.open(png) as im:
            im.load()  # a truncated PNG raises here
    manifest = protocol.read_manifest(out)
    if (out / protocol.MANIFEST_FILE).exists():
        json.loads((out / protocol.MANIFEST_FILE).read_text())
    for name, entry in manifest.items():
        assert protocol.frame_done(out, name, digest, manifest), f"{name} is in the manifest but does not match"
    if not (job_dir / STATE_DIR / MANIFEST).exists():
        return 0
    state = checkpoints.read()  # raises when the checkpoint is not valid; changes nothing
    assert state is not None
    return state.step


def frames_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("frame_*.png"))}


def test_kill_at_any_moment_then_resume(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path / "job")
    reference_dir = tmp_path / "reference"
    shutil.copytree(job_dir, reference_dir)
    reference = Worker(reference_dir)  # the uninterrupted run, alongside (one thread each)
    digest = job_hash(read_job(job_dir), job_dir)
    lat = SIZE // 8
    channels = json.loads((MODEL / "unet" / "config.json").read_text())["in_channels"]
    checkpoints = Checkpoints(job_dir, digest, {"total_steps": STEPS, "latent_shape": [FRAMES, channels, lat, lat]})
    state_dir, preview_dir, out = job_dir / STATE_DIR, job_dir / PREVIEW_DIR, job_dir / "out"
    rnd = random.Random(12)

    # 1. a cancelled run keeps its checkpoint (the last completed step, saved on cancel)
    w = Worker(job_dir)
    w.wait_event(lambda e: e.kind == "progress" and e["step"] == 2, "step 2")
    protocol.request_cancel(job_dir)
    assert w.finish() == protocol.EXIT_CANCELLED
    protocol.clear_cancel(job_dir)
    assert w.events[-1].kind == "done" and w.events[-1]["cancelled"] is True
    assert "preview" in w.kinds() and len(list(preview_dir.glob("frame_*.png"))) == FRAMES
    expected = check_files(job_dir, digest, checkpoints)
    assert expected >= 1

    # 2. another seed is another job: the checkpoint is ignored with a warning, and survives for the original
    original = (job_dir / "job.json").read_bytes()
    job = read_job(job_dir)
    job.settings.seed = 4
    write_job(job, job_dir)
    w = Worker(job_dir)
    w.wait_event(lambda e: e.kind == "progress", "the first step of the changed job")
    w.kill()
    warnings = [e["message"] for e in w.events if e.kind == "warning"]
    assert "resumed" not in w.kinds() and any("another job" in m for m in warnings), w.events
    assert w.events[w.kinds().index("progress")]["step"] == 1
    (job_dir / "job.json").write_bytes(original)
    assert check_files(job_dir, digest, checkpoints) == expected

    # 3. kills: (how to wait, what) in run order; the worker resumes from the last checkpoint every time
    scenarios = [
        ("delay", rnd.uniform(0.2, 3.0)),           # loading: Python, torch, model
        ("event", "started"),                       # loading the model
        ("window", rnd.randint(1, 6)),              # in the middle of a step
        ("write", "state/tensors-"),                # inside a checkpoint's tensor file
        ("steps", 1),                               # after this run saved a step of its own
        ("write", f"state/{MANIFEST}"),             # inside a checkpoint's manifest
        ("write", f"{PREVIEW_DIR}/frame_0007"),     # inside a preview
        ("random", rnd.uniform(0.0, 2.0)),          # anywhere after resuming
        ("write", "out/frame_0020"),                # inside a frame
        ("write", f"out/{protocol.MANIFEST_FILE}"),  # inside the frames manifest
        ("event", "frame"),                         # between frames
    ]
    verified = 0
    for how, what in scenarios:
        env = {protocol.TEST_PAUSE_ENV: f"{what}:60"} if how == "write" else {}
        if how == "random":  # a random moment before frame 20 at the latest: a fast machine must not finish the job
            env = {protocol.TEST_PAUSE_ENV: "out/frame_0020:60"}
        temp_files = set(job_dir.glob("*/.*.tmp"))
        w = Worker(job_dir, **env)
        if how == "delay":
            time.sleep(what)
        elif how == "event":
            w.wait_event(lambda e: e.kind == what, what)
        else:
            first = w.wait_event(lambda e: e.kind in ("resumed", "progress", "frame"), "the run to get going")
            if expected and first.kind != "frame":
                assert first.kind == "resumed" and first["step"] == expected, (expected, first.fields)
                verified += 1
            if how == "window":
                w.wait_event(lambda e: e.kind == "progress" and e["window"] == what, f"window {what}")
            elif how == "steps":
                w.wait_event(lambda e: e.kind == "progress" and e["step"] >= expected + what + 1, "a saved step")
            elif how == "random":
                time.sleep(what)
            else:
                folder, name = what.split("/")
                w.wait_file(job_dir / folder, f".{name}*.tmp", temp_files)
        w.kill()
        assert w.proc.returncode == -signal.SIGKILL, (how, what, w.kinds()[-3:])
        step = check_files(job_dir, digest, checkpoints)
        assert step >= expected or step == 0 and expected == 0, (how, what, step, expected)
        expected = step
    assert verified >= 7
    assert len(list(out.glob("frame_*.png"))) >= 20  # the kills reached the frame writing

    # 4. the last run finishes from the last checkpoint; the frames equal the uninterrupted run's
    w = Worker(job_dir)
    assert w.finish() == 0, w.events[-2:]
    assert w.kinds()[:2] == ["started", "resumed"] and w.events[1]["step"] == expected == STEPS
    assert w.events[0]["frames_done"] + w.events[-1]["frames_written"] == FRAMES
    assert reference.finish() == 0
    want, got = frames_of(reference_dir / "out"), frames_of(out)
    assert sorted(got) == sorted(want) and len(got) == FRAMES
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert not state_dir.exists(), "the checkpoint is removed once every frame is written"
    assert not [p for p in (job_dir, out, preview_dir) for p in p.glob(".*.tmp")]
