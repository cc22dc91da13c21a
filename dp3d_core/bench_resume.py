"""What checkpoints and live previews cost next to a denoising step: ``python -m dp3d_core.bench_resume``.

Runs the real pipeline on ``--views`` views for ``--steps`` steps with the worker's own hooks, and times, per step:
the denoising step itself (without the hooks), saving the checkpoint (dp3d_core.denoise_state: tensors + manifest,
atomic, fsync'd), loading and validating it, and writing the live previews (dp3d_core.live_preview: linear map +
one PNG per view). Also times a full VAE decode of all views, the alternative preview. Every scheduler in
``--schedulers`` is run (DPM++ 2M and UniPC keep a multistep history, so their checkpoints are bigger).

Model: ``--model FOLDER`` (e.g. models/small at 64 px), or ``--tiny-latent N``: the random tiny model
(dp3d_core.tiny) with images of 8N px. Results go to stdout and, with ``--json PATH``, to a JSON record.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .denoise_state import Checkpoints
from .live_preview import LivePreview, fit_latent_to_rgb, preview_size
from .pipeline import DiffPortrait3DPipeline


def bench_one(pipe: DiffPortrait3DPipeline, views: int, steps: int, scheduler: str, size: int,
              work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    refs = [rng.random((size, size, 3)).astype(np.float32)]
    conds = [rng.random((size, size, 3)).astype(np.float32) for _ in range(views)]
    names = [f"frame_{i + 1:04d}.png" for i in range(views)]
    ck = Checkpoints(work / scheduler, "bench")
    rows: list[dict[str, float]] = []
    last = [0.0]
    preview: list[LivePreview] = []

    def on_step(p, step, t, kw):
        now = time.perf_counter()
        row = {"step_s": now - last[0]}
        state = kw["state"]
        row["checkpoint_s"] = ck.save(state)
        row["checkpoint_mb"] = sum(f.stat().st_size for f in ck.folder.iterdir()) / 2**20
        t0 = time.perf_counter()
        loaded = ck.load(lambda m: (_ for _ in ()).throw(RuntimeError(m)))
        row["load_s"] = time.perf_counter() - t0
        assert loaded is not None and loaded.step == state.step
        if not preview:
            matrix = fit_latent_to_rgb(state.reference_latents, p.decode_latents(state.reference_latents))
            lat = state.latents.shape[-1]
            preview.append(LivePreview(work / scheduler, names, matrix, preview_size(size, lat), every_seconds=0))
        row["preview_s"] = preview[0].write(kw["pred_x0"])
        rows.append(row)
        last[0] = time.perf_counter()

    last[0] = time.perf_counter()
    out = pipe(refs, conds, num_inference_steps=steps, scheduler=scheduler, eta=0.5 if scheduler == "ddim" else 0.0,
               seed=1, guidance_scale=3.0, callback_on_step_end=on_step, output_type="latent")
    t0 = time.perf_counter()
    pipe.decode_latents(out.images)
    decode_s = time.perf_counter() - t0
    timed = rows[1:] or rows  # the first step includes the reference encoding and warm-up
    step_s = statistics.mean(r["step_s"] for r in timed)
    result = {"scheduler": scheduler, "views": views, "size": size, "steps": steps,
              "step_s": step_s, "decode_all_views_s": decode_s,
              "checkpoint_s": max(r["checkpoint_s"] for r in timed),
              "checkpoint_mb": max(r["checkpoint_mb"] for r in timed),
              "load_s": max(r["load_s"] for r in timed),
              "preview_s": max(r["preview_s"] for r in timed),
              "preview_px": preview[0].size}
    result["checkpoint_pct_of_step"] = 100 * result["checkpoint_s"] / step_s
    result["preview_pct_of_step"] = 100 * result["preview_s"] / step_s
    return result


def bench_files(views: int, latent: int, channels: int, scheduler: str, work: Path, repeat: int = 5) -> dict[str, Any]:
    """Checkpoint and preview costs alone, on a state of real shape: the real scheduler run for 2 steps on random
    model outputs (the file costs do not depend on the network)."""
    from .denoise_state import DenoisingState, scheduler_state
    from .schedulers import make_scheduler

    g = torch.Generator().manual_seed(0)
    sched = make_scheduler(scheduler)
    sched.set_timesteps(50)
    x = torch.randn(views, channels, latent, latent, generator=g)
    for t in sched.timesteps[:2]:
        x = sched.step(torch.randn(x.shape, generator=g), t, x).prev_sample
    state = DenoisingState(step=2, total_steps=len(sched.timesteps), latents=x,
                           reference_latents=torch.randn(1, channels, latent, latent, generator=g),
                           scheduler=scheduler_state(sched), scheduler_class=type(sched).__name__,
                           generator=g.get_state())
    ck = Checkpoints(work / f"files-{scheduler}", "bench")
    names = [f"frame_{i + 1:04d}.png" for i in range(views)]
    matrix = np.random.default_rng(0).normal(size=(channels + 1, 3)).astype(np.float32) * 0.2
    preview = LivePreview(work / f"files-{scheduler}", names, matrix, preview_size(8 * latent, latent), 0)
    saves, loads, previews = [], [], []
    for _ in range(repeat):
        saves.append(ck.save(state))
        t0 = time.perf_counter()
        assert ck.load() is not None
        loads.append(time.perf_counter() - t0)
        previews.append(preview.write(x))
    return {"scheduler": scheduler, "views": views, "size": 8 * latent, "latent_channels": channels,
            "checkpoint_s": statistics.median(saves), "checkpoint_max_s": max(saves),
            "checkpoint_mb": sum(f.stat().st_size for f in ck.folder.iterdir()) / 2**20,
            "load_s": statistics.median(loads), "preview_s": statistics.median(previews), "preview_px": preview.size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.bench_resume", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder")
    source.add_argument("--tiny-latent", type=int, help="random tiny model with latents of this side")
    source.add_argument("--files-latent", type=int, help="no network: checkpoint and preview files only, for "
                                                         "states with latents of this side (4 channels)")
    parser.add_argument("--size", type=int, help="image size (default: 8x the model's latent sample size)")
    parser.add_argument("--views", type=int, default=48)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--schedulers", nargs="+", default=["ddim", "dpm++2m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", help="folder for the checkpoint files (default: a temporary folder)")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.files_latent:
            results = [bench_files(args.views, args.files_latent, 4, name, work) for name in args.schedulers]
            for r in results:
                print(f"{r['scheduler']:8s} {args.views} views {r['size']}px: checkpoint "
                      f"{r['checkpoint_s'] * 1000:.1f} ms (median of 5, max {r['checkpoint_max_s'] * 1000:.1f} ms; "
                      f"{r['checkpoint_mb']:.2f} MiB), load {r['load_s'] * 1000:.1f} ms | preview "
                      f"{r['preview_s'] * 1000:.1f} ms ({r['preview_px']} px)", flush=True)
        else:
            if args.model:
                pipe = DiffPortrait3DPipeline.from_pretrained(args.model)
                size = args.size or 8 * int(pipe.unet.config.sample_size)
            else:
                from .tiny import make_tiny_model_folder
                folder = make_tiny_model_folder(Path(tmp) / "tiny", sample_size=args.tiny_latent)
                pipe = DiffPortrait3DPipeline.from_pretrained(folder)
                size = args.size or 8 * args.tiny_latent
            results = []
            for name in args.schedulers:
                r = bench_one(pipe, args.views, args.steps, name, size, work)
                results.append(r)
                print(f"{name:8s} {args.views} views {size}px: step {r['step_s']:.3f} s | checkpoint "
                      f"{r['checkpoint_s'] * 1000:.1f} ms ({r['checkpoint_mb']:.2f} MiB, "
                      f"{r['checkpoint_pct_of_step']:.2f} % of a step), load {r['load_s'] * 1000:.1f} ms | preview "
                      f"{r['preview_s'] * 1000:.1f} ms ({r['preview_px']} px, {r['preview_pct_of_step']:.2f} %) | "
                      f"full VAE decode of all views {r['decode_all_views_s']:.2f} s", flush=True)
    record = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load_avg": os.getloadavg(), "torch": torch.__version__, "python": sys.version.split()[0],
                          "threads": args.threads},
              "model": args.model or (f"tiny random, latent {args.tiny_latent}" if args.tiny_latent
                                      else "none (checkpoint and preview files only)"),
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
