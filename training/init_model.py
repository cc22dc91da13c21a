"""The model folder stage 1 starts from, made from Stable Diffusion 1.5 weights.

    python -m training.init_model --sd PATH --out MODEL_DIR [--motion-modules PATH] [--config SD_FOLDER]

``--sd``: a diffusers SD-1.5 folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) or a single-file
``.safetensors`` checkpoint, read with diffusers' ``from_single_file`` (``--config``: a local diffusers SD folder
for the configs; without it diffusers looks the configs up online). Pickled ``.ckpt``/``.bin`` files are refused.

Written (DESIGN.md's model folder): F = SD's UNet, F_ref = a copy of it, F_cam = ``ControlNetModel.from_unet(F)``
(zero convolutions), the view modules zero-initialised as the official code does (every output projection zero,
so each module starts as the identity), or, with ``--motion-modules``, loaded from an AnimateDiff motion-module
checkpoint in diffusers' ``MotionAdapter`` format. SD's VAE, and the empty prompt's embedding computed by SD's own
text encoder and tokenizer (the official model only ever uses the empty prompt).

Key mapping of ``--motion-modules`` (L = layers per block, 2 for SD 1.5; ``up[i]`` holds one module, or two for
the last position of an output block that ends in an upsampler)::

    down_blocks.{l}.motion_modules.{j}.*  ->  down.{l * (L + 1) + j}.*   (j < L; the module after level l's
                                                                          downsampler, down.{l * (L + 1) + L},
                                                                          has no AnimateDiff counterpart)
    mid_block.motion_modules.0.*          ->  mid.*
    up_blocks.{b}.motion_modules.{j}.*    ->  up.{b * (L + 1) + j}.0.*   (the second module of an upsampling
                                                                          position has no counterpart)

Every checkpoint key is used or reported as unused; every view-module tensor is loaded or reported as kept at
its zero initialisation; a shape mismatch is an error.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

PICKLES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
# the original (LDM) layout of an SD-1.x single-file checkpoint: network -> key prefix
SINGLE_FILE_PARTS = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.",
                     "CLIP text encoder": "cond_stage_model.transformer."}


class InitModelError(ValueError):
    """The SD weights or motion modules cannot be used; the message says why and what to do."""


@dataclass
class MotionReport:
    loaded: list[str] = field(default_factory=list)      # view-module keys taken from the checkpoint
    kept_zero: list[str] = field(default_factory=list)   # view-module keys with no counterpart
    unused: list[str] = field(default_factory=list)      # checkpoint keys not mapped to any view module

    def summary(self) -> str:
        return (f"{len(self.loaded)} view-module tensors loaded, {len(self.kept_zero)} kept at their zero "
                f"initialisation (no AnimateDiff counterpart), {len(self.unused)} checkpoint tensors unused")


# ---------------------------------------------------------------------------- reading SD
def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLES:
        raise InitModelError(f"{path} is a pickled checkpoint, which can run code when loaded; convert it to "
                             f".safetensors first (e.g. with diffusers' conversion scripts) or use a diffusers folder")


def load_sd(path: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """UNet, VAE, text encoder and tokenizer of an SD-1.5 diffusers folder or single-file checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    path = Path(path)
    if not path.exists():
        raise InitModelError(f"{path} does not exist; give a diffusers SD-1.5 folder or a .safetensors checkpoint")
    if path.is_dir():
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
        if missing:
            raise InitModelError(f"{path} is not a diffusers Stable Diffusion folder: it has no {', '.join(missing)}")
        try:
            return {"unet": UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", use_safetensors=True),
                    "vae": AutoencoderKL.from_pretrained(str(path), subfolder="vae", use_safetensors=True),
                    "text_encoder": CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder",
                                                                  use_safetensors=True),
                    "tokenizer": CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")}
        except (OSError, ValueError, EnvironmentError) as exc:
            raise InitModelError(f"cannot read the SD weights in {path} ({exc}); the folder must hold safetensors "
                                 f"weights (pickled .bin weights are not read)") from None
    _refuse_pickle(path)
    _check_single_file(path, config)
    from diffusers import StableDiffusionPipeline
    kwargs: dict[str, Any] = {"local_files_only": config is not None}
    if config is not None:
        kwargs["config"] = str(config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, **kwargs)
    except Exception as exc:  # diffusers raises many types here (config lookup, key errors)
        raise InitModelError(f"cannot read {path} as a single-file SD-1.5 checkpoint ({exc}); pass --config with "
                             f"a local diffusers SD-1.5 folder for the configs") from None
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}


def _check_single_file(path: Path, config: str | Path | None) -> None:
    """Before the big load: the file holds all three SD-1.x networks (diffusers would otherwise take a missing
    text encoder from --config's weights, and the embedding would not come from this checkpoint), and --config
    is a local diffusers folder."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise InitModelError(f"cannot read {path} as safetensors ({exc})") from None
    missing = [name for name, prefix in SINGLE_FILE_PARTS.items() if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise InitModelError(f"{path} is not a complete SD-1.x checkpoint: it has no {' and no '.join(missing)} "
                             f"(keys {', '.join(SINGLE_FILE_PARTS[m] + '*' for m in missing)}); use a full "
                             f"checkpoint or a diffusers folder")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise InitModelError(f"--config {config} is not a diffusers Stable Diffusion folder (no model_index.json); "
                             f"give the folder of a diffusers SD-1.5 model (its configs and tokenizer are used)")


@torch.no_grad()
def empty_prompt_embedding(text_encoder: Any, tokenizer: Any) -> torch.Tensor:
    """The text encoder's last hidden state for "" padded to the tokenizer's length, as SD's pipeline encodes it."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder.eval()(ids).last_hidden_state.float()


# ---------------------------------------------------------------------------- motion modules
def motion_key_map(layers: int, levels: int) -> dict[str, str]:
    """MotionAdapter module prefix -> ViewModules prefix (see the module docstring)."""
    out = {}
    for level in range(levels):
        for j in range(layers):
            out[f"down_blocks.{level}.motion_modules.{j}."] = f"down.{level * (layers + 1) + j}."
    out["mid_block.motion_modules.0."] = "mid."
    for block in range(levels):
        for j in range(layers + 1):
            out[f"up_blocks.{block}.motion_modules.{j}."] = f"up.{block * (layers + 1) + j}.0."
    return out


def read_motion_modules(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InitModelError(f"{path} holds no .safetensors motion-module weights")
        path = files[0]
    if not path.is_file():
        raise InitModelError(f"motion-module checkpoint {path} does not exist")
    _refuse_pickle(path)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise InitModelError(f"cannot read {path} as safetensors ({exc})") from None


def load_motion_modules(view_modules: torch.nn.Module, state: dict[str, torch.Tensor]) -> MotionReport:
    """Copy the mapped tensors into ``view_modules`` (in place); shapes must match."""
    layers = view_modules.config.layers_per_block
    levels = len(view_modules.config.block_out_channels)
    mapping = motion_key_map(layers, levels)
    own = view_modules.state_dict()
    report = MotionReport()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in mapping if key.startswith(p)), None)
        target = mapping[prefix] + key[len(prefix):] if prefix else None
        if target is None or target not in own:
            report.unused.append(key)
            continue
        if tuple(own[target].shape) != tuple(value.shape):
            raise InitModelError(f"motion-module tensor {key} has shape {tuple(value.shape)} but the view module "
                                 f"{target} needs {tuple(own[target].shape)}; the motion modules were made for "
                                 f"another UNet (this one needs block_out_channels "
                                 f"{list(view_modules.config.block_out_channels)})")
        new[target] = value.to(own[target].dtype)
    with torch.no_grad():
        for key, tensor in own.items():
            if key in new:
                tensor.copy_(new[key])
                report.loaded.append(key)
            else:
                report.kept_zero.append(key)
    if not report.loaded:
        raise InitModelError(f"no tensor of the motion-module checkpoint maps onto the view modules "
                             f"({len(state)} keys, e.g. {list(state)[:2]}); it must be a diffusers MotionAdapter "
                             f"(keys down_blocks.N.motion_modules.M....)")
    return report


# ---------------------------------------------------------------------------- the folder
def init_model(sd: str | Path, out: str | Path, motion_modules: str | Path | None = None,
               config: str | Path | None = None, overwrite: bool = False,
               seed: int = 0) -> tuple[Path, MotionReport | None]:
    from dp3d_core.model_folder import save_model_folder
    from dp3d_core.models.prompt_embedding import PromptEmbedding

    from .models import hand_over_from_unet, params_of
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InitModelError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    motion_state = read_motion_modules(motion_modules) if motion_modules else None  # fail before the big load
    parts = load_sd(sd, config)
    unet = parts["unet"].eval()
    with torch.random.fork_rng():  # F_cam's conditioning embedding and the view modules start from random weights
        torch.manual_seed(seed)
        networks = hand_over_from_unet(unet, params_of(unet))
    report = load_motion_modules(networks["view_modules"], motion_state) if motion_state is not None else None
    embedding = empty_prompt_embedding(parts["text_encoder"], parts["tokenizer"])
    if embedding.shape[-1] != unet.config.cross_attention_dim:
        raise InitModelError(f"the text encoder's width {embedding.shape[-1]} is not the UNet's cross-attention "
                             f"width {unet.config.cross_attention_dim}; the weights are not one SD model")
    components = {"unet": unet, **networks, "vae": parts["vae"].eval(),
                  "prompt_embedding": PromptEmbedding.from_tensor(embedding)}
    return save_model_folder(components, out, overwrite=overwrite), report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.init_model", description=__doc__.split("\n")[0])
    parser.add_argument("--sd", required=True, help="diffusers SD-1.5 folder or single-file .safetensors")
    parser.add_argument("--out", required=True, help="model folder to write (stage 1's init_model)")
    parser.add_argument("--motion-modules", help="AnimateDiff motion modules (diffusers MotionAdapter, safetensors)")
    parser.add_argument("--config", help="local diffusers SD-1.5 folder with the configs (single-file --sd only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomly initialised weights (default 0)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        out, report = init_model(args.sd, args.out, args.motion_modules, args.config, args.overwrite, args.seed)
    except InitModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        print(f"motion modules: {report.summary()}")
        for key in report.unused:
            print(f"  unused: {key}")
        kept = sorted({re.sub(r"\.(norm|proj_in|proj_out|transformer_blocks)\..*", "", k) for k in report.kept_zero})
        print(f"  zero-initialised view modules: {', '.join(kept)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
