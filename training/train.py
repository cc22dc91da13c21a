"""Train one stage: ``python -m training.train --stage {vae,0,1,2,3} --config configs/small.json``.

Stages (paper: DiffPortrait3D, Gu et al. CVPR 2024; F, the SD UNet, is locked throughout 1-3):
  vae  small autoencoder (only for the small model; stands in for the SD VAE)
  0    base UNet F from scratch as a plain denoiser (only for the small model; stands in for SD pretraining)
  1    appearance reference net F_ref: reference view -> target view, no camera control
  2    view ControlNet F_cam, F_ref frozen; condition = a different identity rendered at the target camera
  3    cross-view attention modules on 8-view clips (views shuffled), everything else frozen

Each stage reads a model folder (stage N-1's output unless ``init_model`` is set) and writes one:
``<output_dir>/stage<N>/model``. Checkpoints (``accelerator.save_state``) go to ``stage<N>/checkpoints`` and a
run resumes from the newest automatically (``--no-resume`` to start over).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL

from dp3d_core.model_folder import ModelFolderError, load_model_folder, make_denoiser, save_model_folder
from dp3d_core.schedulers import DEFAULT_SCHEDULER_CONFIG, make_scheduler

from .config import STAGE_NAMES, ConfigError, TrainConfig, load_config
from .data import DatasetError, MultiViewDataset, batch_for_step
from .models import (detach_view_modules, fresh_components, hand_over_from_unet, make_vae, params_of,
                     set_trainable, tie_parameters)
from .stages import StageInputs, prepare_inputs, stage_loss
from .validate import sample_views, save_grid

log = logging.getLogger("training")


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Progress:
    """The optimizer-step counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 131 + int(micro)) % (2**63))


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1]) if p.name[5:].isdigit() else -1)
    found = [p for p in found if p.name[5:].isdigit() and (p / "done").is_file()]
    return found[-1] if found else None


class Trainer:
    """One stage of training. ``resume``: True (newest checkpoint, if any), False, or a checkpoint folder."""

    def __init__(self, cfg: TrainConfig, resume: bool | str | Path = True) -> None:
        self.cfg = cfg
        self.stage = cfg.stage
        self.dir = cfg.stage_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
        self.device = self.accelerator.device
        self.components = self._load_components()
        self.scheduler_config = dict(getattr(self.components.get("scheduler"), "config", None)
                                     or DEFAULT_SCHEDULER_CONFIG)
        self.alphas_cumprod = make_scheduler("ddim", self.scheduler_config).alphas_cumprod
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval()
        self.denoiser = None
        if self.stage != "vae":
            clip = cfg.num_targets if self.stage == "3" else 1
            self.denoiser = make_denoiser(self.components, clip_length=clip)
            if self.stage != "3":
                detach_view_modules(self.denoiser)
        self.trainable = set_trainable(self.components, self.stage)
        if self.stage == "0" and cfg.reference_prob > 0:
            tie_parameters(self.components["unet"], self.components["reference_unet"])
        self.data = self._dataset(cfg.data_root)
        self.val_data = self._dataset(cfg.val_root) if cfg.val_root else self.data
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        warmup = max(cfg.warmup_steps, 0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.trainable, self.optimizer, self.lr_schedule = self.accelerator.prepare(
            self.trainable, self.optimizer, self.lr_schedule)
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(params, decay=cfg.ema_decay)
            self.ema.to(self.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.progress = Progress()
        self.accelerator.register_for_checkpointing(self.progress)
        self.log_file = self.dir / "log.jsonl"
        # the VAE is frozen after stage 'vae', so an image's posterior never changes
        self.latent_cache: dict[str, Any] | None = {} if cfg.cache_latents and self.stage != "vae" else None
        self._resume(resume)

    # ------------------------------------------------------------------ setup
    def _dataset(self, root: str) -> MultiViewDataset:
        cfg = self.cfg
        try:
            return MultiViewDataset(root, size=cfg.image_size, num_targets=cfg.num_targets,
                                    need_conditions=self.stage in ("2", "3"), seed=cfg.seed,
                                    cache_images=cfg.cache_images)
        except DatasetError as exc:
            raise TrainingError(str(exc)) from None

    def _load_components(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.stage == "vae":
            torch.manual_seed(cfg.seed)
            return {"vae": make_vae(cfg.vae_config, cfg.image_size)}
        if self.stage == "0" and not cfg.init_model:
            vae_dir = cfg.resolved_vae()
            if not (vae_dir / "config.json").is_file():
                raise TrainingError(f"stage 0 needs a trained VAE at {vae_dir}; run stage 'vae' first or set 'vae'")
            vae = AutoencoderKL.from_pretrained(str(vae_dir))
            return fresh_components(cfg.model_params, cfg.image_size, vae, cfg.prompt_length, cfg.seed)
        folder = cfg.resolved_init_model()
        try:
            return load_model_folder(folder)
        except ModelFolderError as exc:
            raise TrainingError(f"stage {self.stage} starts from the model folder {folder}: {exc}") from None

    def _resume(self, resume: bool | str | Path) -> None:
        if resume is False:
            return
        folder = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(self.dir / "checkpoints")
        if folder is None:
            return
        if not folder.is_dir():
            raise TrainingError(f"checkpoint {folder} does not exist")
        self.accelerator.load_state(str(folder))
        log.info("resumed from %s at step %d", folder, self.progress.step)

    # ------------------------------------------------------------------ steps
    def context(self) -> torch.Tensor:
        return self.components["prompt_embedding"]().to(self.device)

    def inputs_for(self, batch: dict[str, Any], generator: torch.Generator) -> StageInputs:
        return prepare_inputs(batch, self.components["vae"], generator, self.device, self.latent_cache)

    def micro_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if self.stage == "vae":
            return self._vae_loss(batch, generator)
        inputs = self.inputs_for(batch, generator)
        return stage_loss(self.stage, self.denoiser, inputs, self.context(), self.alphas_cumprod, generator,
                          self.cfg.uncond_prob, self.cfg.reference_prob, self.cfg.reference_timestep,
                          self.cfg.high_noise_weight)

    def _vae_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        vae = self.components["vae"]
        images = torch.cat([batch["reference"], batch["targets"].flatten(0, 1)]).to(self.device)
        dist = vae.encode(images).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(self.device)
        rec = vae.decode(dist.mean + dist.std * noise).sample
        kl = dist.kl().mean() / images[0].numel()
        return F.l1_loss(rec, images) + F.mse_loss(rec, images) + 1e-3 * kl

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        cfg = self.cfg
        step = self.progress.step
        total = 0.0
        for micro in range(cfg.grad_accum):
            g = step_generator(cfg.seed, step, micro)
            batch = batch_for_step(self.data, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed)
            with self.accelerator.autocast():
                loss = self.micro_loss(batch, g)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate "
                                    f"(now {cfg.lr}) or use mixed_precision 'no'/'bf16'")
            self.accelerator.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(p for p in self.trainable.parameters() if p.requires_grad)
        self.progress.step += 1
        return total

    @torch.no_grad()
    def loss_on(self, batch: dict[str, Any], seed: int = 0) -> float:
        """The loss on a fixed batch with fixed noise and timesteps (no update)."""
        return float(self.micro_loss(batch, step_generator(seed, 0)))

    # ------------------------------------------------------------------ checkpoints, validation, export
    def save_checkpoint(self) -> Path:
        folder = self.dir / "checkpoints" / f"step_{self.progress.step:07d}"
        if folder.exists():
            shutil.rmtree(folder)
        self.accelerator.save_state(str(folder))
        (folder / "done").write_text(str(self.progress.step))
        old = sorted((p for p in folder.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: p.name)
        for stale in old[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def _with_ema(self, fn):
        if self.ema is None:
            return fn()
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            return fn()
        finally:
            self.ema.restore(params)

    def validation_batch(self) -> dict[str, Any]:
        import numpy as np

        from .data import collate
        rng = np.random.default_rng((self.cfg.seed, 4242))
        n = min(self.cfg.val_samples, len(self.val_data))
        return collate([self.val_data.sample(i, rng) for i in range(n)])

    @torch.no_grad()
    def validate(self, name: str | None = None) -> Path:
        """Save a grid (reference | condition | generated | ground truth) for held-out samples."""
        batch = self.validation_batch()
        path = self.dir / "validation" / f"{name or f'step_{self.progress.step:07d}'}.png"
        self.trainable.eval()
        try:
            if self.stage == "vae":
                images = batch["targets"].flatten(0, 1).to(self.device)
                vae = self.components["vae"]
                rec = self._with_ema(lambda: vae.decode(vae.encode(images).latent_dist.mean).sample)
                return save_grid([images.cpu(), rec.float().clamp(-1, 1).cpu()], path)
            inputs = prepare_inputs(batch, self.components["vae"], step_generator(self.cfg.seed, 0), self.device)
            generated = self._with_ema(lambda: sample_views(
                self.stage, self.denoiser, self.components["vae"], self.context(), inputs, self.scheduler_config,
                self.cfg.val_steps, self.cfg.val_guidance, self.cfg.seed))
        finally:
            self.trainable.train()
        t = inputs.group
        refs = batch["reference"].repeat_interleave(t, dim=0)
        return save_grid([refs, batch["conditions"].flatten(0, 1), generated, batch["targets"].flatten(0, 1)], path)

    def export(self) -> Path:
        """Write the stage's result (EMA weights when enabled) as a model folder (stage vae: a vae folder)."""
        if self.ema is not None:
            self.ema.copy_to(p for p in self.trainable.parameters() if p.requires_grad)
        unwrapped = self.accelerator.unwrap_model(self.trainable)
        self.components[{"vae": "vae", "0": "unet", "1": "reference_unet", "2": "view_controlnet",
                         "3": "view_modules"}[self.stage]] = unwrapped
        if self.stage == "vae":
            return self._export_vae(unwrapped)
        components = {k: v for k, v in self.components.items()}
        if self.stage == "0":
            # F is trained: hand the copies of it to stages 1-3 (detach the denoiser's processors first).
            fresh = self._clean_unet(components["unet"])
            components["unet"] = fresh
            components.update(hand_over_from_unet(fresh, params_of(fresh, components["view_modules"])))
        components["scheduler"] = make_scheduler("ddim", self.scheduler_config)
        if self.cfg.save_fp16:
            components = {k: (v.half() if isinstance(v, torch.nn.Module) and k != "prompt_embedding" else v)
                          for k, v in components.items()}
        return save_model_folder(components, self.dir / "model", overwrite=True)

    @staticmethod
    def _clean_unet(unet: torch.nn.Module) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        clean = UNet2DConditionModel.from_config(unet.config)
        clean.load_state_dict(unet.state_dict())
        return clean.to(next(unet.parameters()).device).eval()

    def _export_vae(self, vae: AutoencoderKL) -> Path:
        """Set ``scaling_factor`` to 1/std of the latents (as SD's 0.18215), then save ``stage_vae/vae``."""
        latents = []
        with torch.no_grad():
            for i in range(4):
                batch = batch_for_step(self.data, 10_000_000 + i, self.cfg.batch_size, self.cfg.seed)
                latents.append(vae.encode(batch["targets"].flatten(0, 1).to(self.device)).latent_dist.mean.float())
        std = float(torch.cat(latents).std())
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
        out = self.dir / "vae"
        if out.exists():
            shutil.rmtree(out)
        vae.save_pretrained(str(out))
        return out

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict[str, Any]) -> None:
        with self.log_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, max_steps: int | None = None) -> Path:
        cfg = self.cfg
        end = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)
        done = self.dir / ("vae" if self.stage == "vae" else "model")
        if self.progress.step >= cfg.max_steps and done.is_dir():
            log.info("stage %s already finished (step %d): %s", self.stage, self.progress.step, done)
            return done
        self.trainable.train()
        start, t0, recent = self.progress.step, time.time(), []
        deadline = t0 + 60.0 * cfg.max_minutes if cfg.max_minutes > 0 else None
        log.info("stage %s (%s): steps %d..%d on %s", self.stage, STAGE_NAMES[self.stage], start, end, self.device)
        out_of_time = False
        while self.progress.step < end and not out_of_time:
            loss = self.train_step()
            out_of_time = deadline is not None and time.time() >= deadline
            if out_of_time:
                end = self.progress.step
                log.info("max_minutes (%g) reached at step %d: the stage ends here", cfg.max_minutes, end)
            recent.append(loss)
            step = self.progress.step
            if step % cfg.log_every == 0 or step == end:
                rate = (step - start) / max(time.time() - t0, 1e-9)
                record = {"step": step, "loss": sum(recent) / len(recent), "lr": self.lr_schedule.get_last_lr()[0],
                          "steps_per_s": rate}
                self._log(record)
                log.info("step %d loss %.5f (%.2f steps/s)", step, record["loss"], rate)
                recent = []
            if step % cfg.checkpoint_every == 0 and step < end:
                self.save_checkpoint()
            if step % cfg.validate_every == 0 or step == end:
                self.validate()
        if self.progress.step >= cfg.max_steps or out_of_time:
            self.save_checkpoint()  # marks the stage finished for a later resume
            return self.export()
        return self.save_checkpoint()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=["vae", "0", "1", "2", "3"])
    parser.add_argument("--config", required=True, help="training config JSON (see configs/)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--resume-from", help="a specific checkpoint folder")
    parser.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a config key, e.g. --set lr=1e-4 --set data_root='\"data/x\"'")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value
        cfg = load_config(args.config, args.stage, overrides)
        resume: bool | str = args.resume_from or not args.no_resume
        trainer = Trainer(cfg, resume=resume)
        out = trainer.run(args.max_steps)
    except (ConfigError, TrainingError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
