"""Live previews while the worker denoises: the imported card and open Image Editors show ``<job dir>/preview/``.

The worker writes one preview PNG per view into ``<job dir>/preview/``, named as that view's output frame,
each file atomically, then sends a ``preview`` event. The first event points the shared "Portrait3D Frames"
image sequence at that folder (and brings in the card / camera background the Import As setting asks for);
later events only reload the image. When the run finishes, the normal import points the same image at the
final frames.
"""
from __future__ import annotations

from pathlib import Path

import bpy

from . import frame_import

PREVIEW_SUBDIR = "preview"
PREVIEW_MODES = ("CARD", "BACKGROUND")  # a sequencer strip caches its frames; it gets the final frames only


def preview_files(prepared, folder: str | Path | None = None) -> list[Path]:
    """The preview file of every view of ``prepared`` (a PreparedJob), in frame order."""
    folder = Path(folder) if folder else prepared.job_dir / PREVIEW_SUBDIR
    return [folder / p.name for p in prepared.frame_paths]


def show_in_image_editors(image: bpy.types.Image, seq: frame_import.FrameSequence,
                          context: bpy.types.Context | None = None) -> int:
    """Show ``image`` in every open Image Editor that shows nothing or already shows it (an editor showing
    another image is left alone); returns how many editors show it."""
    wm = (context or bpy.context).window_manager
    if wm is None:
        return 0
    shown = 0
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type != 'IMAGE_EDITOR':
                continue
            space = area.spaces.active
            if space.image is not None and space.image != image:
                continue
            if space.image != image:
                space.image = image
            frame_import.configure_image_user(space.image_user, seq)
            area.tag_redraw()
            shown += 1
    return shown


class PreviewDisplay:
    """What one run has shown of its previews (``shown``: the number of ``preview`` events handled)."""

    def __init__(self) -> None:
        self.shown = 0
        self.step: int | None = None
        self.image_name = ""
        self.reloads = 0

    def update(self, scene: bpy.types.Scene, camera: bpy.types.Object | None, prepared, status,
               context: bpy.types.Context | None = None) -> bool:
        """Show the latest previews (``status``: the worker's WorkerStatus); True when something was shown.

        Previews are skipped, never an error: a missing file (the worker writes them one by one) or a
        removed card just waits for the next event."""
        self.shown = status.previews
        files = preview_files(prepared, status.preview_folder)
        if not files or not all(f.is_file() for f in files):
            return False
        image = bpy.data.images.get(self.image_name) if self.image_name else None
        if image is not None and Path(bpy.path.abspath(image.filepath)).parent == files[0].parent:
            image.reload()  # the files were replaced in place (atomically); drop the cached frames
            self.reloads += 1
        else:
            try:
                seq = frame_import.frame_sequence(files, prepared.job.frames[0].scene_frame)
                modes = [m for m in scene.portrait3d.import_as if m in PREVIEW_MODES]
                if camera is None:
                    modes = []
                image = frame_import.sequence_image(seq)
                if modes:
                    frame_import.import_frames(scene, camera, seq, modes)
                show_in_image_editors(image, seq, context)
            except frame_import.FrameImportError:
                return False
            self.image_name = image.name
        self.step = status.preview_step
        _redraw_viewports(context)
        return True


def _redraw_viewports(context: bpy.types.Context | None) -> None:
    wm = (context or bpy.context).window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in {'VIEW_3D', 'IMAGE_EDITOR'}:
                area.tag_redraw()
