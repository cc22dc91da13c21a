"""Step counts of the faster schedulers against 50-step DDIM (issue 6, section 4).

``python -m dp3d_core.scheduler_steps --model models/small --data /work/data_small/test --identities 3
--out-md FILE``

Per held-out identity (reference = view ``v00``, the next 8 views' condition images, as
``training.evaluate`` reads them), DDIM with ``--ref-steps`` steps is the reference output; every scheduler
at every step count is run with the same seed and the same initial noise ``x_T`` (passed as ``latents=``;
DDIM, DPM++ 2M and UniPC all have ``init_noise_sigma`` 1) and scored by PSNR (dB, images in [0, 1], capped
at 100 for identical images) against that reference, averaged over identities, with the seconds per run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .cameras import CameraError
from .held_out import reference_and_targets
from .metrics import psnr

DEFAULT_SCHEDULERS = ("ddim", "dpm++2m", "unipc")
DEFAULT_STEPS = (5, 8, 10, 15, 20, 25, 30, 40)
THRESHOLDS_DB = (30.0, 25.0)


class SchedulerStepsError(ValueError):
    """Bad input to the scheduler step-count comparison, with a plain-words message."""


@dataclass
class Sample:
    name: str
    reference: Image.Image
    conditions: list[Image.Image]


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise SchedulerStepsError(f"cannot read image {path}: {exc}") from None


def load_samples(data: str | Path, identities: int, views: int) -> list[Sample]:
    """The first ``identities`` identities with ``views + 1`` views (:mod:`dp3d_core.held_out`): the reference
    image and the ``cond/`` images of the targets."""
    data = Path(data)
    index = data / "dataset.json"
    try:
        labels = json.loads(index.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SchedulerStepsError(f"cannot read {index} (a dataset root holds dataset.json with 'labels', the "
                                  f"images and cond/): {exc}") from None
    samples = []
    try:
        for name, reference, targets in reference_and_targets(labels, views):
            conditions = [_open_rgb(data / "cond" / rel) for rel in targets]
            samples.append(Sample(name, _open_rgb(data / reference), conditions))
            if len(samples) == identities:
                break
    except CameraError as exc:
        raise SchedulerStepsError(f"{index}: {exc}") from None
    if not samples:
        raise SchedulerStepsError(f"no identity in {data} has {views + 1} views (reference + {views} condition "
                                  f"images)")
    return samples


@dataclass
class Row:
    scheduler: str
    steps: int            # requested
    actual_steps: int     # denoising steps run (official DDIM spacing can add one)
    psnr: float           # mean dB over identities against the reference output
    seconds: float        # mean seconds per run (one 8-view window)


def _run(pipe: Any, sample: Any, scheduler: str, steps: int, guidance: float, seed: int,
         noise: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """Images ``[V, 3, H, W]`` in [0, 1], denoising steps run, seconds."""
    count = [0]

    def on_step(_pipe: Any, _step: int, _t: Any, _kw: dict) -> None:
        count[0] += 1

    start = time.perf_counter()
    out = pipe(sample.reference, sample.conditions, num_inference_steps=steps, guidance_scale=guidance,
               scheduler=scheduler, seed=seed, latents=noise.clone(), output_type="np",
               callback_on_step_end=on_step).images
    seconds = time.perf_counter() - start
    return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float().clamp(0, 1), count[0], seconds


def compare(model: str | Path, data: str | Path, identities: int = 3, schedulers: Sequence[str] = DEFAULT_SCHEDULERS,
            steps: Sequence[int] = DEFAULT_STEPS, ref_steps: int = 50, guidance: float = 2.0, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rows of (scheduler, steps) scored against DDIM-``ref_steps``, plus the reference run's time and settings."""
    from .model_folder import ModelFolderError
    from .pipeline import DiffPortrait3DPipeline
    from .schedulers import SchedulerError, make_scheduler

    for name in schedulers:
        try:
            make_scheduler(name)
        except SchedulerError as exc:
            raise SchedulerStepsError(str(exc)) from None
    if not steps or min(steps) < 1 or ref_steps < 1:
        raise SchedulerStepsError(f"step counts must be whole numbers >= 1, got {list(steps)} and {ref_steps}")
    try:
        pipe = DiffPortrait3DPipeline.from_pretrained(model)
    except ModelFolderError as exc:
        raise SchedulerStepsError(str(exc)) from None
    size = int(pipe.vae.config.sample_size or 64)
    samples = load_samples(data, identities, pipe.clip_length)
    lat = size // pipe.vae_scale_factor
    lat_ch = int(pipe.unet.config.in_channels)

    per: dict[tuple[str, int], list[tuple[float, int, float]]] = {}
    ref_seconds: list[float] = []
    for i, s in enumerate(samples):
        if progress:
            progress(f"identity {s.name} ({i + 1}/{len(samples)})")
        g = torch.Generator("cpu").manual_seed(seed + i)
        noise = torch.randn((pipe.clip_length, lat_ch, lat, lat), generator=g, dtype=torch.float32)
        reference, _, sec = _run(pipe, s, "ddim", ref_steps, guidance, seed, noise)
        ref_seconds.append(sec)
        for name in schedulers:
            for n in steps:
                images, actual, sec = _run(pipe, s, name, n, guidance, seed, noise)
                per.setdefault((name, n), []).append((float(psnr(images, reference).mean()), actual, sec))
    rows = [Row(name, n, vals[0][1], float(np.mean([v[0] for v in vals])), float(np.mean([v[2] for v in vals])))
            for (name, n), vals in per.items()]
    return {"rows": rows, "ref_seconds": float(np.mean(ref_seconds)),
            "settings": {"model": str(model), "data": str(data), "identities": [s.name for s in samples],
                         "ref_steps": ref_steps, "guidance": guidance, "seed": seed, "size": size,
                         "views": pipe.clip_length, "threads": torch.get_num_threads()}}


def smallest_within(rows: Sequence[Row], threshold_db: float) -> dict[str, int | None]:
    """Per scheduler, the smallest requested step count whose mean PSNR is at least ``threshold_db``."""
    best: dict[str, int | None] = {}
    for r in rows:
        best.setdefault(r.scheduler, None)
        if r.psnr >= threshold_db and (best[r.scheduler] is None or r.steps < best[r.scheduler]):
            best[r.scheduler] = r.steps
    return best


def machine() -> str:
    """CPU model (or architecture), logical CPUs, torch version and threads used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


def markdown(result: dict[str, Any], command: str | None = None) -> str:
    """The comparison as markdown: command, settings, table, and the smallest step counts per threshold."""
    st, rows = result["settings"], result["rows"]
    lines: list[str] = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Model `{st['model']}`, data `{st['data']}`: identities {', '.join(st['identities'])} "
              f"({st['views']} views each, {st['size']} px, reference = v00), guidance {st['guidance']}, seed "
              f"{st['seed']}, the same initial noise for every run of an identity. Reference: DDIM "
              f"{st['ref_steps']} steps ({result['ref_seconds']:.2f} s/run). Machine: {machine()}.", "",
              f"| scheduler | steps | steps run | PSNR vs DDIM-{st['ref_steps']} (dB) | s/run |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.scheduler} | {r.steps} | {r.actual_steps} | {r.psnr:.2f} | {r.seconds:.2f} |")
    lines.append("")
    for t in THRESHOLDS_DB:
        best = smallest_within(rows, t)
        lines.append(f"Smallest step count within {t:g} dB of DDIM-{st['ref_steps']}: " + ", ".join(
            f"{k} {v if v is not None else 'none of those run'}" for k, v in best.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.scheduler_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="held-out dataset split (dataset.json + images + cond/)")
    parser.add_argument("--identities", type=int, default=3)
    parser.add_argument("--schedulers", default=",".join(DEFAULT_SCHEDULERS), help="comma-separated names")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="comma-separated step counts")
    parser.add_argument("--ref-steps", type=int, default=50, help="DDIM steps of the reference output")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out-md", help="markdown file to write")
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(max(1, args.threads))
    try:
        steps = [int(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        print(f"error: --steps must be comma-separated whole numbers, got {args.steps!r}", file=sys.stderr)
        return 2
    schedulers = [x.strip() for x in args.schedulers.split(",") if x.strip()]
    try:
        result = compare(args.model, args.data, args.identities, schedulers, steps, args.ref_steps, args.guidance,
                         args.seed, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except SchedulerStepsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m dp3d_core.scheduler_steps " + " ".join(
        shlex.quote(a) for a in (list(argv) if argv is not None else sys.argv[1:]))
    text = markdown(result, command)
    print(text)
    if args.out_md:
        out = Path(args.out_md)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
