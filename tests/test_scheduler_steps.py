"""dp3d_core.scheduler_steps: the step-count comparison end to end on the tiny random model and a tiny dataset."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dp3d_core import scheduler_steps as ss
from dp3d_core.cameras import intrinsics_from_focal, sample_lookat, to_label
from dp3d_core.metrics import PSNR_CAP
from training.data import write_labels


def _tiny_dataset(root: Path, identities: int = 2, views: int = 9, size: int = 64) -> Path:
    """Random-colour squares per view; condition images grey squares that move with the camera yaw."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(identities):
        for v in range(views):
            yaw = 0.0 if v == 0 else float(rng.uniform(-0.7, 0.7))
            rel = f"id{i:03d}/v{v:02d}.png"
            for sub in ("", "cond/"):
                img = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
                x = size // 2 + int(round(yaw * 12))
                img[size // 4:3 * size // 4, x - size // 8:x + size // 8] = 200
                path = root / sub / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
            entries.append((rel, to_label(sample_lookat(math.pi / 2 + yaw, math.pi / 2), intrinsics_from_focal())))
    write_labels(root, entries)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0, sample_size=8)


def test_psnr_cap_and_known_value() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(ss.psnr(x, x), torch.full((2,), PSNR_CAP))
    assert torch.allclose(ss.psnr(x * 0.5, x * 0.5 + 0.1), torch.full((2,), 20.0), atol=1e-4)


def test_command_table_rows_and_self_comparison_is_the_cap(tmp_path: Path, tiny_model: Path) -> None:
    data = _tiny_dataset(tmp_path / "data")
    md = tmp_path / "out" / "steps.md"
    rc = ss.main(["--model", str(tiny_model), "--data", str(data), "--identities", "2", "--steps", "1,2",
                  "--ref-steps", "2", "--guidance", "2", "--out-md", str(md)])
    assert rc == 0
    table = md.read_text()
    assert "python -m dp3d_core.scheduler_steps --model" in table
    assert "identities id000, id001" in table
    for name in ss.DEFAULT_SCHEDULERS:
        for n in (1, 2):
            assert f"| {name} | {n} | " in table
    # DDIM at the reference step count, same seed and noise: identical output, so PSNR is the cap
    assert f"| ddim | 2 | 2 | {PSNR_CAP:.2f} |" in table
    assert "Smallest step count within 30 dB of DDIM-2: ddim 2" in table


def test_compare_rows(tmp_path: Path, tiny_model: Path) -> None:
    data = _tiny_dataset(tmp_path / "data", identities=1)
    result = ss.compare(tiny_model, data, identities=1, schedulers=("ddim", "dpm++2m"), steps=(1, 3), ref_steps=3)
    rows = {(r.scheduler, r.steps): r for r in result["rows"]}
    assert set(rows) == {("ddim", 1), ("ddim", 3), ("dpm++2m", 1), ("dpm++2m", 3)}
    assert rows["ddim", 3].psnr == PSNR_CAP
    assert rows["ddim", 1].psnr < PSNR_CAP and rows["dpm++2m", 1].psnr < PSNR_CAP
    assert all(r.seconds > 0 and r.actual_steps >= r.steps for r in rows.values())


def test_smallest_within() -> None:
    rows = [ss.Row("a", 5, 5, 24.0, 1.0), ss.Row("a", 10, 10, 31.0, 1.0), ss.Row("a", 8, 8, 26.0, 1.0),
            ss.Row("b", 5, 5, 20.0, 1.0)]
    assert ss.smallest_within(rows, 30) == {"a": 10, "b": None}
    assert ss.smallest_within(rows, 25) == {"a": 8, "b": None}


def test_bad_inputs_are_clear_errors(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    data = _tiny_dataset(tmp_path / "data", identities=1, views=4)
    with pytest.raises(ss.SchedulerStepsError, match="no identity .* has 9 views"):
        ss.compare(tiny_model, data, identities=1, steps=(1,), ref_steps=1)
    with pytest.raises(ss.SchedulerStepsError, match="unknown scheduler"):
        ss.compare(tiny_model, data, schedulers=("euler",))
    assert ss.main(["--model", str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ss.main(["--model", str(tiny_model), "--data", str(tmp_path / "nowhere")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert ss.main(["--model", str(tiny_model), "--data", str(data), "--steps", "a,b"]) == 2
