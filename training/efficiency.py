"""Memory and speed switches of training: gradient checkpointing, 8-bit Adam, SDPA attention."""
from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import nn

# Attention processors that run torch's scaled_dot_product_attention (diffusers' default and the reference bank's).
SDPA_PROCESSORS = {"AttnProcessor2_0", "BankReadProcessor", "BankWriteProcessor"}


class OptimizerUnavailable(RuntimeError):
    """The configured optimizer cannot be built here; the message says what to install."""


def _attention_modules(module: nn.Module) -> Iterable[Any]:
    from diffusers.models.attention_processor import Attention
    return (m for m in module.modules() if isinstance(m, Attention))


def use_sdpa(modules: Iterable[nn.Module]) -> dict[str, int]:
    """Give every attention layer that does not use SDPA diffusers' SDPA processor; returns the processor
    counts (class name -> layers) afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    counts: dict[str, int] = {}
    for module in modules:
        for attn in _attention_modules(module):
            if type(attn.processor).__name__ not in SDPA_PROCESSORS:
                attn.set_processor(AttnProcessor2_0())
            name = type(attn.processor).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


def _checkpointed_forward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    module.forward = run
    module._dp3d_checkpointed = True


def enable_gradient_checkpointing(network: nn.Module) -> int:
    """Recompute activations in the backward pass instead of keeping them (non-reentrant checkpointing, so the
    reference bank written inside a checkpointed block keeps its graph). diffusers models use their own switch;
    the view modules (not a diffusers block) get each transformer wrapped. Returns the checkpointed blocks."""
    from dp3d_core.models.view_modules import ViewModules, ViewTransformer
    if isinstance(network, ViewModules):
        blocks = [m for m in network.modules() if isinstance(m, ViewTransformer)]
        for block in blocks:
            if not getattr(block, "_dp3d_checkpointed", False):
                _checkpointed_forward(block)
        return len(blocks)
    if not getattr(network, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(network).__name__} does not support gradient checkpointing")
    network.enable_gradient_checkpointing()
    return sum(1 for m in network.modules() if getattr(m, "gradient_checkpointing", False))


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, betas: tuple[float, float],
                   weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes' AdamW8bit: optimizer moments in 8 bits, ~75 % less
    optimizer memory; needs bitsandbytes, which also runs it on the CPU)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # ImportError, or a broken native library raising at import time
            raise OptimizerUnavailable(
                f"optimizer 'adamw8bit' needs the bitsandbytes package, which cannot be imported here ({exc}). "
                f"Install it into this environment (pip install bitsandbytes) or set \"optimizer\": \"adamw\"."
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
