#!/usr/bin/env python3
"""Demo: build the extension, install it into an isolated Blender user folder, run the turntable job.

    .venv/bin/python scripts/demo.py --out DIR

Leaves ``dataset.json`` and ``scene.blend`` in DIR. Your own Blender configuration is never touched:
Blender's user resources point at ``build/demo_blender_user/`` (recreated on every run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT.parent / "shared" / "fixtures" / "official_samples" / "portraits" / "0000028.png"
USER_RESOURCES = ROOT / "build" / "demo_blender_user"
REPO_NAME = "portrait3d_demo"


class DemoError(RuntimeError):
    """The demo cannot run; the message says why and what to do."""


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
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()

    if not PORTRAIT.is_file():
        print(f"demo: the example portrait is missing: {PORTRAIT}\n"
              "demo: the repository expects the shared fixtures folder beside it (../shared/fixtures).",
              file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT))
    import build  # noqa: E402  (the repository's build.py)

    try:
        zip_path = build.build()
    except build.BuildError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(f"demo: built {zip_path}", flush=True)

    # Isolate Blender's user folder before bpy is imported: it is read once at start-up.
    shutil.rmtree(USER_RESOURCES, ignore_errors=True)
    USER_RESOURCES.mkdir(parents=True)
    os.environ["BLENDER_USER_RESOURCES"] = str(USER_RESOURCES)
    import bpy  # noqa: E402

    bpy.ops.wm.read_factory_settings(use_empty=True)
    try:
        addon = install_extension(bpy, zip_path)
        print(f"demo: installed and enabled {addon.__name__}", flush=True)
        result = addon.job_runner.run_turntable_job(out, frames=args.frames, reference=str(PORTRAIT))
    except (DemoError, RuntimeError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"demo: warning: {warning}")
    print(f"Demo output: {out}")
    for path in result.files():
        print(f"  {path.name}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
