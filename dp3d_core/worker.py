"""The worker process: ``python -m dp3d_core.worker <job dir>``.

Reads ``job.json``, renders the frames with :class:`~dp3d_core.pipeline.DiffPortrait3DPipeline`
and reports on stdout with the line protocol of :mod:`dp3d_core.protocol`. stdout carries
protocol lines only: the original stdout file descriptor is kept for them and everything
else (Python prints, native library output) is redirected to stderr.

Exit codes: 0 done, 1 error (one ``error`` event with a hint), 3 cancelled (``done`` with
``cancelled: true``). Frames finished by an earlier run of the same job hash are kept and
not rewritten. Because the windows of a sequence are blended at every denoising step (one
joint trajectory), all frames become final together at the last step; they are then written
one by one (each atomically, each followed by its ``frame`` event). A cancelled or failed run
therefore leaves earlier runs' frames untouched and never a partial file. The cancel file is
checked after every window evaluation, i.e. several times per denoising step; the add-on
removes a stale cancel file before it starts a job.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from . import protocol
from .images import ImageError, encode_png, load_rgb
from .job import Job, JobError, job_hash, read_job
from .protocol import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, encode_event


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


def check_model_folder(folder: str) -> Path:
    """Fail early (before importing torch) when the model folder is plainly missing."""
    path = Path(folder)
    if not path.is_dir():
        raise WorkerError(f"model folder not found: {path}",
                          "set the model folder in the add-on preferences (convert the official checkpoint "
                          "or use the bundled demo model)")
    if not (path / "model_index.json").is_file():
        raise WorkerError(f"{path} is not a DiffPortrait3D model folder (it has no model_index.json)",
                          "choose the folder that holds model_index.json, or convert the official checkpoint "
                          "into a fresh folder")
    return path


def load_pipeline(folder: str, device: Any, dtype: Any) -> Any:
    """The pipeline from a model folder, on ``device`` in ``dtype``."""
    from . import model_folder

    path = check_model_folder(folder)
    from .pipeline import DiffPortrait3DPipeline

    try:
        pipe = DiffPortrait3DPipeline.from_pretrained(path, device=device, torch_dtype=dtype)
    except model_folder.ModelFolderError as exc:
        raise WorkerError(f"the model folder {path} cannot be used: {exc}",
                          "re-convert or re-download the model; the folder needs model_index.json, unet/, "
                          "reference_unet/, view_controlnet/, view_modules/, vae/, scheduler/ and "
                          "prompt_embedding/") from None
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
    """Plain message and hint for an unexpected exception."""
    name = type(exc).__name__
    text = str(exc).strip() or name
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return (f"the GPU ran out of memory ({text.splitlines()[0]})",
                "set GPU Memory to Low (job.json memory 'low'; or Lowest), lower the output size or use dtype "
                "fp16; close other programs using the GPU")
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return (f"torch.compile failed ({text.splitlines()[0]})",
                "turn Compile off for this job (compiling needs a C compiler, and triton on CUDA)")
    if isinstance(exc, MemoryError):
        return "the computer ran out of memory", "lower the output size or close other programs"
    if isinstance(exc, ValueError) and type(exc).__module__.startswith(__package__ or "dp3d_core"):
        # our own input errors (PipelineError, SchedulerError, ModelInputError) already say what to change
        return text, "change the job's generation settings as the message says and run it again"
    if isinstance(exc, ModuleNotFoundError):
        return (f"the worker Python lacks a package: {exc.name}",
                "install torch, diffusers, safetensors and pillow into the worker Python set in the add-on "
                "preferences")
    return f"{name}: {text}", "see the worker log (stderr) for the full traceback"


def _remove_stale_temp_files(out_dir: Path, names: list[str]) -> None:
    """Temp files of a worker that was killed mid-write (never complete frames, so safe to delete)."""
    if out_dir.is_dir():
        for name in names + [protocol.MANIFEST_FILE]:
            for tmp in out_dir.glob(f".{glob.escape(name)}.*.tmp"):
                tmp.unlink(missing_ok=True)


def run_job(job_dir: Path, emit: Emitter) -> int:
    """Run the job in ``job_dir``; returns the exit code. Emits every event itself."""
    started = time.monotonic()
    job: Job = read_job(job_dir).resolve(job_dir)
    frames = job.ordered_frames()
    out_dir = Path(job.output)
    names = [job.output_path(f).name for f in frames]  # also refuses paths outside the output folder
    digest = job_hash(job)
    _remove_stale_temp_files(out_dir, names)
    done = protocol.frames_done(out_dir, names, digest)
    emit("started", job_hash=digest, frames_total=len(frames), frames_done=len(done))
    if len(done) == len(frames):
        emit("done", frames_written=0, seconds=round(time.monotonic() - started, 3), cancelled=False)
        return EXIT_OK

    check_model_folder(job.model)
    size = job.settings.size
    crop = job.reference_prep.crop if job.reference_prep is not None else None  # the prepared square
    references = [load_rgb(p, size, crop=crop) for p in job.references]
    conditions = [load_rgb(f.condition, size) for f in frames]
    proxies = [None if f.proxy is None else load_rgb(f.proxy, size) for f in frames]

    import torch  # late: job errors above are reported without paying the import
    from .pipeline import Cancelled

    device = pick_device(job.device)
    dtype = pick_dtype(job.dtype, device, lambda m: emit("warning", message=m))
    # offloaded networks are moved to the device by the offload hooks, one at a time
    pipe = load_pipeline(job.model, torch.device("cpu") if offloads(job.memory, device) else device, dtype)
    apply_speed_options(pipe, job.memory, job.compile, device, lambda m: emit("warning", message=m))
    s = job.settings

    def on_window(step: int, num_steps: int, window: int, num_windows: int) -> dict | None:
        emit("progress", step=step + 1, total_steps=num_steps, window=window + 1, windows=num_windows,
             frames_done=len(done), frames_total=len(frames))
        return {"cancel": True} if protocol.cancel_requested(job_dir) else None

    try:
        result = pipe(references, conditions, proxy_images=proxies if any(p is not None for p in proxies) else None,
                      num_inference_steps=s.steps, guidance_scale=s.guidance, eta=s.eta, seed=s.seed,
                      scheduler=s.scheduler, window=s.window, overlap=s.overlap, share_noise=s.share_noise,
                      callback_on_window=on_window, output_type="np")
    except Cancelled:
        emit("done", frames_written=0, seconds=round(time.monotonic() - started, 3), cancelled=True)
        return EXIT_CANCELLED

    written = 0
    for frame, name, image in zip(frames, names, result.images):
        if name in done:
            continue
        data = encode_png(image)
        path = protocol.write_atomic(out_dir / name, data)
        protocol.record_frame(out_dir, name, digest, frame.index, frame.scene_frame, hashlib.sha256(data).hexdigest())
        done.add(name)
        written += 1
        emit("frame", index=frame.index, scene_frame=frame.scene_frame, path=str(path))
    emit("done", frames_written=written, seconds=round(time.monotonic() - started, 3), cancelled=False)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    emit = Emitter(protocol_stream())
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        emit("error", message="usage: python -m dp3d_core.worker <job dir>",
             hint="the add-on starts the worker with the job folder as the only argument")
        return EXIT_ERROR
    job_dir = Path(argv[0])
    try:
        return run_job(job_dir, emit)
    except JobError as exc:
        emit("error", message=str(exc), hint="export the job again from the add-on; if you edited job.json by "
                                             "hand, fix the named field")
    except ImageError as exc:
        emit("error", message=str(exc), hint="replace or re-export the named image (PNG or JPEG, at least 64 px)")
    except WorkerError as exc:
        emit("error", message=str(exc), hint=exc.hint)
    except KeyboardInterrupt:
        emit("error", message="the worker was interrupted", hint="run the job again to resume")
    except Exception as exc:  # noqa: BLE001  (the protocol promises one error event, never a raw traceback)
        traceback.print_exc(file=sys.stderr)
        message, hint = _error_hint(exc)
        emit("error", message=message, hint=hint)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
