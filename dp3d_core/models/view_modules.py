"""Cross-view (AnimateDiff-style temporal) attention modules and where they sit in the diffusers UNet.

Two official placements (``layout``), same module, same key names, different places:

* ``"diffportrait3d"`` (quirk 10, ``UNetModel_Temporal``): one module after each input block 1..11 (after the
  ResBlock+transformer, after each Downsample, after the attention-free ResBlocks), applied BEFORE the tensor is
  kept as a skip connection; one in the middle block between the transformer and the second ResBlock, used on the
  unconditional pass only (quirk 3); one after every output block, and for output blocks that end in an Upsample
  both of that block's modules run after the upsampling (27 modules for 4 levels).
* ``"diffportrait360"`` (DiffPortrait360 quirk V3): one module after each input block that holds a ResBlock (none
  after the Downsamples), no middle module, exactly one after every output block (after its Upsample where it
  has one): 20 modules for 4 levels, used on both passes.

Views are consecutive batch rows in clips of 8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

from .config import LAYOUTS


class ViewTransformer(AnimateDiffTransformer3D):
    """One official motion module (``TemporalTransformer3DModel``) in diffusers' AnimateDiff layout.

    Differs from diffusers' forward in one place: the GroupNorm is taken over each view separately (the official
    module runs on ``(b f) c h w``), not jointly over all frames of a clip.
    """

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 8, **_: Any) -> torch.Tensor:  # type: ignore[override]
        batch_frames, channel, height, width = hidden_states.shape
        if batch_frames % num_frames:
            raise ValueError(f"batch of {batch_frames} is not a whole number of {num_frames}-view clips")
        clips = batch_frames // num_frames
        residual = hidden_states
        h = self.norm(hidden_states)
        # (b f) c h w -> (b h w) f c: attention runs over the views at each spatial position.
        h = h.reshape(clips, num_frames, channel, height * width).permute(0, 3, 1, 2)
        h = h.reshape(clips * height * width, num_frames, channel)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(hidden_states=h, encoder_hidden_states=None)
        h = self.proj_out(h)
        inner = h.shape[-1]
        h = h.reshape(clips, height * width, num_frames, inner).permute(0, 2, 3, 1)
        h = h.reshape(batch_frames, inner, height, width)
        return h + residual


def make_view_transformer(channels: int, heads: int, layers: int, max_views: int, groups: int) -> ViewTransformer:
    return ViewTransformer(
        num_attention_heads=heads,
        attention_head_dim=channels // heads,
        in_channels=channels,
        num_layers=layers,
        norm_num_groups=groups,
        cross_attention_dim=None,
        attention_bias=False,
        activation_fn="geglu",
        double_self_attention=True,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=max_views,
    )


@dataclass
class ViewState:
    """Per-pass switches read by the hooks."""

    clip_length: int = 8
    middle_enabled: bool = False
    middle_from_row: int = 0  # the middle module runs on rows [middle_from_row:] only (whole clips)


class ViewModules(ModelMixin, ConfigMixin):
    """The official cross-view modules. ``down[i]`` after the i-th down position, ``mid`` (DiffPortrait3D layout
    only, else None), ``up[i][k]`` after output block i. DiffPortrait3D: 11 + 1 + 15 = 27 modules for 4 levels
    (down positions include the Downsamples); DiffPortrait360: 8 + 12 = 20."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280), layers_per_block: int = 2,
                 num_attention_heads: int = 8, num_transformer_blocks: int = 1, max_views: int = 32,
                 norm_num_groups: int = 32, layout: str = "diffportrait3d") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown view-module layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        full = layout == "diffportrait3d"

        def make(ch: int) -> ViewTransformer:
            return make_view_transformer(ch, num_attention_heads, num_transformer_blocks, max_views, norm_num_groups)

        levels = len(block_out_channels)
        down: list[ViewTransformer] = []
        for level, ch in enumerate(block_out_channels):
            down.extend(make(ch) for _ in range(layers_per_block))
            if full and level != levels - 1:
                down.append(make(ch))  # after the Downsample
        self.down = nn.ModuleList(down)
        self.mid = make(block_out_channels[-1]) if full else None
        up: list[nn.ModuleList] = []
        for level in reversed(range(levels)):
            ch = block_out_channels[level]
            for i in range(layers_per_block + 1):
                after_upsample = full and level != 0 and i == layers_per_block
                up.append(nn.ModuleList([make(ch) for _ in range(2 if after_upsample else 1)]))
        self.up = nn.ModuleList(up)

    def attach(self, unet: nn.Module, state: ViewState) -> list[torch.utils.hooks.RemovableHandle]:
        """Register forward hooks on ``unet`` (a diffusers UNet2DConditionModel) that apply the modules."""
        handles = []

        def hook(modules: list[ViewTransformer], middle: bool = False) -> Callable:
            def apply(module: nn.Module, args: Any, output: Any) -> Any:
                if middle and not state.middle_enabled:
                    return output
                sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                kept = None
                if middle and state.middle_from_row:
                    kept, sample = sample[:state.middle_from_row], sample[state.middle_from_row:]
                for view_module in modules:
                    sample = view_module(sample, num_frames=state.clip_length)
                if kept is not None:
                    sample = torch.cat([kept, sample])
                if isinstance(output, tuple):
                    return (sample,) + tuple(output[1:])
                if hasattr(output, "sample"):
                    output.sample = sample
                    return output
                return sample
            return apply

        def layer(block: nn.Module, j: int) -> nn.Module:
            attentions = getattr(block, "attentions", None)
            return attentions[j] if attentions is not None else block.resnets[j]

        layers = self.config.layers_per_block
        full = self.config.layout == "diffportrait3d"
        index = 0
        for block in unet.down_blocks:
            targets = [layer(block, j) for j in range(layers)]
            if full and block.downsamplers is not None:
                targets.append(block.downsamplers[0])
            for target in targets:
                handles.append(target.register_forward_hook(hook([self.down[index]])))
                index += 1
        if index != len(self.down):
            raise ValueError(f"UNet has {index} down positions, view modules have {len(self.down)}")
        if full:
            handles.append(unet.mid_block.attentions[0].register_forward_hook(hook([self.mid], middle=True)))
        index = 0
        for block in unet.up_blocks:
            for j in range(layers + 1):
                modules = list(self.up[index])
                if j == layers and block.upsamplers is not None:
                    target = block.upsamplers[0]
                else:
                    target = layer(block, j)
                handles.append(target.register_forward_hook(hook(modules)))
                index += 1
        if index != len(self.up):
            raise ValueError(f"UNet has {index} up positions, view modules have {len(self.up)}")
        return handles
