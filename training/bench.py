"""Seconds per optimizer step and peak memory of one training sample, with and without gradient checkpointing.

    python -m training.bench --stage {1,2,3} --size {tiny,mid,sd15} [--precision no fp16 bf16] [--steps 2]
    python -m training.bench --stage 1 2 3 --size sd15 --memory-floor    (counts only, runs nothing)

One sample = one target view (stages 1, 2) or a reference + 8-view clip (stage 3), batch 1, random weights of
the size's layout, a synthetic dataset; each configuration runs in its own process so its peak memory is its own
(GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set, model loading included). Sizes:

  tiny  dp3d_core.tiny's networks, 64 px
  mid   SD 1.5's layout (4 levels, 2 res blocks, attention at 3 levels, 8 heads) at 128 base channels, 256 px
  sd15  SD 1.5's layout and size (320 base channels, context 768), 512 px: for a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"image": 64, "params": None},
    "mid": {"image": 256, "params": {"model_channels": 128, "context_dim": 768}},
    "sd15": {"image": 512, "params": {}},
}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
MID_VAE = {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "norm_num_groups": 32}


def make_components(size: str) -> dict[str, Any]:
    """The size's networks with random weights (under ``torch.device("meta")``: their shapes only)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dp3d_core.models.config import network_configs, official_params
    from dp3d_core.models.prompt_embedding import PromptEmbedding
    from dp3d_core.tiny import make_tiny_components

    from .models import hand_over_from_unet
    spec = SIZES[size]
    latent = spec["image"] // 8
    if spec["params"] is None:
        return make_tiny_components(seed=0, sample_size=latent)
    params = official_params(spec["params"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**network_configs(params)["unet"], "sample_size": latent})
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, sample_size=spec["image"], **(SD_VAE if size == "sd15" else MID_VAE))
    prompt = PromptEmbedding.from_tensor(torch.randn(1, 77, params["context_dim"]))
    return {"unet": unet, **hand_over_from_unet(unet, params), "vae": vae, "prompt_embedding": prompt}


def write_model(size: str, folder: Path) -> Path:
    from dp3d_core.model_folder import save_model_folder
    return save_model_folder(make_components(size), folder, overwrite=True)


def memory_floor(size: str, stages: Iterable[str]) -> list[dict[str, Any]]:
    """What a stage holds before its first activation, counted from the networks' shapes (nothing allocated):
    every network's float32 weights (the trainer loads them all; mixed precision keeps float32 weights), the
    trainable network's float32 gradients, and its optimizer moments: AdamW 2 x 4 bytes, AdamW8bit 2 x 1 byte
    per parameter (its per-block scales, under 1 %, left out)."""
    import torch

    from .models import TRAINABLE
    # tiny: real tensors (its initialisation reads values, and it is small)
    with torch.device("meta") if SIZES[size]["params"] is not None else contextlib.nullcontext():
        parts = make_components(size)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()
              if isinstance(m, torch.nn.Module)}
    weights = sum(counts.values()) * 4
    rows = []
    for stage in stages:
        trained = counts[TRAINABLE[stage]]
        rows.append({"stage": stage, "size": size, "all_params": sum(counts.values()), "trainable_params": trained,
                     "weights_gib": weights / 2**30, "gradients_gib": trained * 4 / 2**30,
                     "adamw_floor_gib": (weights + trained * 12) / 2**30,
                     "adamw8bit_floor_gib": (weights + trained * 6) / 2**30})
    return rows


def write_data(folder: Path, image: int, identities: int = 2, views: int = 9) -> Path:
    import numpy as np
    from PIL import Image

    from dp3d_core.cameras import intrinsics_from_focal, sample_lookat, to_label

    from .data import CONDITION_DIR, write_labels
    rng = np.random.default_rng(0)
    entries = []
    for i in range(identities):
        for v in range(views):
            rel = f"id{i}/v{v}.png"
            for root in (folder, folder / CONDITION_DIR):
                (root / f"id{i}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (image, image, 3), dtype=np.uint8)).save(root / rel)
            entries.append((rel, to_label(sample_lookat(np.pi / 2 + rng.uniform(-0.5, 0.5), np.pi / 2),
                                          intrinsics_from_focal())))
    write_labels(folder, entries)
    return folder


def peak_memory() -> tuple[float, str]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU peak RSS"


def measure(stage: str, model: Path, data: Path, image: int, checkpointing: bool, precision: str,
            steps: int) -> dict[str, Any]:
    """One configuration, in this process."""
    import torch

    from .config import make_config
    from .train import Trainer
    cfg = make_config({"data_root": str(data), "image_size": image, "init_model": str(model),
                       "output_dir": tempfile.mkdtemp(prefix="dp3d-bench-"), "batch_size": 1,
                       "num_targets": 8 if stage == "3" else 1, "max_steps": steps + 1, "lr": 1e-5,
                       "gradient_checkpointing": checkpointing, "mixed_precision": precision,
                       "cache_images": True}, stage)
    trainer = Trainer(cfg, resume=False)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()  # warm-up (first-call allocations, caches), counting the step's floating-point work
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    memory, kind = peak_memory()
    trainable = sum(p.numel() for p in trainer.trainable.parameters() if p.requires_grad)
    return {"stage": stage, "checkpointing": checkpointing, "precision": precision, "s_per_step": seconds,
            "peak_gib": memory, "memory": kind, "trainable_params": trainable, "device": str(trainer.device),
            "views": cfg.num_targets, "tflop_per_step": counter.get_total_flops() / 1e12}


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | views | checkpointing | precision | s/step | peak memory (GiB) | trainable params | TFLOP/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['views']} | {'on' if r['checkpointing'] else 'off'} | {r['precision']} "
                     f"| {r['s_per_step']:.2f} | {r['peak_gib']:.2f} ({r['memory']}) | {r['trainable_params'] / 1e6:.1f} M "
                     f"| {r['tflop_per_step']:.3f} |")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", nargs="+", default=["1", "2", "3"], choices=["1", "2", "3"])
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--precision", nargs="+", default=["no"], choices=["no", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--work", help="folder for the random model and data (default: a temporary one)")
    parser.add_argument("--out-json", help="also write the rows here")
    parser.add_argument("--memory-floor", action="store_true",
                        help="only count each stage's weights, gradients and optimizer moments (nothing is run)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON, in a child
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["stage"], Path(spec["model"]), Path(spec["data"]), spec["image"],
                                 spec["checkpointing"], spec["precision"], spec["steps"])))
        return 0
    if args.memory_floor:
        print(f"size {args.size}: memory before activations (float32 weights of every network + the trainable "
              f"network's gradients + optimizer moments)")
        print("| stage | all params | trainable | weights | + gradients + AdamW | + gradients + AdamW8bit |")
        print("|---|---|---|---|---|---|")
        for r in memory_floor(args.size, args.stage):
            print(f"| {r['stage']} | {r['all_params'] / 1e6:.1f} M | {r['trainable_params'] / 1e6:.1f} M "
                  f"| {r['weights_gib']:.2f} GiB | {r['adamw_floor_gib']:.2f} GiB "
                  f"| {r['adamw8bit_floor_gib']:.2f} GiB |")
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="dp3d-bench-"))
    image = SIZES[args.size]["image"]
    model = work / f"model_{args.size}"
    if not (model / "model_index.json").is_file():
        write_model(args.size, model)
    data = work / f"data_{image}"
    if not (data / "dataset.json").is_file():
        write_data(data, image)
    rows = []
    print(f"machine: {machine()}; size {args.size} ({image} px)", flush=True)
    for stage in args.stage:
        for precision in args.precision:
            for checkpointing in (False, True):
                spec = {"stage": stage, "model": str(model), "data": str(data), "image": image,
                        "checkpointing": checkpointing, "precision": precision, "steps": args.steps}
                done = subprocess.run([sys.executable, "-m", "training.bench", "--one", json.dumps(spec)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
                    print(f"stage {stage} {precision} checkpointing={checkpointing}: failed: {tail[0]}", flush=True)
                    continue
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"machine": machine(), "size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
