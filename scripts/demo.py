#!/usr/bin/env python3
"""Demo: the full turntable job in Blender (bpy module) through the installed extension.

    .venv/bin/python scripts/demo.py --out DIR [--frames 16] [--steps 3] [--size 64]

Builds the extension zip, installs it into an isolated Blender user folder (``build/demo_blender_user/``,
recreated on every run; your own Blender configuration is never touched), then runs the same job as
``blender -c portrait3d``: head anchor + turntable rig -> per-frame camera poses -> procedural proxy
head condition renders and 3D-aware proxy views -> job folder -> worker subprocess (this Python) -> frames
imported as a card -> preview.gif + preview.mp4 + contact_sheet.png -> scene.blend, all in DIR.

Model: ``models/small/`` when the repository has one; otherwise a tiny RANDOM-WEIGHT model folder
(made once with ``python -m dp3d_core.tiny`` and cached in ``build/demo_tiny_model/``): its frames
are noise-like. It proves the whole path runs; it is not a portrait model.

``--360``: the DiffPortrait360 turntable, one closed loop all around the head: the back-head network makes the
back view first (``<out>/.job/back/``), the 3D-aware proxies project the photo and the back view, then the views.
Model: ``models/small360/``, else a tiny random-weight DiffPortrait360 model (``build/demo_tiny360_model/``,
made with ``python -m dp3d_core.tiny OUT --family DiffPortrait360``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A portrait from the official DiffPortrait3D samples (MIT, see examples/LICENSE.official-samples).
PORTRAIT = ROOT / "examples" / "portrait_0000028.png"
USER_RESOURCES = ROOT / "build" / "demo_blender_user"
TINY_MODEL = ROOT / "build" / "demo_tiny_model"
TRAINED_MODEL = ROOT / "models" / "small"
TINY_MODEL_360 = ROOT / "build" / "demo_tiny360_model"
TRAINED_MODEL_360 = ROOT / "models" / "small360"
REPO_NAME = "portrait3d_demo"


class DemoError(RuntimeError):
    """The demo cannot run; the message says why and what to do."""


def demo_model(python: str, full_turn: bool = False) -> tuple[Path, bool]:
    """(model folder, is_random): the trained small model if present, else the cached tiny one (DiffPortrait360
    ones with ``full_turn``)."""
    trained, tiny = (TRAINED_MODEL_360, TINY_MODEL_360) if full_turn else (TRAINED_MODEL, TINY_MODEL)
    if (trained / "model_index.json").is_file():
        return trained, False
    ready = tiny / ("back_head/model_index.json" if full_turn else "model_index.json")
    if not ready.is_file():
        print(f"demo: {trained.relative_to(ROOT)} is not there: making a tiny random-weight model in {tiny} (once)",
              flush=True)
        shutil.rmtree(tiny, ignore_errors=True)
        family = ["--family", "DiffPortrait360"] if full_turn else []
        result = subprocess.run([python, "-m", "dp3d_core.tiny", str(tiny), *family], cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise DemoError(f"making the tiny model failed:\n{result.stderr[-2000:]}")
    return tiny, True


def install_extension(bpy, zip_path: Path):
    """Install and enable the zip in a fresh local repository; return the add-on module."""
    repo_dir = USER_RESOURCES / "extensions" / REPO_NAME
    repo_dir.mkdir(parents=True, exist_ok=True)
    bpy.context.preferences.use_preferences_save = False
    result = bpy.ops.preferences.extension_repo_add(
        name=REPO_NAME, type='LOCAL', use_custom_directory=True, custom_directory=str(repo_dir))
    repo = next((r for r in bpy.context.preferences.extensions.repos
                 if Path(r.directory).resolve() == repo_dir.resolve()), None)
    if 'FINISHED' not in result or repo is None:
        raise DemoError(f"Blender refused to add the extension repository {repo_dir}.")
    result = bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo=repo.module,
                                                      enable_on_install=True)
    module_name = f"bl_ext.{repo.module}.portrait3d"
    if 'FINISHED' not in result or module_name not in sys.modules:
        raise DemoError(f"Installing {zip_path.name} failed (see Blender's messages above).")
    return sys.modules[module_name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--frames", type=int, default=16, help="turntable frames (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--size", type=int, default=64, help="frame size in px, a multiple of 64 (default 64)")
    parser.add_argument("--360", dest="full_turn", action="store_true",
                        help="a DiffPortrait360 turntable all around the head (models/small360)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()

    if not PORTRAIT.is_file():
        print(f"demo: the example portrait is missing: {PORTRAIT}\n"
              "demo: it ships with the repository (examples/); restore it with git checkout -- examples",
              file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))
    import build  # noqa: E402  (the repository's build.py)

    started = time.monotonic()
    try:
        zip_path = build.build()
        print(f"demo: built {zip_path}", flush=True)
        model, random_weights = demo_model(sys.executable, args.full_turn)
    except (build.BuildError, DemoError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1

    # Isolate Blender's user folder before bpy is imported: it is read once at start-up.
    shutil.rmtree(USER_RESOURCES, ignore_errors=True)
    USER_RESOURCES.mkdir(parents=True)
    os.environ["BLENDER_USER_RESOURCES"] = str(USER_RESOURCES)
    import bpy  # noqa: E402

    bpy.ops.wm.read_factory_settings(use_empty=True)
    try:
        addon = install_extension(bpy, zip_path)
        print(f"demo: installed and enabled {addon.__name__}", flush=True)
        print(f"demo: model {model}; worker Python {sys.executable}", flush=True)
        result = addon.job_runner.run_turntable_job(
            out, frames=args.frames, reference=str(PORTRAIT), size=args.size, steps=args.steps, model=str(model),
            worker_python=sys.executable, device="cpu", proxy_views=True, import_as=("CARD", "BACKGROUND", "SEQUENCER"),
            full_turn=True if args.full_turn else None, log=lambda m: print(f"demo: {m}", flush=True))
    except (DemoError, RuntimeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"demo: note: {note}")
    for warning in result.warnings:
        print(f"demo: warning: {warning}")
    print(f"\nDemo output ({time.monotonic() - started:.0f} s): {out}")
    print(f"  {len(result.frames)} frames {result.frames[0].name} .. {result.frames[-1].name}"
          f" ({args.size}x{args.size} px, {args.steps} steps)")
    for path in (result.dataset, result.gif, result.movie, result.contact_sheet, result.blend):
        if path is not None:
            print(f"  {path.name}  ({path.stat().st_size} bytes)")
    if result.back_view is not None:
        print(f"  {result.back_view.relative_to(out) if result.back_view.is_relative_to(out) else result.back_view}"
              "  the back view (generated first)")
    if result.closed_loop:
        print("  the frames are one closed loop around the head (the last frame leads back to the first)")
    print(f"  {result.job_dir.name}/  the job the worker ran (job.json, condition images)")
    if random_weights:
        print("\nNOTE: the model has RANDOM weights (a tiny test model), so the frames look like noise. "
              "The demo shows the whole path working; real portraits need the converted official model "
              "(Preferences > Add-ons > Portrait 3D > Convert Official Checkpoint) or a trained "
              f"{'models/small360/' if args.full_turn else 'models/small/'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
