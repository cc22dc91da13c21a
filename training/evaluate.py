"""Held-out evaluation of a model folder through the real pipeline (issue 5, section 5).

``python -m training.evaluate --model models/small --data DIR/test --out-md eval.md --out-grid eval.png
[--stage0-model RUN/stage0/model]``

Per held-out identity: reference = its frontal view (``v00``), targets = the next ``views`` views sorted by
camera azimuth (so a window is a left-to-right sweep), generated as one window with ``DiffPortrait3DPipeline``
from the targets' condition images. Every method is scored against the true target views:

- PSNR (dB, images in [0, 1], capped at 100 for identical images), SSIM (gaussian window 11, sigma 1.5, per
  channel, valid region), head-mask IoU (mask = pixels whose largest channel difference from the background
  colour, the median of the four 4x4 corners, exceeds 0.1);
- view consistency: the mean absolute difference between consecutive views of the window (0..1), and its
  ratio to the same quantity for the ground-truth views (1 = the views change as much as the truth does;
  far above 1 = flicker, 0 = the same image repeated).

Methods: baselines *reference copied* and *proxy render alone* (the dataset's ``proxy/`` renders if it has
them, otherwise the condition image, a different identity at the target camera); the model; the model with
3D-aware noise (the proxy, or the condition image, mixed into x_T); ablations *without view modules* (their
output projections zeroed, which makes every module the identity: the model before stage 3) and *without
stage-1 fine-tuning* (F_ref replaced by the stage-0 hand-over copy of F, from ``--stage0-model``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dp3d_core.held_out import reference_and_targets
from dp3d_core.metrics import psnr

from .data import CONDITION_DIR, PROXY_DIR, DatasetError, ImageLoadError, load_image, read_labels
from .validate import to_uint8



class EvaluationError(ValueError):
    """Bad evaluation input (missing model, dataset too small, ...), with a plain-words message."""


# ------------------------------------------------------------------ metrics (images [N, 3, H, W] in [0, 1])

def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(pred: torch.Tensor, truth: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004 constants, data range 1, channels averaged)."""
    a, b = pred.float(), truth.float()
    c = a.shape[1]
    if min(a.shape[-2:]) < size:
        raise EvaluationError(f"images of {tuple(a.shape[-2:])} px are smaller than the {size} px SSIM window")
    w = gaussian_window(size, sigma).to(a.device)[None, None].expand(c, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def background_colour(images: torch.Tensor, corner: int = 4) -> torch.Tensor:
    """``[N, 3]``: per image, the median colour of its four ``corner`` x ``corner`` corner patches."""
    k = corner
    patches = [images[..., :k, :k], images[..., :k, -k:], images[..., -k:, :k], images[..., -k:, -k:]]
    pixels = torch.cat([p.flatten(2) for p in patches], dim=2)  # [N, 3, 4k^2]
    return pixels.median(dim=2).values


def head_mask(images: torch.Tensor, threshold: float = 0.1, corner: int = 4) -> torch.Tensor:
    """``[N, H, W]`` bool: pixels that differ from the background colour by more than ``threshold``."""
    bg = background_colour(images, corner)[..., None, None]
    return (images.float() - bg).abs().amax(dim=1) > threshold


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per mask pair (``[N, H, W]`` bool); two empty masks count as 1."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def consecutive_difference(views: torch.Tensor) -> float:
    """Mean absolute difference between consecutive views of one window ``[V, 3, H, W]`` (0..1)."""
    if views.shape[0] < 2:
        return 0.0
    return float((views[1:].float() - views[:-1].float()).abs().mean())


def score(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """All metrics of one window (``[V, 3, H, W]`` in [0, 1]) against its ground truth."""
    gen_diff, gt_diff = consecutive_difference(pred), consecutive_difference(truth)
    return {"psnr": float(psnr(pred, truth).mean()), "ssim": float(ssim(pred, truth).mean()),
            "mask_iou": float(mask_iou(head_mask(pred), head_mask(truth)).mean()),
            "consecutive_diff": gen_diff, "consecutive_diff_truth": gt_diff,
            "consistency_ratio": gen_diff / gt_diff if gt_diff > 0 else float("nan")}


# ------------------------------------------------------------------ data

@dataclass
class Sample:
    """One held-out identity: images ``[3, S, S]`` / ``[V, 3, S, S]`` in [0, 1]."""

    name: str
    reference: torch.Tensor
    conditions: torch.Tensor
    truth: torch.Tensor
    proxies: torch.Tensor | None


def load_samples(data: str | Path, identities: int, views: int, size: int) -> list[Sample]:
    """The first ``identities`` readable identities with at least ``views + 1`` views (:mod:`dp3d_core.held_out`);
    an identity with an unreadable image is skipped with a warning."""
    data = Path(data)
    try:
        labels = read_labels(data)
    except (DatasetError, OSError) as exc:
        raise EvaluationError(f"cannot read the dataset at {data}: {exc}") from None
    samples: list[Sample] = []
    for name, reference, targets in reference_and_targets(labels, views):
        try:
            load = lambda p: (load_image(p, size) + 1) / 2  # noqa: E731
            ref = load(data / reference)
            truth = torch.stack([load(data / r) for r in targets])
            conds = torch.stack([load(data / CONDITION_DIR / r) for r in targets])
            proxy_paths = [data / PROXY_DIR / r for r in targets]
            proxies = torch.stack([load(p) for p in proxy_paths]) if all(p.is_file() for p in proxy_paths) else None
        except ImageLoadError as exc:
            print(f"warning: skipping identity {name}: {exc}", file=sys.stderr)
            continue
        samples.append(Sample(name, ref, conds, truth, proxies))
        if len(samples) == identities:
            break
    if not samples:
        raise EvaluationError(f"no identity in {data} has {views + 1} readable views (reference + {views} targets) "
                              f"with condition images; render a test split with --views {views + 1} or more")
    return samples


# ------------------------------------------------------------------ model variants

def _pipeline(components: dict[str, Any]) -> Any:
    from dp3d_core.pipeline import DiffPortrait3DPipeline
    return DiffPortrait3DPipeline(**components)


def load_variants(model: str | Path, stage0_model: str | Path | None) -> dict[str, Any]:
    """Pipelines: ``full``, ``no_view_modules`` and (with ``stage0_model``) ``no_stage1``. Each is loaded
    afresh, so the variants share no modules (the denoiser installs hooks on the networks)."""
    from dp3d_core.model_folder import ModelFolderError, load_model_folder

    from .models import zero_view_outputs

    try:
        variants = {"full": _pipeline(load_model_folder(model))}
        no_view = load_model_folder(model)
        zero_view_outputs(no_view["view_modules"])
        variants["no_view_modules"] = _pipeline(no_view)
        if stage0_model is not None:
            no_s1 = load_model_folder(model)
            no_s1["reference_unet"] = load_model_folder(stage0_model, components=["reference_unet"])["reference_unet"]
            variants["no_stage1"] = _pipeline(no_s1)
    except ModelFolderError as exc:
        raise EvaluationError(str(exc)) from None
    return variants


# ------------------------------------------------------------------ evaluation

METHODS: dict[str, str] = {
    "reference": "baseline: reference copied unchanged",
    "proxy": "baseline: proxy render alone",
    "full": "model",
    "aware_noise": "model + 3D-aware noise",
    "no_view_modules": "ablation: without view modules",
    "no_stage1": "ablation: without stage-1 fine-tuning (stage-0 F_ref)",
}


def evaluate(model: str | Path, data: str | Path, identities: int = 3, views: int = 8, steps: int = 20,
             guidance: float = 1.0, seed: int = 0, stage0_model: str | Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Scores (method -> metric -> mean over identities), per-identity images for the grid, and notes."""
    variants = load_variants(model, stage0_model)
    pipe = variants["full"]
    size = int(pipe.vae.config.sample_size or 64)
    if views != pipe.clip_length:
        raise EvaluationError(f"this model generates windows of {pipe.clip_length} views; use --views "
                              f"{pipe.clip_length}")
    samples = load_samples(data, identities, views, size)
    has_proxies = all(s.proxies is not None for s in samples)

    def run(p: Any, s: Sample, proxies: torch.Tensor | None) -> torch.Tensor:
        out = p(s.reference, list(s.conditions), proxy_images=None if proxies is None else list(proxies),
                num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="np").images
        return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float().clamp(0, 1)

    outputs: dict[str, list[torch.Tensor]] = {m: [] for m in METHODS}
    for s in samples:
        if progress:
            progress(f"identity {s.name}")
        proxy = s.proxies if s.proxies is not None else s.conditions
        outputs["reference"].append(s.reference[None].expand(views, -1, -1, -1))
        outputs["proxy"].append(proxy)
        outputs["full"].append(run(variants["full"], s, None))
        outputs["aware_noise"].append(run(variants["full"], s, proxy))
        outputs["no_view_modules"].append(run(variants["no_view_modules"], s, None))
        if "no_stage1" in variants:
            outputs["no_stage1"].append(run(variants["no_stage1"], s, None))
    scores: dict[str, dict[str, float]] = {}
    for method, preds in outputs.items():
        if not preds:
            continue
        per = [score(p, s.truth) for p, s in zip(preds, samples)]
        scores[method] = {k: float(np.mean([d[k] for d in per])) for k in per[0]}
    notes = {"proxy_source": "dataset proxy/ renders" if has_proxies else
             "condition images (no proxy/ renders in the dataset: the condition, a different identity at the "
             "target camera, stands in as the geometric proxy)",
             "no_stage1": "run" if stage0_model is not None else "not run (give --stage0-model)"}
    return {"scores": scores, "samples": samples, "outputs": outputs, "notes": notes,
            "settings": {"model": str(model), "data": str(data), "identities": len(samples), "views": views,
                         "steps": steps, "guidance": guidance, "seed": seed,
                         "stage0_model": None if stage0_model is None else str(stage0_model)}}


def markdown_table(result: dict[str, Any], command: str | None = None) -> str:
    """The scores as a markdown table, with the settings and the command that made it."""
    st, notes = result["settings"], result["notes"]
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Model `{st['model']}`, data `{st['data']}`: {st['identities']} held-out identities x {st['views']} "
              f"views (reference = frontal view), {st['steps']} DDIM steps, guidance {st['guidance']}, "
              f"seed {st['seed']}. Proxy: {notes['proxy_source']}.", "",
              "| method | PSNR (dB) ↑ | SSIM ↑ | head-mask IoU ↑ | consecutive-view diff | ratio to truth (1 = ideal) |",
              "|---|---|---|---|---|---|"]
    for method, s in result["scores"].items():
        lines.append(f"| {METHODS[method]} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['mask_iou']:.3f} | "
                     f"{s['consecutive_diff']:.3f} | {s['consistency_ratio']:.2f} |")
    truth = next(iter(result["scores"].values()))["consecutive_diff_truth"]
    lines += ["", f"Ground-truth consecutive-view diff: {truth:.3f}."]
    if "no_stage1" not in result["scores"]:
        lines.append(f"Ablation without stage-1 fine-tuning: {notes['no_stage1']}.")
    return "\n".join(lines) + "\n"


# (label, key): a Sample field (the inputs and the truth; "proxies" only when the dataset has them) or a method
GRID_ROWS = (("condition", "conditions"), ("proxy", "proxies"), ("truth", "truth"), ("model", "full"),
             ("3D noise", "aware_noise"), ("no view mod.", "no_view_modules"), ("no stage 1", "no_stage1"))
SAMPLE_FIELDS = ("conditions", "proxies", "truth")


def save_eval_grid(result: dict[str, Any], path: str | Path, identities: int | None = None, pad: int = 2,
                   label_width: int = 72, palette: bool = False) -> Path:
    """Per identity a block of rows (condition, proxy, truth, model, variants), the reference in the first column.
    ``palette``: save as a 256-colour PNG (about a third of the size, for the docs)."""
    samples: list[Sample] = result["samples"][:identities]
    outputs = result["outputs"]
    rows: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
    for i, s in enumerate(samples):
        block = [(label, getattr(s, key) if key in SAMPLE_FIELDS else outputs[key][i] if outputs.get(key) else None)
                 for label, key in GRID_ROWS]
        block = [(label, images) for label, images in block if images is not None]
        rows.extend((label, s.reference if j == 0 else None, images) for j, (label, images) in enumerate(block))
    n_views = rows[0][2].shape[0]
    h, w = rows[0][2].shape[-2:]
    width = label_width + (n_views + 1) * (w + pad) + pad
    height = len(rows) * (h + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, ref, images) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        tiles = ([ref] if ref is not None else [None]) + list(images)
        for c, tile in enumerate(tiles):
            if tile is None:
                continue
            x = label_width + pad + c * (w + pad)
            grid.paste(Image.fromarray(to_uint8(tile[None] * 2 - 1)[0]), (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        grid = grid.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid.save(path, optimize=True)
    return path


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder to evaluate")
    parser.add_argument("--data", required=True, help="a held-out dataset split (e.g. DIR/test)")
    parser.add_argument("--out-md", help="markdown table to write")
    parser.add_argument("--out-grid", help="image grid PNG to write")
    parser.add_argument("--grid-identities", type=int, default=3, help="identities shown in the grid")
    parser.add_argument("--grid-palette", action="store_true", help="256-colour grid PNG (smaller)")
    parser.add_argument("--stage0-model", help="the run's stage-0 model folder (for the no-stage-1 ablation)")
    parser.add_argument("--identities", type=int, default=6)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, value in (("--identities", args.identities), ("--steps", args.steps)):
        if value < 1:
            print(f"error: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        result = evaluate(args.model, args.data, args.identities, args.views, args.steps, args.guidance,
                          args.seed, args.stage0_model, progress=lambda m: print(m, file=sys.stderr))
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m training.evaluate " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    table = markdown_table(result, command)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(table)
    if args.out_grid:
        save_eval_grid(result, args.out_grid, args.grid_identities, palette=args.grid_palette)
    print(table)
    print(json.dumps({"scores": result["scores"], "notes": result["notes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
