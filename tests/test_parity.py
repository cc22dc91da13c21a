"""Numerical parity with the official DiffPortrait3D code on the shared reduced-size fixture."""
from __future__ import annotations


import pytest

from dp3d_core.parity import ParityError, TOLERANCES, run_parity

from tests.conftest import PARITY_FIXTURE as FIXTURE




@pytest.fixture(scope="module")
def result():
    return run_parity(FIXTURE)


def test_every_output_within_tolerance(result):
    failed = [c for c in result.checks if not c.ok]
    assert not failed, "\n" + str(result)


def test_all_fixture_groups_are_compared(result):
    names = {c.name.split(" ")[0] for c in result.checks}
    for t in ("t981", "t500"):
        for part in ("eps_cond", "eps_uncond", "eps_cfg"):
            assert f"{t}.{part}" in names
    assert "init.x_T" in names and "ddim.x_final" in names and "ddim.timesteps" in names
    for i in range(4):
        for part in ("eps_cond", "eps_uncond", "eps_cfg", "pred_x0", "x_out"):
            assert f"ddim.step{i}.{part}" in names


def test_tolerances_are_the_documented_ones(result):
    by_name = {c.name: c.tolerance for c in result.checks}
    assert by_name["t981.eps_cond"] == TOLERANCES["eps"] == 1e-4
    assert by_name["t981.eps_cfg"] == TOLERANCES["eps_cfg"] == 2e-4
    assert by_name["ddim.x_final"] == TOLERANCES["latent"] == 5e-4
    assert by_name["init.x_T"] == TOLERANCES["init"] == 1e-6


def test_conversion_of_fixture_accounts_for_every_key(result):
    assert "every key accounted for" in result.conversion


def test_missing_fixture_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ParityError, match="parity_config.json"):
        run_parity(tmp_path)
