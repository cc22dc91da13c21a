"""Checks on the reference portrait made inside Blender (no PIL here).

Only what cannot work is refused: a missing file, something that is not an image, an image
smaller than 64 px. Everything else is converted by the worker (``dp3d_core.images``: alpha
composited over white, grayscale expanded to RGB, 16-bit scaled, centre-cropped to a square,
resized) and only reported here, so the user knows what happens to the photo.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import bpy

MIN_SIDE = 64
HUGE_SIDE = 4096


class ReferenceImageError(ValueError):
    """The reference portrait cannot be used; the message says why and what to do."""


@dataclass
class ReferenceInfo:
    path: Path
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header without decoding the pixels; None otherwise."""
    try:
        with path.open("rb") as f:
            head = f.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head[:2] != b"\xff\xd8":
                return None
            f.seek(2)
            while True:
                marker = f.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                kind = marker[1]
                if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:
                    continue
                length_bytes = f.read(2)
                if len(length_bytes) < 2:
                    return None
                length = struct.unpack(">H", length_bytes)[0]
                if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
                    data = f.read(5)
                    height, width = struct.unpack(">HH", data[1:5])
                    return width, height
                f.seek(length - 2, os.SEEK_CUR)
    except (OSError, struct.error):
        return None


def check_reference(path: str | os.PathLike, *, prepared: bool = False) -> ReferenceInfo:
    """Check the reference portrait; raise ReferenceImageError for what cannot work. ``prepared``: the face
    crop is found by reference preparation, so a non-square photo needs no note."""
    raw = str(path).strip()
    if not raw:
        raise ReferenceImageError("No reference portrait: pick a photo in the Portrait 3D panel (Reference Image).")
    p = Path(bpy.path.abspath(raw)).expanduser()
    if not p.exists():
        raise ReferenceImageError(f"Reference portrait not found: {p}. Pick an existing PNG or JPEG file.")
    if not p.is_file():
        raise ReferenceImageError(f"The reference portrait {p} is a folder, not an image file.")

    size = _header_size(p)
    if size is not None and max(size) > HUGE_SIDE:
        # Decoding an 8k photo in Blender only to read its size costs seconds and hundreds of MB.
        width, height = size
        info = ReferenceInfo(p, width, height)
    else:
        info = _load_in_blender(p)
    if min(info.width, info.height) < MIN_SIDE:
        raise ReferenceImageError(
            f"The reference portrait {p.name} is only {info.width}x{info.height} px; it needs at least "
            f"{MIN_SIDE} px on the shorter side (a sharp face crop of 512 px or more works best).")
    if max(info.width, info.height) > HUGE_SIDE:
        info.warnings.append(f"The reference portrait is {info.width}x{info.height} px; it will be downscaled "
                             "(a face crop of about 512-1024 px is enough and loads faster).")
    if info.width != info.height and not prepared:
        info.notes.append(f"The reference portrait is {info.width}x{info.height}; its centre square is used "
                          "(turn on Prepare Reference, or crop it yourself, to keep a face that is off-centre).")
    return info


def _load_in_blender(p: Path) -> ReferenceInfo:
    try:
        image = bpy.data.images.load(str(p), check_existing=False)
    except RuntimeError as exc:
        raise ReferenceImageError(f"{p.name} is not an image Blender can read ({exc}). "
                                  "Use a PNG or JPEG photo.") from None
    try:
        width, height = (int(v) for v in image.size)
        if width == 0 or height == 0 or not image.has_data:
            raise ReferenceImageError(f"{p.name} is not an image Blender can read (or it is damaged). "
                                      "Use a PNG or JPEG photo.")
        info = ReferenceInfo(p, width, height)
        # Blender reports planes as depth: 8 gray, 24 RGB, 32 RGBA (128 for float RGBA).
        if image.is_float:
            info.notes.append("High bit-depth image: converted to 8-bit colour range for the model.")
        elif image.depth == 8:
            info.notes.append("Grayscale image: expanded to RGB (the result stays gray-toned).")
        if image.depth in (32, 128) and not image.is_float:
            info.notes.append("The image has transparency: it is composited over white.")
        return info
    finally:
        bpy.data.images.remove(image)
