"""DiffPortrait3D as a diffusers pipeline: one portrait + camera condition images -> novel views.

Sequences of any length. The model denoises clips of ``window`` views (8, its motion modules'
clip length). Longer sequences are covered by overlapping windows; at EVERY denoising step all
windows are evaluated and their noise predictions blended per view (triangular weights, so a
window's edge views count less than its centre) before one scheduler step on the whole
sequence. The sequence thus follows one denoising trajectory, with no seams between chunks.
A sequence shorter than the window is padded by repeating its last view; padded slots only
serve as context (weight 0) and are dropped from the output.

Random draws, all from one generator (``generator`` or ``seed``, CPU, so a seed gives the same
result on every device), in this order: the initial noise ``[N, 4, h, w]`` (``[1, ...]``
repeated when ``share_noise``), then the VAE posterior samples of the references, then of the
proxies, then the scheduler's own noise (eta > 0).

Cancelling: ``callback_on_step_end`` (called after every step) and ``callback_on_window``
(called after every window evaluation) may return ``{"cancel": True}``; the pipeline then
raises :class:`Cancelled`, which carries the denoising state of the last completed step.
Raising :class:`Cancelled` from a callback has the same effect.

Resuming: after every step ``callback_on_step_end`` gets the full
:class:`~dp3d_core.denoise_state.DenoisingState` (latents of all views, reference latents, scheduler
state, generator state); passing such a state back as ``state=`` continues the run from its step, with
a result identical to the uninterrupted run (:mod:`dp3d_core.denoise_state` saves and loads states).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .denoise_state import DenoisingState, StateError, restore_scheduler, scheduler_state
from .models.config import CLIP_LENGTH
from .models.denoiser import DiffPortrait3DDenoiser
from .schedulers import AWARE_NOISE_TIMESTEP, aware_initial_latent, make_scheduler

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


class PipelineError(ValueError):
    """Inputs the pipeline cannot use; the message says what to change."""


class Cancelled(Exception):
    """Raised when a callback asked to stop; no output is produced.

    ``step``: the 0-based step that was running. ``state``: the :class:`DenoisingState` after the last
    completed step (live tensors, unchanged since the pipeline stopped), from which ``state=`` resumes.
    """

    def __init__(self, step: int, state: DenoisingState | None = None) -> None:
        super().__init__(f"cancelled at denoising step {step}")
        self.step = step
        self.state = state


@dataclass
class DiffPortrait3DPipelineOutput(BaseOutput):
    """``images``: list of PIL images, ``[N, H, W, 3]`` float array in [0, 1], or latents ``[N, 4, h, w]``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def plan_windows(num_views: int, window: int, overlap: int, closed_loop: bool = False) -> list[list[int]]:
    """View indices of each window. Short sequences are padded with their last view.

    ``closed_loop`` (a full turn): indices wrap around, so the last windows hold the last views followed by the
    first ones (and short sequences are padded with views from their start): view N-1 and view 0 are neighbours.
    """
    if num_views < 1:
        raise PipelineError("at least one condition image is needed (one per output view)")
    if not 0 <= overlap < window:
        raise PipelineError(f"overlap must be in 0..{window - 1} (window {window}), got {overlap}")
    if closed_loop:
        stride = window - overlap
        count = 1 if num_views <= window else -(-num_views // stride)
        return [[(s * stride + k) % num_views for k in range(window)] for s in range(count)]
    if num_views <= window:
        return [list(range(num_views)) + [num_views - 1] * (window - num_views)]
    stride = window - overlap
    starts = list(range(0, num_views - window, stride)) + [num_views - window]
    return [list(range(s, s + window)) for s in starts]


def image_size(images: ImageInput | Sequence[ImageInput]) -> tuple[int, int]:
    """(height, width) of an image, or of the first of several."""
    first = images if isinstance(images, PIL.Image.Image) else images[0]
    if isinstance(first, PIL.Image.Image):
        return first.size[1], first.size[0]
    if isinstance(first, np.ndarray):
        return first.shape[0], first.shape[1]
    return first.shape[-2], first.shape[-1]


def window_weights(windows: list[list[int]], num_views: int, window: int) -> torch.Tensor:
    """Blend weights ``[num_windows, window]``: triangular, 0 on padding slots, summing to 1 per view."""
    tri = torch.tensor([min(k + 1, window - k) for k in range(window)], dtype=torch.float64)
    w = torch.zeros(len(windows), window, dtype=torch.float64)
    for i, views in enumerate(windows):
        seen: set[int] = set()
        for k, v in enumerate(views):
            if v not in seen:
                w[i, k] = tri[k]
                seen.add(v)
    total = torch.zeros(num_views, dtype=torch.float64)
    for i, views in enumerate(windows):
        total.index_add_(0, torch.tensor(views), w[i])
    for i, views in enumerate(windows):
        w[i] = w[i] / total[torch.tensor(views)]
    return w.float()


class DiffPortrait3DPipeline(DiffusionPipeline):
    """Reference portrait + per-view camera conditions -> 3D-consistent views (DiffPortrait3D)."""

    model_cpu_offload_seq = "reference_unet->view_controlnet->unet->vae"
    _optional_components: list[str] = []
    float16_schedule = False  # DiffPortrait360: the model's noise schedule is float16 (see schedulers.py)

    def __init__(self, unet: Any, reference_unet: Any, view_controlnet: Any, view_modules: Any, vae: Any,
                 scheduler: SchedulerMixin, prompt_embedding: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, reference_unet=reference_unet, view_controlnet=view_controlnet,
                              view_modules=view_modules, vae=vae, scheduler=scheduler,
                              prompt_embedding=prompt_embedding)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.fast_path = True        # eps_guided (fused passes); False: the two official passes one by one
        self.batch_passes = True     # fast path: conditional + unconditional pass in one call of F
        self.vae_batch_size = CLIP_LENGTH  # views per VAE decode call (1 = VAE slicing)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype = torch.float32, **kwargs: Any) -> "DiffPortrait3DPipeline":
        """Load a local model folder (see :mod:`dp3d_core.model_folder`); nothing is downloaded.

        Raises ``ModelFolderError`` naming a missing or broken component, or a folder of another model family.
        """
        from .families import FAMILY_3D
        from .model_folder import load_model_folder

        if kwargs:
            raise TypeError(f"unsupported argument(s) {sorted(kwargs)}; this pipeline takes device and torch_dtype")
        return cls(**load_model_folder(pretrained_model_name_or_path, device=device, dtype=torch_dtype,
                                       family=FAMILY_3D))

    def save_pretrained(self, save_directory: Any, overwrite: bool = False, **kwargs: Any) -> None:
        """Write the pipeline as a model folder (the format ``from_pretrained`` reads)."""
        from .model_folder import save_model_folder

        if kwargs:
            raise TypeError(f"unsupported argument(s) {sorted(kwargs)}")
        save_model_folder(self.components, save_directory, overwrite=overwrite)

    # ------------------------------------------------------------ parts

    @property
    def clip_length(self) -> int:
        cfg = getattr(self.view_modules, "config", None)
        return int(getattr(cfg, "clip_length", None) or CLIP_LENGTH) if cfg is not None else CLIP_LENGTH

    @property
    def denoiser(self) -> DiffPortrait3DDenoiser:
        """The networks wired together (built once: it installs attention processors and hooks)."""
        d = self.__dict__.get("_denoiser")
        if d is None or d.unet is not self.unet or d.view_modules is not self.view_modules:
            d = DiffPortrait3DDenoiser(self.unet, self.reference_unet, self.view_controlnet, self.view_modules,
                                       clip_length=self.clip_length)
            self.__dict__["_denoiser"] = d
        return d

    def empty_prompt(self) -> torch.Tensor:
        """The precomputed empty-prompt context ``[1, 77, D]`` on the pipeline's device."""
        pe = self.prompt_embedding
        emb = pe() if callable(pe) else pe.embedding
        return emb.to(self._execution_device, self.unet.dtype)

    def size_multiple(self) -> int:
        """Image sizes must be a multiple of this (VAE factor x the UNet's total downsampling)."""
        levels = len(getattr(self.unet.config, "block_out_channels", (0, 0, 0, 0)))
        return self.vae_scale_factor * 2 ** max(levels - 1, 0)

    def to_image_tensor(self, images: ImageInput | Sequence[ImageInput], size: tuple[int, int],
                        what: str) -> torch.Tensor:
        """Images -> float32 ``[N, 3, H, W]`` in [-1, 1] at ``size`` (H, W), on the CPU.

        Accepts PIL images, float arrays ``HxWx3`` / ``NxHxWx3`` in [0, 1] (uint8 arrays in 0..255),
        and tensors ``[3, H, W]`` / ``[N, 3, H, W]`` in [0, 1].
        """
        if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            items: list[Any] = [images]
            if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
                items = list(images)
        else:
            items = list(images)
        out = []
        for i, im in enumerate(items):
            if isinstance(im, PIL.Image.Image):
                t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            elif isinstance(im, np.ndarray):
                a = im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else im.astype(np.float32)
                if a.ndim != 3 or a.shape[2] != 3:
                    raise PipelineError(f"{what} {i}: expected an HxWx3 array, got shape {im.shape}")
                t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
            elif isinstance(im, torch.Tensor):
                if im.ndim != 3 or im.shape[0] != 3:
                    raise PipelineError(f"{what} {i}: expected a [3, H, W] tensor, got {tuple(im.shape)}")
                t = im.detach().float().cpu()
            else:
                raise PipelineError(f"{what} {i}: unsupported image type {type(im).__name__}")
            if tuple(t.shape[1:]) != tuple(size):
                t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            out.append(t.clamp(0, 1) * 2 - 1)
        if not out:
            raise PipelineError(f"no {what} given")
        return torch.stack(out)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None,
                      sample_posterior: bool = True) -> torch.Tensor:
        """VAE latents x scaling factor of ``[N, 3, H, W]`` images in [-1, 1] (posterior sample or mean)."""
        vae = self.vae
        latents = []
        for img in images:
            dist = vae.encode(img[None].to(self._execution_device, vae.dtype)).latent_dist
            z = dist.sample(generator) if sample_posterior else dist.mean
            latents.append(z)
        return torch.cat(latents).float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """``[N, 4, h, w]`` latents -> ``[N, H, W, 3]`` float32 in [0, 1], ``vae_batch_size`` views per call."""
        out = []
        step = max(1, int(self.vae_batch_size))
        device = self._execution_device
        for i in range(0, latents.shape[0], step):
            z = latents[i:i + step].to(device) / self.vae.config.scaling_factor
            img = self.vae.decode(z.to(self.vae.dtype)).sample
            if not torch.isfinite(img).all() and self.vae.dtype != torch.float32:
                # half-precision VAEs can overflow on some latents; redo these views in float32
                half = self.vae.dtype
                self.vae.float()
                try:
                    img = self.vae.decode(z.float()).sample
                finally:
                    self.vae.to(half)
            out.append(((img.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    # ------------------------------------------------------------ speed and memory options

    def set_fast_path(self, enabled: bool = True, batch_passes: bool = True) -> None:
        """Fast path (default): :meth:`DiffPortrait3DDenoiser.eps_guided`, same result as the official schedule.
        ``batch_passes=False`` keeps the fast path but runs the two guidance passes one after the other
        (less activation memory); ``enabled=False`` calls ``eps_cond`` and ``eps_uncond`` as the official code."""
        self.fast_path = bool(enabled)
        self.batch_passes = bool(batch_passes)

    def enable_vae_slicing(self) -> None:
        """Decode one view at a time."""
        self.vae_batch_size = 1

    def disable_vae_slicing(self) -> None:
        self.vae_batch_size = CLIP_LENGTH

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images in overlapping tiles (diffusers' AutoencoderKL tiling)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Self/reference attention of F and F_ref in slices of ``slice_size`` batch rows ("auto": 1).

        diffusers' own ``set_attention_slice`` would replace the reference-attention processors, so it is not
        used; the other attentions (77 text tokens, 8 views) are small next to the 2N-token reference attention.
        """
        size = 1 if slice_size in ("auto", "max") else slice_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise PipelineError(f"attention slice size must be a positive integer, 'auto' or None, got {slice_size!r}")
        self.denoiser.set_attention_slice(size)

    def disable_attention_slicing(self) -> None:
        self.denoiser.set_attention_slice(None)

    def enable_channels_last(self) -> None:
        """Channels-last memory format for the convolution-heavy networks (faster convolutions on GPUs)."""
        for name in ("unet", "reference_unet", "view_controlnet", "vae"):
            getattr(self, name).to(memory_format=torch.channels_last)

    def enable_compile(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` F, F_ref and F_cam in place (see ``DiffPortrait3DDenoiser.compile_networks``)."""
        self.denoiser.compile_networks(**compile_kwargs)

    def disable_compile(self) -> None:
        """Back to the eager networks (torch has no public undo of ``nn.Module.compile``; it sets this field)."""
        for name in ("unet", "reference_unet", "view_controlnet"):
            getattr(self, name)._compiled_call_impl = None

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model CPU offload, with the view modules moved together with F (they run inside F's forward
        through hooks, so they never trigger an offload hook of their own)."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        view_modules, unet = self.view_modules, self.unet
        for hook in list(self._all_hooks):
            if hook.model is view_modules:
                hook.remove()
                self._all_hooks.remove(hook)
        view_modules.to("cpu")
        target = self._offload_device
        unet_hook = next(h for h in self._all_hooks if h.model is unet)
        offload_unet = unet_hook.offload

        def offload_both() -> None:
            offload_unet()
            view_modules.to("cpu")
        unet_hook.offload = offload_both
        old = getattr(self, "_dp3d_view_follow", None)
        if old is not None:
            old.remove()

        def bring_view_modules(module: torch.nn.Module, args: Any) -> None:
            view_modules.to(target)
        self._dp3d_view_follow = unet.register_forward_pre_hook(bring_view_modules)

    def initial_latents(self, noise: torch.Tensor, proxy_latents: torch.Tensor | None,
                        has_proxy: Sequence[bool], scheduler: SchedulerMixin) -> torch.Tensor:
        """x_T: ``sqrt(acp[999]) * E(proxy) + sqrt(1 - acp[999]) * noise`` for views with a proxy, plain noise
        for the rest; both scaled by ``scheduler.init_noise_sigma`` (1 for DDIM, DPM++ and UniPC)."""
        x = noise.clone()
        if proxy_latents is not None and any(has_proxy):
            idx = torch.tensor([i for i, h in enumerate(has_proxy) if h])
            acp = getattr(scheduler, "alphas_cumprod", None)
            if acp is None:
                acp = self.scheduler.alphas_cumprod
            x[idx] = aware_initial_latent(proxy_latents.to(noise.device, noise.dtype), noise[idx], acp,
                                          AWARE_NOISE_TIMESTEP, float16_schedule=self.float16_schedule)
        return x * float(scheduler.init_noise_sigma)

    def scheduler_for(self, num_inference_steps: int, scheduler: SchedulerMixin | str | None = None) -> SchedulerMixin:
        """A fresh copy of the scheduler a run with these settings uses, its timesteps set: ``len(.timesteps)`` is
        the run's number of steps (the official DDIM spacing can give more than ``num_inference_steps``)."""
        sched = copy.deepcopy(self._scheduler(scheduler))
        sched.set_timesteps(num_inference_steps)
        return sched

    def _scheduler(self, scheduler: SchedulerMixin | str | None) -> SchedulerMixin:
        if scheduler is None:
            return self.scheduler
        if isinstance(scheduler, str):
            return make_scheduler(scheduler, dict(self.scheduler.config), float16_schedule=self.float16_schedule)
        return scheduler

    def _prepare_latents(self, reference_images: Any, proxy_images: Sequence[ImageInput | None] | None,
                         shape: tuple[int, int, int, int], size: tuple[int, int], latents: torch.Tensor | None,
                         share_noise: bool, generator: torch.Generator, sample_posterior: bool,
                         sched: SchedulerMixin) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T of all views and the reference latents; the random draws in the documented order."""
        device, dtype = self._execution_device, self.unet.dtype
        n = shape[0]
        if latents is None:
            noise_shape = (1 if share_noise else n, *shape[1:])
            noise = torch.randn(noise_shape, generator=generator, dtype=torch.float32).expand(n, -1, -1, -1)
        else:
            if tuple(latents.shape) != shape:
                raise PipelineError(f"latents must be [{', '.join(map(str, shape))}], got {tuple(latents.shape)}")
            noise = latents.float()
        noise = noise.to(device).contiguous()
        refs = self.to_image_tensor(reference_images, size, "reference image")
        ref_latents = self.encode_images(refs, generator, sample_posterior).to(device, dtype)
        has_proxy = [p is not None for p in (proxy_images or [None] * n)]
        proxy_latents = None
        if any(has_proxy):
            proxies = self.to_image_tensor([p for p in proxy_images if p is not None], size, "proxy image")
            proxy_latents = self.encode_images(proxies, generator, sample_posterior)
        return self.initial_latents(noise, proxy_latents, has_proxy, sched), ref_latents

    def _check_state(self, state: DenoisingState, shape: tuple[int, int, int, int], total_steps: int,
                     sched: SchedulerMixin) -> None:
        """Refuse a state that does not belong to a run with these arguments."""
        if state.scheduler_class != type(sched).__name__:
            raise PipelineError(f"the state comes from the {state.scheduler_class} scheduler, this run uses "
                                f"{type(sched).__name__}")
        if state.total_steps != total_steps:
            raise PipelineError(f"the state comes from a run of {state.total_steps} steps, this one has {total_steps}")
        if not 0 <= state.step <= total_steps:
            raise PipelineError(f"the state's step {state.step} is outside 0..{total_steps}")
        if tuple(state.latents.shape) != shape:
            raise PipelineError(f"the state's latents are {list(state.latents.shape)}, this run needs {list(shape)}")
        ref = state.reference_latents
        if ref.ndim != 4 or ref.shape[0] < 1 or tuple(ref.shape[1:]) != shape[1:]:
            raise PipelineError(f"the state's reference latents {list(ref.shape)} do not fit latents {list(shape)}")
        if state.generator is None:
            raise PipelineError("the state lacks the random generator's state")

    # ------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        reference_images: ImageInput | Sequence[ImageInput],
        condition_images: Sequence[ImageInput] | np.ndarray | torch.Tensor,
        proxy_images: Sequence[ImageInput | None] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        scheduler: SchedulerMixin | str | None = None,
        window: int | None = None,
        overlap: int = 4,
        closed_loop: bool = False,
        share_noise: bool = False,
        latents: torch.Tensor | None = None,
        state: DenoisingState | None = None,
        height: int | None = None,
        width: int | None = None,
        sample_posterior: bool = True,
        callback_on_step_end: Callable[..., dict | None] | None = None,
        callback_on_window: Callable[[int, int, int, int], dict | None] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> DiffPortrait3DPipelineOutput | tuple:
        """Generate one view per condition image.

        Args:
            reference_images: the portrait (or a list of portraits of the same person).
            condition_images: one camera-condition image per output view, in view order.
            proxy_images: optional, one per view (entries may be None): renders of a proxy head at each
                view; their latents seed the initial noise (3D-aware noise, official ``q_sample(., 999)``).
            guidance_scale: official CFG, ``eps_u + g (eps_c - eps_u)``; at 1 the unconditional pass is skipped.
            window, overlap: views per model call (default: the model's clip length) and shared views.
            closed_loop: the views are a full turn: windows wrap around from the last view to the first.
            share_noise: one initial noise for all views (before the proxies are mixed in).
            latents: the initial noise ``[N, 4, h, w]`` instead of drawing it (then nothing is drawn for it).
            state: continue a run from this :class:`DenoisingState` (as handed to ``callback_on_step_end`` or
                carried by :class:`Cancelled`) instead of starting it: nothing is drawn or encoded; the latents,
                reference latents, scheduler history and generator state come from ``state`` and the loop starts
                at ``state.step``. The other arguments must be those of the interrupted run (same conditions,
                steps, scheduler, eta, guidance, window); the result is then identical to the uninterrupted run.
                Raises :class:`PipelineError` when the state does not fit (other shape, step count, scheduler).
            height, width: output size (default: the first condition image's size).
            sample_posterior: encode with VAE posterior samples (official) instead of the mean.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs) -> dict | None`` after each step;
                callback_kwargs holds ``latents`` (may be replaced via the returned dict), ``num_windows``,
                ``num_steps``, ``pred_x0`` (the clean latents ``[N, 4, h, w]`` this step predicts, for previews)
                and ``state``: the :class:`DenoisingState` after this step (None for a scheduler whose state
                cannot be captured). It references the live tensors: use it (save it, or keep
                ``state.detached()``) before returning.
            callback_on_window: ``f(step, num_steps, window_index, num_windows) -> dict | None`` after each
                window evaluation (steps and windows count from 0; num_steps is the real number of steps).
            output_type: "pil", "np" or "latent".
        """
        if output_type not in ("pil", "np", "latent"):
            raise PipelineError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if condition_images is None or (not isinstance(condition_images, (np.ndarray, torch.Tensor))
                                        and len(condition_images) == 0):
            raise PipelineError("no condition images: give one camera-condition image per output view")
        if num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        clip = self.clip_length
        window = clip if window is None else window
        if window != clip:
            raise PipelineError(f"this model denoises windows of exactly {clip} views, got window={window}")

        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
        device = self._execution_device
        dtype = self.unet.dtype

        # sizes
        if height is None or width is None:
            h0, w0 = image_size(condition_images)
            height, width = height or h0, width or w0
        m = self.size_multiple()
        if height % m or width % m:
            raise PipelineError(f"image size {width}x{height} must be a multiple of {m}")
        lat_h, lat_w = height // self.vae_scale_factor, width // self.vae_scale_factor

        conditions = self.to_image_tensor(condition_images, (lat_h * 8, lat_w * 8), "condition image")
        n = conditions.shape[0]
        windows = plan_windows(n, window, overlap, closed_loop)
        weights = window_weights(windows, n, window).to(device)
        if proxy_images is not None and len(proxy_images) != n:
            raise PipelineError(f"{len(proxy_images)} proxy images for {n} views; give one per view (or None)")

        lat_ch = self.unet.config.in_channels
        sched = self._scheduler(scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        timesteps = sched.timesteps
        if state is not None:
            self._check_state(state, (n, lat_ch, lat_h, lat_w), len(timesteps), sched)
            generator.set_state(state.generator.clone())
            latents = state.latents.to(device, torch.float32).clone()
            ref_latents = state.reference_latents.to(device, dtype)
            restore_scheduler(sched, state.scheduler, device)
            first_step = state.step
        else:
            latents, ref_latents = self._prepare_latents(
                reference_images, proxy_images, (n, lat_ch, lat_h, lat_w), (height, width), latents, share_noise,
                generator, sample_posterior, sched)
            first_step = 0
        step_kwargs: dict[str, Any] = {}
        step_params = set(inspect.signature(sched.step).parameters)
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        denoiser = self.denoiser
        context = self.empty_prompt()
        conditions = conditions.to(device, dtype)
        ref_per_window = [ref_latents[i:i + 1].expand(window, -1, -1, -1) for i in range(ref_latents.shape[0])]
        reference = ref_per_window[0] if len(ref_per_window) == 1 else ref_per_window

        def state_after(done: int) -> DenoisingState | None:
            """The state after ``done`` steps, from the live tensors (None if the scheduler's cannot be handed out)."""
            try:
                sched_state = scheduler_state(sched)
            except StateError:
                return None
            return DenoisingState(step=done, total_steps=len(timesteps), latents=latents, reference_latents=ref_latents,
                                  scheduler=sched_state, scheduler_class=type(sched).__name__,
                                  generator=generator.get_state())

        for step in range(first_step, len(timesteps)):
            t = timesteps[step]
            model_in = sched.scale_model_input(latents, t)
            t_model = (t.round() if t.is_floating_point() else t).long().to(device)
            eps = torch.zeros_like(latents, dtype=torch.float32)
            for wi, views in enumerate(windows):
                idx = torch.tensor(views, device=device)
                x = model_in[idx].to(dtype)
                t_batch = t_model.reshape(1).expand(window)
                if self.fast_path:
                    e = denoiser.eps_guided(x, t_batch, context, reference, conditions[idx], guidance_scale,
                                            batch_passes=self.batch_passes)
                else:
                    e = denoiser.eps_cond(x, t_batch, context, reference, conditions[idx]).float()
                    if guidance_scale != 1.0:
                        e_u = denoiser.eps_uncond(x, t_batch, context).float()
                        e = e_u + guidance_scale * (e - e_u)
                eps.index_add_(0, idx, e * weights[wi].view(-1, 1, 1, 1))
                if callback_on_window is not None:
                    # nothing of this step has touched latents, scheduler or generator yet: the state is step's
                    with _cancel_state(step, lambda: state_after(step)):
                        if _wants_cancel(callback_on_window(step, len(timesteps), wi, len(windows))):
                            raise Cancelled(step)
            before = latents
            latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                kwargs = {"latents": latents, "num_windows": len(windows), "num_steps": len(timesteps),
                          "pred_x0": predicted_x0(sched, before, eps, t), "state": state_after(step + 1)}
                with _cancel_state(step, lambda: kwargs["state"]):
                    result = callback_on_step_end(self, step, t, kwargs)
                    if _wants_cancel(result):
                        raise Cancelled(step)
                if result and "latents" in result:
                    latents = result["latents"]

        if output_type == "latent":
            images: Any = latents
        else:
            images = self.decode_latents(latents)
            if output_type == "pil":
                images = [PIL.Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)) for a in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DiffPortrait3DPipelineOutput(images=images)


def _wants_cancel(result: Any) -> bool:
    return isinstance(result, dict) and bool(result.get("cancel"))


@contextlib.contextmanager
def _cancel_state(step: int, state: Callable[[], DenoisingState | None]) -> Iterator[None]:
    """A :class:`Cancelled` leaving the block carries ``state()`` unless it already has a state."""
    try:
        yield
    except Cancelled as exc:
        if exc.state is None:
            exc.state = state()
        raise


def predicted_x0(scheduler: SchedulerMixin, sample: torch.Tensor, model_output: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """The clean latents the model predicts at timestep ``t`` (epsilon, v or sample prediction)."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "sample":
        return model_output
    acp = scheduler.alphas_cumprod[int(t)].to(sample.device, torch.float32)
    if kind == "v_prediction":
        return acp.sqrt() * sample - (1 - acp).sqrt() * model_output
    return (sample - (1 - acp).sqrt() * model_output) / acp.sqrt()
