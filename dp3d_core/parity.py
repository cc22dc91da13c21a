"""Numerical parity against the official code: ``python -m dp3d_core.parity <fixture dir>``.

Converts the fixture's official-key state dict with the same converter as real checkpoints, builds the networks
from ``parity_config.json``, recomputes every output group present in ``parity_io.safetensors`` (single denoiser
evaluations ``tNNN.*``, the 3D-aware initial latent ``init.*``, the DDIM run ``ddim.*``) and compares.
Exit status 0 only when every error is within tolerance (fp32).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

TOLERANCES = {"eps": 1e-4, "eps_cfg": 2e-4, "latent": 5e-4, "init": 1e-6, "schedule": 1e-6}


class ParityError(RuntimeError):
    """The fixture folder is incomplete or unreadable."""


@dataclass
class Check:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass
class ParityResult:
    checks: list[Check] = field(default_factory=list)
    conversion: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
        if ours.shape != reference.shape:
            self.checks.append(Check(f"{name} (shape {tuple(ours.shape)} vs {tuple(reference.shape)})",
                                     math.inf, tolerance))
            return
        diff = ours.detach().double().cpu() - reference.double().cpu()
        self.checks.append(Check(name, float(diff.abs().max()), tolerance))

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=10)
        lines = [f"{c.name:<{width}}  max|err| {c.error:.3e}  tol {c.tolerance:.0e}  {'ok' if c.ok else 'FAIL'}"
                 for c in self.checks]
        failed = sum(not c.ok for c in self.checks)
        lines.append(f"parity: {len(self.checks) - failed} passed, {failed} failed")
        return "\n".join(lines)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not path.is_file():
        raise ParityError(f"missing fixture file {path}")
    return load_file(str(path))


def _ddim_eta(consts: torch.Tensor) -> float:
    """eta from one step's (a_t, a_prev, sqrt(1-a_t), sigma_t) as the official sampler used them."""
    a_t, a_prev, _, sigma = (float(v) for v in consts)
    base = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return round(sigma / base, 6) if base > 0 else 0.0


def _ddim_step_count(timesteps: list[int]) -> int:
    """The step count S whose official schedule is exactly ``timesteps``."""
    from .schedulers import official_ddim_timesteps
    for steps in [len(timesteps)] + list(range(1, 1001)):
        if official_ddim_timesteps(steps).tolist() == timesteps:
            return steps
    raise ParityError(f"no DDIM step count gives the fixture's timesteps {timesteps}")


def run_parity(fixture_dir: str | Path, log=None, device: str | torch.device = "cpu") -> ParityResult:
    """Recompute every fixture output group with this implementation (fp32, on ``device``) and compare."""
    from .convert import build_networks, convert_state_dict
    from .models.config import params_from_parity_config
    from .models.denoiser import DiffPortrait3DDenoiser
    from .schedulers import aware_initial_latent, make_scheduler

    say = log or (lambda _msg: None)
    device = torch.device(device)
    if device.type == "cuda":  # fp32 parity needs true fp32 GEMMs/convolutions, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    folder = Path(fixture_dir)
    try:
        config = json.loads((folder / "parity_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ParityError(f"cannot read {folder / 'parity_config.json'}: {exc}") from None
    io = _load(folder / "parity_io.safetensors")
    converted = convert_state_dict(_load(folder / "parity_state_dict.safetensors"), params_from_parity_config(config))
    nets = build_networks(converted, device=device)
    result = ParityResult(conversion=str(converted.report))
    if not converted.report.ok:
        raise ParityError(f"the fixture state dict did not convert completely:\n{converted.report}")
    shapes = config["shapes"]
    clip = int(config.get("motion_module", {}).get("hardcoded_video_length", shapes["views"]))
    denoiser = DiffPortrait3DDenoiser(nets["unet"], nets["reference_unet"], nets["view_controlnet"],
                                      nets["view_modules"], clip_length=clip)
    expected_latent = (shapes["views"], shapes["latent_channels"], shapes["latent_h"], shapes["latent_w"])
    x_noisy, ref, pose, context = (io[f"inputs.{k}"].to(device) for k in ("x_noisy", "ref_latent", "pose", "context"))
    if tuple(x_noisy.shape) != expected_latent or tuple(pose.shape[2:]) != (shapes["pose_H"], shapes["pose_W"]):
        raise ParityError(f"fixture inputs {tuple(x_noisy.shape)}/{tuple(pose.shape)} disagree with its config")
    guidance = float(io["inputs.guidance_scale"].reshape(-1)[0])

    def passes(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cond = denoiser.eps_cond(x, t, context, ref, pose)
        uncond = denoiser.eps_uncond(x, t, context)
        return cond, uncond, uncond + guidance * (cond - uncond)

    with torch.no_grad():
        groups = sorted({int(m.group(1)) for k in io if (m := re.match(r"^t(\d+)\.timesteps$", k))}, reverse=True)
        for step in groups:
            say(f"evaluating t={step}")
            cond, uncond, cfg = passes(x_noisy, io[f"t{step}.timesteps"].to(device))
            for name, ours in (("eps_cond", cond), ("eps_uncond", uncond), ("eps_cfg", cfg)):
                if f"t{step}.{name}" in io:
                    tol = TOLERANCES["eps_cfg" if name == "eps_cfg" else "eps"]
                    result.add(f"t{step}.{name}", ours, io[f"t{step}.{name}"], tol)

        scheduler = make_scheduler("ddim")
        if "schedule.alphas_cumprod" in io:
            result.add("schedule.alphas_cumprod", scheduler.alphas_cumprod, io["schedule.alphas_cumprod"],
                       TOLERANCES["schedule"])
        if "init.x_T" in io:
            x_t = aware_initial_latent(io["init.fea_latent"], io["init.noise"], scheduler.alphas_cumprod,
                                       t=int(io["init.t"].reshape(-1)[0]))
            result.add("init.x_T", x_t, io["init.x_T"], TOLERANCES["init"])

        if "ddim.timesteps" in io:
            timesteps = io["ddim.timesteps"].tolist()
            steps = _ddim_step_count(timesteps)
            eta = _ddim_eta(io["ddim.step0.consts"])
            if eta != 0.0:
                raise ParityError(f"the fixture's DDIM run uses eta={eta}; only deterministic (eta 0) runs can be "
                                  f"compared, as the fixture carries no per-step noise")
            scheduler.set_timesteps(steps)
            result.checks.append(Check(f"ddim.timesteps ({steps} steps, eta {eta})",
                                       0.0 if scheduler.timesteps.tolist() == timesteps else math.inf, 0.0))
            x = io["ddim.x_T"].to(device)
            for i, t in enumerate(scheduler.timesteps):
                say(f"DDIM step {i} (t={int(t)})")
                prefix = f"ddim.step{i}"
                if f"{prefix}.x_in" in io:
                    result.add(f"{prefix}.x_in", x, io[f"{prefix}.x_in"], TOLERANCES["latent"])
                cond, uncond, cfg = passes(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=device))
                out = scheduler.step(cfg, int(t), x, eta=eta, return_dict=True)
                for name, ours in (("eps_cond", cond), ("eps_uncond", uncond), ("eps_cfg", cfg),
                                   ("pred_x0", out.pred_original_sample), ("x_out", out.prev_sample)):
                    if f"{prefix}.{name}" in io:
                        tol = TOLERANCES[{"eps_cond": "eps", "eps_uncond": "eps"}.get(name, name)
                                         if name.startswith("eps") else "latent"]
                        result.add(f"{prefix}.{name}", ours, io[f"{prefix}.{name}"], tol)
                x = out.prev_sample
            if "ddim.x_final" in io:
                result.add("ddim.x_final", x, io["ddim.x_final"], TOLERANCES["latent"])
    return result


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.parity", description=__doc__.split("\n")[0])
    parser.add_argument("fixture_dir", help="folder with parity_config.json, parity_state_dict.safetensors, "
                                            "parity_io.safetensors")
    parser.add_argument("--device", default="cpu", help="torch device to run on (fp32; TF32 is disabled on CUDA)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result = run_parity(args.fixture_dir, log=(lambda m: print(m, flush=True)) if args.verbose else None,
                            device=args.device)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        print(result.conversion)
    print(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
