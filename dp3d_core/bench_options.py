"""Memory and time of one 8-view window through the whole pipeline, per small-GPU option:
``python -m dp3d_core.bench_options``.

Random-weight networks at ``--size`` (as :mod:`dp3d_core.bench`; ``sd15`` also gets the SD-1.5 VAE layout), a
reference and 8 condition images, guidance 3, DDIM. Each option is one full ``DiffPortrait3DPipeline`` call
(encode, ``--steps`` denoising steps, decode) after one untimed warm-up call of the same option, from a
pipeline whose networks sit on the device (on the CPU for model offload, which moves them itself).

Reported per option: wall time of the call, seconds per frame (call / 8 views), and on CUDA the peak memory of
the call: ``torch.cuda.max_memory_allocated`` (everything the process holds on the GPU, weights included, so
it is what must fit on the card) and ``max_memory_reserved`` (what torch's caching allocator took from the
driver). On the CPU peak memory is not measured here (see ``dp3d_core.bench`` for peak RSS).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .bench import (DTYPES, GUIDANCE, SIZES, VIEWS, BenchError, _machine, add_request_arguments,
                    build_networks, check_request, report)


@dataclass(frozen=True)
class Option:
    name: str
    what: str
    apply: Callable[[Any, torch.device], None]  # (pipeline, device)
    needs_cuda: bool = False
    offloaded: bool = False


def _offload(pipe: Any, device: torch.device) -> None:
    pipe.enable_model_cpu_offload(device=device)


def _smallest(pipe: Any, device: torch.device) -> None:
    pipe.set_fast_path(batch_passes=False)
    pipe.enable_attention_slicing()
    pipe.enable_vae_slicing()
    _offload(pipe, device)


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("default", "fast path, both guidance passes in one 16-row call of F", lambda p, d: None),
    Option("official", "fast path off: eps_cond + eps_uncond one after the other (official passes)",
           lambda p, d: p.set_fast_path(enabled=False)),
    Option("sequential-passes", "set_fast_path(batch_passes=False): the two passes one after the other",
           lambda p, d: p.set_fast_path(batch_passes=False)),
    Option("attention-slicing", "enable_attention_slicing(): reference/self-attention one row at a time",
           lambda p, d: p.enable_attention_slicing()),
    Option("vae-slicing", "enable_vae_slicing(): decode one view at a time", lambda p, d: p.enable_vae_slicing()),
    Option("vae-tiling", "enable_vae_tiling(): diffusers' tiled VAE", lambda p, d: p.enable_vae_tiling()),
    Option("channels-last", "enable_channels_last()", lambda p, d: p.enable_channels_last()),
    Option("compile", "enable_compile(): torch.compile of F, F_ref and F_cam (compiled in the warm-up call)",
           lambda p, d: p.enable_compile()),
    Option("model-offload", "enable_model_cpu_offload(): each network on the GPU only while it runs", _offload,
           needs_cuda=True, offloaded=True),
    Option("smallest", "model offload + sequential passes + attention slicing + VAE slicing", _smallest,
           needs_cuda=True, offloaded=True),
]}


def sd15_vae_config() -> dict[str, Any]:
    from .convert import vae_config
    return vae_config()


def build_pipeline(size: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A DiffPortrait3DPipeline with random weights at ``size`` on ``device``."""
    from diffusers import AutoencoderKL

    from .convert import SCALE_FACTOR
    from .models.prompt_embedding import PromptEmbedding
    from .pipeline import DiffPortrait3DPipeline
    from .schedulers import make_scheduler
    from .tiny import TINY_VAE

    unet, reference_unet, view_controlnet, view_modules = build_networks(size, device, dtype, seed)
    if size == "sd15":
        vae_kwargs = sd15_vae_config()
    else:
        vae_kwargs = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                      "sample_size": SIZES[size].image, "scaling_factor": SCALE_FACTOR, **TINY_VAE}
    with torch.device(device):
        vae = AutoencoderKL(**vae_kwargs)
    vae = vae.to(dtype).eval().requires_grad_(False)
    dim = unet.config.cross_attention_dim
    prompt = PromptEmbedding.from_tensor(torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(seed)))
    pipe = DiffPortrait3DPipeline(unet, reference_unet, view_controlnet, view_modules, vae,
                                  make_scheduler("ddim"), prompt.to(device, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(size: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    side = SIZES[size].image
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    conditions = rng.integers(0, 256, (VIEWS, side, side, 3), dtype=np.uint8)
    return reference, conditions


def _reset(pipe: Any, device: torch.device) -> None:
    """Undo every option: no hooks, fast path on, no slicing, networks back on ``device``."""
    pipe.remove_all_hooks()
    follow = pipe.__dict__.pop("_dp3d_view_follow", None)
    if follow is not None:
        follow.remove()
    pipe.set_fast_path(True, True)
    pipe.disable_attention_slicing()
    pipe.disable_vae_slicing()
    pipe.disable_vae_tiling()
    pipe.disable_compile()
    for name in ("unet", "reference_unet", "view_controlnet", "vae"):
        getattr(pipe, name).to(device=device, memory_format=torch.contiguous_format)
    pipe.view_modules.to(device)
    pipe.prompt_embedding.to(device)


def measure_option(pipe: Any, option: Option, size: str, device: torch.device, steps: int) -> dict[str, Any]:
    _reset(pipe, device)
    if option.offloaded:
        pipe.to("cpu")
    option.apply(pipe, device)
    reference, conditions = _images(size)

    def call() -> None:
        pipe(reference, conditions, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=0, output_type="np")
    call()  # warm-up: kernels chosen, caches filled
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"what": option.what, "s_per_call": seconds, "s_per_frame": seconds / VIEWS,
                              "steps": steps}
    if device.type == "cuda":
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return record


def run_options(size: str = "tiny", dtype: str = "fp32", device: str = "cpu", steps: int = 2,
                names: Iterable[str] | None = None) -> dict[str, Any]:
    dev = check_request(size, dtype, device, steps)
    names = list(names) if names else list(OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise BenchError(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    pipe = build_pipeline(size, DTYPES[dtype], dev)
    results: dict[str, Any] = {}
    for name in names:
        option = OPTIONS[name]
        if option.needs_cuda and dev.type != "cuda":
            results[name] = {"what": option.what, "skipped": "needs a CUDA device"}
            continue
        results[name] = measure_option(pipe, option, size, dev, steps)
    cfg = SIZES[size]
    return {"config": {"size": size, "image": cfg.image, "dtype": dtype, "device": str(dev), "steps": steps,
                       "views": VIEWS, "guidance": GUIDANCE},
            "machine": {"device_name": _machine(dev), "torch": torch.__version__, "python": platform.python_version(),
                        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
            "options": results}


def format_table(record: dict[str, Any]) -> str:
    c, m = record["config"], record["machine"]
    lines = [f"DiffPortrait3D pipeline options: size {c['size']} ({c['image']}x{c['image']}), {c['dtype']}, "
             f"{c['device']} ({m['device_name']}), one window of {c['views']} views, {c['steps']} DDIM steps, "
             f"guidance {c['guidance']}, torch {m['torch']}",
             f"{'option':<18} {'s/call':>8} {'s/frame':>8} {'peak alloc MiB':>15} {'peak reserved MiB':>18}"]
    for name, r in record["options"].items():
        if "skipped" in r:
            lines.append(f"{name:<18} skipped: {r['skipped']}")
            continue
        alloc = f"{r['peak_allocated_bytes'] / 2**20:.0f}" if "peak_allocated_bytes" in r else "n/a"
        reserved = f"{r['peak_reserved_bytes'] / 2**20:.0f}" if "peak_reserved_bytes" in r else "n/a"
        lines.append(f"{name:<18} {r['s_per_call']:>8.3f} {r['s_per_frame']:>8.3f} {alloc:>15} {reserved:>18}")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.bench_options", description=__doc__.split("\n")[0])
    add_request_arguments(parser, size="tiny", steps=2, steps_help="DDIM steps per call")
    parser.add_argument("--options", nargs="*", metavar="NAME", help=f"subset of: {', '.join(OPTIONS)}")
    args = parser.parse_args(list(argv) if argv is not None else None)
    return report(lambda: run_options(args.size, args.dtype, args.device, args.steps, args.options), format_table,
                  args.json)


if __name__ == "__main__":
    sys.exit(main())
