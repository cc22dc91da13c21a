"""Add-on preferences: the worker Python, the models, and where user data lives."""
from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import StringProperty

# The extension's module name ("bl_ext.<repo>.portrait3d" when installed, "addon" in the source tree).
ADDON_ID = __package__
WORKER_PYTHON_ENV = "PORTRAIT3D_WORKER_PYTHON"


class PORTRAIT3D_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    worker_python: StringProperty(
        name="Worker Python", subtype='FILE_PATH',
        description="Python executable of an environment with torch and diffusers; runs the generator")
    models_folder: StringProperty(
        name="Models Folder", subtype='DIR_PATH',
        description="Where converted model folders go (empty: the extension's user folder)")
    default_model: StringProperty(
        name="Default Model", subtype='DIR_PATH',
        description="Model folder used when a scene sets none (set by the converter)")
    check_result: StringProperty(name="Check Result", default="")
    convert_status: StringProperty(name="Convert Status", default="")

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "worker_python")
        row = col.row()
        row.operator("portrait3d.check_worker", icon='CHECKMARK')
        for line in self.check_result.splitlines():
            col.label(text=line)
        col.separator()
        col.prop(self, "models_folder")
        col.prop(self, "default_model")
        col.operator("portrait3d.convert_checkpoint", icon='IMPORT')
        if self.convert_status:
            col.label(text=self.convert_status)


def get_preferences(context: bpy.types.Context | None = None) -> PORTRAIT3D_AP_preferences | None:
    """This add-on's preferences, or None when it is registered without being enabled (source tree)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


def worker_python(context: bpy.types.Context | None = None) -> str:
    """The preference, else the PORTRAIT3D_WORKER_PYTHON environment variable, else ''."""
    prefs = get_preferences(context)
    value = prefs.worker_python.strip() if prefs else ""
    return bpy.path.abspath(value) if value else os.environ.get(WORKER_PYTHON_ENV, "").strip()


def default_model(context: bpy.types.Context | None = None) -> str:
    prefs = get_preferences(context)
    return prefs.default_model.strip() if prefs else ""


def user_data_dir() -> Path:
    """The extension's user folder (the source-tree add-on uses Blender's user data files folder)."""
    try:
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except ValueError:  # not installed as an extension
        return Path(bpy.utils.user_resource('DATAFILES', path="portrait3d", create=True))


def models_dir(context: bpy.types.Context | None = None) -> Path:
    prefs = get_preferences(context)
    if prefs and prefs.models_folder.strip():
        return Path(bpy.path.abspath(prefs.models_folder.strip()))
    return user_data_dir() / "models"


classes = (PORTRAIT3D_AP_preferences,)
