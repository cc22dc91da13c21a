"""Held-out evaluation of a DiffPortrait360 model folder all around the head, per yaw sector.

``python -m training.evaluate360 --model models/small360 --data DIR/test [--baseline-3d models/small]
--out-md eval.md --out-grid eval.png``

Data: a full-turn split (``training.render_dataset --full-turn``). Per held-out identity: the reference is its
frontal view (``v00``, as in :mod:`dp3d_core.held_out`), the back view is the one straight behind (yaw 180) and
the targets are ALL its other views sorted by yaw (the back view included), generated as one closed-loop turn
(``closed_loop=True``, 8-view windows) from their condition images with one seed for every method.

Every generated view is scored against the true view (PSNR, SSIM, head-mask IoU: :mod:`training.evaluate`) and
the scores are averaged per yaw sector of the target camera: front (|yaw| < 45 degrees), sides (45..135), back
(>= 135), and over all views.

Methods (rows): baselines *reference copied* (the front photo as every view) and *projected proxy* (the
dataset's ``proxy/`` renders: the reference projected onto the add-on's generic proxy head, seen from each
target camera; ``render_dataset --proxies``); the model with the back view made by its back-head model (the
one-shot run); the model given the TRUE back view (what an artist's own back photo gives); the model with
3D-aware noise; and, with ``--baseline-3d``, a DiffPortrait3D model (e.g. ``models/small``) asked for the same
views. Separately the back-head model alone: its back view against the true back view, next to copying the
reference and the proxy at the back camera.
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
from PIL import Image, ImageDraw

from dp3d_core.held_out import label_yaw
from dp3d_core.pipeline import PipelineError

from .data import (BACK_MIN_YAW, CONDITION_DIR, FRONT_MAX_YAW, PROXY_DIR, DatasetError, ImageLoadError,
                   load_image, read_labels)
from .evaluate import EvaluationError, head_mask, mask_iou, ssim
from .validate import to_uint8

SECTORS = (("front", 0.0, 45.0), ("sides", 45.0, 135.0), ("back", 135.0, 180.01))


def sector_of(yaw: float) -> str:
    """The yaw sector of a camera (degrees)."""
    a = abs(float(yaw))
    return next(name for name, lo, hi in SECTORS if lo <= a < hi)


@dataclass
class TurnSample:
    """One held-out identity (images in [0, 1]); targets sorted by yaw."""

    name: str
    reference: torch.Tensor          # [3, S, S] frontal view
    back: torch.Tensor               # [3, S, S] true back view
    back_condition: torch.Tensor     # [3, S, S]
    back_proxy: torch.Tensor | None  # [3, S, S]
    yaws: list[float]
    conditions: torch.Tensor         # [V, 3, S, S]
    truth: torch.Tensor              # [V, 3, S, S]
    proxies: torch.Tensor | None     # [V, 3, S, S]


def load_turns(data: str | Path, identities: int, size: int) -> list[TurnSample]:
    """The first ``identities`` identities that have a frontal and a back view (an unreadable one is skipped)."""
    data = Path(data)
    try:
        labels = read_labels(data)
    except (DatasetError, OSError) as exc:
        raise EvaluationError(f"cannot read the dataset at {data}: {exc}") from None
    by_id: dict[str, list[tuple[str, float]]] = {}
    for rel, label in labels:
        by_id.setdefault(rel.split("/")[0], []).append((rel, label_yaw(label)))
    load = lambda p: (load_image(p, size) + 1) / 2  # noqa: E731
    samples: list[TurnSample] = []
    for name in sorted(by_id):
        views = sorted(by_id[name])
        reference, ref_yaw = views[0]
        others = sorted(views[1:], key=lambda e: e[1])
        back_rel, back_yaw = max(others, key=lambda e: abs(e[1])) if others else ("", 0.0)
        if abs(ref_yaw) > FRONT_MAX_YAW or abs(back_yaw) < BACK_MIN_YAW or len(others) < 2:
            continue
        try:
            proxy_paths = [data / PROXY_DIR / rel for rel, _ in others]
            samples.append(TurnSample(
                name, load(data / reference), load(data / back_rel), load(data / CONDITION_DIR / back_rel),
                load(data / PROXY_DIR / back_rel) if (data / PROXY_DIR / back_rel).is_file() else None,
                [yaw for _, yaw in others],
                torch.stack([load(data / CONDITION_DIR / rel) for rel, _ in others]),
                torch.stack([load(data / rel) for rel, _ in others]),
                torch.stack([load(p) for p in proxy_paths]) if all(p.is_file() for p in proxy_paths) else None))
        except ImageLoadError as exc:
            print(f"warning: skipping identity {name}: {exc}", file=sys.stderr)
            continue
        if len(samples) == identities:
            break
    if not samples:
        raise EvaluationError(f"no identity in {data} has a frontal view, a back view (yaw 180) and other views "
                              f"with condition images; render the split with training.render_dataset --full-turn")
    return samples


def per_view_scores(pred: torch.Tensor, truth: torch.Tensor) -> list[dict[str, float]]:
    """PSNR, SSIM and head-mask IoU of every view (``[V, 3, H, W]`` in [0, 1])."""
    mse = ((pred.float() - truth.float()) ** 2).flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-10)), torch.full_like(mse, 100.0))
    s = ssim(pred, truth)
    iou = mask_iou(head_mask(pred), head_mask(truth))
    return [{"psnr": float(psnr[i]), "ssim": float(s[i]), "mask_iou": float(iou[i])} for i in range(len(pred))]


def sector_means(rows: list[tuple[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """(sector, scores) of every view -> sector (and "all") -> metric -> mean, plus the view count ``n``."""
    out: dict[str, dict[str, float]] = {}
    for sector in [name for name, _, _ in SECTORS] + ["all"]:
        picked = [s for sec, s in rows if sector in ("all", sec)]
        if picked:
            out[sector] = {k: float(np.mean([p[k] for p in picked])) for k in picked[0]}
            out[sector]["n"] = len(picked)
    return out


METHODS: dict[str, str] = {
    "reference": "baseline: reference copied unchanged",
    "proxy": "baseline: projected proxy render",
    "baseline_3d": "DiffPortrait3D model (no back view)",
    "full": "model (back view from its back-head model)",
    "true_back": "model given the true back view",
    "aware_noise": "model + 3D-aware noise (back-head back view)",
}


def evaluate_turns(model: str | Path, data: str | Path, identities: int = 9, steps: int = 20,
                   guidance: float = 3.0, seed: int = 0, baseline_3d: str | Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per method: sector -> metric -> mean; the back-head table; images for the grid."""
    from dp3d_core.model_folder import ModelFolderError
    from dp3d_core.pipeline import DiffPortrait3DPipeline
    from dp3d_core.pipeline360 import DiffPortrait360Pipeline

    model = Path(model)
    back_dir = model / "back_head"
    if not (back_dir / "model_index.json").is_file():
        raise EvaluationError(f"{model} has no back-head model (back_head/); this evaluation runs both models")
    try:
        pipe = DiffPortrait360Pipeline.from_pretrained(model, back_head=back_dir)
        pipe3d = DiffPortrait3DPipeline.from_pretrained(baseline_3d) if baseline_3d else None
    except (ModelFolderError, OSError, ValueError) as exc:
        raise EvaluationError(str(exc)) from None
    size = int(pipe.vae.config.sample_size or 64)
    samples = load_turns(data, identities, size)
    has_proxies = all(s.proxies is not None for s in samples)

    def as_tensor(images: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().clamp(0, 1)

    common = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np", closed_loop=True)
    outputs: dict[str, list[torch.Tensor]] = {m: [] for m in METHODS}
    backs: dict[str, list[torch.Tensor]] = {"reference": [], "proxy": [], "back_head": []}
    for s in samples:
        if progress:
            progress(f"identity {s.name}")
        conds = list(s.conditions)
        views = len(conds)
        outputs["reference"].append(s.reference[None].expand(views, -1, -1, -1))
        if s.proxies is not None:
            outputs["proxy"].append(s.proxies)
        full = pipe(s.reference, conds, back_condition_image=s.back_condition, seed=seed, **common)
        outputs["full"].append(as_tensor(full.images))
        back = torch.from_numpy(full.back_image).permute(2, 0, 1).float().clamp(0, 1)
        backs["back_head"].append(back[None])
        backs["reference"].append(s.reference[None])
        if s.back_proxy is not None:
            backs["proxy"].append(s.back_proxy[None])
        outputs["true_back"].append(as_tensor(pipe(s.reference, conds, back_image=s.back, seed=seed,
                                                   **common).images))
        if s.proxies is not None:
            outputs["aware_noise"].append(as_tensor(pipe(s.reference, conds, back_image=full.back_image,
                                                         proxy_images=list(s.proxies), seed=seed,
                                                         **common).images))
        if pipe3d is not None:
            outputs["baseline_3d"].append(as_tensor(pipe3d(s.reference, conds, seed=seed, **common).images))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for method, preds in outputs.items():
        if len(preds) != len(samples):
            continue
        rows = [(sector_of(yaw), sc) for p, s in zip(preds, samples)
                for yaw, sc in zip(s.yaws, per_view_scores(p, s.truth))]
        scores[method] = sector_means(rows)
    truth_backs = torch.stack([s.back for s in samples])
    back_scores = {}
    for method, images in backs.items():
        if len(images) == len(samples):
            per = per_view_scores(torch.cat(images), truth_backs)
            back_scores[method] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    return {"scores": scores, "back_scores": back_scores, "samples": samples, "outputs": outputs,
            "backs": backs,
            "notes": {"proxy": "dataset proxy/ renders" if has_proxies else "none (render_dataset --proxies)"},
            "settings": {"model": str(model), "data": str(data), "identities": len(samples), "steps": steps,
                         "guidance": guidance, "seed": seed, "baseline_3d": baseline_3d and str(baseline_3d),
                         "views": sum(len(s.yaws) for s in samples)}}


BACK_METHODS = {"reference": "baseline: reference copied unchanged", "proxy": "baseline: projected proxy render",
                "back_head": "back-head model"}


def markdown_tables(result: dict[str, Any], command: str | None = None) -> str:
    st = result["settings"]
    lines = ["```", command, "```", ""] if command else []
    counts = next(iter(result["scores"].values()))
    lines += [f"Model `{st['model']}`, data `{st['data']}`: {st['identities']} held-out identities, every view but "
              f"the frontal reference ({st['views']} views: "
              + ", ".join(f"{k} {int(counts[k]['n'])}" for k in ("front", "sides", "back") if k in counts)
              + f"), one closed-loop turn each, {st['steps']} DDIM steps, guidance {st['guidance']}, "
              f"seed {st['seed']}. Proxy: {result['notes']['proxy']}.", "",
              "| method | " + " | ".join(f"{sec} PSNR / SSIM / IoU" for sec in ("front", "sides", "back", "all"))
              + " |", "|---|---|---|---|---|"]
    for method, by_sector in result["scores"].items():
        cells = [f"{by_sector[sec]['psnr']:.2f} / {by_sector[sec]['ssim']:.3f} / {by_sector[sec]['mask_iou']:.3f}"
                 if sec in by_sector else "–" for sec in ("front", "sides", "back", "all")]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Back view alone (the view straight behind, against the true one):", "",
              "| method | PSNR (dB) ↑ | SSIM ↑ | head-mask IoU ↑ |", "|---|---|---|---|"]
    for method, s in result["back_scores"].items():
        lines.append(f"| {BACK_METHODS[method]} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['mask_iou']:.3f} |")
    return "\n".join(lines) + "\n"


GRID_ROWS = (("condition", "conditions"), ("proxy", "proxies"), ("truth", "truth"), ("model", "full"),
             ("true back", "true_back"), ("DP3D small", "baseline_3d"))


def save_turn_grid(result: dict[str, Any], path: str | Path, identities: int = 3, pad: int = 2,
                   label_width: int = 72, palette: bool = False) -> Path:
    """Per identity a block of rows; first column: the reference (truth row: the true back view; model row: the
    back-head model's back view)."""
    rows: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
    outputs = result["outputs"]
    for i, s in enumerate(result["samples"][:identities]):
        firsts = {"conditions": s.reference, "truth": s.back, "full": result["backs"]["back_head"][i][0]}
        for label, key in GRID_ROWS:
            images = getattr(s, key) if key in ("conditions", "proxies", "truth") else (
                outputs[key][i] if len(outputs.get(key, [])) > i else None)
            if images is not None:
                rows.append((label, firsts.get(key), images))
    n = max(r[2].shape[0] for r in rows)
    h, w = rows[0][2].shape[-2:]
    grid = Image.new("RGB", (label_width + (n + 1) * (w + pad) + pad, len(rows) * (h + pad) + pad), (255,) * 3)
    draw = ImageDraw.Draw(grid)
    for r, (label, first, images) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        for c, tile in enumerate([first] + list(images)):
            if tile is not None:
                grid.paste(Image.fromarray(to_uint8(tile[None] * 2 - 1)[0]), (label_width + pad + c * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        grid = grid.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid.save(path, optimize=True)
    return path


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate360", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="DiffPortrait360 view model folder with back_head/ inside")
    parser.add_argument("--data", required=True, help="a held-out full-turn split (e.g. DIR/test)")
    parser.add_argument("--baseline-3d", help="a DiffPortrait3D model folder to compare with (e.g. models/small)")
    parser.add_argument("--out-md", help="markdown tables to write")
    parser.add_argument("--out-grid", help="image grid PNG to write")
    parser.add_argument("--grid-identities", type=int, default=3)
    parser.add_argument("--grid-palette", action="store_true", help="256-colour grid PNG (smaller)")
    parser.add_argument("--identities", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
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
        result = evaluate_turns(args.model, args.data, args.identities, args.steps, args.guidance, args.seed,
                                args.baseline_3d, progress=lambda m: print(m, file=sys.stderr))
    except (EvaluationError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m training.evaluate360 " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    text = markdown_tables(result, command)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    if args.out_grid:
        save_turn_grid(result, args.out_grid, args.grid_identities, palette=args.grid_palette)
    print(text)
    print(json.dumps({"scores": result["scores"], "back_scores": result["back_scores"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
