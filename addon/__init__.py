"""Portrait 3D: one portrait photo -> a 3D-consistent camera turntable (DiffPortrait3D).

Blender side only: never imports torch. The generator runs in a separate worker process.
"""
from __future__ import annotations

import bpy

from . import (cli, job_runner, model_operators, operators, panel, preferences, properties, reference_prep,
               setup_operators)

classes = (
    properties.PORTRAIT3D_PG_settings,
    properties.PORTRAIT3D_PG_progress,
    *operators.classes,
    *setup_operators.classes,
    *model_operators.classes,
    *preferences.classes,
    *panel.classes,
)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.portrait3d = bpy.props.PointerProperty(type=properties.PORTRAIT3D_PG_settings)
    bpy.types.WindowManager.portrait3d_progress = bpy.props.PointerProperty(type=properties.PORTRAIT3D_PG_progress)
    cli.register()
    job_runner.register()


def unregister() -> None:
    job_runner.unregister()
    setup_operators.stop_all()
    model_operators.stop_all()
    reference_prep.stop_all()
    cli.unregister()
    del bpy.types.WindowManager.portrait3d_progress
    del bpy.types.Scene.portrait3d
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
