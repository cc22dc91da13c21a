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


def float64_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """ldm's "linear" betas: linspace(sqrt(b0), sqrt(b1))**2 in float64."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def float64_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """ldm's schedule: cumprod(1 - betas) in float64, stored float32."""
    betas = float64_betas(beta_start, beta_end, num_train_timesteps)
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


class Float16ScheduleDDIMScheduler(OfficialDDIMScheduler):
    """DDIM exactly as the official DiffPortrait360 sampler runs it: that model holds its noise-schedule buffers
    in float16 (its README quirks S1, S2), so every schedule number is a float16 number.

    ``alphas_cumprod16`` = the float64 schedule rounded to float16; per step the official ``make_schedule`` /
    ``p_sample_ddim`` arithmetic: ``sqrt(1 - a_t)`` taken IN float16, sigma in float64 from the float16 values,
    then everything as float32 scalars (``ddim_constants``). Against the float32 schedule the final latent of a
    4-step run moves by up to 9e-3, far above the parity tolerance, hence this class. ``alphas_cumprod`` stays the
    float32 table: the official q_sample tables are float64 square roots rounded to float16, not roots of the
    rounded values, so the 3D-aware noise derives them from it (``aware_initial_latent(float16_schedule=True)``).
    """

    @functools.wraps(DDIMScheduler.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alphas_cumprod16 = self.alphas_cumprod.double().to(torch.float16)

    def ddim_constants(self, timestep: int, eta: float) -> tuple[float, float, float, float]:
        """(a_t, a_prev, sqrt(1 - a_t), sigma_t) as the official sampler hands them to p_sample_ddim (float32)."""
        prev = timestep - self.config.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod16[timestep]
        a_prev = self.alphas_cumprod16[prev] if prev >= 0 else self.final_alpha_cumprod.double().to(torch.float16)
        one_minus = 1.0 - a_t  # float16
        sqrt_one_minus = np.sqrt(one_minus.numpy())  # float16 arithmetic, as make_schedule does
        # make_schedule divides a float64 array by this float16 tensor: torch computes that as the float16
        # reciprocal times the array, so 1 / (1 - a_t) is rounded to float16 before the float64 arithmetic.
        a_t64, a_prev64 = a_t.double(), a_prev.double()
        sigma = eta * torch.sqrt(one_minus.reciprocal().double() * (1.0 - a_prev64) * (1.0 - a_t64 / a_prev64))
        return tuple(float(torch.tensor(float(v), dtype=torch.float32)) for v in (a_t, a_prev, sqrt_one_minus, sigma))

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        a_t, a_prev, sqrt_one_minus, sigma = (
            torch.tensor(v, dtype=torch.float32, device=sample.device)
            for v in self.ddim_constants(int(timestep), eta))
        e = model_output.float()
        x = sample.float()
        pred_x0 = (x - sqrt_one_minus * e) / a_t.sqrt()
        direction = (1.0 - a_prev - sigma**2).sqrt() * e
        prev = a_prev.sqrt() * pred_x0 + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev = prev + sigma * variance_noise.float()
        prev, pred_x0 = prev.to(sample.dtype), pred_x0.to(sample.dtype)
        if not return_dict:
            return (prev, pred_x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred_x0)


def make_scheduler(name: str = "ddim", config: dict[str, Any] | None = None,
                   float16_schedule: bool = False) -> SchedulerMixin:
    """A scheduler by name, from a diffusers scheduler config (the model folder's ``scheduler/``).

    ``float16_schedule``: DDIM with the schedule rounded to float16 as DiffPortrait360 holds it
    (:class:`Float16ScheduleDDIMScheduler`). DPM++ 2M and UniPC keep the float32 schedule (they are not the
    official sampler; the rounding moves their noise levels by < 1e-3 relative).
    """
    base = dict(DEFAULT_SCHEDULER_CONFIG)
    base.update({k: v for k, v in (config or {}).items() if not k.startswith("_")})
    key = name.lower().replace(" ", "").replace("_", "")
    if key == "ddim":
        return (Float16ScheduleDDIMScheduler if float16_schedule else OfficialDDIMScheduler).from_config(base)
    if key in ("dpm++2m", "dpmsolver++", "dpm++"):
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    if key == "unipc":
        return UniPCMultistepScheduler.from_config(base)
    raise SchedulerError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")


def aware_initial_latent(proxy_latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                         t: int = AWARE_NOISE_TIMESTEP, float16_schedule: bool = False) -> torch.Tensor:
    """3D-aware noise: the proxy latent diffused to timestep ``t`` (official ``q_sample(fea_latent, 999)``).

    ``alphas_cumprod``: the float32 schedule (``OfficialDDIMScheduler.alphas_cumprod``). ``float16_schedule``:
    the coefficients rounded to float16 as DiffPortrait360's buffers hold them (0.0682373 / 0.9975586 at 999).
    """
    if proxy_latents.shape != noise.shape:
        raise ValueError(f"proxy latents {tuple(proxy_latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    acp = alphas_cumprod.to(torch.float64)[int(t)]
    # Official buffers hold sqrt() taken in float64 and stored in float32 (DiffPortrait360: in float16).
    stored = torch.float16 if float16_schedule else torch.float32
    signal = acp.sqrt().to(stored).float().to(proxy_latents.device)
    sigma = (1.0 - acp).sqrt().to(stored).float().to(proxy_latents.device)
    return (signal * proxy_latents.float() + sigma * noise.float()).to(proxy_latents.dtype)
