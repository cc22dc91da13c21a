"""Numerical parity against the official code: ``python -m dp3d_core.parity <fixture dir>``.

The fixture layout says which models to check:

* ``parity_config.json`` + ``parity_state_dict.safetensors`` + ``parity_io.safetensors``: DiffPortrait3D;
* ``views_config.json`` / ``backhead_config.json`` + ``views_state_dict.safetensors`` + ``views_io`` /
  ``backhead_io.safetensors``: the DiffPortrait360 view model (front + back reference, 20 view modules) and
  back-head model (the view weights without the motion modules), each checked when its files are there; their
  checks are named ``views.*`` and ``backhead.*``.

Converts the fixture's official-key state dict with the same converter as real checkpoints (which detects the
family from the keys), builds the networks from the config, recomputes every output group present in the io file
(single denoiser evaluations ``tNNN.*``, the 3D-aware initial latent ``init.*``, the DDIM run ``ddim.*``, and for
DiffPortrait360 its float16 schedule tables ``schedule.*``) and compares. Exit status 0 only when every error is
within tolerance (fp32).
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
# ../dp360_parity/README.md section 5: as DiffPortrait3D, plus pred_x0 1e-3 (values reach 61 at t=981) and the
# schedule constants exact (they are float16 numbers).
DP360_TOLERANCES = {**TOLERANCES, "pred_x0": 1e-3, "consts": 0.0}
DP360_MODELS = ("views", "backhead")


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
    say = log or (lambda _msg: None)
    device = torch.device(device)
    if device.type == "cuda":  # fp32 parity needs true fp32 GEMMs/convolutions, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    folder = Path(fixture_dir)
    if (folder / "parity_config.json").is_file() or not any((folder / f"{m}_config.json").is_file()
                                                            for m in DP360_MODELS):
        return _run_diffportrait3d(folder, say, device)
    result = ParityResult()
    for model in DP360_MODELS:
        if (folder / f"{model}_config.json").is_file():
            _run_diffportrait360(folder, model, result, say, device)
    return result


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ParityError(f"cannot read {path}: {exc}") from None


def _build(state: dict[str, torch.Tensor], config: dict, device: torch.device, clip: int, result: ParityResult,
           title: str):
    """Convert ``state`` with the real converter and wire the denoiser."""
    from .convert import build_networks, convert_state_dict
    from .models.config import params_from_parity_config
    from .models.denoiser import DiffPortrait3DDenoiser

    converted = convert_state_dict(state, params_from_parity_config(config))
    if not converted.report.ok:
        raise ParityError(f"the fixture state dict did not convert completely:\n{converted.report}")
    nets = build_networks(converted, device=device)
    result.conversion += (f"{title}:\n" if title else "") + str(converted.report) + "\n"
    return DiffPortrait3DDenoiser(nets["unet"], nets["reference_unet"], nets["view_controlnet"],
                                  nets.get("view_modules"), clip_length=clip)


def _tolerance(name: str, tolerances: dict[str, float]) -> float:
    if name in ("eps_cond", "eps_uncond"):
        return tolerances["eps"]
    return tolerances.get(name, tolerances["latent"])


def _compare_model(result: ParityResult, io: dict[str, torch.Tensor], prefix: str, passes, scheduler,
                   tolerances: dict[str, float], say, device: torch.device, check_consts: bool = False) -> None:
    """Single evaluations (``tNNN.*``; with ``pred_x0`` / ``x_prev`` when the fixture has them, from the 50-step
    eta-0 schedule) and the DDIM run (``ddim.*``) of one model; ``passes(x, t) -> (cond, uncond, guided)``."""
    groups = sorted({int(m.group(1)) for k in io if (m := re.match(r"^t(\d+)\.timesteps$", k))}, reverse=True)
    for step in groups:
        say(f"{prefix}evaluating t={step}")
        x = io["inputs.x_noisy"].to(device)
        cond, uncond, cfg = passes(x, io[f"t{step}.timesteps"].to(device))
        ours = {"eps_cond": cond, "eps_uncond": uncond, "eps_cfg": cfg}
        if f"t{step}.pred_x0" in io:
            scheduler.set_timesteps(50)
            out = scheduler.step(cfg, step, x, eta=0.0, return_dict=True)
            ours.update(pred_x0=out.pred_original_sample, x_prev=out.prev_sample)
        for name, value in ours.items():
            if f"t{step}.{name}" in io:
                result.add(f"{prefix}t{step}.{name}", value, io[f"t{step}.{name}"], _tolerance(name, tolerances))

    if "ddim.timesteps" not in io:
        return
    timesteps = io["ddim.timesteps"].tolist()
    steps = _ddim_step_count(timesteps)
    eta = _ddim_eta(io["ddim.step0.consts"])
    if eta != 0.0:
        raise ParityError(f"the fixture's DDIM run uses eta={eta}; only deterministic (eta 0) runs can be "
                          f"compared, as the fixture carries no per-step noise")
    scheduler.set_timesteps(steps)
    result.checks.append(Check(f"{prefix}ddim.timesteps ({steps} steps, eta {eta})",
                               0.0 if scheduler.timesteps.tolist() == timesteps else math.inf, 0.0))
    x = io["ddim.x_T"].to(device)
    for i, t in enumerate(scheduler.timesteps):
        say(f"{prefix}DDIM step {i} (t={int(t)})")
        key = f"ddim.step{i}"
        if f"{key}.x_in" in io:
            result.add(f"{prefix}{key}.x_in", x, io[f"{key}.x_in"], tolerances["latent"])
        if check_consts and f"{key}.consts" in io:
            result.add(f"{prefix}{key}.consts", torch.tensor(scheduler.ddim_constants(int(t), eta)),
                       io[f"{key}.consts"], tolerances["consts"])
        cond, uncond, cfg = passes(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=device))
        out = scheduler.step(cfg, int(t), x, eta=eta, return_dict=True)
        for name, ours in (("eps_cond", cond), ("eps_uncond", uncond), ("eps_cfg", cfg),
                           ("pred_x0", out.pred_original_sample), ("x_out", out.prev_sample)):
            if f"{key}.{name}" in io:
                result.add(f"{prefix}{key}.{name}", ours, io[f"{key}.{name}"], _tolerance(name, tolerances))
        x = out.prev_sample
    if "ddim.x_final" in io:
        result.add(f"{prefix}ddim.x_final", x, io["ddim.x_final"], tolerances["latent"])


def _guided(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    return uncond + guidance * (cond - uncond)


def _run_diffportrait3d(folder: Path, say, device: torch.device) -> ParityResult:
    from .schedulers import aware_initial_latent, make_scheduler

    config = _read_config(folder / "parity_config.json")
    io = _load(folder / "parity_io.safetensors")
    result = ParityResult()
    shapes = config["shapes"]
    clip = int(config.get("motion_module", {}).get("hardcoded_video_length", shapes["views"]))
    denoiser = _build(_load(folder / "parity_state_dict.safetensors"), config, device, clip, result, "")
    expected_latent = (shapes["views"], shapes["latent_channels"], shapes["latent_h"], shapes["latent_w"])
    x_noisy, ref, pose, context = (io[f"inputs.{k}"].to(device) for k in ("x_noisy", "ref_latent", "pose", "context"))
    if tuple(x_noisy.shape) != expected_latent or tuple(pose.shape[2:]) != (shapes["pose_H"], shapes["pose_W"]):
        raise ParityError(f"fixture inputs {tuple(x_noisy.shape)}/{tuple(pose.shape)} disagree with its config")
    guidance = float(io["inputs.guidance_scale"].reshape(-1)[0])

    def passes(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cond = denoiser.eps_cond(x, t, context, ref, pose)
        uncond = denoiser.eps_uncond(x, t, context)
        return cond, uncond, _guided(cond, uncond, guidance)

    scheduler = make_scheduler("ddim")
    with torch.no_grad():
        if "schedule.alphas_cumprod" in io:
            result.add("schedule.alphas_cumprod", scheduler.alphas_cumprod, io["schedule.alphas_cumprod"],
                       TOLERANCES["schedule"])
        if "init.x_T" in io:
            x_t = aware_initial_latent(io["init.fea_latent"], io["init.noise"], scheduler.alphas_cumprod,
                                       t=int(io["init.t"].reshape(-1)[0]))
            result.add("init.x_T", x_t, io["init.x_T"], TOLERANCES["init"])
        _compare_model(result, io, "", passes, scheduler, TOLERANCES, say, device)
    return result


def _run_diffportrait360(folder: Path, model: str, result: ParityResult, say, device: torch.device) -> None:
    """One DiffPortrait360 model of the fixture: ``model`` is "views" or "backhead"."""
    from .schedulers import aware_initial_latent, float64_alphas_cumprod, float64_betas, make_scheduler

    config = _read_config(folder / f"{model}_config.json")
    io = _load(folder / f"{model}_io.safetensors")
    state = _load(folder / "views_state_dict.safetensors")  # both models' weights (README section 2)
    if model == "backhead":
        state = {k: v for k, v in state.items() if "_motion_module." not in k}
    shapes = config["shapes"]
    rows = int(shapes.get("views", shapes.get("batch", 1)))
    clip = int(config.get("motion_module", {}).get("video_length", 1)) if model == "views" else 1
    denoiser = _build(state, config, device, clip, result, model)
    prefix = f"{model}."
    x_noisy, ref, pose, context = (io[f"inputs.{k}"].to(device) for k in ("x_noisy", "ref_latent", "pose", "context"))
    if tuple(x_noisy.shape) != (rows, shapes["latent_channels"], shapes["latent_h"], shapes["latent_w"]):
        raise ParityError(f"{model} fixture inputs {tuple(x_noisy.shape)} disagree with its config")
    # View model: front then back reference (quirk V1), on the conditional pass only.
    refs = [ref, io["inputs.back_ref_latent"].to(device)] if "inputs.back_ref_latent" in io else [ref]
    guidance = float(io["inputs.guidance_scale"].reshape(-1)[0])

    def passes(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cond = denoiser.eps_cond(x, t, context, refs, pose)
        uncond = denoiser.eps_uncond(x, t, context)
        return cond, uncond, _guided(cond, uncond, guidance)

    scheduler = make_scheduler("ddim", float16_schedule=True)
    cfg = scheduler.config
    acp64 = float64_alphas_cumprod(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps).double()
    betas64 = torch.from_numpy(float64_betas(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps))
    tables = {"alphas_cumprod": scheduler.alphas_cumprod16, "betas": betas64.half(),
              "sqrt_alphas_cumprod": acp64.sqrt().half(), "sqrt_one_minus_alphas_cumprod": (1 - acp64).sqrt().half()}
    with torch.no_grad():
        for name, ours in tables.items():
            if f"schedule.{name}" in io:
                result.add(f"{prefix}schedule.{name} (float16)", ours.float(), io[f"schedule.{name}"].float(),
                           DP360_TOLERANCES["consts"])
        for key in sorted(k for k in io if re.match(r"^schedule\.ddim\d+_eta[\d.]+\.alphas$", k)):
            m = re.match(r"^schedule\.ddim(\d+)_eta([\d.]+)\.alphas$", key)
            steps, eta = int(m.group(1)), float(m.group(2))
            scheduler.set_timesteps(steps)
            consts = torch.tensor([scheduler.ddim_constants(int(t), eta) for t in scheduler.timesteps.flip(0)])
            for i, name in enumerate(("alphas", "alphas_prev", "sqrt_one_minus_alphas", "sigmas")):
                ref_key = f"schedule.ddim{steps}_eta{m.group(2)}.{name}"
                if ref_key in io:
                    result.add(f"{prefix}{ref_key}", consts[:, i], io[ref_key], DP360_TOLERANCES["consts"])
        if "init.x_T" in io:
            t = int(io["init.t"].reshape(-1)[0])
            x_t = aware_initial_latent(io["init.fea_latent"], io["init.noise"], acp64, t=t, float16_schedule=True)
            result.add(f"{prefix}init.x_T", x_t, io["init.x_T"], DP360_TOLERANCES["init"])
            if "init.coefs" in io:
                ones = torch.ones(1, 1)
                coefs = torch.tensor([float(aware_initial_latent(ones, 0 * ones, acp64, t, True)),
                                      float(aware_initial_latent(0 * ones, ones, acp64, t, True))])
                result.add(f"{prefix}init.coefs", coefs, io["init.coefs"], DP360_TOLERANCES["consts"])
        _compare_model(result, io, prefix, passes, scheduler, DP360_TOLERANCES, say, device, check_consts=True)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.parity", description=__doc__.split("\n")[0])
    parser.add_argument("fixture_dir", help="folder with parity_config.json, parity_state_dict.safetensors, "
                                            "parity_io.safetensors (DiffPortrait3D), or with views_* / backhead_* "
                                            "files (DiffPortrait360)")
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
