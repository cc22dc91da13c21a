"""Animated GIF and contact sheet of the frames, made by the worker Python (Blender has no PIL).

Blender can write PNGs but no GIF, and an FFMPEG movie needs a sequencer render; the worker
Python has Pillow anyway (the worker reads images with it), so a tiny ``-c`` script does both.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .worker_process import WorkerStartError, run_python

GIF_NAME = "preview.gif"
SHEET_NAME = "contact_sheet.png"

_SCRIPT = r"""
import json, math, sys
from PIL import Image
spec = json.loads(sys.argv[1])
frames = [Image.open(p).convert("RGB") for p in spec["frames"]]
w, h = frames[0].size
frames[0].save(spec["gif"], save_all=True, append_images=frames[1:], duration=int(1000 / spec["fps"]), loop=0)
cols = min(len(frames), spec["columns"])
rows = math.ceil(len(frames) / cols)
sheet = Image.new("RGB", (cols * w, rows * h), (40, 40, 40))
for i, im in enumerate(frames):
    sheet.paste(im, ((i % cols) * w, (i // cols) * h))
sheet.save(spec["sheet"])
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
