"""Portrait 3D: one portrait photo -> a 3D-consistent camera turntable (DiffPortrait3D).

Blender side only: never imports torch. The generator runs in a separate worker process.
"""
from __future__ import annotations

import bpy

from . import cli, operators, panel, preferences, properties

classes = (
    properties.PORTRAIT3D_PG_settings,
    *operators.classes,
    *preferences.classes,
    *panel.classes,
)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.portrait3d = bpy.props.PointerProperty(type=properties.PORTRAIT3D_PG_settings)
    cli.register()


def unregister() -> None:
    cli.unregister()
    del bpy.types.Scene.portrait3d
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
