"""Previews of the finished frames: an animated GIF and a contact sheet, made by the worker Python (Blender
has no PIL; the worker Python has Pillow anyway), and an MP4 movie, rendered by Blender's own FFmpeg through a
temporary sequencer scene.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from .frame_import import scene_strips
from .worker_process import WorkerStartError, run_python

GIF_NAME = "preview.gif"
SHEET_NAME = "contact_sheet.png"
MOVIE_NAME = "preview.mp4"

_SCRIPT = r"""
import json, math, sys
from PIL import Image
spec = json.loads(sys.argv[1])
frames = [Image.open(p).convert("RGB") for p in spec["frames"]]
w, h = frames[0].size
if spec.get("gif"):
    frames[0].save(spec["gif"], save_all=True, append_images=frames[1:], duration=int(1000 / spec["fps"]), loop=0)
cols = min(len(frames), spec["columns"])
rows = math.ceil(len(frames) / cols)
sheet = Image.new("RGB", (cols * w, rows * h), (40, 40, 40))
for i, im in enumerate(frames):
    sheet.paste(im, ((i % cols) * w, (i // cols) * h))
sheet.save(spec["sheet"], format="PNG")
print("ok")
"""


class PreviewError(RuntimeError):
    """The previews could not be made; the message says why."""


def make_previews(python: str | os.PathLike, frames: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  fps: int = 12, columns: int = 8) -> tuple[Path, Path]:
    """Write ``preview.gif`` and ``contact_sheet.png`` into ``out_dir``; return their paths."""
    if not frames:
        raise PreviewError("No frames to preview.")
    out = Path(out_dir)
    gif, sheet = out / GIF_NAME, out / SHEET_NAME
    spec = {"frames": [str(f) for f in frames], "gif": str(gif), "sheet": str(sheet), "fps": fps,
            "columns": columns}
    try:
        result = run_python(python, ["-c", _SCRIPT, json.dumps(spec)], timeout=120)
    except WorkerStartError as exc:
        raise PreviewError(str(exc)) from None
    if result.returncode != 0 or not gif.is_file() or not sheet.is_file():
        tail = " | ".join(line for line in result.stderr.splitlines()[-3:] if line.strip())
        raise PreviewError(f"Making the GIF and contact sheet failed (exit code {result.returncode}): {tail}")
    return gif, sheet


def make_contact_sheet(python: str | os.PathLike, frames: Sequence[str | os.PathLike], path: str | os.PathLike,
                       columns: int = 8) -> Path:
    """Write a contact sheet of ``frames`` (PNG) to ``path``, replaced atomically; return its path."""
    if not frames:
        raise PreviewError("No frames for the contact sheet.")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    spec = {"frames": [str(f) for f in frames], "sheet": str(tmp), "columns": columns}
    try:
        result = run_python(python, ["-c", _SCRIPT, json.dumps(spec)], timeout=120)
        if result.returncode != 0 or not tmp.is_file():
            tail = " | ".join(line for line in result.stderr.splitlines()[-3:] if line.strip())
            raise PreviewError(f"Making the contact sheet {path.name} failed (exit code {result.returncode}): {tail}")
        os.replace(tmp, path)
    except WorkerStartError as exc:
        raise PreviewError(str(exc)) from None
    except OSError as exc:
        raise PreviewError(f"Cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def make_movie(frames: Sequence[str | os.PathLike], out_dir: str | os.PathLike, fps: int = 12) -> Path:
    """Write ``preview.mp4`` (H.264) of ``frames`` (PNGs in one folder) into ``out_dir``; return its path.

    A temporary scene holds one image strip and renders it with Blender's FFmpeg; the user's scenes are not
    touched. The colour view is Standard so the movie shows the frames' own sRGB values.
    """
    import bpy

    if not frames:
        raise PreviewError("No frames for the movie.")
    paths = [Path(f) for f in frames]
    if len({p.parent for p in paths}) != 1:
        raise PreviewError("The movie frames must lie in one folder.")
    if not bpy.app.build_options.codec_ffmpeg:
        raise PreviewError("This Blender has no FFmpeg; no preview.mp4 (the GIF and contact sheet still work).")
    out = Path(out_dir) / MOVIE_NAME
    scene = bpy.data.scenes.new("DP3D preview movie")
    image = None
    try:
        image = bpy.data.images.load(str(paths[0]), check_existing=False)
        width, height = image.size
        strip = scene_strips(scene).new_image(name="frames", filepath=str(paths[0]), channel=1, frame_start=1)
        for p in paths[1:]:
            strip.elements.append(p.name)
        scene.frame_start, scene.frame_end = 1, len(paths)
        r = scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = width + width % 2, height + height % 2, 100
        r.fps, r.fps_base = fps, 1.0
        r.use_sequencer = True
        if hasattr(r.image_settings, "media_type"):  # Blender 5: movies are a media type of their own
            r.image_settings.media_type = 'VIDEO'
        r.image_settings.file_format = 'FFMPEG'
        r.ffmpeg.format, r.ffmpeg.codec, r.ffmpeg.constant_rate_factor = 'MPEG4', 'H264', 'HIGH'
        scene.view_settings.view_transform = 'Standard'
        scene.view_settings.look = 'None'
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            r.filepath = str(Path(tmp) / "movie")
            bpy.ops.render.render(animation=True, scene=scene.name)
            made = sorted(Path(tmp).glob("movie*"))
            if not made or made[0].stat().st_size == 0:
                raise PreviewError("Blender rendered no movie file.")
            shutil.move(str(made[0]), out)  # written in full before it gets its final name
    except (RuntimeError, OSError) as exc:
        raise PreviewError(f"Making preview.mp4 failed: {exc}") from None
    finally:
        if image is not None:
            bpy.data.images.remove(image)
        bpy.data.scenes.remove(scene)
    return out
