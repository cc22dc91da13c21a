"""Running generation: one worker at a time, its progress on the window manager, the full CLI job.

``start_generation`` writes the job and starts the worker without blocking (the UI polls
``GenerationRun.update`` from a timer); ``wait`` blocks (background mode, CLI, tests).
``run_turntable_job`` is the whole scripted path: rig, poses, condition images, job, worker,
imported frames, GIF + contact sheet, saved .blend.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bpy

from . import frame_import, job_writer, preferences, reference_prep, rig
from .core import failures, job as jobspec, preflight
from .poses import DATASET_FILE, FramePose, PoseError, scene_poses, write_dataset
from .previews import PreviewError, make_movie, make_previews
from .properties import DEVICES, MEMORY_MODES, active_camera
from .worker_env import NO_WORKER, not_ready_problem
from .worker_process import (WorkerProcess, WorkerStartError, WorkerStatus, probe_worker_python,
                             resolve_worker_python)

BLEND_FILE = "scene.blend"
_active: "GenerationRun | None" = None
_last: "GenerationRun | None" = None


class JobRunError(RuntimeError):
    """The job could not run; the message says what to fix."""


def progress_state(context: bpy.types.Context | None = None):
    """The window manager's progress properties."""
    return (context or bpy.context).window_manager.portrait3d_progress


def active_run() -> "GenerationRun | None":
    return _active


def last_run() -> "GenerationRun | None":
    """The most recently started run (running or finished)."""
    return _last


def is_running() -> bool:
    return _active is not None and not _active.finished


def format_eta(seconds: float) -> str:
    if seconds < 0:
        return "estimating..."
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_text(status: WorkerStatus) -> str:
    text = f"{status.frames_done}/{status.frames_total} frames"
    if status.state == "running" and status.total_steps:
        text += f" | step {status.step}/{status.total_steps} | ETA {format_eta(status.eta_seconds)}"
    return text


class GenerationRun:
    """A started job: the prepared job folder and its worker process."""

    def __init__(self, prepared: job_writer.PreparedJob, worker: WorkerProcess, scene: bpy.types.Scene) -> None:
        self.prepared = prepared
        self.worker = worker
        self.scene_name = scene.name
        self.camera_name = (active_camera(scene).name if active_camera(scene) else "")
        self.imported: dict[str, object] = {}
        self.import_error = ""
        self._closed = False

    @property
    def status(self) -> WorkerStatus:
        return self.worker.status

    @property
    def finished(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        self.worker.cancel()
        self._write_progress(bpy.context)

    def update(self, context: bpy.types.Context | None = None) -> bool:
        """Poll the worker (main thread); settle and import when it ended. True once finished."""
        if self._closed:
            return True
        context = context or bpy.context
        self.worker.poll()
        if self.worker.status.finished:
            self._finish(context)
        self._write_progress(context)
        return self._closed

    def _write_progress(self, context: bpy.types.Context) -> None:
        p = progress_state(context)
        s = self.worker.status
        p.running = not self._closed
        p.frames_done, p.frames_total = s.frames_done, s.frames_total
        p.step, p.total_steps = s.step, s.total_steps
        p.eta_seconds = s.eta_seconds
        p.fraction = s.fraction
        p.status = s.message if self._closed else f"{s.message} ({progress_text(s)})"
        p.output_folder = str(self.prepared.out_dir)
        if self._closed:
            p.last_error = s.message if s.state == "failed" else self.import_error
            p.last_hint = s.hint if s.state == "failed" else ""
            p.last_log = "\n".join(s.log_tail) if s.state == "failed" else ""

    def _finish(self, context: bpy.types.Context) -> None:
        global _active
        self._closed = True
        if _active is self:
            _active = None
        if self.worker.status.state != "done":
            return
        scene = bpy.data.scenes.get(self.scene_name)
        if scene is None:
            return
        modes = tuple(scene.portrait3d.import_as)
        if not modes:
            return
        try:
            seq = frame_import.frame_sequence(self.prepared.frame_paths, self.prepared.job.frames[0].scene_frame)
            camera = bpy.data.objects.get(self.camera_name)
            self.imported = frame_import.import_frames(scene, camera, seq, modes)
        except frame_import.FrameImportError as exc:
            self.import_error = f"Frames generated but not imported: {exc}"


def worker_python_setting(context: bpy.types.Context, worker_python: str | os.PathLike | None) -> str:
    """``worker_python`` when given, else the add-on preference (or PORTRAIT3D_WORKER_PYTHON)."""
    return str(worker_python) if worker_python else preferences.worker_python(context)


def start_generation(context: bpy.types.Context | None = None, *, worker_python: str | os.PathLike | None = None,
                     model: str | os.PathLike | None = None) -> GenerationRun:
    """Check and write the job, start the worker; JobRunError (plain words) when that is impossible.

    ``worker_python`` defaults to the add-on preference (or PORTRAIT3D_WORKER_PYTHON).
    """
    global _active, _last
    context = context or bpy.context
    if is_running():
        raise JobRunError("A generation is already running: wait for it or press Cancel first.")
    p = progress_state(context)
    try:
        setting = worker_python_setting(context, worker_python)
        if not setting.strip():
            raise WorkerStartError(NO_WORKER)
        python = str(resolve_worker_python(setting))
        if (problem := not_ready_problem(python)) is not None:  # a setup was cancelled or failed halfway
            raise WorkerStartError(problem)
        probe_worker_python(python)  # before anything is rendered: seconds, once per interpreter
        prepared = job_writer.prepare_job(context, model=model, worker_python=python)
        worker = WorkerProcess(prepared.job_dir, python)
    except (job_writer.JobSetupError, WorkerStartError) as exc:
        p.running, p.last_error, p.last_hint, p.last_log = False, str(exc), "", ""
        raise JobRunError(str(exc)) from None
    except OSError as exc:  # e.g. the disk filled up while the conditions were rendered
        failure = failures.report(exc, [], name="generate.log")
        p.running, p.last_error, p.last_hint, p.last_log = False, failure.message, failure.hint_with_log, ""
        raise JobRunError(str(failure)) from None
    run = GenerationRun(prepared, worker, context.scene)
    _active = _last = run
    p.last_error = p.last_hint = p.last_log = ""
    run._write_progress(context)
    return run


def wait(run: GenerationRun, context: bpy.types.Context | None = None, *, timeout: float | None = None,
         on_update: Callable[[WorkerStatus], None] | None = None, interval: float = 0.05) -> WorkerStatus:
    """Block until ``run`` finished (or ``timeout``), updating the progress state; returns the status."""
    import time

    context = context or bpy.context
    end = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while not run.update(context):
        if on_update is not None and len(run.worker.events) != seen:
            seen = len(run.worker.events)
            on_update(run.status)
        if end is not None and time.monotonic() > end:
            break
        time.sleep(interval)
    if on_update is not None:
        on_update(run.status)
    return run.status


def stop_all() -> None:
    """Kill a running worker (add-on unregistered, Blender quitting)."""
    global _active
    if _active is not None:
        _active.worker.kill()
        _active = None


# ---------------------------------------------------------------- the scripted job

@dataclass
class JobResult:
    out_dir: Path
    dataset: Path
    blend: Path
    poses: list[FramePose]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    frames: list[Path] = field(default_factory=list)
    gif: Path | None = None
    contact_sheet: Path | None = None
    movie: Path | None = None
    job_dir: Path | None = None
    status: WorkerStatus | None = None
    reference_prep: object | None = None  # dp3d_core.job.ReferencePrep of the generated job, if prepared

    def files(self) -> list[Path]:
        extra = [p for p in (self.gif, self.contact_sheet, self.movie) if p is not None]
        return [self.dataset, *self.frames, *extra, self.blend]


def _print_progress(log: Callable[[str], None]) -> Callable[[WorkerStatus], None]:
    last = {"text": ""}

    def on_update(status: WorkerStatus) -> None:
        text = f"{status.message} ({progress_text(status)})"
        if text != last["text"]:
            last["text"] = text
            log(text)
    return on_update


def _save_blend(out: Path) -> Path:
    blend = out / BLEND_FILE
    blend.unlink(missing_ok=True)  # overwrite cleanly: no scene.blend1 backup next to it
    result = bpy.ops.wm.save_as_mainfile(filepath=str(blend), check_existing=False, copy=True)
    if 'FINISHED' not in result or not blend.is_file():
        raise JobRunError(f"Could not save {blend}.")
    return blend


def run_turntable_job(out_dir: str | os.PathLike, *, frames: int = 16, reference: str | None = None,
                      yaw_range_deg: float = 45.0, pitch_deg: float = 0.0, size: int = 512,
                      model: str | os.PathLike | None = None, worker_python: str | os.PathLike | None = None,
                      steps: int | None = None, seed: int | None = None, conditions: str = "procedural",
                      device: str | None = None, memory: str | None = None, compile: bool | None = None,
                      proxy_views: bool | None = None, prepare: bool | None = None,
                      from_photo_view: bool = False, generate: bool = True, previews: bool = True,
                      import_as: tuple[str, ...] = ("CARD",), log: Callable[[str], None] | None = None,
                      context: bpy.types.Context | None = None) -> JobResult:
    """Anchor (reused) + turntable + poses; with ``generate``: conditions, worker, import, GIF, sheet.

    Writes ``dataset.json`` and ``scene.blend`` into ``out_dir`` (with ``generate``, only once every pre-work
    check has passed: a job that fails them writes nothing there). Blocks until the worker ends.
    """
    context = context or bpy.context
    log = log or (lambda _msg: None)
    scene = context.scene
    settings = scene.portrait3d
    if frames < 1:
        raise JobRunError(f"--frames must be at least 1, got {frames}.")
    if frames > jobspec.MAX_FRAMES:
        raise JobRunError(f"--frames is {frames}; one job holds at most {jobspec.MAX_FRAMES} frames (all frames are "
                          "denoised together and kept in memory). Split the turntable into several jobs.")
    if not 16 <= size <= 2048:
        raise JobRunError(f"--size must be between 16 and 2048 pixels, got {size}.")
    if generate and size % 64:
        raise JobRunError(f"--size must be a multiple of 64 to generate, got {size}; try {max(64, round(size / 64) * 64)}.")
    if not 0.0 <= yaw_range_deg <= 180.0:
        raise JobRunError(f"--yaw-range must be between 0 and 180 degrees, got {yaw_range_deg}.")
    if not -89.0 <= pitch_deg <= 89.0:
        raise JobRunError(f"--pitch must be between -89 and 89 degrees, got {pitch_deg}.")
    if steps is not None and not 1 <= steps <= 1000:
        raise JobRunError(f"--steps must be between 1 and 1000, got {steps}.")
    if reference is not None:
        ref = Path(reference).expanduser().resolve()
        try:
            preflight.check_image(ref, "reference portrait")
        except preflight.PreflightError as exc:
            raise JobRunError(str(exc)) from None
        settings.reference_image = str(ref)
    elif generate and not settings.reference_image:
        raise JobRunError("No reference portrait: pass --reference face.png.")
    if conditions.lower() == "procedural":
        settings.condition_source = 'PROCEDURAL'
    else:
        folder = Path(conditions).expanduser().resolve()
        if not folder.is_dir():
            raise JobRunError(f"--conditions {failures.clip(folder)} is not a folder of condition images. Pass "
                              "'procedural' or an existing folder with one image per frame.")
        settings.condition_source = 'IMAGE_FOLDER'
        settings.condition_folder = str(folder) + os.sep
    if steps is not None:
        settings.steps = steps
    if seed is not None:
        settings.seed = seed
    if device is not None:
        if device.upper() not in {item[0] for item in DEVICES}:
            raise JobRunError(f"--device must be auto, cuda, mps or cpu, got {device!r}.")
        settings.device = device.upper()
    if memory is not None:
        if memory.upper() not in {item[0] for item in MEMORY_MODES}:
            raise JobRunError(f"--memory must be normal, low or lowest, got {memory!r}.")
        settings.memory = memory.upper()
    if compile is not None:
        settings.use_compile = compile
    if proxy_views is not None:
        settings.use_proxy_views = proxy_views
    if prepare is not None:
        settings.use_reference_prep = prepare
    settings.import_as = set(import_as)
    if generate:  # the worker Python is checked before anything is built, rendered or written
        try:
            probe_worker_python(worker_python_setting(context, worker_python))
        except WorkerStartError as exc:
            raise JobRunError(str(exc)) from None
    if from_photo_view and not settings.use_reference_prep:
        raise JobRunError("--from-photo-view needs the prepared reference: drop --no-prepare.")
    prep = None
    if from_photo_view and settings.reference_image:  # else Generate prepares it, after its cheaper checks
        log("preparing the reference (face, crop, photo camera)...")
        try:
            prep = reference_prep.ensure(context, worker_python_setting(context, worker_python))
        except reference_prep.ReferencePrepError as exc:
            raise JobRunError(f"{exc} (Or pass --no-prepare to use the photo's centre square as it is.)") from None
    try:
        out = preflight.probe_output_folder(Path(out_dir).expanduser())  # absolute, links not followed
        settings.output_folder = str(out) + os.sep
        settings.output_size = size
        settings.turntable_frames = frames
        settings.turntable_yaw_range = math.radians(yaw_range_deg)
        settings.turntable_pitch = math.radians(pitch_deg)
        settings.use_scene_range = True
        anchor = settings.head_anchor or rig.add_head_anchor(context, location=(0.0, 0.0, 0.0))
        start_yaw, pitch = None, settings.turntable_pitch
        if from_photo_view and prep is not None:
            start_yaw = math.radians(prep.yaw)
            pitch = max(-math.radians(89.0), min(math.radians(89.0), math.radians(prep.pitch)))
        camera = rig.build_turntable(scene, anchor, frames=frames, yaw_range=settings.turntable_yaw_range,
                                     pitch=pitch, size_px=size, start_yaw=start_yaw)
        poses = scene_poses(scene, camera, anchor, range(scene.frame_start, scene.frame_end + 1))
        # with generate, prepare_job writes dataset.json once every check has passed
        dataset = out / DATASET_FILE if generate else write_dataset(out, poses)
    except (PoseError, preflight.PreflightError) as exc:
        raise JobRunError(str(exc)) from None
    warnings = [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
    result = JobResult(out, dataset, out / BLEND_FILE, poses, warnings)
    result.reference_prep = None if prep is None else prep.job_prep()
    if generate:
        log("checking the job, then rendering the condition images and writing the job...")
        run = start_generation(context, worker_python=worker_python, model=model)
        result.job_dir, result.notes = run.prepared.job_dir, list(run.prepared.notes)
        result.warnings = list(run.prepared.warnings)
        result.reference_prep = run.prepared.job.reference_prep or result.reference_prep
        log(f"worker started: {run.worker.python} -m dp3d_core.worker {run.prepared.job_dir}")
        status = wait(run, context, on_update=_print_progress(log))
        result.status = status
        if status.state != "done":
            detail = f" Hint: {status.hint}." if status.hint else ""
            tail = ("\nWorker log:\n  " + "\n  ".join(status.log_tail)) if status.log_tail else ""
            raise JobRunError(f"Generation {status.state}: {status.message}.{detail}{tail}")
        if run.import_error:
            raise JobRunError(run.import_error)
        result.warnings += status.warnings
        result.frames = run.prepared.frame_paths
        if previews:
            try:
                result.gif, result.contact_sheet = make_previews(run.worker.python, result.frames, out)
            except PreviewError as exc:
                result.warnings.append(str(exc))
            try:
                result.movie = make_movie(result.frames, out)
            except PreviewError as exc:
                result.warnings.append(str(exc))
    result.blend = _save_blend(out)
    return result


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blender -c portrait3d",
        description="Turn one portrait into a camera turntable: build a head anchor and turntable camera, "
                    "render condition images, run the DiffPortrait3D worker, import the frames, and write "
                    "dataset.json, the frames, preview.gif, preview.mp4, contact_sheet.png and scene.blend into --out.")
    parser.add_argument("--reference", help="reference portrait image")
    parser.add_argument("--frames", type=int, default=16, help="number of turntable frames (default 16)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="model folder (default: the scene's, then the add-on preferences')")
    parser.add_argument("--worker-python", help="python with torch + diffusers (default: the add-on preference "
                                                "or PORTRAIT3D_WORKER_PYTHON)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50)")
    parser.add_argument("--seed", type=int, help="noise seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="output size in pixels, a multiple of 64 (default 512)")
    parser.add_argument("--conditions", default="procedural",
                        help="'procedural' (render a proxy head) or a folder of condition images (name order)")
    parser.add_argument("--device", help="auto, cuda, mps or cpu (default auto)")
    parser.add_argument("--memory", help="GPU memory: normal, low (~7.5 GiB at 512 px) or lowest (~4.6 GiB, slower)")
    parser.add_argument("--proxy-views", action="store_true", default=None,
                        help="3D-aware noise: start from the portrait projected onto the proxy head (procedural "
                             "conditions only)")
    parser.add_argument("--no-prepare", dest="prepare", action="store_false", default=True,
                        help="use the reference's centre square as it is, seen from the front (default: find the "
                             "face, crop it like the training data and estimate the photo's camera)")
    parser.add_argument("--from-photo-view", action="store_true",
                        help="start the turntable at the photo's own view (its found yaw and pitch; --pitch is "
                             "ignored)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the networks (minutes at the first step, faster after)")
    parser.add_argument("--yaw-range", type=float, default=45.0, help="sweep -DEG..+DEG (default 45)")
    parser.add_argument("--pitch", type=float, default=0.0, help="camera elevation in degrees (default 0)")
    parser.add_argument("--poses-only", action="store_true",
                        help="only build the rig and write dataset.json + scene.blend (no worker)")
    return parser


def cli_main(argv: list[str]) -> int:
    """Entry point of ``blender -c portrait3d ...``; returns the exit code."""
    parser = cli_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage/error
        return int(exc.code or 0)
    try:
        result = run_turntable_job(args.out, frames=args.frames, reference=args.reference,
                                   yaw_range_deg=args.yaw_range, pitch_deg=args.pitch, size=args.size,
                                   model=args.model, worker_python=args.worker_python, steps=args.steps,
                                   seed=args.seed, conditions=args.conditions, device=args.device,
                                   memory=args.memory, compile=args.compile, proxy_views=args.proxy_views,
                                   prepare=args.prepare, from_photo_view=args.from_photo_view,
                                   generate=not args.poses_only, log=lambda m: print(f"portrait3d: {m}", flush=True))
    except JobRunError as exc:
        print(f"portrait3d: error: {exc}")
        return 1
    prep = result.reference_prep
    if prep is not None:
        crop = ", ".join(f"{v:.0f}" for v in prep.crop)
        print(f"portrait3d: reference pose: yaw {prep.yaw:+.1f}, pitch {prep.pitch:+.1f}, roll {prep.roll:+.1f} "
              f"degrees; crop [{crop}]")
    for note in result.notes:
        print(f"portrait3d: note: {note}")
    for w in result.warnings:
        print(f"portrait3d: warning: {w}")
    for path in result.files():
        print(path)
    return 0
