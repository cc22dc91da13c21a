"""Checks on the reference portrait made inside Blender (no PIL here).

Only what cannot work is refused: a missing file, something that is not an image, an image
smaller than 64 px. Everything else is converted by the worker (``dp3d_core.images``: alpha
composited over white, grayscale expanded to RGB, 16-bit scaled, centre-cropped to a square,
resized) and only reported here, so the user knows what happens to the photo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from .core import preflight

MIN_SIDE = 64
HUGE_SIDE = 4096
NOT_IN_BLENDER = ("HEIF", "AVIF")  # formats the worker decodes (pi-heif, Pillow) and Blender does not


class ReferenceImageError(ValueError):
    """The reference portrait cannot be used; the message says why and what to do."""


@dataclass
class ReferenceInfo:
    path: Path
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blender_reads: bool = True  # False for HEIF/AVIF: only the worker decodes them


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

    header = preflight.image_header(p)  # (format, width, height) without decoding the pixels
    huge = preflight.too_many_pixels(p, header)
    if huge is not None:
        raise ReferenceImageError(str(huge))
    if header is not None and header[0] in NOT_IN_BLENDER:
        if header[1] is None:
            raise ReferenceImageError(f"The size of the {header[0]} photo {p.name} cannot be read (the file may be "
                                      "damaged). Save it as JPEG and pick that.")
        info = ReferenceInfo(p, header[1], header[2], blender_reads=False)
        info.notes.append(f"{header[0]} photo: the worker decodes it; Blender cannot show it" +
                          (", so Prepare Reference hands Blender a PNG of the face crop." if prepared else "."))
    elif header is not None and header[1] is not None and max(header[1:]) > HUGE_SIDE:
        # Decoding an 8k photo in Blender only to read its size costs seconds and hundreds of MB.
        info = ReferenceInfo(p, header[1], header[2])
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
