"""Running generation: one worker at a time, its progress on the window manager, the full CLI job.

``begin_generation`` checks the job and returns a run the UI advances from a timer: each
``GenerationRun.update`` is one small preparation step (job_writer.JobPreparation: poses, conditions rendered by
a background Blender or a few at a time here), then starts the worker and polls it, showing its live previews.
``start_generation`` does the preparation in a row and starts the worker (background mode, CLI, scripts);
``wait`` blocks until the run ends.
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
from bpy.app.handlers import persistent

from . import back_view, frame_import, job_writer, preferences, reference_prep, rig
from .core import face_pose, failures, job as jobspec, preflight
from .poses import DATASET_FILE, FramePose, PoseError, scene_poses, write_dataset
from .preview_display import PreviewDisplay, preview_files
from .previews import PreviewError, make_contact_sheet, make_movie, make_previews
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
    """"3/48 frames | step 12/50 | ETA 1m 05s" ("" before the frame count is known)."""
    if status.stage == "back":
        eta = f" | ETA {format_eta(status.eta_seconds)}" if status.state == "running" else ""
        return f"back view | step {status.step}/{status.total_steps}{eta}"
    if not status.frames_total:
        return ""
    text = f"{status.frames_done}/{status.frames_total} frames"
    if status.state == "running" and status.total_steps:
        text += f" | step {status.step}/{status.total_steps} | ETA {format_eta(status.eta_seconds)}"
    return text


PREPARE_INTERVAL = 0.01  # seconds between preparation steps in the UI (each step is one small batch)
WAIT_INTERVAL = 0.1      # ... while the preparation only waits for another process (a background Blender)
WORKER_INTERVAL = 0.25   # seconds between polls of the worker


def status_line(status: WorkerStatus) -> str:
    """The message with the frame/step counts after it when there are any."""
    counts = progress_text(status)
    return f"{status.message} ({counts})" if counts else status.message


NextStage = Callable[[bpy.types.Context, str], job_writer.JobPreparation]


class GenerationRun:
    """A job being prepared in small steps (``preparation``), then its worker process (``worker``).

    ``then``: a second stage. A DiffPortrait360 job whose 3D-aware proxies need a back view nobody made yet runs
    the worker's back stage first (a back-only job); when it is done, ``then(context, back view PNG)`` gives the
    preparation of the real job, which this run goes on with (same progress, same Cancel)."""

    def __init__(self, scene: bpy.types.Scene, python: str, *,
                 preparation: job_writer.JobPreparation | None = None,
                 prepared: job_writer.PreparedJob | None = None, then: NextStage | None = None) -> None:
        self.preparation = preparation
        self.prepared = prepared
        self._then = then
        self.back_stage: WorkerProcess | None = None  # the finished back-only worker of a two-stage run
        self._back_shown: tuple[str, WorkerProcess] | None = None
        self.python = python
        self.worker: WorkerProcess | None = None
        self.scene_name = scene.name
        self.camera_name = (active_camera(scene).name if active_camera(scene) else "")
        self.imported: dict[str, object] = {}
        self.import_error = ""
        self.preview = PreviewDisplay()
        self._own_status = WorkerStatus(message="Preparing the job...")
        self._closed = False

    @property
    def status(self) -> WorkerStatus:
        return self.worker.status if self.worker is not None else self._own_status

    @property
    def preparing(self) -> bool:
        return self.worker is None and not self._closed

    @property
    def finished(self) -> bool:
        return self._closed

    @property
    def poll_interval(self) -> float:
        """Seconds until the next :meth:`update` should run."""
        if self.preparing:
            return WAIT_INTERVAL if self.preparation.waiting else PREPARE_INTERVAL
        return WORKER_INTERVAL

    def cancel(self) -> None:
        """While preparing: stop now (scene as it was, job folder untouched, no worker). Then: ask the worker to
        stop after its current step."""
        if self.preparing:
            self.preparation.cancel()
            self._end_preparation("cancelled", "Cancelled while preparing the job; no worker was started and the "
                                               "scene is as it was")
        elif self.worker is not None:
            self.worker.cancel()
        self._write_progress(bpy.context)

    def stop(self) -> None:
        """Stop at once (add-on unregistered, Blender quitting, file reloaded)."""
        if self.preparing:
            self.preparation.cancel()
            self._end_preparation("cancelled", "Stopped while preparing the job")
        elif self.worker is not None:
            self.worker.kill()

    def update(self, context: bpy.types.Context | None = None) -> bool:
        """One small step (main thread): a preparation batch, or a poll of the worker that settles and imports
        when it ended. True once finished."""
        if self._closed:
            return True
        context = context or bpy.context
        if self.preparing:
            self._prepare_step(context)
        else:
            self.worker.poll()
            self._show_back_view()
            self._show_preview(context)
            if self.worker.status.finished:
                if self._then is not None and self.worker.status.state == "done":
                    self._next_stage(context)
                else:
                    self._finish(context)
        self._write_progress(context)
        return self._closed

    # ------------------------------------------------------------ preparation

    def _prepare_step(self, context: bpy.types.Context) -> None:
        prep = self.preparation
        try:
            if not prep.step():
                s = self._own_status
                s.message = prep.progress.text
                return
            self.prepared = prep.result
            self.worker = WorkerProcess(self.prepared.job_dir, self.python, back_only=self.prepared.back_only)
        except (job_writer.JobSetupError, WorkerStartError) as exc:
            self._end_preparation("failed", str(exc))
        except OSError as exc:  # e.g. the disk filled up while the conditions were rendered
            failure = failures.report(exc, [prep.job_dir], name="generate.log")
            self._end_preparation("failed", failure.message, failure.hint_with_log)
        except Exception as exc:  # a bug or a Blender error: the traceback goes to a log file, not to the user
            log = _log_exception(prep.job_dir)
            self._end_preparation("failed", f"Preparing the job failed: {exc}",
                                  f"the details are in {log}" if log else "")

    def _end_preparation(self, state: str, message: str, hint: str = "") -> None:
        global _active
        s = self._own_status
        s.state, s.message, s.hint = state, message, hint
        self._closed = True
        if _active is self:
            _active = None

    def _next_stage(self, context: bpy.types.Context) -> None:
        """The back stage is done: prepare the real job, projecting the back view it made."""
        then, self._then = self._then, None
        back = self.worker.status.back_view
        self.back_stage = self.worker
        self.worker = None
        self._own_status = WorkerStatus(message="Preparing the job...")
        if not back or not Path(back).is_file():
            self._end_preparation("failed", "The worker's back stage ended without a back view.",
                                  f"see the worker log in {self.prepared.job_dir}")
            return
        try:
            self.preparation = then(context, back)
        except job_writer.JobSetupError as exc:
            self._end_preparation("failed", str(exc))

    # ------------------------------------------------------------ the worker

    def _show_back_view(self) -> None:
        """A ``back_view`` event arrived: show that back view in the panel (DiffPortrait360)."""
        status = self.worker.status
        if not status.back_view or self._back_shown == (status.back_view, self.worker):
            return
        self._back_shown = (status.back_view, self.worker)
        scene = bpy.data.scenes.get(self.scene_name)
        if scene is None:
            return
        try:
            back_view.record_generated(scene.portrait3d, status.back_view, status.back_view_seed,
                                       self.prepared.back_key)
        except (RuntimeError, OSError, ReferenceError):  # showing it is a courtesy: never stop the run for it
            _log_exception(self.prepared.job_dir)

    def _show_preview(self, context: bpy.types.Context) -> None:
        status = self.worker.status
        if status.previews == self.preview.shown or status.finished:
            return
        scene = bpy.data.scenes.get(self.scene_name)
        if scene is None:
            return
        try:
            self.preview.update(scene, bpy.data.objects.get(self.camera_name), self.prepared, status, context)
        except (RuntimeError, OSError, ReferenceError):  # previews are a courtesy: never stop the run for one
            _log_exception(self.prepared.job_dir)

    def _write_progress(self, context: bpy.types.Context) -> None:
        p = progress_state(context)
        s = self.status
        p.running = not self._closed
        p.preparing = self.preparing
        p.resumed_step = -1 if s.resumed_step is None else s.resumed_step
        p.preview_step = -1 if s.preview_step is None else s.preview_step
        p.frames_done, p.frames_total = s.frames_done, s.frames_total
        p.step, p.total_steps = s.step, s.total_steps
        p.back_stage = s.stage == "back" and not self.preparing
        p.eta_seconds = s.eta_seconds
        if self.preparing:
            p.fraction = self.preparation.progress.fraction
            p.status = s.message
        else:
            p.fraction = s.fraction
            p.status = s.message if self._closed else status_line(s)
        p.output_folder = str(self.prepared.out_dir) if self.prepared else ""
        if self._closed:
            p.last_error = s.message if s.state == "failed" else self.import_error
            p.last_hint = s.hint if s.state == "failed" else ""
            p.last_log = "\n".join(s.log_tail) if s.state == "failed" else ""

    def _finish(self, context: bpy.types.Context) -> None:
        global _active
        self._closed = True
        if _active is self:
            _active = None
        if self.worker.status.state != "done" or self.prepared.back_only:
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


def _log_exception(job_dir: Path) -> Path | None:
    """Append the current exception's traceback to the job's ``addon_error.log``; its path (None if unwritable)."""
    import traceback

    return job_writer.append_log(job_dir, traceback.format_exc())


def worker_python_setting(context: bpy.types.Context, worker_python: str | os.PathLike | None) -> str:
    """``worker_python`` when given, else the add-on preference (or PORTRAIT3D_WORKER_PYTHON)."""
    return str(worker_python) if worker_python else preferences.worker_python(context)


def begin_generation(context: bpy.types.Context | None = None, *, worker_python: str | os.PathLike | None = None,
                     model: str | os.PathLike | None = None, preparation: dict | None = None,
                     back_only: bool = False) -> GenerationRun:
    """Check the job and return a run that prepares it step by step: each ``run.update()`` renders a small batch
    (UI timers), then starts the worker and polls it. JobRunError (plain words) for what the quick checks find.

    ``worker_python`` defaults to the add-on preference (or PORTRAIT3D_WORKER_PYTHON); ``preparation``: keyword
    arguments of :class:`job_writer.JobPreparation` (the step sizes). ``back_only`` (DiffPortrait360, *Generate
    Back View*): the worker makes only the back view, with the settings' Back View Seed. A DiffPortrait360 job
    with 3D-aware noise and no back view yet runs the back stage first (see :class:`GenerationRun`).
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
        options = dict(model=model, worker_python=python, **(preparation or {}))
        prep = job_writer.JobPreparation(context, back_only=back_only, **options)
        then = None
        if prep.needs_back_stage:
            prep = job_writer.JobPreparation(context, back_only=True, **options)
            then = _main_stage(context.scene.name, options)
    except (job_writer.JobSetupError, WorkerStartError) as exc:
        p.running, p.last_error, p.last_hint, p.last_log = False, str(exc), "", ""
        raise JobRunError(str(exc)) from None
    except OSError as exc:
        failure = failures.report(exc, [], name="generate.log")
        p.running, p.last_error, p.last_hint, p.last_log = False, failure.message, failure.hint_with_log, ""
        raise JobRunError(str(failure)) from None
    run = GenerationRun(context.scene, python, preparation=prep, then=then)
    _active = _last = run
    p.last_error = p.last_hint = p.last_log = ""
    run._write_progress(context)
    return run


def _main_stage(scene_name: str, options: dict) -> NextStage:
    """The second stage of a two-stage run: the real job, projecting the back view the first stage made."""
    def then(context: bpy.types.Context, back: str) -> job_writer.JobPreparation:
        scene = bpy.data.scenes.get(scene_name)
        if scene is None:
            raise job_writer.JobSetupError(f"The scene '{scene_name}' was deleted or renamed; press Generate again.")
        if context.scene == scene:
            return job_writer.JobPreparation(context, back_source=back, **options)
        with context.temp_override(scene=scene):
            return job_writer.JobPreparation(bpy.context, back_source=back, **options)
    return then


def start_generation(context: bpy.types.Context | None = None, *, worker_python: str | os.PathLike | None = None,
                     model: str | os.PathLike | None = None, back_only: bool = False) -> GenerationRun:
    """Check and write the job (blocking), start the worker; JobRunError (plain words) when that is impossible.

    The same steps as :func:`begin_generation`, run in a row: for background mode, the CLI and scripts.
    """
    context = context or bpy.context
    run = begin_generation(context, worker_python=worker_python, model=model, preparation=job_writer.BLOCKING,
                           back_only=back_only)
    while run.preparing:
        run.update(context)
    if run.worker is None:
        raise JobRunError(" ".join(x for x in (run.status.message, run.status.hint and f"Hint: {run.status.hint}.")
                                   if x))
    return run


def wait(run: GenerationRun, context: bpy.types.Context | None = None, *, timeout: float | None = None,
         on_update: Callable[[WorkerStatus], None] | None = None, interval: float = 0.05) -> WorkerStatus:
    """Block until ``run`` finished (or ``timeout``): its preparation steps, then the worker, updating the
    progress state; ``on_update(status)`` whenever the status changed. Returns the status."""
    import time

    context = context or bpy.context
    end = None if timeout is None else time.monotonic() + timeout
    seen = None
    while not run.update(context):
        news = (run.status.message, len(run.worker.events) if run.worker is not None else -1)
        if on_update is not None and news != seen:
            seen = news
            on_update(run.status)
        if end is not None and time.monotonic() > end:
            break
        if not run.preparing:
            time.sleep(interval)
    if on_update is not None:
        on_update(run.status)
    return run.status


@persistent
def _on_load_pre(*_args) -> None:
    """Another file is being loaded: the timer driving the run ends with this file, so end the run too. A
    preparation stops (nothing of it stays); a worker is asked to stop after its step (its checkpoint stays, and
    Generate again in the reloaded file continues from it)."""
    global _active
    run = _active
    if run is None:
        return
    if run.preparing:
        run.stop()
    elif run.worker is not None:
        run.worker.cancel()
    _active = None


def register() -> None:
    if _on_load_pre not in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    stop_all()


def stop_all() -> None:
    """Kill a running worker (add-on unregistered, Blender quitting)."""
    global _active
    if _active is not None:
        _active.stop()
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
    back_view: Path | None = None  # DiffPortrait360: the back view the job used (generated or the artist's photo)
    closed_loop: bool = False      # the frames were generated as one closed loop (a full turn)

    def files(self) -> list[Path]:
        extra = [p for p in (self.gif, self.contact_sheet, self.movie) if p is not None]
        return [self.dataset, *self.frames, *extra, *([self.back_view] if self.back_view else []), self.blend]


def progress_printer(log: Callable[[str], None], run: GenerationRun | None = None,
                     preview_sheet: Path | None = None) -> Callable[[WorkerStatus], None]:
    """Headless progress for :func:`wait`: each new status line, a line per ``resumed`` and ``preview`` event of
    ``run``'s worker (several can arrive between two polls), and with ``preview_sheet`` a contact sheet of the
    latest previews written there."""
    seen = {"text": "", "events": 0, "worker": None}

    def on_update(status: WorkerStatus) -> None:
        events = []
        if run is not None and run.worker is not None:
            if run.worker is not seen["worker"]:  # a two-stage run's second worker
                seen["worker"], seen["events"] = run.worker, 0
            events = run.worker.events[seen["events"]:]
            seen["events"] = len(run.worker.events)
        previews = [ev for ev in events if ev.kind == "preview"]
        for ev in events:
            if ev.kind == "resumed":
                log(f"resumed from step {ev['step']}/{ev['total_steps']} (a saved denoising state)")
            elif ev.kind == "back_view":
                log(f"back view (seed {ev['seed']}): {ev['path']}")
            elif ev.kind == "preview":
                line = f"preview of step {ev['step']}/{ev['total_steps']} in {ev['folder']}"
                if preview_sheet is not None and ev is previews[-1]:
                    files = [f for f in preview_files(run.prepared, ev["folder"]) if f.is_file()]
                    try:
                        make_contact_sheet(run.python, files, preview_sheet)
                        line += f"; contact sheet {preview_sheet}"
                    except PreviewError as exc:
                        line += f"; no contact sheet: {exc}"
                log(line)
        text = status_line(status)
        if text != seen["text"]:
            seen["text"] = text
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
                      yaw_range_deg: float = 45.0, pitch_deg: float = 0.0, size: int | None = None,
                      model: str | os.PathLike | None = None, worker_python: str | os.PathLike | None = None,
                      steps: int | None = None, seed: int | None = None, conditions: str = "procedural",
                      device: str | None = None, memory: str | None = None, compile: bool | None = None,
                      proxy_views: bool | None = None, prepare: bool | None = None,
                      from_photo_view: bool = False, photo_pose: tuple[float, float] | None = None,
                      generate: bool = True, previews: bool = True,
                      preview_sheet: str | os.PathLike | None = None,
                      import_as: tuple[str, ...] = ("CARD",), log: Callable[[str], None] | None = None,
                      full_turn: bool | None = None, back_image: str | os.PathLike | None = None,
                      back_seed: int | None = None, context: bpy.types.Context | None = None) -> JobResult:
    """Anchor (reused) + turntable + poses; with ``generate``: conditions, worker, import, GIF, sheet.

    ``size``: the frames' side in pixels; None: the resolution the model was trained at.
    DiffPortrait360 models: ``full_turn`` (default on for them) makes the turntable one closed loop around the
    head; ``back_image`` is the artist's own back photo (else the worker generates the back view with
    ``back_seed``, default 0).
    Writes ``dataset.json`` and ``scene.blend`` into ``out_dir`` (with ``generate``, only once every pre-work
    check has passed: a job that fails them writes nothing there). Blocks until the worker ends.
    ``preview_sheet``: a PNG path refreshed with a contact sheet of the worker's latest previews.
    ``photo_pose``: (subject yaw, camera pitch) in degrees, set by hand instead of the pose found in the photo.
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
    if size is None:
        settings.size_mode = 'MODEL'
        size = job_writer.output_size(context, model)
    else:
        settings.size_mode = 'CUSTOM'
    if not 16 <= size <= 2048:
        raise JobRunError(f"--size must be between 16 and 2048 pixels, got {size}.")
    if generate and size % 64 and settings.size_mode != 'CUSTOM':
        raise JobRunError(f"The model's resolution ({size} px) is not a multiple of 64, which generation needs: "
                          f"pass --size {max(64, round(size / 64) * 64)}.")
    if generate and size % 64:
        raise JobRunError(f"--size must be a multiple of 64 to generate, got {size}; try {max(64, round(size / 64) * 64)}.")
    if not 0.0 <= yaw_range_deg <= 180.0:
        raise JobRunError(f"--yaw-range must be between 0 and 180 degrees, got {yaw_range_deg}.")
    if not -89.0 <= pitch_deg <= 89.0:
        raise JobRunError(f"--pitch must be between -89 and 89 degrees, got {pitch_deg}.")
    if steps is not None and not 1 <= steps <= 1000:
        raise JobRunError(f"--steps must be between 1 and 1000, got {steps}.")
    if back_seed is not None and not 0 <= back_seed < 2 ** 31:
        raise JobRunError(f"--back-seed must be between 0 and {2 ** 31 - 1}, got {back_seed}.")
    from .model_family import scene_family
    family = scene_family(context, model)  # None: no usable model (--poses-only, or Generate says what is missing)
    all_around = family is not None and family.is_360
    if not all_around and (full_turn or back_image is not None or back_seed is not None):
        flag = "--full-turn" if full_turn else ("--back-image" if back_image is not None else "--back-seed")
        raise JobRunError(f"{flag} needs a DiffPortrait360 model (a model folder whose model_index.json says "
                          "\"family\": \"DiffPortrait360\"); pass one with --model.")
    full_turn = all_around if full_turn is None else full_turn
    if back_image is not None:
        try:
            back_view.use_photo(settings, Path(back_image).expanduser().resolve())
        except back_view.BackViewError as exc:
            raise JobRunError(f"--back-image: {exc}") from None
    if back_seed is not None:
        settings.back_seed = back_seed
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
    if photo_pose is not None:
        if not settings.use_reference_prep:
            raise JobRunError("--photo-pose sets the prepared reference's pose: drop --no-prepare.")
        yaw, pitch = (float(v) for v in photo_pose)
        if not (abs(yaw) <= face_pose.SET_YAW_LIMIT and abs(pitch) <= face_pose.SET_PITCH_LIMIT):
            raise JobRunError(f"--photo-pose takes a yaw within ±{face_pose.SET_YAW_LIMIT:.0f} and a pitch within "
                              f"±{face_pose.SET_PITCH_LIMIT:.0f} degrees, got {yaw} {pitch}.")
        settings.prep_set_pose = True
        settings.prep_yaw, settings.prep_pitch = math.radians(yaw), math.radians(pitch)
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
        if settings.size_mode == 'CUSTOM':
            settings.output_size = size  # (a size of 16-63 px stays the camera's only: --poses-only)
        settings.turntable_frames = frames
        settings.turntable_yaw_range = math.radians(yaw_range_deg)
        settings.turntable_pitch = math.radians(pitch_deg)
        settings.use_scene_range = True
        anchor = settings.head_anchor or rig.add_head_anchor(context, location=(0.0, 0.0, 0.0))
        start_yaw, pitch = None, settings.turntable_pitch
        if from_photo_view and prep is not None:
            start_yaw = math.radians(prep.camera_yaw())
            pitch = max(-math.radians(89.0), min(math.radians(89.0), math.radians(prep.pitch)))
        settings.turntable_full_turn = full_turn
        camera = rig.build_turntable(scene, anchor, frames=frames, yaw_range=settings.turntable_yaw_range,
                                     pitch=pitch, size_px=size, start_yaw=start_yaw, full_turn=full_turn)
        poses = scene_poses(scene, camera, anchor, range(scene.frame_start, scene.frame_end + 1),
                            all_around=all_around)
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
        sheet = Path(preview_sheet).expanduser().resolve() if preview_sheet else None
        status = wait(run, context, on_update=progress_printer(log, run, sheet))
        result.status = status
        if status.state != "done":
            detail = f" Hint: {status.hint}." if status.hint else ""
            tail = ("\nWorker log:\n  " + "\n  ".join(status.log_tail)) if status.log_tail else ""
            raise JobRunError(f"Generation {status.state}: {status.message}.{detail}{tail}")
        if run.import_error:
            raise JobRunError(run.import_error)
        result.warnings += status.warnings
        result.frames = run.prepared.frame_paths
        back = run.prepared.job.back
        if back is not None:
            image = back.image or status.back_view or (run.back_stage.status.back_view if run.back_stage else "")
            result.back_view = Path(image if Path(image).is_absolute() else run.prepared.job_dir / image) \
                if image else None
        result.closed_loop = bool(getattr(run.prepared.job.settings, "closed_loop", False))
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
    parser.add_argument("--size", type=int, help="output size in pixels, a multiple of 64 (default: the size the "
                                                 "model was trained at, e.g. 64 for the bundled small model)")
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
    parser.add_argument("--photo-pose", type=float, nargs=2, metavar=("YAW", "PITCH"),
                        help="set the photo's pose by hand instead of the found one: the subject's yaw (> 0 turned "
                             "to its own left) and the camera's pitch (> 0 taken from above), in degrees")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the networks (minutes at the first step, faster after)")
    parser.add_argument("--yaw-range", type=float, default=45.0, help="sweep -DEG..+DEG (default 45)")
    parser.add_argument("--pitch", type=float, default=0.0, help="camera elevation in degrees (default 0)")
    parser.add_argument("--preview-sheet", metavar="PNG",
                        help="while denoising, keep this PNG updated with a contact sheet of the latest previews")
    parser.add_argument("--poses-only", action="store_true",
                        help="only build the rig and write dataset.json + scene.blend (no worker)")
    turn = parser.add_mutually_exclusive_group()
    turn.add_argument("--full-turn", dest="full_turn", action="store_true", default=None,
                      help="DiffPortrait360 models: one closed loop around the head, frame i at 360*i/frames degrees "
                           "(the default for them; --yaw-range is not used)")
    turn.add_argument("--no-full-turn", dest="full_turn", action="store_false",
                      help="DiffPortrait360 models: sweep -yaw-range..+yaw-range instead of a full turn")
    parser.add_argument("--back-image", metavar="PATH",
                        help="DiffPortrait360 models: your own photo of the back of the head, used as the back "
                             "view (default: the model's back-head network generates it)")
    parser.add_argument("--back-seed", type=int,
                        help="DiffPortrait360 models: seed of the generated back view (default 0)")
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
                                   photo_pose=args.photo_pose,
                                   generate=not args.poses_only, preview_sheet=args.preview_sheet,
                                   full_turn=args.full_turn, back_image=args.back_image, back_seed=args.back_seed,
                                   log=lambda m: print(f"portrait3d: {m}", flush=True))
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
