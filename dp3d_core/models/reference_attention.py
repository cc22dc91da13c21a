"""Reference attention: F_ref writes its self-attention inputs into a bank, F reads them as extra keys/values.

Official behaviour (quirks 5-7): each of F_ref's spatial self-attentions records ``norm1(x)`` (exactly what enters
attn1) and runs normal attention; the F self-attention with the same forward index uses its own tokens as queries
and its OWN to_k/to_v applied to ``[own tokens, bank tokens]`` (token axis) as keys/values, per batch row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class ReferencePassComplete(Exception):
    """Raised inside F_ref once the last bank entry is written: the rest of F_ref cannot change the bank."""


class ReferenceBank:
    """The hand-over between F_ref and F: one entry per spatial self-attention, in forward order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: list[torch.Tensor | None] = [None] * size
        self.num_references = 1
        self.rows = 0  # rows written per reference: the batch, or 1 when shared by every row
        self.reading = False
        self.read_rows: int | None = None  # only the first read_rows batch rows read the bank (None: all)

    def start_writing(self, num_references: int, rows: int) -> None:
        self.entries = [None] * self.size
        self.num_references = num_references
        self.rows = rows
        self.reading = False

    def complete(self) -> bool:
        return all(e is not None for e in self.entries)

    def clear(self) -> None:
        self.entries = [None] * self.size
        self.reading = False
        self.read_rows = None

    def reading_rows(self, batch: int) -> int:
        """How many leading rows of an F batch of ``batch`` rows read the bank (the rest: plain self-attention)."""
        if not self.reading:
            return 0
        return batch if self.read_rows is None else min(self.read_rows, batch)

    def tokens_for(self, index: int, batch: int, expand: bool = True) -> torch.Tensor | None:
        """Bank tokens for F's batch rows: ``[batch, R * N, C]``, the R references of each row side by side.

        With ``expand=False`` a bank shared by every row comes back as one row ``[1, R * N, C]``.
        """
        if not self.reading:
            return None
        entry = self.entries[index]
        if entry is None:
            raise RuntimeError(f"reference bank entry {index} was never written; run the reference net first")
        r, rows = self.num_references, self.rows
        if rows not in (1, batch) or entry.shape[0] != r * rows:
            raise RuntimeError(f"reference bank entry {index} has {entry.shape[0]} rows, expected {r} x {batch}")
        n, c = entry.shape[1:]
        tokens = entry.reshape(r, rows, n, c).permute(1, 0, 2, 3).reshape(rows, r * n, c)
        return tokens.expand(batch, -1, -1) if expand and rows == 1 and batch > 1 else tokens


def _heads(attn: Attention, states: torch.Tensor) -> torch.Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]``."""
    return states.view(states.shape[0], -1, attn.heads, states.shape[-1] // attn.heads).transpose(1, 2)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
         slice_size: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, heads, N, d]``; ``slice_size`` rows per call (attention slicing)."""
    if not slice_size or slice_size >= query.shape[0]:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(query[i:i + slice_size], key[i:i + slice_size],
                                                     value[i:i + slice_size], dropout_p=0.0, is_causal=False,
                                                     scale=scale)
                      for i in range(0, query.shape[0], slice_size)])


def _project_out(attn: Attention, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3]).to(dtype)
    return attn.to_out[1](attn.to_out[0](out))


def attention(attn: Attention, hidden_states: torch.Tensor, kv_states: torch.Tensor,
              slice_size: int | None = None) -> torch.Tensor:
    """Multi-head attention of ``attn`` with queries from ``hidden_states``, keys/values from ``kv_states``."""
    query = _heads(attn, attn.to_q(hidden_states))
    key = _heads(attn, attn.to_k(kv_states))
    value = _heads(attn, attn.to_v(kv_states))
    return _project_out(attn, sdpa(query, key, value, attn.scale, slice_size), query.dtype)


def _check_plain(attn: Attention, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None \
            or attn.norm_q is not None or attn.residual_connection or attn.rescale_output_factor != 1.0:
        raise RuntimeError("reference attention expects a plain transformer self-attention (attn1)")


class BankWriteProcessor:
    """F_ref's attn1: record the input tokens, then ordinary self-attention."""

    def __init__(self, bank: ReferenceBank, index: int, stop_when_done: bool = True) -> None:
        self.bank = bank
        self.index = index
        self.stop_when_done = stop_when_done
        self.slice_size: int | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        _check_plain(attn, hidden_states)
        self.bank.entries[self.index] = hidden_states
        # Stop early only without autograd: under gradient checkpointing a recomputed block must not raise.
        # A compiled F_ref runs to its end instead: the raise would break its graph, and what follows the last
        # write (the last block's cross-attention and feed-forward, conv_out) is 5 % of F_ref at batch 1, 0.15 % of a
        # fast step at SD-1.5 size (torch's flop counter).
        if self.stop_when_done and self.index == self.bank.size - 1 and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            raise ReferencePassComplete
        return attention(attn, hidden_states, hidden_states, self.slice_size)


class BankReadProcessor:
    """F's attn1: keys/values from own tokens plus the bank tokens of the same row (plain when not reading).

    Only the first ``bank.read_rows`` rows read the bank (a batch of [conditional clip, unconditional clip]); the
    other rows get plain self-attention. to_k/to_v are linear per token, so the bank tokens are projected on
    their own, once per distinct bank row, and concatenated to the rows' own keys/values after projection.
    """

    def __init__(self, bank: ReferenceBank, index: int) -> None:
        self.bank = bank
        self.index = index
        self.slice_size: int | None = None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        _check_plain(attn, hidden_states)
        batch = hidden_states.shape[0]
        reading = self.bank.reading_rows(batch)
        if not reading:
            return attention(attn, hidden_states, hidden_states, self.slice_size)
        bank_tokens = self.bank.tokens_for(self.index, reading, expand=False).to(hidden_states.dtype)
        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(hidden_states))
        value = _heads(attn, attn.to_v(hidden_states))
        bank_key = _heads(attn, attn.to_k(bank_tokens)).expand(reading, -1, -1, -1)
        bank_value = _heads(attn, attn.to_v(bank_tokens)).expand(reading, -1, -1, -1)
        out = sdpa(query[:reading], torch.cat([key[:reading], bank_key], dim=2),
                   torch.cat([value[:reading], bank_value], dim=2), attn.scale, self.slice_size)
        if reading < batch:
            plain = sdpa(query[reading:], key[reading:], value[reading:], attn.scale, self.slice_size)
            out = torch.cat([out, plain])
        return _project_out(attn, out, query.dtype)


def self_attention_names(unet: torch.nn.Module) -> list[str]:
    """Processor names of the spatial self-attentions (attn1) of a diffusers UNet, in forward order."""
    names: list[str] = []

    def transformers(prefix: str, block: torch.nn.Module) -> None:
        for i, transformer in enumerate(getattr(block, "attentions", None) or []):
            for j, _ in enumerate(transformer.transformer_blocks):
                names.append(f"{prefix}.attentions.{i}.transformer_blocks.{j}.attn1.processor")

    for b, block in enumerate(unet.down_blocks):
        transformers(f"down_blocks.{b}", block)
    transformers("mid_block", unet.mid_block)
    for b, block in enumerate(unet.up_blocks):
        transformers(f"up_blocks.{b}", block)
    return names


def install_bank_processors(unet: torch.nn.Module, bank: ReferenceBank, mode: str) -> None:
    """Set write (``mode='write'``, on F_ref) or read (``'read'``, on F) processors on every attn1."""
    names = self_attention_names(unet)
    if len(names) != bank.size:
        raise ValueError(f"the UNet has {len(names)} self-attentions but the bank has {bank.size} entries")
    processors = dict(unet.attn_processors)
    for index, name in enumerate(names):
        if name not in processors:
            raise ValueError(f"UNet has no attention processor {name}")
        processors[name] = BankWriteProcessor(bank, index) if mode == "write" else BankReadProcessor(bank, index)
    unet.set_attn_processor(processors)
