"""Held-out check of a model folder through the real pipeline:
``python -m training.evaluate --model models/small --data DIR/test --out grid.png``.

For each held-out identity: reference = its frontal view (v00), the 8 next views' condition images in
order, generated with ``DiffPortrait3DPipeline``; grid rows = identities x views, columns
reference | condition | generated | ground truth. Prints the mean absolute error (0..1 scale) of the
generated views against the ground truth, and of the condition images (a different identity) as a baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data import CONDITION_DIR, load_image, read_labels
from .validate import save_grid


def evaluate(model: str | Path, data: str | Path, out: str | Path, identities: int = 3, views: int = 8,
             steps: int = 25, guidance: float = 1.0, seed: int = 0) -> dict[str, float]:
    from dp3d_core.pipeline import DiffPortrait3DPipeline

    pipe = DiffPortrait3DPipeline.from_model_folder(model)
    data = Path(data)
    by_id: dict[str, list[str]] = {}
    for rel, _ in read_labels(data):
        by_id.setdefault(rel.split("/")[0], []).append(rel)
    size = int(pipe.vae.config.sample_size) if pipe.vae.config.sample_size else 64
    cols: list[list[torch.Tensor]] = [[], [], [], []]
    errors, baseline = [], []
    for name in sorted(by_id)[:identities]:
        rels = sorted(by_id[name])
        ref = load_image(data / rels[0], size)
        targets = rels[1:1 + views]
        conds = torch.stack([load_image(data / CONDITION_DIR / r, size) for r in targets])
        truth = torch.stack([load_image(data / r, size) for r in targets])
        result = pipe(((ref + 1) / 2), list((conds + 1) / 2), num_inference_steps=steps, guidance_scale=guidance,
                      seed=seed, output_type="np").images
        generated = torch.from_numpy(np.asarray(result)).permute(0, 3, 1, 2) * 2 - 1
        errors.append(float((generated - truth).abs().mean() / 2))
        baseline.append(float((conds - truth).abs().mean() / 2))
        for col, value in zip(cols, (ref[None].expand(len(targets), -1, -1, -1), conds, generated, truth)):
            col.append(value)
    save_grid([torch.cat(c) for c in cols], out)
    return {"mae_generated": float(np.mean(errors)), "mae_condition_baseline": float(np.mean(baseline))}


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a dataset split (e.g. DIR/test)")
    parser.add_argument("--out", required=True, help="grid PNG to write")
    parser.add_argument("--identities", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    print(json.dumps(evaluate(args.model, args.data, args.out, args.identities, steps=args.steps,
                              guidance=args.guidance)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
