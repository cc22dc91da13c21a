"""What each stage feeds the networks, and its loss (eps-prediction MSE at random timesteps).

All randomness of a sample (its VAE posterior draws, timestep, noise, CFG dropout, in that order) comes from its
own ``torch.Generator``, seeded by (seed, step, micro-batch, the sample's index in the global batch): a resumed
run repeats the uninterrupted run exactly, and a sample's draws do not depend on which process trains it, so
N processes reproduce one process at the same global batch.

CFG dropout (``uncond_prob``): a dropped sample (stage 3: a whole clip) is trained through ``eps_uncond``
(F alone). F is locked, so in stages 1 and 2 a dropped sample gives no gradient at all (its loss is the base
model's); in stage 3 the unconditional pass runs the view modules (including the middle one, which only the
unconditional pass uses), so dropout is what trains them for CFG sampling.

Stage 0 with ``reference_prob`` > 0: that fraction of the samples is denoised by F reading the attention bank
of the reference view, written by F_ref with its weights tied to F's (:func:`training.models.tie_parameters`),
the rest by F alone. SD's self-attention can read a reference image's features without training (the
"reference-only" trick); a small F trained from scratch cannot, so its stand-in pretraining teaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from dp3d_core.models.denoiser import DiffPortrait3DDenoiser


@dataclass
class StageInputs:
    """Latent-space inputs of one micro-batch (rows = target views)."""

    x0: torch.Tensor            # [N, C, h, w] clean target latents
    reference: torch.Tensor     # [N, C, h, w] the reference latent of each row's identity
    condition: torch.Tensor     # [N, 3, H, W] condition images in [-1, 1]
    group: int                  # rows per sample (1, or the clip length in stages 3 and 360)
    back_reference: torch.Tensor | None = None   # [N, C, h, w] stage 360: the back view, the second reference

    def rows(self, keep: torch.Tensor) -> "StageInputs":
        """The inputs of the rows where ``keep`` is true."""
        back = None if self.back_reference is None else self.back_reference[keep]
        return StageInputs(self.x0[keep], self.reference[keep], self.condition[keep], self.group, back)

    def references(self) -> list[torch.Tensor]:
        """The reference latents of the conditional pass: the reference, then (stage 360) the back view."""
        return [self.reference] + ([] if self.back_reference is None else [self.back_reference])


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision networks (the loss and latents stay in float32), else the networks' own."""
    return torch.promote_types(dtype, torch.float32)


def per_sample(generators: Sequence[torch.Generator], shape: tuple[int, ...], fn=torch.randn) -> torch.Tensor:
    """Rows drawn sample by sample: ``shape[0]`` rows split evenly, sample j's rows from ``generators[j]``."""
    count = len(generators)
    if count == 0 or shape[0] % count:
        raise ValueError(f"{shape[0]} rows cannot be split over {count} samples")
    rows = (shape[0] // count, *shape[1:])
    return torch.cat([fn(rows, generator=g) for g in generators])


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, generators: Sequence[torch.Generator],
           cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
           keys: list[str] | None = None) -> torch.Tensor:
    """Scaled VAE latents; the posterior noise of sample j's images (consecutive rows) comes from
    ``generators[j]``. With ``cache`` and ``keys`` (one per image, e.g. its path) the posterior mean/std of each
    image is computed once and kept on the CPU."""
    if cache is None or keys is None:
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        mean, std = dist.mean.to(work_dtype(vae.dtype)).cpu(), dist.std.to(work_dtype(vae.dtype)).cpu()
    else:
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            dist = vae.encode(images[missing].to(vae.device, vae.dtype)).latent_dist
            for j, i in enumerate(missing):
                cache[keys[i]] = (dist.mean[j].to(work_dtype(vae.dtype)).cpu(),
                                  dist.std[j].to(work_dtype(vae.dtype)).cpu())
        mean = torch.stack([cache[k][0] for k in keys])
        std = torch.stack([cache[k][1] for k in keys])
    noise = per_sample(generators, tuple(mean.shape)).to(mean.dtype)
    return (mean + std * noise) * float(vae.config.scaling_factor)


def prepare_inputs(batch: dict[str, Any], vae: Any, generators: Sequence[torch.Generator], device: torch.device,
                   cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> StageInputs:
    """Latents of a batch; ``generators``: one per sample (see the module docstring)."""
    targets = batch["targets"]                        # [B, T, 3, H, W]
    b, t = targets.shape[:2]
    target_keys = [p for paths in batch["paths"] for p in paths] if "paths" in batch else None
    ref_keys = batch.get("reference_path")
    x0 = encode(vae, targets.flatten(0, 1), generators, cache, target_keys).to(device)
    ref = encode(vae, batch["reference"], generators, cache, ref_keys).to(device)
    reference = ref.repeat_interleave(t, dim=0)
    condition = batch["conditions"].flatten(0, 1).to(device, x0.dtype)
    back = None
    if "back_reference" in batch:
        back = encode(vae, batch["back_reference"], generators, cache,
                      batch.get("back_reference_path")).to(device).repeat_interleave(t, dim=0)
    return StageInputs(x0=x0, reference=reference, condition=condition, group=t, back_reference=back)


def noisy(x0: torch.Tensor, alphas_cumprod: torch.Tensor, group: int,
          generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM forward process: (x_t, t, eps); one timestep per sample of ``group`` rows (a clip shares it)."""
    steps = alphas_cumprod.shape[0]
    t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).repeat_interleave(group)
    work = work_dtype(x0.dtype)
    eps = per_sample(generators, tuple(x0.shape)).to(work)
    acp = alphas_cumprod.to(torch.float64)[t].to(work).view(-1, 1, 1, 1)
    x0_cpu = x0.detach().to(work).cpu()
    xt = acp.sqrt() * x0_cpu + (1 - acp).sqrt() * eps
    return xt.to(x0.device, x0.dtype), t.to(x0.device), eps.to(x0.device, x0.dtype)


def predict(stage: str, denoiser: DiffPortrait3DDenoiser, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            inputs: StageInputs, conditional: bool = True, reference_t: torch.Tensor | None = None) -> torch.Tensor:
    """eps for the rows of one stage. ``conditional=False``: the unconditional pass (F alone). ``reference_t``:
    the timesteps F_ref gets in stage 1 (default: ``t``, as in the pipeline)."""
    if stage == "0" or not conditional:
        if stage == "0":
            ctx = context.expand(xt.shape[0], -1, -1)
            return denoiser.unet(xt, t, encoder_hidden_states=ctx, return_dict=False)[0]
        return denoiser.eps_uncond(xt, t, context)
    if stage == "1":
        # Stage 1 has no camera control: F reads F_ref's bank, no ControlNet residuals.
        ctx = context.expand(xt.shape[0], -1, -1)
        try:
            denoiser.write_reference_bank([inputs.reference], t if reference_t is None else reference_t, ctx)
            denoiser.bank.reading = True
            return denoiser.unet(xt, t, encoder_hidden_states=ctx, return_dict=False)[0]
        finally:
            denoiser.bank.clear()
    return denoiser.eps_cond(xt, t, context, inputs.references(), inputs.condition)


def eps_loss(pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             high_noise_weight: float = 1.0) -> torch.Tensor:
    """eps-MSE. With ``high_noise_weight`` > 1 each row is weighted by ``clamp(1/SNR(t), 1, high_noise_weight)``
    (weights normalised to mean 1 over the batch): up to that cap, a noisy row counts like its x0 error. Plain
    eps-MSE barely rewards the right colours at high noise, which is where a sample's colours are decided."""
    if high_noise_weight <= 1:
        work = work_dtype(pred.dtype)
        return F.mse_loss(pred.to(work), eps.to(work))
    acp = alphas_cumprod.to(torch.float64)[t.cpu()]
    work = work_dtype(pred.dtype)
    weight = ((1 - acp) / acp).clamp(1.0, float(high_noise_weight)).to(pred.device, work)
    per_row = ((pred.to(work) - eps.to(work)) ** 2).flatten(1).mean(1)
    return (weight * per_row).sum() / weight.sum()


def stage_loss(stage: str, denoiser: DiffPortrait3DDenoiser, inputs: StageInputs, context: torch.Tensor,
               alphas_cumprod: torch.Tensor, generators: Sequence[torch.Generator], uncond_prob: float = 0.0,
               reference_prob: float = 0.0, reference_timestep: int = -1,
               high_noise_weight: float = 1.0) -> torch.Tensor:
    """Mean eps-MSE over the micro-batch; dropped samples (prob ``uncond_prob``) use the unconditional pass;
    in stage 0, samples drawn with prob ``reference_prob`` are denoised with the reference bank, written at
    ``reference_timestep`` (-1: the sample's own timestep). ``high_noise_weight``: see :func:`eps_loss`."""
    xt, t, eps = noisy(inputs.x0, alphas_cumprod, inputs.group, generators)
    if stage == "0" and reference_prob <= 0:
        return eps_loss(predict("0", denoiser, xt, t, context, inputs), eps, t, alphas_cumprod, high_noise_weight)
    if stage == "0":
        # the drawn samples read the reference bank like stage 1; the others ("dropped") train F alone
        drop = per_sample(generators, (len(generators),), torch.rand) >= reference_prob
        main, ref_t = "1", (torch.full_like(t, reference_timestep) if reference_timestep >= 0 else None)
    else:
        drop = per_sample(generators, (len(generators),), torch.rand) < uncond_prob
        main, ref_t = stage, None
    if not bool(drop.any()):
        pred = predict(main, denoiser, xt, t, context, inputs, reference_t=ref_t)
        return eps_loss(pred, eps, t, alphas_cumprod, high_noise_weight)
    rows = drop.repeat_interleave(inputs.group).to(xt.device)
    pred = torch.empty_like(xt)
    keep = ~rows
    if bool(keep.any()):
        kept = inputs.rows(keep)
        pred[keep] = predict(main, denoiser, xt[keep], t[keep], context, kept,
                             reference_t=None if ref_t is None else ref_t[keep]).to(pred.dtype)
    pred[rows] = predict(stage, denoiser, xt[rows], t[rows], context, inputs, conditional=False).to(pred.dtype)
    return eps_loss(pred, eps, t, alphas_cumprod, high_noise_weight)
