"""Operators: add head anchor, add turntable, export poses."""
from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import FloatProperty

from . import rig
from .poses import FramePose, PoseError, check_writable_folder, scene_poses, write_dataset
from .properties import active_camera, frame_range

_MAX_LISTED_WARNINGS = 5


def _output_folder(scene: bpy.types.Scene) -> str:
    """Absolute output folder, or PoseError when it cannot be resolved."""
    folder = scene.portrait3d.output_folder.strip()
    if not folder:
        raise PoseError("No output folder: set Output Folder in the Portrait 3D panel.")
    if folder.startswith("//") and not bpy.data.filepath:
        raise PoseError("The output folder is relative to the .blend file, which is not saved yet: "
                        "save the file or choose an absolute output folder.")
    return bpy.path.abspath(folder)


def export_blocker(scene: bpy.types.Scene) -> str | None:
    """Why poses cannot be exported right now (None when they can)."""
    if scene.portrait3d.head_anchor is None:
        return "Add or pick a head anchor first"
    if active_camera(scene) is None:
        return "Add a turntable or set a camera first"
    start, end = frame_range(scene)
    if end < start:
        return f"Frame range {start}-{end} is empty"
    return None


def export_poses(scene: bpy.types.Scene) -> tuple[Path, list[FramePose]]:
    """Write dataset.json for the settings' frame range; raise PoseError with the fix when impossible."""
    s = scene.portrait3d
    start, end = frame_range(scene)
    if s.head_anchor is None:
        raise PoseError("No head anchor: add one with 'Add Head Anchor' or pick an Empty as Head Anchor.")
    camera = active_camera(scene)
    if camera is None:
        raise PoseError("No camera: add a turntable, set the scene camera, or pick a camera in the settings.")
    if end < start:
        raise PoseError(f"The frame range {start}-{end} is empty: make End greater than or equal to Start.")
    folder = check_writable_folder(_output_folder(scene))
    poses = scene_poses(scene, camera, s.head_anchor, range(start, end + 1))
    return write_dataset(folder, poses), poses


class PORTRAIT3D_OT_add_head_anchor(bpy.types.Operator):
    """Add an Empty at the 3D cursor marking the head centre (-Y out of the face, +Z up)"""

    bl_idname = "portrait3d.add_head_anchor"
    bl_label = "Add Head Anchor"
    bl_options = {'REGISTER', 'UNDO'}

    size: FloatProperty(name="Size", default=1.0, min=1e-4, soft_max=10.0, unit='LENGTH',
                        description="Blender units per EG3D unit (the sphere's radius)")

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        return True

    def execute(self, context):
        rig.add_head_anchor(context, size=self.size)
        return {'FINISHED'}


class PORTRAIT3D_OT_add_turntable(bpy.types.Operator):
    """Add (or replace) a camera orbiting the head anchor the way EG3D cameras orbit a head"""

    bl_idname = "portrait3d.add_turntable"
    bl_label = "Add Turntable"
    bl_options = {'REGISTER', 'UNDO'}

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        if context.scene.portrait3d.head_anchor is None:
            cls.poll_message_set("Add or pick a head anchor first")
            return False
        return True

    def execute(self, context):
        scene = context.scene
        s = scene.portrait3d
        try:
            rig.build_turntable(scene, s.head_anchor, frames=s.turntable_frames, yaw_range=s.turntable_yaw_range,
                                pitch=s.turntable_pitch, size_px=s.output_size)
        except PoseError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return {'FINISHED'}


class PORTRAIT3D_OT_export_poses(bpy.types.Operator):
    """Write dataset.json (EG3D camera labels) for every frame of the range into the output folder"""

    bl_idname = "portrait3d.export_poses"
    bl_label = "Export Camera Poses"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        # Missing anchor/camera/range are reported by execute (ERROR + CANCELLED) so scripts get a
        # clear message; the panel greys the button out and shows export_blocker() instead.
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        return True

    def execute(self, context):
        try:
            path, poses = export_poses(context.scene)
        except PoseError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        warnings = [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
        for w in warnings[:_MAX_LISTED_WARNINGS]:
            self.report({'WARNING'}, w)
        if len(warnings) > _MAX_LISTED_WARNINGS:
            self.report({'WARNING'}, f"... and {len(warnings) - _MAX_LISTED_WARNINGS} more pose warnings")
        self.report({'INFO'}, f"Wrote {len(poses)} camera poses to {path}")
        return {'FINISHED'}


classes = (
    PORTRAIT3D_OT_add_head_anchor,
    PORTRAIT3D_OT_add_turntable,
    PORTRAIT3D_OT_export_poses,
)
