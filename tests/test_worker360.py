"""DiffPortrait360 jobs: job.json's back view and closed loop, the preflight against a 360 model, and the real worker
subprocess (back stage, --back-only, view stage, cancel + resume, closed loop) on a tiny 360 model folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core import preflight, protocol
from dp3d_core.job import BackView, FrameSpec, GenerationSettings, Job, JobError, job_from_dict, job_hash, \
    read_job, write_job
from dp3d_core.protocol import Event, parse_event

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
FRAMES = 6
LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]
BACK_LABEL = [-1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, -2.7, 0.0, 0.0, 0.0, 1.0,
              4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- job.json (no model)

def _pin_job(root: Path) -> Path:
    """A DiffPortrait3D job whose hash was computed by the job.py before the 360 fields existed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "model_index.json").write_text('{"_class_name": "DiffPortrait3DPipeline"}\n')
    for name, data in (("ref.png", b"reference bytes"), ("c0.png", b"condition 0"), ("c1.png", b"condition 1"),
                       ("p1.png", b"proxy 1")):
        (root / name).write_bytes(data)
    job = {"version": 1, "references": ["ref.png"], "model": "model", "output": "out",
           "frames": [{"index": 0, "scene_frame": 1, "label": LABEL, "condition": "c0.png"},
                      {"index": 1, "scene_frame": 2, "label": LABEL, "condition": "c1.png", "proxy": "p1.png"}],
           "settings": {"steps": 20, "seed": 7, "size": 64, "overlap": 2}}
    (root / "job.json").write_text(json.dumps(job))
    return root


def test_existing_jobs_keep_their_hash_and_the_360_fields_change_it(tmp_path: Path) -> None:
    d = _pin_job(tmp_path / "job")
    job = read_job(d)
    before_360 = "8cbfb260e5cf49f03ce58835352794c6fd783cf4cfa3a5f54bdca698121b50e7"  # job.py of commit d569c70
    assert job_hash(job, d) == before_360
    assert job.back is None and job.settings.closed_loop is False
    write_job(job, d)  # written back by this version (back: null, closed_loop: false): still the same job
    assert job_hash(read_job(d), d) == before_360

    closed = replace(job, settings=replace(job.settings, closed_loop=True))
    (d / "bc.png").write_bytes(b"back condition")
    (d / "bp.png").write_bytes(b"back photo")
    generated = replace(job, back=BackView(condition="bc.png", label=BACK_LABEL, seed=1))
    hashes = {job_hash(j, d) for j in (
        job, closed, generated, replace(generated, back=replace(generated.back, seed=2)),
        replace(generated, back=replace(generated.back, label=LABEL)),
        replace(generated, back=replace(generated.back, condition="c0.png")),
        replace(generated, back=replace(generated.back, image="bp.png", origin="photo")),
        replace(generated, back=replace(generated.back, image="bp.png", origin="generated")))}
    assert len(hashes) == 8
    # a given back image makes the seed irrelevant to the pixels
    given = replace(generated, back=replace(generated.back, image="bp.png"))
    assert job_hash(given, d) == job_hash(replace(given, back=replace(given.back, seed=9)), d)


def test_back_view_validation(tmp_path: Path) -> None:
    d = _pin_job(tmp_path / "job")
    base = json.loads((d / "job.json").read_text())
    ok = {"condition": "bc.png", "label": BACK_LABEL, "image": None, "origin": "generated", "seed": 3}
    job = job_from_dict({**base, "back": ok, "settings": {**base["settings"], "closed_loop": True}})
    assert job.back == BackView("bc.png", BACK_LABEL, None, "generated", 3) and job.settings.closed_loop
    assert job.resolve(d).back.condition == str((d / "bc.png").resolve())
    assert job_from_dict({**base, "back": {"condition": "bc.png", "label": BACK_LABEL}}).back.seed == 0
    bad = [({**ok, "origin": "photo"}, "back.image"), ({**ok, "origin": "drawn"}, "back.origin"),
           ({**ok, "seed": -1}, "back.seed"), ({**ok, "seed": 1.5}, "back.seed"),
           ({**ok, "label": LABEL[:16]}, "back.label"), ({k: v for k, v in ok.items() if k != "condition"},
                                                         "back.condition"),
           ({**ok, "image": ""}, "back.image"), ({**ok, "colour": 1}, "back"), ("bc.png", "back")]
    for back, field in bad:
        with pytest.raises(JobError, match=f"'{field}'"):
            job_from_dict({**base, "back": back})
    with pytest.raises(JobError, match="settings.closed_loop"):
        job_from_dict({**base, "settings": {"closed_loop": "yes"}})


# ---------------------------------------------------------------- model folder and preflight (no torch work)

@pytest.fixture(scope="module")
def model360_without_back_head(model360: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(model360, tmp_path_factory.mktemp("nohead") / "dp360",
                                ignore=shutil.ignore_patterns(preflight.BACK_HEAD_FOLDER)))


def test_read_model_info_family_and_back_head(model360: Path, model360_without_back_head: Path,
                                              tmp_path: Path) -> None:
    info = preflight.read_model_info(model360)
    assert (info.family, info.variant, info.back_head) == ("DiffPortrait360", "views", True)
    assert preflight.read_model_info(model360_without_back_head).back_head is False
    head = preflight.read_model_info(model360 / "back_head")
    assert (head.family, head.variant, head.back_head) == ("DiffPortrait360", "back_head", False)
    small = preflight.read_model_info(ROOT / "models" / "small")
    assert (small.family, small.back_head) == ("DiffPortrait3D", False)
    # a back_head/ that holds the wrong model is not a back-head model, and preflight says why
    wrong = Path(shutil.copytree(model360_without_back_head, tmp_path / "wrong"))
    shutil.copytree(model360_without_back_head, wrong / "back_head")
    info = preflight.read_model_info(wrong)
    assert info.back_head is False and "view model" in info.back_head_problem
    with pytest.raises(preflight.PreflightError, match="holds no back-head model.*view model"):
        preflight.check_family(info, preflight.BACK_GENERATE)


def test_preflight_family_rules(model360: Path, model360_without_back_head: Path) -> None:
    full, bare = preflight.read_model_info(model360), preflight.read_model_info(model360_without_back_head)
    assert preflight.check_family(full, preflight.BACK_GENERATE) == []
    assert preflight.check_family(full, preflight.BACK_IMAGE) == []
    assert preflight.check_family(bare, preflight.BACK_IMAGE) == []
    with pytest.raises(preflight.PreflightError) as exc:
        preflight.check_family(full, None)
    assert "back of the head" in exc.value.message and "panel" in exc.value.hint
    with pytest.raises(preflight.PreflightError) as exc:
        preflight.check_family(bare, preflight.BACK_GENERATE)
    assert "no back_head/ folder" in exc.value.message and "photo" in exc.value.hint
    with pytest.raises(preflight.PreflightError, match="one front photo"):
        preflight.check_family(full, preflight.BACK_IMAGE, references=2)
    with pytest.raises(preflight.PreflightError, match="back-head model") as exc:
        preflight.check_family(preflight.read_model_info(model360 / "back_head"), preflight.BACK_GENERATE)
    assert "view model folder" in exc.value.hint
    small = preflight.read_model_info(ROOT / "models" / "small")
    assert preflight.check_family(small, None) == []
    (warning,) = preflight.check_family(small, preflight.BACK_IMAGE)  # DiffPortrait3D: the back view is ignored
    assert "ignored" in warning


# ---------------------------------------------------------------- the worker

def _image(path: Path, seed: int, shape: tuple[int, int] = (SIZE, SIZE)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)


def make_job(root: Path, model: Path, name: str, steps: int = 2, **back: object) -> Path:
    """A 6-frame 360 job at 64 px (the same images for every ``name``, so jobs differ only by what is passed)."""
    d = root / name
    d.mkdir()
    _image(d / "ref.png", 0, (80, 96))
    _image(d / "back_cond.png", 1)
    frames = []
    for i in range(FRAMES):
        _image(d / f"cond_{i}.png", 10 + i)
        frames.append(FrameSpec(index=i, scene_frame=i + 1, label=list(LABEL), condition=f"cond_{i}.png"))
    job = Job(references=["ref.png"], frames=frames, model=str(model), output="out", device="cpu",
              settings=GenerationSettings(steps=steps, seed=5, size=SIZE, eta=0.5),
              back=BackView(**{"condition": "back_cond.png", "label": BACK_LABEL, "seed": 2, **back}))
    write_job(job, d)
    return d


def edit_job(job_dir: Path, **changes: object) -> None:
    data = json.loads((job_dir / "job.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data[section][field] = value
    (job_dir / "job.json").write_text(json.dumps(data))


def run_worker(job_dir: Path, *args: str, cancel_at: tuple[str, int] | None = None
               ) -> tuple[int, list[Event], str]:
    """The worker subprocess; ``cancel_at`` (stage, step): write the cancel file at that stage's progress step
    (the worker then pauses 5 s in its next preview write, so even a busy machine sees the cancel at the following
    step)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DP3D_PREVIEW_EVERY_SECONDS="0")  # a preview at every step
    if cancel_at:
        env[protocol.TEST_PAUSE_ENV] = "preview/frame_0001.png:5"
    proc = subprocess.Popen([sys.executable, "-m", "dp3d_core.worker", str(job_dir), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    assert proc.stdout is not None
    for line in proc.stdout:
        event = parse_event(line)
        assert event is not None, f"non-protocol output on stdout: {line!r}"
        events.append(event)
        if (cancel_at and event.kind == "progress" and event.get("stage") == cancel_at[0]
                and event["step"] == cancel_at[1]):
            protocol.request_cancel(job_dir)
    err = proc.stderr.read() if proc.stderr else ""
    return proc.wait(timeout=120), events, err


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def only(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def frame_pixels(job_dir: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(job_dir / "out" / f"frame_{i + 1:04d}.png")) for i in range(FRAMES)]


def test_back_stage_back_only_accept_cancel_resume(tmp_path: Path, model360: Path) -> None:
    # 1. one shot: back.image null -> the back view is generated first, then the frames
    oneshot = make_job(tmp_path, model360, "oneshot")
    rc, events, err = run_worker(oneshot)
    assert rc == 0, err
    k = kinds(events)
    assert k[0] == "started" and k[-1] == "done" and k.count("back_view") == 1
    back_at = k.index("back_view")
    stages = [e["stage"] for e in only(events, "progress")]
    assert stages == ["back"] * 2 + ["views"] * 2  # 2 steps each; the 6 views fit one window
    assert all(e["stage"] == "back" for e in only(events[:back_at], "progress"))
    assert min(i for i, x in enumerate(k) if x == "frame") > back_at
    # live previews of the view stage, named as the frames: the first step always has one (later ones only while
    # they cost little next to the steps, so a busy machine may skip step 2's)
    previews = only(events, "preview")
    assert [e["step"] for e in previews] in ([1], [1, 2])
    assert min(i for i, x in enumerate(k) if x == "preview") > back_at
    assert sorted(p.name for p in Path(previews[0]["folder"]).glob("*.png")) == \
        [f"frame_{i + 1:04d}.png" for i in range(FRAMES)]
    back = events[back_at]
    png = oneshot / "back" / "back_seed2.png"
    assert Path(back["path"]) == png.resolve() and back["seed"] == 2 and back["origin"] == "generated"
    with Image.open(png) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert events[-1]["frames_written"] == FRAMES and len(only(events, "frame")) == FRAMES
    oneshot_frames = frame_pixels(oneshot)
    assert not (oneshot / "state").exists() or not any((oneshot / "state").iterdir())  # checkpoint removed

    # 2. --back-only (the panel's Generate Back View) on a job with the same inputs: the same back view, no frames
    panel = make_job(tmp_path, model360, "panel")
    rc, events, err = run_worker(panel, "--back-only")
    assert rc == 0, err
    assert kinds(events) == ["started"] + ["progress"] * 2 + ["back_view", "done"]
    assert events[-1]["frames_written"] == 0 and events[-1]["cancelled"] is False
    panel_png = panel / "back" / "back_seed2.png"
    assert panel_png.read_bytes() == png.read_bytes()
    assert not (panel / "out").exists() or not any((panel / "out").glob("*.png"))
    # again: the valid PNG is reused, not recomputed (no progress, file untouched)
    mtime = panel_png.stat().st_mtime_ns
    rc, events, err = run_worker(panel, "--back-only")
    assert rc == 0, err
    assert kinds(events) == ["started", "back_view", "done"] and panel_png.stat().st_mtime_ns == mtime

    # 3. the artist accepts it (back.image = the PNG); a cancel in the view stage keeps its checkpoint ...
    edit_job(panel, back__image="back/back_seed2.png")
    rc, events, err = run_worker(panel, cancel_at=("views", 1))
    assert rc == protocol.EXIT_CANCELLED, err
    assert "back_view" not in kinds(events) and not only(events, "frame")  # given back view: no back stage
    assert events[-1]["cancelled"] is True and not protocol.cancel_requested(panel)
    # ... and the rerun resumes from it to exactly the one-shot run's frames
    rc, events, err = run_worker(panel)
    assert rc == 0, err
    assert [e["step"] for e in only(events, "resumed")] == [1]
    assert [e["step"] for e in only(events, "progress")] == [2]
    for got, want in zip(frame_pixels(panel), oneshot_frames):
        np.testing.assert_array_equal(got, want)


def test_photo_back_view_and_closed_loop(tmp_path: Path, model360: Path) -> None:
    """The artist's own back photo (not square: its centre square is used) in a closed-loop job: the frames are the
    pipeline's closed-loop frames for that photo, and differ from the open loop's."""
    from dp3d_core.images import load_rgb
    from dp3d_core.pipeline360 import DiffPortrait360Pipeline

    job_dir = make_job(tmp_path, model360, "photo", steps=2, image="back_photo.png", origin="photo")
    _image(job_dir / "back_photo.png", 7, (96, 72))
    open_hash = job_hash(read_job(job_dir), job_dir)
    edit_job(job_dir, settings__closed_loop=True)
    assert job_hash(read_job(job_dir), job_dir) != open_hash
    rc, events, err = run_worker(job_dir)
    assert rc == 0, err
    assert "back_view" not in kinds(events) and not (job_dir / "back").exists()  # a given back view: no back stage
    assert {e["stage"] for e in only(events, "progress")} == {"views"}
    frames = frame_pixels(job_dir)
    pipe = DiffPortrait360Pipeline.from_pretrained(model360)
    inputs = (load_rgb(job_dir / "ref.png", SIZE), [load_rgb(job_dir / f"cond_{i}.png", SIZE) for i in range(FRAMES)])
    run = dict(back_image=load_rgb(job_dir / "back_photo.png", SIZE), num_inference_steps=2, eta=0.5, seed=5,
               output_type="np")
    closed, open_ = (pipe(*inputs, closed_loop=loop, **run).images for loop in (True, False))
    for got, want, other in zip(frames, closed, open_):
        np.testing.assert_allclose(got / 255, want, atol=1.5 / 255)
        assert np.abs(got / 255 - other).max() > 4 / 255  # the loop's windows change every frame


def test_bad_360_jobs_fail_before_loading(tmp_path: Path, model360: Path, model360_without_back_head: Path) -> None:
    no_back = make_job(tmp_path, model360, "no_back")
    data = json.loads((no_back / "job.json").read_text())
    data["back"] = None
    (no_back / "job.json").write_text(json.dumps(data))
    rc, events, err = run_worker(no_back)
    assert rc == protocol.EXIT_ERROR and kinds(events) == ["error"], err
    assert "back of the head" in events[0]["message"] and "Traceback" not in events[0]["message"]

    no_head = make_job(tmp_path, model360_without_back_head, "no_head")
    for args in ((), ("--back-only",)):
        rc, events, err = run_worker(no_head, *args)
        assert rc == protocol.EXIT_ERROR and kinds(events) == ["error"], err
        assert "no back-head model" in events[0]["message"] and "photo" in events[0]["hint"]
    assert not (no_head / "out").exists() and not (no_head / "back").exists()

    broken = make_job(tmp_path, model360, "broken_photo", image="back_photo.png", origin="photo")
    (broken / "back_photo.png").write_bytes(b"not an image")
    rc, events, err = run_worker(broken)
    assert rc == protocol.EXIT_ERROR and kinds(events) == ["started", "error"], err
    assert "back_photo.png" in events[-1]["message"]


def test_cancel_in_the_back_stage(tmp_path: Path, model360: Path) -> None:
    """In-process (the cancel file is written by the first back-stage progress event, so it is seen at once)."""
    import torch

    from dp3d_core import worker

    job_dir = make_job(tmp_path, model360, "cancel_back")
    events: list[Event] = []

    def emit(kind: str, **fields: object) -> None:
        protocol.encode_event(kind, **fields)  # a valid protocol line
        events.append(Event(kind, fields))
        if kind == "progress":
            protocol.request_cancel(job_dir)
    threads = torch.get_num_threads()
    try:
        assert worker.run(job_dir, emit, back_only=True) == protocol.EXIT_CANCELLED
    finally:
        torch.set_num_threads(threads)  # the worker sets its own
    assert kinds(events) == ["started", "progress", "done"] and events[1]["stage"] == "back"
    assert events[-1]["cancelled"] is True and events[-1]["frames_written"] == 0
    assert not protocol.cancel_requested(job_dir) and not list((job_dir / "back").glob("*.png"))
