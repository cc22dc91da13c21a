"""Cameras placed with ``label_to_blender`` read back through Blender's own evaluated data give the label again."""
from __future__ import annotations

import json
import math

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Matrix, Vector

from dp3d_core.cameras import (
    BLENDER_TO_EG3D,
    EG3D_PIVOT,
    BlenderCamera,
    HeadAnchor,
    anchor_size_from_matrix,
    blender_to_label,
    from_label,
    label_to_blender,
)

TOL = 1e-6
# world_to_camera_view does its matrix inverse and view-frame arithmetic in float32 (mathutils); across the
# anchors below that costs up to ~9e-6 in normalized image coordinates (0.005 px at 512). A convention error
# (mirror, flipped shift, wrong sensor fit) shows up as 1e-2 or more.
UV_TOL = 2e-5

# name -> (location, rotation_euler in degrees, scale, empty_display_size, parent rotation in degrees or None)
ANCHORS = {
    "identity": ((0, 0, 0), (0, 0, 0), (1, 1, 1), 1.0, None),
    "moved_turned": ((0.3, -1.2, 1.6), (10, -20, 35), (1, 1, 1), 0.1, None),
    "scaled_parented": ((1.0, 2.0, -0.5), (-15, 5, 120), (2.5, 2.5, 2.5), 0.4, (30, 0, -45)),
}

# name -> render/camera settings
RENDERS = {
    "square_h": dict(resolution_x=512, resolution_y=512, sensor_fit="HORIZONTAL"),
    "wide_auto_aspect": dict(resolution_x=640, resolution_y=400, sensor_fit="AUTO",
                             pixel_aspect_x=1.0, pixel_aspect_y=1.25),
    # wider in pixels but taller on screen: AUTO must pick the vertical fit from the pixel aspect
    "auto_flipped_by_aspect": dict(resolution_x=640, resolution_y=480, sensor_fit="AUTO", sensor_width=30.0,
                                   pixel_aspect_x=1.0, pixel_aspect_y=1.5),
    "tall_auto": dict(resolution_x=360, resolution_y=640, sensor_fit="AUTO"),
    "vertical_fit": dict(resolution_x=720, resolution_y=480, sensor_fit="VERTICAL", sensor_height=20.0,
                         pixel_aspect_x=1.5, pixel_aspect_y=1.0),
}

# Cases of the reference fixture used here, and principal-point offsets applied to them (lens shift).
LABEL_CASES = ("frontal", "yaw30_pitch15_combined", "profile_yaw_plus_90deg", "panohead_back_view")


@pytest.fixture(scope="module")
def reference_labels(fixtures_dir):
    data = json.loads((fixtures_dir / "eg3d_reference_poses.json").read_text())
    return {c["name"]: np.array(c["label"], dtype=float) for c in data["cases"]}


def _link(obj):
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _make_anchor(spec) -> bpy.types.Object:
    location, rotation, scale, display, parent_rotation = spec
    anchor = _link(bpy.data.objects.new("HeadAnchor", None))
    anchor.empty_display_type = "SINGLE_ARROW"
    anchor.empty_display_size = display
    anchor.location = location
    anchor.rotation_euler = [math.radians(a) for a in rotation]
    anchor.scale = scale
    if parent_rotation is not None:
        parent = _link(bpy.data.objects.new("AnchorParent", None))
        parent.location = (-0.7, 0.4, 0.9)
        parent.rotation_euler = [math.radians(a) for a in parent_rotation]
        anchor.parent = parent
    return anchor


def _head_anchor(anchor: bpy.types.Object, depsgraph) -> HeadAnchor:
    evaluated = anchor.evaluated_get(depsgraph)
    m = np.array(evaluated.matrix_world)
    return HeadAnchor(m, anchor_size_from_matrix(m, evaluated.empty_display_size))


def _adjusted_label(label: np.ndarray, settings: dict, cx: float, cy: float) -> np.ndarray:
    """The reference pose with intrinsics a Blender camera with these settings can represent."""
    out = label.copy()
    ycor = settings.get("pixel_aspect_y", 1.0) / settings.get("pixel_aspect_x", 1.0)
    out[16 + 4] = out[16] / (ycor * settings["resolution_y"] / settings["resolution_x"])  # fy
    out[16 + 2], out[16 + 5] = cx, cy
    return out


def _intrinsics_from_projection(p: np.ndarray) -> np.ndarray:
    """Normalized OpenCV intrinsics from Blender's camera projection matrix (OpenGL clip space)."""
    assert p[0, 1] == pytest.approx(0.0, abs=1e-9) and p[1, 0] == pytest.approx(0.0, abs=1e-9)
    assert p[3, 2] == pytest.approx(-1.0)
    return np.array([[p[0, 0] / 2, 0.0, (1 - p[0, 2]) / 2],
                     [0.0, p[1, 1] / 2, (1 + p[1, 2]) / 2],
                     [0.0, 0.0, 1.0]])


def _place_camera(scene, cam: BlenderCamera, object_scale=(1.0, 1.0, 1.0)) -> bpy.types.Object:
    data = bpy.data.cameras.new("Cam")
    data.lens = cam.lens
    data.sensor_width = cam.sensor_width
    data.sensor_height = cam.sensor_height
    data.sensor_fit = cam.sensor_fit
    data.shift_x = cam.shift_x
    data.shift_y = cam.shift_y
    obj = _link(bpy.data.objects.new("Cam", data))
    obj.matrix_world = Matrix(cam.matrix_world.tolist())
    obj.scale = object_scale
    scene.camera = obj
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = cam.resolution_x, cam.resolution_y, 100
    r.pixel_aspect_x, r.pixel_aspect_y = cam.pixel_aspect_x, cam.pixel_aspect_y
    return obj


def _read_back(obj: bpy.types.Object, scene, depsgraph) -> BlenderCamera:
    """Everything from Blender's evaluated data."""
    ev = obj.evaluated_get(depsgraph)
    r = scene.render
    return BlenderCamera(matrix_world=np.array(ev.matrix_world), lens=ev.data.lens,
                         sensor_width=ev.data.sensor_width, sensor_height=ev.data.sensor_height,
                         sensor_fit=ev.data.sensor_fit, shift_x=ev.data.shift_x, shift_y=ev.data.shift_y,
                         resolution_x=r.resolution_x, resolution_y=r.resolution_y,
                         pixel_aspect_x=r.pixel_aspect_x, pixel_aspect_y=r.pixel_aspect_y)


def _project_opencv(label: np.ndarray, points_eg3d: np.ndarray) -> np.ndarray:
    cam2world, k = from_label(label)
    world2cam = np.linalg.inv(cam2world)
    pc = (world2cam[:3, :3] @ points_eg3d.T).T + world2cam[:3, 3]
    uv = (k @ (pc / pc[:, 2:3]).T).T
    return uv[:, :2]


@pytest.mark.parametrize("render", RENDERS, ids=list(RENDERS))
@pytest.mark.parametrize("anchor_name", ANCHORS, ids=list(ANCHORS))
@pytest.mark.parametrize("case", LABEL_CASES)
def test_label_survives_blender(empty_scene, reference_labels, case, anchor_name, render):
    scene = empty_scene
    settings = RENDERS[render]
    label = _adjusted_label(reference_labels[case], settings, cx=0.47, cy=0.56)

    anchor_obj = _make_anchor(ANCHORS[anchor_name])
    bpy.context.view_layer.update()
    anchor = _head_anchor(anchor_obj, bpy.context.evaluated_depsgraph_get())

    placed = label_to_blender(label, anchor, **settings)
    obj = _place_camera(scene, placed, object_scale=(1.0, 1.7, 0.6))  # object scale must not matter
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()

    # 1. Pose from the evaluated world matrix, intrinsics from Blender's own projection matrix.
    back = _read_back(obj, scene, depsgraph)
    np.testing.assert_allclose(blender_to_label(back, anchor), label, atol=TOL)
    p = np.array(obj.evaluated_get(depsgraph).calc_matrix_camera(
        depsgraph, x=back.resolution_x, y=back.resolution_y, scale_x=back.pixel_aspect_x, scale_y=back.pixel_aspect_y))
    np.testing.assert_allclose(_intrinsics_from_projection(p), from_label(label)[1], atol=TOL)

    # 2. Blender's projection of world points agrees with the OpenCV projection of the label.
    rng = np.random.default_rng(7)
    points_eg3d = rng.uniform(-0.5, 0.5, size=(12, 3))
    h_rigid = np.array(anchor.matrix_world)
    h_rigid[:3, :3] /= np.linalg.norm(h_rigid[:3, :3], axis=0)
    local = (BLENDER_TO_EG3D[:3, :3].T @ (points_eg3d * anchor.size).T).T
    points_world = (h_rigid[:3, :3] @ local.T).T + h_rigid[:3, 3]
    blender_uv = []
    for pw in points_world:
        ndc = world_to_camera_view(scene, obj, Vector(pw.tolist()))
        assert ndc.z > 0
        blender_uv.append((ndc.x, 1.0 - ndc.y))  # Blender: origin bottom-left, y up
    np.testing.assert_allclose(np.array(blender_uv), _project_opencv(label, points_eg3d), atol=UV_TOL)


def test_track_to_camera_looks_at_head(empty_scene):
    scene = empty_scene
    anchor_obj = _make_anchor(((0.2, 0.5, 1.5), (5, -10, 60), (1.2, 1.2, 1.2), 0.25, None))
    rig = _link(bpy.data.objects.new("Rig", None))
    rig.location = (0.2, 0.5, 1.5)
    rig.rotation_euler = (math.radians(20), math.radians(-35), math.radians(140))
    data = bpy.data.cameras.new("Cam")
    cam = _link(bpy.data.objects.new("Cam", data))
    cam.parent = rig
    cam.location = (0.0, -0.9, 0.15)
    track = cam.constraints.new("TRACK_TO")
    track.target = anchor_obj
    track.track_axis = "TRACK_NEGATIVE_Z"
    track.up_axis = "UP_Y"
    scene.camera = cam
    bpy.context.view_layer.update()
    depsgraph = bpy.context.evaluated_depsgraph_get()

    anchor = _head_anchor(anchor_obj, depsgraph)
    label = blender_to_label(_read_back(cam, scene, depsgraph), anchor)
    cam2world, _ = from_label(label)
    origin, forward = cam2world[:3, 3], cam2world[:3, 2]
    to_head = -origin
    assert np.dot(forward, to_head) > 0  # the head is in front of the camera
    miss = np.linalg.norm(np.cross(forward, to_head))  # distance of the head centre from the optical axis
    assert miss < 1e-5
    assert np.linalg.norm(origin) == pytest.approx(0.9 * math.hypot(1.0, 0.15 / 0.9) / anchor.size, rel=1e-5)
    # The EG3D pivot (0, 0, 0.2) sits near the optical axis as well, well inside the frame.
    pivot_miss = np.linalg.norm(np.cross(forward, np.array(EG3D_PIVOT) - origin))
    assert pivot_miss < 0.21
