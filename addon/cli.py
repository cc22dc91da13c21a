"""``blender -c portrait3d ...``: the command-line entry, registered with Blender."""
from __future__ import annotations

import bpy

from .job_runner import cli_main

COMMAND = "portrait3d"
_handle = None


def register() -> None:
    global _handle
    if _handle is None:
        _handle = bpy.utils.register_cli_command(COMMAND, cli_main)


def unregister() -> None:
    global _handle
    if _handle is not None:
        bpy.utils.unregister_cli_command(_handle)
        _handle = None


def is_registered() -> bool:
    return _handle is not None
