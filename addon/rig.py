"""The turntable rig: head anchor Empty, and a camera orbiting it the way EG3D's cameras orbit a head.

EG3D puts the camera on a sphere of radius 2.7 around the head centre (world origin) and makes it
look at the pivot (0, 0, 0.2), a point 0.2 in front of the centre, with world +Y up. The rig
reproduces exactly that, so its labels equal ``cameras.sample_lookat`` labels:

- ``Turntable Orbit``: Empty at the anchor centre; rotation X = -pitch (static), Z = yaw (keyed,
  linear, one key per frame). Its child camera sits at (0, -2.7 * size, 0): on the sphere.
- ``Turntable Look-at``: Empty at (0, -0.2 * size, 0) in the anchor frame, i.e. EG3D's pivot.
- ``Turntable Camera``: Track To the look-at Empty, using its Z (the anchor's up) as up: no roll.

Rig objects are parented to the anchor with the anchor's scale cancelled, so offsets are in Blender
units. Re-run "Add Turntable" after changing the anchor's size.
"""
from __future__ import annotations

import math

import bpy
import numpy as np
from bpy_extras import anim_utils
from mathutils import Matrix

from .core import cameras
from .poses import PoseError, head_anchor

RIG_KEY = "portrait3d_rig"
ANCHOR_NAME = "Head Anchor"
ORBIT_NAME = "Turntable Orbit"
TARGET_NAME = "Turntable Look-at"
CAMERA_NAME = "Turntable Camera"


def turntable_yaws(frames: int, yaw_range: float, start: float | None = None,
                   full_turn: bool = False) -> list[float]:
    """Yaw (radians) per frame, sweeping -yaw_range..+yaw_range.

    A partial sweep includes both ends; a full turn (range >= 180 deg) stops one step short, so the
    last frame never repeats the first. With ``start`` (the photo's view) the sweep begins there and covers
    the same span (twice ``yaw_range``) toward the other side of the face (toward +yaw for a frontal start).
    ``full_turn`` (the DiffPortrait360 turntable): frame i at ``start`` (default 0, the front) + 360 deg * i / N,
    a closed loop; ``yaw_range`` is not used.
    """
    if frames < 1:
        raise PoseError(f"A turntable needs at least 1 frame, got {frames}.")
    if full_turn:
        first = 0.0 if start is None else start
        return [first + 2.0 * math.pi * i / frames for i in range(frames)]
    if frames == 1:
        return [0.0 if start is None else start]
    span = 2.0 * yaw_range
    full_turn = span >= 2.0 * math.pi - 1e-9
    step = span / frames if full_turn else span / (frames - 1)
    if start is not None:
        direction = -1.0 if start > 1e-6 else 1.0
        return [start + direction * i * step for i in range(frames)]
    return [-yaw_range + i * step for i in range(frames)]


def add_head_anchor(context: bpy.types.Context, size: float = 1.0,
                    location=None) -> bpy.types.Object:
    """Create an Empty 'Head Anchor' (sphere of radius ``size``) and make it the scene's anchor."""
    scene = context.scene
    anchor = bpy.data.objects.new(ANCHOR_NAME, None)
    anchor.empty_display_type = 'SPHERE'
    anchor.empty_display_size = size
    anchor.location = context.scene.cursor.location if location is None else location
    scene.collection.objects.link(anchor)
    scene.portrait3d.head_anchor = anchor
    return anchor


def rig_objects(scene: bpy.types.Scene) -> list[bpy.types.Object]:
    """The turntable rig objects in this scene."""
    return [obj for obj in scene.objects if RIG_KEY in obj]


def remove_turntable(scene: bpy.types.Scene) -> None:
    """Delete this scene's rig objects, their camera data and actions."""
    for obj in rig_objects(scene):
        data = obj.data
        action = obj.animation_data.action if obj.animation_data else None
        bpy.data.objects.remove(obj, do_unlink=True)
        if data is not None and data.users == 0:
            bpy.data.cameras.remove(data)
        if action is not None and action.users == 0:
            bpy.data.actions.remove(action)


def yaw_fcurve(orbit: bpy.types.Object) -> bpy.types.FCurve | None:
    """The orbit's Z-rotation F-curve (Blender 4.4+ slotted actions)."""
    ad = orbit.animation_data
    if ad is None or ad.action is None:
        return None
    bag = anim_utils.action_get_channelbag_for_slot(ad.action, ad.action_slot)
    return bag.fcurves.find("rotation_euler", index=2) if bag else None


def _new_rig_object(scene: bpy.types.Scene, name: str, data, role: str, parent: bpy.types.Object,
                    parent_inverse: Matrix) -> bpy.types.Object:
    obj = bpy.data.objects.new(name, data)
    obj[RIG_KEY] = role
    scene.collection.objects.link(obj)
    obj.parent = parent
    obj.matrix_parent_inverse = parent_inverse
    return obj


def build_turntable(scene: bpy.types.Scene, anchor: bpy.types.Object, *, frames: int, yaw_range: float,
                    pitch: float, size_px: int, frame_start: int | None = None,
                    start_yaw: float | None = None, full_turn: bool = False) -> bpy.types.Object:
    """(Re)build the orbiting camera around ``anchor``; set scene camera, frame range and resolution.

    Angles in radians. ``start_yaw``, ``full_turn``: see :func:`turntable_yaws`. Returns the camera
    object. Any previous rig in the scene is replaced.
    """
    if anchor is None:
        raise PoseError("No head anchor: add one with 'Add Head Anchor' or pick an Empty as Head Anchor.")
    yaws = turntable_yaws(frames, yaw_range, start_yaw, full_turn)
    settings = scene.portrait3d
    remove_turntable(scene)

    size = head_anchor(anchor).size
    scale = anchor.matrix_world.to_scale()
    if min(abs(s) for s in scale) < 1e-12:
        raise PoseError(f"Head anchor '{anchor.name}' has a zero scale; give every axis a non-zero scale.")
    unscale = Matrix.Diagonal((1.0 / scale.x, 1.0 / scale.y, 1.0 / scale.z, 1.0))
    radius = cameras.EG3D_RADIUS * size
    pivot_x, pivot_y, pivot_z = cameras.EG3D_PIVOT
    # EG3D (x, y, z) -> anchor-local Blender (x, -z, y).
    target_local = (pivot_x * size, -pivot_z * size, pivot_y * size)

    orbit = _new_rig_object(scene, ORBIT_NAME, None, "orbit", anchor, unscale)
    orbit.empty_display_type = 'CIRCLE'
    orbit.empty_display_size = radius
    orbit.rotation_mode = 'XYZ'  # Z(yaw) . X(-pitch): pitch first, then yaw about the anchor's up.
    target = _new_rig_object(scene, TARGET_NAME, None, "target", anchor, unscale)
    target.empty_display_type = 'PLAIN_AXES'
    target.empty_display_size = 0.1 * size
    target.location = target_local

    cam_data = bpy.data.cameras.new(CAMERA_NAME)
    cam_data.sensor_fit = 'HORIZONTAL'
    cam_data.sensor_width = 36.0
    frontal = cameras.to_label(cameras.sample_lookat(math.pi / 2, math.pi / 2),
                               cameras.intrinsics_from_focal(cameras.EG3D_FOCAL))
    cam_data.lens = cameras.label_to_blender(frontal, head_anchor(anchor), sensor_width=cam_data.sensor_width,
                                             resolution_x=size_px, resolution_y=size_px).lens
    cam_data.clip_start = 0.05 * size
    cam_data.clip_end = 100.0 * size
    camera = _new_rig_object(scene, CAMERA_NAME, cam_data, "camera", orbit, Matrix.Identity(4))
    camera.location = (0.0, -radius, 0.0)
    track = camera.constraints.new('TRACK_TO')
    track.target = target
    track.track_axis = 'TRACK_NEGATIVE_Z'
    track.up_axis = 'UP_Y'
    track.use_target_z = True

    start = scene.frame_start if frame_start is None else frame_start
    orbit.rotation_euler = (-pitch, 0.0, yaws[0])
    for i, yaw in enumerate(yaws):
        orbit.rotation_euler[2] = yaw
        orbit.keyframe_insert("rotation_euler", index=2, frame=start + i)
    fcurve = yaw_fcurve(orbit)
    for key in fcurve.keyframe_points:
        key.interpolation = 'LINEAR'

    scene.camera = camera
    settings.camera = None  # follow the scene camera, i.e. this turntable
    scene.frame_start = start
    scene.frame_end = start + len(yaws) - 1
    scene.frame_set(start)
    render = scene.render
    render.resolution_x = render.resolution_y = size_px
    render.resolution_percentage = 100
    render.pixel_aspect_x = render.pixel_aspect_y = 1.0
    return camera


def expected_labels(frames: int, yaw_range: float, pitch: float,
                    start_yaw: float | None = None, full_turn: bool = False) -> list[np.ndarray]:
    """The EG3D labels the rig reproduces, from ``cameras.sample_lookat`` (for checks and tests)."""
    return [orbit_label(yaw, pitch) for yaw in turntable_yaws(frames, yaw_range, start_yaw, full_turn)]


def orbit_label(yaw: float, pitch: float, radius: float = cameras.EG3D_RADIUS,
                k: np.ndarray | None = None) -> np.ndarray:
    """The EG3D label of a turntable camera at ``yaw``/``pitch`` (radians; yaw 0 = in front of the face, pi =
    straight behind the head), ``radius`` from the head centre, looking at EG3D's pivot."""
    v = math.pi / 2 * (1.0 - math.sin(pitch))  # inverse of pitch = asin(1 - 2 v / pi)
    k = cameras.intrinsics_from_focal(cameras.EG3D_FOCAL) if k is None else k
    return cameras.to_label(cameras.sample_lookat(math.pi / 2 + yaw, v, cameras.EG3D_PIVOT, radius), k)


def back_label(front_label) -> np.ndarray:
    """The back view's camera: straight behind the head (yaw 180 deg), at the pitch, distance and intrinsics of
    ``front_label`` (the turntable's first frame)."""
    c2w, k = cameras.from_label(front_label)
    _, pitch = cameras.yaw_pitch_from_cam2world(c2w)
    return orbit_label(math.pi, math.radians(pitch), float(np.linalg.norm(c2w[:3, 3])), k)


def photo_view(context: bpy.types.Context, python: str | None = None) -> tuple[float, float]:
    """(yaw, pitch) in radians of the prepared reference photo's camera (prepared now when needed; raises
    reference_prep.ReferencePrepError)."""
    from . import reference_prep

    settings = context.scene.portrait3d
    result = reference_prep.stored(settings)
    if result is None:
        result = reference_prep.run(context, python)
    limit = math.radians(89.0)
    return math.radians(result.camera_yaw()), max(-limit, min(limit, math.radians(result.pitch)))
