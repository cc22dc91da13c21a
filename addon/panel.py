"""3D Viewport > Sidebar > Portrait 3D."""
from __future__ import annotations

import bpy

from .operators import export_blocker

CATEGORY = "Portrait 3D"


class _Portrait3DPanel:
    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = CATEGORY


class PORTRAIT3D_PT_main(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Portrait 3D"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        layout.prop(s, "reference_image")
        layout.prop(s, "head_anchor")
        layout.prop(s, "camera")
        layout.operator("portrait3d.add_head_anchor", icon='EMPTY_DATA')


class PORTRAIT3D_PT_turntable(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Turntable"
    bl_parent_id = "PORTRAIT3D_PT_main"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        layout.prop(s, "turntable_frames")
        layout.prop(s, "turntable_yaw_range")
        layout.prop(s, "turntable_pitch")
        layout.prop(s, "output_size")
        layout.operator("portrait3d.add_turntable", icon='CAMERA_DATA')


class PORTRAIT3D_PT_generation(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Generation"
    bl_parent_id = "PORTRAIT3D_PT_main"
    bl_options = {'DEFAULT_CLOSED'}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        layout.prop(s, "steps")
        layout.prop(s, "guidance")
        layout.prop(s, "eta")
        layout.prop(s, "seed")
        layout.prop(s, "scheduler")
        layout.prop(s, "device")
        layout.prop(s, "model_folder")
        layout.prop(s, "condition_source")
        if s.condition_source == 'MESH':
            layout.prop(s, "condition_mesh")
        elif s.condition_source == 'IMAGE_FOLDER':
            layout.prop(s, "condition_folder")


class PORTRAIT3D_PT_output(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Output"
    bl_parent_id = "PORTRAIT3D_PT_main"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        scene = context.scene
        s = scene.portrait3d
        layout.prop(s, "output_folder")
        layout.prop(s, "use_scene_range")
        if not s.use_scene_range:
            col = layout.column(align=True)
            col.prop(s, "frame_start")
            col.prop(s, "frame_end")
        blocker = export_blocker(scene)
        row = layout.row()
        row.enabled = blocker is None
        row.operator("portrait3d.export_poses", icon='EXPORT')
        if blocker:
            layout.label(text=blocker, icon='INFO')


classes = (
    PORTRAIT3D_PT_main,
    PORTRAIT3D_PT_turntable,
    PORTRAIT3D_PT_generation,
    PORTRAIT3D_PT_output,
)
