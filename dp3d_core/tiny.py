"""A tiny random-weight model folder for tests and demos: ``python -m dp3d_core.tiny <out>``.

Same classes and topology as the real model (4 levels, 16 transformers, 27 view modules), 32 base channels,
context width 32 and a small VAE; written in seconds on CPU. ``--family DiffPortrait360`` writes a DiffPortrait360
model folder instead: the view model (20 view modules) in ``<out>`` with the back-head model (none) in
``<out>/back_head``, the layout the worker and the add-on read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

TINY_OVERRIDES: dict[str, Any] = {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_heads": 8,
                                  "context_dim": 32}
TINY_VAE: dict[str, Any] = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 16,
                            "latent_channels": 4}


def _wake_zero_parameters(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Zero-initialised layers (ControlNet zero convs, ...) get small random values so every branch matters."""
    with torch.no_grad():
        for param in module.parameters():
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _sharpen_attention(module: torch.nn.Module, factor: float = 3.0) -> None:
    """Scale query/key weights so random attention is not near-uniform (references and views then matter)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(factor)


def make_tiny_components(seed: int = 0, sample_size: int = 32, params: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Random tiny networks: name -> module, as ``load_model_folder`` returns them (no scheduler).

    ``params``: official parameters (default: DiffPortrait3D's at the tiny size)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from .convert import SCALE_FACTOR
    from .models.config import network_configs, official_params
    from .models.prompt_embedding import PromptEmbedding
    from .models.view_modules import ViewModules

    configs = network_configs(params or official_params(TINY_OVERRIDES))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet_config = {**configs["unet"], "sample_size": sample_size}
    components: dict[str, Any] = {
        "unet": UNet2DConditionModel(**unet_config),
        "reference_unet": UNet2DConditionModel(**unet_config),
        "view_controlnet": ControlNetModel(**configs["view_controlnet"]),
        **({"view_modules": ViewModules(**configs["view_modules"])} if "view_modules" in configs else {}),
        "vae": AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             sample_size=sample_size * 8, scaling_factor=SCALE_FACTOR, **TINY_VAE),
    }
    for module in components.values():
        _wake_zero_parameters(module, generator)
        _sharpen_attention(module)
    context_dim = configs["unet"]["cross_attention_dim"]
    components["prompt_embedding"] = PromptEmbedding.from_tensor(
        torch.randn(1, 77, context_dim, generator=generator))
    for module in components.values():
        module.eval()
    return components


def make_tiny_model_folder(path: str | Path, seed: int = 0, sample_size: int = 32, overwrite: bool = False) -> Path:
    """Write a tiny random model folder (latent ``sample_size``, images 8x that) and return its path."""
    from .model_folder import save_model_folder
    return save_model_folder(make_tiny_components(seed, sample_size), path, overwrite=overwrite)


def make_tiny_360_components(seed: int = 0, sample_size: int = 32) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random tiny DiffPortrait360 networks: (view model, back-head model) components (different weights)."""
    from .models.config import diffportrait360_params

    views = make_tiny_components(seed, sample_size, diffportrait360_params(TINY_OVERRIDES))
    back = make_tiny_components(seed + 1, sample_size, diffportrait360_params(TINY_OVERRIDES, back_head=True))
    return views, back


def make_tiny_360_model_folders(path: str | Path, seed: int = 0, sample_size: int = 32,
                                overwrite: bool = False) -> tuple[Path, Path]:
    """Write a tiny random DiffPortrait360 model folder: the view model in ``path``, the back-head model in
    ``path/back_head``; returns both folders."""
    from .families import FAMILY_360_BACK_HEAD, FAMILY_360_VIEWS
    from .model_folder import save_model_folder
    from .preflight import BACK_HEAD_FOLDER

    views, back = make_tiny_360_components(seed, sample_size)
    path = save_model_folder(views, path, overwrite=overwrite, family=FAMILY_360_VIEWS)
    return path, save_model_folder(back, path / BACK_HEAD_FOLDER, family=FAMILY_360_BACK_HEAD)


def main(argv: Iterable[str] | None = None) -> int:
    from .model_folder import ModelFolderError

    parser = argparse.ArgumentParser(prog="python -m dp3d_core.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-size", type=int, default=32, help="latent size (images are 8x)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--family", choices=("DiffPortrait3D", "DiffPortrait360"), default="DiffPortrait3D",
                        help="DiffPortrait360: the view model in <out>, the back-head model in <out>/back_head")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.family == "DiffPortrait360":
            paths = make_tiny_360_model_folders(args.out, args.seed, args.sample_size, args.overwrite)
        else:
            paths = (make_tiny_model_folder(args.out, args.seed, args.sample_size, args.overwrite),)
    except ModelFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
