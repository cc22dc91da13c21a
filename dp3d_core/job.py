"""The job directory contract between the Blender add-on and the worker (torch-free).

A job directory holds ``job.json`` (see :data:`JOB_VERSION`) and usually the reference,
condition and proxy images it names. Paths inside the job are relative to the job
directory or absolute; :meth:`Job.resolve` makes them absolute.

Window and overlap: DiffPortrait3D denoises clips of 8 views at once (its motion
modules are trained on 8 frames). Longer sequences are covered by windows of
``window`` views that share ``overlap`` views with their neighbour; the default
overlap 4 (half a window) puts every inner view in two windows, which blends well
at twice the cost of independent chunks. ``overlap`` 0 gives independent chunks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

JOB_VERSION = 1
JOB_FILE = "job.json"
SCHEDULERS = ("ddim", "dpm++2m", "unipc")  # the names dp3d_core.schedulers.make_scheduler accepts
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp32", "fp16", "bf16")
# GPU memory savers, applied by the worker (dp3d_core.worker.apply_speed_options): "low" runs the guidance passes
# one after the other with sliced attention and VAE decode; "lowest" adds model CPU offload.
MEMORY_MODES = ("normal", "low", "lowest")
LABEL_LENGTH = 25
PATTERN_FIELDS = ("index", "scene_frame")
DEFAULT_FRAME_PATTERN = "frame_{scene_frame:04d}.png"
MAX_SIZE = 2048
# All frames of a job are denoised as one joint trajectory, so every frame's latents, condition and proxy stay in
# memory for the whole run (about 3.8 MB per frame at 512 px on the CPU side alone) and a cancel loses them all.
# 1000 frames (40 s at 25 fps, about 3.8 GB of inputs at 512 px) is far beyond a turntable; longer sequences are
# better split into several jobs.
MAX_FRAMES = 1000
MAX_PATTERN_LENGTH = 200  # characters of frame_pattern (names must also fit the file system: dp3d_core.preflight)
MAX_JOB_BYTES = 64 << 20  # a job.json of MAX_FRAMES frames is well under 1 MB
# Model files up to this size are hashed by content; bigger ones by (size, mtime).
_SMALL_FILE = 1 << 20


class JobError(ValueError):
    """The job description is invalid; the message names the field and the fix."""


@dataclass
class FrameSpec:
    """One output view: where it goes in the scene and what conditions it."""

    index: int
    scene_frame: int
    label: list[float]
    condition: str
    proxy: str | None = None


@dataclass
class GenerationSettings:
    """Everything about sampling that changes the pixels."""

    steps: int = 50
    guidance: float = 3.0
    eta: float = 0.0
    seed: int = 0
    size: int = 512
    scheduler: str = "ddim"
    window: int = 8
    overlap: int = 4
    share_noise: bool = False
    closed_loop: bool = False  # the frames are one full turn: windows wrap from the last frame to the first


@dataclass
class ReferencePrep:
    """How the reference photo was prepared (``python -m dp3d_core.prepare_reference``): the square ``crop``
    (x0, y0, x1, y1) in the pixels of the upright photo, which the worker cuts out of the original file, and the
    pose found for it in degrees (as prepare_reference prints it: ``yaw`` the subject's, > 0 turned to its own
    left; ``pitch``/``roll`` the photo camera's) with the photo camera's EG3D label."""

    crop: list[float]
    yaw: float
    pitch: float
    roll: float
    label: list[float]


ORIGINS = ("generated", "photo")


@dataclass
class BackView:
    """The back of the head, DiffPortrait360's second reference (DiffPortrait3D jobs have none).

    ``condition``: the condition image of the camera straight behind the head (yaw 180 degrees from the photo's
    front), ``label`` that camera's EG3D label. ``image``: the back view to use, or None: the worker generates it
    with the model's back-head model and ``seed`` (``<job dir>/back/back_seed<seed>.png``). ``origin``:
    ``"generated"`` (by the back-head model, accepted by the artist or still to be made) or ``"photo"`` (the
    artist's own photo of the back of the head, used as it is: centre square, like an unprepared reference).
    """

    condition: str
    label: list[float]
    image: str | None = None
    origin: str = "generated"
    seed: int = 0


@dataclass
class Job:
    """A whole turntable request."""

    references: list[str]
    frames: list[FrameSpec]
    model: str
    output: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    device: str = "auto"
    dtype: str = "auto"
    memory: str = "normal"
    compile: bool = False  # torch.compile the networks: minutes at the first window, then ~1.4x faster steps
    frame_pattern: str = DEFAULT_FRAME_PATTERN
    version: int = JOB_VERSION
    reference_prep: ReferencePrep | None = None  # None: the reference's centre square is used as it is
    back: BackView | None = None  # DiffPortrait360 only: the back view (None for DiffPortrait3D jobs)

    def resolve(self, job_dir: str | os.PathLike) -> "Job":
        """A copy with every path made absolute (relative paths are taken from ``job_dir``)."""
        base = Path(job_dir).resolve()

        def absolute(p: str) -> str:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())

        frames = [replace(f, condition=absolute(f.condition),
                          proxy=None if f.proxy is None else absolute(f.proxy)) for f in self.frames]
        back = None if self.back is None else replace(
            self.back, condition=absolute(self.back.condition),
            image=None if self.back.image is None else absolute(self.back.image))
        return replace(self, references=[absolute(r) for r in self.references], frames=frames,
                       model=absolute(self.model), output=absolute(self.output),
                       settings=replace(self.settings), back=back)

    def frame_name(self, frame: FrameSpec) -> str:
        """The output file name of ``frame`` (a bare name inside the output folder)."""
        return _format_pattern(self.frame_pattern, frame.index, frame.scene_frame)

    def ordered_frames(self) -> list[FrameSpec]:
        """Frames in output order (by ``index``); this is the view order given to the model."""
        return sorted(self.frames, key=lambda f: f.index)

    def output_path(self, frame: FrameSpec) -> Path:
        """Absolute output path of ``frame``; refuses anything outside the output folder."""
        try:
            out = Path(self.output).resolve()
            path = (out / self.frame_name(frame)).resolve()
        except RuntimeError:  # pathlib's "Symlink loop from ..." (Python < 3.13)
            raise _fail("output", f"the path {_clip(self.output)} goes round in a loop of symbolic links; choose "
                        "an output folder whose path does not pass through it") from None
        if path.parent != out:
            raise JobError(f"frame_pattern: frame {frame.index} would be written to {path}, outside the "
                           f"output folder {out}; use a plain file name such as {DEFAULT_FRAME_PATTERN!r}")
        return path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- validation

def _fail(field_name: str, problem: str) -> JobError:
    return JobError(f"job.json field '{_clip(field_name)}': {_clip(problem, 400)}")


def _clip(text: str, limit: int = 120) -> str:
    """A value quoted in a message, cut in the middle when long (a 10 MB value never reaches the UI)."""
    return text if len(text) <= limit else f"{text[:limit // 2 - 3]} ... {text[-(limit // 2 - 3):]}"


def _int(d: dict, key: str, where: str, default: Any = ..., low: int | None = None,
         high: int | None = None) -> int:
    if key not in d:
        if default is ...:
            raise _fail(where, "is missing")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where, f"must be a whole number, got {v!r}")
    if low is not None and v < low:
        raise _fail(where, f"must be at least {low}, got {v}")
    if high is not None and v > high:
        raise _fail(where, f"must be at most {high}, got {v}")
    return v


def _float(d: dict, key: str, where: str, default: float, low: float | None = None,
           high: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(where, f"must be a finite number, got {v!r}")
    if low is not None and v < low:
        raise _fail(where, f"must be at least {low}, got {v}")
    if high is not None and v > high:
        raise _fail(where, f"must be at most {high}, got {v}")
    return float(v)


def _str(d: dict, key: str, where: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
    if key not in d:
        if default is ...:
            raise _fail(where, "is missing")
        return default
    v = d[key]
    if not isinstance(v, str) or not v:
        raise _fail(where, f"must be a non-empty text, got {v!r}")
    if choices is not None and v not in choices:
        raise _fail(where, f"must be one of {', '.join(choices)}; got {v!r}")
    return v


def _bool(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _fail(where, f"must be true or false, got {v!r}")
    return v


def _format_pattern(pattern: str, index: int, scene_frame: int) -> str:
    try:
        return pattern.format(index=index, scene_frame=scene_frame)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise _fail("frame_pattern", f"{pattern!r} cannot be formatted ({exc}); only "
                    f"{{index}} and {{scene_frame}} are available, e.g. {DEFAULT_FRAME_PATTERN!r}") from None


def _check_pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _fail("frame_pattern", f"is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH} are allowed "
                    f"(e.g. {DEFAULT_FRAME_PATTERN!r})")
    if any(ord(c) < 32 or c == "\x7f" for c in pattern):
        raise _fail("frame_pattern", "must not contain control characters (tab, newline, NUL, ...)")
    for _, name, _, _ in string.Formatter().parse(pattern):
        if name is not None and name not in PATTERN_FIELDS:
            raise _fail("frame_pattern", f"unknown field {{{name}}}; use {{index}} or {{scene_frame}}")
    sample = _format_pattern(pattern, 0, 0)
    if any(c in sample for c in "/\\:") or ".." in sample or Path(sample).is_absolute():
        raise _fail("frame_pattern", f"{pattern!r} must be a plain file name (no folders, '..', drive or "
                    "absolute path): frames are only ever written inside the output folder")
    if not pattern.lower().endswith(".png"):
        raise _fail("frame_pattern", f"{pattern!r} must end with .png")


def _parse_label(v: Any, where: str) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != LABEL_LENGTH:
        n = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
        raise _fail(where, f"must be a list of {LABEL_LENGTH} numbers (4x4 cam2world + 3x3 intrinsics), got {n}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise _fail(f"{where}[{i}]", f"must be a finite number, got {x!r}")
        out.append(float(x))
    if max(abs(a - b) for a, b in zip(out[12:16], (0.0, 0.0, 0.0, 1.0))) > 1e-4:
        raise _fail(where, f"entries 12..15 (last row of the 4x4 pose) must be 0, 0, 0, 1; got {out[12:16]}")
    return out


def _parse_settings(d: Any) -> GenerationSettings:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _fail("settings", f"must be an object, got {type(d).__name__}")
    default = GenerationSettings()
    s = GenerationSettings(
        steps=_int(d, "steps", "settings.steps", default.steps, 1, 1000),
        guidance=_float(d, "guidance", "settings.guidance", default.guidance, 0.0, 100.0),
        eta=_float(d, "eta", "settings.eta", default.eta, 0.0, 1.0),
        seed=_int(d, "seed", "settings.seed", default.seed, 0, 2**63 - 1),
        size=_int(d, "size", "settings.size", default.size, 64, MAX_SIZE),
        scheduler=_str(d, "scheduler", "settings.scheduler", default.scheduler, SCHEDULERS),
        window=_int(d, "window", "settings.window", default.window, 1, 64),
        overlap=_int(d, "overlap", "settings.overlap", default.overlap, 0),
        share_noise=_bool(d, "share_noise", "settings.share_noise", default.share_noise),
        closed_loop=_bool(d, "closed_loop", "settings.closed_loop", default.closed_loop),
    )
    if s.size % 64:
        raise _fail("settings.size", f"must be a multiple of 64 (the latent is 1/8 of it and the UNet halves "
                    f"it three times), got {s.size}; try {max(64, round(s.size / 64) * 64)}")
    if s.overlap >= s.window:
        raise _fail("settings.overlap", f"must be smaller than settings.window ({s.window}), got {s.overlap}")
    unknown = set(d) - set(asdict(default))
    if unknown:
        raise _fail("settings", f"unknown key(s) {', '.join(sorted(unknown))}")
    return s


def _parse_frame(d: Any, i: int) -> FrameSpec:
    where = f"frames[{i}]"
    if not isinstance(d, dict):
        raise _fail(where, f"must be an object, got {type(d).__name__}")
    proxy = d.get("proxy")
    if proxy is not None and (not isinstance(proxy, str) or not proxy):
        raise _fail(f"{where}.proxy", f"must be an image path or null, got {proxy!r}")
    return FrameSpec(
        index=_int(d, "index", f"{where}.index", low=0),
        scene_frame=_int(d, "scene_frame", f"{where}.scene_frame"),
        label=_parse_label(d.get("label"), f"{where}.label"),
        condition=_str(d, "condition", f"{where}.condition"),
        proxy=proxy,
    )


def _parse_reference_prep(d: Any) -> ReferencePrep | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("reference_prep", f"must be an object or null, got {type(d).__name__}")
    crop = d.get("crop")
    if (not isinstance(crop, (list, tuple)) or len(crop) != 4 or
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in crop)):
        raise _fail("reference_prep.crop", f"must be four finite numbers x0, y0, x1, y1; got {crop!r:.80}")
    x0, y0, x1, y1 = (float(v) for v in crop)
    side = x1 - x0
    if side < 1.0 or y1 - y0 < 1.0 or abs((y1 - y0) - side) > 1e-3 * side + 0.01:
        raise _fail("reference_prep.crop", f"must be a square with x1 > x0 and y1 > y0, got {[x0, y0, x1, y1]}")
    missing = [k for k in ("yaw", "pitch", "roll", "label") if k not in d]
    if missing:
        raise _fail("reference_prep", f"is missing {', '.join(missing)}")
    prep = ReferencePrep(
        crop=[x0, y0, x1, y1],
        yaw=_float(d, "yaw", "reference_prep.yaw", math.nan, -180.0, 180.0),
        pitch=_float(d, "pitch", "reference_prep.pitch", math.nan, -90.0, 90.0),
        roll=_float(d, "roll", "reference_prep.roll", math.nan, -180.0, 180.0),
        label=_parse_label(d.get("label"), "reference_prep.label"),
    )
    unknown = set(d) - set(asdict(prep))
    if unknown:
        raise _fail("reference_prep", f"unknown key(s) {', '.join(sorted(unknown))}")
    return prep


def _parse_back(d: Any) -> BackView | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("back", f"must be an object or null, got {type(d).__name__}")
    image = d.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise _fail("back.image", f"must be an image path or null, got {image!r:.80}")
    back = BackView(
        condition=_str(d, "condition", "back.condition"),
        label=_parse_label(d.get("label"), "back.label"),
        image=image,
        origin=_str(d, "origin", "back.origin", "generated", ORIGINS),
        seed=_int(d, "seed", "back.seed", 0, 0, 2**63 - 1),
    )
    if back.origin == "photo" and back.image is None:
        raise _fail("back.image", "is null, but back.origin is 'photo': name the photo of the back of the head, "
                    "or set back.origin to 'generated' to have the back view generated")
    unknown = set(d) - set(asdict(back))
    if unknown:
        raise _fail("back", f"unknown key(s) {', '.join(sorted(unknown))}")
    return back


def job_from_dict(d: Any) -> Job:
    """Validate a parsed ``job.json`` and build a :class:`Job` (raises :class:`JobError`)."""
    if not isinstance(d, dict):
        raise JobError(f"job.json must hold a JSON object, got {type(d).__name__}")
    version = d.get("version")
    if version != JOB_VERSION:
        raise _fail("version", f"this worker reads version {JOB_VERSION}, the job says {version!r}; "
                    "update the add-on and the worker together")
    refs = d.get("references")
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        raise _fail("references", "must be a non-empty list of image paths")
    frames_raw = d.get("frames")
    if not isinstance(frames_raw, list) or not frames_raw:
        raise _fail("frames", "must be a non-empty list (one entry per output view)")
    if len(frames_raw) > MAX_FRAMES:
        raise _fail("frames", f"has {len(frames_raw)} entries; a job holds at most {MAX_FRAMES} frames (all frames "
                    "are denoised together and kept in memory); split the sequence into several jobs")
    frames = [_parse_frame(f, i) for i, f in enumerate(frames_raw)]
    pattern = _str(d, "frame_pattern", "frame_pattern", DEFAULT_FRAME_PATTERN)
    _check_pattern(pattern)
    job = Job(
        references=list(refs), frames=frames,
        model=_str(d, "model", "model"), output=_str(d, "output", "output"),
        settings=_parse_settings(d.get("settings")),
        device=_str(d, "device", "device", "auto", DEVICES),
        dtype=_str(d, "dtype", "dtype", "auto", DTYPES),
        memory=_str(d, "memory", "memory", "normal", MEMORY_MODES),
        compile=_bool(d, "compile", "compile", False),
        frame_pattern=pattern, version=version,
        reference_prep=_parse_reference_prep(d.get("reference_prep")),
        back=_parse_back(d.get("back")),
    )
    if job.reference_prep is not None and len(job.references) != 1:
        raise _fail("reference_prep", f"describes one prepared reference, but the job has {len(job.references)}")
    seen_index: dict[int, int] = {}
    seen_name: dict[str, int] = {}
    for i, f in enumerate(frames):
        if f.index in seen_index:
            raise _fail(f"frames[{i}].index", f"{f.index} is used twice (also frames[{seen_index[f.index]}])")
        seen_index[f.index] = i
        name = job.frame_name(f)
        if name in seen_name:
            raise _fail("frame_pattern", f"frames[{seen_name[name]}] and frames[{i}] would both be written to "
                        f"{name!r}; include {{index}} or use distinct scene frames")
        seen_name[name] = i
    unknown = set(d) - set(asdict(job))
    if unknown:
        raise _fail("(top level)", f"unknown key(s) {', '.join(sorted(unknown))}")
    return job


def validate(job: Job) -> Job:
    """Re-validate a Job built in code (same checks as reading it); returns it unchanged."""
    job_from_dict(json.loads(json.dumps(job.to_dict())))
    return job


def write_job(job: Job, job_dir: str | os.PathLike) -> Path:
    """Validate ``job`` and write ``<job_dir>/job.json`` atomically; returns the file path."""
    validate(job)
    d = Path(job_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / JOB_FILE
    tmp = d / f".{JOB_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(job.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_job(job_dir: str | os.PathLike) -> Job:
    """Read and validate ``<job_dir>/job.json`` (paths left as written; call :meth:`Job.resolve`)."""
    path = Path(job_dir) / JOB_FILE
    if not path.is_file():
        raise JobError(f"no {JOB_FILE} in {Path(job_dir).resolve()}; is this a job folder?")
    try:
        if path.stat().st_size > MAX_JOB_BYTES:
            raise JobError(f"{path} is {path.stat().st_size >> 20} MB; a job file is at most {MAX_JOB_BYTES >> 20} MB "
                           "(export the job again from the add-on)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError(f"{path} is not valid JSON ({_clip(str(exc))})") from None
    except RecursionError:
        raise JobError(f"{path} is nested too deeply to be a job (JSON inside JSON thousands of levels deep); "
                       "export the job again from the add-on") from None
    return job_from_dict(data)


# ---------------------------------------------------------------- hashing

def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's contents (raises JobError naming a missing file)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise JobError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()


def model_identity(folder: str | os.PathLike) -> str:
    """A cheap identity of a model folder: small files by content, weight files by size and mtime.

    Hashing gigabytes of weights on every run would cost seconds; a retrained or replaced
    weight file changes its mtime, so it still changes the identity.
    """
    root = Path(folder)
    h = hashlib.sha256()
    if not root.is_dir():
        h.update(b"missing:" + str(root).encode())
        return h.hexdigest()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        st = p.stat()
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if st.st_size <= _SMALL_FILE:
            h.update(file_digest(p).encode())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def job_hash(job: Job, job_dir: str | os.PathLike | None = None) -> str:
    """Stable hash of everything that changes the pixels (not the output folder or file names).

    Covers the settings, device, dtype, the model folder identity, and the contents of every
    reference, condition and proxy image, plus each frame's index, scene frame and label, the reference
    preparation (crop and pose) when there is one, and the back view when there is one (its condition image and
    label, origin, and the back image's contents or, when the worker generates it, its seed). Not ``memory`` or
    ``compile``: they change speed and memory, not the picture (beyond floating-point rounding), so switching them
    keeps the frames already written.
    Relative paths are resolved against ``job_dir`` (default: the current folder).
    """
    j = job.resolve(job_dir if job_dir is not None else os.getcwd())
    settings = asdict(j.settings)
    if not j.settings.closed_loop:  # only when set, so open sequences keep the hashes they always had
        del settings["closed_loop"]
    payload = {
        "version": j.version,
        "settings": settings,
        "device": j.device,
        "dtype": j.dtype,
        "model": model_identity(j.model),
        "references": [file_digest(r) for r in j.references],
        "frames": [{"index": f.index, "scene_frame": f.scene_frame, "label": f.label,
                    "condition": file_digest(f.condition),
                    "proxy": None if f.proxy is None else file_digest(f.proxy)} for f in j.frames],
    }
    if j.reference_prep is not None:  # only when set, so jobs without one keep the hashes they always had
        payload["reference_prep"] = asdict(j.reference_prep)
    if j.back is not None:  # likewise: DiffPortrait3D jobs have none
        b = j.back
        payload["back"] = {"condition": file_digest(b.condition), "label": b.label, "origin": b.origin,
                           "image": None if b.image is None else file_digest(b.image),
                           # the seed makes the back view only when the worker generates it
                           "seed": b.seed if b.image is None else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
