"""Numerical parity with the official DiffPortrait360 code (view model and back-head model) on the shared fixture."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dp3d_core.parity import DP360_TOLERANCES, run_parity
from dp3d_core.schedulers import aware_initial_latent, make_scheduler

from tests.conftest import DP360_FIXTURE as FIXTURE


@pytest.fixture(scope="module")
def result():
    return run_parity(FIXTURE)


def test_every_output_within_tolerance(result):
    failed = [c for c in result.checks if not c.ok]
    assert not failed, "\n" + str(result)


@pytest.mark.parametrize("model", ["views", "backhead"])
def test_all_fixture_groups_are_compared(result, model):
    names = {c.name.split(" ")[0] for c in result.checks}
    for t in ("t981", "t501"):
        for part in ("eps_cond", "eps_uncond", "eps_cfg", "pred_x0", "x_prev"):
            assert f"{model}.{t}.{part}" in names
    for i in range(4):
        for part in ("x_in", "consts", "eps_cond", "eps_uncond", "eps_cfg", "pred_x0", "x_out"):
            assert f"{model}.ddim.step{i}.{part}" in names
    assert {f"{model}.ddim.x_final", f"{model}.ddim.timesteps", f"{model}.schedule.alphas_cumprod",
            f"{model}.schedule.ddim50_eta0.5.sigmas"} <= names
    if model == "views":  # 3D-aware noise: view model only
        assert {"views.init.x_T", "views.init.coefs"} <= names


def test_tolerances_are_the_documented_ones(result):
    by_name = {c.name: c.tolerance for c in result.checks}
    assert by_name["views.t981.eps_cond"] == DP360_TOLERANCES["eps"] == 1e-4
    assert by_name["views.t981.eps_cfg"] == DP360_TOLERANCES["eps_cfg"] == 2e-4
    assert by_name["views.ddim.x_final"] == by_name["backhead.ddim.step2.x_out"] == 5e-4
    assert by_name["views.ddim.step0.pred_x0"] == DP360_TOLERANCES["pred_x0"] == 1e-3
    assert by_name["views.init.x_T"] == 1e-6
    assert by_name["views.ddim.step3.consts"] == 0.0  # float16 numbers: exact


def test_both_models_converted_with_their_family(result):
    assert result.conversion.count("every key accounted for") == 2
    assert "DiffPortrait360 view model" in result.conversion
    assert "DiffPortrait360 back-head model" in result.conversion


def test_float32_schedule_would_fail_the_fixture():
    """The float16 schedule is what makes init and DDIM match (README quirk S1): the float32 one does not."""
    io = load_file(str(FIXTURE / "views_io.safetensors"))
    acp = make_scheduler("ddim").alphas_cumprod
    fp32 = aware_initial_latent(io["init.fea_latent"], io["init.noise"], acp, 999)
    fp16 = aware_initial_latent(io["init.fea_latent"], io["init.noise"], acp, 999, float16_schedule=True)
    assert (fp16 - io["init.x_T"]).abs().max() <= 1e-6 < (fp32 - io["init.x_T"]).abs().max()
    ours = make_scheduler("ddim", float16_schedule=True)
    ours.set_timesteps(4)
    assert ours.ddim_constants(1, 0.0)[2] == float(io["ddim.step3.consts"][2])  # sqrt(1 - a_t) in float16
    plain = make_scheduler("ddim")
    plain.set_timesteps(4)
    step = plain.step(io["ddim.step0.eps_cfg"], 751, io["ddim.x_T"], eta=0.0)
    assert (step.prev_sample - io["ddim.step0.x_out"]).abs().max() > DP360_TOLERANCES["latent"] / 10
    step16 = ours.step(io["ddim.step0.eps_cfg"], 751, io["ddim.x_T"], eta=0.0)
    torch.testing.assert_close(step16.prev_sample, io["ddim.step0.x_out"], rtol=0, atol=1e-5)
