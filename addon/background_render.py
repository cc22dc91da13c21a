"""Condition and proxy renders in a background Blender process, so the UI never waits for a render.

Generate in the UI writes the scene (``bpy.data.libraries.write``: the scene and everything it uses) and a spec
into the job's staging folder and starts ``blender -b --factory-startup --python render_child.py -- spec.json``.
The child opens that file and renders with the same functions as the in-process path
(:func:`condition_render.condition_renderer`, :func:`condition_render.proxy_view_renderer`), printing one
progress line per image; the add-on polls it between timer ticks. Where no Blender binary is at hand (the
``bpy`` module) or the child fails, the renders run in Blender itself, a few per tick.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import bpy

from .worker_process import BackgroundCommand

CHILD_SCRIPT = Path(__file__).with_name("render_child.py")
PROGRESS_PREFIX = "DP3D-RENDER"
STALL_S = 300.0  # a child that finishes no image for this long is stopped (the renders then run in Blender itself)
# How to start a background Blender; None: the running Blender's binary. Tests set [sys.executable]: a Python with
# the bpy module runs render_child.py just as a background Blender would.
COMMAND: list[str] | None = None
_PROGRESS = re.compile(rf"^{PROGRESS_PREFIX} (cond|proxy) (\d+)$")


def blender_command() -> list[str] | None:
    """The command line that starts a background Blender before the child script, or None when there is none."""
    if COMMAND is not None:
        return list(COMMAND)
    binary = bpy.app.binary_path
    if not binary or not os.path.isfile(binary):
        return None
    return [binary, "-b", "--factory-startup", "--python-exit-code", "1", "--python"]


class RenderProcess:
    """One background Blender rendering the condition images (and proxy views) of a job into ``out``."""

    def __init__(self, command: list[str], scene: bpy.types.Scene, out: Path, *, camera: str, objects: list[str],
                 frames: list[int], size: int, proxy: dict | None = None) -> None:
        blend = out / "scene.blend"
        bpy.data.libraries.write(str(blend), {scene}, path_remap='ABSOLUTE')
        package = Path(__file__).resolve().parent
        spec = {"blend": str(blend), "scene": scene.name, "camera": camera, "objects": objects, "frames": frames,
                "size": size, "out": str(out), "proxy": proxy, "package": package.name,
                "package_parent": str(package.parent)}
        spec_path = out / "render_spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.out = out
        self._done = {"cond": 0, "proxy": 0}
        self.cmd = BackgroundCommand(command[0], [*command[1:], str(CHILD_SCRIPT), "--", str(spec_path)])

    def counts(self) -> dict[str, int]:
        """Images finished so far: {"cond": n, "proxy": m}, from the child's progress lines (kept here, since the
        command keeps only its last output lines)."""
        for line in list(self.cmd.lines):
            m = _PROGRESS.match(line)
            if m:
                self._done[m.group(1)] = max(self._done[m.group(1)], int(m.group(2)))
        return dict(self._done)

    def poll(self) -> int | None:
        return self.cmd.poll()

    def tail(self, n: int = 3) -> list[str]:
        return [line for line in self.cmd.tail(20) if not _PROGRESS.match(line)][-n:]

    def kill(self) -> None:
        self.cmd.kill()
        self.cmd.wait(5)


def child_main(spec: dict) -> None:
    """In the background Blender: open the written scene and render every image of ``spec`` into its folder."""
    from . import condition_render as cr
    from .job_writer import strip_png_metadata

    bpy.ops.wm.open_mainfile(filepath=spec["blend"], load_ui=False)
    scene = bpy.data.scenes[spec["scene"]]
    if bpy.context.window is not None:
        bpy.context.window.scene = scene  # the evaluated depsgraph of the proxy copy is the context scene's
    camera = bpy.data.objects[spec["camera"]]
    out, size = Path(spec["out"]), int(spec["size"])

    def render_all(kind: str, renderer) -> None:
        with renderer as render:
            for n, frame in enumerate(spec["frames"], 1):
                strip_png_metadata(render(frame))
                print(f"{PROGRESS_PREFIX} {kind} {n}", flush=True)

    objects = [bpy.data.objects[name] for name in spec["objects"]]
    render_all("cond", cr.condition_renderer(scene, camera, out, size=size, objects=objects))
    proxy = spec["proxy"]
    if proxy:
        head = bpy.data.objects[proxy["head"]]
        back = {} if not proxy.get("back_image") else {"back_image_path": proxy["back_image"],
                                                        "back_label_or_camera": proxy["back_label"]}
        projection = cr.project_reference(head, proxy["reference"], proxy.get("label"),
                                          anchor=bpy.data.objects[proxy["anchor"]], **back)
        render_all("proxy", cr.proxy_view_renderer(scene, camera, out, proxy_object=head, projection=projection,
                                                   size=size))
