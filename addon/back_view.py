"""The back of the head for DiffPortrait360 models: which back view a job uses, and the one the panel shows.

The panel shows one back view (``settings.back_view``): one the worker's back-head model generated (*Generate
Back View*, *Regenerate* with the next seed) or the artist's own photo (*Use Photo...*). A generated view is used
as it is once accepted (*Accept*); a photo is accepted by choosing it. Without an accepted view a job leaves
``back.image`` empty and the worker generates the back view with ``settings.back_seed`` first (contract 2 of
issue 17). A generated view remembers what it was made from (photo, model, size): after a change it is stale and
Generate makes a new one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import bpy

from .core import preflight
from .reference_check import NOT_IN_BLENDER

IMAGE_NAME = "Portrait3D Back View"
CONDITION_FILE = "back_cond.png"  # in the job's conditions folder


class BackViewError(ValueError):
    """No back view can be used or made; the message says what to do."""


@dataclass
class BackPlan:
    """What a job's ``back`` says: ``image`` None = the worker generates it with ``seed``."""

    image: Path | None
    origin: str  # "generated" or "photo"
    seed: int


def inputs_key(reference: str | os.PathLike, model_dir: str | os.PathLike, size: int) -> str:
    """What a generated back view depends on beyond its seed (the photo file, the model folder, the size)."""
    ref = Path(bpy.path.abspath(str(reference))).expanduser()
    try:
        stamp = ref.stat().st_mtime_ns
    except OSError:
        stamp = 0
    return f"{ref.resolve()}|{stamp}|{Path(model_dir).resolve()}|{int(size)}"


def accepted_view(s, key: str) -> Path | None:
    """The back view Generate uses as it is: the photo, or the accepted generated one made from ``key``."""
    if not s.back_view or not s.back_accepted:
        return None
    path = Path(bpy.path.abspath(s.back_view))
    if s.back_origin == 'PHOTO':
        return path
    if s.back_origin == 'GENERATED' and s.back_key == key and path.is_file():
        return path
    return None


def plan(s, *, back_head: bool, key: str, generate_new: bool = False) -> BackPlan:
    """The back view of a job from the settings ``s``; BackViewError when none can be used or made.

    ``generate_new`` (Generate Back View): always a new one from ``back_seed``."""
    image = None if generate_new else accepted_view(s, key)
    if image is not None:
        if s.back_origin == 'PHOTO':
            try:
                preflight.check_image(image, "back photo")
            except preflight.PreflightError as exc:
                raise BackViewError(f"{exc} Pick another back photo with Use Photo..., or clear it by "
                                    "generating a back view.") from None
            return BackPlan(image, "photo", int(s.back_seed))
        return BackPlan(image, "generated", int(s.back_view_seed))
    if not back_head:
        raise BackViewError("This DiffPortrait360 model has no back-head model (no back_head folder inside it), "
                            "so it cannot make the back of the head: pick your own photo of the back of the head "
                            "with Use Photo... (Back View panel; --back-image on the command line), or use a "
                            "model folder with back_head/.")
    return BackPlan(None, "generated", int(s.back_seed))


def record_generated(s, path: str | os.PathLike, seed: int, key: str) -> None:
    """The worker made a back view (``back_view`` event): show it; accepted only if it is the accepted one."""
    path = str(Path(path).resolve())
    same = s.back_origin == 'GENERATED' and s.back_view and Path(bpy.path.abspath(s.back_view)).resolve() == \
        Path(path) and s.back_key == key
    s.back_accepted = bool(same and s.back_accepted)
    s.back_view, s.back_origin, s.back_view_seed, s.back_key = path, 'GENERATED', int(seed), key
    load_image(path)


def use_photo(s, path: str | os.PathLike) -> Path:
    """The artist's own back photo (checked now); BackViewError when it cannot be read."""
    p = Path(bpy.path.abspath(str(path))).expanduser().resolve()
    try:
        kind = preflight.check_image(p, "back photo")[0]
    except preflight.PreflightError as exc:
        raise BackViewError(str(exc)) from None
    if kind in NOT_IN_BLENDER:  # Blender projects the back photo onto the proxy head itself
        raise BackViewError(f"Blender cannot read the {kind} photo {p.name}: save it as JPEG or PNG and pick that.")
    s.back_view, s.back_origin, s.back_accepted, s.back_key = str(p), 'PHOTO', True, ""
    load_image(p)
    return p


def accept(s, key: str) -> Path:
    """Accept the shown generated back view; BackViewError when there is none or it is stale."""
    path = Path(bpy.path.abspath(s.back_view)) if s.back_view else None
    if s.back_origin != 'GENERATED' or path is None:
        raise BackViewError("No generated back view to accept: press Generate Back View first.")
    if not path.is_file():
        raise BackViewError(f"The back view {path} is gone: generate it again.")
    if s.back_key != key:
        raise BackViewError("The shown back view was made for another photo, model or size: generate it again.")
    s.back_accepted = True
    return path


def stale(s, key: str | None) -> bool:
    """The shown back view is a generated one made from other inputs than ``key``."""
    return s.back_origin == 'GENERATED' and bool(s.back_view) and key is not None and s.back_key != key


def load_image(path: str | os.PathLike | None) -> bpy.types.Image | None:
    """(Re)load the panel's back view image from ``path`` (from operators and timers, never from a draw call)."""
    image = bpy.data.images.get(IMAGE_NAME)
    if image is not None:
        bpy.data.images.remove(image)
    if path is None or not Path(path).is_file():
        return None
    try:
        image = bpy.data.images.load(str(path), check_existing=False)
    except RuntimeError:
        return None
    image.name = IMAGE_NAME
    image.use_fake_user = True  # kept in the .blend (as a path), so the panel shows it again after reopening
    if not bpy.app.background:
        image.preview_ensure()
    return image


def shown_image() -> bpy.types.Image | None:
    """The loaded back view image, if any (safe in draw calls)."""
    return bpy.data.images.get(IMAGE_NAME)
