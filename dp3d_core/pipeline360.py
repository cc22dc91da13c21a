"""DiffPortrait360 as a diffusers pipeline: one portrait -> a back view -> views all around the head.

Two model folders (``python -m dp3d_core.convert`` writes one per official checkpoint):

* the **back-head model** (``back_head-230000.th``; :class:`BackHeadPipeline`): the DiffPortrait3D design without
  view modules; it makes ONE view, the back of the head, from the portrait and the back camera's condition image;
* the **view model** (``model_state-340000.th``; :class:`DiffPortrait360Pipeline`): the DiffPortrait3D denoiser with
  20 view modules and TWO references in every reference attention, the portrait (front) and the back view.

:class:`DiffPortrait360Pipeline` runs both: the back view first (batch 1), then the requested views in overlapping
8-view windows with the same window/step machinery as :class:`~dp3d_core.pipeline.DiffPortrait3DPipeline` (blended
per step; ``closed_loop=True`` for a full turn, so windows wrap from the last view to the first). Fast path,
schedulers, memory options and cancel callbacks apply to both models.

Official behaviour kept (``../shared/fixtures/dp360_parity/README.md``): 50 DDIM steps, eta 0.5, guidance 3; the
noise schedule is float16 (quirks S1/S2; :class:`~dp3d_core.schedulers.Float16ScheduleDDIMScheduler` for DDIM, and
the float16 q_sample coefficients for the 3D-aware noise; DPM++ 2M / UniPC use the float32 schedule); the back
reference only on the conditional pass. The back view is decoded by the back-head model's VAE and encoded again
by the view model's (as the official scripts do through a PNG file), but kept in float precision instead of 8-bit.

Random draws, from one generator, in this order: the back stage's (its initial noise ``[1, 4, h, w]``, the VAE
posterior sample of the portrait, its scheduler noise), then the view stage's (as in DiffPortrait3DPipeline: the
initial noise, the VAE posterior samples of the portrait and of the back view, of the proxies, its scheduler noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .families import BACK_HEAD, FAMILY_360_BACK_HEAD, FAMILY_360_VIEWS, VIEWS, Family
from .model_folder import load_model_folder, save_model_folder
from .pipeline import DiffPortrait3DPipeline, ImageInput, PipelineError, image_size
from .schedulers import OfficialDDIMScheduler, make_scheduler

OFFICIAL_STEPS = 50
OFFICIAL_ETA = 0.5
OFFICIAL_GUIDANCE = 3.0


def _float16_ddim(scheduler: SchedulerMixin) -> SchedulerMixin:
    """The model folder's DDIM with DiffPortrait360's float16 schedule (other schedulers unchanged)."""
    if isinstance(scheduler, OfficialDDIMScheduler):
        return make_scheduler("ddim", dict(scheduler.config), float16_schedule=True)
    return scheduler


class _Float16Schedule:
    """Mixin for both models: the float16 noise schedule (named schedulers get it through ``float16_schedule``; the
    model folder's DDIM is replaced in ``__init__``) and saving with the family."""

    float16_schedule = True
    family: Family

    def save_pretrained(self, save_directory: Any, overwrite: bool = False, **kwargs: Any) -> None:
        """Write the model folder (with its family) that ``from_pretrained`` reads."""
        if kwargs:
            raise TypeError(f"unsupported argument(s) {sorted(kwargs)}")
        components = {k: v for k, v in self.components.items() if v is not None}
        save_model_folder(components, save_directory, overwrite=overwrite, family=self.family)


class BackHeadPipeline(_Float16Schedule, DiffPortrait3DPipeline):
    """DiffPortrait360's back-head model: the back view (one image per condition image) from the portrait."""

    family = FAMILY_360_BACK_HEAD

    def __init__(self, unet: Any, reference_unet: Any, view_controlnet: Any, vae: Any, scheduler: SchedulerMixin,
                 prompt_embedding: Any, view_modules: Any = None) -> None:
        if view_modules is not None:
            raise PipelineError("the back-head model has no view modules")
        super().__init__(unet=unet, reference_unet=reference_unet, view_controlnet=view_controlnet,
                         view_modules=None, vae=vae, scheduler=_float16_ddim(scheduler),
                         prompt_embedding=prompt_embedding)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype = torch.float32, **kwargs: Any) -> "BackHeadPipeline":
        """Load a DiffPortrait360 back-head model folder; nothing is downloaded."""
        if kwargs:
            raise TypeError(f"unsupported argument(s) {sorted(kwargs)}; this pipeline takes device and torch_dtype")
        return cls(**load_model_folder(pretrained_model_name_or_path, device=device, dtype=torch_dtype,
                                       family=FAMILY_360_BACK_HEAD))

    @property
    def clip_length(self) -> int:
        return 1  # no view modules: every view is denoised on its own

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        DiffusionPipeline.enable_model_cpu_offload(self, gpu_id=gpu_id, device=device)

    def __call__(self, reference_images: ImageInput | Sequence[ImageInput], condition_images: Any,
                 num_inference_steps: int = OFFICIAL_STEPS, guidance_scale: float = OFFICIAL_GUIDANCE,
                 eta: float = OFFICIAL_ETA, **kwargs: Any):
        """As :meth:`DiffPortrait3DPipeline.__call__` with the official DiffPortrait360 defaults; views are
        independent (window 1, no overlap, no proxies: the official back-head stage has no 3D-aware noise)."""
        kwargs.setdefault("window", 1)
        kwargs.setdefault("overlap", 0)
        return super().__call__(reference_images, condition_images, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, eta=eta, **kwargs)


@dataclass
class DiffPortrait360PipelineOutput(BaseOutput):
    """``images``: the requested views (PIL images, ``[N, H, W, 3]`` floats in [0, 1], or latents); ``back_image``:
    the back view the views were made with, ``[H, W, 3]`` floats in [0, 1]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    back_image: np.ndarray


# Options that apply to both models: DiffPortrait360Pipeline forwards them to its back-head pipeline.
_SHARED_OPTIONS = ("set_fast_path", "enable_vae_slicing", "disable_vae_slicing", "enable_vae_tiling",
                   "disable_vae_tiling", "enable_attention_slicing", "disable_attention_slicing",
                   "enable_channels_last", "enable_compile", "disable_compile", "enable_model_cpu_offload")


class DiffPortrait360Pipeline(_Float16Schedule, DiffPortrait3DPipeline):
    """Portrait + per-view camera conditions -> views all around the head (DiffPortrait360)."""

    family = FAMILY_360_VIEWS

    def __init__(self, unet: Any, reference_unet: Any, view_controlnet: Any, view_modules: Any, vae: Any,
                 scheduler: SchedulerMixin, prompt_embedding: Any, back_head: BackHeadPipeline | None = None) -> None:
        if getattr(getattr(view_modules, "config", None), "layout", None) != "diffportrait360":
            raise PipelineError("these view modules are not DiffPortrait360's (20 modules, no middle one); load a "
                                "DiffPortrait360 view model folder")
        super().__init__(unet=unet, reference_unet=reference_unet, view_controlnet=view_controlnet,
                         view_modules=view_modules, vae=vae, scheduler=_float16_ddim(scheduler),
                         prompt_embedding=prompt_embedding)
        self.back_head = back_head  # a plain attribute: a pipeline is not a registered component

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, back_head: Any = None,
                        device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "DiffPortrait360Pipeline":
        """Load a DiffPortrait360 view model folder and (``back_head``: its folder) the back-head model.

        Without a back-head model, every call must be given the back view (``back_image``).
        """
        if kwargs:
            raise TypeError(f"unsupported argument(s) {sorted(kwargs)}; this pipeline takes back_head, device and "
                            f"torch_dtype")
        head = None
        if back_head is not None:
            head = (back_head if isinstance(back_head, BackHeadPipeline)
                    else BackHeadPipeline.from_pretrained(back_head, device=device, torch_dtype=torch_dtype))
        return cls(**load_model_folder(pretrained_model_name_or_path, device=device, dtype=torch_dtype,
                                       family=FAMILY_360_VIEWS), back_head=head)

    def to(self, *args: Any, **kwargs: Any) -> "DiffPortrait360Pipeline":
        super().to(*args, **kwargs)
        if self.back_head is not None:
            self.back_head.to(*args, **kwargs)
        return self

    def _staged(self, callback: Callable | None, stage: str) -> Callable | None:
        """``callback_on_step_end`` for one stage: called with this pipeline and ``callback_kwargs["stage"]``."""
        if callback is None:
            return None

        def call(_pipe: Any, step: int, t: Any, callback_kwargs: dict[str, Any]) -> Any:
            return callback(self, step, t, {**callback_kwargs, "stage": stage})
        return call

    @torch.no_grad()
    def __call__(
        self,
        reference_image: ImageInput,
        condition_images: Sequence[ImageInput] | np.ndarray | torch.Tensor,
        back_condition_image: ImageInput | None = None,
        back_image: ImageInput | None = None,
        proxy_images: Sequence[ImageInput | None] | None = None,
        num_inference_steps: int = OFFICIAL_STEPS,
        guidance_scale: float = OFFICIAL_GUIDANCE,
        eta: float = OFFICIAL_ETA,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        scheduler: SchedulerMixin | str | None = None,
        closed_loop: bool = False,
        height: int | None = None,
        width: int | None = None,
        callback_on_step_end: Callable[..., dict | None] | None = None,
        callback_on_window: Callable[[int, int, int, int], dict | None] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DiffPortrait360PipelineOutput | tuple:
        """Generate one view per condition image, all around the head.

        Args:
            reference_image: the portrait (one image).
            condition_images: one camera-condition image per output view, in view order.
            back_condition_image: the condition image of the camera behind the head (yaw 180 degrees); the
                back-head model makes the back view from it. Not needed when ``back_image`` is given.
            back_image: a back view to use instead of running the back-head model.
            closed_loop: the views are a full turn; windows wrap around (the official run uses 32 views as four
                independent clips: ``closed_loop=True, overlap=0`` with 32 views gives exactly those clips).
            callback_on_step_end: as in DiffPortrait3DPipeline, called with this pipeline for both stages;
                ``callback_kwargs["stage"]`` is ``"back_head"`` or ``"views"``. ``callback_on_window`` is called
                for both stages too (the back stage: one window per step).
            Other arguments (window, overlap, share_noise, latents, sample_posterior, ...) as in
            :meth:`DiffPortrait3DPipeline.__call__`; they apply to the view stage (sample_posterior to both).
        """
        # the checks DiffPortrait3DPipeline makes, before the back stage is spent
        if isinstance(reference_image, (list, tuple)):
            raise PipelineError("DiffPortrait360 takes one portrait (reference_image), not a list")
        if condition_images is None or isinstance(condition_images, PIL.Image.Image) or len(condition_images) == 0:
            raise PipelineError("no condition images: give a list with one camera-condition image per output view")
        if proxy_images is not None and len(proxy_images) != len(condition_images):
            raise PipelineError(f"{len(proxy_images)} proxy images for {len(condition_images)} views; give one per "
                                f"view (or None)")
        if output_type not in ("pil", "np", "latent"):
            raise PipelineError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if back_image is None and (back_condition_image is None or self.back_head is None):
            raise PipelineError("the back view is needed: load the back-head model (from_pretrained(..., back_head="
                                "FOLDER)) and give back_condition_image, or give back_image")
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
        if height is None or width is None:
            h0, w0 = image_size(condition_images)
            height, width = height or h0, width or w0
        if back_image is None:
            back = self.back_head(reference_image, [back_condition_image], num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, eta=eta, generator=generator, scheduler=scheduler,
                                  height=height, width=width, output_type="np",
                                  sample_posterior=kwargs.get("sample_posterior", True),
                                  callback_on_step_end=self._staged(callback_on_step_end, BACK_HEAD),
                                  callback_on_window=callback_on_window)
            back_image = back.images[0]
        views = super().__call__(
            [reference_image, back_image], condition_images, proxy_images=proxy_images,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, generator=generator,
            scheduler=scheduler, closed_loop=closed_loop, height=height, width=width,
            callback_on_step_end=self._staged(callback_on_step_end, VIEWS), callback_on_window=callback_on_window,
            output_type=output_type, return_dict=True, **kwargs)
        back_array = self.to_image_tensor(back_image, (height, width), "back image")[0]
        back_array = ((back_array + 1) / 2).permute(1, 2, 0).numpy()
        if not return_dict:
            return (views.images, back_array)
        return DiffPortrait360PipelineOutput(images=views.images, back_image=back_array)


def _forward_to_back_head(name: str) -> Callable:
    base = getattr(DiffPortrait3DPipeline, name)

    def method(self: DiffPortrait360Pipeline, *args: Any, **kwargs: Any) -> None:
        base(self, *args, **kwargs)
        if self.back_head is not None:
            getattr(self.back_head, name)(*args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"{base.__doc__ or name} (Both models: the view model and the back-head model.)"
    return method


for _name in _SHARED_OPTIONS:
    setattr(DiffPortrait360Pipeline, _name, _forward_to_back_head(_name))
