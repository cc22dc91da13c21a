"""Previews of finished frames: GIF and contact sheet (worker Python) and the MP4 movie (Blender's FFmpeg)."""
from __future__ import annotations

import sys
from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image

from addon import previews

FRAMES, SIZE = 6, 64


@pytest.fixture
def frames(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(FRAMES):
        pixels = np.full((SIZE, SIZE, 3), (40 * i, 200, 30), np.uint8)
        out.append(tmp_path / f"frame_{i + 1:04d}.png")
        Image.fromarray(pixels).save(out[-1])
    return out


def test_gif_and_contact_sheet(frames: list[Path], tmp_path: Path) -> None:
    gif, sheet = previews.make_previews(sys.executable, frames, tmp_path, columns=4)
    with Image.open(gif) as im:
        assert im.n_frames == FRAMES and im.size == (SIZE, SIZE)
    with Image.open(sheet) as im:
        assert im.size == (4 * SIZE, 2 * SIZE)


def test_movie_has_every_frame_and_leaves_the_scenes_alone(empty_scene, frames: list[Path], tmp_path: Path) -> None:
    scenes = [s.name for s in bpy.data.scenes]
    movie = previews.make_movie(frames, tmp_path, fps=12)
    assert movie == tmp_path / previews.MOVIE_NAME and movie.stat().st_size > 0
    assert [s.name for s in bpy.data.scenes] == scenes
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the temporary folder is gone
    clip = bpy.data.movieclips.load(str(movie))
    try:
        assert clip.frame_duration == FRAMES and tuple(clip.size) == (SIZE, SIZE)
    finally:
        bpy.data.movieclips.remove(clip)


def test_movie_refuses_frames_from_two_folders(empty_scene, frames: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    moved = other / frames[-1].name
    frames[-1].rename(moved)
    with pytest.raises(previews.PreviewError, match="one folder"):
        previews.make_movie([*frames[:-1], moved], tmp_path)
