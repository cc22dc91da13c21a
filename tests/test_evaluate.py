"""training.evaluate: metrics on known inputs, and the command end to end on a tiny dataset + tiny model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dp3d_core.cameras import intrinsics_from_focal, sample_lookat, to_label
from dp3d_core.metrics import PSNR_CAP
from training import evaluate as ev
from training.data import write_labels


def test_psnr_identical_is_capped_and_known_value() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ev.psnr(x, x), torch.full((2,), PSNR_CAP))
    # a constant error of 0.1 -> MSE 0.01 -> 20 dB
    y = (x * 0.5 + 0.1)
    assert torch.allclose(ev.psnr(x * 0.5, y), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_identity_and_ordering() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(ev.ssim(x, x), torch.ones(3), atol=1e-5)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    very = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s1, s2 = ev.ssim(x, slightly), ev.ssim(x, very)
    assert (s1 < 0.999).all() and (s2 < s1).all()
    assert (ev.ssim(x, 1 - x) < 0.2).all()   # anti-correlated structure scores low


def test_ssim_rejects_images_smaller_than_window() -> None:
    with pytest.raises(ev.EvaluationError, match="smaller than"):
        ev.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_gaussian_window_sums_to_one() -> None:
    w = ev.gaussian_window(11, 1.5)
    assert w.shape == (11, 11) and abs(float(w.sum()) - 1) < 1e-6 and float(w[5, 5]) == float(w.max())


def _disc_image(size: int, centre: tuple[int, int], radius: int, bg: tuple[float, ...], fg: tuple[float, ...]):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    img = torch.tensor(bg).view(3, 1, 1).expand(3, size, size).clone()
    img[:, inside] = torch.tensor(fg).view(3, 1)
    return img, inside


def test_head_mask_and_iou_on_known_masks() -> None:
    img, inside = _disc_image(32, (16, 16), 8, (0.2, 0.6, 0.3), (0.9, 0.7, 0.6))
    mask = ev.head_mask(img[None])[0]
    assert torch.equal(mask, inside)
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2] = True          # 8 pixels
    b[0, 1:3] = True         # 8 pixels, 4 shared -> IoU 4 / 12
    assert math.isclose(float(ev.mask_iou(a, b)[0]), 1 / 3, rel_tol=1e-6)
    assert float(ev.mask_iou(a, a)[0]) == 1.0
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert float(ev.mask_iou(empty, empty)[0]) == 1.0
    assert float(ev.mask_iou(a, empty)[0]) == 0.0


def test_consecutive_difference_and_consistency_ratio() -> None:
    views = torch.stack([torch.full((3, 16, 16), v) for v in (0.0, 0.1, 0.3)])
    assert math.isclose(ev.consecutive_difference(views), 0.15, rel_tol=1e-6)
    s = ev.score(views, views)
    assert s["psnr"] == PSNR_CAP and math.isclose(s["ssim"], 1.0, abs_tol=1e-5)
    assert math.isclose(s["consistency_ratio"], 1.0)
    still = views[:1].expand(3, -1, -1, -1)
    assert ev.score(still, views)["consistency_ratio"] == 0.0


def _tiny_dataset(root: Path, identities: int = 2, views: int = 9, size: int = 64) -> Path:
    """Coloured discs on coloured backgrounds; the disc moves with the camera yaw."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(identities):
        bg, fg = tuple(rng.uniform(0, 1, 3)), tuple(rng.uniform(0, 1, 3))
        for v in range(views):
            yaw = 0.0 if v == 0 else float(rng.uniform(-0.7, 0.7))
            rel = f"id{i:03d}/v{v:02d}.png"
            shift = int(round(yaw * 12))
            for sub, (b, f) in (("", (bg, fg)), ("cond/", ((0.5, 0.5, 0.5), (0.8, 0.8, 0.8)))):
                img, _ = _disc_image(size, (size // 2, size // 2 + shift), size // 4, b, f)
                path = root / sub / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
            entries.append((rel, to_label(sample_lookat(math.pi / 2 + yaw, math.pi / 2), intrinsics_from_focal())))
    write_labels(root, entries)
    return root


def test_load_samples_sorts_targets_by_azimuth(tmp_path: Path) -> None:
    data = _tiny_dataset(tmp_path / "data")
    samples = ev.load_samples(data, identities=5, views=8, size=64)
    assert [s.name for s in samples] == ["id000", "id001"]
    s = samples[0]
    assert s.truth.shape == (8, 3, 64, 64) and s.conditions.shape == (8, 3, 64, 64) and s.proxies is None
    # the disc centre moves right with the azimuth: its column of mass never decreases along the window
    cols = [float((ev.head_mask(t[None])[0].float().sum(0) * torch.arange(64)).sum()
                  / ev.head_mask(t[None])[0].float().sum()) for t in s.truth]
    assert all(b >= a - 1e-6 for a, b in zip(cols, cols[1:]))
    assert float(s.truth.min()) >= 0 and float(s.truth.max()) <= 1


def test_load_samples_too_few_views_is_a_clear_error(tmp_path: Path) -> None:
    data = _tiny_dataset(tmp_path / "data", identities=1, views=4)
    with pytest.raises(ev.EvaluationError, match="9 readable views"):
        ev.load_samples(data, identities=1, views=8, size=64)
    with pytest.raises(ev.EvaluationError, match="cannot read the dataset"):
        ev.load_samples(tmp_path / "nowhere", identities=1, views=8, size=64)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0, sample_size=8)


def test_command_runs_on_tiny_model(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    from dp3d_core.tiny import make_tiny_model_folder
    data = _tiny_dataset(tmp_path / "data")
    stage0 = make_tiny_model_folder(tmp_path / "stage0", seed=1, sample_size=8)
    md, grid = tmp_path / "out" / "eval.md", tmp_path / "out" / "grid.png"
    rc = ev.main(["--model", str(tiny_model), "--data", str(data), "--identities", "2", "--steps", "2",
                  "--stage0-model", str(stage0), "--threads", "1", "--out-md", str(md), "--out-grid", str(grid)])
    assert rc == 0
    table = md.read_text()
    for label in ev.METHODS.values():
        assert f"| {label} |" in table
    assert "python -m training.evaluate --model" in table
    assert "condition images (no proxy/" in table
    # reference baseline: the same image 8 times -> consistency ratio 0; proxy baseline = the condition images
    assert "| baseline: reference copied unchanged |" in table
    with Image.open(grid) as im:
        # 2 identities x 6 rows, reference + 8 views
        assert im.size[1] == 12 * (64 + 2) + 2 and im.size[0] == 72 + 9 * (64 + 2) + 2
    assert "identity id001" in capsys.readouterr().err
    small = tmp_path / "out" / "small.png"
    ev.save_eval_grid(ev.evaluate(tiny_model, data, identities=1, steps=1), small, palette=True)
    with Image.open(small) as im:
        assert im.mode == "P" and im.size[1] == 5 * (64 + 2) + 2   # no stage-0 model: no "no stage 1" row


def test_ablations_change_the_output(tmp_path: Path, tiny_model: Path) -> None:
    from dp3d_core.tiny import make_tiny_model_folder
    data = _tiny_dataset(tmp_path / "data", identities=1)
    stage0 = make_tiny_model_folder(tmp_path / "stage0", seed=1, sample_size=8)
    result = ev.evaluate(tiny_model, data, identities=1, steps=2, stage0_model=stage0)
    out = {k: v[0] for k, v in result["outputs"].items()}
    assert torch.equal(out["proxy"], result["samples"][0].conditions)
    for variant in ("aware_noise", "no_view_modules", "no_stage1"):
        assert not torch.allclose(out[variant], out["full"]), variant
    assert result["scores"]["reference"]["consistency_ratio"] == 0.0


def test_bad_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    data = _tiny_dataset(tmp_path / "data", identities=1)
    assert ev.main(["--model", str(tmp_path / "missing"), "--data", str(data)]) == 2


def test_dataset_proxy_renders_are_used_and_shown(tmp_path: Path, tiny_model: Path) -> None:
    """With <data>/proxy/ renders (training.render_dataset --proxies) the proxy baseline and 3D-aware noise use
    them, and the grid shows them in a row of their own under the conditions."""
    data = _tiny_dataset(tmp_path / "data", identities=1)
    for path in (data / "cond").rglob("*.png"):  # stand-in proxy renders that differ from the conditions
        target = data / "proxy" / path.relative_to(data / "cond")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB"))).save(target)
    result = ev.evaluate(tiny_model, data, identities=1, steps=1)
    assert result["notes"]["proxy_source"] == "dataset proxy/ renders"
    assert not torch.allclose(result["outputs"]["proxy"][0], result["samples"][0].conditions)
    grid = ev.save_eval_grid(result, tmp_path / "grid.png")
    with Image.open(grid) as im:  # condition, proxy, truth, model, 3D noise, no view modules
        assert im.size[1] == 6 * (64 + 2) + 2


# ---------------------------------------------------------------- training.evaluate360 (DiffPortrait360, all around)

def test_yaw_sectors() -> None:
    from training.evaluate360 import sector_of
    assert [sector_of(y) for y in (0, -44.9, 45, -90, 134.9, 135, -180, 180)] == \
        ["front", "front", "sides", "sides", "sides", "back", "back", "back"]


def _full_turn_dataset(root: Path, identities: int = 2, size: int = 64, back: bool = True) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(identities):
        colour = rng.random(3)
        yaws = [0.0, 180.0 if back else 100.0, -120.0, -60.0, 30.0, 90.0, 150.0]
        for v, yaw in enumerate(yaws):
            rel = f"id{i:02d}/v{v:02d}.png"
            for folder in (root, root / "cond", root / "proxy"):
                (folder / f"id{i:02d}").mkdir(parents=True, exist_ok=True)
                img = np.clip(colour + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8)).save(folder / rel)
            entries.append((rel, to_label(sample_lookat(math.pi / 2 + math.radians(yaw), math.pi / 2),
                                          intrinsics_from_focal())))
    write_labels(root, entries)
    return root


@pytest.fixture(scope="module")
def tiny_360(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_360_model_folders
    views, back = make_tiny_360_model_folders(tmp_path_factory.mktemp("m360") / "tiny", sample_size=8)
    back.rename(views / "back_head")
    return views


def test_evaluate360_scores_every_sector_and_the_back_view(tmp_path: Path, tiny_360: Path) -> None:
    from training import evaluate360 as e360
    data = _full_turn_dataset(tmp_path / "data")
    samples = e360.load_turns(data, 5, 64)
    assert len(samples) == 2 and samples[0].yaws == sorted(samples[0].yaws) and len(samples[0].yaws) == 6
    assert torch.equal(samples[0].back, samples[0].truth[-1])   # yaw 180 sorts last
    result = e360.evaluate_turns(tiny_360, data, identities=2, steps=1)
    text = e360.markdown_tables(result)
    for row in ("reference copied", "projected proxy", "model (back view from its back-head model)",
                "true back view", "3D-aware noise", "back-head model"):
        assert row in text
    assert "front 2, sides 6, back 4" in text
    # the reference copied unchanged: exact at no view (a different colour per view), worst at the back
    assert result["back_scores"]["reference"]["psnr"] < 100 and result["scores"]["proxy"]["all"]["n"] == 12
    grid = e360.save_turn_grid(result, tmp_path / "g.png", identities=2)
    with Image.open(grid) as im:
        # 2 identities x 5 rows (condition, proxy, truth, model, true back) of reference/back + 6 views
        assert im.size == (72 + 7 * (64 + 2) + 2, 10 * (64 + 2) + 2)


def test_evaluate360_refuses_data_without_back_views_and_models_without_back_head(tmp_path: Path,
                                                                                    tiny_360: Path) -> None:
    from training import evaluate360 as e360
    data = _full_turn_dataset(tmp_path / "data", back=False)
    with pytest.raises(ev.EvaluationError, match="--full-turn"):
        e360.load_turns(data, 2, 64)
    assert e360.main(["--model", str(tiny_360 / "back_head"), "--data", str(data)]) == 2
