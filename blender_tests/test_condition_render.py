"""Condition images and 3D-aware proxy views: pose read-out, framing, files, and a restored scene."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import bpy
import numpy as np
import pytest
from mathutils import Matrix, Vector

from addon import condition_render as cr
from addon.proxy_head import build_proxy_head
from dp3d_core import cameras

SIZE = 96
PORTRAIT = "official_samples/portraits/0000028.png"


def _place(cam_obj, yaw_deg: float, anchor, pivot=cameras.EG3D_PIVOT) -> None:
    c2w = cameras.sample_lookat(math.pi / 2 + math.radians(yaw_deg), math.pi / 2, pivot, cameras.EG3D_RADIUS)
    size = cameras.anchor_size_from_matrix(np.array(anchor.matrix_world), anchor.empty_display_size)
    bc = cameras.label_to_blender(cameras.to_label(c2w, cameras.intrinsics_from_focal()),
                                  cameras.HeadAnchor(np.array(anchor.matrix_world), size),
                                  resolution_x=SIZE, resolution_y=SIZE)
    cam_obj.matrix_world = Matrix(bc.matrix_world.tolist())
    cam_obj.data.lens, cam_obj.data.sensor_width, cam_obj.data.sensor_fit = bc.lens, bc.sensor_width, bc.sensor_fit
    cam_obj.data.shift_x, cam_obj.data.shift_y = bc.shift_x, bc.shift_y


@pytest.fixture
def head_scene(empty_scene):
    """Anchor (moved, turned, display size 0.4), neutral head, a camera keyed frontal at frame 1 and
    yaw +30 at frame 2, plus things that must not show: a big cube in front of the face and a light."""
    scene = empty_scene
    anchor = bpy.data.objects.new("Head Anchor", None)
    anchor.empty_display_size = 0.4
    scene.collection.objects.link(anchor)
    anchor.matrix_world = Matrix.LocRotScale((0.5, 1.0, 1.6), Matrix.Rotation(0.4, 3, "Z").to_quaternion(), None)
    bpy.context.view_layer.update()
    head = build_proxy_head(21, anchor, neutral=True)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    for frame, yaw in ((1, 0.0), (2, 30.0)):
        _place(cam, yaw, anchor)
        cam.keyframe_insert("location", frame=frame)
        cam.keyframe_insert("rotation_euler", frame=frame)
    bpy.ops.mesh.primitive_cube_add(size=0.3, location=anchor.matrix_world @ Vector((0.0, -0.3, 0.0)))
    light = bpy.data.objects.new("Lamp", bpy.data.lights.new("Lamp", "POINT"))
    scene.collection.objects.link(light)
    scene.frame_set(7)
    return scene, anchor, head, cam


def _read(path: Path) -> np.ndarray:
    """(H, W, 3) sRGB floats in 0..1, top row first, read through Blender itself."""
    img = bpy.data.images.load(str(path), check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * 4, np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    return px.reshape(h, w, 4)[::-1, :, :3]


def _mirror_diff(img: np.ndarray) -> float:
    return float(np.abs(img - img[:, ::-1]).mean())


def _foreground(img: np.ndarray) -> np.ndarray:
    bg = np.array(cr.BACKGROUND_SRGB) / 255.0
    return np.abs(img - bg).max(axis=2) > 0.03


def _rna_dump(struct, depth=0) -> dict:
    out = {}
    for prop in struct.bl_rna.properties:
        key = prop.identifier
        if key == "rna_type" or getattr(prop, "is_readonly", False) and prop.type != "POINTER":
            continue
        try:
            value = getattr(struct, key)
        except Exception:
            continue
        if prop.type == "POINTER":
            if isinstance(value, bpy.types.ID) or value is None:
                out[key] = getattr(value, "name", None)
            elif depth < 2 and value is not None:
                out[key] = _rna_dump(value, depth + 1)
        elif prop.type == "COLLECTION":
            continue
        elif getattr(prop, "is_array", False) or prop.type in ("FLOAT", "INT") and getattr(prop, "array_length", 0):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out


def _scene_snapshot(scene) -> dict:
    return {
        "render": _rna_dump(scene.render),
        "view": _rna_dump(scene.view_settings),
        "display_settings": _rna_dump(scene.display_settings),
        "display": _rna_dump(scene.display),
        "shading": _rna_dump(scene.display.shading),
        "world": scene.world.name if scene.world else None,
        "camera": scene.camera.name if scene.camera else None,
        "frame": (scene.frame_current, scene.frame_subframe),
        "hide_render": {o.name: o.hide_render for o in bpy.data.objects},
        "scene_objects": sorted(o.name for o in scene.collection.objects),
        "data": {k: len(getattr(bpy.data, k)) for k in ("objects", "meshes", "materials", "images", "worlds",
                                                         "lights", "cameras")},
    }


def test_frontal_is_symmetric_and_yaw_is_not(head_scene, tmp_path):
    scene, _, _, cam = head_scene
    paths = cr.render_condition_images(scene, cam, [1, 2], tmp_path, size=SIZE)
    assert [p.name for p in paths] == ["cond_0001.png", "cond_0002.png"]
    frontal, yawed = _read(paths[0]), _read(paths[1])
    d_front, d_yaw = _mirror_diff(frontal), _mirror_diff(yawed)
    assert d_front < 0.015, d_front
    assert d_yaw > 4 * d_front and d_yaw > 0.02, (d_front, d_yaw)


def test_head_centred_and_framed_on_neutral_background(head_scene, tmp_path):
    scene, _, _, cam = head_scene
    img = _read(cr.render_condition_images(scene, cam, [1], tmp_path, size=SIZE)[0])
    np.testing.assert_allclose(img[2, 2], np.array(cr.BACKGROUND_SRGB) / 255.0, atol=2.5 / 255)
    fg = _foreground(img)
    assert 0.35 < fg.mean() < 0.85, fg.mean()
    ys, xs = np.nonzero(fg)
    assert abs(xs.mean() / SIZE - 0.5) < 0.03
    # FFHQ-like: head reaches near the top edge, face column wide (official: ~60 % of the width).
    assert ys.min() < 0.1 * SIZE
    row = fg[int(0.45 * SIZE)]
    assert 0.45 < row.mean() < 0.9, row.mean()


def test_files_are_complete_pngs(head_scene, tmp_path):
    scene, _, _, cam = head_scene
    paths = cr.render_condition_images(scene, cam, [1, 2], tmp_path / "sub", size=64)
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND"
        assert int.from_bytes(data[16:20], "big") == 64 and int.from_bytes(data[20:24], "big") == 64
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["cond_0001.png", "cond_0002.png"]


def test_scene_is_restored(head_scene, tmp_path):
    scene, anchor, head, cam = head_scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 320, 200, 50
    scene.render.film_transparent = True
    scene.render.image_settings.file_format = "JPEG"
    scene.view_settings.view_transform = "AgX"
    scene.display.shading.light = "MATCAP"
    scene.camera = None
    bpy.data.objects["Cube"].hide_render = False
    head.hide_render = True  # hidden by the user: still rendered, and hidden again afterwards
    before = _scene_snapshot(scene)
    cr.render_condition_images(scene, cam, [1, 2], tmp_path, size=64)
    assert _scene_snapshot(scene) == before
    cr.render_proxy_views(scene, cam, [2], tmp_path, reference_image_path=_fixture(PORTRAIT), proxy_object=head,
                          size=64)
    assert _scene_snapshot(scene) == before
    cr.render_proxy_views(scene, cam, [2], tmp_path, reference_image_path=_fixture(PORTRAIT), proxy_object=head,
                          back_image_path=_fixture(PORTRAIT), size=64)
    assert _scene_snapshot(scene) == before


def _fixture(rel: str) -> Path:
    from conftest import FIXTURES
    path = FIXTURES / rel
    if not path.is_file():
        pytest.fail(f"fixture missing: {path}")
    return path


def test_proxy_views_carry_the_reference(head_scene, tmp_path):
    scene, _, head, cam = head_scene
    paths = cr.render_proxy_views(scene, cam, [1, 2], tmp_path, reference_image_path=_fixture(PORTRAIT),
                                  proxy_object=head, size=SIZE)
    assert [p.name for p in paths] == ["proxy_0001.png", "proxy_0002.png"]
    front, yawed = _read(paths[0]), _read(paths[1])
    ref = _read(_fixture(PORTRAIT))
    # Face centre (between the eyes and the mouth) in the frontal view reproduces the reference there.
    def centre(img):
        h, w = img.shape[:2]
        return img[int(0.38 * h):int(0.62 * h), int(0.38 * w):int(0.62 * w)].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre(front), centre(ref), atol=0.06)
    fill = np.array(cr.FILL_SRGB) / 255.0
    assert np.abs(centre(front) - fill).max() > 0.1  # the portrait, not the neutral fill
    assert float(np.abs(front - yawed).mean()) > 0.04
    # The back of the head is never seen from the reference camera: a back view is fill + background.
    _place(cam, 180.0, head.parent)
    cam.animation_data_clear()
    back = _read(cr.render_proxy_views(scene, cam, [3], tmp_path, reference_image_path=_fixture(PORTRAIT),
                                       proxy_object=head, size=SIZE)[0])
    bg = np.array(cr.BACKGROUND_SRGB) / 255.0
    near = (np.abs(back - fill).max(axis=2) < 0.03) | (np.abs(back - bg).max(axis=2) < 0.03)
    assert near.mean() > 0.97


def test_bad_inputs_raise_clear_errors(head_scene, tmp_path):
    scene, _, head, cam = head_scene
    with pytest.raises(cr.ConditionRenderError, match="frames"):
        cr.render_condition_images(scene, cam, [], tmp_path)
    with pytest.raises(cr.ConditionRenderError, match="camera"):
        cr.render_condition_images(scene, head, [1], tmp_path)
    with pytest.raises(cr.ConditionRenderError, match="engine"):
        cr.render_condition_images(scene, cam, [1], tmp_path, engine="POVRAY")
    with pytest.raises(cr.ConditionRenderError, match="not found"):
        cr.render_proxy_views(scene, cam, [1], tmp_path, reference_image_path=tmp_path / "nope.png",
                              proxy_object=head)
    bpy.data.objects.remove(head)
    with pytest.raises(cr.ConditionRenderError, match="no proxy head"):
        cr.render_condition_images(scene, cam, [1], tmp_path)


# ---------------------------------------------------------------------------------------------
# Front + back projection (DiffPortrait360).

RED, BLUE = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])


def _solid_png(path: Path, rgb) -> Path:
    img = bpy.data.images.new("solid", 64, 64, alpha=False)
    try:
        img.pixels.foreach_set(np.tile([*rgb, 1.0], 64 * 64).astype(np.float32))
        img.filepath_raw = str(path)
        img.file_format = "PNG"
        img.save()
    finally:
        bpy.data.images.remove(img)
    return path


@pytest.fixture
def red_blue(tmp_path):
    return _solid_png(tmp_path / "red.png", RED), _solid_png(tmp_path / "blue.png", BLUE)


def test_blend_weights_sum_to_one_and_turn_smoothly():
    # A normal turning from the front camera (theta 0) to the back camera (theta pi) in 0.1-degree steps; with
    # perspective each camera sees a little less than its half (the cosines are shifted by -0.06).
    theta = np.radians(np.arange(0.0, 180.0001, 0.1))
    seen = np.ones_like(theta, bool)
    w = cr.blend_weights(np.cos(theta) - 0.06, -np.cos(theta) - 0.06, seen, seen)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all() and (w <= 1).all()
    np.testing.assert_allclose(w[0], [1, 0, 0])
    np.testing.assert_allclose(w[-1], [0, 1, 0])
    side = np.argmin(np.abs(theta - math.pi / 2))
    np.testing.assert_allclose(w[side], [0, 0, 1])  # seen by neither camera: the neutral fill
    assert np.abs(np.diff(w, axis=0)).max() < 0.02  # no seam: 0.1 degree never moves a weight by 2 %
    # A point the camera cannot see (hidden or outside its image) takes nothing from it, whatever the angle.
    hidden = cr.blend_weights(np.ones(3), -np.ones(3), np.zeros(3, bool), np.zeros(3, bool))
    np.testing.assert_allclose(hidden, [[0, 0, 1]] * 3)
    both = cr.blend_weights(np.ones(2), np.ones(2), seen[:2], seen[:2])  # impossible for opposite cameras
    np.testing.assert_allclose(both, [[0.5, 0.5, 0.0]] * 2)


def _red_blue_fill_weights(px: np.ndarray) -> np.ndarray:
    """(N, 3) weights (red, blue, grey fill) of pixels that are w_r*red + w_b*blue + w_f*grey: the grey is the
    only source of green, and adds the same amount to red and blue."""
    g = cr.FILL_SRGB[1] / 255.0
    return np.stack([px[:, 0] - px[:, 1], px[:, 2] - px[:, 1], px[:, 1] / g], axis=1)


def _interior(img: np.ndarray) -> np.ndarray:
    """Foreground pixels at least 2 pixels from the background (Blender's pixel filter blends the outline with
    the background over more than one pixel)."""
    fg = _foreground(img)
    inner = fg.copy()
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            inner &= np.roll(np.roll(fg, dy, axis=0), dx, axis=1)
    return inner


def test_front_red_back_blue_blend_at_the_sides(head_scene, tmp_path, red_blue):
    scene, anchor, head, cam = head_scene
    red, blue = red_blue
    cam.animation_data_clear()
    projection = cr.project_reference(head, red, back_image_path=blue)
    assert projection.back == blue and projection.weights.shape == (len(head.data.loops), 3)
    np.testing.assert_allclose(projection.weights.sum(axis=1), 1.0, atol=1e-9)
    temp_before = set(Path(tempfile.gettempdir()).glob(cr.PASSES_PREFIX + "*"))
    views = {}
    for yaw in (0, 90, 180, 270):
        # Looking at the head's centre: with EG3D's pivot (0.2 in front of it) a side view cuts off the back.
        _place(cam, yaw, anchor, pivot=(0.0, 0.0, 0.0))
        path = cr.render_proxy_views(scene, cam, [yaw], tmp_path / "out", reference_image_path=red,
                                     proxy_object=head, back_image_path=blue, size=SIZE)[0]
        views[yaw] = img = _read(path)
        inner = _interior(img)
        # Every head pixel is red, blue and the grey fill mixed with weights that sum to 1.
        w = _red_blue_fill_weights(img[inner])
        assert np.abs(w.sum(axis=1) - 1.0).max() < 0.04, (yaw, np.abs(w.sum(axis=1) - 1.0).max())
        assert w.min() > -0.02, (yaw, w.min())
    h = SIZE
    centre = (slice(int(0.35 * h), int(0.65 * h)), slice(int(0.4 * h), int(0.6 * h)))
    np.testing.assert_allclose(views[0][centre].reshape(-1, 3).mean(axis=0), RED, atol=0.03)
    np.testing.assert_allclose(views[180][centre].reshape(-1, 3).mean(axis=0), BLUE, atol=0.03)
    for yaw in (90, 270):  # the side: red toward the face, blue toward the back, blended between
        w = _red_blue_fill_weights(views[yaw][_interior(views[yaw])])
        reddish, bluish = (w[:, 0] > 0.9).mean(), (w[:, 1] > 0.9).mean()
        between = (((w[:, 0] > 0.1) & (w[:, 0] < 0.9)) | ((w[:, 1] > 0.1) & (w[:, 1] < 0.9))).mean()
        assert reddish > 0.1 and bluish > 0.05 and between > 0.1, (yaw, reddish, bluish, between)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "proxy_0000.png", "proxy_0090.png", "proxy_0180.png", "proxy_0270.png"]
    assert set(Path(tempfile.gettempdir()).glob(cr.PASSES_PREFIX + "*")) == temp_before  # pass files deleted


def test_back_camera_object_equals_its_label(head_scene, tmp_path, red_blue):
    scene, anchor, head, cam = head_scene
    red, blue = red_blue
    cam.animation_data_clear()
    back_cam = bpy.data.objects.new("Back Camera", bpy.data.cameras.new("Back Camera"))
    scene.collection.objects.link(back_cam)
    _place(back_cam, 180.0, anchor)
    bpy.context.view_layer.update()
    by_label = cr.project_reference(head, red, back_image_path=blue)
    by_object = cr.project_reference(head, red, back_image_path=blue, back_label_or_camera=back_cam)
    np.testing.assert_allclose(by_object.back_uv, by_label.back_uv, atol=2e-3)
    assert np.abs(by_object.weights - by_label.weights).max() < 1e-3
    # A back camera turned the other way round (at the front) would put the blue on the face instead.
    _place(back_cam, 0.0, anchor)
    bpy.context.view_layer.update()
    wrong = cr.project_reference(head, red, back_image_path=blue, back_label_or_camera=back_cam)
    assert np.abs(wrong.weights - by_label.weights).max() > 0.5


def test_without_back_image_nothing_changes(head_scene, tmp_path):
    scene, _, head, cam = head_scene
    projection = cr.project_reference(head, _fixture(PORTRAIT))
    assert projection.back is None and projection.back_uv is None and projection.weights is None
    with pytest.raises(cr.ConditionRenderError, match="back image"):
        cr.project_reference(head, _fixture(PORTRAIT), back_label_or_camera=cr.back_label())
    with pytest.raises(cr.ConditionRenderError, match="back image not found"):
        cr.render_proxy_views(scene, cam, [1], tmp_path, reference_image_path=_fixture(PORTRAIT),
                              proxy_object=head, back_image_path=tmp_path / "nope.png")
