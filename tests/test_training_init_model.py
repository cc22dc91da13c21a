"""training.init_model: a model folder for stage 1 from (tiny, locally built) Stable Diffusion weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.init_model import InitModelError, init_model, main, motion_key_map

CHANNELS = (32, 64)


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": i + 2 for i, c in enumerate("abcdefgh")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD-1.5-shaped diffusers folder, tiny: CLIP text encoder + tokenizer, UNet, VAE (random weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=4, block_out_channels=CHANNELS, layers_per_block=2, cross_attention_dim=32,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                         norm_num_groups=32).save_pretrained(str(root / "unet"))
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(16, 16, 16, 16), norm_num_groups=16, latent_channels=4,
                  sample_size=32).save_pretrained(str(root / "vae"))
    CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(str(root / "text_encoder"))
    make_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import MotionAdapter
    torch.manual_seed(1)
    motion = MotionAdapter(block_out_channels=CHANNELS, motion_layers_per_block=2, motion_num_attention_heads=8,
                           motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    folder = tmp_path_factory.mktemp("motion")
    motion.save_pretrained(str(folder))
    return folder, motion.state_dict()


def test_folder_holds_SD_and_the_official_initialisation(sd_folder: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from dp3d_core.model_folder import load_model_folder, make_denoiser
    assert main(["--sd", str(sd_folder), "--out", str(tmp_path / "m")]) == 0
    parts = load_model_folder(tmp_path / "m")
    sd_unet = UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet").state_dict()
    for name in ("unet", "reference_unet"):
        got = parts[name].state_dict()
        assert got.keys() == sd_unet.keys() and all(torch.equal(got[k], sd_unet[k]) for k in got)
    cn = parts["view_controlnet"]
    assert torch.equal(cn.conv_in.weight, parts["unet"].conv_in.weight)
    assert all(not b.weight.any() for b in cn.controlnet_down_blocks) and not cn.controlnet_mid_block.weight.any()
    proj = [m.weight for n, m in parts["view_modules"].named_modules() if n.endswith("proj_out")]
    assert len(proj) == len(parts["view_modules"].down) + 1 + sum(len(u) for u in parts["view_modules"].up)
    assert all(not w.any() for w in proj)  # every view module starts as the identity
    text = CLIPTextModel.from_pretrained(str(sd_folder), subfolder="text_encoder").eval()
    ids = torch.tensor([[0] + [1] * 76])  # "" = BOS, EOS, then EOS padding
    with torch.no_grad():
        expected = text(ids).last_hidden_state
    torch.testing.assert_close(parts["prompt_embedding"]().float(), expected)
    denoiser = make_denoiser(parts, clip_length=8)  # stage 1 can start from it: the networks fit together
    x = torch.randn(8, 4, 4, 4)
    out = denoiser.eps_cond(x, 500, parts["prompt_embedding"](), x[:1], torch.rand(8, 3, 32, 32) * 2 - 1)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_motion_modules_are_mapped_key_by_key(sd_folder: Path, adapter, tmp_path: Path, capsys) -> None:
    from dp3d_core.model_folder import load_model_folder
    folder, state = adapter
    out, report = init_model(sd_folder, tmp_path / "m", motion_modules=folder)
    vm = load_model_folder(out, components=["view_modules"])["view_modules"].state_dict()
    mapping = motion_key_map(2, len(CHANNELS))
    for key, value in state.items():
        prefix = next(p for p in mapping if key.startswith(p))  # every adapter key has a place
        assert torch.equal(vm[mapping[prefix] + key[len(prefix):]], value), key
    assert not report.unused and len(report.loaded) == len(state)
    # the module after the downsampler and the upsampler's second module have no AnimateDiff counterpart
    assert report.kept_zero and all(k.startswith(("down.2.", "up.2.1.")) for k in report.kept_zero)
    assert not vm["down.2.proj_out.weight"].any()
    assert set(report.loaded) | set(report.kept_zero) == set(vm)
    assert main(["--sd", str(sd_folder), "--out", str(tmp_path / "n"), "--motion-modules", str(folder)]) == 0
    assert "view-module tensors loaded" in capsys.readouterr().out


def test_bad_inputs_fail_before_writing(sd_folder: Path, adapter, tmp_path: Path, capsys) -> None:
    folder, state = adapter
    wrong = {k.replace("down_blocks.0.", "down_blocks.1."): v for k, v in state.items() if "down_blocks.0." in k}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InitModelError, match="has shape .* needs"):
        init_model(sd_folder, tmp_path / "a", motion_modules=tmp_path / "wrong.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InitModelError, match="MotionAdapter"):
        init_model(sd_folder, tmp_path / "b", motion_modules=tmp_path / "other.safetensors")
    (tmp_path / "sd.ckpt").write_bytes(b"\x80\x04pickle")
    assert main(["--sd", str(tmp_path / "sd.ckpt"), "--out", str(tmp_path / "c")]) == 2
    assert "pickled checkpoint" in capsys.readouterr().err
    assert main(["--sd", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "not a diffusers Stable Diffusion folder" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")
