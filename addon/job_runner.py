"""The turntable job as a plain function, shared by the CLI command, the demo script and tests.

For now: head anchor + turntable rig in the current file, ``dataset.json`` and ``scene.blend``
written into the output folder. Later: condition renders and the worker run.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import rig
from .poses import FramePose, PoseError, check_writable_folder, scene_poses, write_dataset

BLEND_FILE = "scene.blend"


class JobRunError(RuntimeError):
    """The job could not run; the message says what to fix."""


@dataclass
class JobResult:
    out_dir: Path
    dataset: Path
    blend: Path
    poses: list[FramePose]
    warnings: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        return [self.dataset, self.blend]


def run_turntable_job(out_dir: str | os.PathLike, *, frames: int = 16, reference: str | None = None,
                      yaw_range_deg: float = 45.0, pitch_deg: float = 0.0, size: int = 512,
                      context: bpy.types.Context | None = None) -> JobResult:
    """Build anchor (reusing the scene's) and turntable, write dataset.json and save scene.blend."""
    context = context or bpy.context
    scene = context.scene
    settings = scene.portrait3d
    if frames < 1:
        raise JobRunError(f"--frames must be at least 1, got {frames}.")
    if not 16 <= size <= 2048:
        raise JobRunError(f"--size must be between 16 and 2048 pixels, got {size}.")
    if not 0.0 <= yaw_range_deg <= 180.0:
        raise JobRunError(f"--yaw-range must be between 0 and 180 degrees, got {yaw_range_deg}.")
    if not -89.0 <= pitch_deg <= 89.0:
        raise JobRunError(f"--pitch must be between -89 and 89 degrees, got {pitch_deg}.")
    if reference is not None:
        ref = Path(reference).expanduser().resolve()
        if not ref.is_file():
            raise JobRunError(f"Reference image not found: {ref}. Pass an existing portrait with --reference.")
        settings.reference_image = str(ref)
    try:
        out = check_writable_folder(Path(out_dir).expanduser().resolve())
        settings.output_folder = str(out) + os.sep
        settings.output_size = size
        settings.turntable_frames = frames
        settings.turntable_yaw_range = math.radians(yaw_range_deg)
        settings.turntable_pitch = math.radians(pitch_deg)
        settings.use_scene_range = True
        anchor = settings.head_anchor or rig.add_head_anchor(context, location=(0.0, 0.0, 0.0))
        camera = rig.build_turntable(scene, anchor, frames=frames, yaw_range=settings.turntable_yaw_range,
                                     pitch=settings.turntable_pitch, size_px=size)
        poses = scene_poses(scene, camera, anchor, range(scene.frame_start, scene.frame_end + 1))
        dataset = write_dataset(out, poses)
    except PoseError as exc:
        raise JobRunError(str(exc)) from exc
    blend = out / BLEND_FILE
    blend.unlink(missing_ok=True)  # overwrite cleanly: no scene.blend1 backup next to it
    result = bpy.ops.wm.save_as_mainfile(filepath=str(blend), check_existing=False, copy=True)
    if 'FINISHED' not in result or not blend.is_file():
        raise JobRunError(f"Could not save {blend}.")
    warnings = [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
    return JobResult(out, dataset, blend, poses, warnings)


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blender -c portrait3d",
        description="Build a head anchor and turntable camera in the current file, write dataset.json "
                    "and save scene.blend into --out.")
    parser.add_argument("--frames", type=int, default=16, help="number of turntable frames (default 16)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--reference", help="reference portrait image")
    parser.add_argument("--yaw-range", type=float, default=45.0, help="sweep -DEG..+DEG (default 45)")
    parser.add_argument("--pitch", type=float, default=0.0, help="camera elevation in degrees (default 0)")
    parser.add_argument("--size", type=int, default=512, help="output size in pixels (default 512)")
    return parser


def cli_main(argv: list[str]) -> int:
    """Entry point of ``blender -c portrait3d ...``; returns the exit code."""
    parser = cli_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage/error
        return int(exc.code or 0)
    try:
        result = run_turntable_job(args.out, frames=args.frames, reference=args.reference,
                                   yaw_range_deg=args.yaw_range, pitch_deg=args.pitch, size=args.size)
    except JobRunError as exc:
        print(f"portrait3d: error: {exc}")
        return 1
    for w in result.warnings:
        print(f"portrait3d: warning: {w}")
    for path in result.files():
        print(path)
    return 0
