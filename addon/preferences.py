"""Add-on preferences: the worker Python, the models, and where user data lives."""
from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, IntProperty, StringProperty

from .worker_env import ACCELERATORS

# The extension's module name ("bl_ext.<repo>.portrait3d" when installed, "addon" in the source tree).
ADDON_ID = __package__
WORKER_PYTHON_ENV = "PORTRAIT3D_WORKER_PYTHON"


class PORTRAIT3D_PG_model_folder(bpy.types.PropertyGroup):
    """A model folder the user added to the model list (Add Model Folder)."""

    path: StringProperty(name="Folder", subtype='DIR_PATH')


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

    # Set Up Worker
    setup_accelerator: EnumProperty(
        name="Torch Build", default='AUTO',
        items=[('AUTO', "Automatic", "Use what was detected on this machine")] +
              [(key, label, tip) for key, label, tip in ACCELERATORS],
        description="Which torch build Set Up Worker installs")
    setup_base_python: StringProperty(
        name="Base Python", subtype='FILE_PATH',
        description="Python the worker environment is made from (empty: Blender's own Python; 3.10 or newer)")
    setup_wheel_folder: StringProperty(
        name="Wheel Folder", subtype='DIR_PATH',
        description="Studio option: install from the .whl files in this folder (works with online access off)")
    setup_index_url: StringProperty(
        name="Index URL", description="Studio option: a package index (mirror) used instead of PyPI and PyTorch's "
                                      "index; only with online access on")
    setup_share_from: StringProperty(
        name="Use Packages From", subtype='FILE_PATH',
        description="Studio option: a Python whose installed packages (e.g. a central torch) the worker environment "
                    "reuses instead of installing its own copies")
    setup_extra_packages: StringProperty(
        name="Extra Packages", description="Studio option: more packages to install, separated by spaces "
                                           "(e.g. xformers==0.0.30)")
    show_setup_options: BoolProperty(name="Studio Options", default=False)

    # Models
    extra_model_folders: CollectionProperty(type=PORTRAIT3D_PG_model_folder)
    active_model_index: IntProperty(default=0)

    def draw(self, context):
        from . import model_operators, setup_operators

        layout = self.layout
        setup_operators.draw_worker_section(layout, self)
        col = layout.column()
        col.prop(self, "worker_python")
        row = col.row()
        row.operator("portrait3d.check_worker", icon='CHECKMARK')
        for line in self.check_result.splitlines():
            col.label(text=line)
        layout.separator()
        model_operators.draw_models_section(layout, self)


def get_preferences(context: bpy.types.Context | None = None) -> PORTRAIT3D_AP_preferences | None:
    """This add-on's preferences, or None when it is registered without being enabled (source tree)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


def worker_python(context: bpy.types.Context | None = None) -> str:
    """The preference, else the PORTRAIT3D_WORKER_PYTHON environment variable, else the environment Set Up
    Worker made when it is ready, else ''."""
    from . import worker_env

    prefs = get_preferences(context)
    value = prefs.worker_python.strip() if prefs else ""
    if value:
        return bpy.path.abspath(value)
    value = os.environ.get(WORKER_PYTHON_ENV, "").strip()
    if value or prefs is None:
        return value
    env = user_data_dir() / worker_env.ENV_FOLDER
    return str(worker_env.env_python(env)) if worker_env.env_state(env)[0] == "ready" else ""


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


classes = (PORTRAIT3D_PG_model_folder, PORTRAIT3D_AP_preferences)
