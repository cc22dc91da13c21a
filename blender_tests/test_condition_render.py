"""Condition images and 3D-aware proxy views: pose read-out, framing, files, and a restored scene."""
from __future__ import annotations

import math
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


def _place(cam_obj, yaw_deg: float, anchor) -> None:
    c2w = cameras.sample_lookat(math.pi / 2 + math.radians(yaw_deg), math.pi / 2, cameras.EG3D_PIVOT,
                                cameras.EG3D_RADIUS)
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
