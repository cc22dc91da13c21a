"""Generated frames into the scene: a card facing the camera, the camera background, a sequencer strip.

All three share one image-sequence datablock. Everything is named "Portrait3D ..." and reused, so
importing again replaces what an earlier import made instead of adding copies.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import bpy
from mathutils import Vector

IMAGE_NAME = "Portrait3D Frames"
CARD_NAME = "Portrait3D Card"
MATERIAL_NAME = "Portrait3D Card"
STRIP_NAME = "Portrait3D Frames"
MODES = ("CARD", "BACKGROUND", "SEQUENCER")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class FrameImportError(ValueError):
    """The frames cannot be imported; the message says why."""


@dataclass
class FrameSequence:
    """Consecutively numbered frame files shown from scene frame ``frame_start`` on."""

    files: list[Path]
    frame_start: int

    @property
    def first(self) -> Path:
        return self.files[0]

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def first_number(self) -> int:
        return file_number(self.first)


def file_number(path: Path) -> int:
    """The frame number Blender reads from a file name (its last run of digits)."""
    m = _NUMBER.search(path.stem)
    if m is None:
        raise FrameImportError(f"{path.name} has no frame number in its name; an image sequence needs one.")
    return int(m.group(1))


def frame_sequence(files: Iterable[str | os.PathLike], frame_start: int) -> FrameSequence:
    """Check ``files`` form one consecutively numbered sequence of existing files."""
    paths = sorted((Path(f) for f in files), key=file_number)
    if not paths:
        raise FrameImportError("No frames to import: generate first.")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FrameImportError(f"Frames missing on disk: {', '.join(missing[:5])}. Generate again to finish them.")
    numbers = [file_number(p) for p in paths]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))) or len({p.parent for p in paths}) != 1:
        raise FrameImportError("The frames are not one consecutively numbered sequence in one folder.")
    return FrameSequence(paths, frame_start)


def sequence_image(seq: FrameSequence) -> bpy.types.Image:
    """The shared "Portrait3D Frames" image, pointed at ``seq`` (reused when it exists)."""
    image = bpy.data.images.get(IMAGE_NAME)
    if image is None:
        image = bpy.data.images.load(str(seq.first), check_existing=False)
        image.name = IMAGE_NAME
    else:
        image.filepath = str(seq.first)
    image.source = 'SEQUENCE'
    image.colorspace_settings.name = "sRGB"
    image.reload()
    return image


def configure_image_user(iuser: bpy.types.ImageUser, seq: FrameSequence) -> None:
    """Scene frame ``seq.frame_start + i`` shows file ``i`` (Blender: number = frame - start + 1 + offset)."""
    iuser.frame_start = seq.frame_start
    iuser.frame_offset = seq.first_number - 1
    iuser.frame_duration = seq.count
    iuser.use_cyclic = False
    iuser.use_auto_refresh = True


def _card_distance(scene: bpy.types.Scene, camera: bpy.types.Object) -> float:
    anchor = scene.portrait3d.head_anchor if hasattr(scene, "portrait3d") else None
    if anchor is not None:
        d = (anchor.matrix_world.translation - camera.matrix_world.translation).length
        if d > camera.data.clip_start * 2:
            return d
    return max(1.0, camera.data.clip_start * 10)


def _card_material(image: bpy.types.Image, seq: FrameSequence) -> bpy.types.Material:
    mat = bpy.data.materials.get(MATERIAL_NAME) or bpy.data.materials.new(MATERIAL_NAME)
    if mat.node_tree is None:
        mat.use_nodes = True
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    nodes.clear()
    tex = nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.extension = 'EXTEND'
    configure_image_user(tex.image_user, seq)
    emit = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    links.new(tex.outputs["Color"], emit.inputs["Color"])
    links.new(emit.outputs["Emission"], out.inputs["Surface"])
    tex.location, emit.location, out.location = (-400, 0), (-100, 0), (150, 0)
    nodes.active = tex
    return mat


def import_card(scene: bpy.types.Scene, camera: bpy.types.Object, seq: FrameSequence, image: bpy.types.Image,
                distance: float | None = None) -> bpy.types.Object:
    """A plane parented to ``camera`` that fills its view at ``distance`` (default: the head anchor's)."""
    d = distance if distance is not None else _card_distance(scene, camera)
    corners = [Vector(v) * (d / -v.z) for v in camera.data.view_frame(scene=scene)]
    obj = bpy.data.objects.get(CARD_NAME)
    mesh = obj.data if obj is not None and obj.type == 'MESH' else bpy.data.meshes.get(CARD_NAME)
    if mesh is None:
        mesh = bpy.data.meshes.new(CARD_NAME)
    mesh.clear_geometry()
    mesh.from_pydata([tuple(c) for c in corners], [], [(0, 1, 2, 3)])
    # view_frame order: top-right, bottom-right, bottom-left, top-left.
    uv = mesh.uv_layers.new(name="UVMap") if not mesh.uv_layers else mesh.uv_layers[0]
    for loop, coord in zip(mesh.loops, ((1, 1), (1, 0), (0, 0), (0, 1))):
        uv.data[loop.index].uv = coord
    if mesh.polygons[0].normal.z < 0:  # face the camera (it looks down its -Z)
        mesh.flip_normals()
    mesh.materials.clear()
    mesh.materials.append(_card_material(image, seq))
    mesh.update()
    if obj is None:
        obj = bpy.data.objects.new(CARD_NAME, mesh)
    elif obj.data != mesh:
        obj.data = mesh
    if scene.collection.objects.get(obj.name) is None and not obj.users_collection:
        scene.collection.objects.link(obj)
    obj.parent = camera
    obj.matrix_parent_inverse.identity()
    obj.matrix_basis.identity()
    return obj


def import_background(camera: bpy.types.Object, seq: FrameSequence, image: bpy.types.Image):
    """The camera's background image (viewport) showing the sequence; reuses an earlier one."""
    cam = camera.data
    bg = next((b for b in cam.background_images if b.image is not None and b.image.name == IMAGE_NAME), None)
    if bg is None:
        bg = cam.background_images.new()
    bg.source = 'IMAGE'
    bg.image = image
    configure_image_user(bg.image_user, seq)
    bg.alpha = 1.0
    bg.display_depth = 'FRONT'
    cam.show_background_images = True
    return bg


def scene_strips(scene: bpy.types.Scene):
    """The sequencer strips of ``scene`` (made on first use): ``strips`` in Blender 4.4+, ``sequences`` before."""
    sed = scene.sequence_editor or scene.sequence_editor_create()
    return sed.strips if hasattr(sed, "strips") else sed.sequences


def import_strip(scene: bpy.types.Scene, seq: FrameSequence):
    """An image strip in the sequencer starting at ``seq.frame_start``; replaces an earlier one."""
    strips = scene_strips(scene)
    old = strips.get(STRIP_NAME)
    channel = old.channel if old is not None else 1
    if old is not None:
        strips.remove(old)
    strip = strips.new_image(name=STRIP_NAME, filepath=str(seq.first), channel=channel,
                             frame_start=seq.frame_start)
    for f in seq.files[1:]:
        strip.elements.append(f.name)
    strip.frame_final_duration = seq.count
    return strip


def import_frames(scene: bpy.types.Scene, camera: bpy.types.Object | None, seq: FrameSequence,
                  modes: Sequence[str] = ("CARD",)) -> dict[str, object]:
    """Bring ``seq`` in as each of ``modes``; returns what was made or updated per mode."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise FrameImportError(f"Unknown import mode(s) {sorted(unknown)}; use {', '.join(MODES)}.")
    if camera is None and ({"CARD", "BACKGROUND"} & set(modes)):
        raise FrameImportError("Importing as a card or camera background needs a camera.")
    image = sequence_image(seq)
    made: dict[str, object] = {}
    if "CARD" in modes:
        made["CARD"] = import_card(scene, camera, seq, image)
    if "BACKGROUND" in modes:
        made["BACKGROUND"] = import_background(camera, seq, image)
    if "SEQUENCER" in modes:
        made["SEQUENCER"] = import_strip(scene, seq)
    return made
