"""Official DiffPortrait3D / DiffPortrait360 single-file checkpoint -> the project's diffusers-style model folder.

    python -m dp3d_core.convert <checkpoint> <out folder> [--config params.json] [--context-from FILE] [--family F]

The family (DiffPortrait3D; DiffPortrait360 view model or back-head model) is detected from the checkpoint's
key names (:mod:`dp3d_core.families`) and written to ``model_index.json``.

Key names are translated by diffusers' own single-file converters (``convert_ldm_unet_checkpoint`` for F and F_ref,
``convert_controlnet_checkpoint`` for F_cam, ``convert_animatediff_checkpoint_to_diffusers`` for the view modules,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``). Every source key is accounted for: a key counts
as converted when its tensor (or a view of it) ends up in a converted state dict, which is checked by tensor
identity; everything else must be on the commented ``IGNORED`` list below or is reported as unused. Every target
parameter without a source is reported as missing, except the few listed in ``RECOMPUTED_TARGETS``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .families import FAMILY_3D, Family, FamilyError, check_family, detect_family
from .models.config import (DP360_POSITIONAL_ROWS, ModelConfigError, network_configs, official_params,
                            params_from_parity_config)

UNET = "model.diffusion_model."
REFERENCE = "control_model."
POSE = "pose_control_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
MOTION_MARK = "_motion_module."

# LatentDiffusion's noise-schedule buffers: the scheduler recomputes them from its config.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)

# Source keys the official network never reads, each with the reason (README quirks 8, 13, 25).
IGNORED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(%s)$" % "|".join(SCHEDULE_BUFFERS)), "noise-schedule buffer (recomputed by the scheduler)"),
    # ControlNetReferenceOnly builds a hint encoder but its forward never calls it (hint=None).
    (re.compile(r"^control_model\.input_hint_block\."), "reference net's hint encoder, never called"),
    # Sinusoidal tables (sin on even, cos on odd channels); recomputed and checked equal in convert_state_dict.
    (re.compile(r"^model\.diffusion_model\..*_motion_module\..*\.pos_encoder\.pe$"), "positional table (recomputed)"),
    # Saved by transformers < 4.31 only (DiffPortrait360's checkpoints have it); a constant arange(77).
    (re.compile(r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$"), "constant CLIP buffer"),
    # EMA copies, if a training checkpoint carries them (the released model uses the plain weights).
    (re.compile(r"^model_ema\."), "EMA weights (not used by the official inference)"),
]
# Note: the reference net's last transformer after norm1 (control_model.output_blocks.11.1.{attn1, attn2, ff,
# norm2, norm3, proj_out}) and its whole decoder output never influence the bank either; they ARE converted
# (F_ref is a complete diffusers UNet) and are skipped at run time because F_ref stops after the last bank write.

# Target parameters with no source in the official checkpoint; filled as described.
RECOMPUTED_TARGETS: list[tuple[str, re.Pattern[str], str]] = [
    ("view_modules", re.compile(r"\.pos_embed\.pe$"), "sinusoidal table computed at construction"),
    # ControlNetReferenceOnly has no `out` layer; diffusers' UNet has one. F_ref stops before reaching it.
    ("reference_unet", re.compile(r"^conv_norm_out\.|^conv_out\."), "zeros (the reference net has no output layer)"),
]

CLIP_EMPTY_PROMPT_IDS = [49406] + [49407] * 76  # "" with BOS, EOS and EOS padding to 77 tokens
CLIP_VIT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, projection_dim=768)
SD_VAE_DDCONFIG = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, in_channels=3, out_ch=3)
SCALE_FACTOR = 0.18215


class ConversionError(ValueError):
    """A checkpoint that cannot be converted into a DiffPortrait3D model folder."""


@dataclass
class ConversionReport:
    """What happened to every key."""

    converted: dict[str, int] = field(default_factory=dict)   # component -> number of tensors
    ignored: dict[str, str] = field(default_factory=dict)     # source key -> why it is not needed
    unused: list[str] = field(default_factory=list)           # source keys neither converted nor ignored
    missing: list[str] = field(default_factory=list)          # "component.key" targets without a source
    unexpected: list[str] = field(default_factory=list)       # converted keys the target model does not have
    recomputed: dict[str, str] = field(default_factory=dict)  # "component.key" -> how it was filled
    skipped: dict[str, str] = field(default_factory=dict)     # component -> why it was not converted
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unused or self.missing or self.unexpected)

    def __str__(self) -> str:
        lines = ["conversion report:"]
        lines += [f"  {name}: {count} tensors" for name, count in self.converted.items()]
        by_reason: dict[str, int] = {}
        for reason in self.ignored.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines += [f"  ignored {count} key(s): {reason}" for reason, count in by_reason.items()]
        by_fill: dict[str, int] = {}
        for how in self.recomputed.values():
            by_fill[how] = by_fill.get(how, 0) + 1
        lines += [f"  filled {count} target(s): {how}" for how, count in by_fill.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note: {note}" for note in self.notes]
        for title, keys in (("UNUSED source keys", self.unused), ("MISSING target keys", self.missing),
                            ("UNEXPECTED converted keys", self.unexpected)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {k}" for k in keys]
        lines.append("  result: " + ("every key accounted for" if self.ok else "INCOMPLETE"))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loading
def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .th/.ckpt/.pt/.pth (weights only, never executing pickled code) or .safetensors state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            try:  # memory-map zip checkpoints: the 11 GB official file is not read into RAM twice
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(exc))
            if found is None:
                raise ConversionError(f"{path} is not a readable PyTorch checkpoint (corrupt or not a checkpoint)") \
                    from None
            raise ConversionError(
                f"refusing to load {path}: it is not a plain weights file; it references {found.group(1)}, which "
                f"would run on load. Only weights-only PyTorch checkpoints or .safetensors are accepted.") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    return unwrap_state_dict(state, str(path))


def unwrap_state_dict(state: Any, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": {...}}`` wrappers and strip a DDP ``module.`` prefix."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{origin} does not hold a state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{origin} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# ------------------------------------------------------------------------------------------------ config
def infer_params(sd: dict[str, torch.Tensor], family: Family = FAMILY_3D) -> dict[str, Any]:
    """Official UNet parameters read from tensor shapes (num_heads cannot be seen in shapes: 8 as in the yaml)."""
    conv_in = sd[UNET + "input_blocks.0.0.weight"]
    model_channels = int(conv_in.shape[0])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(UNET) + r"input_blocks\.(\d+)\.", k))}
    n_blocks = max(blocks) + 1
    downsamples = sorted(i for i in blocks if UNET + f"input_blocks.{i}.0.op.weight" in sd)
    num_res = downsamples[0] - 1 if downsamples else n_blocks - 1
    levels = n_blocks // (num_res + 1)
    mult, attention, context_dim, depth, linear = [], [], None, 1, False
    for level in range(levels):
        first = 1 + level * (num_res + 1)
        mult.append(int(sd[UNET + f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]) // model_channels)
        if UNET + f"input_blocks.{first}.1.proj_in.weight" in sd:
            attention.append(2**level)
            context_dim = int(sd[UNET + f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
            linear = sd[UNET + f"input_blocks.{first}.1.proj_in.weight"].ndim == 2
    depth = len({k.split(".")[4] for k in sd if k.startswith(UNET + "middle_block.1.transformer_blocks.")})
    motion: dict[str, Any] = dict(official_params()["unet_additional_kwargs"]["motion_module_kwargs"])
    pe = [v for k, v in sd.items() if k.endswith("pos_encoder.pe")]
    if pe:
        motion["temporal_position_encoding_max_len"] = int(pe[0].shape[1])
    elif family.layout == "diffportrait360":  # the DiffPortrait360 yaml's table length
        motion["temporal_position_encoding_max_len"] = DP360_POSITIONAL_ROWS
    params = official_params({
        "in_channels": int(conv_in.shape[1]), "out_channels": int(sd[UNET + "out.2.weight"].shape[0]),
        "model_channels": model_channels, "channel_mult": mult, "num_res_blocks": num_res,
        "attention_resolutions": attention, "context_dim": context_dim, "transformer_depth": max(depth, 1),
        "use_linear_in_transformer": linear,
    })
    params["unet_additional_kwargs"]["motion_module_kwargs"] = motion
    params["view_module_layout"] = family.layout
    if POSE + "input_hint_block.0.weight" in sd:
        params["hint_channels"] = int(sd[POSE + "input_hint_block.0.weight"].shape[1])
    return params


def read_params_file(path: str | Path) -> dict[str, Any]:
    """``--config``: a JSON of the yaml's unet_config params, or a parity fixture's parity_config.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read the config {path}: {exc}") from None
    if "unet_config" in data and "resolved_constructor_args" in data.get("unet_config", {}):
        return params_from_parity_config(data)
    if "params" in data:
        data = data["params"]
    return official_params(data)


# ------------------------------------------------------------------------------------------------ conversion
def check_family_keys(sd: dict[str, torch.Tensor], expected: str | None = None) -> Family:
    """The checkpoint's family from its keys (:func:`dp3d_core.families.detect_family`), as a ConversionError when
    the keys match no family or not the ``expected`` one."""
    try:
        family = detect_family(sd)
        check_family(family, expected)
    except FamilyError as exc:
        raise ConversionError(str(exc)) from None
    return family


def _layout_params(params: dict[str, Any], family: Family) -> dict[str, Any]:
    """``params`` with the view-module layout the keys say; a config that says otherwise is an error."""
    if "view_module_layout" in params and params["view_module_layout"] != family.layout:
        raise ConversionError(f"the config gives view_module_layout {params['view_module_layout']!r}, but the "
                              f"checkpoint is {family.describe()} (layout {family.layout!r}); fix or drop --config")
    return {**params, "view_module_layout": family.layout}


def _motion_name(key: str) -> str | None:
    """Official motion-module key (without the UNet prefix) -> ViewModules key, diffusers-converter ready."""
    m = re.match(r"input_blocks_motion_module\.(\d+)\.0\.(.*)$", key)
    if m:
        return f"down.{m.group(1)}.{m.group(2)}"
    m = re.match(r"middle_block_motion_module\.0\.(.*)$", key)
    if m:
        return f"mid.{m.group(1)}"
    m = re.match(r"output_blocks_motion_module\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        return f"up.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    return None


def vae_config(ddconfig: dict[str, Any] | None = None) -> dict[str, Any]:
    dd = {**SD_VAE_DDCONFIG, **(ddconfig or {})}
    channels = tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"])
    return {
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "block_out_channels": channels, "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]), "norm_num_groups": 32, "sample_size": 512,
        "scaling_factor": SCALE_FACTOR,
    }


@dataclass
class ConvertedCheckpoint:
    params: dict[str, Any]
    state_dicts: dict[str, dict[str, torch.Tensor]]
    report: ConversionReport
    pe_tables: list[torch.Tensor]
    family: Family = FAMILY_3D


def convert_state_dict(sd: dict[str, torch.Tensor], params: dict[str, Any] | None = None,
                       family: str | None = None) -> ConvertedCheckpoint:
    """Translate official key names into one diffusers state dict per component; account for every key.

    The family comes from the keys; ``family`` (a name), if given, must agree with them."""
    from diffusers.loaders.single_file_utils import (
        convert_animatediff_checkpoint_to_diffusers, convert_controlnet_checkpoint, convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)

    sd = unwrap_state_dict(sd)
    found = check_family_keys(sd, family)
    params = _layout_params(params, found) if params is not None else infer_params(sd, found)
    try:
        configs = network_configs(params)
    except ModelConfigError as exc:
        raise ConversionError(str(exc)) from None
    report = ConversionReport()
    out: dict[str, dict[str, torch.Tensor]] = {}

    unet_src = {k: v for k, v in sd.items() if k.startswith(UNET) and MOTION_MARK not in k}
    out["unet"] = convert_ldm_unet_checkpoint(unet_src, configs["unet"])
    # The reference net has the UNet's layout; diffusers' UNet converter reads the 'model.diffusion_model.' prefix.
    ref_src = {UNET + k[len(REFERENCE):]: v for k, v in sd.items() if k.startswith(REFERENCE)}
    out["reference_unet"] = convert_ldm_unet_checkpoint(ref_src, configs["reference_unet"])
    # ...and the camera ControlNet is a standard ControlNet, whose converter reads 'control_model.'.
    pose_src = {REFERENCE + k[len(POSE):]: v for k, v in sd.items() if k.startswith(POSE)}
    out["view_controlnet"] = convert_controlnet_checkpoint(pose_src, configs["view_controlnet"])
    motion_src = {}
    for k, v in sd.items():
        if k.startswith(UNET) and MOTION_MARK in k:
            name = _motion_name(k[len(UNET):])
            if name is not None:
                motion_src[name] = v
    if found.layout is not None:
        out["view_modules"] = convert_animatediff_checkpoint_to_diffusers(motion_src)
    pe_tables = [v for k, v in sd.items() if k.startswith(UNET) and k.endswith(".pos_encoder.pe")]

    if any(k.startswith(VAE) for k in sd):
        out["vae"] = convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if k.startswith(VAE)}, vae_config())
    else:
        report.skipped["vae"] = ("the checkpoint has no 'first_stage_model.' (VAE) weights; copy a diffusers "
                                 "SD-1.5 VAE folder into <model folder>/vae")
    if any(k.startswith(CLIP) for k in sd):
        clip = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP)})
        clip.pop("text_model.embeddings.position_ids", None)
        out["text_encoder"] = clip
    else:
        report.skipped["text_encoder"] = ("the checkpoint has no 'cond_stage_model.' (CLIP text) weights; the "
                                          "empty-prompt embedding must come from --context-from")

    for name in list(out):
        out[name] = {k: v for k, v in out[name].items() if v is not None}

    # Usage by tensor identity: a converted tensor is a source tensor or a view of one.
    owners: dict[int, list[str]] = {}
    for k, v in sd.items():
        owners.setdefault(id(v), []).append(k)
    used: set[str] = set()
    for name, state in out.items():
        report.converted[name] = len(state)
        for v in state.values():
            for obj in (v, v._base):
                if obj is not None and id(obj) in owners:
                    used.update(owners[id(obj)])
    for k in sd:
        if k in used:
            continue
        reason = next((why for pattern, why in IGNORED if pattern.search(k)), None)
        if reason is None:
            report.unused.append(k)
        else:
            report.ignored[k] = reason
    if not pe_tables:
        report.notes.append("no 'pos_encoder.pe' tables in the checkpoint; they are recomputed")
    report.notes.append(f"checkpoint family: {found.describe()}")
    return ConvertedCheckpoint(params=params, state_dicts=out, report=report, pe_tables=pe_tables, family=found)


# ------------------------------------------------------------------------------------------------ building
def _fit(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1x1-conv attention weights (ldm VAE) -> linear weights (diffusers)."""
    if value.shape != target.shape and value.ndim == 4 and target.ndim == 2 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0]
    return value


def _recomputed_value(name: str, key: str, like: torch.Tensor) -> torch.Tensor:
    if name == "view_modules":
        from diffusers.models.embeddings import SinusoidalPositionalEmbedding
        return SinusoidalPositionalEmbedding(int(like.shape[-1]), max_seq_length=int(like.shape[1])).pe
    return torch.zeros(like.shape, dtype=torch.float32)


def load_component(name: str, module: torch.nn.Module, state: dict[str, torch.Tensor],
                   report: ConversionReport) -> None:
    """Load ``state`` into ``module``, recording missing/unexpected keys; wrong shapes are an error.

    A module built on the meta device takes the converted tensors themselves (no copy, no second set of weights
    in memory); targets on the ``RECOMPUTED_TARGETS`` list are then created for real unless the source is meta.
    """
    own = module.state_dict()
    module_meta = any(t.device.type == "meta" for t in own.values())
    source_meta = any(t.device.type == "meta" for t in state.values())
    fitted, bad = {}, []
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(f"{name}.{key}")
            continue
        value = _fit(value, own[key])
        if tuple(value.shape) != tuple(own[key].shape):
            bad.append(f"{name}.{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        fitted[key] = value
    if bad:
        raise ConversionError("tensor shapes do not match the model configuration (wrong --config?):\n  "
                              + "\n  ".join(bad[:20]))
    for key in own:
        if key in fitted:
            continue
        how = next((h for comp, pattern, h in RECOMPUTED_TARGETS if comp == name and pattern.search(key)), None)
        if how is None:
            report.missing.append(f"{name}.{key}")
        else:
            report.recomputed[f"{name}.{key}"] = how
            if not source_meta:
                fitted[key] = _recomputed_value(name, key, own[key])
    module.load_state_dict(fitted, strict=False, assign=module_meta)


def build_networks(converted: ConvertedCheckpoint, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Construct F, F_ref, F_cam, view modules (and VAE when present) and load the converted weights.

    The modules are built on the meta device and take the checkpoint tensors as their parameters, so converting
    the full-size model needs no second copy of its weights. With ``device='meta'`` (meta source tensors) nothing
    is allocated at all: shapes and key coverage are checked only.
    """
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from .models.view_modules import ViewModules

    configs = network_configs(converted.params)
    classes: dict[str, tuple[Callable[..., torch.nn.Module], dict[str, Any]]] = {
        "unet": (UNet2DConditionModel, configs["unet"]),
        "reference_unet": (UNet2DConditionModel, configs["reference_unet"]),
        "view_controlnet": (ControlNetModel, configs["view_controlnet"]),
    }
    if "view_modules" in configs:
        classes["view_modules"] = (ViewModules, configs["view_modules"])
    if "vae" in converted.state_dicts:
        classes["vae"] = (AutoencoderKL, vae_config())
    meta = torch.device(device).type == "meta"
    modules: dict[str, torch.nn.Module] = {}
    for name, (cls, config) in classes.items():
        with torch.device("meta"):
            module = cls(**config)
        load_component(name, module, converted.state_dicts[name], converted.report)
        if not meta:
            left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
            if left:
                raise ConversionError(f"{name}: no weights for {left[:5]} (see the report's missing keys)\n"
                                      f"{converted.report}")
            module = module.to(device=device, dtype=dtype)
            for param in module.parameters():  # assigned tensors may be views of the checkpoint's
                param.data = param.data.contiguous()
        module.eval()
        modules[name] = module
    if not meta and "view_modules" in modules:
        check_positional_tables(converted, modules["view_modules"])
    return modules


def check_positional_tables(converted: ConvertedCheckpoint, view_modules: torch.nn.Module) -> float:
    """The official 'pe' tables must equal the recomputed ones (same formula); returns the max difference."""
    ours = {tuple(b.shape): b for n, b in view_modules.named_buffers() if n.endswith("pos_embed.pe")}
    worst = 0.0
    for table in converted.pe_tables:
        if table.device.type == "meta":
            continue
        mine = ours.get(tuple(table.shape))
        if mine is None:
            raise ConversionError(f"checkpoint positional table of shape {tuple(table.shape)} matches no view module")
        worst = max(worst, float((mine.float().cpu() - table.float()).abs().max()))
    if worst > 1e-5:
        raise ConversionError(f"the checkpoint's positional-encoding tables differ from the recomputed ones by "
                              f"{worst:.3g}; this is not the official motion-module formula")
    if converted.pe_tables:
        converted.report.notes.append(f"{len(converted.pe_tables)} positional tables match the recomputed ones "
                                      f"(max diff {worst:.2g})")
    return worst


def clip_config(text_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """CLIP text config: the ViT-L/14 numbers, with the sizes checked against (read from) the weights."""
    config = dict(CLIP_VIT_L14)
    try:
        vocab, hidden = text_state["text_model.embeddings.token_embedding.weight"].shape
        positions = text_state["text_model.embeddings.position_embedding.weight"].shape[0]
        inter = text_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ConversionError(f"the CLIP text weights lack {exc}; is 'cond_stage_model.' a CLIP ViT-L/14 text tower?")
    layers = len({k.split(".")[3] for k in text_state if k.startswith("text_model.encoder.layers.")})
    config.update(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(inter),
                  max_position_embeddings=int(positions), num_hidden_layers=layers,
                  num_attention_heads=max(1, int(hidden) // 64), projection_dim=int(hidden))
    if positions < len(CLIP_EMPTY_PROMPT_IDS) or vocab <= max(CLIP_EMPTY_PROMPT_IDS):
        raise ConversionError(f"the CLIP text weights ({vocab} tokens, {positions} positions) are not CLIP ViT-L/14's")
    return config


def empty_prompt_embedding(text_state: dict[str, torch.Tensor], report: ConversionReport | None = None,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """CLIP ViT-L/14 last hidden state (after the final LayerNorm) of the prompt "" -> [1, 77, 768]."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        raise ConversionError("computing the empty-prompt embedding needs the 'transformers' package "
                              "(pip install -r requirements.txt), or pass --context-from") from None
    meta = any(v.device.type == "meta" for v in text_state.values())
    with torch.device("meta" if meta else "cpu"):
        model = CLIPTextModel(CLIPTextConfig(**clip_config(text_state)))
    local = ConversionReport()
    load_component("text_encoder", model, text_state, local)
    if report is not None:
        report.missing += local.missing
        report.unexpected += local.unexpected
    if meta:
        return torch.empty(1, len(CLIP_EMPTY_PROMPT_IDS), model.config.hidden_size, device="meta")
    model = model.to(device).eval()
    ids = torch.tensor([CLIP_EMPTY_PROMPT_IDS], device=device)
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float().cpu()


def read_embedding(path: str | Path) -> torch.Tensor:
    """``--context-from``: a model folder, a .safetensors file or a weights-only .pt holding one [1,77,D] tensor."""
    path = Path(path)
    if path.is_dir():
        path = path / "prompt_embedding" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ConversionError(f"--context-from {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = list(load_file(str(path)).values())
    else:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        tensors = [loaded] if isinstance(loaded, torch.Tensor) else [v for v in loaded.values()
                                                                     if isinstance(v, torch.Tensor)]
    if len(tensors) != 1 or tensors[0].ndim not in (2, 3):
        raise ConversionError(f"--context-from {path} must hold exactly one [1, 77, D] tensor")
    emb = tensors[0].float()
    return emb[None] if emb.ndim == 2 else emb


PROGRESS_PREFIX = "progress "  # --progress: one JSON object per line after this prefix


def _nbytes(component: Any) -> int:
    state = component.state_dict() if isinstance(component, torch.nn.Module) else {}
    return sum(t.numel() * t.element_size() for t in state.values())


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: str | Path | None = None,
                       context_from: str | Path | None = None, strict: bool = True,
                       overwrite: bool = False, family: str | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> ConversionReport:
    """Convert an official checkpoint file and write the model folder; returns the report.

    ``family``: the family the caller expects (None: whatever the keys say).
    ``progress(phase, done, total)``: ``read`` and ``write`` count bytes, ``convert`` counts steps; writing the
    folder (which reads the memory-mapped checkpoint) is most of the time for the full-size model.
    """
    from .model_folder import save_model_folder
    from .models.prompt_embedding import PromptEmbedding

    tell = progress or (lambda phase, done, total: None)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out} already exists and is not empty; choose an empty folder or pass --overwrite")

    size = Path(checkpoint).stat().st_size if Path(checkpoint).is_file() else 0
    tell("read", 0, size)
    sd = load_checkpoint(checkpoint)
    tell("read", size, size)
    found = check_family_keys(sd, family)
    params = read_params_file(config) if config else infer_params(sd, found)
    tell("convert", 0, 2)
    converted = convert_state_dict(sd, params, family)
    modules = build_networks(converted)
    tell("convert", 1, 2)
    report = converted.report
    if context_from is not None:
        embedding = read_embedding(context_from)
        report.notes.append(f"empty-prompt embedding read from {context_from}")
    elif "text_encoder" in converted.state_dicts:
        embedding = empty_prompt_embedding(converted.state_dicts["text_encoder"], report)
        report.notes.append("empty-prompt embedding computed with the checkpoint's CLIP text weights")
    else:
        embedding = None
        report.skipped["prompt_embedding"] = report.skipped.pop("text_encoder", "no CLIP weights")
    if embedding is not None:
        if embedding.shape[-1] != converted.params["context_dim"]:
            raise ConversionError(f"the prompt embedding has width {embedding.shape[-1]} but the model's context_dim "
                                  f"is {converted.params['context_dim']}")
        modules["prompt_embedding"] = PromptEmbedding.from_tensor(embedding)
    modules.pop("text_encoder", None)
    if strict and not report.ok:
        raise ConversionError(f"the checkpoint does not match the expected model; nothing written.\n{report}")
    tell("convert", 2, 2)
    sizes = {name: _nbytes(m) for name, m in modules.items()}
    total, written = sum(sizes.values()), [0]

    def saved(name: str) -> None:
        written[0] += sizes.get(name, 0)
        tell("write", written[0], total)

    tell("write", 0, total)
    save_model_folder(modules, out, overwrite=overwrite, family=converted.family, on_saved=saved)
    return report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.convert", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="official checkpoint (.th/.ckpt/.pt/.pth/.safetensors)")
    parser.add_argument("out", help="model folder to write")
    parser.add_argument("--config", help="JSON of the official yaml unet_config params (default: read from shapes)")
    parser.add_argument("--context-from", help="empty-prompt embedding source when the checkpoint has no CLIP "
                                               "weights: a model folder, .safetensors or .pt file")
    parser.add_argument("--allow-incomplete", action="store_true", help="write even if some source keys are unused")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    parser.add_argument("--family", choices=("DiffPortrait3D", "DiffPortrait360"),
                        help="refuse a checkpoint of another family (default: convert whichever the keys say)")
    parser.add_argument("--progress", action="store_true",
                        help=f"print machine-readable progress lines ('{PROGRESS_PREFIX}{{json}}') for the add-on")
    args = parser.parse_args(list(argv) if argv is not None else None)
    from .model_folder import ModelFolderError

    def print_progress(phase: str, done: int, total: int) -> None:
        print(PROGRESS_PREFIX + json.dumps({"phase": phase, "done": done, "total": total}), flush=True)

    try:
        report = convert_checkpoint(args.checkpoint, args.out, args.config, args.context_from,
                                    strict=not args.allow_incomplete, overwrite=args.overwrite,
                                    family=args.family, progress=print_progress if args.progress else None)
    except (ConversionError, ModelConfigError, ModelFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
