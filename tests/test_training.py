"""Training: data loading, the stages' freezing, loss, checkpoint/resume and the written model folder.

Tiny random model (dp3d_core.tiny) and a synthetic numpy dataset of 32 px images; no Blender.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dp3d_core.cameras import from_label, intrinsics_from_focal, sample_lookat, to_label
from training.config import ConfigError, load_config, make_config
from training.data import DatasetError, MultiViewDataset, batch_for_step, read_labels, write_labels
from training.models import TRAINABLE, params_of
from training.train import Trainer, sample_generators

SIZE = 32


IDENTITIES = 3
VIEWS = 9


def make_dataset(root: Path, seed: int = 0, size: int = SIZE) -> dict[str, np.ndarray]:
    """Numpy images: each identity a base colour + noise; conditions mirror the layout under cond/."""
    rng = np.random.default_rng(seed)
    entries, labels = [], {}
    for i in range(IDENTITIES):
        base = rng.random(3)
        for v in range(VIEWS):
            rel = f"id{i:02d}/v{v:02d}.png"
            for folder, img_base in ((root, base), (root / "cond", rng.random(3))):
                (folder / f"id{i:02d}").mkdir(parents=True, exist_ok=True)
                img = np.clip(img_base + 0.2 * rng.standard_normal((size, size, 3)), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / rel)
            label = to_label(sample_lookat(np.pi / 2 + rng.uniform(-0.6, 0.6), np.pi / 2 + rng.uniform(-0.3, 0.3)),
                             intrinsics_from_focal())
            entries.append((rel, label))
            labels[rel] = label
    write_labels(root, entries)
    return labels


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", seed=0, sample_size=SIZE // 8)


def config(stage: str, data: Path, model: Path, out: Path, **extra):
    values = {"data_root": str(data), "image_size": extra.pop("image_size", SIZE), "output_dir": str(out),
              "init_model": str(model),
              "batch_size": 2, "max_steps": 2, "num_targets": 8 if stage == "3" else 1, "val_steps": 2,
              "val_samples": 1, "validate_every": 1000, "checkpoint_every": 1000, "device": "cpu",
              "vae_config": {"block_out_channels": [16, 16, 16, 16], "latent_channels": 4}}
    values.update(extra)
    return make_config(values, stage)


def snapshot(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
            for name, module in trainer.components.items() if isinstance(module, torch.nn.Module)}


# ---------------------------------------------------------------- data

def test_labels_round_trip_through_cameras(tmp_path: Path) -> None:
    written = make_dataset(tmp_path)
    read = dict(read_labels(tmp_path))
    assert read.keys() == written.keys()
    for rel, label in read.items():
        c2w, k = from_label(label)
        np.testing.assert_array_equal(to_label(c2w, k), label)
        np.testing.assert_allclose(label, written[rel], rtol=0, atol=1e-12)
    ds = MultiViewDataset(tmp_path, size=SIZE, num_targets=3, seed=1)
    item = ds[0]
    for rel, label in zip(item["paths"], item["labels"]):
        np.testing.assert_allclose(label.numpy(), written[rel].astype(np.float32))


def test_sample_shapes_same_identity_and_shuffled_views(dataset_root: Path) -> None:
    ds = MultiViewDataset(dataset_root, size=SIZE, num_targets=8, seed=0)
    assert len(ds) == IDENTITIES
    item = ds[1]
    assert item["targets"].shape == (8, 3, SIZE, SIZE) and item["conditions"].shape == (8, 3, SIZE, SIZE)
    assert item["reference"].shape == (3, SIZE, SIZE) and item["labels"].shape == (8, 25)
    assert all(p.split("/")[0] == item["identity"] for p in item["paths"])
    assert float(item["targets"].min()) >= -1 and float(item["targets"].max()) <= 1
    orders = {tuple(ds.sample(1, np.random.default_rng(s))["paths"]) for s in range(5)}
    assert len(orders) > 1
    assert batch_for_step(ds, 3, 2)["paths"] == batch_for_step(ds, 3, 2)["paths"]


def test_missing_and_corrupt_images_are_reported_once_and_skipped(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    make_dataset(tmp_path)
    missing = tmp_path / "id00" / "v01.png"
    missing.unlink()
    corrupt = tmp_path / "id01" / "v02.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = tmp_path / "cond" / "id02" / "v03.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        ds = MultiViewDataset(tmp_path, size=SIZE, num_targets=VIEWS - 1, seed=0)
        seen = set()
        for step in range(12):
            seen.update(p for paths in batch_for_step(ds, step, 3)["paths"] for p in paths)
    text = caplog.text
    assert str(missing) in text and str(corrupt) in text and str(truncated) in text
    # reported once, not every time it would have been drawn
    assert sum(str(corrupt) in r.getMessage() for r in caplog.records) == 1
    assert "id00/v01.png" in ds.problems and "id01/v02.png" in ds.problems
    assert "id00/v01.png" not in seen and "id01/v02.png" not in seen and "id02/v03.png" not in seen
    assert len(seen) > 10


def test_unusable_dataset_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.json"):
        MultiViewDataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["id0/a.png", [1, 2, 3]]]}))
    with pytest.raises(DatasetError, match="25 numbers"):
        MultiViewDataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["id0/a.png", [0.0] * 25]]}))
    with pytest.raises(DatasetError, match="missing image"):
        MultiViewDataset(tmp_path)


# ---------------------------------------------------------------- config and model helpers

def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lerning_rate"):
        make_config({"data_root": "x", "lerning_rate": 1}, "1")
    with pytest.raises(ConfigError, match="unknown stage"):
        make_config({"data_root": "x"}, "4")
    with pytest.raises(ConfigError, match="batch_size"):
        make_config({"data_root": "x", "batch_size": "two"}, "1")
    cfg = make_config({"data_root": "x", "lr": 1e-5, "stages": {"2": {"lr": 3e-4}}}, "2")
    assert cfg.lr == 3e-4 and make_config({"data_root": "x", "stages": {"2": {"lr": 3e-4}}}, "1").lr == 1e-5
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_root": "x", "max_steps": 5, "stages": {"2": {"max_steps": 7}}}))
    assert load_config(path, "2").max_steps == 7
    assert load_config(path, "2", {"max_steps": 9}).max_steps == 9  # the command line wins over the stage


def test_params_of_reproduces_the_unet_layout() -> None:
    from dp3d_core.models.config import network_configs
    from dp3d_core.tiny import make_tiny_components
    parts = make_tiny_components(seed=0, sample_size=4)
    params = params_of(parts["unet"], parts["view_modules"])
    configs = network_configs(params)
    for key, value in configs["unet"].items():
        if key != "sample_size":
            got = parts["unet"].config[key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == \
                (list(value) if isinstance(value, (list, tuple)) else value), key
    assert dict(configs["view_modules"]) == {k: (tuple(v) if isinstance(v, list) else v)
                                             for k, v in parts["view_modules"].config.items()
                                             if not k.startswith("_")}


# ---------------------------------------------------------------- stages

@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_one_step_trains_only_the_stage_network(stage: str, dataset_root: Path, tiny_model: Path,
                                                tmp_path: Path) -> None:
    trainer = Trainer(config(stage, dataset_root, tiny_model, tmp_path, lr=1e-3, uncond_prob=0.0), resume=False)
    before = snapshot(trainer)
    loss = trainer.train_step()
    assert np.isfinite(loss) and loss > 0
    after = snapshot(trainer)
    changed = {name for name in before if any(not torch.equal(before[name][k], after[name][k])
                                              for k in before[name])}
    assert changed == {TRAINABLE[stage]}
    if stage != "0":
        assert all(torch.equal(before["unet"][k], after["unet"][k]) for k in before["unet"])  # F is locked


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_view_modules_run_only_in_stage_3(stage: str, dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, dataset_root, tiny_model, tmp_path, batch_size=1), resume=False)
    calls = []
    for module in trainer.components["view_modules"].down:
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer.train_step()
    assert bool(calls) == (stage == "3")


def test_vae_stage_step_and_export(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config("vae", dataset_root, tiny_model, tmp_path, lr=1e-3, max_steps=1), resume=False)
    before = snapshot(trainer)["vae"]
    out = trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in trainer.components["vae"].state_dict().items())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scaling_factor"] > 0 and cfg["scaling_factor"] != 1.0
    assert (tmp_path / "stage_vae" / "validation" / "step_0000001.png").is_file()


def test_stage3_uncond_dropout_trains_the_middle_view_module(dataset_root: Path, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    trainer = Trainer(config("3", dataset_root, tiny_model, tmp_path, lr=1e-3, uncond_prob=0.99,
                             batch_size=1), resume=False)
    mid = {k: v.clone() for k, v in trainer.components["view_modules"].mid.state_dict().items()}
    trainer.train_step()
    now = trainer.components["view_modules"].mid.state_dict()
    assert any(not torch.equal(mid[k], now[k]) for k in mid)


@pytest.mark.parametrize("stage", ["0", "2"])
def test_loss_falls_on_a_fixed_batch(stage: str, dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = Trainer(config(stage, dataset_root, tiny_model, tmp_path, lr=2e-3, batch_size=2), resume=False)
    batch = batch_for_step(trainer.data, 0, 2)
    first = trainer.loss_on(batch)
    for _ in range(30):
        loss = trainer.micro_loss(batch, sample_generators(0, 0, 0, range(2)))
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    last = trainer.loss_on(batch)
    assert last < 0.6 * first, (first, last)


def test_latent_cache_gives_the_same_loss(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    plain = Trainer(config("2", dataset_root, tiny_model, tmp_path / "a"), resume=False)
    cached = Trainer(config("2", dataset_root, tiny_model, tmp_path / "b", cache_latents=True), resume=False)
    batch = batch_for_step(plain.data, 0, 2)
    expected = plain.loss_on(batch)
    # equal up to float rounding (an image may be encoded in a batch of a different size)
    assert cached.loss_on(batch) == pytest.approx(expected, rel=1e-4)
    unique = {p for paths in batch["paths"] for p in paths} | set(batch["reference_path"])
    assert set(cached.latent_cache) == unique  # each image encoded once
    cached.components["vae"].encode = None  # a second pass must not touch the VAE
    assert cached.loss_on(batch) == pytest.approx(expected, rel=1e-4)


def test_checkpoint_resume_reproduces_the_next_loss_exactly(dataset_root: Path, tiny_model: Path,
                                                            tmp_path: Path) -> None:
    cfg = config("2", dataset_root, tiny_model, tmp_path, lr=1e-3, ema=True, ema_decay=0.9, grad_accum=2,
                 uncond_prob=0.3)
    first = Trainer(cfg, resume=False)
    first.train_step()
    checkpoint = first.save_checkpoint()
    expected = first.train_step()
    expected_weights = {k: v.clone() for k, v in first.components["view_controlnet"].state_dict().items()}

    resumed = Trainer(cfg, resume=True)  # finds the newest complete checkpoint
    assert resumed.progress.step == 1
    assert resumed.train_step() == expected
    got = resumed.components["view_controlnet"].state_dict()
    assert all(torch.equal(expected_weights[k], got[k]) for k in got)
    assert torch.equal(torch.cat([p.flatten() for p in first.ema.shadow_params]),
                       torch.cat([p.flatten() for p in resumed.ema.shadow_params]))
    assert checkpoint.name == "step_0000001"


def test_run_writes_a_loadable_model_folder_and_validation_grid(dataset_root: Path, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    from dp3d_core.model_folder import load_model_folder

    trainer = Trainer(config("3", dataset_root, tiny_model, tmp_path, max_steps=1, batch_size=1,
                             validate_every=1), resume=False)
    out = trainer.run()
    loaded = load_model_folder(out)
    trained = trainer.components["view_modules"].state_dict()
    assert all(torch.equal(trained[k], v) for k, v in loaded["view_modules"].state_dict().items())
    original = load_model_folder(tiny_model, components=["unet"])["unet"].state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded["unet"].state_dict().items())
    grid = Image.open(tmp_path / "stage3" / "validation" / "step_0000001.png")
    assert grid.size == (4 * SIZE + 5 * 2, 8 * SIZE + 9 * 2)  # 4 columns x 8 views
    again = Trainer(trainer.cfg, resume=True)
    assert again.progress.step == 1
    stamp = (out / "model_index.json").stat().st_mtime_ns
    assert again.run() == out and (out / "model_index.json").stat().st_mtime_ns == stamp  # finished: no rerun


def test_stage0_export_hands_F_over_to_the_other_networks(dataset_root: Path, tiny_model: Path,
                                                          tmp_path: Path) -> None:
    from dp3d_core.model_folder import load_model_folder

    trainer = Trainer(config("0", dataset_root, tiny_model, tmp_path, max_steps=1, lr=1e-3), resume=False)
    out = trainer.run()
    parts = load_model_folder(out)
    unet = parts["unet"].state_dict()
    assert all(torch.equal(unet[k], v) for k, v in parts["reference_unet"].state_dict().items())
    cn = parts["view_controlnet"]
    assert torch.equal(cn.conv_in.weight, parts["unet"].conv_in.weight)
    assert all(not b.weight.any() for b in cn.controlnet_down_blocks)  # zero convolutions
    proj = [m.weight for n, m in parts["view_modules"].named_modules() if n.endswith("proj_out")]
    assert proj and all(not w.any() for w in proj)


def test_missing_init_model_is_a_clear_error(dataset_root: Path, tmp_path: Path) -> None:
    from training.train import TrainingError
    with pytest.raises(TrainingError, match="stage 2 starts from the model folder"):
        Trainer(config("2", dataset_root, tmp_path / "nope", tmp_path), resume=False)


def test_shipped_small_model_loads_and_generates() -> None:
    from dp3d_core.pipeline import DiffPortrait3DPipeline

    folder = Path(__file__).resolve().parents[1] / "models" / "small"
    total = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert total <= 20 * 2**20
    pipe = DiffPortrait3DPipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    ref = rng.random((64, 64, 3)).astype(np.float32)
    conds = [rng.random((64, 64, 3)).astype(np.float32) for _ in range(2)]
    out = pipe(ref, conds, num_inference_steps=2, guidance_scale=2.0, seed=0, output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0.01


def test_max_minutes_ends_the_stage_with_a_model(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config("1", dataset_root, tiny_model, tmp_path, max_steps=1000, max_minutes=1e-9),
                      resume=False)
    out = trainer.run()
    assert trainer.progress.step == 1  # the budget was spent after the first step
    assert out == tmp_path / "stage1" / "model" and (out / "model_index.json").is_file()
    assert (tmp_path / "stage1" / "validation" / "step_0000001.png").is_file()


def test_image_cache_reads_each_file_once(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    data = MultiViewDataset(tmp_path, size=SIZE, num_targets=2, cache_images=True)
    rng = np.random.default_rng(0)
    first = data.sample(0, rng)
    for rel in [first["reference_path"], *first["paths"]]:
        (tmp_path / rel).unlink()  # the cached pixels must be used from now on
    again = data._load(first["reference_path"])
    assert torch.equal(again, first["reference"]) and not data.problems


def test_stage0_reference_training_ties_F_ref_to_F(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    """reference_prob: F learns to read the bank of its own (tied) copy; the export hands over untied copies."""
    from dp3d_core.model_folder import load_model_folder

    trainer = Trainer(config("0", dataset_root, tiny_model, tmp_path, lr=1e-3, reference_prob=1.0, max_steps=1),
                      resume=False)
    unet, ref = trainer.components["unet"], trainer.components["reference_unet"]
    assert all(a is b for a, b in zip(unet.parameters(), ref.parameters()))
    batch = batch_for_step(trainer.data, 0, 2)
    with_ref = trainer.loss_on(batch)
    batch["reference"] = -batch["reference"]  # another reference changes the prediction: the bank is read
    assert trainer.loss_on(batch) != with_ref
    before = snapshot(trainer)
    trainer.train_step()
    after = snapshot(trainer)
    changed = {name for name in before if any(not torch.equal(before[name][k], after[name][k]) for k in before[name])}
    assert changed == {"unet", "reference_unet"}
    out = trainer.run()
    loaded = load_model_folder(out)
    f, f_ref = loaded["unet"].state_dict(), loaded["reference_unet"].state_dict()
    assert all(torch.equal(f[k], f_ref[k]) for k in f)
    assert loaded["unet"].conv_in.weight.data_ptr() != loaded["reference_unet"].conv_in.weight.data_ptr()


def test_stage0_plain_samples_skip_the_reference(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config("0", dataset_root, tiny_model, tmp_path), resume=False)
    batch = batch_for_step(trainer.data, 0, 2)
    plain = trainer.loss_on(batch)
    batch["reference"] = -batch["reference"]
    assert trainer.loss_on(batch) == plain  # reference_prob 0 (default): F alone, as before


def test_stage0_reference_timestep_is_what_F_ref_gets(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    seen = {}
    for value in (-1, 0):
        trainer = Trainer(config("0", dataset_root, tiny_model, tmp_path / str(value), reference_prob=1.0,
                                 reference_timestep=value), resume=False)
        write = trainer.denoiser.write_reference_bank

        def spy(refs, t, ctx, write=write, value=value):
            seen[value] = t.clone()
            return write(refs, t, ctx)
        trainer.denoiser.write_reference_bank = spy
        trainer.train_step()
    assert bool((seen[0] == 0).all()) and bool((seen[-1] > 0).any())


def test_reference_check_scores_every_pass(dataset_root: Path, tiny_model: Path, capsys) -> None:
    from training import reference_check

    rows = reference_check.reference_errors(str(tiny_model), str(dataset_root), targets=2, timesteps=(999, 500))
    assert [r["t"] for r in rows] == [999, 500]
    for r in rows:
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("none", "right", "wrong", "with_camera"))
        assert r["right"] != r["none"] and r["right"] != r["wrong"]  # the tiny model's F reads the bank
    assert "| 999 |" in reference_check.format_table(rows)
    assert reference_check.main(["--model", str(tiny_model), "--data", str(dataset_root / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_stage0_mixed_batch_trains_both_kinds_of_sample(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    trainer = Trainer(config("0", dataset_root, tiny_model, tmp_path, batch_size=8, reference_prob=0.5), resume=False)
    calls = []
    write = trainer.denoiser.write_reference_bank
    trainer.denoiser.write_reference_bank = lambda refs, t, ctx: (calls.append(t.shape[0]), write(refs, t, ctx))[1]
    assert np.isfinite(trainer.train_step())
    rows = 8 * trainer.cfg.num_targets
    assert calls and 0 < calls[0] < rows  # some rows read the bank, the rest were plain


def test_high_noise_weight_counts_noisy_rows_more() -> None:
    from dp3d_core.schedulers import make_scheduler
    from training.stages import eps_loss

    acp = make_scheduler("ddim").alphas_cumprod
    eps = torch.zeros(2, 4, 2, 2)
    pred = torch.stack([torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)])  # row errors 1 and 4
    t = torch.tensor([999, 10])
    assert float(eps_loss(pred, eps, t, acp, 1.0)) == pytest.approx(2.5)  # plain mean
    # t=999: 1/SNR ~ 200, capped at 10; t=10: weight 1  ->  (10*1 + 1*4) / 11
    assert float(eps_loss(pred, eps, t, acp, 10.0)) == pytest.approx(14 / 11)


# ---------------------------------------------------------------- pickle-free checkpoints, memory switches

def test_checkpoint_folder_holds_no_pickle_and_a_planted_one_is_refused(dataset_root: Path, tiny_model: Path,
                                                                        tmp_path: Path) -> None:
    from training.checkpoint import FILES
    from training.train import TrainingError
    cfg = config("2", dataset_root, tiny_model, tmp_path, ema=True)
    trainer = Trainer(cfg, resume=False)
    trainer.train_step()
    folder = trainer.save_checkpoint()
    names = {p.name for p in folder.iterdir()}
    assert names <= FILES and {"model.safetensors", "optimizer.safetensors", "ema.safetensors", "done"} <= names
    for path in folder.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))
    import pickle
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception, match="custom_checkpoint_0.pkl.*can run code") as info:
        Trainer(cfg, resume=True)
    assert not marker.exists()
    assert not isinstance(info.value, TrainingError) or "--no-resume" in str(info.value)
    (folder / "custom_checkpoint_0.pkl").unlink()
    (folder / "optimizer.bin").write_bytes(b"not even a pickle")
    with pytest.raises(Exception, match="optimizer.bin"):
        Trainer(cfg, resume=True)


def test_eight_bit_adam_without_bitsandbytes_is_a_clear_error(dataset_root: Path, tiny_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from training.train import TrainingError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(TrainingError, match="needs the bitsandbytes package.*pip install bitsandbytes"):
        Trainer(config("2", dataset_root, tiny_model, tmp_path, optimizer="adamw8bit"), resume=False)
    with pytest.raises(ConfigError, match="optimizer"):
        config("2", dataset_root, tiny_model, tmp_path, optimizer="lion")


@pytest.mark.parametrize("stage", ["1", "3"])
def test_gradient_checkpointing_gives_the_same_gradients(stage: str, dataset_root: Path, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    from training.data import batch_for_step as batch_of
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(config(stage, dataset_root, tiny_model, tmp_path / str(checkpointing), batch_size=1,
                                 gradient_checkpointing=checkpointing), resume=False)
        recomputed = []
        if checkpointing:
            for module in trainer.trainable.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.register_forward_pre_hook(lambda *_: recomputed.append(1))
        loss = trainer.micro_loss(batch_of(trainer.data, 0, 1), sample_generators(0, 0, 0, range(1)))
        forward_calls = len(recomputed)
        loss.backward()
        assert not checkpointing or len(recomputed) > forward_calls > 0  # blocks ran again in the backward pass
        grads.append(torch.cat([p.grad.flatten() for p in trainer.trainable.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_every_attention_runs_through_sdpa(dataset_root: Path, tiny_model: Path, tmp_path: Path) -> None:
    from training.efficiency import SDPA_PROCESSORS
    trainer = Trainer(config("3", dataset_root, tiny_model, tmp_path), resume=False)
    assert set(trainer.attention) <= SDPA_PROCESSORS and sum(trainer.attention.values()) > 50
    assert "BankReadProcessor" in trainer.attention and "BankWriteProcessor" in trainer.attention
