"""The DiffPortrait3D denoiser: locked F + reference net F_ref + pose/view ControlNet F_cam + view modules."""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from .reference_attention import ReferenceBank, ReferencePassComplete, install_bank_processors, self_attention_names
from .view_modules import ViewModules, ViewState


class ModelInputError(ValueError):
    """Inputs the denoiser cannot use (wrong batch size, shapes or channel counts)."""


def _rows_identical(tensor: torch.Tensor) -> bool:
    return tensor.shape[0] == 1 or bool(torch.equal(tensor, tensor[:1].expand_as(tensor)))


class DiffPortrait3DDenoiser(nn.Module):
    """eps prediction exactly as the official ``ControlLDMReferenceOnlyPose.apply_model``.

    ``eps_cond``: F_ref runs on the clean reference latent(s) at the current timestep and fills the attention bank;
    F_cam turns the camera-condition image into 13 residuals; F reads the bank in every spatial self-attention,
    adds the residuals, and runs the view modules (not the middle one). ``eps_uncond``: F alone with plain
    self-attention, no residuals, all view modules including the middle one.

    The same class serves DiffPortrait360: its view model is this denoiser with view modules in the
    "diffportrait360" layout (no middle module) and two references per row (front, back: the bank holds the
    front tokens then the back tokens); its back-head model has no view modules (``view_modules=None``, clip
    length 1) and one reference.
    """

    def __init__(self, unet: UNet2DConditionModel, reference_unet: UNet2DConditionModel,
                 view_controlnet: ControlNetModel, view_modules: ViewModules | None, clip_length: int = 8) -> None:
        super().__init__()
        self.unet = unet
        self.reference_unet = reference_unet
        self.view_controlnet = view_controlnet
        self.view_modules = view_modules
        self.clip_length = int(clip_length)
        self.share_identical_references = True  # run F_ref once when all rows share reference, t and context
        self.unet.requires_grad_(False)  # F is the locked SD UNet
        size = len(self_attention_names(unet))
        if len(self_attention_names(reference_unet)) != size:
            raise ValueError("the reference net and the UNet must have the same transformer layout")
        self.bank = ReferenceBank(size)
        self.view_state = ViewState(clip_length=self.clip_length)
        self._bind()

    def _bind(self) -> None:
        """Make the networks' processors and view hooks this denoiser's.

        Several denoisers may be built over the same networks (e.g. a pipeline rebuilt from cached components);
        the last one to run owns them, and any earlier hooks are removed so view modules never run twice.
        """
        owner = getattr(self.unet, "_dp3d_owner", None)
        ref_owner = getattr(self.reference_unet, "_dp3d_owner", None)
        if owner is not None and owner() is self and ref_owner is not None and ref_owner() is self:
            return
        for handle in getattr(self.unet, "_dp3d_hooks", []):
            handle.remove()
        install_bank_processors(self.reference_unet, self.bank, "write")
        install_bank_processors(self.unet, self.bank, "read")
        self.unet._dp3d_hooks = ([] if self.view_modules is None
                                 else self.view_modules.attach(self.unet, self.view_state))
        self.unet._dp3d_owner = weakref.ref(self)
        self.reference_unet._dp3d_owner = weakref.ref(self)

    # ----------------------------------------------------------------------------------------- input checks
    def _check_latent(self, x: torch.Tensor, name: str = "x") -> None:
        channels = self.unet.config.in_channels
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ModelInputError(f"{name} must be a latent tensor [B, {channels}, h, w], got "
                                  f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != channels:
            raise ModelInputError(f"{name} has {x.shape[1]} channels; the model's latents have {channels}")
        if x.shape[0] == 0 or x.shape[0] % self.clip_length:
            raise ModelInputError(f"{name} has batch {x.shape[0]}: the batch must be whole clips of "
                                  f"{self.clip_length} views (a multiple of {self.clip_length})")

    def _timesteps(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point():
            raise ModelInputError("timesteps must be integers (0..999)")
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ModelInputError(f"timesteps must be one int or a LongTensor [{batch}], got shape {tuple(t.shape)}")
        return t.long()

    def _context(self, context: torch.Tensor, batch: int) -> torch.Tensor:
        dim = self.unet.config.cross_attention_dim
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != dim:
            raise ModelInputError(f"context must be [B or 1, 77, {dim}], got {getattr(context, 'shape', None)}")
        if context.shape[0] == 1:
            return context.expand(batch, -1, -1)
        if context.shape[0] != batch:
            raise ModelInputError(f"context has batch {context.shape[0]}; expected 1 or {batch}")
        return context

    # ----------------------------------------------------------------------------------------- passes
    def write_reference_bank(self, reference_latents: Sequence[torch.Tensor], t: torch.Tensor,
                             context: torch.Tensor) -> None:
        """Run F_ref on the clean reference latent(s) at timestep ``t`` and fill the bank.

        When every row gets the same reference, timestep and context (the usual case: one reference image for all
        views), F_ref runs on a single row and the bank is shared; rows are independent in F_ref, so this is exact.
        """
        refs = list(reference_latents)
        count = len(refs)
        if self.share_identical_references and _rows_identical(t) and _rows_identical(context) \
                and all(_rows_identical(r) for r in refs):
            refs, t, context = [r[:1] for r in refs], t[:1], context[:1]
        self.bank.start_writing(count, rows=t.shape[0])
        x = refs[0] if count == 1 else torch.cat(refs, dim=0)
        try:
            self.reference_unet(x, t.repeat(count), encoder_hidden_states=context.repeat(count, 1, 1),
                                return_dict=False)
        except ReferencePassComplete:
            pass
        if not self.bank.complete():
            raise RuntimeError("the reference net did not fill every attention-bank entry")

    def _conditional_inputs(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
                            reference_latents: torch.Tensor | Sequence[torch.Tensor], condition: torch.Tensor
                            ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Checked conditional-pass inputs: (reference latents per row, timesteps [B], context [B, 77, D])."""
        self._check_latent(x)
        batch, _, h, w = x.shape
        refs = [reference_latents] if isinstance(reference_latents, torch.Tensor) else list(reference_latents)
        if not refs:
            raise ModelInputError("at least one reference latent is needed for the conditional pass")
        for i, ref in enumerate(refs):
            if not isinstance(ref, torch.Tensor) or ref.ndim != 4 or ref.shape[1:] != x.shape[1:]:
                raise ModelInputError(f"reference latent {i} must be [{batch}, {x.shape[1]}, {h}, {w}] like x, got "
                                      f"{getattr(ref, 'shape', None)}")
            if ref.shape[0] == 1:
                refs[i] = ref.expand(batch, -1, -1, -1)
            elif ref.shape[0] != batch:
                raise ModelInputError(f"reference latent {i} has batch {ref.shape[0]}; expected 1 or {batch}")
        cond_ch = self.view_controlnet.config.conditioning_channels
        if not isinstance(condition, torch.Tensor) or condition.ndim != 4 or condition.shape[1] != cond_ch:
            raise ModelInputError(f"condition must be an image tensor [B, {cond_ch}, 8h, 8w], got "
                                  f"{getattr(condition, 'shape', None)}")
        if condition.shape[0] != batch:
            raise ModelInputError(f"condition has batch {condition.shape[0]}; expected {batch} (one per view)")
        if tuple(condition.shape[2:]) != (8 * h, 8 * w):
            raise ModelInputError(f"condition images are {condition.shape[2]}x{condition.shape[3]} but must be 8x the "
                                  f"latent size, {8 * h}x{8 * w}")
        return refs, self._timesteps(t, batch, x.device), self._context(context, batch)

    def _prepare_conditional(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                             refs: Sequence[torch.Tensor], condition: torch.Tensor):
        """Fill the reference bank (F_ref), switch F to reading it, and return F_cam's (down, mid) residuals."""
        self.write_reference_bank(refs, t, context)
        down, mid = self.view_controlnet(x, t, encoder_hidden_states=context, controlnet_cond=condition,
                                         return_dict=False)
        self.bank.reading = True
        return down, mid

    def eps_cond(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
                 reference_latents: torch.Tensor | Sequence[torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
        """Conditional eps: x [B,4,h,w] (B = clips x 8, rows = views), condition [B,3,8h,8w] in [-1, 1]."""
        refs, t, context = self._conditional_inputs(x, t, context, reference_latents, condition)
        self._bind()
        try:
            down, mid = self._prepare_conditional(x, t, context, refs, condition)
            self.view_state.middle_enabled = False
            return self.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, return_dict=False)[0]
        finally:
            self.bank.clear()

    def eps_uncond(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The official "unconditional" eps: F only, no reference, no camera control, middle view module on."""
        self._check_latent(x)
        batch = x.shape[0]
        t = self._timesteps(t, batch, x.device)
        context = self._context(context, batch)
        self._bind()
        self.bank.clear()
        self.view_state.middle_enabled = True
        try:
            return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        finally:
            self.view_state.middle_enabled = False

    # ----------------------------------------------------------------------------------------- fast path
    def _passes_overridden(self) -> bool:
        """True when eps_cond/eps_uncond were replaced (subclass, wrapper, spy): the fused pass would bypass them."""
        cls = type(self)
        return ("eps_cond" in self.__dict__ or "eps_uncond" in self.__dict__
                or cls.eps_cond is not DiffPortrait3DDenoiser.eps_cond
                or cls.eps_uncond is not DiffPortrait3DDenoiser.eps_uncond)

    def eps_guided(self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor,
                   reference_latents: torch.Tensor | Sequence[torch.Tensor], condition: torch.Tensor,
                   guidance_scale: float, batch_passes: bool = True) -> torch.Tensor:
        """Guided eps ``e_u + g (e_c - e_u)`` (float32), the same result as the official two passes, faster.

        F_ref runs once per distinct reference row (once for a shared reference); F_cam runs on the conditional
        rows only (the official sampler evaluates it on the unconditional pass too, and drops it). With
        ``batch_passes`` both passes are ONE call of F on ``[x; x]``: the first clip reads the bank and gets the
        control residuals, the second gets plain self-attention, zero residuals (x + 0 is exact) and is the only
        one the middle view module sees. View modules act per clip and every other layer per row, so each half
        equals its own pass. g = 1 skips the unconditional pass, g = 0 the conditional one (as the official
        combination reduces to them). ``batch_passes=False`` runs the two passes one after the other (half the
        activation memory).
        """
        g = float(guidance_scale)
        if self._passes_overridden():
            e = self.eps_cond(x, t, context, reference_latents, condition).float()
            if g == 1.0:
                return e
            e_u = self.eps_uncond(x, t, context).float()
            return e_u + g * (e - e_u)
        if g == 0.0:
            return self.eps_uncond(x, t, context).float()
        refs, t, context = self._conditional_inputs(x, t, context, reference_latents, condition)
        batch = x.shape[0]
        self._bind()
        try:
            down, mid = self._prepare_conditional(x, t, context, refs, condition)
            if g == 1.0 or not batch_passes:
                self.view_state.middle_enabled = False
                e = self.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid, return_dict=False)[0].float()
                if g == 1.0:
                    return e
                del down, mid
                self.bank.clear()
                self.view_state.middle_enabled = True
                e_u = self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0].float()
            else:
                self.bank.read_rows = batch
                self.view_state.middle_enabled = True
                self.view_state.middle_from_row = batch
                both = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([context, context]),
                                 down_block_additional_residuals=[torch.cat([r, torch.zeros_like(r)]) for r in down],
                                 mid_block_additional_residual=torch.cat([mid, torch.zeros_like(mid)]),
                                 return_dict=False)[0].float()
                e, e_u = both[:batch], both[batch:]
            return e_u + g * (e - e_u)
        finally:
            self.bank.clear()
            self.view_state.middle_enabled = False
            self.view_state.middle_from_row = 0

    def compile_networks(self, **compile_kwargs) -> None:
        """``torch.compile`` F, F_ref and F_cam in place (module identity, hooks and processors are kept).

        Each network traces to ONE graph: the processors and view hooks are traced through, and a compiled F_ref
        runs to its end instead of raising after its last bank write. ``dynamic=False`` by default: the row
        counts differ between F_ref (1), F_cam (8) and F (16), and one static graph per shape compiles much
        faster than dynamo's symbolic-shape retrace of a whole UNet.
        """
        compile_kwargs.setdefault("dynamic", False)
        for net in (self.unet, self.reference_unet, self.view_controlnet):
            net.compile(**compile_kwargs)

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Attention slicing in the reference/self-attentions of F and F_ref: ``slice_size`` rows per SDPA call
        (None: off). Cross-attention and view-module attention are sliced by diffusers' own processors."""
        self._bind()
        for net in (self.unet, self.reference_unet):
            for processor in net.attn_processors.values():
                if hasattr(processor, "slice_size") and hasattr(processor, "bank"):
                    processor.slice_size = slice_size
