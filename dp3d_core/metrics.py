"""Image quality scores shared by the scheduler study (dp3d_core.scheduler_steps) and training.evaluate."""
from __future__ import annotations

import torch

PSNR_CAP = 100.0  # dB reported for identical images


def psnr(pred: torch.Tensor, truth: torch.Tensor, cap: float = PSNR_CAP) -> torch.Tensor:
    """PSNR in dB per image ``[N, C, H, W]`` in [0, 1] (peak 1), capped at ``cap`` for identical images."""
    mse = ((pred.float() - truth.float()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-30))).clamp(max=cap)
