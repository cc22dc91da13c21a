"""Does F read the reference? ``python -m training.reference_check --model DIR --data DIR``.

Held-out target views are noised to a few timesteps (fixed noise) and denoised once by

* F alone (no reference, no camera condition),
* F reading F_ref's attention bank of the identity's own reference view (stage 1's pass),
* the same with a *wrong* reference: another identity's view,
* F + F_ref + F_cam (stage 2's pass: with the condition image),

and the x0 error of each is reported (MSE of the predicted clean latent, ``(x_t - sqrt(1-a) eps_hat) / sqrt(a)``,
against the true one). A model that uses the reference has ``right`` clearly below ``none`` and ``wrong``; the
colours of a generated view are decided at the high timesteps, so those rows matter most.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable

import numpy as np
import torch

TIMESTEPS = (999, 900, 700, 500, 200)


def reference_errors(model: str, data: str, targets: int = 4, timesteps: Iterable[int] = TIMESTEPS,
                     seed: int = 0) -> list[dict[str, Any]]:
    """One row per timestep: x0-MSE for ``none``, ``right``, ``wrong`` and ``with_camera``."""
    from dp3d_core.model_folder import load_model_folder, make_denoiser
    from dp3d_core.schedulers import make_scheduler

    from .data import MultiViewDataset, collate
    from .models import detach_view_modules
    from .stages import StageInputs, predict, prepare_inputs

    components = load_model_folder(model)
    dataset = MultiViewDataset(data, size=8 * components["unet"].config.sample_size, num_targets=targets,
                               need_conditions=True, seed=seed)
    if len(dataset) < 2:
        raise ValueError(f"{data}: a wrong reference needs at least two identities, found {len(dataset)}")
    rng = np.random.default_rng(seed)
    batch = collate([dataset.sample(i, rng) for i in range(len(dataset))])
    generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(dataset))]
    inputs = prepare_inputs(batch, components["vae"], generators, torch.device("cpu"))
    wrong = StageInputs(inputs.x0, inputs.reference.roll(targets, 0), inputs.condition, 1)  # next identity's
    acp = make_scheduler("ddim", dict(components["scheduler"].config)).alphas_cumprod
    context = components["prompt_embedding"]()
    denoiser = make_denoiser(components, clip_length=1)
    detach_view_modules(denoiser)
    rows = []
    for t in timesteps:
        eps = torch.randn(inputs.x0.shape, generator=torch.Generator().manual_seed(seed * 1000 + int(t)))
        a = acp[int(t)].float()
        xt = a.sqrt() * inputs.x0 + (1 - a).sqrt() * eps
        tt = torch.full((xt.shape[0],), int(t))

        def x0_error(eps_hat: torch.Tensor) -> float:
            x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
            return float(((x0_hat - inputs.x0) ** 2).mean())
        with torch.no_grad():
            rows.append({"t": int(t),
                         "none": x0_error(predict("0", denoiser, xt, tt, context, inputs)),
                         "right": x0_error(predict("1", denoiser, xt, tt, context, inputs)),
                         "wrong": x0_error(predict("1", denoiser, xt, tt, context, wrong)),
                         "with_camera": x0_error(predict("2", denoiser, xt, tt, context, inputs))})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| t | x0-MSE, no reference | right reference | wrong identity's reference | right reference + camera "
             "condition | right / none |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['t']} | {r['none']:.4f} | {r['right']:.4f} | {r['wrong']:.4f} | {r['with_camera']:.4f} | "
                     f"{r['right'] / r['none']:.3f} |")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.reference_check", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--data", required=True, help="held-out dataset folder (dataset.json + cond/)")
    parser.add_argument("--targets", type=int, default=4, help="target views per identity")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from dp3d_core.model_folder import ModelFolderError

    from .data import DatasetError
    try:
        rows = reference_errors(args.model, args.data, args.targets)
    except (ModelFolderError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
