"""Benchmark the official compute schedule against the fast path: ``python -m dp3d_core.bench``.

``--model diffportrait360``: the DiffPortrait360 view model instead (20 view modules, TWO references, front and
back, in every reference attention; the official mode runs F_ref on 8 copies of each).

Random-weight networks (speed does not depend on the weights) at ``--size tiny|mid|sd15``; N denoising steps
with guidance 3 for one window of 8 views, in two modes in ONE run:

* ``official``: what the official sampler does per step, literally: F_ref on 8 identical reference copies and run
  to its end, F_cam + F for the conditional batch of 8, F_cam evaluated again on the unconditional pass and its
  output dropped, F for the unconditional batch of 8;
* ``fast``: :meth:`DiffPortrait3DDenoiser.eps_guided` (F_ref once at batch 1, F_cam on the conditional rows only,
  both passes in one 16-row call of F).

Reported per mode: seconds per step (mean over the timed steps; a warm-up step is not timed), seconds per frame
(timed steps / 8 views, and extrapolated to 50 steps), peak memory of one untimed step after the warm-up (CUDA: max
allocated above the weights; CPU: peak RSS rise, reset through /proc/self/clear_refs), FLOPs per step (torch's
FlopCounterMode, one step) and achieved TFLOP/s; then the fast/official ratios and how far the fast guided eps is
from the official one (relative L2, first timestep), all from this one run. Timed steps alternate between the
modes (official, fast, official, ...) so that load from other processes on a shared machine hits both alike.
``--compile``: the fast mode runs ``torch.compile``d F, F_ref and F_cam (the compilation happens in its untimed
warm-up step); the official mode runs the same networks eagerly (``torch.compiler.set_stance("force_eager")``),
as the official code does. ``--compile both``: the official mode is compiled too (like for like: what the schedule
alone saves under compile). FLOPs are counted eagerly for both.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .models.config import CLIP_LENGTH, diffportrait360_params, network_configs, official_params

VIEWS = CLIP_LENGTH
GUIDANCE = 3.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# model -> (official parameters from size overrides, references per view)
MODELS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], int]] = {
    "diffportrait3d": (official_params, 1),
    "diffportrait360": (diffportrait360_params, 2),
}


class BenchError(ValueError):
    """A benchmark request that cannot run here (unknown size, no CUDA, ...)."""


@dataclass(frozen=True)
class BenchSize:
    overrides: dict[str, Any]
    latent: int  # latent side; images are 8x

    @property
    def image(self) -> int:
        return 8 * self.latent


SIZES: dict[str, BenchSize] = {
    # the test config (dp3d_core.tiny)
    "tiny": BenchSize({"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_heads": 8, "context_dim": 32}, 16),
    # a step in seconds on a 2-core CPU: real layout and context width, a fifth of the channels, 256x256
    "mid": BenchSize({"model_channels": 64, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "context_dim": 768}, 32),
    # the real SD-1.5 sizes at 512x512
    "sd15": BenchSize({}, 64),
}


def _register_cpu_sdpa_flops() -> None:
    """torch's flop counter knows the CUDA SDPA kernels but not the CPU flash kernel; count it the same way."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_counter.flop_registry or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def build_networks(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                   model: str = "diffportrait3d") -> list[torch.nn.Module]:
    """F, F_ref, F_cam and the view modules with random weights at ``size`` (built directly on ``device``)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from .models.view_modules import ViewModules

    configs = network_configs(MODELS[model][0](SIZES[size].overrides))
    torch.manual_seed(seed)
    with torch.device(device):
        nets = [UNet2DConditionModel(**configs["unet"]), UNet2DConditionModel(**configs["reference_unet"]),
                ControlNetModel(**configs["view_controlnet"]), ViewModules(**configs["view_modules"])]
    return [n.to(dtype).eval().requires_grad_(False) for n in nets]


def build_denoiser(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, model: str = "diffportrait3d"):
    """A DiffPortrait3DDenoiser with random weights at ``size`` (the networks of ``model``)."""
    from .models.denoiser import DiffPortrait3DDenoiser

    return DiffPortrait3DDenoiser(*build_networks(size, device, dtype, seed, model), clip_length=VIEWS)


def make_inputs(denoiser, size: str, device: torch.device, dtype: torch.dtype, seed: int = 1,
                references: int = 1) -> dict[str, Any]:
    """``reference``: a list of ``references`` latents ``[1, 4, h, w]`` (DiffPortrait360: front, back)."""
    lat = SIZES[size].latent
    g = torch.Generator().manual_seed(seed)
    dim = denoiser.unet.config.cross_attention_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)
    return {"x": randn(VIEWS, 4, lat, lat), "reference": [randn(1, 4, lat, lat) for _ in range(references)],
            "condition": (torch.rand(VIEWS, 3, 8 * lat, 8 * lat, generator=g) * 2 - 1).to(device, dtype),
            "context": randn(1, 77, dim)}


def official_step(denoiser, t: int, inputs: dict[str, Any]) -> torch.Tensor:
    """One guided step as the official sampler computes it (see the module docstring)."""
    x, context, condition = inputs["x"], inputs["context"], inputs["condition"]
    # the official 8 identical copies of each reference
    references = [r.expand(VIEWS, -1, -1, -1).contiguous() for r in inputs["reference"]]
    e_c = denoiser.eps_cond(x, t, context, references, condition).float()
    tt = torch.full((VIEWS,), t, device=x.device, dtype=torch.long)
    denoiser.view_controlnet(x, tt, encoder_hidden_states=context.expand(VIEWS, -1, -1), controlnet_cond=condition,
                             return_dict=False)  # evaluated on the unconditional pass, never used
    e_u = denoiser.eps_uncond(x, t, context).float()
    return e_u + GUIDANCE * (e_c - e_u)


def fast_step(denoiser, t: int, inputs: dict[str, Any]) -> torch.Tensor:
    return denoiser.eps_guided(inputs["x"], t, inputs["context"], inputs["reference"], inputs["condition"], GUIDANCE)


def _official_mode(denoiser, on: bool) -> None:
    """Official: every reference row through F_ref, to the end (no stop after the last bank write)."""
    denoiser.share_identical_references = not on
    for processor in denoiser.reference_unet.attn_processors.values():
        if hasattr(processor, "stop_when_done"):
            processor.stop_when_done = not on


class MemoryMeter:
    """Peak memory of a block: CUDA max allocated above the start, or CPU peak RSS rise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0
        self.method = ""

    def __enter__(self) -> "MemoryMeter":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus allocated at start"
        else:
            self.method = "peak RSS rise (/proc/self/status VmHWM after clear_refs)" if _reset_peak_rss() \
                else "ru_maxrss rise (monotonic: only growth beyond earlier peaks counts)"
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        return max(0, _peak_rss_bytes() - self.start)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(step: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(name: str) -> Callable[..., torch.Tensor]:
    return official_step if name == "official" else fast_step


def _eager():
    """Compiled networks run eagerly inside this block (the official code does not compile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _mode_context(name: str, eager_official: bool):
    return _eager() if name == "official" and eager_official else contextlib.nullcontext()


def prepare_mode(name: str, denoiser, inputs: dict[str, Any], t: int, device: torch.device,
                 eager_official: bool = True) -> tuple[dict[str, Any], torch.Tensor]:
    """FLOPs of one step, a warm-up step (where a compiled mode compiles), then one more untimed step whose peak
    memory is recorded; returns the record and that step's guided eps."""
    step = _step_fn(name)
    _official_mode(denoiser, name == "official")
    try:
        with torch.no_grad(), _mode_context(name, eager_official):
            with _eager():
                flops = count_flops(lambda: step(denoiser, t, inputs))
            step(denoiser, t, inputs)
            with MemoryMeter(device) as meter:
                eps = step(denoiser, t, inputs)
            peak = meter.peak()
    finally:
        _official_mode(denoiser, False)
    return {"flops_per_step": flops, "peak_memory_bytes": peak, "peak_memory_method": meter.method}, eps


def timed_step(name: str, denoiser, inputs: dict[str, Any], t: int, device: torch.device,
               eager_official: bool = True) -> float:
    step = _step_fn(name)
    _official_mode(denoiser, name == "official")
    try:
        with torch.no_grad(), _mode_context(name, eager_official):
            _sync(device)
            start = time.perf_counter()
            step(denoiser, t, inputs)
            _sync(device)
            return time.perf_counter() - start
    finally:
        _official_mode(denoiser, False)


def run_modes(denoiser, inputs: dict[str, Any], timesteps: list[int], device: torch.device,
              eager_official: bool = True) -> tuple[dict[str, dict], float]:
    """Both modes, and the relative L2 difference of their guided eps at the first timestep. Timed steps alternate
    official / fast, so a load change on a shared machine hits both."""
    names = ("official", "fast")
    prepared = {name: prepare_mode(name, denoiser, inputs, timesteps[0], device, eager_official) for name in names}
    modes = {name: record for name, (record, _) in prepared.items()}
    official_eps, fast_eps = prepared["official"][1].float(), prepared["fast"][1].float()
    eps_difference = float((fast_eps - official_eps).norm() / official_eps.norm())
    times: dict[str, list[float]] = {name: [] for name in names}
    for t in timesteps:
        for name in names:
            times[name].append(timed_step(name, denoiser, inputs, t, device, eager_official))
    for name, r in modes.items():
        per_step = sum(times[name]) / len(times[name])
        r.update({"s_per_step": per_step, "s_per_step_min": min(times[name]), "step_times": times[name],
                  "s_per_frame": sum(times[name]) / VIEWS, "s_per_frame_50_steps": per_step * 50 / VIEWS,
                  "achieved_tflops": r["flops_per_step"] / per_step / 1e12, "timed_steps": len(times[name])})
    return modes, eps_difference


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



@contextlib.contextmanager
def _cpu_settings(threads: int | None, flush_denormal: bool):
    """Thread count and denormal flushing for the run only (random weights make denormals, which are slow on
    CPUs); both are process-wide, so they are put back afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if flush_denormal:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if flush_denormal:
            torch.set_flush_denormal(False)

def check_request(size: str, dtype: str, device: str, steps: int) -> torch.device:
    """The device of a benchmark request, or a BenchError saying what is wrong with it."""
    if size not in SIZES:
        raise BenchError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if steps < 1:
        raise BenchError(f"--steps must be at least 1, got {steps}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("CUDA was asked for but torch sees no CUDA device; use --device cpu")
    return dev


def add_request_arguments(parser: argparse.ArgumentParser, size: str, steps: int, steps_help: str) -> None:
    parser.add_argument("--size", default=size, choices=sorted(SIZES))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--json", metavar="PATH", help="also write the record as JSON ('-': JSON on stdout only)")


def report(measure: Callable[[], dict[str, Any]], format_table: Callable[[dict[str, Any]], str],
           json_path: str | None) -> int:
    """Run a measurement and print its table; with a path, also write the JSON record there ('-': the JSON on
    stdout instead). A BenchError is one line on stderr and exit status 2."""
    try:
        record = measure()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if json_path == "-":
        print(json.dumps(record, indent=2))
        return 0
    print(format_table(record))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
    return 0


def run_bench(size: str = "mid", dtype: str = "fp32", device: str = "cpu", steps: int = 3,
              channels_last: bool = False, compile: str | None = None, threads: int | None = None,
              model: str = "diffportrait3d") -> dict[str, Any]:
    """Both modes on one set of networks; returns the JSON-able record. ``compile``: None, "fast" (the fast mode
    compiled, the official one eager) or "both". ``model``: "diffportrait3d" or "diffportrait360" (view model)."""
    if compile not in (None, "fast", "both"):
        raise BenchError(f"unknown compile choice {compile!r}; use 'fast' or 'both'")
    if model not in MODELS:
        raise BenchError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    dev = check_request(size, dtype, device, steps)
    with _cpu_settings(threads, flush_denormal=dev.type == "cpu"):
        return _measure(size, dtype, dev, steps, channels_last, compile, model)


def _measure(size: str, dtype: str, dev: torch.device, steps: int, channels_last: bool, compile: str | None,
             model: str = "diffportrait3d") -> dict:
    load_start = _loadavg()
    torch_dtype = DTYPES[dtype]
    denoiser = build_denoiser(size, dev, torch_dtype, model=model)
    if channels_last:
        for net in (denoiser.unet, denoiser.reference_unet, denoiser.view_controlnet):
            net.to(memory_format=torch.channels_last)
    if compile:
        denoiser.compile_networks()
    inputs = make_inputs(denoiser, size, dev, torch_dtype, references=MODELS[model][1])
    timesteps = [int(t) for t in torch.linspace(981, 1, steps + 1).round().long()][:steps] if steps > 1 else [981]
    modes, eps_difference = run_modes(denoiser, inputs, timesteps, dev, eager_official=compile != "both")
    o, f = modes["official"], modes["fast"]
    cfg = SIZES[size]
    return {
        "config": {"model": model, "references": MODELS[model][1], "size": size, "dtype": dtype, "device": str(dev),
                   "steps": steps, "views": VIEWS,
                   "guidance": GUIDANCE, "image": cfg.image, "latent": cfg.latent,
                   "model_channels": official_params(cfg.overrides)["model_channels"],
                   "channels_last": channels_last, "compile": compile, "first_timestep": timesteps[0],
                   "threads": torch.get_num_threads()},
        "machine": {"device_name": _machine(dev), "torch": torch.__version__, "python": platform.python_version(),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "loadavg_before_after": [load_start, _loadavg()]},
        "modes": modes,
        "ratio": {"speedup_official_over_fast": o["s_per_step"] / f["s_per_step"],
                  "speedup_min_times": o["s_per_step_min"] / f["s_per_step_min"],
                  "flops_fast_over_official": f["flops_per_step"] / o["flops_per_step"],
                  "eps_relative_l2_fast_vs_official": eps_difference,
                  "memory_fast_over_official": (f["peak_memory_bytes"] / o["peak_memory_bytes"]
                                                if o["peak_memory_bytes"] else None)},
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def format_table(record: dict[str, Any]) -> str:
    c, m = record["config"], record["machine"]
    name = {"diffportrait360": "DiffPortrait360 view model (2 references)"}.get(c.get("model"), "DiffPortrait3D")
    lines = [f"{name} bench: size {c['size']} ({c['image']}x{c['image']}, model_channels "
             f"{c['model_channels']}), {c['dtype']}, {c['device']} ({m['device_name']}), {c['views']} views, "
             f"guidance {c['guidance']}, {c['steps']} timed steps + 1 warm-up, torch {m['torch']}, "
             f"{c['threads']} threads, load {m['loadavg_before_after']}",
             f"{'mode':<9} {'s/step':>9} {'s/frame':>9} {'s/frame@50':>11} {'peak MiB':>9} {'GFLOP/step':>11} "
             f"{'TFLOP/s':>8}"]
    for name, r in record["modes"].items():
        lines.append(f"{name:<9} {r['s_per_step']:>9.3f} {r['s_per_frame']:>9.3f} {r['s_per_frame_50_steps']:>11.3f} "
                     f"{r['peak_memory_bytes'] / 2**20:>9.1f} {r['flops_per_step'] / 1e9:>11.2f} "
                     f"{r['achieved_tflops']:>8.4f}")
    r = record["ratio"]
    mem = "n/a" if r["memory_fast_over_official"] is None else f"{r['memory_fast_over_official']:.2f}"
    lines.append(f"fast vs official: {r['speedup_official_over_fast']:.2f}x faster per step "
                 f"({r['speedup_min_times']:.2f}x on the fastest steps), "
                 f"{r['flops_fast_over_official']:.2f} of the FLOPs, {mem} of the peak memory; guided eps differ "
                 f"by {r['eps_relative_l2_fast_vs_official']:.2e} (relative L2, t={c['first_timestep']})")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.bench", description=__doc__.split("\n")[0])
    add_request_arguments(parser, size="mid", steps=3, steps_help="timed denoising steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", default="diffportrait3d", choices=sorted(MODELS),
                        help="diffportrait360: the DiffPortrait360 view model (20 view modules, front + back reference)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const="fast", choices=("fast", "both"),
                        help="torch.compile F, F_ref and F_cam for the fast mode (official mode stays eager); "
                             "'both': the official mode compiled too")
    args = parser.parse_args(list(argv) if argv is not None else None)
    return report(lambda: run_bench(args.size, args.dtype, args.device, args.steps, args.channels_last,
                                    args.compile, args.threads, args.model), format_table, args.json)


if __name__ == "__main__":
    sys.exit(main())
