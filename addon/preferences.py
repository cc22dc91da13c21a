"""Add-on preferences: where the worker Python and the models live."""
from __future__ import annotations

import bpy
from bpy.props import StringProperty

# The extension's module name ("bl_ext.<repo>.portrait3d" when installed, "addon" in the source tree).
ADDON_ID = __package__


class PORTRAIT3D_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    worker_python: StringProperty(
        name="Worker Python", subtype='FILE_PATH',
        description="Python executable of an environment with torch and diffusers; runs the generator")
    models_folder: StringProperty(
        name="Models Folder", subtype='DIR_PATH',
        description="Folder holding converted DiffPortrait3D model folders")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "worker_python")
        layout.prop(self, "models_folder")


def get_preferences(context: bpy.types.Context | None = None) -> PORTRAIT3D_AP_preferences | None:
    """This add-on's preferences, or None when it is registered without being enabled (source tree)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


classes = (PORTRAIT3D_AP_preferences,)
