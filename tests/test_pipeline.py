"""DiffPortrait3DPipeline on the tiny random model: determinism, window blending, 3D-aware noise, CFG, cancel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dp3d_core.pipeline import (Cancelled, DiffPortrait3DPipeline, PipelineError, plan_windows, window_weights)
from dp3d_core.schedulers import AWARE_NOISE_TIMESTEP


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> DiffPortrait3DPipeline:
    from dp3d_core.tiny import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return DiffPortrait3DPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def size(pipe: DiffPortrait3DPipeline) -> int:
    return max(32, pipe.size_multiple())


def images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, size, 3)).astype(np.float32) for _ in range(n)]


def noise_for(pipe: DiffPortrait3DPipeline, n: int, size: int, seed: int = 5) -> torch.Tensor:
    lat = size // pipe.vae_scale_factor
    return torch.randn((n, pipe.unet.config.in_channels, lat, lat), generator=torch.Generator().manual_seed(seed))


class Spy:
    """Wraps the denoiser's two passes to record their inputs (and optionally replace eps_uncond)."""

    def __init__(self, pipe: DiffPortrait3DPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cond_x: list[torch.Tensor] = []
        self.uncond_calls = 0
        d = pipe.denoiser
        cond, uncond = d.eps_cond, d.eps_uncond

        def eps_cond(x, t, *a, **k):
            self.cond_x.append(x.detach().clone())
            return cond(x, t, *a, **k)

        def eps_uncond(x, t, *a, **k):
            self.uncond_calls += 1
            return uncond(x, t, *a, **k)
        monkeypatch.setattr(d, "eps_cond", eps_cond)
        monkeypatch.setattr(d, "eps_uncond", eps_uncond)


# ---------------------------------------------------------------- window planning (no model)

def test_plan_windows() -> None:
    assert plan_windows(11, 8, 4) == [list(range(0, 8)), list(range(3, 11))]
    assert plan_windows(20, 8, 4) == [list(range(0, 8)), list(range(4, 12)), list(range(8, 16)),
                                      list(range(12, 20))]
    assert plan_windows(16, 8, 0) == [list(range(0, 8)), list(range(8, 16))]
    assert plan_windows(3, 8, 4) == [[0, 1, 2, 2, 2, 2, 2, 2]]
    assert plan_windows(1, 8, 0) == [[0] * 8]
    for n in range(1, 40):
        for overlap in (0, 2, 4, 7):
            ws = plan_windows(n, 8, overlap)
            assert sorted({v for w in ws for v in w}) == list(range(n))
            assert all(len(w) == 8 for w in ws)
    with pytest.raises(PipelineError, match="condition image"):
        plan_windows(0, 8, 4)
    with pytest.raises(PipelineError, match="overlap"):
        plan_windows(10, 8, 8)


def test_window_weights_sum_to_one_and_skip_padding() -> None:
    for n, overlap in ((11, 4), (20, 4), (3, 0), (13, 7), (9, 1)):
        ws = plan_windows(n, 8, overlap)
        w = window_weights(ws, n, 8)
        total = torch.zeros(n)
        for i, views in enumerate(ws):
            total.index_add_(0, torch.tensor(views), w[i])
        torch.testing.assert_close(total, torch.ones(n))
    w = window_weights([[0, 1, 2, 2, 2, 2, 2, 2]], 3, 8)
    assert torch.all(w[0, 3:] == 0) and torch.all(w[0, :3] == 1)
    w = window_weights(plan_windows(11, 8, 4), 11, 8)
    assert w[0, 7] < w[0, 4] and w[1, 0] < w[1, 3]   # window edges count less than centres


# ---------------------------------------------------------------- the pipeline

def test_deterministic_for_a_seed(pipe: DiffPortrait3DPipeline, size: int) -> None:
    ref, conds = images(1, size, 0)[0], images(3, size, 1)
    a = pipe(ref, conds, num_inference_steps=2, seed=3, output_type="np").images
    b = pipe(ref, conds, num_inference_steps=2, seed=3, output_type="np").images
    c = pipe(ref, conds, num_inference_steps=2, seed=4, output_type="np").images
    assert a.shape == (3, size, size, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    pil = pipe(ref, conds, num_inference_steps=2, seed=3, output_type="pil").images
    assert len(pil) == 3 and pil[0].size == (size, size)
    np.testing.assert_allclose(np.asarray(pil[1]) / 255.0, a[1], atol=1 / 255 + 1e-6)


def test_window_blending_is_one_trajectory(pipe: DiffPortrait3DPipeline, size: int) -> None:
    ref, conds = images(1, size, 0)[0], images(11, size, 2)
    noise = noise_for(pipe, 11, size)
    kw = dict(num_inference_steps=1, sample_posterior=False, output_type="latent", guidance_scale=3.0)
    blended = pipe(ref, conds, latents=noise, overlap=4, **kw).images
    assert blended.shape[0] == 11
    # One DDIM step is affine in eps, so the blended result must be exactly the weighted blend of the two
    # windows run on their own (same noise rows): this pins down "blend eps, then one scheduler step".
    chunk0 = pipe(ref, conds[0:8], latents=noise[0:8], **kw).images
    chunk1 = pipe(ref, conds[3:11], latents=noise[3:11], **kw).images
    w = window_weights(plan_windows(11, 8, 4), 11, 8)
    expected = torch.zeros_like(blended)
    expected[0:8] += w[0].view(-1, 1, 1, 1) * chunk0
    expected[3:11] += w[1].view(-1, 1, 1, 1) * chunk1
    torch.testing.assert_close(blended, expected, atol=1e-5, rtol=1e-5)
    assert (chunk0[3:8] - chunk1[0:5]).abs().max() > 1e-3   # the windows really disagree before blending

    # Over several steps the blended sequence differs from stitching independently denoised chunks.
    kw["num_inference_steps"] = 2
    blended2 = pipe(ref, conds, latents=noise, **kw).images
    alone0 = pipe(ref, conds[0:8], latents=noise[0:8], **kw).images
    alone1 = pipe(ref, conds[3:11], latents=noise[3:11], **kw).images
    stitched = torch.cat([alone0, alone1[5:]])
    assert blended2.shape == stitched.shape == (11, *noise.shape[1:])
    assert (blended2[:8] - alone0).abs().max() > 1e-3
    assert (blended2 - stitched).abs().max() > 1e-3


def test_short_sequence_padding_is_dropped(pipe: DiffPortrait3DPipeline, size: int, monkeypatch) -> None:
    spy = Spy(pipe, monkeypatch)
    ref, conds = images(1, size, 0)[0], images(3, size, 3)
    out = pipe(ref, conds, num_inference_steps=1, seed=0, output_type="latent").images
    assert out.shape[0] == 3
    x = spy.cond_x[0]
    assert x.shape[0] == 8
    for k in range(3, 8):                     # padded slots repeat the last view
        torch.testing.assert_close(x[k], x[2])


def test_proxies_set_x_T_by_the_formula(pipe: DiffPortrait3DPipeline, size: int, monkeypatch) -> None:
    spy = Spy(pipe, monkeypatch)
    ref, conds = images(1, size, 0)[0], images(3, size, 4)
    proxies = images(2, size, 5)
    noise = noise_for(pipe, 3, size)
    pipe(ref, conds, proxy_images=[proxies[0], None, proxies[1]], latents=noise, sample_posterior=False,
         num_inference_steps=1, output_type="latent")
    x_T = spy.cond_x[0][:3]            # DDIM's scale_model_input is the identity
    e = pipe.encode_images(pipe.to_image_tensor(proxies, (size, size), "proxy"), None, sample_posterior=False)
    acp = pipe.scheduler.alphas_cumprod.double()[AWARE_NOISE_TIMESTEP]
    expected0 = acp.sqrt() * e[0].double() + (1 - acp).sqrt() * noise[0].double()
    expected2 = acp.sqrt() * e[1].double() + (1 - acp).sqrt() * noise[2].double()
    torch.testing.assert_close(x_T[0].double(), expected0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_T[2].double(), expected2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_T[1], noise[1])           # no proxy: plain Gaussian noise
    assert (x_T[0] - noise[0]).abs().max() > 1e-3


def test_share_noise(pipe: DiffPortrait3DPipeline, size: int, monkeypatch) -> None:
    spy = Spy(pipe, monkeypatch)
    ref, conds = images(1, size, 0)[0], images(3, size, 6)
    pipe(ref, conds, share_noise=True, num_inference_steps=1, seed=2, output_type="latent")
    x = spy.cond_x[0]
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0], x[2])


def test_guidance_is_the_official_cfg(pipe: DiffPortrait3DPipeline, size: int, monkeypatch) -> None:
    ref, conds = images(1, size, 0)[0], images(2, size, 7)
    noise = noise_for(pipe, 2, size)
    kw = dict(latents=noise, num_inference_steps=1, sample_posterior=False, output_type="latent")
    spy = Spy(pipe, monkeypatch)
    x1 = pipe(ref, conds, guidance_scale=1.0, **kw).images
    assert spy.uncond_calls == 0 and len(spy.cond_x) == 1        # g = 1: the conditional path only
    x0 = pipe(ref, conds, guidance_scale=0.0, **kw).images
    x3 = pipe(ref, conds, guidance_scale=3.0, **kw).images
    assert spy.uncond_calls == 2
    # one DDIM step is affine in eps = eps_u + g (eps_c - eps_u), hence affine in g
    torch.testing.assert_close(x3, x0 + 3.0 * (x1 - x0), atol=1e-4, rtol=1e-4)
    assert (x1 - x0).abs().max() > 1e-3
    # g = 0 is the official unconditional pass: it sees neither the reference nor the conditions
    other = pipe(images(1, size, 9)[0], images(2, size, 10), guidance_scale=0.0, **kw).images
    torch.testing.assert_close(other, x0)


def test_multiple_references(pipe: DiffPortrait3DPipeline, size: int) -> None:
    refs, conds = images(2, size, 11), images(2, size, 12)
    one = pipe(refs[0], conds, num_inference_steps=1, seed=0, output_type="latent").images
    two = pipe(refs, conds, num_inference_steps=1, seed=0, output_type="latent").images
    assert two.shape == one.shape and (two - one).abs().max() > 1e-4


def test_other_scheduler_by_name(pipe: DiffPortrait3DPipeline, size: int) -> None:
    ref, conds = images(1, size, 0)[0], images(2, size, 13)
    out = pipe(ref, conds, num_inference_steps=2, seed=0, scheduler="dpm++2m", output_type="np").images
    assert out.shape == (2, size, size, 3) and np.isfinite(out).all()
    assert type(pipe.scheduler).__name__ == "OfficialDDIMScheduler"   # the pipeline's own one is untouched


def test_bad_inputs(pipe: DiffPortrait3DPipeline, size: int) -> None:
    ref = images(1, size, 0)[0]
    with pytest.raises(PipelineError, match="condition images"):
        pipe(ref, [], num_inference_steps=1)
    with pytest.raises(PipelineError, match="proxy"):
        pipe(ref, images(2, size, 1), proxy_images=[None], num_inference_steps=1)
    with pytest.raises(PipelineError, match="multiple of"):
        pipe(ref, images(1, size, 1), height=size + 8, width=size + 8, num_inference_steps=1)
    with pytest.raises(PipelineError, match="window"):
        pipe(ref, images(1, size, 1), window=4, num_inference_steps=1)


def test_callback_cancel_stops(pipe: DiffPortrait3DPipeline, size: int, monkeypatch) -> None:
    spy = Spy(pipe, monkeypatch)
    ref, conds = images(1, size, 0)[0], images(11, size, 14)
    steps_seen: list[int] = []

    def on_step(p, step, t, kwargs):
        steps_seen.append(step)
        assert kwargs["num_windows"] == 2 and kwargs["latents"].shape[0] == 11
        return {"cancel": True}
    with pytest.raises(Cancelled) as info:
        pipe(ref, conds, num_inference_steps=3, seed=0, callback_on_step_end=on_step)
    assert steps_seen == [0] and info.value.step == 0
    assert len(spy.cond_x) == 2              # one step of two windows ran, nothing more

    seen: list[tuple[int, int, int, int]] = []

    def on_window(step, num_steps, window, num_windows):
        seen.append((step, num_steps, window, num_windows))
        return {"cancel": True} if (step, window) == (1, 0) else None
    with pytest.raises(Cancelled):
        pipe(ref, conds, num_inference_steps=3, seed=0, callback_on_window=on_window)
    assert seen == [(0, 3, 0, 2), (0, 3, 1, 2), (1, 3, 0, 2)]


def test_save_pretrained_round_trip(pipe: DiffPortrait3DPipeline, size: int, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "copy")
    again = DiffPortrait3DPipeline.from_pretrained(tmp_path / "copy")
    refs, conds = images(1, size, 1), images(8, size, 2)
    a = pipe(refs, conds, num_inference_steps=2, seed=3, output_type="latent").images
    b = again(refs, conds, num_inference_steps=2, seed=3, output_type="latent").images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="unsupported"):
        DiffPortrait3DPipeline.from_pretrained(tmp_path / "copy", revision="main")
