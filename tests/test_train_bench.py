"""training.bench --memory-floor: each stage's weights, gradients and optimizer moments, counted from shapes."""
from __future__ import annotations

import pytest
import torch

from training.bench import main, memory_floor, make_components
from training.models import TRAINABLE


def test_floor_counts_the_networks_the_trainer_holds() -> None:
    parts = make_components("tiny")
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if isinstance(m, torch.nn.Module)}
    for row in memory_floor("tiny", ["1", "2", "3"]):
        trained = counts[TRAINABLE[row["stage"]]]
        assert row["all_params"] == sum(counts.values()) and row["trainable_params"] == trained
        assert row["adamw_floor_gib"] * 2**30 == pytest.approx((sum(counts.values()) + 3 * trained) * 4)
        assert row["adamw8bit_floor_gib"] < row["adamw_floor_gib"]


def test_sd15_size_is_stable_diffusion_15(capsys) -> None:
    stage1 = memory_floor("sd15", ["1"])[0]
    assert stage1["trainable_params"] == 859_520_964  # SD 1.5's UNet, which F_ref copies
    assert main(["--size", "sd15", "--stage", "1", "--memory-floor"]) == 0
    assert "| 1 | 2745.8 M | 859.5 M | 10.23 GiB | 19.83 GiB | 15.03 GiB |" in capsys.readouterr().out
