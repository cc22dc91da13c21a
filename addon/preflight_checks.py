"""The pre-work checks of dp3d_core.preflight, fed from the scene (panel and command line run the same).

Called by ``job_writer.prepare_job`` after the poses are known and before any condition image is rendered or
anything is written into the output folder; the worker runs the same checks again on the job it receives.
"""
from __future__ import annotations

from pathlib import Path

from .core import job as jobspec
from .core import preflight
from .poses import frame_filename


def check_frame_count(count: int) -> None:
    """PreflightError for a frame range beyond the job limit (checked before any pose is computed)."""
    if count > jobspec.MAX_FRAMES:
        raise preflight.PreflightError(
            f"The frame range has {count} frames; one job holds at most {jobspec.MAX_FRAMES} (all frames are "
            "denoised together and kept in memory).", "Shorten the frame range, or split it into several jobs.")


def check_before_render(settings, out: Path, model_dir: Path, frames: list[int], size: int, reference: Path,
                        condition_images: list[Path] | None = None, back=None) -> list[str]:
    """Warnings for the job the scene describes; PreflightError (plain words) for one that cannot work.

    ``condition_images``: the images an image-folder source will use (None when conditions are rendered).
    ``back``: the job's back view (back_view.BackPlan; None for a DiffPortrait3D job).
    """
    check_frame_count(len(frames))
    rendered = condition_images is None
    images = [(reference, "reference portrait")]
    images += [(p, "condition image") for p in (condition_images or [])]
    if back is not None and back.image is not None:
        images.append((back.image, "back view"))
    plan = preflight.Plan(
        output=out, frame_names=[frame_filename(f) for f in frames], size=size, model=model_dir,
        window=jobspec.GenerationSettings().window, images=images,
        device="cpu" if settings.device == 'CPU' else None, memory=settings.memory.lower(),
        proxies=bool(settings.use_proxy_views and rendered),
        job_images=len(frames) * ((2 if settings.use_proxy_views else 1) if rendered else 0) + (back is not None),
        back=None if back is None else (preflight.BACK_GENERATE if back.image is None else preflight.BACK_IMAGE))
    return preflight.check_plan(plan)
