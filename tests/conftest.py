"""Shared set-up for the core and training tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from dp3d_core.model_folder import make_denoiser
from dp3d_core.tiny import make_tiny_components

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
PARITY_FIXTURE = SHARED_FIXTURES / "parity"
DP360_FIXTURE = SHARED_FIXTURES / "dp360_parity"
EG3D_POSES = SHARED_FIXTURES / "eg3d_reference_poses.json"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine spin for seconds."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def components():
    """The tiny random-weight networks (fresh per test module, so one module's edits never leak)."""
    return make_tiny_components(seed=0)


@pytest.fixture(scope="module")
def denoiser(components):
    return make_denoiser(components)


@pytest.fixture(scope="module")
def model360(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DiffPortrait360 model folder (view model, back-head model in back_head/), 64 px jobs."""
    from dp3d_core.preflight import BACK_HEAD_FOLDER
    from dp3d_core.tiny import make_tiny_360_model_folders

    views, back = make_tiny_360_model_folders(tmp_path_factory.mktemp("tiny360") / "dp360", seed=0, sample_size=8)
    assert back == views / BACK_HEAD_FOLDER
    return views
