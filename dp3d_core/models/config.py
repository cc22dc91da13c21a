"""Official (ldm/yaml) network parameters -> diffusers configs for F, F_ref, F_cam and the view modules.

The official yaml describes each network with ``model_channels``, ``channel_mult``, ``num_heads`` ... ; diffusers
wants ``block_out_channels``, block types, ... . Everything here is plain dict work, so any size (the reduced parity
model, the real SD-1.5-sized model, the tiny demo model) maps the same way.
"""
from __future__ import annotations

import copy
from typing import Any

# cldm_v15_diffportrait3D.yaml, unet_config.params (the appearance and pose nets use the same sizes).
SD15_OFFICIAL_PARAMS: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "legacy": False,
    "hint_channels": 3,
    "unet_additional_kwargs": {
        "use_motion_module": True,
        "motion_module_type": "Vanilla",
        "motion_module_kwargs": {
            "num_attention_heads": 8,
            "num_transformer_block": 1,
            "attention_block_types": ["Temporal_Self", "Temporal_Self"],
            "temporal_position_encoding": True,
            "temporal_position_encoding_max_len": 32,
            "temporal_attention_dim_div": 1,
            "zero_initialize": True,
        },
    },
}

# The hint encoder of the official pose ControlNet: 3->16->16->32->32->96->96->256->C.
HINT_ENCODER_CHANNELS = (16, 32, 96, 256)
CLIP_LENGTH = 8
# Where the view modules sit (see models/view_modules.py).
LAYOUTS = ("diffportrait3d", "diffportrait360")
# DiffPortrait360's temporal_position_encoding_max_len (DiffPortrait3D: 32).
DP360_POSITIONAL_ROWS = 24


class ModelConfigError(ValueError):
    """An official network configuration this implementation cannot represent."""


def official_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SD-1.5-sized official parameters, updated with ``overrides`` (e.g. a yaml ``params`` dict)."""
    params = copy.deepcopy(SD15_OFFICIAL_PARAMS)
    for key, value in (overrides or {}).items():
        params[key] = copy.deepcopy(value)
    return params


def diffportrait360_params(overrides: dict[str, Any] | None = None, back_head: bool = False) -> dict[str, Any]:
    """The DiffPortrait360 yamls' parameters (view model, or ``back_head``: the back-head model), as
    :func:`official_params`: the same networks, view modules in the DiffPortrait360 layout with a 24-row
    positional table (the back-head model has none)."""
    params = official_params(overrides)
    params["unet_additional_kwargs"]["motion_module_kwargs"]["temporal_position_encoding_max_len"] = \
        DP360_POSITIONAL_ROWS
    params["view_module_layout"] = None if back_head else "diffportrait360"
    return params


def _check_supported(params: dict[str, Any]) -> None:
    unsupported = {
        "use_spatial_transformer": (True,),
        "use_scale_shift_norm": (False,),
        "resblock_updown": (False,),
        "legacy": (False,),
    }
    for key, allowed in unsupported.items():
        if key in params and params[key] not in allowed:
            raise ModelConfigError(f"official parameter {key}={params[key]!r} is not supported (only {allowed[0]!r})")
    if params.get("context_dim") is None:
        raise ModelConfigError("official parameters must give context_dim (the text-embedding width)")
    if isinstance(params["num_res_blocks"], (list, tuple)):
        raise ModelConfigError("per-level num_res_blocks is not supported; give one integer")


def _levels(params: dict[str, Any]) -> tuple[tuple[int, ...], list[bool]]:
    channels = tuple(int(params["model_channels"]) * int(m) for m in params["channel_mult"])
    attention = [2**level in params["attention_resolutions"] for level in range(len(channels))]
    return channels, attention


def _heads(params: dict[str, Any], channels: tuple[int, ...]) -> int | tuple[int, ...]:
    if int(params.get("num_head_channels", -1)) == -1:
        return int(params["num_heads"])
    return tuple(c // int(params["num_head_channels"]) for c in channels)


def unet_config(params: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config for the official UNet (also used for the reference net)."""
    _check_supported(params)
    channels, attention = _levels(params)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return {
        "sample_size": int(params.get("image_size", 32)) * 2,
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params.get("out_channels", params["in_channels"])),
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": int(params["num_res_blocks"]),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1.0,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": int(params["context_dim"]),
        "transformer_layers_per_block": int(params.get("transformer_depth", 1)),
        "attention_head_dim": _heads(params, channels),
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "upcast_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "resnet_time_scale_shift": "default",
    }


def controlnet_config(params: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``ControlNetModel`` config for the official pose ControlNet (F_cam)."""
    base = unet_config(params)
    return {
        "in_channels": base["in_channels"],
        "conditioning_channels": int(params.get("hint_channels", 3)),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": base["down_block_types"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": base["block_out_channels"],
        "layers_per_block": base["layers_per_block"],
        "downsample_padding": 1,
        "mid_block_scale_factor": 1.0,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": base["cross_attention_dim"],
        "transformer_layers_per_block": base["transformer_layers_per_block"],
        "attention_head_dim": base["attention_head_dim"],
        "use_linear_projection": base["use_linear_projection"],
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "conditioning_embedding_out_channels": HINT_ENCODER_CHANNELS,
    }


def view_modules_config(params: dict[str, Any]) -> dict[str, Any]:
    """``ViewModules`` config (the 27 official motion modules) from the official UNet parameters."""
    _check_supported(params)
    extra = params.get("unet_additional_kwargs") or {}
    if not extra.get("use_motion_module", True):
        raise ModelConfigError("DiffPortrait3D needs the motion (view) modules: use_motion_module must be true")
    if extra.get("motion_module_type", "Vanilla") != "Vanilla":
        raise ModelConfigError(f"motion_module_type {extra.get('motion_module_type')!r} is not supported")
    kw = extra.get("motion_module_kwargs") or {}
    if list(kw.get("attention_block_types", ["Temporal_Self", "Temporal_Self"])) != ["Temporal_Self", "Temporal_Self"]:
        raise ModelConfigError("only attention_block_types [Temporal_Self, Temporal_Self] is supported")
    if int(kw.get("temporal_attention_dim_div", 1)) != 1 or not kw.get("temporal_position_encoding", True):
        raise ModelConfigError("only temporal_attention_dim_div 1 with temporal position encoding is supported")
    channels, _ = _levels(params)
    return {
        "block_out_channels": channels,
        "layers_per_block": int(params["num_res_blocks"]),
        "num_attention_heads": int(kw.get("num_attention_heads", 8)),
        "num_transformer_blocks": int(kw.get("num_transformer_block", 1)),
        "max_views": int(kw.get("temporal_position_encoding_max_len", 32)),
        "norm_num_groups": 32,
        "layout": view_module_layout(params),
    }


def view_module_layout(params: dict[str, Any]) -> str | None:
    """Where the view modules sit: ``params["view_module_layout"]`` (not a yaml key; the converter sets it from the
    checkpoint's keys): "diffportrait3d" (default), "diffportrait360", or None for a UNet without view modules
    (the DiffPortrait360 back-head model)."""
    layout = params.get("view_module_layout", "diffportrait3d")
    if layout not in (*LAYOUTS, None):
        raise ModelConfigError(f"unknown view_module_layout {layout!r}; choose one of {', '.join(LAYOUTS)} or null")
    return layout


def network_configs(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """All network configs from one official parameter dict (no "view_modules" when the layout is None)."""
    configs = {
        "unet": unet_config(params),
        "reference_unet": unet_config(params),
        "view_controlnet": controlnet_config(params),
    }
    if view_module_layout(params) is not None:
        configs["view_modules"] = view_modules_config(params)
    return configs


def params_from_parity_config(parity_config: dict[str, Any]) -> dict[str, Any]:
    """Official UNet parameters from a parity fixture's ``parity_config.json``."""
    try:
        unet = parity_config["unet_config"]["resolved_constructor_args"]
        pose = parity_config["pose_control_stage_config"]["resolved_constructor_args"]
        ref = parity_config["appearance_control_stage_config"]["resolved_constructor_args"]
    except KeyError as exc:
        raise ModelConfigError(f"parity config lacks {exc}; is this a DiffPortrait3D parity_config.json?") from None
    for name in ("model_channels", "channel_mult", "num_heads", "context_dim", "attention_resolutions", "num_res_blocks"):
        if not (unet[name] == pose[name] == ref[name]):
            raise ModelConfigError(f"the three networks differ in {name}; this implementation needs them equal")
    return official_params({**unet, "hint_channels": pose.get("hint_channels", 3)})
