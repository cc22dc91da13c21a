"""DiffPortrait360 checkpoints through the converter: family from the keys, full-size key coverage on the meta
device, mismatches refused, and model folders that reproduce the official eps."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dp3d_core.convert import ConversionError, build_networks, convert_state_dict, empty_prompt_embedding, main
from dp3d_core.families import FAMILY_3D, FAMILY_360_BACK_HEAD, FAMILY_360_VIEWS, detect_family
from dp3d_core.model_folder import load_model_folder, make_denoiser, model_family, read_model_index
from dp3d_core.models.config import official_params

from tests.conftest import DP360_FIXTURE, PARITY_FIXTURE


def full_keys(name: str) -> dict[str, list[int]]:
    return json.loads((DP360_FIXTURE / f"official_keys_full_{name}.json").read_text())["keys"]


def meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def state_keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name, total, pe", [("views", 2726, 40), ("backhead", 2166, 0)])
def test_full_size_checkpoint_converts_with_every_key_accounted_for(name, total, pe):
    keys = full_keys(name)
    converted = convert_state_dict(meta_state(keys))
    nets = build_networks(converted, device="meta")
    embedding = empty_prompt_embedding(converted.state_dicts["text_encoder"], converted.report)
    report = converted.report
    assert report.ok, str(report)
    assert sum(report.converted.values()) + len(report.ignored) == len(keys) == total
    reasons = list(report.ignored.values())
    assert reasons.count("noise-schedule buffer (recomputed by the scheduler)") == 13
    assert sum(k.endswith(".pos_encoder.pe") for k in report.ignored) == pe
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in report.ignored
    assert len(report.ignored) == 13 + pe + 1
    assert not any(k.startswith("control_model.input_hint_block.") for k in keys)  # no hint encoder (V2)
    assert tuple(embedding.shape) == (1, 77, 768)
    assert nets["unet"].config.block_out_channels == (320, 640, 1280, 1280)
    if name == "views":
        assert converted.family == FAMILY_360_VIEWS
        modules = nets["view_modules"]
        assert modules.config.layout == "diffportrait360" and modules.config.max_views == 24
        assert len(modules.down) == 8 and [len(m) for m in modules.up] == [1] * 12 and modules.mid is None
        widths = [m.proj_in.in_features for m in modules.down]
        assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280]  # after input blocks 1,2,4,5,7,8,10,11
    else:
        assert converted.family == FAMILY_360_BACK_HEAD and "view_modules" not in nets


def test_families_from_the_real_key_lists():
    assert detect_family(full_keys("views")) == FAMILY_360_VIEWS
    assert detect_family(full_keys("backhead")) == FAMILY_360_BACK_HEAD
    real_3d = json.loads((PARITY_FIXTURE / "official_keys_full.json").read_text())["keys"]
    assert detect_family(real_3d) == FAMILY_3D


def test_diffportrait360_motion_modules_never_load_into_diffportrait3d_places():
    """Modules 3, 6, 7 have identical shapes in both families but sit elsewhere (quirk V3): the keys decide."""
    real_3d = json.loads((PARITY_FIXTURE / "official_keys_full.json").read_text())["keys"]
    views = full_keys("views")
    assert views["model.diffusion_model.input_blocks_motion_module.3.0.temporal_transformer.proj_in.weight"] == \
        real_3d["model.diffusion_model.input_blocks_motion_module.3.0.temporal_transformer.proj_in.weight"]
    # A DiffPortrait3D checkpoint whose motion modules were replaced by DiffPortrait360's: refused, not loaded.
    mixed = {k: v for k, v in real_3d.items() if "_motion_module." not in k}
    mixed.update({k: v for k, v in views.items() if "_motion_module." in k})
    mixed.update({k: v for k, v in real_3d.items() if k.startswith("model.diffusion_model.middle_block_motion")})
    with pytest.raises(ConversionError, match="neither DiffPortrait3D .27. nor DiffPortrait360 .20.*wrong places"):
        convert_state_dict(meta_state(mixed))
    # Asking for one family and getting the other is a clear error, both ways.
    with pytest.raises(ConversionError, match="is a DiffPortrait360 view model.*not a DiffPortrait3D checkpoint"):
        convert_state_dict(meta_state(views), family="DiffPortrait3D")
    with pytest.raises(ConversionError, match="is a DiffPortrait3D model.*not a DiffPortrait360 checkpoint"):
        convert_state_dict(meta_state(real_3d), family="DiffPortrait360")
    # ... and so is a config that places the view modules the other way.
    with pytest.raises(ConversionError, match="view_module_layout 'diffportrait3d'.*DiffPortrait360 view model"):
        convert_state_dict(meta_state(views), {**official_params(), "view_module_layout": "diffportrait3d"})


def test_reference_net_with_hint_encoder_but_no_view_modules_is_incomplete():
    real_3d = json.loads((PARITY_FIXTURE / "official_keys_full.json").read_text())["keys"]
    no_motion = {k: v for k, v in real_3d.items() if "_motion_module." not in k}
    with pytest.raises(ConversionError, match="hint encoder.*no view modules"):
        convert_state_dict(meta_state(no_motion))


@pytest.fixture(scope="module")
def io():
    return load_file(str(DP360_FIXTURE / "views_io.safetensors")), load_file(str(DP360_FIXTURE / "backhead_io.safetensors"))


@pytest.fixture(scope="module")
def embedding_file(tmp_path_factory, io):
    path = tmp_path_factory.mktemp("emb") / "empty_prompt.safetensors"
    save_file({"embedding": io[0]["inputs.context"][:1].contiguous()}, str(path))
    return path


def test_cli_writes_the_back_head_folder_that_reproduces_the_official_eps(tmp_path, capsys, io, embedding_file):
    state = load_file(str(DP360_FIXTURE / "views_state_dict.safetensors"))
    checkpoint = tmp_path / "back_head-230000.safetensors"
    save_file({k: v for k, v in state.items() if "_motion_module." not in k}, str(checkpoint))
    out = tmp_path / "back_head"
    assert main([str(checkpoint), str(out), "--config", str(DP360_FIXTURE / "backhead_config.json"),
                 "--context-from", str(embedding_file), "--family", "DiffPortrait360"]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "every key accounted for" in printed and "DiffPortrait360 back-head model" in printed
    index = read_model_index(out)
    assert index["family"] == "DiffPortrait360" and index["variant"] == "back_head" and "view_modules" not in index
    assert model_family(out) == FAMILY_360_BACK_HEAD
    parts = load_model_folder(out, components=["unet", "reference_unet", "view_controlnet", "prompt_embedding"])
    denoiser = make_denoiser(parts, clip_length=1)
    back = io[1]
    with torch.no_grad():
        eps = denoiser.eps_cond(back["inputs.x_noisy"], back["t981.timesteps"], back["inputs.context"],
                                back["inputs.ref_latent"], back["inputs.pose"])
    assert (eps - back["t981.eps_cond"]).abs().max() < 1e-4
    # The same file is refused when a DiffPortrait3D checkpoint was asked for.
    assert main([str(checkpoint), str(tmp_path / "other"), "--family", "DiffPortrait3D",
                 "--context-from", str(embedding_file)]) == 2
    assert "not a DiffPortrait3D checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_cli_writes_the_view_folder(tmp_path, capsys, io, embedding_file):
    out = tmp_path / "views"
    assert main([str(DP360_FIXTURE / "views_state_dict.safetensors"), str(out),
                 "--context-from", str(embedding_file)]) == 0
    assert "DiffPortrait360 view model" in capsys.readouterr().out
    assert model_family(out) == FAMILY_360_VIEWS
    parts = load_model_folder(out, components=["unet", "reference_unet", "view_controlnet", "view_modules",
                                               "prompt_embedding"])
    assert parts["view_modules"].config.layout == "diffportrait360"
    views = io[0]
    with torch.no_grad():
        eps = make_denoiser(parts).eps_cond(views["inputs.x_noisy"], views["t501.timesteps"],
                                            parts["prompt_embedding"](),
                                            [views["inputs.ref_latent"], views["inputs.back_ref_latent"]],
                                            views["inputs.pose"])
    assert (eps - views["t501.eps_cond"]).abs().max() < 1e-4


class _Exploit:
    """Unpickling this would create a file (stands in for arbitrary code execution)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_back_head_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "back_head-230000.th"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                "payload": _Exploit(marker)}, checkpoint)
    assert main([str(checkpoint), str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
