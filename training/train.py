"""Train one stage: ``python -m training.train --stage {vae,0,1,2,3} --config configs/small.json``.

Stages (paper: DiffPortrait3D, Gu et al. CVPR 2024; F, the SD UNet, is locked throughout 1-3):
  vae  small autoencoder (only for the small model; stands in for the SD VAE)
  0    base UNet F from scratch as a plain denoiser (only for the small model; stands in for SD pretraining)
  1    appearance reference net F_ref: reference view -> target view, no camera control
  2    view ControlNet F_cam, F_ref frozen; condition = a different identity rendered at the target camera
  3    cross-view attention modules on 8-view clips (views shuffled), everything else frozen
DiffPortrait360 (Gu et al. CVPR 2025), both from a trained model folder (``init_model``), full-turn data:
  back the back-head model: frontal reference -> the view straight behind, given its condition image
       (F_ref and F_cam trained, no view modules); writes a ``"variant": "back_head"`` folder
  360  the view model: frontal + back references in the reference attention, 8-view clips all around the head,
       view modules in DiffPortrait360's layout (F_ref, F_cam and the view modules trained)

Each stage reads a model folder (stage N-1's output unless ``init_model`` is set) and writes one:
``<output_dir>/stage<N>/model``. Checkpoints (safetensors + JSON, :mod:`training.checkpoint`) go to
``stage<N>/checkpoints`` and a run resumes from the newest automatically (``--no-resume`` to start over).

Many processes: ``accelerate launch [--multi_gpu | --config_file configs/accelerate/X.yaml] -m training.train ...``.
``batch_size`` is the GLOBAL batch; each process trains its own slice of it, so a config gives the same training
on any number of processes (see docs/TRAINING.md, "Training on many GPUs").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType
from diffusers import AutoencoderKL
from torch import nn

from dp3d_core.families import FAMILY_3D, FAMILY_360_BACK_HEAD, FAMILY_360_VIEWS
from dp3d_core.model_folder import ModelFolderError, load_model_folder, make_denoiser, save_model_folder
from dp3d_core.schedulers import DEFAULT_SCHEDULER_CONFIG, make_scheduler

from . import checkpoint
from .config import STAGE_NAMES, STAGES_360, ConfigError, TrainConfig, load_config
from .data import DatasetError, MultiViewDataset, batch_for_step, shard
from .efficiency import OptimizerUnavailable, enable_gradient_checkpointing, make_optimizer, use_sdpa
from .models import (detach_view_modules, fresh_components, hand_over_from_unet, make_vae, params_of,
                     set_trainable, tie_parameters, trainable_names, views_to_360_layout)
from .stages import StageInputs, prepare_inputs, stage_loss
from .validate import sample_views, save_grid

log = logging.getLogger("training")


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Progress:
    """The optimizer-step counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0


def step_generator(seed: int, step: int, micro: int = 0, sample: int = 0) -> torch.Generator:
    """The generator of one sample of a micro-batch (``sample``: its position in the global batch)."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(sample)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def sample_generators(seed: int, step: int, micro: int, positions: range) -> list[torch.Generator]:
    return [step_generator(seed, step, micro, j) for j in positions]


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("step_*") if p.name[5:].isdigit() and checkpoint.is_complete(p)]
    return max(found, key=lambda p: int(p.name[5:])) if found else None


def _refuse_sharding_without_accelerator(cfg: TrainConfig) -> None:
    """accelerate (1.16) starts FSDP and DeepSpeed only on accelerator devices. On CPUs its FSDP plugin stops
    with a traceback (or, with sync_module_states off, quietly becomes DDP), and DeepSpeed starts with
    accelerate seeing one process each while DeepSpeed sees all (its batch check fails). Say so before any work."""
    from accelerate.utils import get_torch_accelerator_backend
    engine = next((name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                   if os.environ.get(var, "false").lower() == "true"), None)
    if engine and (cfg.device == "cpu" or get_torch_accelerator_backend()[0] is None):
        raise TrainingError(f"accelerate runs {engine} only on GPUs (or other accelerators), and this run is on the "
                            f"CPU; on CPUs use DDP: accelerate launch --multi_gpu --num_processes N -m training.train "
                            f"... (accelerate runs it over gloo)")


class StageModel(nn.Module):
    """What accelerate prepares (wraps in DDP, FSDP or a DeepSpeed engine): the stage's trainable network is its
    only submodule and its forward is the stage's loss on this process's samples, so every call the denoiser makes
    into that network happens inside the wrapper's forward (DDP's gradient hooks, FSDP's gathering). The frozen
    networks stay outside: they are never wrapped and never reach the optimizer."""

    def __init__(self, network: nn.Module, loss) -> None:
        super().__init__()
        self.network = network
        self._loss = loss

    def forward(self, batch: dict[str, Any], generators: list[torch.Generator]) -> torch.Tensor:
        loss = self._loss(batch, generators)
        if not loss.requires_grad:
            # every sample of this micro-batch took the unconditional pass through the locked F (stages 1, 2):
            # no gradient, but backward (and DDP's gradient averaging) must still run
            loss = loss + 0.0 * next(p for p in self.network.parameters() if p.requires_grad).sum()
        return loss


class Trainer:
    """One stage of training. ``resume``: True (newest checkpoint, if any), False, or a checkpoint folder."""

    def __init__(self, cfg: TrainConfig, resume: bool | str | Path = True) -> None:
        self.cfg = cfg
        self.stage = cfg.stage
        self.dir = cfg.stage_dir
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        _refuse_sharding_without_accelerator(cfg)
        # find_unused_parameters: a step may leave part of the network unused (the middle view module runs on
        # dropped clips only; a micro-batch may drop every sample)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.engine = self.accelerator.distributed_type
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if cfg.batch_size % self.world:
            raise TrainingError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                                f"{self.world} processes; set it to a multiple of {self.world}")
        self.positions = shard(cfg.batch_size, self.accelerator.process_index, self.world)
        self._check_engine()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self.device = self.accelerator.device
        self.components = self._load_components()
        self.scheduler_config = dict(getattr(self.components.get("scheduler"), "config", None)
                                     or DEFAULT_SCHEDULER_CONFIG)
        self.alphas_cumprod = make_scheduler("ddim", self.scheduler_config).alphas_cumprod
        self.dtype = getattr(torch, cfg.dtype)
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(self.device, self.dtype).eval()
        self.denoiser = None
        if self.stage != "vae":
            clip = cfg.num_targets if self.stage in ("3", "360") else 1
            self.denoiser = make_denoiser(self.components, clip_length=clip)
            if self.stage not in ("3", "360") and self.components.get("view_modules") is not None:
                detach_view_modules(self.denoiser)
        self.attention = use_sdpa(m for m in self.components.values() if isinstance(m, torch.nn.Module))
        self.trainable = set_trainable(self.components, self.stage, cfg.train_networks)
        if self.stage == "0" and cfg.reference_prob > 0:
            tie_parameters(self.components["unet"], self.components["reference_unet"])
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.trainable)
        self.data = self._dataset(cfg.data_root)
        self.val_data = self._dataset(cfg.val_root) if cfg.val_root else self.data
        self.progress = Progress()
        found = self._find_checkpoint(resume)
        state = checkpoint.read(found) if found is not None else None
        if state is not None:
            # weights go into the plain network before it is wrapped: every engine starts from the same full copy
            self._load_network(state["model"], found)
            self.progress.step = int(state["progress"]["step"])
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        try:
            optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.adam_betas, cfg.weight_decay,
                                       cfg.adam_epsilon)
        except OptimizerUnavailable as exc:
            raise TrainingError(str(exc)) from None
        warmup = max(cfg.warmup_steps, 0)
        # not prepared: accelerate would step it once per process, and batch_size is already global
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self._configure_deepspeed()
        self.model, self.optimizer = self.accelerator.prepare(StageModel(self.trainable, self.micro_loss), optimizer)
        self.ema = None
        if cfg.ema and self.is_main:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(params, decay=cfg.ema_decay)
            self.ema.to(self.device)
        self.log_file = self.dir / "log.jsonl"
        # the VAE is frozen after stage 'vae', so an image's posterior never changes
        self.latent_cache: dict[str, Any] | None = {} if cfg.cache_latents and self.stage != "vae" else None
        if state is not None:
            self._restore(state, found)

    # ------------------------------------------------------------------ setup
    def _dataset(self, root: str) -> MultiViewDataset:
        cfg = self.cfg
        try:
            return MultiViewDataset(root, size=cfg.image_size, num_targets=cfg.num_targets,
                                    need_conditions=self.stage in ("2", "3", "back", "360"), seed=cfg.seed,
                                    cache_images=cfg.cache_images,
                                    mode={"back": "back", "360": "dual"}.get(self.stage, "any"))
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
        if self.stage in STAGES_360:
            return self._load_360_components(folder)
        try:
            # these stages train DiffPortrait3D's networks; a DiffPortrait360 folder is refused with a message
            return load_model_folder(folder, family=FAMILY_3D)
        except ModelFolderError as exc:
            raise TrainingError(f"stage {self.stage} starts from the model folder {folder}: {exc}") from None

    def _load_360_components(self, folder: Path) -> dict[str, Any]:
        """Stage back: a back-head folder, or a DiffPortrait3D one without its view modules. Stage 360: a
        DiffPortrait360 view folder, or a DiffPortrait3D one with its view modules mapped into 360's layout."""
        from dp3d_core.model_folder import model_family
        try:
            found = model_family(folder)
            own = FAMILY_360_BACK_HEAD if self.stage == "back" else FAMILY_360_VIEWS
            if found not in (own, FAMILY_3D):
                raise ModelFolderError(f"it holds {found.describe()}; stage {self.stage} starts from "
                                       f"{own.describe()} or a DiffPortrait3D model")
            components = load_model_folder(folder, family=found)
        except ModelFolderError as exc:
            raise TrainingError(f"stage {self.stage} starts from the model folder {folder}: {exc}") from None
        if found == FAMILY_3D:
            view_modules = components.pop("view_modules", None)
            if self.stage == "360":
                components["view_modules"], dropped = views_to_360_layout(view_modules)
                if self.is_main:
                    log.info("view modules of %s mapped into DiffPortrait360's layout; not kept (no place there): "
                             "%s", folder, ", ".join(dropped))
        return components

    def _check_engine(self) -> None:
        """Refuse what an engine cannot do here, before any work."""
        cfg = self.cfg
        if self.engine == DistributedType.FSDP and cfg.ema:
            raise TrainingError("'ema' needs the full weights on the main process, which FSDP shards; use DDP or "
                                "DeepSpeed ZeRO-2 (configs/accelerate/), or set ema to false")
        if self.engine == DistributedType.DEEPSPEED and cfg.grad_accum != 1:
            raise TrainingError("with DeepSpeed, set grad_accum to 1 and put gradient_accumulation_steps in the "
                                "DeepSpeed config instead (its engine scales and accumulates on its own)")

    def _configure_deepspeed(self) -> None:
        """DeepSpeed needs a micro-batch size, which accelerate reads from a DataLoader; this trainer has none."""
        if self.engine != DistributedType.DEEPSPEED:
            return
        plugin = self.accelerator.state.deepspeed_plugin
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = len(self.positions)
        plugin.deepspeed_config.setdefault("gradient_clipping", 1.0)

    def _find_checkpoint(self, resume: bool | str | Path) -> Path | None:
        if resume is False:
            return None
        folder = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(self.dir / "checkpoints")
        if folder is not None and not folder.is_dir():
            raise TrainingError(f"checkpoint {folder} does not exist")
        return folder

    def _load_network(self, weights: dict[str, torch.Tensor], folder: Path) -> None:
        own = self.trainable.state_dict()
        prefix = "network."
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            raise TrainingError(f"checkpoint {folder} does not hold stage {self.stage}'s network ({len(missing)} "
                                f"missing, {len(unexpected)} unexpected keys, e.g. {(missing or unexpected)[:2]}); "
                                f"resume from this stage's own checkpoints or start over with --no-resume")
        self.trainable.load_state_dict(weights)

    def _restore(self, state: dict[str, Any], folder: Path) -> None:
        """Optimizer, schedule, EMA and RNG states after the networks are wrapped (on every process)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        if state["optimizer"] is None or self.engine == DistributedType.DEEPSPEED:
            log.warning("checkpoint %s: the optimizer's moments start afresh (%s)", folder,
                        "not in the checkpoint" if state["optimizer"] is None
                        else "DeepSpeed's sharded optimizer state is not saved in checkpoints")
        else:
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        if state["scheduler"] is not None:
            self.lr_schedule.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(
                self.lr_schedule.lr_lambdas)})
        if self.ema is not None:
            if state["ema"] is None:
                log.warning("checkpoint %s has no EMA weights: the EMA starts from the current weights", folder)
            else:
                self.ema.load_state_dict(state["ema"])
                self.ema.to(self.device)
        if state["rng"] is not None:
            checkpoint.set_rng_state(*state["rng"])
        log.info("resumed from %s at step %d (written by %d process(es), now %d)", folder, self.progress.step,
                 int(state["progress"].get("world_size", 1)), self.world)

    # ------------------------------------------------------------------ steps
    def context(self) -> torch.Tensor:
        return self.components["prompt_embedding"]().to(self.device, self.dtype)

    def inputs_for(self, batch: dict[str, Any], generators: list[torch.Generator]) -> StageInputs:
        return prepare_inputs(batch, self.components["vae"], generators, self.device, self.latent_cache)

    def micro_loss(self, batch: dict[str, Any], generators: list[torch.Generator]) -> torch.Tensor:
        """The loss of a (local) batch, one generator per sample; the forward of :class:`StageModel`."""
        if self.stage == "vae":
            return self._vae_loss(batch, generators)
        inputs = self.inputs_for(batch, generators)
        return stage_loss(self.stage, self.denoiser, inputs, self.context(), self.alphas_cumprod, generators,
                          self.cfg.uncond_prob, self.cfg.reference_prob, self.cfg.reference_timestep,
                          self.cfg.high_noise_weight)

    def _vae_loss(self, batch: dict[str, Any], generators: list[torch.Generator]) -> torch.Tensor:
        from .stages import per_sample
        vae = self.components["vae"]
        # each sample's images consecutively (reference, then its targets): its posterior noise is its own
        images = torch.cat([batch["reference"].unsqueeze(1), batch["targets"]], 1).flatten(0, 1).to(self.device,
                                                                                                   self.dtype)
        dist = vae.encode(images).latent_dist
        noise = per_sample(generators, tuple(dist.mean.shape)).to(self.device, self.dtype)
        rec = vae.decode(dist.mean + dist.std * noise).sample
        kl = dist.kl().mean() / images[0].numel()
        return F.l1_loss(rec, images) + F.mse_loss(rec, images) + 1e-3 * kl

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches of this process's slice of the global batch); returns
        the mean loss over the global batch (the same number on every process)."""
        cfg = self.cfg
        step = self.progress.step
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch = batch_for_step(self.data, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed,
                                   self.positions)
            generators = sample_generators(cfg.seed, step, micro, self.positions)
            last = micro == cfg.grad_accum - 1
            # gradients are averaged across processes once per optimizer step
            sync = contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.model)
            with sync:
                with self.accelerator.autocast():
                    loss = self.model(batch, generators)
                self.accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach().double() / cfg.grad_accum
        if self.world > 1:
            total = self.accelerator.reduce(total, "mean")
        if not torch.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"loss became {total.item()} at step {step}; lower the learning rate "
                                f"(now {cfg.lr}) or use mixed_precision 'no'/'bf16'")
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(p for p in self.trainable.parameters() if p.requires_grad)
        self.progress.step += 1
        return float(total)

    @torch.no_grad()
    def loss_on(self, batch: dict[str, Any], seed: int = 0) -> float:
        """The loss on a fixed batch with fixed noise and timesteps (no update)."""
        n = len(batch["reference"])
        return float(self.micro_loss(batch, sample_generators(seed, 0, 0, range(n))))

    # ------------------------------------------------------------------ checkpoints, validation, export
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` (main process; every process takes part in gathering the state)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        folder = self.dir / "checkpoints" / f"step_{self.progress.step:07d}"
        weights = self.accelerator.get_state_dict(self.model)
        optimizer = None
        if self.engine != DistributedType.DEEPSPEED:
            optimizer = get_optimizer_state_dict(self.model, self.optimizer.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            checkpoint.write(folder, model=weights, optimizer=optimizer, scheduler=self.lr_schedule.state_dict(),
                             ema=self.ema.state_dict() if self.ema is not None else None,
                             progress={"step": self.progress.step, "stage": self.stage, "world_size": self.world,
                                       "engine": str(self.engine.value)})
            old = sorted((p for p in folder.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: p.name)
            for stale in old[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
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
            inputs = prepare_inputs(batch, self.components["vae"],
                                    sample_generators(self.cfg.seed, 0, 0, range(len(batch["reference"]))),
                                    self.device)
            generated = self._with_ema(lambda: sample_views(
                self.stage, self.denoiser, self.components["vae"], self.context(), inputs, self.scheduler_config,
                self.cfg.val_steps, self.cfg.val_guidance, self.cfg.seed))
        finally:
            self.trainable.train()
        t = inputs.group
        refs = [batch["reference"].repeat_interleave(t, dim=0)]
        if "back_reference" in batch:  # stage 360: the second reference column
            refs.append(batch["back_reference"].repeat_interleave(t, dim=0))
        return save_grid([*refs, batch["conditions"].flatten(0, 1), generated, batch["targets"].flatten(0, 1)],
                         path)

    def export(self) -> Path:
        """Write the stage's result (EMA weights when enabled) as a model folder (stage vae: a vae folder)."""
        if self.ema is not None:
            self.ema.copy_to(p for p in self.trainable.parameters() if p.requires_grad)
        unwrapped = self.accelerator.unwrap_model(self.trainable)
        names = trainable_names(self.stage, self.cfg.train_networks)
        if self.stage in STAGES_360:
            self.components.update({name: unwrapped[name] for name in names})
        else:
            self.components[names[0]] = unwrapped
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
        family = {"back": FAMILY_360_BACK_HEAD, "360": FAMILY_360_VIEWS}.get(self.stage, FAMILY_3D)
        if self.stage == "back":
            components.pop("view_modules", None)
        return save_model_folder(components, self.dir / "model", overwrite=True, family=family)

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

    @contextlib.contextmanager
    def _full_weights(self):
        """Every process holds the trainable network's full weights inside (FSDP shards them outside)."""
        if self.engine != DistributedType.FSDP:
            yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            yield

    def on_main(self, fn):
        """``fn()`` on the main process only (validation, export); the others wait. Returns its result on the
        main process, None elsewhere."""
        with self._full_weights():
            result = fn() if self.is_main else None
        self.accelerator.wait_for_everyone()
        return result

    def _agree(self, flag: bool) -> bool:
        """True on every process when it is true on the main one (e.g. the wall-clock budget)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if (flag and self.is_main) else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, "sum").item() > 0)

    def describe(self) -> str:
        per = len(self.positions)
        return (f"{self.world} process(es) ({self.engine.value}) on {self.device}, global batch {self.cfg.batch_size}"
                f" = {per} per process x {self.world}, grad_accum {self.cfg.grad_accum}, "
                f"gradient checkpointing {'on' if self.cfg.gradient_checkpointing else 'off'}, "
                f"optimizer {self.cfg.optimizer}, attention {self.attention}")

    def run(self, max_steps: int | None = None) -> Path:
        cfg = self.cfg
        end = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)
        done = self.dir / ("vae" if self.stage == "vae" else "model")
        if self.progress.step >= cfg.max_steps and done.is_dir():
            if self.is_main:
                log.info("stage %s already finished (step %d): %s", self.stage, self.progress.step, done)
            return done
        self.trainable.train()
        start, t0, recent = self.progress.step, time.time(), []
        deadline = t0 + 60.0 * cfg.max_minutes if cfg.max_minutes > 0 else None
        if self.is_main:
            log.info("stage %s (%s): steps %d..%d; %s", self.stage, STAGE_NAMES[self.stage], start, end,
                     self.describe())
        out_of_time = False
        while self.progress.step < end and not out_of_time:
            loss = self.train_step()
            out_of_time = deadline is not None and self._agree(time.time() >= deadline)
            if out_of_time:
                end = self.progress.step
                if self.is_main:
                    log.info("max_minutes (%g) reached at step %d: the stage ends here", cfg.max_minutes, end)
            recent.append(loss)
            step = self.progress.step
            if (step % cfg.log_every == 0 or step == end) and self.is_main:
                rate = (step - start) / max(time.time() - t0, 1e-9)
                record = {"step": step, "loss": sum(recent) / len(recent), "lr": self.lr_schedule.get_last_lr()[0],
                          "steps_per_s": rate, "world_size": self.world}
                self._log(record)
                log.info("step %d loss %.5f (%.2f steps/s, %d process(es))", step, record["loss"], rate, self.world)
            if step % cfg.log_every == 0 or step == end:
                recent = []
            if step % cfg.checkpoint_every == 0 and step < end:
                self.save_checkpoint()
            if step % cfg.validate_every == 0 or step == end:
                self.on_main(self.validate)
        if self.progress.step >= cfg.max_steps or out_of_time:
            self.save_checkpoint()  # marks the stage finished for a later resume
            self.on_main(self.export)
            return done
        return self.save_checkpoint()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=["vae", "0", "1", "2", "3", "back", "360"])
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
    except (ConfigError, TrainingError, DatasetError, checkpoint.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
