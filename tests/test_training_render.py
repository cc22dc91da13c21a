"""The synthetic dataset renderer: camera sampling (pure) and a tiny real render with the bpy module."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dp3d_core.cameras import EG3D_PIVOT, EG3D_RADIUS, from_label, yaw_pitch_from_cam2world
from training.data import MultiViewDataset, read_labels
from training.render_dataset import (PITCH_RANGE, YAW_RANGE, condition_seed, identity_seed, sample_views)

ROOT = Path(__file__).resolve().parents[1]


def test_views_lie_on_the_eg3d_sphere_within_the_trained_range() -> None:
    labels = sample_views(seed=3, index=7, views=40)
    assert np.array_equal(np.stack(labels), np.stack(sample_views(seed=3, index=7, views=40)))
    assert not np.array_equal(np.stack(labels), np.stack(sample_views(seed=4, index=7, views=40)))
    yaws = []
    for label in labels:
        c2w, k = from_label(label)
        assert math.isclose(np.linalg.norm(c2w[:3, 3]), EG3D_RADIUS, rel_tol=1e-9)
        forward = c2w[:3, 2]
        to_pivot = np.asarray(EG3D_PIVOT) - c2w[:3, 3]
        assert np.allclose(np.cross(forward, to_pivot / np.linalg.norm(to_pivot)), 0, atol=1e-9)
        yaw, pitch = yaw_pitch_from_cam2world(c2w)
        yaws.append(yaw)
    yaws = np.abs(np.array(yaws) - yaws[0])
    # degrees; the look-at pivot sits 0.2 in front of the centre, so allow a little more than the range
    limit = math.degrees(YAW_RANGE)
    assert yaws.max() <= limit * 1.1 and yaws.max() > limit / 2  # spread over the range
    assert PITCH_RANGE < math.pi / 4


def test_condition_identities_differ_from_the_dataset_identities() -> None:
    own = {identity_seed(0, i) for i in range(200)}
    conds = {condition_seed(0, i, v) for i in range(200) for v in range(10)}
    assert not own & conds
    assert all(0 <= s < 2**31 for s in own | conds)  # Blender stores the seed in a C int property


def test_render_is_deterministic_resumable_and_loadable(tmp_path: Path) -> None:
    args = ["--identities", "3", "--views", "2", "--size", "32", "--seed", "5", "--test-fraction", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def render(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.render_dataset", "--out", str(out), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    first = render(tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    a = tmp_path / "a"
    train, test = read_labels(a / "train"), read_labels(a / "test")
    assert len(train) == 4 and len(test) == 2  # 2 train identities, 1 held out, 2 views each
    assert {r.split("/")[0] for r, _ in train}.isdisjoint({r.split("/")[0] for r, _ in test})
    for rel, _ in train + test:
        split = "train" if any(rel == r for r, _ in train) else "test"
        assert (a / split / rel).is_file() and (a / split / "cond" / rel).is_file()
    ds = MultiViewDataset(a / "train", size=32, num_targets=1)
    item = ds[0]
    assert not np.allclose(item["targets"][0].numpy(), item["conditions"][0].numpy())
    assert not ds.problems

    # resumable: a second run renders nothing and leaves the files alone
    stamp = (a / "train" / "id00000" / "v01.png").stat().st_mtime_ns
    again = render(a)
    assert again.returncode == 0 and '"views_rendered": 0' in again.stdout
    assert (a / "train" / "id00000" / "v01.png").stat().st_mtime_ns == stamp

    # 3D-aware proxy views of the held-out split, for training.evaluate: one per target, resumable
    def proxies() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.render_dataset", "--out", str(a / "test"), "--proxies",
                               "--views", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    made = proxies()
    assert made.returncode == 0 and '"proxy_views_rendered": 1' in made.stdout, made.stderr[-2000:]
    (identity, target), = [r.split("/") for r, _ in test if not r.endswith("v00.png")]
    proxy = np.asarray(Image.open(a / "test" / "proxy" / identity / target).convert("RGB"))
    assert proxy.shape == (32, 32, 3)
    assert not np.array_equal(proxy, np.asarray(Image.open(a / "test" / "cond" / identity / target).convert("RGB")))
    assert '"proxy_views_rendered": 0' in proxies().stdout

    # deterministic by seed
    other = render(tmp_path / "b")
    assert other.returncode == 0
    for rel, _ in train:
        for sub in ("", "cond/"):
            pixels = [np.asarray(Image.open(root / "train" / sub / rel)) for root in (a, tmp_path / "b")]
            assert np.array_equal(*pixels), f"{sub}{rel} differs between two renders with the same seed"


def test_full_turn_views_go_all_around_with_a_front_and_a_back_view() -> None:
    labels = sample_views(seed=3, index=7, views=60, full_turn=True)
    yaws, pitches = zip(*(yaw_pitch_from_cam2world(from_label(label)[0]) for label in labels))
    assert abs(yaws[0]) < 1e-6 and abs(pitches[0]) < 1e-6          # view 0: frontal
    assert abs(abs(yaws[1]) - 180) < 1e-6 and abs(pitches[1]) < 1e-6  # view 1: straight behind
    rest = np.abs(np.array(yaws[2:]))
    assert (rest > 135).sum() >= 5 and (rest < 45).sum() >= 5 and ((rest > 45) & (rest < 135)).sum() >= 5
    assert max(abs(p) for p in pitches) <= math.degrees(PITCH_RANGE) + 1e-6
    # the default stays in the trained frontal range
    assert max(abs(yaw_pitch_from_cam2world(from_label(label)[0])[0])
               for label in sample_views(seed=3, index=7, views=60)) <= math.degrees(YAW_RANGE) + 1e-6
