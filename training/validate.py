"""Validation images: a short DDIM run per held-out sample, saved as a grid.

Columns: reference | condition | generated | ground truth (one row per target view). Stage 0 has no
reference or condition (unconditional samples); stage 1 no condition (F_ref only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dp3d_core.models.denoiser import DiffPortrait3DDenoiser
from dp3d_core.schedulers import make_scheduler

from .stages import StageInputs, predict


@torch.no_grad()
def sample_views(stage: str, denoiser: DiffPortrait3DDenoiser, vae: Any, context: torch.Tensor,
                 inputs: StageInputs, scheduler_config: dict[str, Any], steps: int = 20, guidance: float = 1.0,
                 seed: int = 0) -> torch.Tensor:
    """Generated images ``[N, 3, H, W]`` in [-1, 1] for the rows of ``inputs`` (official DDIM, eta 0)."""
    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(inputs.x0.shape, generator=g).to(inputs.x0.device, inputs.x0.dtype)
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = predict(stage, denoiser, x, tt, context, inputs)
        if guidance != 1.0 and stage != "0":
            eps_u = predict(stage, denoiser, x, tt, context, inputs, conditional=False)
            eps = eps_u + guidance * (eps - eps_u)
        x = sched.step(eps, t, x).prev_sample
    return decode(vae, x)


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    z = latents / float(vae.config.scaling_factor)
    return vae.decode(z.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1).cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8."""
    a = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    return a.permute(0, 2, 3, 1).numpy()


def save_grid(columns: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Save image columns (each ``[N, 3, H, W]`` in [-1, 1], same N) as one PNG grid."""
    cols = [to_uint8(c) for c in columns]
    n, h, w, _ = cols[0].shape
    grid = np.full((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
    for j, col in enumerate(cols):
        for i in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = col[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
