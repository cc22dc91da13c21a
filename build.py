#!/usr/bin/env python3
"""Build the installable Blender extension zip: ``python build.py`` prints its path.

Stages ``addon/*`` + ``blender_manifest.toml`` + a copy of ``dp3d_core/`` + the bundled small model
(``models/small/``, so an installed extension generates with no settings touched) into
``build/extension/portrait3d/`` and runs Blender's own extension tool to build and validate it.
By default the tool is the script shipped inside the ``bpy`` module, run with this Python;
``--blender PATH`` uses a Blender binary (``blender --command extension ...``) instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MANIFEST = ROOT / "blender_manifest.toml"
STAGING_PARENT = ROOT / "build" / "extension"
DIST = ROOT / "dist"
BUNDLED_MODEL = Path("models") / "small"
# Never shipped inside the extension: tests, training code, caches.
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", "training", ".pytest_cache")


class BuildError(RuntimeError):
    """The extension could not be staged, built or validated."""


def manifest() -> dict:
    with MANIFEST.open("rb") as f:
        return tomllib.load(f)


def zip_name() -> str:
    m = manifest()
    return f"{m['id']}-{m['version']}.zip"


def find_blender_ext_script() -> Path:
    """Blender's ``blender_ext.py`` inside the installed ``bpy`` module, found without importing bpy."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("The bpy module is not installed in this Python; run `python3 dev.py setup` "
                         "or pass --blender PATH to use a Blender binary.")
    for location in spec.submodule_search_locations:
        hits = sorted(Path(location).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if hits:
            return hits[-1]
    raise BuildError("Blender's extension tool (bl_pkg/cli/blender_ext.py) was not found in the bpy module; "
                     "pass --blender PATH to use a Blender binary instead.")


def _tool_command(blender: str | None) -> list[str]:
    if blender:
        return [blender, "--factory-startup", "--command", "extension"]
    return [sys.executable, str(find_blender_ext_script())]


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError(f"Could not run {cmd[0]!r} to {what}: {exc}. Check the --blender path.") from exc
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"Blender's extension tool failed to {what} (exit {proc.returncode}):\n{output}")
    return output


def stage(staging_parent: Path = STAGING_PARENT) -> Path:
    """Copy the add-on, manifest and dp3d_core into a clean staging folder; return it."""
    package_id = manifest()["id"]
    staging = staging_parent / package_id
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(ROOT / "addon", staging, ignore=_IGNORE)
    shutil.copy2(MANIFEST, staging / MANIFEST.name)
    shutil.copytree(ROOT / "dp3d_core", staging / "dp3d_core", ignore=_IGNORE)
    if not (ROOT / BUNDLED_MODEL / "model_index.json").is_file():
        raise BuildError(f"The bundled model {ROOT / BUNDLED_MODEL} is missing; the extension would not work "
                         "out of the box. Restore models/small from git.")
    shutil.copytree(ROOT / BUNDLED_MODEL, staging / BUNDLED_MODEL, ignore=_IGNORE)
    return staging


def validate(zip_path: Path, blender: str | None = None) -> None:
    """Raise BuildError unless Blender's tool accepts the package."""
    _run([*_tool_command(blender), "validate", str(zip_path)], f"validate {zip_path.name}")


def build(output_dir: Path = DIST, blender: str | None = None) -> Path:
    """Stage, build and validate the extension; return the zip path."""
    staging = stage()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    zip_path = output_dir / zip_name()
    zip_path.unlink(missing_ok=True)
    _run([*_tool_command(blender), "build", "--source-dir", str(staging),
          "--output-filepath", str(zip_path)], "build the extension")
    if not zip_path.is_file():
        raise BuildError(f"Blender's extension tool reported success but {zip_path} was not written.")
    validate(zip_path, blender)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blender", help="path to a Blender binary (default: the bpy module's extension tool)")
    parser.add_argument("--output-dir", default=str(DIST), help="where to write the zip (default: dist/)")
    args = parser.parse_args(argv)
    try:
        zip_path = build(Path(args.output_dir), args.blender)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    print(zip_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
