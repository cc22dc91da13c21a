"""Scene -> per-frame EG3D camera labels, from the depsgraph-evaluated camera and head anchor."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import bpy
import numpy as np

from .core import cameras, preflight

MAX_ABS_YAW = 90.0
MAX_ABS_PITCH = 45.0
DATASET_FILE = "dataset.json"


class PoseError(ValueError):
    """The scene cannot give camera poses; the message says what to fix."""


@dataclass
class FramePose:
    """One scene frame's camera label and anything odd about it."""

    frame: int
    label: list[float]
    yaw: float
    pitch: float
    warnings: list[str] = field(default_factory=list)


def frame_filename(frame: int) -> str:
    """The image name a scene frame gets (matches dp3d_core.job's default frame pattern)."""
    return f"frame_{frame:04d}.png"


def head_anchor(obj: bpy.types.Object) -> cameras.HeadAnchor:
    """HeadAnchor of an (evaluated) Empty: its world matrix and size = display size x scale."""
    matrix = np.array(obj.matrix_world, dtype=np.float64)
    display = obj.empty_display_size if obj.type == 'EMPTY' else 1.0
    try:
        return cameras.HeadAnchor(matrix, cameras.anchor_size_from_matrix(matrix, display))
    except cameras.CameraError as exc:
        raise PoseError(f"Head anchor '{obj.name}': {exc}") from exc


def blender_camera(obj: bpy.types.Object, scene: bpy.types.Scene) -> cameras.BlenderCamera:
    """BlenderCamera of an (evaluated) camera object under the scene's render settings."""
    data = obj.data
    if data.type != 'PERSP':
        raise PoseError(f"Camera '{obj.name}' is {data.type.lower()}; DiffPortrait3D needs a perspective camera "
                        "(Camera properties > Lens > Type: Perspective).")
    render = scene.render
    pct = render.resolution_percentage / 100.0
    try:
        return cameras.BlenderCamera(
            matrix_world=np.array(obj.matrix_world, dtype=np.float64),
            lens=data.lens, sensor_width=data.sensor_width, sensor_height=data.sensor_height,
            sensor_fit=data.sensor_fit, shift_x=data.shift_x, shift_y=data.shift_y,
            resolution_x=max(1, int(render.resolution_x * pct)),
            resolution_y=max(1, int(render.resolution_y * pct)),
            pixel_aspect_x=render.pixel_aspect_x, pixel_aspect_y=render.pixel_aspect_y)
    except cameras.CameraError as exc:
        raise PoseError(f"Camera '{obj.name}': {exc}") from exc


def pose_warnings(label, all_around: bool = False) -> list[str]:
    """Plain-words reasons why a label is a poor view for the model (empty when fine). ``all_around``: the model
    sees heads from every side (DiffPortrait360), so a yaw beyond +-90 degrees is no reason."""
    cam2world, k = cameras.from_label(label)
    out = []
    # The head centre is the EG3D origin; project it into the image.
    rot, origin = cam2world[:3, :3], cam2world[:3, 3]
    p = rot.T @ (-origin)
    if p[2] <= 1e-9:
        out.append("the camera looks away from the head (head centre is behind it)")
    else:
        u, v, _ = k @ (p / p[2])
        if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
            out.append("the head centre is outside the image")
    yaw, pitch = cameras.yaw_pitch_from_cam2world(cam2world)
    if abs(yaw) > MAX_ABS_YAW and not all_around:
        out.append(f"yaw {yaw:.1f} deg is beyond +-{MAX_ABS_YAW:.0f} (the model only saw the front of heads)")
    if abs(pitch) > MAX_ABS_PITCH:
        out.append(f"pitch {pitch:.1f} deg is beyond +-{MAX_ABS_PITCH:.0f}")
    return out


def scene_poses(scene: bpy.types.Scene, camera: bpy.types.Object | None, anchor: bpy.types.Object | None,
                frames: Iterable[int], depsgraph: bpy.types.Depsgraph | None = None,
                all_around: bool = False) -> list[FramePose]:
    """Labels for each frame, read from the evaluated camera and anchor (constraints, parents, drivers).

    The scene's current frame is restored afterwards. ``depsgraph`` defaults to the context's.
    ``all_around``: see :func:`pose_warnings`.
    """
    if anchor is None:
        raise PoseError("No head anchor: add one with 'Add Head Anchor' or pick an Empty as Head Anchor.")
    if camera is None:
        raise PoseError("No camera: add a turntable, set the scene camera, or pick a camera in the settings.")
    if camera.type != 'CAMERA':
        raise PoseError(f"'{camera.name}' is not a camera object.")
    frames = list(frames)
    if not frames:
        raise PoseError("The frame range is empty: make End greater than or equal to Start.")
    old_frame, old_sub = scene.frame_current, scene.frame_subframe
    out: list[FramePose] = []
    try:
        for frame in frames:
            scene.frame_set(frame)
            dg = depsgraph or bpy.context.evaluated_depsgraph_get()
            cam_eval = camera.evaluated_get(dg)
            anchor_eval = anchor.evaluated_get(dg)
            try:
                label = cameras.blender_to_label(blender_camera(cam_eval, scene), head_anchor(anchor_eval))
            except cameras.CameraError as exc:
                raise PoseError(f"Frame {frame}: {exc}") from exc
            yaw, pitch = cameras.yaw_pitch_from_cam2world(label[:16].reshape(4, 4))
            out.append(FramePose(frame, [float(x) for x in label], yaw, pitch, pose_warnings(label, all_around)))
    finally:
        scene.frame_set(old_frame, subframe=old_sub)
    return out


FULL_TURN_TOLERANCE_DEG = 0.5


def is_full_turn(poses: list[FramePose]) -> bool:
    """True when the frames go once around the head in equal steps at one pitch, the last frame one step before
    the first (a closed loop: no frame repeats another)."""
    if len(poses) < 3:
        return False
    steps = [(poses[(i + 1) % len(poses)].yaw - p.yaw + 180.0) % 360.0 - 180.0 for i, p in enumerate(poses)]
    want = 360.0 / len(poses)
    if not (all(abs(s - want) < FULL_TURN_TOLERANCE_DEG for s in steps)
            or all(abs(s + want) < FULL_TURN_TOLERANCE_DEG for s in steps)):
        return False
    return max(p.pitch for p in poses) - min(p.pitch for p in poses) < FULL_TURN_TOLERANCE_DEG


def dataset_dict(poses: Iterable[FramePose]) -> dict:
    """EG3D ``dataset.json`` content: ``{"labels": [[file name, 25 floats], ...]}``."""
    return {"labels": [[frame_filename(p.frame), list(p.label)] for p in poses]}


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it is writable; raise PoseError otherwise."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".portrait3d_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PoseError(f"Cannot write to the output folder '{path}': {exc.strerror or exc}. "
                        "Choose a folder you can write to.") from exc
    return path


def output_folder(scene: "bpy.types.Scene") -> Path:
    """The settings' output folder as an absolute, writable folder; PoseError says what to fix."""
    folder = scene.portrait3d.output_folder.strip()
    if not folder:
        raise PoseError("No output folder: set Output Folder in the Portrait 3D panel.")
    if folder.startswith("//") and not bpy.data.filepath:
        raise PoseError("The output folder is relative to the .blend file, which is not saved yet: "
                        "save the file or choose an absolute output folder.")
    try:  # proves it can be created and written, and leaves nothing behind (writing comes after every check)
        return preflight.probe_output_folder(bpy.path.abspath(folder))
    except preflight.PreflightError as exc:
        raise PoseError(str(exc)) from None


def write_dataset(folder: str | os.PathLike, poses: Iterable[FramePose]) -> Path:
    """Write ``dataset.json`` into ``folder`` (atomically); return its path."""
    path = check_writable_folder(folder) / DATASET_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(dataset_dict(poses), indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        raise PoseError(f"Cannot write {path}: {exc.strerror or exc}.") from exc
    return path
