"""Checkpoint converter: full-size key coverage (on the meta device), bad inputs, DDP/wrapper handling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dp3d_core.convert import (CLIP_EMPTY_PROMPT_IDS, ConversionError, build_networks, convert_state_dict,
                               empty_prompt_embedding, load_checkpoint, main)
from dp3d_core.model_folder import NETWORKS, ModelFolderError, load_model_folder, make_denoiser
from dp3d_core.models.config import official_params

from tests.conftest import PARITY_FIXTURE as FIXTURE




@pytest.fixture(scope="module")
def full_keys() -> dict[str, list[int]]:
    return json.loads((FIXTURE / "official_keys_full.json").read_text())["keys"]


def meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


@pytest.fixture(scope="module")
def parity_state() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "parity_state_dict.safetensors"))


def test_full_size_checkpoint_converts_with_every_key_accounted_for(full_keys):
    sd = meta_state(full_keys)
    converted = convert_state_dict(sd, official_params())
    nets = build_networks(converted, device="meta")  # loads with shape checks; allocates nothing
    embedding = empty_prompt_embedding(converted.state_dicts["text_encoder"], converted.report)
    report = converted.report
    assert report.ok, str(report)
    assert report.unused == [] and report.missing == [] and report.unexpected == []
    assert sum(report.converted.values()) + len(report.ignored) == len(full_keys) == 2937
    ignored = set(report.ignored)
    assert sum(k.startswith("control_model.input_hint_block.") for k in ignored) == 16
    assert sum(k.endswith(".pos_encoder.pe") for k in ignored) == 54
    assert {"betas", "alphas_cumprod", "logvar", "posterior_mean_coef2"} <= ignored
    assert len(ignored) == 16 + 54 + 13
    # the dead-but-present reference-net layers are mapped, not dropped
    assert not any(k.startswith("control_model.output_blocks.11.1.") for k in ignored)
    assert set(report.recomputed) == {*(f"view_modules.{n}" for n, _ in nets["view_modules"].named_buffers()
                                        if n.endswith("pos_embed.pe")),
                                      "reference_unet.conv_norm_out.weight", "reference_unet.conv_norm_out.bias",
                                      "reference_unet.conv_out.weight", "reference_unet.conv_out.bias"}
    assert len(nets["view_modules"].down) == 11 and len(nets["view_modules"].up) == 12
    assert sum(len(m) for m in nets["view_modules"].up) == 15  # 11 + mid + 15 = 27 modules
    assert nets["unet"].config.block_out_channels == (320, 640, 1280, 1280)
    assert tuple(embedding.shape) == (1, 77, 768)


def test_full_size_shapes_are_inferred_without_a_config(full_keys):
    converted = convert_state_dict(meta_state(full_keys))
    params = converted.params
    assert (params["model_channels"], params["channel_mult"], params["context_dim"]) == (320, [1, 2, 4, 4], 768)
    assert sorted(params["attention_resolutions"]) == [1, 2, 4]
    assert converted.report.ok


def test_plain_stable_diffusion_checkpoint_is_refused(full_keys):
    plain = {k: v for k, v in meta_state(full_keys).items()
             if (k.startswith("model.diffusion_model.") and "_motion_module." not in k)
             or k.startswith(("first_stage_model.", "cond_stage_model.", "betas"))}
    with pytest.raises(ConversionError, match="plain Stable Diffusion"):
        convert_state_dict(plain)


def test_random_keys_are_refused():
    with pytest.raises(ConversionError, match="not a DiffPortrait3D checkpoint"):
        convert_state_dict({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)})


def test_missing_and_unknown_keys_are_reported(parity_state):
    sd = dict(parity_state)
    sd.pop("pose_control_model.zero_convs.3.0.weight")
    sd["pose_control_model.surprise.weight"] = torch.zeros(3)
    converted = convert_state_dict(sd, official_params({"model_channels": 32, "channel_mult": [1, 2, 2, 2],
                                                        "context_dim": 32}))
    build_networks(converted, device="meta")
    assert converted.report.unused == ["pose_control_model.surprise.weight"]
    assert converted.report.missing == ["view_controlnet.controlnet_down_blocks.3.weight"]
    assert not converted.report.ok
    assert "UNUSED" in str(converted.report) and "MISSING" in str(converted.report)


class _Exploit:
    """Unpickling this would create a file (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "model.th"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, bad)
    assert not marker.exists()
    with pytest.raises(ConversionError, match="refusing to load"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_ddp_prefix_and_state_dict_wrapper_are_unwrapped(tmp_path, parity_state):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in parity_state.items()}, "epoch": 3}, path)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(parity_state)
    assert torch.equal(loaded["control_model.input_blocks.0.0.weight"],
                       parity_state["control_model.input_blocks.0.0.weight"])


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.th")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable"):
        load_checkpoint(junk)


def test_cli_writes_a_folder_that_reproduces_the_official_eps(tmp_path, capsys):
    context = load_file(str(FIXTURE / "parity_io.safetensors"))
    embedding = tmp_path / "empty_prompt.safetensors"
    save_file({"embedding": context["inputs.context"][:1].contiguous()}, str(embedding))
    out = tmp_path / "model"
    code = main([str(FIXTURE / "parity_state_dict.safetensors"), str(out),
                 "--config", str(FIXTURE / "parity_config.json"), "--context-from", str(embedding)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "every key accounted for" in printed and "skipped vae" in printed
    with pytest.raises(ModelFolderError, match="missing the 'vae' component"):
        load_model_folder(out)
    parts = load_model_folder(out, components=[*NETWORKS, "prompt_embedding"])
    denoiser = make_denoiser(parts)
    with torch.no_grad():
        eps = denoiser.eps_cond(context["inputs.x_noisy"], context["t981.timesteps"], parts["prompt_embedding"](),
                                context["inputs.ref_latent"], context["inputs.pose"])
    assert (eps - context["t981.eps_cond"]).abs().max() < 1e-4
    # a second run into the same folder is refused unless asked to overwrite
    assert main([str(FIXTURE / "parity_state_dict.safetensors"), str(out), "--context-from", str(embedding)]) == 2


def test_cli_reports_a_foreign_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    assert main([str(path), str(tmp_path / "out")]) == 2
    assert "plain Stable Diffusion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_empty_prompt_embedding_uses_clip_final_layer_norm_output():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu")
    clip = CLIPTextModel(config).eval()
    checkpoint = {f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()}
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    ours = empty_prompt_embedding(convert_ldm_clip_checkpoint(checkpoint))
    with torch.no_grad():
        expected = clip(input_ids=torch.tensor([CLIP_EMPTY_PROMPT_IDS])).last_hidden_state
    assert CLIP_EMPTY_PROMPT_IDS[:2] == [49406, 49407] and len(CLIP_EMPTY_PROMPT_IDS) == 77
    assert tuple(ours.shape) == (1, 77, 64)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
