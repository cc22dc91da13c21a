"""Importing frames: card, camera background and sequencer strip; made once, aligned to the scene frames."""
from __future__ import annotations

import os

import bpy
import numpy as np
import pytest
from PIL import Image

import addon
from addon import frame_import

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
FIRST = 5  # the frames belong to scene frames 5..8


@pytest.fixture
def scene(empty_scene):
    addon.register()
    yield empty_scene
    addon.unregister()


@pytest.fixture
def frames(tmp_path):
    folder = tmp_path / "frames dir é"
    folder.mkdir()
    paths = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"frame_{FIRST + i:04d}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        paths.append(path)
    return paths


def add_camera(scene, size=16):
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    scene.render.resolution_x = scene.render.resolution_y = size
    return cam


def counts(scene, cam):
    strips = frame_import.scene_strips(scene)
    return (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials), len(bpy.data.images),
            len(cam.data.background_images), len(strips))


def test_import_twice_makes_each_datablock_once(scene, frames):
    cam = add_camera(scene)
    seq = frame_import.frame_sequence(frames, FIRST)
    frame_import.import_frames(scene, cam, seq, frame_import.MODES)
    first = counts(scene, cam)
    assert first == (2, 1, 1, 1, 1, 1)
    made = frame_import.import_frames(scene, cam, seq, frame_import.MODES)
    assert counts(scene, cam) == first
    card = made["CARD"]
    assert card.name == frame_import.CARD_NAME and card.parent == cam
    strip = made["SEQUENCER"]
    assert (strip.frame_final_start, strip.frame_final_end, len(strip.elements)) == (FIRST, FIRST + 4, 4)
    bg = made["BACKGROUND"]
    assert bg.image.name == frame_import.IMAGE_NAME and cam.data.show_background_images
    iuser = bg.image_user
    assert (iuser.frame_start, iuser.frame_offset, iuser.frame_duration) == (FIRST, FIRST - 1, 4)


def test_card_faces_the_camera_and_fills_its_view(scene, frames):
    cam = add_camera(scene)
    card = frame_import.import_frames(scene, cam, frame_import.frame_sequence(frames, FIRST), ("CARD",))["CARD"]
    co = np.array([v.co for v in card.data.vertices])
    assert np.allclose(co[:, 2], co[0, 2]) and co[0, 2] < 0  # a plane in front of the camera
    assert card.data.polygons[0].normal.z > 0.99  # facing it
    frame = np.array([tuple(v) for v in cam.data.view_frame(scene=scene)])
    np.testing.assert_allclose(co[:, :2] / -co[0, 2], frame[:, :2] / -frame[0, 2], atol=1e-6)


@pytest.mark.parametrize("scene_frame, colour", [(5, COLOURS[0]), (6, COLOURS[1]), (8, COLOURS[3])])
def test_card_shows_the_frame_of_each_scene_frame(scene, frames, tmp_path, scene_frame, colour):
    cam = add_camera(scene)
    frame_import.import_frames(scene, cam, frame_import.frame_sequence(frames, FIRST), ("CARD",))
    scene.render.engine = 'BLENDER_WORKBENCH'
    scene.display.shading.light = 'FLAT'
    scene.display.shading.color_type = 'TEXTURE'
    scene.view_settings.view_transform = 'Standard'
    scene.frame_set(scene_frame)
    bpy.ops.render.render()
    out = tmp_path / "render.png"
    bpy.data.images["Render Result"].save_render(str(out))
    pixel = np.asarray(Image.open(out).convert("RGB"))[8, 8]
    np.testing.assert_allclose(pixel, colour, atol=3)


def test_import_operator_uses_output_folder_and_range(scene, frames):
    add_camera(scene)
    s = scene.portrait3d
    s.output_folder = str(frames[0].parent) + os.sep
    s.use_scene_range = False
    s.frame_start, s.frame_end = FIRST, FIRST + 3
    s.import_as = {'CARD', 'SEQUENCER'}
    assert bpy.ops.portrait3d.import_frames() == {'FINISHED'}
    assert bpy.data.objects.get(frame_import.CARD_NAME) is not None
    assert frame_import.scene_strips(scene).get(frame_import.STRIP_NAME) is not None
    s.frame_end = FIRST + 5  # two frames that do not exist
    with pytest.raises(RuntimeError, match="Frames missing on disk: frame_0009.png, frame_0010.png"):
        bpy.ops.portrait3d.import_frames()


def test_frame_sequence_refuses_gaps_and_unnumbered_files(frames, tmp_path):
    with pytest.raises(frame_import.FrameImportError, match="consecutively numbered"):
        frame_import.frame_sequence([frames[0], frames[2]], FIRST)
    odd = tmp_path / "portrait.png"
    Image.new("RGB", (4, 4)).save(odd)
    with pytest.raises(frame_import.FrameImportError, match="no frame number"):
        frame_import.frame_sequence([odd], 1)
    with pytest.raises(frame_import.FrameImportError, match="generate first"):
        frame_import.frame_sequence([], 1)
