"""Scene settings + camera poses + condition images -> a job folder the worker reads.

Layout (inside the output folder, so a job lives next to its frames)::

    <out>/frame_0001.png ...         frames (written by the worker)
    <out>/dataset.json               EG3D labels of the frames
    <out>/.job/job.json              the job (dp3d_core.job)
    <out>/.job/conditions/cond_0001.png, proxy_0001.png ...
"""
from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import back_view, background_render, model_manager, preferences, reference_prep
from .core import CORE_PARENT, cameras, failures, job as jobspec, preflight
from .model_family import ModelFamily, family_of
from .poses import FramePose, PoseError, head_anchor, is_full_turn, scene_poses, write_dataset
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
    back_only: bool = False  # the worker runs only the back stage (--back-only)
    back_key: str = ""       # what a back view generated for this job is made from (back_view.inputs_key)

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


FALLBACK_SIZE = 512  # "Model's Resolution" when the model's configs do not say (DiffPortrait3D's own size)


def output_size(context: bpy.types.Context, model: str | os.PathLike | None = None) -> int:
    """The frames' side in pixels: Custom Size, or (the default) the resolution the model to use was trained at.
    Add Turntable (the camera's render resolution) and the job both ask here, so they agree."""
    return output_size_and_source(context, model)[0]


def output_size_and_source(context: bpy.types.Context,
                           model: str | os.PathLike | None = None) -> tuple[int, str]:
    """(size, where it comes from in words) for :func:`output_size` and the panel."""
    s = context.scene.portrait3d
    if s.size_mode == 'CUSTOM':
        return int(s.output_size), "custom"
    try:
        folder = model_folder(context, model)
    except JobSetupError:  # no usable model yet: Generate says so itself
        return FALLBACK_SIZE, "no usable model found yet"
    size = model_manager.model_resolution(folder)
    return (size, f"from the model {folder.name}") if size else (FALLBACK_SIZE, "the model's configs do not say")


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
    a fresh result is stored: the job records its crop and camera, and proxy views project the crop from it.
    Blocking (background mode, scripts, tests): the steps of a :class:`JobPreparation` in a row, all frames of a
    phase in one set-up of the scene (no UI to hand control back to between them)."""
    return JobPreparation(context, model=model, worker_python=worker_python, **BLOCKING).run()


@dataclass
class PrepProgress:
    """Where a preparation is: ``phase`` (plain words), ``done`` of ``total`` units."""

    phase: str
    done: int = 0
    total: int = 0

    @property
    def text(self) -> str:
        return f"{self.phase} {self.done}/{self.total}" if self.total else self.phase

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


# UI steps: at most FRAMES_PER_STEP condition / proxy renders (one Blender render each), and no further render
# once a step has taken STEP_BUDGET_S (so a slow render is a step of its own); POSES_PER_STEP poses (one
# scene.frame_set each).
FRAMES_PER_STEP = 4
STEP_BUDGET_S = 0.1
POSES_PER_STEP = 8
BLOCKING = {"frames_per_step": None, "step_budget_s": None, "render_elsewhere": False}  # one batch per phase
ERROR_LOG = "addon_error.log"  # in the job folder: what went wrong on the add-on side, with tracebacks


def append_log(job_dir: Path, text: str) -> Path | None:
    """Append ``text`` to ``<job dir>/addon_error.log`` with a time stamp; its path (None if unwritable)."""
    path = Path(job_dir) / ERROR_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text.rstrip()}\n")
    except OSError:
        return None
    return path
STAGING_PREFIX = ".staging-"


def _move_into(paths: list[Path], folder: Path) -> list[Path]:
    """Rename each file into ``folder`` (same file system: each rename is atomic); the new paths. The last step
    of a preparation: the staged images replace the job's, then job.json and dataset.json are written."""
    moved = []
    try:
        for p in paths:
            os.replace(p, folder / p.name)
            moved.append(folder / p.name)
    except OSError as exc:
        raise JobSetupError(str(failures.translate(exc))) from None
    return moved


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class JobPreparation:
    """``prepare_job`` cut into small steps, so the UI can run it from a timer and stay responsive.

    The constructor does the quick checks (JobSetupError with the fix) and takes a snapshot of the settings.
    Each :meth:`step` then does a bounded amount of main-thread work: ``poses_per_step`` camera poses or
    up to ``frames_per_step`` condition/proxy renders (no further one once ``step_budget_s`` has passed), the
    renders of a step inside one set-up and restore of the scene, so the user's scene is as it was between steps
    (``frames_per_step=None``: all frames of a phase in one set-up, the blocking path's choice). :meth:`run` does
    all steps in a row.
    New images land in a staging folder and only replace the job's condition images, with ``job.json``, in
    the last step; :meth:`cancel` (or a failed step) removes the staging folder and a proxy head this
    preparation built, so a cancelled preparation leaves the scene and the job folder as they were.
    """

    def __init__(self, context: bpy.types.Context, *, model: str | os.PathLike | None = None,
                 worker_python: str | os.PathLike | None = None,
                 frames_per_step: int | None = FRAMES_PER_STEP, step_budget_s: float | None = STEP_BUDGET_S,
                 poses_per_step: int = POSES_PER_STEP, render_elsewhere: bool = True,
                 back_only: bool = False, back_source: str | os.PathLike | None = None) -> None:
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
        size = output_size(context, model)
        if size % 64:
            suggestion = max(64, round(size / 64) * 64)
            if s.size_mode != 'CUSTOM':
                raise JobSetupError(f"The model's resolution ({size} px, from its configs) is not a multiple of 64, "
                                    f"which generation needs: set Output Size to Custom with {suggestion} px.")
            raise JobSetupError(f"Output Size {size} px is not a multiple of 64 (the model needs that); use "
                                f"{suggestion}.")
        try:
            self.reference = check_reference(s.reference_image, prepared=s.use_reference_prep)
        except ReferenceImageError as exc:
            raise JobSetupError(str(exc)) from None
        self.out = output_folder(scene)
        self.model_dir = model_folder(context, model)
        try:
            self.family: ModelFamily = family_of(self.model_dir)
        except preflight.PreflightError as exc:
            raise JobSetupError(str(exc)) from None
        # DiffPortrait360: the back view (contract 2 of issue 17). ``back_only``: a job whose worker makes only the
        # back view; ``back_source``: the back view such a run made, projected onto the proxy head (3D-aware noise)
        # while the job still lets the worker generate it (it reuses the file for the same seed).
        self.back_only = back_only
        self.back_source = None if back_source is None else Path(back_source)
        self.back_key = back_view.inputs_key(s.reference_image, self.model_dir, size)
        self.back: back_view.BackPlan | None = None
        if back_only and not self.family.is_360:
            raise JobSetupError(f"The model {self.model_dir.name} is a DiffPortrait3D model, which cannot make the "
                                "back of the head: pick a DiffPortrait360 model folder.")
        if self.family.is_360:
            try:
                self.back = back_view.plan(s, back_head=self.family.back_head, key=self.back_key,
                                           generate_new=back_only)
            except back_view.BackViewError as exc:
                raise JobSetupError(str(exc)) from None
        if s.condition_source == 'MESH' and s.condition_mesh is None:
            raise JobSetupError("Condition Source is Custom Mesh but no mesh is picked: set Condition Mesh "
                                "to your head model, or choose Procedural Head.")
        self.frames = list(range(start, end + 1))
        self.size = size
        self.frames_per_step = len(self.frames) if frames_per_step is None else max(1, int(frames_per_step))
        self.step_budget_s = step_budget_s
        self.poses_per_step = max(1, int(poses_per_step))
        self.render_elsewhere = render_elsewhere  # in a background Blender when there is one (background_render)
        # Names, not references: the objects are looked up again at every step (undo may replace them).
        self._scene_name, self._camera_name, self._anchor_name = scene.name, camera.name, s.head_anchor.name
        self._source = s.condition_source
        self._mesh_name = s.condition_mesh.name if s.condition_mesh is not None else ""
        self._condition_folder = s.condition_folder
        self._proxy_seed = s.proxy_seed
        self._proxy_views = s.use_proxy_views and not back_only  # 360: proxies project the back view too
        self._use_prep = s.use_reference_prep
        if (self._proxy_views and not self._use_prep and not self.reference.blender_reads
                and self._source != 'IMAGE_FOLDER'):
            raise JobSetupError(f"3D-Aware Noise projects the photo in Blender, which cannot read "
                                f"{self.reference.path.name}: turn Prepare Reference on (on the command line: drop "
                                "--no-prepare; it gives Blender a PNG of the face crop), or save the photo as JPEG.")
        self._worker_python = None if worker_python is None else str(worker_python)
        self._settings = jobspec.GenerationSettings(steps=s.steps, guidance=s.guidance, eta=s.eta, seed=s.seed,
                                                    size=size, scheduler=SCHEDULER_IDS.get(s.scheduler, "ddim"))
        self._device, self._memory, self._compile = s.device.lower(), s.memory.lower(), s.use_compile
        self.job_dir = self.out / JOB_SUBDIR
        self.progress = PrepProgress("Checking the job")
        self.result: PreparedJob | None = None
        self.frames_rendered = 0  # condition + proxy renders so far (tests check the per-step bound)
        self.waiting = False  # True while the steps only wait for another process (the UI may poll less often)
        self._built_head = ""
        self._back_label: list[float] | None = None
        self._steps = self._run()

    # ------------------------------------------------------------ driving

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def needs_back_stage(self) -> bool:
        """A DiffPortrait360 job whose 3D-aware proxies must project a back view nobody has made yet: the worker's
        back stage (a ``back_only`` preparation) has to run first, then this job with ``back_source``."""
        return (self.back is not None and self.back.image is None and self.back_source is None and
                not self.back_only and self._proxy_views and self._source != 'IMAGE_FOLDER')

    def step(self) -> bool:
        """Do the next small piece of work; True once the job is written (``result`` is set)."""
        if self.result is not None:
            return True
        try:
            self.progress = next(self._steps)
        except StopIteration as stop:
            self.result = stop.value
            return True
        except ReferenceError:
            raise JobSetupError("The scene changed while the job was being prepared (an object was removed); "
                                "press Generate again.") from None
        return False

    def run(self) -> PreparedJob:
        while not self.step():
            pass
        return self.result

    def cancel(self) -> None:
        """Stop between steps: nothing of this preparation stays (staging folder, a proxy head it built)."""
        self._steps.close()

    # ------------------------------------------------------------ the steps

    def _objects(self) -> tuple[bpy.types.Scene, bpy.types.Object, bpy.types.Object]:
        scene = bpy.data.scenes.get(self._scene_name)
        camera = bpy.data.objects.get(self._camera_name)
        anchor = bpy.data.objects.get(self._anchor_name)
        for thing, what, name in ((scene, "scene", self._scene_name), (camera, "camera", self._camera_name),
                                  (anchor, "head anchor", self._anchor_name)):
            if thing is None:
                raise JobSetupError(f"The {what} '{name}' was deleted or renamed while the job was being prepared; "
                                    "press Generate again.")
        return scene, camera, anchor

    def _condition_objects(self, scene, anchor) -> list[bpy.types.Object]:
        from .condition_render import find_proxy_heads
        from .proxy_head import ProxyHeadError, build_proxy_head

        if self._source == 'MESH':
            mesh = bpy.data.objects.get(self._mesh_name)
            if mesh is None:
                raise JobSetupError(f"The condition mesh '{self._mesh_name}' was deleted or renamed; pick it again.")
            return [mesh]
        heads = find_proxy_heads(scene)
        if heads:
            return heads
        try:
            head = build_proxy_head(self._proxy_seed, anchor)
        except ProxyHeadError as exc:
            raise JobSetupError(f"Cannot build the proxy head: {exc}") from None
        self._built_head = head.name
        return [head]

    def _render_batches(self, phase: str, open_renderer):
        """Render every frame in batches, each inside one set-up of the scene: at most ``frames_per_step`` frames
        and none started after ``step_budget_s``. Yields progress after each batch; returns the paths."""
        paths: list[Path] = []
        todo = list(self.frames)
        while todo:
            started = time.perf_counter()
            with open_renderer() as render:
                for _ in range(min(self.frames_per_step, len(todo))):
                    path = render(todo.pop(0))
                    self.frames_rendered += 1
                    strip_png_metadata(path)
                    paths.append(path)
                    if self.step_budget_s is not None and time.perf_counter() - started >= self.step_budget_s:
                        break
            yield PrepProgress(phase, len(paths), len(self.frames))
        return paths

    def _render_in_background(self, command: list[str], staging: Path, names: list[str], with_proxies: bool,
                              projected: Path, projected_from: list[float] | None):
        """Render in a background Blender (see background_render): (conditions, proxies or None), or a warning
        sentence when it could not (the caller then renders here; the details go to the job's log)."""
        n = len(self.frames)
        scene, camera, anchor = self._objects()
        proxy = None
        if with_proxies:
            back = self._back_projection()
            proxy = {"head": names[0], "reference": str(projected),
                     "label": None if projected_from is None else list(projected_from), "anchor": anchor.name,
                     "back_image": None if back is None else str(back[0]),
                     "back_label": None if back is None else list(back[1])}
        try:
            process = background_render.RenderProcess(command, scene, staging, camera=camera.name, objects=names,
                                                      frames=self.frames, size=self.size, proxy=proxy)
        except (OSError, RuntimeError) as exc:
            return self._fallback(f"it could not start: {exc}")
        try:
            last, last_change = None, time.monotonic()
            self.waiting = True
            while (rc := process.poll()) is None:
                done = process.counts()
                if done != last:
                    last, last_change = done, time.monotonic()
                elif time.monotonic() - last_change > background_render.STALL_S:
                    return self._fallback(f"no image for {background_render.STALL_S:.0f} s: "
                                          + " | ".join(process.tail(3)), process.tail(40))
                if with_proxies and done["cond"] >= n:
                    yield PrepProgress("Rendering 3D-aware proxy views", done["proxy"], n)
                else:
                    yield PrepProgress("Rendering conditions", done["cond"], n)
            conditions = [staging / f"cond_{f:04d}.png" for f in self.frames]
            proxies = [staging / f"proxy_{f:04d}.png" for f in self.frames] if with_proxies else None
            if rc != 0 or not all(p.is_file() for p in [*conditions, *(proxies or [])]):
                return self._fallback(f"exit code {rc}: " + " | ".join(process.tail(3)), process.tail(40))
            return conditions, proxies
        finally:
            self.waiting = False
            process.kill()

    def _fallback(self, why: str, lines: list[str] = ()) -> str:
        log = append_log(self.job_dir, f"background Blender render failed: {why}\n" + "\n".join(lines))
        return ("The condition images could not be rendered in a background Blender, so Blender rendered them "
                f"itself{f' (details in {log})' if log else ''}.")

    def _render_here(self, staging: Path, names: list[str], with_proxies: bool, projected: Path,
                     projected_from: list[float] | None):
        """Render in this Blender, in batches (see :meth:`_render_batches`): (conditions, proxies or None)."""
        from .condition_render import (ConditionRenderError, condition_renderer, project_reference,
                                       proxy_view_renderer)

        def objects() -> list[bpy.types.Object]:
            found = [bpy.data.objects.get(name) for name in names]
            if None in found:
                raise JobSetupError("The proxy head or condition mesh was deleted while the images were rendering; "
                                    "press Generate again.")
            return found

        def conditions_renderer():
            scene, camera, _ = self._objects()
            return condition_renderer(scene, camera, staging, size=self.size, objects=objects())

        try:
            conditions = yield from self._render_batches("Rendering conditions", conditions_renderer)
        except ConditionRenderError as exc:
            raise JobSetupError(f"Rendering the condition images failed: {exc}") from None
        if not with_proxies:
            return conditions, None
        try:
            _, _, anchor = self._objects()
            back = self._back_projection()
            extra = {} if back is None else {"back_image_path": back[0], "back_label_or_camera": back[1]}
            projection = project_reference(objects()[0], projected, projected_from, anchor=anchor, **extra)
            yield PrepProgress("Rendering 3D-aware proxy views", 0, len(self.frames))

            def proxies_renderer():
                scene, camera, _ = self._objects()
                return proxy_view_renderer(scene, camera, staging, proxy_object=objects()[0],
                                           projection=projection, size=self.size)
            proxies = yield from self._render_batches("Rendering 3D-aware proxy views", proxies_renderer)
        except ConditionRenderError as exc:
            raise JobSetupError(f"Rendering the 3D-aware proxy views failed: {exc}") from None
        return conditions, proxies

    def _back_projection(self) -> tuple[Path, list[float]] | None:
        """(image, EG3D label) of the back view the 3D-aware proxies project besides the photo (DiffPortrait360)."""
        if self.back is None or self._back_label is None:
            return None
        image = self.back.image or self.back_source
        return None if image is None else (image, self._back_label)

    def _render_back_condition(self, staging: Path, names: list[str]) -> Path:
        """Render the back view's condition image (the camera straight behind the head, ``_back_label``) here, with
        the same renderer as every frame's condition, from a temporary camera that is removed again."""
        from mathutils import Matrix

        from .condition_render import ConditionRenderError, condition_renderer

        scene, _, anchor = self._objects()
        objects = [bpy.data.objects.get(name) for name in names]
        if None in objects:
            raise JobSetupError("The proxy head or condition mesh was deleted while the images were rendering; "
                                "press Generate again.")
        head = head_anchor(anchor)
        try:
            spec = cameras.label_to_blender(self._back_label, head, resolution_x=self.size, resolution_y=self.size)
        except cameras.CameraError as exc:
            raise JobSetupError(f"The back view's camera cannot be set up: {exc}") from None
        data = bpy.data.cameras.new(".Portrait3D back camera")
        camera = bpy.data.objects.new(".Portrait3D back camera", data)
        try:
            data.sensor_fit, data.sensor_width, data.sensor_height = spec.sensor_fit, spec.sensor_width, \
                spec.sensor_height
            data.lens, data.shift_x, data.shift_y = spec.lens, spec.shift_x, spec.shift_y
            data.clip_start, data.clip_end = 0.05 * head.size, 100.0 * head.size
            camera.matrix_world = Matrix(spec.matrix_world.tolist())
            scene.collection.objects.link(camera)
            try:
                with condition_renderer(scene, camera, staging, size=self.size, objects=objects) as render:
                    rendered = render(scene.frame_current)
            except ConditionRenderError as exc:
                raise JobSetupError(f"Rendering the back view's condition image failed: {exc}") from None
            path = staging / back_view.CONDITION_FILE
            os.replace(rendered, path)
            strip_png_metadata(path)
            return path
        finally:
            bpy.data.objects.remove(camera, do_unlink=True)
            bpy.data.cameras.remove(data)

    def _prepared_reference(self):
        """The reference preparation's result (issue 13; None when it is off): the stored one, else made now. In the
        UI a preparation of the same inputs already running in the background is waited for step by step; making
        one here blocks (the panel starts it in the background as soon as the photo is picked, so this is rare)."""
        if not self._use_prep:
            return None
        scene, _, _ = self._objects()
        while self.step_budget_s is not None and reference_prep.pending(scene):
            self.waiting = True
            yield PrepProgress("Preparing the reference")
            scene, _, _ = self._objects()
        self.waiting = False
        context = bpy.context
        try:
            with context.temp_override(scene=scene) if context.scene != scene else contextlib.nullcontext():
                return reference_prep.ensure(bpy.context, self._worker_python)
        except reference_prep.ReferencePrepError as exc:
            raise JobSetupError(f"{exc} (Or turn off Prepare Reference, --no-prepare on the command line, to use the "
                                "photo's centre square as it is.)") from None

    def _run(self):
        n = len(self.frames)
        poses: list[FramePose] = []
        for batch in _chunks(self.frames, self.poses_per_step):
            scene, camera, anchor = self._objects()
            try:
                poses += scene_poses(scene, camera, anchor, batch, all_around=self.family.is_360)
            except PoseError as exc:
                raise JobSetupError(str(exc)) from None
            yield PrepProgress("Reading camera poses", len(poses), n)
        notes = list(self.reference.notes) + check_camera_motion(poses, self._camera_name)
        self._back_label = None
        if self.back is not None:
            from .rig import back_label
            self._back_label = [float(x) for x in back_label(poses[0].label)]
        warnings = list(self.reference.warnings) + [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
        scene, _, _ = self._objects()
        warnings += _preflight(scene.portrait3d, self.out, self.model_dir, self.frames, self.size,
                               self.reference.path, self.back)
        yield PrepProgress("Checking the job")
        prep = yield from self._prepared_reference()
        if prep is not None:
            notes.append(f"Reference prepared: {prep.summary()}")
            warnings += prep.warnings

        cond_dir = self.job_dir / CONDITION_SUBDIR
        try:
            cond_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.job_dir))
        except OSError as exc:
            raise JobSetupError(str(failures.translate(exc))) from None
        committed = False
        try:
            projected, projected_from = self.reference.path, None  # what proxy views project, from which camera
            if prep is not None and self._proxy_views:
                try:
                    projected, projected_from = reference_prep.copy_crop(prep, self.job_dir), prep.label
                except reference_prep.ReferencePrepError as exc:
                    raise JobSetupError(str(exc)) from None
            proxies = None
            if self._source == 'IMAGE_FOLDER':
                conditions, folder_warnings = folder_conditions(self._condition_folder, n)
                warnings += folder_warnings
                if self._proxy_views:
                    warnings.append("3D-Aware Noise needs a proxy head or mesh; it is off for an image-folder "
                                    "source.")
            else:
                scene, _, anchor = self._objects()
                names = [o.name for o in self._condition_objects(scene, anchor)]
                yield PrepProgress("Rendering conditions", 0, n)
                rendered = None
                command = background_render.blender_command() if self.render_elsewhere else None
                if command is not None:
                    rendered = yield from self._render_in_background(command, staging, names, self._proxy_views,
                                                                     projected, projected_from)
                    if isinstance(rendered, str):  # it failed: say so, and render here
                        warnings.append(rendered)
                        rendered = None
                if rendered is None:
                    rendered = yield from self._render_here(staging, names, self._proxy_views, projected,
                                                            projected_from)
                conditions, proxies = rendered
                conditions = _move_into(conditions, cond_dir)
                if proxies is not None:
                    proxies = _move_into(proxies, cond_dir)
            back = None
            if self.back is not None:
                scene, _, anchor = self._objects()
                names = [o.name for o in self._condition_objects(scene, anchor)]
                if self._source == 'IMAGE_FOLDER':
                    notes.append("The back view's condition image was rendered from the procedural proxy head (the "
                                 "condition folder has no image of the back of the head).")
                yield PrepProgress("Rendering the back view's condition")
                back_condition = _move_into([self._render_back_condition(staging, names)], cond_dir)[0]
                image = self.back.image
                back = jobspec.BackView(condition=_rel(back_condition, self.job_dir), label=self._back_label,
                                        image=None if image is None else _rel(image, self.job_dir),
                                        origin=self.back.origin, seed=self.back.seed)

            specs = [jobspec.FrameSpec(index=i, scene_frame=p.frame, label=list(p.label),
                                       condition=_rel(conditions[i], self.job_dir),
                                       proxy=None if proxies is None else _rel(proxies[i], self.job_dir))
                     for i, p in enumerate(poses)]
            if self.family.is_360 and is_full_turn(poses):
                self._settings.closed_loop = True
                notes.append(f"The {n} frames are one full turn: generated as a closed loop (the last frame's "
                             "neighbour is the first).")
            job = jobspec.Job(references=[str(self.reference.path.resolve())], frames=specs,
                              model=str(self.model_dir.resolve()), output=str(self.out.resolve()),
                              settings=self._settings, device=self._device, memory=self._memory,
                              compile=self._compile, reference_prep=None if prep is None else prep.job_prep(),
                              back=back)
            try:
                jobspec.write_job(job, self.job_dir)
                write_dataset(self.out, poses)
            except (jobspec.JobError, PoseError) as exc:
                raise JobSetupError(f"Cannot write the job: {exc}") from None
            except OSError as exc:
                raise JobSetupError(str(failures.translate(exc))) from None
            committed = True
            return PreparedJob(self.job_dir, self.out, job, poses, warnings, notes, back_only=self.back_only,
                               back_key=self.back_key)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not committed and self._built_head:
                from .proxy_head import remove_proxy_head
                remove_proxy_head(self._built_head)


def _preflight(s, out: Path, model_dir: Path, frames: list[int], size: int, reference: Path,
               back: back_view.BackPlan | None) -> list[str]:
    """The shared pre-work checks (addon.preflight_checks) before anything is rendered or written."""
    from .preflight_checks import check_before_render

    try:
        images = folder_conditions(s.condition_folder, len(frames))[0] if s.condition_source == 'IMAGE_FOLDER' \
            else None
        return check_before_render(s, out, model_dir, frames, size, reference, images, back)
    except preflight.PreflightError as exc:
        raise JobSetupError(str(exc)) from None
