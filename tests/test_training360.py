"""DiffPortrait360 training stages (back, 360): full-turn data, what each stage trains, the written model folders.

Tiny random DiffPortrait3D model (dp3d_core.tiny) as the starting point and a synthetic numpy dataset of 64 px
images with cameras all around the head; no Blender.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dp3d_core.cameras import intrinsics_from_focal, sample_lookat, to_label
from dp3d_core.held_out import label_yaw
from training.config import ConfigError, make_config
from training.data import DatasetError, MultiViewDataset, write_labels
from training.models import views_to_360_layout
from training.train import Trainer

SIZE = 64   # the pipeline needs a multiple of 64 with the tiny 4-level UNet
IDENTITIES = 3
VIEWS = 10


def yaw_label(yaw_deg: float, pitch: float = 0.0) -> np.ndarray:
    return to_label(sample_lookat(np.pi / 2 + np.radians(yaw_deg), np.pi / 2 + pitch), intrinsics_from_focal())


def make_full_turn(root: Path, seed: int = 0, back: bool = True) -> None:
    """v00 frontal, v01 straight behind (unless ``back`` is False), the rest all around the head."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(IDENTITIES):
        base = rng.random(3)
        for v in range(VIEWS):
            rel = f"id{i:02d}/v{v:02d}.png"
            for folder, img_base in ((root, base), (root / "cond", rng.random(3))):
                (folder / f"id{i:02d}").mkdir(parents=True, exist_ok=True)
                img = np.clip(img_base + 0.2 * rng.standard_normal((SIZE, SIZE, 3)), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / rel)
            yaw = 0.0 if v == 0 else (180.0 if v == 1 and back else rng.uniform(-150, 150))
            entries.append((rel, yaw_label(yaw, 0.0 if v < 2 else rng.uniform(-0.2, 0.2))))
    write_labels(root, entries)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("turn")
    make_full_turn(root)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", seed=0, sample_size=SIZE // 8)


def config(stage: str, data: Path, model: Path, out: Path, **extra):
    values = {"data_root": str(data), "image_size": SIZE, "output_dir": str(out), "init_model": str(model),
              "batch_size": 2, "max_steps": 2, "num_targets": 8 if stage == "360" else 1, "val_steps": 2,
              "val_samples": 1, "validate_every": 1000, "checkpoint_every": 1000, "device": "cpu"}
    values.update(extra)
    return make_config(values, stage)


def weights(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in trainer.components.items() if isinstance(module, torch.nn.Module)}


def changed_networks(before, after) -> set[str]:
    return {name for name in before if any(not torch.equal(before[name][k], after[name][k]) for k in before[name])}


# ---------------------------------------------------------------- data

def test_back_mode_pairs_the_front_reference_with_the_back_view(data: Path) -> None:
    ds = MultiViewDataset(data, size=SIZE, num_targets=1, mode="back")
    for index in range(len(ds)):
        item = ds.sample(index, np.random.default_rng(index))
        assert item["reference_path"].endswith("/v00.png")
        assert item["paths"] == [f"{item['identity']}/v01.png"]
        assert abs(label_yaw(item["labels"][0].double().numpy())) == pytest.approx(180.0, abs=1e-3)


def test_dual_mode_gives_the_back_reference_and_a_continuous_sequence(data: Path) -> None:
    ds = MultiViewDataset(data, size=SIZE, num_targets=8, mode="dual")
    starts = set()
    for seed in range(6):
        item = ds.sample(1, np.random.default_rng(seed))
        assert item["reference_path"] == "id01/v00.png" and item["back_reference_path"] == "id01/v01.png"
        assert item["back_reference"].shape == (3, SIZE, SIZE)
        yaws = [label_yaw(label.double().numpy()) for label in item["labels"]]
        # consecutive views by yaw: increasing, except one wrap from +180 to -180
        assert sum(b < a for a, b in zip(yaws, yaws[1:])) <= 1
        assert len(set(item["paths"])) == 8
        starts.add(item["paths"][0])
    assert len(starts) > 1


def test_a_dataset_without_back_views_is_refused_for_the_360_stages(tmp_path: Path) -> None:
    make_full_turn(tmp_path, back=False)
    with pytest.raises(DatasetError, match="--full-turn"):
        MultiViewDataset(tmp_path, size=SIZE, num_targets=1, mode="back")


def test_360_config_errors(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="init_model"):
        config("back", data, tiny_model, tmp_path, init_model="")
    with pytest.raises(ConfigError, match="num_targets"):
        config("back", data, tiny_model, tmp_path, num_targets=8)
    with pytest.raises(ConfigError, match="train_networks"):
        config("360", data, tiny_model, tmp_path, train_networks="unet")
    with pytest.raises(ConfigError, match="train_networks"):
        config("2", data, tiny_model, tmp_path, train_networks="view_controlnet")


# ---------------------------------------------------------------- view modules into 360's layout

def test_view_modules_map_where_the_places_coincide() -> None:
    from dp3d_core.tiny import make_tiny_components
    vm3d = make_tiny_components(seed=3)["view_modules"]
    with torch.no_grad():
        for p in vm3d.parameters():
            p.normal_()
    vm360, dropped = views_to_360_layout(vm3d)
    assert vm360.config.layout == "diffportrait360" and vm360.mid is None
    layers = vm3d.config.layers_per_block
    levels = len(vm3d.config.block_out_channels)
    for level in range(levels):
        for j in range(layers):
            a = vm360.down[level * layers + j].state_dict()
            b = vm3d.down[level * (layers + 1) + j].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
    for i in range(len(vm3d.up)):
        a, b = vm360.up[i][0].state_dict(), vm3d.up[i][0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "mid" in dropped and len(dropped) == (levels - 1) + 1 + sum(len(m) - 1 for m in vm3d.up)


# ---------------------------------------------------------------- stages

@pytest.mark.parametrize("stage,trained", [("back", {"reference_unet", "view_controlnet"}),
                                           ("360", {"reference_unet", "view_controlnet", "view_modules"})])
def test_stage_trains_its_networks_and_writes_its_family(stage: str, trained: set[str], data: Path,
                                                        tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, data, tiny_model, tmp_path, lr=1e-2), resume=False)
    assert ("view_modules" in trainer.components) == (stage == "360")
    before = weights(trainer)
    trainer.train_step()
    assert changed_networks(before, weights(trainer)) == trained
    trainer.progress.step = trainer.cfg.max_steps
    trainer.save_checkpoint()
    out = trainer.export()
    index = json.loads((out / "model_index.json").read_text())
    assert index["family"] == "DiffPortrait360"
    assert index["variant"] == ("back_head" if stage == "back" else "views")
    assert (out / "view_modules").is_dir() == (stage == "360")


def test_train_networks_restricts_the_360_stage(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config("360", data, tiny_model, tmp_path, lr=1e-2, train_networks="view_modules"),
                      resume=False)
    before = weights(trainer)
    trainer.train_step()
    assert changed_networks(before, weights(trainer)) == {"view_modules"}


def test_360_stage_reads_the_back_reference(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The same batch with another back view gives another loss: the back view is in the reference attention."""
    trainer = Trainer(config("360", data, tiny_model, tmp_path), resume=False)
    batch = trainer.validation_batch()
    assert "back_reference" in batch
    loss = trainer.loss_on(batch)
    other = dict(batch, back_reference=-batch["back_reference"], back_reference_path=["elsewhere.png"])
    assert trainer.loss_on(other) != loss


def test_resumed_360_stage_repeats_the_next_loss(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    cfg = config("360", data, tiny_model, tmp_path, max_steps=4, lr=1e-3, ema=True)
    first = Trainer(cfg, resume=False)
    first.train_step()
    first.save_checkpoint()
    expected = first.train_step()
    resumed = Trainer(cfg)
    assert resumed.progress.step == 1
    assert resumed.train_step() == pytest.approx(expected, rel=0, abs=0)


def test_trained_folders_run_in_the_360_pipeline(data: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A run of both stages gives the contract's folder: views + back_head/ inside, run by the pipeline."""
    from dp3d_core.pipeline360 import DiffPortrait360Pipeline
    from training.validate import to_uint8
    back = Trainer(config("back", data, tiny_model, tmp_path, max_steps=1), resume=False).run()
    views = Trainer(config("360", data, tiny_model, tmp_path, max_steps=1), resume=False).run()
    views.joinpath("back_head").symlink_to(back, target_is_directory=True)
    pipe = DiffPortrait360Pipeline.from_pretrained(views, back_head=views / "back_head")
    ds = MultiViewDataset(data, size=SIZE, num_targets=8, mode="dual")
    item = ds.sample(0, np.random.default_rng(0))
    image = lambda t: Image.fromarray(to_uint8(t[None])[0])  # noqa: E731
    out = pipe(image(item["reference"]), [image(c) for c in item["conditions"]],
               back_condition_image=image(ds.sample(0, np.random.default_rng(0))["conditions"][0]),
               num_inference_steps=2, output_type="np", closed_loop=True)
    assert np.asarray(out.images).shape == (8, SIZE, SIZE, 3) and np.isfinite(np.asarray(out.images)).all()
    assert out.back_image.shape == (SIZE, SIZE, 3)


def test_shipped_small360_model_loads_and_makes_a_full_turn() -> None:
    """models/small360 (contract 1: the view model with back_head/ inside, fp16) runs in the 360 pipeline."""
    from dp3d_core.model_folder import model_family
    from dp3d_core.pipeline360 import DiffPortrait360Pipeline

    folder = Path(__file__).resolve().parents[1] / "models" / "small360"
    assert model_family(folder).variant == "views" and model_family(folder / "back_head").variant == "back_head"
    assert sum(f.stat().st_size for f in folder.rglob("*.safetensors")) <= 40 * 2**20
    pipe = DiffPortrait360Pipeline.from_pretrained(folder, back_head=folder / "back_head")
    rng = np.random.default_rng(0)
    image = lambda: rng.random((64, 64, 3)).astype(np.float32)  # noqa: E731
    out = pipe(image(), [image() for _ in range(3)], back_condition_image=image(), num_inference_steps=2,
               seed=0, output_type="np", closed_loop=True)
    assert np.asarray(out.images).shape == (3, 64, 64, 3) and np.isfinite(out.images).all()
    assert out.back_image.shape == (64, 64, 3) and out.back_image.std() > 0.01
