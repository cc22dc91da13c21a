"""The default sampler against the official DDIM sampler's own numbers (parity fixture)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dp3d_core.schedulers import (
    SchedulerError,
    aware_initial_latent,
    make_scheduler,
    official_ddim_timesteps,
)

from tests.conftest import PARITY_FIXTURE as PARITY


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(PARITY / "parity_io.safetensors")


def test_schedule_buffers_match_official(io):
    sched = make_scheduler("ddim")
    torch.testing.assert_close(sched.alphas_cumprod, io["schedule.alphas_cumprod"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("steps,eta", [(4, 0.0), (50, 0.0), (50, 0.5)])
def test_ddim_schedule_matches_official(io, steps, eta):
    prefix = f"schedule.ddim{steps}_eta{eta}."
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    ascending = io[prefix + "timesteps_ascending"].numpy()
    np.testing.assert_array_equal(sched.timesteps.numpy(), ascending[::-1])
    acp = sched.alphas_cumprod
    for i, t in enumerate(ascending):
        prev = int(t) - 1000 // steps
        a_prev = acp[prev] if prev >= 0 else sched.final_alpha_cumprod
        assert abs(float(acp[t]) - float(io[prefix + "alphas"][i])) < 1e-7
        assert abs(float(a_prev) - float(io[prefix + "alphas_prev"][i])) < 1e-7
        sigma = eta * float(sched._get_variance(int(t), prev)) ** 0.5
        assert abs(sigma - float(io[prefix + "sigmas"][i])) < 1e-6


def test_ddim_steps_reproduce_official_latents(io):
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    np.testing.assert_array_equal(sched.timesteps.numpy(), io["ddim.timesteps"].numpy())
    for i, t in enumerate(sched.timesteps):
        out = sched.step(io[f"ddim.step{i}.eps_cfg"], t, io[f"ddim.step{i}.x_in"], eta=0.0)
        torch.testing.assert_close(out.pred_original_sample, io[f"ddim.step{i}.pred_x0"], rtol=0, atol=5e-5)
        torch.testing.assert_close(out.prev_sample, io[f"ddim.step{i}.x_out"], rtol=0, atol=5e-5)


def test_aware_initial_latent_matches_q_sample(io):
    sched = make_scheduler("ddim")
    x_t = aware_initial_latent(io["init.fea_latent"], io["init.noise"], sched.alphas_cumprod, int(io["init.t"]))
    torch.testing.assert_close(x_t, io["init.x_T"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [3, 9, 27, 37, 111, 333, 999])
def test_step_counts_that_crash_the_official_code_work(steps):
    ts = official_ddim_timesteps(steps)
    assert ts.max() < 1000 and ts.min() == 1
    assert np.all(np.diff(ts) < 0)
    sched = make_scheduler("ddim")
    sched.set_timesteps(steps)
    x = torch.zeros(1, 4, 2, 2)
    for t in sched.timesteps:  # every step must be computable
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_official_spacing_keeps_its_extra_steps():
    # range(0, 1000, 142) has 8 entries: the official sampler runs 8 steps when asked for 7.
    np.testing.assert_array_equal(official_ddim_timesteps(7), np.arange(0, 1000, 142)[::-1] + 1)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5])
def test_bad_step_counts_are_clear(bad):
    with pytest.raises(SchedulerError, match="steps"):
        official_ddim_timesteps(bad)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc"])
def test_every_scheduler_runs(name):
    sched = make_scheduler(name)
    sched.set_timesteps(10)
    x = torch.ones(1, 4, 2, 2)
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(SchedulerError, match="ddim, dpm\\+\\+2m, unipc"):
        make_scheduler("euler_a")
