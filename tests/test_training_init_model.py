"""training.init_model: a model folder for stage 1 from (tiny, locally built) Stable Diffusion weights."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    from diffusers import PNDMScheduler
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1).save_pretrained(str(root / "scheduler"))
    # model_index.json as in SD 1.5's folder (diffusers' single-file loader reads it)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return root


# ---------------------------------------------------------------------------- the original (LDM) single-file layout
# Written here from the diffusers folder, in the key layout of the original SD-1.x checkpoints, so the test can
# check that diffusers' own single-file loader reads it back into exactly the folder's weights.
LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
LDM_UNET = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(name: str, layers: int, up_attention: list[bool]) -> str:
    if name in LDM_UNET:
        return LDM_UNET[name]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        way, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{1 + b * (layers + 1) + j}" if way == "down" else f"output_blocks.{b * (layers + 1) + j}"
        return f"{block}.0.{LDM_RESNET.get(rest, rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
        b = int(m[1])
        return f"output_blocks.{b * (layers + 1) + layers}.{2 if up_attention[b] else 1}.conv"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{LDM_RESNET.get(m[2], m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    raise KeyError(name)


def ldm_vae_key(name: str, levels: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         name):
        part, way, i, kind, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
        level = i if way == "down" else levels - 1 - i  # the original decoder counts its levels bottom-up
        if kind == "resnets":
            return f"{part}.{way}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{way}.{level}.{way}sample.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        return f"{m[1]}.mid.attn_1.{LDM_VAE_ATTENTION[m[2]]}"
    return name.replace("conv_norm_out", "norm_out")


def write_single_file(sd: Path, path: Path, parts: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    state: dict[str, torch.Tensor] = {}
    if "unet" in parts:
        unet = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet")
        up_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
        for key, value in unet.state_dict().items():
            name, param = key.rsplit(".", 1)
            new = ldm_unet_key(name, unet.config.layers_per_block, up_attention)
            state[f"model.diffusion_model.{new}.{param}"] = value
    if "vae" in parts:
        vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae")
        for key, value in vae.state_dict().items():
            name, param = key.rsplit(".", 1)
            if ".mid_block.attentions." in name and value.ndim == 2:
                value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
            state[f"first_stage_model.{ldm_vae_key(name, len(vae.config.block_out_channels))}.{param}"] = value
    if "text_encoder" in parts:
        text = CLIPTextModel.from_pretrained(str(sd), subfolder="text_encoder")
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def configs_only(sd: Path, folder: Path) -> Path:
    """The diffusers folder without its weights: what --config contributes is configs and the tokenizer only."""
    shutil.copytree(sd, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def same_folder(a: Path, b: Path) -> list[str]:
    """Files that differ between two model folders (``_name_or_path``, where a model was read from, aside)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    differ = []
    for rel in files:
        if rel.suffix == ".safetensors":
            x, y = load_file(str(a / rel)), load_file(str(b / rel))
            same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        elif rel.suffix == ".json":
            x, y = (json.loads((f / rel).read_text()) for f in (a, b))
            same = {k: v for k, v in x.items() if k != "_name_or_path"} == \
                {k: v for k, v in y.items() if k != "_name_or_path"}
        else:
            same = (a / rel).read_bytes() == (b / rel).read_bytes()
        if not same:
            differ.append(str(rel))
    return differ


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


def test_a_single_file_checkpoint_gives_the_folder_the_diffusers_folder_gives(sd_folder: Path, tmp_path: Path) -> None:
    """diffusers' own single-file loader, configs from a local folder without weights (nothing downloaded)."""
    single = write_single_file(sd_folder, tmp_path / "sd.safetensors")
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:  # the original layout, e.g. SD 1.5's upsampler and VAE attention
        assert f.get_slice("model.diffusion_model.output_blocks.2.1.conv.weight").get_shape()[0] == CHANNELS[1]
        assert len(f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()) == 4
    config = configs_only(sd_folder, tmp_path / "config")
    assert main(["--sd", str(single), "--config", str(config), "--out", str(tmp_path / "from_file")]) == 0
    assert main(["--sd", str(sd_folder), "--out", str(tmp_path / "from_folder")]) == 0
    assert same_folder(tmp_path / "from_folder", tmp_path / "from_file") == []
    assert main(["--sd", str(sd_folder), "--out", str(tmp_path / "seed1"), "--seed", "1"]) == 0
    # the seed sets the randomly initialised part (F_cam's conditioning embedding), nothing else
    assert same_folder(tmp_path / "from_folder", tmp_path / "seed1") == [
        "view_controlnet/diffusion_pytorch_model.safetensors", "view_modules/diffusion_pytorch_model.safetensors"]


def test_an_incomplete_single_file_or_config_fails_before_loading(sd_folder: Path, tmp_path: Path, capsys) -> None:
    no_text = write_single_file(sd_folder, tmp_path / "unet_vae.safetensors", parts=("unet", "vae"))
    # diffusers alone would take the text encoder from --config's weights: refused, the embedding must be this file's
    assert main(["--sd", str(no_text), "--config", str(sd_folder), "--out", str(tmp_path / "a")]) == 2
    assert "no CLIP text encoder" in capsys.readouterr().err
    full = write_single_file(sd_folder, tmp_path / "sd.safetensors")
    assert main(["--sd", str(full), "--config", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a diffusers Stable Diffusion folder" in capsys.readouterr().err
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert main(["--sd", str(tmp_path / "broken.safetensors"), "--config", str(sd_folder),
                 "--out", str(tmp_path / "c")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")
