"""``optimizer: "adamw8bit"`` (bitsandbytes' AdamW8bit) trains every stage, keeps its moments in 8 bits, and a
checkpoint resumes with the same moments.

bitsandbytes is optional and not in requirements.txt: this file runs where it is installed (it was run with
bitsandbytes 0.50.2 on the CPU; see docs/TRAINING.md) and is skipped elsewhere. Without bitsandbytes the trainer's
clear error is tested in tests/test_training.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_training import config, dataset_root, tiny_model  # noqa: F401 (fixtures)
from training.train import Trainer

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install bitsandbytes)")


def flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) optimizer state, by path."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        elif isinstance(value, torch.Tensor) and value.ndim > 0:
            out[f"{prefix}{key}"] = value.detach().clone()
    return out


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trainable.state_dict().items()}


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_eight_bit_adam_trains_like_adam_and_resumes(stage: str, dataset_root: Path, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    extra = {"lr": 1e-3, "batch_size": 1, **({"num_targets": 4} if stage == "3" else {})}
    eight = Trainer(config(stage, dataset_root, tiny_model, tmp_path / "8bit", optimizer="adamw8bit", **extra),
                    resume=False)
    full = Trainer(config(stage, dataset_root, tiny_model, tmp_path / "32bit", **extra), resume=False)
    assert isinstance(eight.optimizer.optimizer, bnb.optim.AdamW8bit)
    start = trainable(eight)
    assert eight.train_step() == full.train_step()  # the same weights and sample: the same first loss
    optimizer = eight.optimizer.optimizer
    stepped = [p for p in eight.trainable.parameters() if optimizer.state.get(p)]
    big = [p for p in stepped if p.numel() >= 4096]  # bitsandbytes keeps smaller tensors' moments in 32 bits
    assert big and all(optimizer.state[p][m].dtype == torch.uint8 for p in big for m in ("state1", "state2"))
    # one Adam step from the same gradients: the 8-bit update follows the 32-bit one (moments quantised, not wrong)
    a, b, s = trainable(eight), trainable(full), start
    moved = [k for k in s if not torch.equal(s[k], b[k])]
    assert moved
    d8 = torch.cat([(a[k] - s[k]).flatten().double() for k in moved])
    d32 = torch.cat([(b[k] - s[k]).flatten().double() for k in moved])
    assert torch.nn.functional.cosine_similarity(d8, d32, dim=0) > 0.99
    assert 0.9 < d8.norm() / d32.norm() < 1.1

    eight.save_checkpoint()
    saved = flat(eight.optimizer.optimizer.state_dict()["state"])
    assert any(v.dtype == torch.uint8 for v in saved.values())
    expected = eight.train_step()
    expected_weights = trainable(eight)
    resumed = Trainer(config(stage, dataset_root, tiny_model, tmp_path / "8bit", optimizer="adamw8bit", **extra),
                      resume=True)
    assert resumed.progress.step == 1
    restored = flat(resumed.optimizer.optimizer.state_dict()["state"])
    # (torch's set_optimizer_state_dict first gives every parameter a state, also those that never had a gradient)
    assert saved.keys() <= restored.keys()
    assert all(restored[k].dtype == saved[k].dtype and torch.equal(restored[k], saved[k]) for k in saved)
    assert resumed.train_step() == expected
    got = trainable(resumed)
    assert all(torch.equal(expected_weights[k], got[k]) for k in got)
