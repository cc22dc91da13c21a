"""Live previews of a running job: every few seconds, a cheap picture of every view as it forms.

What a preview shows: the clean latents the model predicts at the current step (``pred_x0``), mapped
to RGB by a linear map (latent channels + bias -> RGB) fitted by least squares on the model's own
VAE: the reference latents, against their VAE decode averaged over each latent pixel's 8x8 block (one
decode of the reference per run; the worker does it at the first preview). No VAE decode runs for a
preview itself. On the shipped small model (64 px, 8x8 latents) such a preview is within 23.0 dB PSNR
of the decoded frames (the best any linear map reaches on them: 23.9 dB; fitting on the reference
photo instead of its decode: 20.6 dB). The picture is at latent resolution, upsampled bilinearly to
:data:`PREVIEW_SIZE` pixels (never above the job's size), so it is blurry by design: it shows the
turntable forming, the frames show the result.

Files: ``<job dir>/preview/<frame file name>`` (:data:`PREVIEW_DIR`), one PNG per view, named exactly
as that view's output frame, each written atomically; then the worker emits a ``preview`` event.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .images import encode_png
from .protocol import write_atomic

PREVIEW_DIR = "preview"
PREVIEW_SIZE = 128
EVERY_SECONDS = 5.0
MAX_OVERHEAD = 0.02
ENV_EVERY_SECONDS = "DP3D_PREVIEW_EVERY_SECONDS"

if TYPE_CHECKING:  # torch is imported where it is used, so importing this module stays cheap
    import torch


def fit_latent_to_rgb(latents: torch.Tensor, images: np.ndarray) -> np.ndarray:
    """Least-squares ``[C + 1, 3]`` map from a latent pixel (C channels and 1) to the mean RGB of its block.

    ``latents``: ``[R, C, h, w]``; ``images``: ``[R, H, W, 3]`` in [0, 1] with H, W multiples of h, w.
    """
    lat = latents.detach().float().cpu().numpy()
    r, c, h, w = lat.shape
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.shape[0] != r or imgs.shape[1] % h or imgs.shape[2] % w:
        raise ValueError(f"images {imgs.shape} do not fit latents {lat.shape}")
    fy, fx = imgs.shape[1] // h, imgs.shape[2] // w
    target = imgs.reshape(r, h, fy, w, fx, 3).mean(axis=(2, 4)).reshape(-1, 3)
    x = np.concatenate([lat.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((r * h * w, 1))], axis=1)
    matrix, *_ = np.linalg.lstsq(x.astype(np.float64), target, rcond=None)
    return matrix.astype(np.float32)


def latents_to_rgb(latents: torch.Tensor, matrix: np.ndarray, size: int) -> np.ndarray:
    """``[N, C, h, w]`` latents -> ``[N, size, size, 3]`` float32 in [0, 1] through the linear map."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(matrix).to(latents.device, torch.float32)
    rgb = torch.einsum("nchw,cd->ndhw", latents.float(), m[:-1]) + m[-1].view(1, 3, 1, 1)
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        rgb = F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
    return rgb.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


class LivePreview:
    """Writes the previews of one job at most every ``every_seconds`` and within ``max_overhead`` of the time."""

    def __init__(self, job_dir: str | os.PathLike, names: list[str], matrix: np.ndarray, size: int,
                 every_seconds: float = EVERY_SECONDS, max_overhead: float = MAX_OVERHEAD) -> None:
        self.folder = Path(job_dir) / PREVIEW_DIR
        self.names = list(names)
        self.matrix = matrix
        self.size = int(size)
        self.every_seconds = every_seconds
        self.max_overhead = max_overhead
        self.last_time = float("-inf")  # the first step after the start gets a preview at once
        self.last_cost = 0.0

    @staticmethod
    def every_seconds_from_env(environ: dict[str, str] | None = None) -> float:
        env = os.environ if environ is None else environ
        return max(0.0, float(env[ENV_EVERY_SECONDS])) if env.get(ENV_EVERY_SECONDS) else EVERY_SECONDS

    def due(self, now: float) -> bool:
        elapsed = now - self.last_time
        return elapsed >= self.every_seconds and elapsed * self.max_overhead >= self.last_cost

    def write(self, pred_x0: torch.Tensor) -> float:
        """One PNG per view from the predicted clean latents ``[N, C, h, w]``; returns the seconds it took."""
        started = time.perf_counter()
        images = latents_to_rgb(pred_x0, self.matrix, self.size)
        for name, image in zip(self.names, images):
            write_atomic(self.folder / name, encode_png(image), durable=False)
        now = time.perf_counter()
        self.last_time, self.last_cost = time.monotonic(), now - started
        return now - started


def reset_folder(job_dir: str | os.PathLike, keep_previews: bool) -> None:
    """Remove temporary files of killed preview writes, and the previews themselves unless ``keep_previews``."""
    folder = Path(job_dir) / PREVIEW_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and (path.name.endswith(".tmp") or not keep_previews):
                path.unlink(missing_ok=True)


def preview_size(job_size: int, latent_size: int) -> int:
    """Preview edge in pixels: :data:`PREVIEW_SIZE`, at least the latent size, at most the job's size."""
    return min(job_size, max(PREVIEW_SIZE, latent_size))
