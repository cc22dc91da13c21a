"""Building and initialising the networks for training.

Stage 0 starts from nothing (random F, a trained small VAE); :func:`hand_over_from_unet` then initialises the
other networks the way the paper does from SD: F_ref = a copy of F, F_cam = a ControlNet copied from F (zero
convolutions), view modules with zero output projections (official ``zero_initialize``), so each later stage
starts exactly from the model before it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from dp3d_core.models.config import network_configs, official_params
from dp3d_core.models.denoiser import DiffPortrait3DDenoiser
from dp3d_core.models.prompt_embedding import PromptEmbedding
from dp3d_core.models.view_modules import ViewModules

TRAINABLE = {"vae": "vae", "0": "unet", "1": "reference_unet", "2": "view_controlnet", "3": "view_modules"}
# DiffPortrait360 stages train several networks at once (F stays locked); ``train_networks`` may pick fewer.
STAGE_NETWORKS = {"back": ("reference_unet", "view_controlnet"),
                  "360": ("reference_unet", "view_controlnet", "view_modules")}

SMALL_VAE_CONFIG: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "scaling_factor": 1.0,
}


def make_vae(config: dict[str, Any], image_size: int) -> AutoencoderKL:
    """A fresh AutoencoderKL (8x downsampling needs 4 levels) from ``config`` over SMALL_VAE_CONFIG."""
    cfg = {**SMALL_VAE_CONFIG, **config, "sample_size": image_size}
    levels = len(cfg["block_out_channels"])
    if levels != 4:
        raise ValueError(f"the VAE needs 4 levels (8x downsampling, as the pipeline and F_cam expect), got {levels}")
    return AutoencoderKL(**cfg)


def zero_view_outputs(view_modules: ViewModules) -> ViewModules:
    """Zero every view module's output projection: each module becomes the identity (official zero init)."""
    with torch.no_grad():
        for name, module in view_modules.named_modules():
            if name.endswith("proj_out") and isinstance(module, nn.Linear):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
    return view_modules


def hand_over_from_unet(unet: UNet2DConditionModel, params: dict[str, Any]) -> dict[str, nn.Module]:
    """F_ref, F_cam and view modules initialised from a trained F (as the paper initialises from SD)."""
    configs = network_configs(params)
    reference_unet = copy.deepcopy(unet)
    view_controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(configs["view_controlnet"]["conditioning_embedding_out_channels"]),
        conditioning_channels=configs["view_controlnet"]["conditioning_channels"])
    view_modules = zero_view_outputs(ViewModules(**configs["view_modules"]))
    return {"reference_unet": reference_unet, "view_controlnet": view_controlnet, "view_modules": view_modules}


def fresh_components(params_overrides: dict[str, Any], image_size: int, vae: AutoencoderKL,
                     prompt_length: int, seed: int) -> dict[str, Any]:
    """Stage 0's starting point: random F (latent channels from the VAE), the hand-over networks and a fixed
    random prompt embedding (the small model has no text encoder; the embedding is a constant context)."""
    overrides = {**params_overrides, "in_channels": vae.config.latent_channels,
                 "out_channels": vae.config.latent_channels}
    params = official_params(overrides)
    torch.manual_seed(seed)
    unet_cfg = {**network_configs(params)["unet"], "sample_size": image_size // 8}
    unet = UNet2DConditionModel(**unet_cfg)
    g = torch.Generator().manual_seed(seed)
    prompt = PromptEmbedding.from_tensor(torch.randn(1, prompt_length, params["context_dim"], generator=g))
    return {"unet": unet, **hand_over_from_unet(unet, params), "vae": vae, "prompt_embedding": prompt}


def params_of(unet: UNet2DConditionModel, view_modules: ViewModules | None = None) -> dict[str, Any]:
    """Official-style parameters that reproduce ``unet``'s layout (for :func:`hand_over_from_unet`)."""
    cfg = unet.config
    channels = list(cfg.block_out_channels)
    base = channels[0]
    heads = cfg.attention_head_dim
    attention_resolutions = [2**i for i, t in enumerate(cfg.down_block_types) if t.startswith("CrossAttn")]
    params = official_params({
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": base,
        "channel_mult": [c // base for c in channels], "num_res_blocks": cfg.layers_per_block,
        "attention_resolutions": attention_resolutions, "context_dim": cfg.cross_attention_dim,
        "num_heads": heads if isinstance(heads, int) else heads[0], "num_head_channels": -1,
        "transformer_depth": cfg.transformer_layers_per_block if isinstance(cfg.transformer_layers_per_block, int)
        else cfg.transformer_layers_per_block[0],
        "use_linear_in_transformer": cfg.use_linear_projection,
        "image_size": cfg.sample_size // 2,
    })
    if view_modules is not None:
        vm = view_modules.config
        params["unet_additional_kwargs"]["motion_module_kwargs"].update(
            num_attention_heads=vm.num_attention_heads, num_transformer_block=vm.num_transformer_blocks,
            temporal_position_encoding_max_len=vm.max_views)
    return params


def detach_view_modules(denoiser: DiffPortrait3DDenoiser) -> None:
    """Run F without the cross-view modules (stages 0-2: the paper adds them in stage 3), so any batch size
    works. Removes the forward hooks the denoiser registered on F."""
    # The denoiser keeps its hook handles on F (``_dp3d_hooks``; older versions: ``_hooks`` on itself).
    for holder, name in ((denoiser.unet, "_dp3d_hooks"), (denoiser, "_hooks")):
        for handle in getattr(holder, name, None) or []:
            handle.remove()
        if hasattr(holder, name):
            setattr(holder, name, [])
    denoiser.clip_length = 1
    denoiser.view_state.clip_length = 1


def tie_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make every parameter of ``target`` the very same Parameter object as ``source``'s of the same name
    (same architecture), so both modules train as one and gradients from both uses add up."""
    for name, param in source.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(target.get_submodule(owner) if owner else target, attr, param)


def trainable_names(stage: str, train_networks: str = "") -> tuple[str, ...]:
    """The component names a stage trains (``train_networks``: a comma-separated subset, stages back/360)."""
    if stage in STAGE_NETWORKS:
        if train_networks:
            return tuple(n.strip() for n in train_networks.split(","))
        return STAGE_NETWORKS[stage]
    return (TRAINABLE[stage],)


def set_trainable(components: dict[str, Any], stage: str, train_networks: str = "") -> nn.Module:
    """Freeze every network except the stage's (``requires_grad_``); returns the trainable module: the network
    itself, or (stages back/360) an ``nn.ModuleDict`` holding the very same network objects by name."""
    names = trainable_names(stage, train_networks)
    for key, module in components.items():
        if isinstance(module, nn.Module):
            module.requires_grad_(key in names)
    if stage in STAGE_NETWORKS:
        trainable = nn.ModuleDict({name: components[name] for name in names})
    else:
        trainable = components[names[0]]
    trainable.train()
    return trainable


def views_to_360_layout(view_modules: ViewModules) -> tuple[ViewModules, list[str]]:
    """DiffPortrait360 view modules initialised from DiffPortrait3D ones where the places coincide: the module
    after each ResBlock input block (DiffPortrait3D's modules after the Downsamples have no place in 360's layout)
    and the first module after each output block (after its Upsample where it has one; DiffPortrait3D's second
    module there and its middle module are dropped). Returns (modules, names of the dropped 3D modules)."""
    cfg = dict(view_modules.config)
    if cfg.get("layout", "diffportrait3d") != "diffportrait3d":
        raise ValueError(f"expected DiffPortrait3D view modules, got layout {cfg.get('layout')!r}")
    keep = {k: cfg[k] for k in ("block_out_channels", "layers_per_block", "num_attention_heads",
                                "num_transformer_blocks", "max_views", "norm_num_groups")}
    out = ViewModules(**keep, layout="diffportrait360").to(next(view_modules.parameters()).dtype)
    layers, levels = keep["layers_per_block"], len(keep["block_out_channels"])
    dropped = []
    with torch.no_grad():
        for level in range(levels):
            for j in range(layers):
                out.down[level * layers + j].load_state_dict(view_modules.down[level * (layers + 1) + j].state_dict())
            if level != levels - 1:
                dropped.append(f"down.{level * (layers + 1) + layers}")
        for i, modules in enumerate(view_modules.up):
            out.up[i][0].load_state_dict(modules[0].state_dict())
            dropped.extend(f"up.{i}.{k}" for k in range(1, len(modules)))
    dropped.append("mid")
    return out, dropped
