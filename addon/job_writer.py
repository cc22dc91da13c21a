"""Scene settings + camera poses + condition images -> a job folder the worker reads.

Layout (inside the output folder, so a job lives next to its frames)::

    <out>/frame_0001.png ...         frames (written by the worker)
    <out>/dataset.json               EG3D labels of the frames
    <out>/.job/job.json              the job (dp3d_core.job)
    <out>/.job/conditions/cond_0001.png, proxy_0001.png ...
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import preferences, reference_prep
from .core import CORE_PARENT, failures, job as jobspec, preflight
from .poses import FramePose, PoseError, scene_poses, write_dataset
from .poses import output_folder as poses_output_folder
from .properties import active_camera, frame_range
from .reference_check import ReferenceImageError, check_reference

JOB_SUBDIR = ".job"
CONDITION_SUBDIR = "conditions"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# model_index.json components and the config file each folder must hold.
MODEL_COMPONENTS = {
    "unet": "config.json", "reference_unet": "config.json", "view_controlnet": "config.json",
    "view_modules": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json",
    "prompt_embedding": "config.json",
}
SCHEDULER_IDS = {"DDIM": "ddim", "DPMPP_2M": "dpm++2m", "UNIPC": "unipc"}
STATIC_TOLERANCE = 1e-6


class JobSetupError(ValueError):
    """The job cannot be written; the message says what to fix."""


@dataclass
class PreparedJob:
    job_dir: Path
    out_dir: Path
    job: jobspec.Job
    poses: list[FramePose]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def frame_paths(self) -> list[Path]:
        return [self.out_dir / self.job.frame_name(f) for f in self.job.ordered_frames()]


# ---------------------------------------------------------------- checks

def output_folder(scene: bpy.types.Scene) -> Path:
    """The settings' output folder as an absolute, writable folder (JobSetupError otherwise)."""
    try:
        return poses_output_folder(scene)
    except PoseError as exc:
        raise JobSetupError(str(exc)) from None


def check_model_folder(path: str | os.PathLike) -> Path:
    """An existing, complete model folder (model_index.json + every component's config), else JobSetupError."""
    raw = str(path).strip()
    p = Path(bpy.path.abspath(raw)).expanduser()
    if not p.is_dir():
        raise JobSetupError(f"Model folder not found: {p}. Convert the official checkpoint (Preferences > Add-ons "
                            "> Portrait 3D > Models > Get Official Weights) or pick an existing model folder.")
    if not (p / "model_index.json").is_file():
        raise JobSetupError(f"{p} is not a Portrait 3D model folder (no model_index.json). Pick the folder the "
                            "converter wrote, which holds model_index.json, unet/, vae/ and the others.")
    missing = [name for name, config in MODEL_COMPONENTS.items() if not (p / name / config).is_file()]
    if missing:
        raise JobSetupError(f"The model folder {p} is incomplete: missing {', '.join(missing)}. Convert the "
                            "checkpoint again into an empty folder (an interrupted copy or conversion leaves "
                            "folders out).")
    return p


def model_folder(context: bpy.types.Context, override: str | os.PathLike | None = None) -> Path:
    """The model to use: ``override``, else the scene setting, else the preferences' default, else
    a ``models/small`` folder beside the add-on core (the shipped demo model when there is one)."""
    candidates = [override, context.scene.portrait3d.model_folder, preferences.default_model(context)]
    for c in candidates:
        if c is not None and str(c).strip():
            return check_model_folder(c)
    bundled = Path(CORE_PARENT) / "models" / "small"
    if (bundled / "model_index.json").is_file():
        return check_model_folder(bundled)
    raise JobSetupError("No model folder: set Model Folder in the Generation panel, or convert the official "
                        "checkpoint in Preferences > Add-ons > Portrait 3D.")


def check_camera_motion(poses: list[FramePose], camera_name: str) -> list[str]:
    """Refuse a static camera over several frames; a single frame is fine (returned as a note)."""
    if len(poses) == 1:
        return [f"One frame ({poses[0].frame}): generating a single view. Animate the camera or add a turntable "
                "for a turntable."]
    first = poses[0].label
    if all(max(abs(a - b) for a, b in zip(first, p.label)) < STATIC_TOLERANCE for p in poses[1:]):
        raise JobSetupError(
            f"The camera '{camera_name}' does not move over frames {poses[0].frame}-{poses[-1].frame}: every "
            "view would be the same. Add a turntable (or animate the camera), or set a one-frame range.")
    return []


def folder_conditions(folder: str | os.PathLike, count: int) -> tuple[list[Path], list[str]]:
    """The first ``count`` images of ``folder`` in name order (and warnings), matched to the output frames."""
    raw = str(folder).strip()
    if not raw:
        raise JobSetupError("No condition folder: set Condition Folder, or choose another Condition Source.")
    p = Path(bpy.path.abspath(raw)).expanduser()
    if not p.is_dir():
        raise JobSetupError(f"Condition folder not found: {p}.")
    images = sorted((f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and
                     not f.name.startswith(".")), key=lambda f: f.name)
    if len(images) < count:
        raise JobSetupError(f"The condition folder {p} has {len(images)} image(s) but the frame range has {count} "
                            f"frames: add images (one per frame, in name order) or shorten the range.")
    warnings = []
    if len(images) > count:
        warnings.append(f"The condition folder has {len(images)} images; using the first {count} in name order "
                        f"({images[0].name} .. {images[count - 1].name}).")
    return images[:count], warnings


# ---------------------------------------------------------------- conditions

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"tIME", b"eXIf"}


def strip_png_metadata(path: Path) -> None:
    """Drop text/time chunks from a PNG in place.

    Blender stamps the render date and render time into every PNG it saves; the job hash covers
    the condition files' bytes, so without this a re-render of identical pixels would look like a
    new job and finished frames would be recomputed instead of resumed.
    """
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return
    out, i = [_PNG_SIGNATURE], len(_PNG_SIGNATURE)
    while i + 12 <= len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8]
        end = i + 12 + length
        if kind not in _PNG_METADATA_CHUNKS:
            out.append(data[i:end])
        i = end
    stripped = b"".join(out)
    if stripped != data:
        tmp = path.with_name(f".{path.name}.strip")
        tmp.write_bytes(stripped)
        os.replace(tmp, path)


def _proxy_objects(scene: bpy.types.Scene, anchor: bpy.types.Object, seed: int) -> list[bpy.types.Object]:
    from .condition_render import find_proxy_heads
    from .proxy_head import ProxyHeadError, build_proxy_head

    heads = find_proxy_heads(scene)
    if heads:
        return heads
    try:
        return [build_proxy_head(seed, anchor)]
    except ProxyHeadError as exc:
        raise JobSetupError(f"Cannot build the proxy head: {exc}") from None


def render_conditions(scene: bpy.types.Scene, camera: bpy.types.Object, anchor: bpy.types.Object,
                      frames: list[int], cond_dir: Path, size: int, *, reference: Path | None = None,
                      proxy_views: bool = False, reference_label: list[float] | None = None
                      ) -> tuple[list[Path], list[Path] | None, list[str]]:
    """(condition images, proxy views or None, warnings) per the scene's condition source. Proxy views project
    ``reference`` from the camera ``reference_label`` (an EG3D label; None: the frontal EG3D camera)."""
    from .condition_render import ConditionRenderError, render_condition_images, render_proxy_views

    s = scene.portrait3d
    warnings: list[str] = []
    objects: list[bpy.types.Object] = []
    if s.condition_source == 'IMAGE_FOLDER':
        conditions, warnings = folder_conditions(s.condition_folder, len(frames))
    else:
        if s.condition_source == 'MESH':
            if s.condition_mesh is None:
                raise JobSetupError("Condition Source is Custom Mesh but no mesh is picked: set Condition Mesh "
                                    "to your head model, or choose Procedural Head.")
            objects = [s.condition_mesh]
        else:
            objects = _proxy_objects(scene, anchor, s.proxy_seed)
        try:
            conditions = render_condition_images(scene, camera, frames, cond_dir, size=size, objects=objects)
        except ConditionRenderError as exc:
            raise JobSetupError(f"Rendering the condition images failed: {exc}") from None
    proxies = None
    if proxy_views:
        if not objects:
            warnings.append("3D-Aware Noise needs a proxy head or mesh; it is off for an image-folder source.")
        else:
            try:
                proxies = render_proxy_views(scene, camera, frames, cond_dir, reference_image_path=str(reference),
                                             proxy_object=objects[0], anchor=anchor, size=size,
                                             reference_label_or_camera=reference_label)
            except ConditionRenderError as exc:
                raise JobSetupError(f"Rendering the 3D-aware proxy views failed: {exc}") from None
    for path in [*(conditions if objects else []), *(proxies or [])]:
        strip_png_metadata(Path(path))
    return conditions, proxies, warnings


# ---------------------------------------------------------------- the job

def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def prepare_job(context: bpy.types.Context, *, model: str | os.PathLike | None = None,
                worker_python: str | os.PathLike | None = None) -> PreparedJob:
    """Check everything, render the conditions and write ``<out>/.job/job.json``; JobSetupError otherwise.

    With Prepare Reference on, the reference is prepared (in ``worker_python``, default the preference) unless
    a fresh result is stored: the job records its crop and camera, and proxy views project the crop from it."""
    scene = context.scene
    s = scene.portrait3d
    start, end = frame_range(scene)
    camera = active_camera(scene)
    if camera is None:
        raise JobSetupError("No camera: add a turntable, set the scene camera, or pick a camera in the settings.")
    if s.head_anchor is None:
        raise JobSetupError("No head anchor: add one with 'Add Head Anchor' or pick an Empty as Head Anchor.")
    if end < start:
        raise JobSetupError(f"The frame range {start}-{end} is empty: make End greater than or equal to Start.")
    from .preflight_checks import check_frame_count
    try:
        check_frame_count(end - start + 1)  # before the poses: a huge range must not freeze the UI first
    except preflight.PreflightError as exc:
        raise JobSetupError(str(exc)) from None
    size = int(s.output_size)
    if size % 64:
        suggestion = max(64, round(size / 64) * 64)
        raise JobSetupError(f"Output Size {size} px is not a multiple of 64 (the model needs that); use {suggestion}.")
    try:
        ref = check_reference(s.reference_image, prepared=s.use_reference_prep)
    except ReferenceImageError as exc:
        raise JobSetupError(str(exc)) from None
    out = output_folder(scene)
    model_dir = model_folder(context, model)

    frames = list(range(start, end + 1))
    try:
        poses = scene_poses(scene, camera, s.head_anchor, frames)
    except PoseError as exc:
        raise JobSetupError(str(exc)) from None
    notes = list(ref.notes) + check_camera_motion(poses, camera.name)
    warnings = list(ref.warnings) + [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
    warnings += _preflight(s, out, model_dir, frames, size, ref.path)
    try:  # after the cheap checks, before the renders
        prep = reference_prep.ensure(context, None if worker_python is None else str(worker_python))
    except reference_prep.ReferencePrepError as exc:
        raise JobSetupError(f"{exc} (Or turn off Prepare Reference, --no-prepare on the command line, to use the "
                            "photo's centre square as it is.)") from None
    if prep is not None:
        notes.append(f"Reference prepared: {prep.summary()}")
        warnings += prep.warnings

    job_dir = out / JOB_SUBDIR
    cond_dir = job_dir / CONDITION_SUBDIR
    try:
        cond_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobSetupError(str(failures.translate(exc))) from None
    projected, projected_from = ref.path, None
    if prep is not None and s.use_proxy_views:
        try:
            projected, projected_from = reference_prep.copy_crop(prep, job_dir), prep.label
        except reference_prep.ReferencePrepError as exc:
            raise JobSetupError(str(exc)) from None
    conditions, proxies, cond_warnings = render_conditions(
        scene, camera, s.head_anchor, frames, cond_dir, size, reference=projected, proxy_views=s.use_proxy_views,
        reference_label=projected_from)
    warnings += cond_warnings

    specs = [jobspec.FrameSpec(index=i, scene_frame=p.frame, label=list(p.label),
                               condition=_rel(conditions[i], job_dir),
                               proxy=None if proxies is None else _rel(proxies[i], job_dir))
             for i, p in enumerate(poses)]
    settings = jobspec.GenerationSettings(steps=s.steps, guidance=s.guidance, eta=s.eta, seed=s.seed, size=size,
                                          scheduler=SCHEDULER_IDS.get(s.scheduler, "ddim"))
    job = jobspec.Job(references=[str(ref.path.resolve())], frames=specs, model=str(model_dir.resolve()),
                      output=str(out.resolve()), settings=settings, device=s.device.lower(),
                      memory=s.memory.lower(), compile=s.use_compile,
                      reference_prep=None if prep is None else prep.job_prep())
    try:
        jobspec.write_job(job, job_dir)
        write_dataset(out, poses)
    except (jobspec.JobError, PoseError) as exc:
        raise JobSetupError(f"Cannot write the job: {exc}") from None
    except OSError as exc:
        raise JobSetupError(str(failures.translate(exc))) from None
    return PreparedJob(job_dir, out, job, poses, warnings, notes)


def _preflight(s, out: Path, model_dir: Path, frames: list[int], size: int, reference: Path) -> list[str]:
    """The shared pre-work checks (addon.preflight_checks) before anything is rendered or written."""
    from .preflight_checks import check_before_render

    try:
        images = folder_conditions(s.condition_folder, len(frames))[0] if s.condition_source == 'IMAGE_FOLDER' \
            else None
        return check_before_render(s, out, model_dir, frames, size, reference, images)
    except preflight.PreflightError as exc:
        raise JobSetupError(str(exc)) from None
