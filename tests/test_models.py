"""The networks on a tiny random model: folder round trip, locked F, input checks, official quirks."""
from __future__ import annotations

import pytest
import torch

from dp3d_core.model_folder import NETWORKS, ModelFolderError, load_model_folder, make_denoiser
from dp3d_core.models import ModelInputError
from dp3d_core.tiny import make_tiny_model_folder

H, W = 8, 12  # latent size (non-square on purpose)






@pytest.fixture(scope="module")
def inputs(components):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, H, W, generator=g)
    ref = torch.randn(1, 4, H, W, generator=g).expand(8, -1, -1, -1)
    cond = torch.rand(8, 3, 8 * H, 8 * W, generator=g) * 2 - 1
    context = components["prompt_embedding"]()
    return x, ref, cond, context


@pytest.fixture(scope="module")
def base(denoiser, inputs):
    """eps_cond / eps_uncond at t=600 of the in-memory tiny model (computed once; CPU time is scarce)."""
    x, ref, cond, context = inputs
    with torch.no_grad():
        return denoiser.eps_cond(x, 600, context, ref, cond), denoiser.eps_uncond(x, 600, context)


def test_model_folder_round_trip_gives_identical_outputs(tmp_path, components, inputs, base):
    x, ref, cond, context = inputs
    before_c, before_u = base
    make_tiny_model_folder(tmp_path / "tiny", seed=0)
    loaded = load_model_folder(tmp_path / "tiny")
    assert set(loaded) == {"unet", "reference_unet", "view_controlnet", "view_modules", "vae", "scheduler",
                           "prompt_embedding"}
    assert torch.equal(loaded["prompt_embedding"](), context)
    again = make_denoiser(loaded)
    with torch.no_grad():
        after_c = again.eps_cond(x, 600, loaded["prompt_embedding"](), ref, cond)
        after_u = again.eps_uncond(x, 600, loaded["prompt_embedding"]())
    # weights survive bit for bit; outputs agree to fp32 noise (loaded tensors sit at other memory alignments,
    # which can change CPU GEMM summation order)
    for name in ("unet", "reference_unet", "view_controlnet", "view_modules", "vae", "prompt_embedding"):
        ours, theirs = components[name].state_dict(), loaded[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    torch.testing.assert_close(after_c, before_c, atol=2e-5, rtol=0)
    torch.testing.assert_close(after_u, before_u, atol=2e-5, rtol=0)
    assert loaded["scheduler"].config.steps_offset == 1 and not loaded["scheduler"].config.clip_sample


def test_locked_unet_has_no_trainable_parameters(denoiser):
    assert all(not p.requires_grad for p in denoiser.unet.parameters())
    for trainable in (denoiser.reference_unet, denoiser.view_controlnet, denoiser.view_modules):
        assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("batch", [1, 4, 12])
def test_batch_not_a_multiple_of_eight_is_refused(denoiser, inputs, batch):
    x, ref, cond, context = inputs
    xb = torch.randn(batch, 4, H, W)
    with pytest.raises(ModelInputError, match="multiple of 8"):
        denoiser.eps_uncond(xb, 500, context)
    with pytest.raises(ModelInputError, match="multiple of 8"):
        denoiser.eps_cond(xb, 500, context, ref[:1], torch.zeros(batch, 3, 8 * H, 8 * W))


def test_bad_shapes_are_refused_with_clear_messages(denoiser, inputs):
    x, ref, cond, context = inputs
    with pytest.raises(ModelInputError, match="8x the latent size"):
        denoiser.eps_cond(x, 500, context, ref, cond[:, :, :-8])
    with pytest.raises(ModelInputError, match="channels"):
        denoiser.eps_uncond(torch.randn(8, 3, H, W), 500, context)
    with pytest.raises(ModelInputError, match="condition"):
        denoiser.eps_cond(x, 500, context, ref, cond[:, :1])
    with pytest.raises(ModelInputError, match="context"):
        denoiser.eps_uncond(x, 500, torch.zeros(1, 77, 7))
    with pytest.raises(ModelInputError, match="reference latent"):
        denoiser.eps_cond(x, 500, context, ref[:, :, :4], cond)
    with pytest.raises(ModelInputError, match="integers"):
        denoiser.eps_uncond(x, 0.5, context)


def test_two_clips_in_one_batch_match_each_clip_alone(denoiser, inputs, base):
    x, ref, cond, context = inputs
    x2 = torch.flip(x, dims=[3])
    with torch.no_grad():
        two = denoiser.eps_uncond(x2, 600, context)
        both = denoiser.eps_uncond(torch.cat([x, x2]), 600, context)
    torch.testing.assert_close(both[:8], base[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[8:], two, atol=1e-5, rtol=1e-5)


def test_view_order_matters(denoiser, inputs, base):
    x, ref, cond, context = inputs
    flip = torch.arange(7, -1, -1)
    with torch.no_grad():
        flipped = denoiser.eps_uncond(x[flip], 600, context)[flip]
    assert (base[1] - flipped).abs().max() > 1e-3


def test_middle_view_module_only_on_unconditional_pass(components, inputs, base):
    x, ref, cond, context = inputs
    denoiser = make_denoiser(components)  # a second denoiser over the same networks takes them over
    with torch.no_grad():
        saved = {k: v.clone() for k, v in denoiser.view_modules.mid.state_dict().items()}
        denoiser.view_modules.mid.proj_out.weight.mul_(5.0)
        try:
            c1, u1 = denoiser.eps_cond(x, 600, context, ref, cond), denoiser.eps_uncond(x, 600, context)
        finally:
            denoiser.view_modules.mid.load_state_dict(saved)
    assert torch.equal(base[0], c1)
    assert (base[1] - u1).abs().max() > 1e-4


def test_reference_and_condition_change_conditional_eps(denoiser, inputs, base):
    x, ref, cond, context = inputs
    with torch.no_grad():
        other_ref = denoiser.eps_cond(x, 600, context, torch.randn_like(ref), cond)
        other_cond = denoiser.eps_cond(x, 600, context, ref, -cond)
    assert (base[0] - other_ref).abs().max() > 1e-4
    assert (base[0] - other_cond).abs().max() > 1e-4


def test_several_references_concatenate_order_free(denoiser, inputs, base):
    x, ref, cond, context = inputs
    ref2 = torch.randn_like(ref)
    with torch.no_grad():
        as_list = denoiser.eps_cond(x, 600, context, [ref[:1]], cond)  # one row broadcast to all views
        ab = denoiser.eps_cond(x, 600, context, [ref, ref2], cond)
        ba = denoiser.eps_cond(x, 600, context, [ref2, ref], cond)
    torch.testing.assert_close(as_list, base[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ab, ba, atol=1e-5, rtol=1e-5)
    assert (ab - base[0]).abs().max() > 1e-4


def test_shared_reference_shortcut_matches_per_row_reference_pass(denoiser, inputs, base):
    x, ref, cond, context = inputs
    denoiser.share_identical_references = False
    try:
        with torch.no_grad():
            per_row = denoiser.eps_cond(x, 600, context, ref, cond)
    finally:
        denoiser.share_identical_references = True
    torch.testing.assert_close(per_row, base[0], atol=2e-5, rtol=0)


def test_loading_only_the_networks(tmp_path):
    make_tiny_model_folder(tmp_path / "m", seed=3)
    loaded = load_model_folder(tmp_path / "m", components=NETWORKS)
    assert set(loaded) == set(NETWORKS)
    with pytest.raises(ModelFolderError, match="unknown component"):
        load_model_folder(tmp_path / "m", components=["text_encoder"])


def test_gradients_reach_trainable_nets_but_not_locked_unet(components, inputs):
    x, ref, cond, context = inputs
    denoiser = make_denoiser(components)
    denoiser.zero_grad(set_to_none=True)
    eps = denoiser.eps_cond(x, 600, context, ref, cond)  # grad enabled: F_ref runs to the end
    eps.square().mean().backward()
    assert all(p.grad is None for p in denoiser.unet.parameters())
    ref_attn1 = denoiser.reference_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert ref_attn1.grad is not None and ref_attn1.grad.abs().sum() > 0
    assert denoiser.view_controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert denoiser.view_modules.down[0].proj_out.weight.grad.abs().sum() > 0
    assert denoiser.view_modules.mid.proj_out.weight.grad is None  # middle module: unconditional pass only
    denoiser.zero_grad(set_to_none=True)
