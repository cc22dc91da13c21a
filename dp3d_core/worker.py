"""The worker process: ``python -m dp3d_core.worker <job dir> [--back-only]``.

Reads ``job.json``, renders the frames with the pipeline of the model folder's family
(:class:`~dp3d_core.pipeline.DiffPortrait3DPipeline`, or
:class:`~dp3d_core.pipeline360.DiffPortrait360Pipeline`) and reports on stdout with the line
protocol of :mod:`dp3d_core.protocol`. A DiffPortrait360 job runs in two stages: (a) the back
stage, only when ``back.image`` is null: the back-head model (``<model>/back_head/``) makes the
back view at seed ``back.seed`` and writes ``<job dir>/back/back_seed<seed>.png`` (``back_view``
event); a PNG an earlier run made from the same inputs is reused (dp3d_core.back_view); (b) the
view stage, with that PNG (or ``back.image``) read back as 8-bit like the official scripts, so a
back view generated alone (``--back-only``: stage (a) only, then ``done`` with frames_written 0)
and accepted gives the same frames as a run that generates it. The back stage has no checkpoint
(one view: a cancel or kill redoes it); everything below applies to the view stage. stdout carries
protocol lines only: the original stdout file descriptor is kept for them and everything
else (Python prints, native library output) is redirected to stderr.

Exit codes: 0 done, 1 error (one ``error`` event with a hint), 3 cancelled (``done`` with
``cancelled: true``). Because the windows of a sequence are blended at every denoising step (one
joint trajectory), all frames become final together at the last step; they are then decoded and
written one by one (each atomically, each followed by its ``frame`` event).

What survives an interruption: the denoising state is checkpointed under ``<job dir>/state/``
(dp3d_core.denoise_state; every few steps or seconds, within 2 % of the run time, and always after
the last step), and a cancel saves the last completed step. A rerun of the same job hash continues
from the newest valid checkpoint (``resumed`` event) with the same result as an uninterrupted run,
and skips frames already written; a kill loses at most the steps since the last checkpoint. The
checkpoint is deleted once every frame is written. Every few seconds the worker also writes a
preview of every view to ``<job dir>/preview/`` (dp3d_core.live_preview; ``preview`` event). All
files are written atomically, so a kill never leaves a partial frame, manifest, checkpoint or preview.
The cancel file is checked after every window evaluation, i.e. several times per denoising step, and
once more before the model loads. The worker removes the cancel file it honoured; a cancel file older than
the worker's start (left by a run that was killed) is removed with a warning and not honoured.

Before the model loads (before torch is even imported) the worker runs the shared pre-work checks
of :mod:`dp3d_core.preflight`: output folder writable, frame names legal, window = the model's clip
length, pickle-free weights, free disk, memory estimate. Any failure becomes one ``error`` event in
plain words (:mod:`dp3d_core.failures`); the raw text and traceback go to ``<job dir>/worker.log``
(or the log folder of :func:`dp3d_core.failures.log_dir`), whose path the hint names.

CPU threads: OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the environment
says otherwise, so spinning threads do not fight the other programs of a busy machine for its cores
(docs/PERFORMANCE.md, "CPU worker under load", measures old against new).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from . import back_view, denoise_state, failures, preflight, protocol
try:
    from .images import ImageError, encode_png, load_rgb
except ModuleNotFoundError as _exc:  # no Pillow or numpy in this Python: main() says so in one error event
    _MISSING_PACKAGE: ModuleNotFoundError | None = _exc
    ImageError = ValueError  # never raised then; keeps run()'s except clauses valid
else:
    _MISSING_PACKAGE = None
from .families import DIFFPORTRAIT360
from .job import Job, JobError, job_hash, read_job
from .protocol import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, encode_event


_IMPORTED_AT = time.time()  # as close to the process start as this module gets (see drop_stale_cancel)
LOG_FILE = "worker.log"
BACK_ONLY_FLAG = "--back-only"
# A cancel file this much older than the worker's start still counts (coarse file-system clocks, and a cancel
# pressed while the worker process was starting).
CANCEL_CLOCK_SLACK_S = 2.0


class WorkerError(RuntimeError):
    """A failure with a plain message and a hint for the user."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class Emitter:
    """Writes protocol lines to the protocol stream, flushing each."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, kind: str, **fields: Any) -> None:
        self.stream.write(encode_event(kind, **fields) + "\n")
        self.stream.flush()


def protocol_stream() -> TextIO:
    """Keep the real stdout for protocol lines; send everything else written to stdout to stderr."""
    sys.stdout.flush()
    try:
        fd = os.dup(1)
        os.dup2(2, 1)
        stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    except OSError:  # no real file descriptors (embedded interpreter): fall back to Python level only
        stream = sys.stdout
    sys.stdout = sys.stderr
    return stream


# ---------------------------------------------------------------- device and model

def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkerError("the job asks for device 'cuda' but this Python's torch sees no CUDA GPU",
                          "set the device to 'auto' or 'cpu', or install the CUDA build of torch")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise WorkerError("the job asks for device 'mps' but Apple Metal is not available",
                          "set the device to 'auto' or 'cpu'")
    return torch.device(name)


def pick_dtype(name: str, device: Any, warn: Callable[[str], None]) -> Any:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name == "fp16" and device.type == "cpu":
        warn("fp16 is not supported on the CPU; using fp32")
        return torch.float32
    return table[name]


def load_pipeline(folder: str | os.PathLike, device: Any, dtype: Any) -> Any:
    """The pipeline of a model folder's family (DiffPortrait3D, or DiffPortrait360's view model or back-head
    model), on ``device`` in ``dtype``. DiffPortrait360's view model is loaded without its back-head model: the
    worker runs the back stage itself (:func:`back_stage`)."""
    from . import model_folder
    from .families import BACK_HEAD, DIFFPORTRAIT360

    path = Path(folder)  # checked by preflight_job before the work
    try:
        family = model_folder.model_family(path)
        if family.name != DIFFPORTRAIT360:
            from .pipeline import DiffPortrait3DPipeline as Pipeline
        elif family.variant == BACK_HEAD:
            from .pipeline360 import BackHeadPipeline as Pipeline
        else:
            from .pipeline360 import DiffPortrait360Pipeline as Pipeline
        pipe = Pipeline.from_pretrained(path, device=device, torch_dtype=dtype)
    except model_folder.ModelFolderError as exc:
        raise WorkerError(f"the model folder {path} cannot be used: {exc}",
                          "re-convert or re-download the model; the folder needs model_index.json, unet/, "
                          "reference_unet/, view_controlnet/, view_modules/ (not for a back-head model), vae/, "
                          "scheduler/ and prompt_embedding/") from None
    return pipe


def offloads(memory: str, device: Any) -> bool:
    """Whether the memory mode moves the networks to ``device`` only while they run (then they load on the CPU)."""
    return memory == "lowest" and device.type != "cpu"


def apply_speed_options(pipe: Any, memory: str, compile: bool, device: Any, warn: Callable[[str], None]) -> None:
    """The job's memory mode (dp3d_core.job.MEMORY_MODES) and compile switch; neither changes the picture."""
    if memory in ("low", "lowest"):
        pipe.set_fast_path(batch_passes=False)
        pipe.enable_attention_slicing()
        pipe.enable_vae_slicing()
    if offloads(memory, device):
        pipe.enable_model_cpu_offload(device=device)
    elif memory == "lowest":
        warn("memory 'lowest' moves the networks between the CPU and a GPU; on the CPU it is the same as 'low'")
    if compile:
        warn("compiling the networks (torch.compile): the first denoising step takes minutes, later ones are faster")
        pipe.enable_compile()


# ---------------------------------------------------------------- run

def _error_hint(exc: BaseException) -> tuple[str, str]:
    """Plain message and hint for an unexpected exception (the table is :func:`dp3d_core.failures.translate`)."""
    failure = failures.translate(exc)
    return failure.message, failure.hint


def configure_cpu_threads(env: dict | None = None) -> None:
    """OpenMP threads that wait passively; call before torch is imported (libgomp reads it once, at load).

    Spinning waiters (the default policy spins for a while at every barrier) burn the cores another busy
    program needs and are then descheduled in the middle of a parallel region, so every barrier waits for a
    time slice: a 2-core machine with one other busy process made a job 15x slower. Passive waiters yield the
    core (on the shared 2-core machine the same job ran about 7x faster next to busy programs; see
    docs/PERFORMANCE.md). A value already set by the user wins.
    """
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("KMP_BLOCKTIME", "0")  # Intel OpenMP (MKL builds of torch): the same, in its own words


def cpu_threads(env: dict | None = None) -> int:
    """Threads for the CPU work: OMP_NUM_THREADS when the user set it, else every CPU this process may run on
    (its affinity mask: a container or `taskset` limit counts, the machine's total does not)."""
    env = os.environ if env is None else env
    try:
        wanted = int(env.get("OMP_NUM_THREADS", "0").split(",")[0])
    except ValueError:
        wanted = 0
    if wanted > 0:
        return wanted
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def drop_stale_cancel(job_dir: Path, started_wall: float, warn: Callable[[str], None]) -> None:
    """Remove a cancel file written before this worker started (a killed run's leftover), with a warning.

    The add-on removes the cancel file before it starts a worker, so one older than this process came from a
    run that never honoured it (killed, crashed). CANCEL_CLOCK_SLACK_S keeps a cancel pressed while Python was
    starting.
    """
    path = Path(job_dir) / protocol.CANCEL_FILE
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return
    if mtime < started_wall - CANCEL_CLOCK_SLACK_S:
        protocol.clear_cancel(job_dir)
        warn("ignored a cancel request left over from an earlier run of this job (it is older than this run)")


def back_plan(job: Job) -> str | None:
    """How ``job`` gets its back view, in dp3d_core.preflight's words (Plan.back)."""
    if job.back is None:
        return None
    return preflight.BACK_GENERATE if job.back.image is None else preflight.BACK_IMAGE


def preflight_job(job: Job, names: list[str], warn: Callable[[str], None]) -> preflight.ModelInfo:
    """The shared pre-work checks (dp3d_core.preflight) for a resolved job; PreflightError on failure. Returns
    what the model folder's configs say."""
    frames = job.frames
    plan = preflight.Plan(output=Path(job.output), frame_names=names, size=job.settings.size, model=Path(job.model),
                          window=job.settings.window, dtype=job.dtype, memory=job.memory,
                          proxies=any(f.proxy for f in frames), back=back_plan(job),
                          references=len(job.references))
    for message in preflight.check_plan(plan):
        warn(message)
    return preflight.read_model_info(job.model)


def warn_memory(job: Job, device: Any, warn: Callable[[str], None]) -> None:
    """The memory estimate against the free RAM (CPU) or the chosen GPU's free memory (CUDA/ROCm; MPS does not
    report it), as a warning before the model loads."""
    if device.type == "cpu":
        free, where = preflight.available_ram(), "cpu"
    elif device.type == "cuda":
        import torch

        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return
        where = "gpu"
    else:
        return
    info = preflight.read_model_info(job.model)
    for message in preflight.memory_warning(info, job.settings.size, len(job.frames), where, free, job.dtype,
                                            job.memory, any(f.proxy for f in job.frames)):
        warn(message)


class StateKeeper:
    """Denoising checkpoints and live previews of one run (see dp3d_core.denoise_state, dp3d_core.live_preview).

    ``resume`` is the valid saved state of this job, if any (the ``resumed`` event is sent for it; an invalid one
    is reported as a ``warning`` and ignored). :meth:`on_step` is the pipeline's ``callback_on_step_end``.
    """

    def __init__(self, job_dir: Path, digest: str, pipe: Any, job: Job, names: list[str], emit: Emitter) -> None:
        from . import live_preview  # numpy and Pillow: imported once they are known to be there

        s = job.settings
        self.emit = emit
        sched = pipe.scheduler_for(s.steps, s.scheduler)
        lat = s.size // pipe.vae_scale_factor
        expect = {"total_steps": len(sched.timesteps), "scheduler_class": type(sched).__name__,
                  "latent_shape": [len(names), pipe.unet.config.in_channels, lat, lat]}
        self.checkpoints = denoise_state.Checkpoints(job_dir, digest, expect)
        self.resume = self.checkpoints.load(lambda m: emit("warning", message=m))
        self.saved_step = self.resume.step if self.resume is not None else 0
        self.policy = denoise_state.CheckpointPolicy.from_env()
        self.policy.start(self.saved_step, time.monotonic())
        self.live_preview = live_preview
        self.preview_args = (job_dir, names, live_preview.preview_size(s.size, lat))
        self.preview: Any = None  # a live_preview.LivePreview from the first step on
        self.warned: set[str] = set()
        # a fresh run drops the previews of an earlier job; a resumed one keeps its own
        live_preview.reset_folder(job_dir, keep_previews=self.resume is not None)
        if self.resume is not None:
            emit("resumed", step=self.resume.step, total_steps=self.resume.total_steps)

    def on_step(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> None:
        state = kwargs.get("state")
        if state is None:
            self.warn_once("scheduler", "this scheduler's state cannot be saved, so this run keeps no checkpoints: "
                                        "a cancel or crash restarts it from step 0")
            return None
        now = time.monotonic()
        if self.policy.due(state.step, state.total_steps, now):
            self.save(state)
        if self.preview is None:
            live_preview = self.live_preview
            job_dir, names, size = self.preview_args
            # one VAE decode of the reference latents per run: the map is fitted on the model's own decoder
            refs = state.reference_latents
            matrix = live_preview.fit_latent_to_rgb(refs, pipe.decode_latents(refs))
            self.preview = live_preview.LivePreview(job_dir, names, matrix, size,
                                                    live_preview.LivePreview.every_seconds_from_env())
        if self.preview.due(now):
            try:
                self.preview.write(kwargs["pred_x0"])
            except OSError as exc:
                self.preview.last_time = time.monotonic()
                self.warn_once("preview", f"could not write the live previews ({exc.strerror or exc}); the run "
                                          "goes on without them")
            else:
                self.emit("preview", step=state.step, total_steps=state.total_steps,
                          folder=str(self.preview.folder))
        return None

    def save(self, state: Any) -> None:
        """Checkpoint ``state``; a full or read-only disk costs resumability, never the run."""
        started = time.monotonic()
        try:
            cost = self.checkpoints.save(state)
        except OSError as exc:
            cost = time.monotonic() - started
            self.warn_once("checkpoint", f"could not save the denoising checkpoint in {self.checkpoints.folder} "
                                         f"({exc.strerror or exc}); the run goes on, but if it is interrupted "
                                         f"it restarts from step {self.saved_step}")
        else:
            self.saved_step = state.step
        self.policy.saved(state.step, time.monotonic(), cost)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.emit("warning", message=message)

    def keep(self, state: Any) -> None:
        """A cancelled run: save the state of its last completed step unless that is already on disk."""
        if state is not None and state.step > self.saved_step:
            self.save(state)

    def finished(self) -> None:
        """Every frame is written: the checkpoint is no longer needed."""
        try:
            self.checkpoints.remove()
        except OSError as exc:  # the frames are done; a leftover checkpoint is ignored or removed next time
            self.emit("warning", message=f"could not remove the finished job's checkpoint ({exc.strerror or exc})")


def decode_missing(pipe: Any, latents: Any, names: list[str], done: set[str]) -> Any:
    """``(index, image)`` of each view not yet in ``done``, decoded in the same fixed batches as a full decode (so a
    resumed run's frames are bit-identical to an uninterrupted one's); batches with nothing missing are skipped."""
    batch = max(1, int(pipe.vae_batch_size))
    for start in range(0, len(names), batch):
        todo = [i for i in range(start, min(start + batch, len(names))) if names[i] not in done]
        if todo:
            images = pipe.decode_latents(latents[start:start + batch])
            for i in todo:
                yield i, images[i - start]


def _done(emit: Emitter, started: float, frames_written: int = 0) -> int:
    emit("done", frames_written=frames_written, seconds=round(time.monotonic() - started, 3), cancelled=False)
    return EXIT_OK


def _cancelled(emit: Emitter, started: float) -> int:
    emit("done", frames_written=0, seconds=round(time.monotonic() - started, 3), cancelled=True)
    return EXIT_CANCELLED


def back_stage(job: Job, png: Path, key: str, reference: Any, condition: Any, device: Any, dtype: Any,
               warn: Callable[[str], None], progress: Callable[..., dict | None]) -> None:
    """DiffPortrait360's back view for a job whose ``back.image`` is null: the back-head model at seed
    ``back.seed``, written to ``png`` (8-bit, atomically) with its record ``key`` (dp3d_core.back_view).
    Raises :class:`~dp3d_core.pipeline.Cancelled` when ``progress`` asks for it."""
    import gc

    from . import back_view
    from .pipeline360 import BackHeadPipeline

    assert job.back is not None and job.back.image is None
    s = job.settings
    folder = Path(job.model) / preflight.BACK_HEAD_FOLDER
    pipe = load_pipeline(folder, torch_device_for(job.memory, device), dtype)
    if not isinstance(pipe, BackHeadPipeline):  # preflight checked it; the folder changed since
        raise WorkerError(f"{folder} does not hold DiffPortrait360's back-head model",
                          "convert back_head-230000.th into that folder again")
    apply_speed_options(pipe, job.memory, False, device, warn)
    result = pipe(reference, [condition], num_inference_steps=s.steps, guidance_scale=s.guidance, eta=s.eta,
                  seed=job.back.seed, scheduler=s.scheduler, height=s.size, width=s.size, output_type="np",
                  callback_on_window=progress)
    back_view.write(png, encode_png(result.images[0]), key)
    del pipe, result
    gc.collect()  # the view model loads next: do not hold two models


def torch_device_for(memory: str, device: Any) -> Any:
    """Where the networks load: the CPU when the memory mode offloads them (the hooks move them), else ``device``."""
    import torch

    return torch.device("cpu") if offloads(memory, device) else device


def run_job(job_dir: Path, emit: Emitter, back_only: bool = False) -> int:
    """Run the job in ``job_dir``; returns the exit code. Emits every event itself.

    ``back_only``: a DiffPortrait360 job's back stage only (``done`` with frames_written 0)."""
    started = time.monotonic()
    warn = lambda m: emit("warning", message=m)  # noqa: E731
    drop_stale_cancel(job_dir, _IMPORTED_AT, warn)
    job: Job = read_job(job_dir).resolve(job_dir)
    frames = job.ordered_frames()
    out_dir = Path(job.output)
    names = [job.output_path(f).name for f in frames]  # also refuses paths outside the output folder
    info = preflight_job(job, names, warn)
    dp360 = info.family == DIFFPORTRAIT360
    if back_only and not dp360:
        raise WorkerError(f"--back-only makes DiffPortrait360's back view, but {job.model} is a {info.family} "
                          "model, which uses the front photo only",
                          "choose a DiffPortrait360 model folder, or run the job without --back-only")
    assert not dp360 or job.back is not None  # preflight refused a DiffPortrait360 job without a back view
    digest = job_hash(job)
    protocol.remove_stale_temp_files(out_dir, names + [protocol.MANIFEST_FILE])
    done = protocol.frames_done(out_dir, names, digest)
    emit("started", job_hash=digest, frames_total=len(frames), frames_done=len(done))
    if len(done) == len(frames) and not back_only:
        denoise_state.Checkpoints(job_dir, digest).remove()
        return _done(emit, started)

    size = job.settings.size
    crop = job.reference_prep.crop if job.reference_prep is not None else None  # the prepared square
    references = [load_rgb(p, size, crop=crop) for p in job.references]
    if not back_only:
        conditions = [load_rgb(f.condition, size) for f in frames]
        proxies = [None if f.proxy is None else load_rgb(f.proxy, size) for f in frames]
    # DiffPortrait360: the back view is given (back.image), made by an earlier run from the same inputs (reused),
    # or generated below (back_condition set)
    back_path = back_key = back_condition = None
    if dp360 and job.back.image is None:
        back_path = back_view.png_path(job_dir, job.back.seed)
        back_key = back_view.stage_key(job)
        if back_view.is_valid(back_path, back_key):
            emit("back_view", path=str(back_path.resolve()), seed=job.back.seed, origin=job.back.origin)
        else:
            back_condition = load_rgb(job.back.condition, size)
    elif dp360:
        back_path = Path(job.back.image)
        load_rgb(back_path, size)  # a broken back photo is reported before the model loads
        if back_only:
            warn("the job already names its back view (back.image), so there is nothing to generate")
    if back_only and back_condition is None:
        return _done(emit, started)

    import torch  # late: job errors above are reported without paying the import
    from .pipeline import Cancelled

    device = pick_device(job.device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    dtype = pick_dtype(job.dtype, device, lambda m: emit("warning", message=m))
    warn_memory(job, device, warn)
    if protocol.cancel_requested(job_dir):  # pressed while the job was being checked: skip loading the model
        return _cancelled(emit, started)
    s = job.settings
    stage = {"stage": "back"} if dp360 else {}
    said: set[str] = set()

    def warn_once(message: str) -> None:  # the memory-mode warnings apply to both models of a DiffPortrait360 job
        if message not in said:
            said.add(message)
            warn(message)

    def on_window(step: int, num_steps: int, window: int, num_windows: int) -> dict | None:
        emit("progress", step=step + 1, total_steps=num_steps, window=window + 1, windows=num_windows,
             frames_done=len(done), frames_total=len(frames), **stage)
        return {"cancel": True} if protocol.cancel_requested(job_dir) else None

    back_image = None
    if dp360:
        if back_condition is not None:
            try:
                back_stage(job, back_path, back_key, references[0], back_condition, device, dtype, warn_once,
                           on_window)
            except Cancelled:
                return _cancelled(emit, started)
            emit("back_view", path=str(back_path.resolve()), seed=job.back.seed, origin=job.back.origin)
        if back_only:
            return _done(emit, started)
        # read back from the file (8-bit, as the official scripts do): an accepted back view gives the same frames
        back_image = load_rgb(back_path, size)
        stage["stage"] = "views"
        if protocol.cancel_requested(job_dir):
            return _cancelled(emit, started)

    pipe = load_pipeline(job.model, torch_device_for(job.memory, device), dtype)
    apply_speed_options(pipe, job.memory, job.compile, device, warn_once)
    keeper = StateKeeper(job_dir, digest, pipe, job, names, emit)
    # DiffPortrait360 takes one portrait and the back view, DiffPortrait3D a list of references
    reference, extra = (references[0], {"back_image": back_image}) if dp360 else (references, {})
    try:
        result = pipe(reference, conditions,
                      proxy_images=proxies if any(p is not None for p in proxies) else None,
                      num_inference_steps=s.steps, guidance_scale=s.guidance, eta=s.eta, seed=s.seed,
                      scheduler=s.scheduler, window=s.window, overlap=s.overlap, share_noise=s.share_noise,
                      closed_loop=s.closed_loop, state=keeper.resume, callback_on_window=on_window,
                      callback_on_step_end=keeper.on_step, output_type="latent", **extra)
    except Cancelled as exc:
        keeper.keep(exc.state)
        return _cancelled(emit, started)

    written = 0
    for i, image in decode_missing(pipe, result.images, names, done):
        frame, name = frames[i], names[i]
        data = encode_png(image)
        path = protocol.write_atomic(out_dir / name, data)
        protocol.record_frame(out_dir, name, digest, frame.index, frame.scene_frame, hashlib.sha256(data).hexdigest())
        done.add(name)
        written += 1
        emit("frame", index=frame.index, scene_frame=frame.scene_frame, path=str(path))
    keeper.finished()
    return _done(emit, started, written)


def run(job_dir: Path, emit: Emitter, back_only: bool = False) -> int:
    """:func:`run_job` with every failure turned into one plain ``error`` event; returns the exit code."""
    try:
        code = run_job(job_dir, emit, back_only)
        if code == EXIT_CANCELLED:
            protocol.clear_cancel(job_dir)  # honoured: a later run of this job must not see it
        return code
    except JobError as exc:
        emit("error", message=str(exc), hint="export the job again from the add-on; if you edited job.json by "
                                             "hand, fix the named field")
    except ImageError as exc:
        emit("error", message=str(exc), hint="replace or re-export the named image (PNG or JPEG, at least 64 px)")
    except preflight.PreflightError as exc:
        emit("error", message=exc.message, hint=exc.hint)
    except WorkerError as exc:
        emit("error", message=str(exc), hint=exc.hint)
    except BaseException as exc:  # noqa: BLE001  (the protocol promises one error event, never a raw traceback)
        if isinstance(exc, SystemExit):
            raise
        failure = failures.report(exc, [job_dir / LOG_FILE], context=f"worker for job {job_dir}")
        traceback.print_exc(file=sys.stderr)
        emit("error", message=failure.message, hint=failure.hint_with_log, log=failure.log)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    configure_cpu_threads()
    argv = list(sys.argv[1:] if argv is None else argv)
    emit = Emitter(protocol_stream())
    back_only = BACK_ONLY_FLAG in argv
    if back_only:
        argv.remove(BACK_ONLY_FLAG)
    if len(argv) != 1 or argv[0].startswith("-"):
        emit("error", message=f"usage: python -m dp3d_core.worker <job dir> [{BACK_ONLY_FLAG}]",
             hint=f"the add-on starts the worker with the job folder ({BACK_ONLY_FLAG}: only a DiffPortrait360 "
                  "job's back view)")
        return EXIT_ERROR
    if _MISSING_PACKAGE is not None:
        failure = failures.translate(_MISSING_PACKAGE)
        emit("error", message=failure.message, hint=failure.hint)
        return EXIT_ERROR
    return run(Path(argv[0]), emit, back_only)


if __name__ == "__main__":
    sys.exit(main())
