"""Training configuration: one JSON file for all stages, with per-stage overrides.

    {"output_dir": "runs/small", "data_root": "data/small/train", "lr": 1e-5, ...,
     "stages": {"0": {"lr": 2e-4, "max_steps": 3000}, "3": {"num_targets": 8}}}

Top-level keys are the defaults; ``stages[N]`` overrides them for stage N. Relative paths are relative to
the current directory. See docs/TRAINING.md for every key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("vae", "0", "1", "2", "3", "back", "360")
STAGES_360 = ("back", "360")   # DiffPortrait360: start from a model folder (init_model), full-turn data
STAGE_NAMES = {
    "vae": "small autoencoder (stands in for the SD VAE)",
    "0": "base UNet F from scratch (stands in for SD pretraining)",
    "1": "appearance reference net F_ref",
    "2": "view ControlNet F_cam (F_ref frozen)",
    "3": "cross-view attention modules (everything else frozen)",
    "back": "DiffPortrait360 back-head model: front reference -> back view (F_ref and F_cam, F frozen)",
    "360": "DiffPortrait360 view model: front + back references, view modules (F frozen)",
}


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the key."""


@dataclass
class TrainConfig:
    stage: str = "1"
    output_dir: str = "runs/train"
    data_root: str = ""
    val_root: str = ""                 # held-out identities for validation images (default: data_root)
    image_size: int = 64
    init_model: str = ""               # model folder to start from (stage >= 1; default: previous stage's output)
    model_params: dict[str, Any] = field(default_factory=dict)   # stage 0: official UNet parameter overrides
    vae: str = ""                      # stage 0: a trained vae folder (default: <output_dir>/stage_vae/vae)
    vae_config: dict[str, Any] = field(default_factory=dict)     # stage vae: AutoencoderKL config
    prompt_length: int = 8             # stage 0: tokens of the fixed (random) prompt embedding
    lr: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 4                # GLOBAL samples (identities) per micro-batch, split over the processes;
                                       # stage 3: clips of num_targets views
    grad_accum: int = 1
    max_steps: int = 1000              # optimizer steps
    max_minutes: float = 0.0           # wall-clock budget of one run (0: none); reaching it ends the stage too
    num_targets: int = 1               # target views per sample (stage 3: the clip length, 8)
    uncond_prob: float = 0.0           # CFG dropout: a sample/clip trains the unconditional pass instead
    reference_prob: float = 0.0        # stage 0: fraction of samples denoised reading the reference bank (F_ref = F)
    reference_timestep: int = -1       # stage 0: timestep of the tied reference pass (-1: the sample's; 0: clean)
    high_noise_weight: float = 1.0     # cap of the per-row loss weight clamp(1/SNR(t), 1, cap); 1: plain eps-MSE
    mixed_precision: str = "no"        # "no", "fp16", "bf16"
    dtype: str = "float32"             # the networks' weights: "float32", or "float64" for exactness checks
    ema: bool = False
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    val_samples: int = 2
    val_steps: int = 20
    val_guidance: float = 1.0
    log_every: int = 10
    seed: int = 0
    device: str = ""                   # "" lets accelerate choose; "cpu" forces the CPU
    cache_latents: bool = False        # keep each image's VAE posterior (mean, std) in memory after first use
    cache_images: bool = False         # keep each decoded image in memory after first use (small datasets)
    num_threads: int = 0               # torch CPU threads (0: torch's default)
    save_fp16: bool = False            # write the final model folder in float16
    gradient_checkpointing: bool = False  # recompute the trainable network's activations in the backward pass
    optimizer: str = "adamw"           # "adamw" (torch) or "adamw8bit" (bitsandbytes, optional)
    train_networks: str = ""           # stages back/360: comma-separated networks to train (default: the stage's)

    @property
    def stage_dir(self) -> Path:
        return Path(self.output_dir) / f"stage{self.stage}" if self.stage != "vae" else \
            Path(self.output_dir) / "stage_vae"

    def resolved_init_model(self) -> Path:
        if self.init_model:
            return Path(self.init_model)
        if self.stage in STAGES_360:
            raise ConfigError(f"stage {self.stage} starts from a trained model folder: set 'init_model' (e.g. "
                              f"models/small, or an earlier run's stage{self.stage}/model)")
        if self.stage in ("vae", "0"):
            raise ConfigError(f"stage {self.stage} does not start from a model folder")
        return Path(self.output_dir) / f"stage{int(self.stage) - 1}" / "model"

    def resolved_vae(self) -> Path:
        return Path(self.vae) if self.vae else Path(self.output_dir) / "stage_vae" / "vae"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check(cfg: TrainConfig) -> TrainConfig:
    def positive(name: str, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"'{name}' must be positive, got {value!r}")

    for name in ("lr", "adam_epsilon", "batch_size", "grad_accum", "max_steps", "num_targets", "image_size", "checkpoint_every",
                 "validate_every", "val_steps", "log_every", "keep_checkpoints"):
        positive(name, getattr(cfg, name))
    if not cfg.max_minutes >= 0:
        raise ConfigError(f"'max_minutes' must be 0 (no limit) or positive, got {cfg.max_minutes!r}")
    if not 0.0 <= cfg.reference_prob <= 1.0:
        raise ConfigError(f"'reference_prob' must be in [0, 1], got {cfg.reference_prob}")
    if not -1 <= cfg.reference_timestep <= 999:
        raise ConfigError(f"'reference_timestep' must be -1 (the sample's timestep) or 0..999, got {cfg.reference_timestep}")
    if not cfg.high_noise_weight >= 1.0:
        raise ConfigError(f"'high_noise_weight' must be at least 1 (1: plain eps-MSE), got {cfg.high_noise_weight}")
    if not 0.0 <= cfg.uncond_prob < 1.0:
        raise ConfigError(f"'uncond_prob' must be in [0, 1), got {cfg.uncond_prob}")
    if cfg.dtype not in ("float32", "float64"):
        raise ConfigError(f"'dtype' must be 'float32' or 'float64', got {cfg.dtype!r}")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"'mixed_precision' must be 'no', 'fp16' or 'bf16', got {cfg.mixed_precision!r}")
    if cfg.image_size % 8:
        raise ConfigError(f"'image_size' must be a multiple of 8 (the latent factor), got {cfg.image_size}")
    if not cfg.data_root:
        raise ConfigError("'data_root' is required: the dataset folder with dataset.json")
    if cfg.optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"'optimizer' must be 'adamw' or 'adamw8bit' (bitsandbytes), got {cfg.optimizer!r}")
    if cfg.gradient_checkpointing and cfg.stage == "0" and cfg.reference_prob > 0:
        raise ConfigError("'gradient_checkpointing' cannot be combined with stage 0's 'reference_prob': F would "
                          "recompute its reference attention after the reference bank is gone; turn one off")
    if cfg.train_networks:
        from .models import STAGE_NETWORKS
        names = [n.strip() for n in cfg.train_networks.split(",")]
        allowed = STAGE_NETWORKS.get(cfg.stage)
        if allowed is None:
            raise ConfigError(f"'train_networks' applies to stages {', '.join(STAGES_360)} only (stage {cfg.stage} "
                              f"trains one fixed network)")
        wrong = [n for n in names if n not in allowed]
        if wrong or not names:
            raise ConfigError(f"'train_networks' of stage {cfg.stage} must name some of {', '.join(allowed)}, "
                              f"got {cfg.train_networks!r}")
    if cfg.stage in STAGES_360 and not cfg.init_model:
        raise ConfigError(f"stage {cfg.stage} starts from a trained model folder: set 'init_model' (e.g. "
                          f"models/small, or an earlier run's stage{cfg.stage}/model)")
    if cfg.stage == "back" and cfg.num_targets != 1:
        raise ConfigError(f"stage back has one target per sample (the back view); set num_targets to 1, "
                          f"got {cfg.num_targets}")
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"'ema_decay' must be in (0, 1), got {cfg.ema_decay}")
    return cfg


def make_config(values: dict[str, Any], stage: str | int, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A checked config for ``stage`` from a dict (top-level defaults, then ``stages[stage]``, then
    ``overrides``, e.g. from the command line)."""
    stage = str(stage)
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if not isinstance(values, dict):
        raise ConfigError("a training config must be a JSON object")
    # keys starting with "_" are comments
    merged = {k: v for k, v in values.items() if k != "stages" and not k.startswith("_")}
    cli = overrides
    overrides = (values.get("stages") or {})
    if not isinstance(overrides, dict):
        raise ConfigError("'stages' must map stage names (\"vae\", \"0\".. \"3\", \"back\", \"360\") to objects "
                          "of overrides")
    unknown_stages = sorted(k for k in overrides if k not in STAGES and not k.startswith("_"))
    if unknown_stages:
        raise ConfigError(f"'stages' has unknown stage(s) {unknown_stages}; use {', '.join(STAGES)}")
    merged.update({k: v for k, v in (overrides.get(stage) or {}).items() if not k.startswith("_")})
    merged.update(cli or {})
    merged["stage"] = stage
    unknown = sorted(set(merged) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(_FIELDS)}")
    typed: dict[str, Any] = {}
    for name, value in merged.items():
        default = _FIELDS[name].default
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
                typed[name] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                typed[name] = int(value)
            elif isinstance(default, float):
                typed[name] = float(value)
            elif isinstance(default, str):
                typed[name] = str(value)
            elif name == "adam_betas":
                typed[name] = (float(value[0]), float(value[1]))
            else:
                if not isinstance(value, dict):
                    raise TypeError
                typed[name] = dict(value)
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"config key '{name}' has the wrong type: {value!r}") from None
    return _check(TrainConfig(**typed))


def load_config(path: str | Path, stage: str | int, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (JSON) and build the config for ``stage``; ``overrides`` win over everything."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (see configs/ for examples)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    return make_config(values, stage, overrides)
