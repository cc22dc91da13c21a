"""3D Viewport > Sidebar > Portrait 3D."""
from __future__ import annotations

import bpy

from . import back_view, job_runner, job_writer, reference_prep
from .job_runner import format_eta
from .model_family import scene_family
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
        _draw_reference_thumbnail(layout, s.reference_image)
        layout.prop(s, "head_anchor")
        layout.prop(s, "camera")
        layout.operator("portrait3d.add_head_anchor", icon='EMPTY_DATA')


class PORTRAIT3D_PT_reference(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Reference Preparation"
    bl_parent_id = "PORTRAIT3D_PT_main"

    def draw_header(self, context):
        self.layout.prop(context.scene.portrait3d, "use_reference_prep", text="")

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        layout.active = s.use_reference_prep
        layout.operator("portrait3d.prepare_reference", icon='USER')
        col = layout.column(align=True)
        col.prop(s, "prep_scale")
        col.prop(s, "prep_offset_x")
        col.prop(s, "prep_offset_y")
        col = layout.column(align=True)
        col.prop(s, "prep_set_pose")
        if s.prep_set_pose:
            col.prop(s, "prep_yaw")
            col.prop(s, "prep_pitch")
        if s.prep_error:
            layout.label(text=s.prep_error, icon='ERROR')
        result = reference_prep.stored(s, fresh=False)
        if result is None:
            if s.use_reference_prep:
                layout.label(text="Not prepared yet: Generate prepares it", icon='INFO')
            return
        image = reference_prep.thumbnail_image()
        if image is not None and image.preview is not None:
            layout.template_icon(icon_value=image.preview.icon_id, scale=6.0)
        layout.label(text=result.summary(), icon='CAMERA_DATA')
        if reference_prep.stored(s) is None:
            layout.label(text="Photo, nudge or pose changed: prepare again", icon='INFO')
        for w in result.warnings:
            layout.label(text=w, icon='ERROR')


class PORTRAIT3D_PT_turntable(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Turntable"
    bl_parent_id = "PORTRAIT3D_PT_main"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        layout.prop(s, "turntable_frames")
        family = scene_family(context)
        full_turn = family is not None and family.is_360
        if full_turn:
            layout.prop(s, "turntable_full_turn")
            full_turn = s.turntable_full_turn
        row = layout.row()
        row.active = not full_turn
        row.prop(s, "turntable_yaw_range")
        layout.prop(s, "turntable_from_photo")
        row = layout.row()
        row.active = not s.turntable_from_photo
        row.prop(s, "turntable_pitch")
        layout.prop(s, "size_mode")
        if s.size_mode == 'CUSTOM':
            layout.prop(s, "output_size")
        else:
            row = layout.row()
            row.alignment = 'RIGHT'
            size, source = job_writer.output_size_and_source(context)
            row.label(text=f"{size} px ({source})")
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
        layout.prop(s, "memory")
        layout.prop(s, "use_compile")
        layout.prop(s, "model_folder")
        layout.prop(s, "condition_source")
        if s.condition_source == 'MESH':
            layout.prop(s, "condition_mesh")
        elif s.condition_source == 'IMAGE_FOLDER':
            layout.prop(s, "condition_folder")
        else:
            layout.prop(s, "proxy_seed")
        if s.condition_source != 'IMAGE_FOLDER':
            layout.prop(s, "use_proxy_views")


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


class PORTRAIT3D_PT_back_view(_Portrait3DPanel, bpy.types.Panel):
    """The back of the head (DiffPortrait360 models only)."""

    bl_label = "Back View"
    bl_parent_id = "PORTRAIT3D_PT_main"

    @classmethod
    def poll(cls, context):
        family = scene_family(context)
        return family is not None and family.is_360

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        family = scene_family(context)
        running = job_runner.is_running()
        layout.prop(s, "back_seed")
        col = layout.column(align=True)
        col.enabled = not running
        row = col.row(align=True)
        sub = row.row(align=True)
        sub.enabled = family is not None and family.back_head
        sub.operator("portrait3d.generate_back_view", icon='RENDER_STILL')
        sub.operator("portrait3d.regenerate_back_view", icon='FILE_REFRESH')
        row = col.row(align=True)
        row.operator("portrait3d.use_back_photo", icon='FILEBROWSER')
        sub = row.row(align=True)
        sub.enabled = s.back_origin == 'GENERATED' and not s.back_accepted
        sub.operator("portrait3d.accept_back_view", icon='CHECKMARK')
        if family is not None and not family.back_head:
            layout.label(text="This model has no back-head network: use a photo", icon='INFO')
        image = back_view.shown_image()
        if image is not None and image.preview is not None:
            layout.template_icon(icon_value=image.preview.icon_id, scale=6.0)
        if s.back_origin == 'PHOTO':
            layout.label(text=f"Your photo: {bpy.path.basename(s.back_view)}", icon='IMAGE_DATA')
        elif s.back_origin == 'GENERATED':
            state = "accepted" if s.back_accepted else f"not accepted: Generate uses seed {s.back_seed}"
            layout.label(text=f"Generated, seed {s.back_view_seed}: {state}",
                         icon='CHECKMARK' if s.back_accepted else 'INFO')
            try:
                key = back_view.inputs_key(s.reference_image, job_writer.model_folder(context),
                                           job_writer.output_size(context))
            except job_writer.JobSetupError:
                key = None
            if back_view.stale(s, key):
                layout.label(text="Made for another photo, model or size: generate it again", icon='ERROR')
        else:
            layout.label(text="None yet: Generate makes it first, or generate it here", icon='INFO')


def _draw_reference_thumbnail(layout, path: str) -> None:
    """A small preview of the reference portrait (Blender's own file preview, loaded lazily)."""
    if not path:
        return
    image = next((im for im in bpy.data.images if im.filepath == path), None)
    if image is not None and image.preview is not None:
        layout.template_icon(icon_value=image.preview.icon_id, scale=5.0)


def draw_progress(layout, progress) -> None:
    """Progress bar (Blender 4.0+ ``layout.progress``; a label before), resume and preview notes, last error
    and hint."""
    if progress.running:
        if progress.preparing:
            text = progress.status  # "Rendering conditions 12/48"
        elif progress.back_stage:
            text = f"Back view  step {progress.step}/{progress.total_steps}  ETA {format_eta(progress.eta_seconds)}"
        else:
            text = f"{progress.frames_done}/{progress.frames_total} frames"
            if progress.total_steps:
                text += f"  step {progress.step}/{progress.total_steps}  ETA {format_eta(progress.eta_seconds)}"
        if hasattr(layout, "progress"):
            layout.progress(factor=progress.fraction, type='BAR', text=text)
        else:
            layout.label(text=f"{progress.fraction * 100:.0f}%  {text}")
        if not progress.preparing:
            layout.label(text=progress.status)
    elif progress.status:
        layout.label(text=progress.status, icon='INFO')
    if progress.resumed_step >= 0:
        layout.label(text=f"Resumed from step {progress.resumed_step}", icon='RECOVER_LAST')
    if progress.running and progress.preview_step >= 0:
        layout.label(text=f"Latest preview: step {progress.preview_step}", icon='IMAGE_DATA')
    if progress.last_error:
        box = layout.box()
        box.label(text=progress.last_error, icon='ERROR')
        if progress.last_hint:
            box.label(text=f"Hint: {progress.last_hint}")
        for line in progress.last_log.splitlines()[-4:]:
            box.label(text=line)


class PORTRAIT3D_PT_generate(_Portrait3DPanel, bpy.types.Panel):
    bl_label = "Generate"
    bl_parent_id = "PORTRAIT3D_PT_main"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.portrait3d
        progress = context.window_manager.portrait3d_progress
        row = layout.row(align=True)
        running = job_runner.is_running()
        sub = row.row(align=True)
        sub.enabled = not running
        sub.operator("portrait3d.generate", icon='RENDER_ANIMATION')
        sub = row.row(align=True)
        sub.enabled = running
        sub.operator("portrait3d.cancel", icon='CANCEL')
        draw_progress(layout, progress)
        layout.prop(s, "import_as")
        layout.operator("portrait3d.import_frames", icon='IMAGE_DATA')


classes = (
    PORTRAIT3D_PT_main,
    PORTRAIT3D_PT_reference,
    PORTRAIT3D_PT_turntable,
    PORTRAIT3D_PT_back_view,
    PORTRAIT3D_PT_generation,
    PORTRAIT3D_PT_output,
    PORTRAIT3D_PT_generate,
)
