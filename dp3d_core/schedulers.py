"""Noise schedules and samplers, on diffusers' schedulers.

The default is DDIM exactly as the official DiffPortrait3D sampler runs it (the ldm DDIM sampler):
timesteps ``k * (1000 // S) + 1`` for ``k = 0, 1, ...`` (``len(range(0, 1000, 1000 // S))`` of them, which
can be more than S), the final step going to ``alphas_cumprod[0]`` (not 1), no clipping of x0, and the
schedule computed in float64 and stored in float32 like the official model buffers. Where the official
code would produce timestep 1000 and crash (S = 3, 9, 27, 37, ...), that out-of-range step is dropped.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .job import SCHEDULERS as SCHEDULER_NAMES

# The schedule the official model was trained with (ldm "linear", i.e. diffusers "scaled_linear").
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


# The official 3D-aware noise diffuses the proxy latent to this timestep (not to the first denoising step).
AWARE_NOISE_TIMESTEP = 999


class SchedulerError(ValueError):
    """A scheduler name or step count that cannot be used."""


def official_ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending int64 DDIM timesteps with the official spacing, never reaching ``num_train_timesteps``."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise SchedulerError(f"the number of denoising steps must be a whole number >= 1, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise SchedulerError(f"at most {num_train_timesteps} denoising steps are possible, got {num_steps}")
    step = num_train_timesteps // num_steps
    timesteps = np.arange(0, num_train_timesteps, step, dtype=np.int64) + 1
    timesteps = timesteps[timesteps < num_train_timesteps]
    return timesteps[::-1].copy()


def float64_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """ldm's schedule: betas = linspace(sqrt(b0), sqrt(b1))**2 in float64, cumprod in float64, stored float32."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)


class OfficialDDIMScheduler(DDIMScheduler):
    """diffusers' DDIM step with the official timestep spacing and float64-derived schedule."""

    # wraps(): diffusers reads the accepted config keys from the __init__ signature.
    @functools.wraps(DDIMScheduler.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.beta_schedule == "scaled_linear":
            self.alphas_cumprod = float64_alphas_cumprod(
                self.config.beta_start, self.config.beta_end, self.config.num_train_timesteps)
            self.final_alpha_cumprod = (torch.tensor(1.0) if self.config.set_alpha_to_one
                                        else self.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        timesteps = official_ddim_timesteps(num_inference_steps, self.config.num_train_timesteps)
        # step() derives the previous timestep as t - num_train_timesteps // num_inference_steps,
        # which is exactly the official spacing when num_inference_steps is the requested S.
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)


def make_scheduler(name: str = "ddim", config: dict[str, Any] | None = None) -> SchedulerMixin:
    """A scheduler by name, from a diffusers scheduler config (the model folder's ``scheduler/``)."""
    base = dict(DEFAULT_SCHEDULER_CONFIG)
    base.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
    key = name.lower().replace(" ", "").replace("_", "")
    if key == "ddim":
        return OfficialDDIMScheduler.from_config(base)
    if key in ("dpm++2m", "dpmsolver++", "dpm++"):
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if key == "unipc":
        return UniPCMultistepScheduler.from_config(base)
    raise SchedulerError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")


def aware_initial_latent(proxy_latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                         t: int = AWARE_NOISE_TIMESTEP) -> torch.Tensor:
    """3D-aware noise: the proxy latent diffused to timestep ``t`` (official ``q_sample(fea_latent, 999)``)."""
    if proxy_latents.shape != noise.shape:
        raise ValueError(f"proxy latents {tuple(proxy_latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    acp = alphas_cumprod.to(torch.float64)[int(t)]
    # Official buffers hold sqrt() taken in float64 and stored in float32.
    signal = acp.sqrt().to(torch.float32).to(proxy_latents.device)
    sigma = (1.0 - acp).sqrt().to(torch.float32).to(proxy_latents.device)
    return (signal * proxy_latents.float() + sigma * noise.float()).to(proxy_latents.dtype)
