"""DiffPortrait360Pipeline on tiny random models: back view first, front + back references, closed loops,
float16 schedule, options on both models, cancel."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dp3d_core.model_folder import ModelFolderError
from dp3d_core.pipeline import Cancelled, DiffPortrait3DPipeline, PipelineError, plan_windows, window_weights
from dp3d_core.pipeline360 import BackHeadPipeline, DiffPortrait360Pipeline
from dp3d_core.schedulers import Float16ScheduleDDIMScheduler, OfficialDDIMScheduler

SIZE = 64  # the tiny models' smallest image size (latent 8 x 8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from dp3d_core.tiny import make_tiny_360_model_folders

    return make_tiny_360_model_folders(tmp_path_factory.mktemp("tiny360"), seed=0, sample_size=8)


@pytest.fixture(scope="module")
def pipe(folders) -> DiffPortrait360Pipeline:
    return DiffPortrait360Pipeline.from_pretrained(folders[0], back_head=folders[1])


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((SIZE, SIZE, 3)).astype(np.float32) for _ in range(n)]


# ---------------------------------------------------------------- closed-loop windows (no model)

def test_closed_loop_windows_wrap_from_the_last_view_to_the_first() -> None:
    for n in (9, 12, 16, 32, 36):
        for overlap in (0, 2, 4, 7):
            ws = plan_windows(n, 8, overlap, closed_loop=True)
            assert sorted({v for w in ws for v in w}) == list(range(n))
            assert all(len(w) == 8 and all(b == (a + 1) % n for a, b in zip(w, w[1:])) for w in ws)
            # with overlapping windows the last view is followed by the first inside some window
            assert not overlap or any(w[k] == n - 1 and w[k + 1] == 0 for w in ws for k in range(7))
            w = window_weights(ws, n, 8)
            total = torch.zeros(n)
            for i, views in enumerate(ws):
                total.index_add_(0, torch.tensor(views), w[i])
            torch.testing.assert_close(total, torch.ones(n))
    # 32 views without overlap: exactly the official four independent clips
    assert plan_windows(32, 8, 0, closed_loop=True) == [list(range(s, s + 8)) for s in (0, 8, 16, 24)]
    assert plan_windows(6, 8, 4, closed_loop=True) == [[0, 1, 2, 3, 4, 5, 0, 1]]
    assert plan_windows(12, 8, 4, closed_loop=False) == [list(range(8)), list(range(4, 12))]  # open: unchanged


# ---------------------------------------------------------------- models

def test_official_defaults_and_float16_schedule(pipe: DiffPortrait360Pipeline) -> None:
    params = inspect.signature(DiffPortrait360Pipeline.__call__).parameters
    assert (params["num_inference_steps"].default, params["eta"].default, params["guidance_scale"].default) == \
        (50, 0.5, 3.0)
    assert isinstance(pipe.scheduler, Float16ScheduleDDIMScheduler)
    assert isinstance(pipe.back_head.scheduler, Float16ScheduleDDIMScheduler)
    assert isinstance(pipe._scheduler("ddim"), Float16ScheduleDDIMScheduler)
    assert not isinstance(pipe._scheduler("dpm++2m"), OfficialDDIMScheduler)
    # 3D-aware noise with the float16 q_sample coefficients (fixture README 4.2)
    noise, proxy = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x = pipe.initial_latents(noise, proxy, [False, True], pipe.scheduler)
    torch.testing.assert_close(x[0], noise[0], rtol=0, atol=0)
    torch.testing.assert_close(x[1], 0.0682373046875 * proxy[0] + 0.99755859375 * noise[1], rtol=0, atol=1e-7)


def test_back_view_first_then_front_and_back_references(pipe: DiffPortrait360Pipeline, monkeypatch) -> None:
    calls: list[tuple[str, torch.Tensor, list[torch.Tensor], torch.Tensor]] = []
    for stage, denoiser in (("back_head", pipe.back_head.denoiser), ("views", pipe.denoiser)):
        original = denoiser.eps_guided

        def spy(x, t, context, reference, condition, *args, _stage=stage, _original=original, **kwargs):
            refs = [reference] if isinstance(reference, torch.Tensor) else list(reference)
            calls.append((_stage, x.clone(), [r.clone() for r in refs], condition.clone()))
            return _original(x, t, context, reference, condition, *args, **kwargs)
        monkeypatch.setattr(denoiser, "eps_guided", spy)
    front, back_cond, conds = images(1, 0)[0], images(1, 1)[0], images(10, 2)
    out = pipe(front, conds, back_condition_image=back_cond, num_inference_steps=2, seed=4, output_type="np")
    assert out.images.shape == (10, SIZE, SIZE, 3) and out.back_image.shape == (SIZE, SIZE, 3)
    stages = [c[0] for c in calls]
    assert stages == ["back_head"] * 2 + ["views"] * 4  # 2 steps: back view first, then 2 windows per step
    for _, x, refs, condition in calls[:2]:  # batch 1 at the back camera's condition image, portrait as reference
        assert x.shape[0] == 1 and len(refs) == 1
        expected = torch.from_numpy(back_cond).permute(2, 0, 1) * 2 - 1
        torch.testing.assert_close(condition[0].float(), expected, rtol=0, atol=1e-6)
    for _, x, refs, _ in calls[2:]:  # 8-view windows with two references: front, then back
        assert x.shape[0] == 8 and len(refs) == 2
    # the references are the VAE posterior samples of the portrait and of the back view, in that order
    front_ref, back_ref = calls[2][2]
    generator = torch.Generator().manual_seed(4)
    torch.randn((1, 4, 8, 8), generator=generator)                    # back stage: initial noise
    portrait = pipe.to_image_tensor(front, (SIZE, SIZE), "r")
    pipe.back_head.encode_images(portrait, generator)                 # back stage: its reference
    torch.randn((1, 4, 8, 8), generator=generator)                    # back stage: eta noise, steps 1..2
    torch.randn((1, 4, 8, 8), generator=generator)
    torch.randn((10, 4, 8, 8), generator=generator)                   # view stage: initial noise
    latents = pipe.encode_images(pipe.to_image_tensor([front, out.back_image], (SIZE, SIZE), "r"), generator)
    torch.testing.assert_close(front_ref[0], latents[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(back_ref[0], latents[1], rtol=0, atol=1e-4)


def test_given_back_image_skips_the_back_head_model(pipe: DiffPortrait360Pipeline, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the back-head model ran")
    monkeypatch.setattr(pipe.back_head.denoiser, "eps_guided", fail)
    front, back, conds = images(1, 0)[0], images(1, 3)[0], images(8, 2)
    a = pipe(front, conds, back_image=back, num_inference_steps=1, seed=1, output_type="latent")
    b = pipe(front, conds, back_image=back, num_inference_steps=1, seed=1, output_type="latent")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)  # a seed gives one result
    np.testing.assert_allclose(a.back_image, back, atol=1e-6)
    c = pipe(front, conds, back_image=images(1, 9)[0], num_inference_steps=1, seed=1, output_type="latent")
    assert (c.images - a.images).abs().max() > 1e-4  # the back reference matters


def test_closed_loop_links_the_last_view_to_the_first(pipe: DiffPortrait360Pipeline) -> None:
    """One step (no propagation across steps): view 0 sees view 15's condition only when the loop is closed."""
    front, back, conds = images(1, 0)[0], images(1, 3)[0], images(16, 5)
    changed = conds[:15] + images(1, 6)
    run = dict(back_image=back, num_inference_steps=1, seed=2, output_type="latent", overlap=4)
    open_a = pipe(front, conds, **run).images
    open_b = pipe(front, changed, **run).images
    assert torch.equal(open_a[0], open_b[0])
    closed_a = pipe(front, conds, closed_loop=True, **run).images
    closed_b = pipe(front, changed, closed_loop=True, **run).images
    assert not torch.equal(closed_a[0], closed_b[0])  # open: bit-identical; closed: linked through the window


def _float64_denoiser(source, clip_length: int):
    from dp3d_core.model_folder import make_denoiser

    nets = {name: copy.deepcopy(getattr(source, name)).double()
            for name in ("unet", "reference_unet", "view_controlnet", "view_modules") if getattr(source, name) is not None}
    return make_denoiser(nets, clip_length=clip_length)


@pytest.mark.parametrize("model", ["views", "back_head"])
def test_fast_path_is_the_official_algebra(pipe: DiffPortrait360Pipeline, model: str) -> None:
    """Fused passes (one F_ref call for front + back, one F call for both guidance passes) = the official two
    passes. In float64: the tiny random model amplifies fp32 rounding of differently batched GEMMs (see
    tests/test_fast_path.py)."""
    source = pipe if model == "views" else pipe.back_head
    rows = 8 if model == "views" else 1
    d = _float64_denoiser(source, rows)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, 4, 8, 8, generator=g, dtype=torch.float64)
    refs = [torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).expand(rows, -1, -1, -1)
            for _ in range(2 if model == "views" else 1)]
    cond = torch.rand(rows, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
    context = source.prompt_embedding.embedding.double()
    with torch.no_grad():
        e_c, e_u = d.eps_cond(x, 500, context, refs, cond).float(), d.eps_uncond(x, 500, context).float()
        official = e_u + 3.0 * (e_c - e_u)  # combined in float32, as eps_guided returns it
        fast = d.eps_guided(x, 500, context, refs, cond, 3.0)
    assert float((fast - official).norm() / official.norm()) <= 1e-7  # float32 rounding of the result only
    pipe.set_fast_path(False)
    try:
        assert not pipe.fast_path and not pipe.back_head.fast_path  # the option reaches both models
    finally:
        pipe.set_fast_path(True)
    assert pipe.fast_path and pipe.back_head.fast_path


def test_options_apply_to_both_models(pipe: DiffPortrait360Pipeline) -> None:
    pipe.enable_vae_slicing()
    assert pipe.vae_batch_size == pipe.back_head.vae_batch_size == 1
    pipe.disable_vae_slicing()
    assert pipe.vae_batch_size == pipe.back_head.vae_batch_size == 8


def test_cancel_in_the_back_stage_stops_everything(pipe: DiffPortrait360Pipeline) -> None:
    seen: list[tuple[str, int]] = []

    def on_step(p, step, t, kwargs):
        assert p is pipe
        seen.append((kwargs["stage"], step))
        return {"cancel": True}
    with pytest.raises(Cancelled):
        pipe(images(1, 0)[0], images(8, 2), back_condition_image=images(1, 1)[0], num_inference_steps=3,
             callback_on_step_end=on_step)
    assert seen == [("back_head", 0)]


def test_bad_inputs_and_wrong_folders(pipe: DiffPortrait360Pipeline, folders, tmp_path: Path) -> None:
    front, conds = images(1, 0)[0], images(8, 2)
    alone = DiffPortrait360Pipeline.from_pretrained(folders[0])
    with pytest.raises(PipelineError, match="back view is needed"):
        alone(front, conds, back_condition_image=images(1, 1)[0], num_inference_steps=1)
    with pytest.raises(PipelineError, match="back view is needed"):
        pipe(front, conds, num_inference_steps=1)
    with pytest.raises(PipelineError, match="one portrait"):
        pipe([front, front], conds, back_image=front, num_inference_steps=1)
    with pytest.raises(PipelineError, match="no condition images"):  # refused before the back stage runs
        pipe(front, [], back_condition_image=front, num_inference_steps=1)
    with pytest.raises(PipelineError, match="proxy"):
        pipe(front, conds, back_condition_image=front, proxy_images=[None], num_inference_steps=1)
    with pytest.raises(ModelFolderError, match="holds a DiffPortrait360 view model.*back-head model .* is needed"):
        BackHeadPipeline.from_pretrained(folders[0])
    with pytest.raises(ModelFolderError, match="holds a DiffPortrait360 back-head model.*view model .* is needed"):
        DiffPortrait360Pipeline.from_pretrained(folders[1])
    with pytest.raises(ModelFolderError, match="holds a DiffPortrait360 view model.*DiffPortrait3D model .* is needed"):
        DiffPortrait3DPipeline.from_pretrained(folders[0])  # the DiffPortrait3D pipeline never runs it silently
    from dp3d_core.tiny import make_tiny_model_folder
    dp3d = make_tiny_model_folder(tmp_path / "dp3d", sample_size=8)
    with pytest.raises(ModelFolderError, match="holds a DiffPortrait3D model"):
        DiffPortrait360Pipeline.from_pretrained(dp3d)


def test_save_pretrained_keeps_the_family(pipe: DiffPortrait360Pipeline, tmp_path: Path) -> None:
    from dp3d_core.families import FAMILY_360_BACK_HEAD, FAMILY_360_VIEWS
    from dp3d_core.model_folder import model_family

    pipe.save_pretrained(tmp_path / "views")
    pipe.back_head.save_pretrained(tmp_path / "back_head")
    assert model_family(tmp_path / "views") == FAMILY_360_VIEWS
    assert model_family(tmp_path / "back_head") == FAMILY_360_BACK_HEAD
    index = json.loads((tmp_path / "views" / "model_index.json").read_text())
    assert (index["_class_name"], index["family"], index["variant"]) == \
        ("DiffPortrait360Pipeline", "DiffPortrait360", "views")
    assert not (tmp_path / "back_head" / "view_modules").exists()
    again = DiffPortrait360Pipeline.from_pretrained(tmp_path / "views", back_head=tmp_path / "back_head")
    front, back_cond, conds = images(1, 0)[0], images(1, 1)[0], images(8, 2)
    run = dict(back_condition_image=back_cond, num_inference_steps=1, seed=3, output_type="latent")
    torch.testing.assert_close(pipe(front, conds, **run).images, again(front, conds, **run).images, rtol=0, atol=1e-5)
