"""Shared set-up for tests that run inside Blender.

The same files run two ways:
- in-process with the ``bpy`` module from PyPI under plain pytest (``python3 dev.py test``, CI);
- inside a real Blender binary with pytest-blender (see README, "Tests in a real Blender").
Either way ``import bpy`` works, Blender is in background mode, and the repository root is on sys.path
so the source-tree ``addon`` and ``dp3d_core`` packages import.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"

# Keep the user's real Blender configuration out of reach: extensions installed by the tests land in a
# throw-away user folder. Must be set before bpy starts (pytest-blender sets its own before Blender starts).
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="p3d-blender-user-"))

import bpy  # noqa: E402  (fails loudly, never skips: these tests are the Blender-side proof)


@pytest.fixture
def empty_scene():
    """A fresh, empty Blender file for each test that asks for it."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    yield bpy.context.scene
    bpy.ops.wm.read_factory_settings(use_empty=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (the repository expects ../shared beside it)")
    return FIXTURES


@pytest.fixture(scope="session")
def extension_zip(tmp_path_factory) -> Path:
    """The extension zip, built and validated once per test session by Blender's own tool."""
    import build

    return build.build(tmp_path_factory.mktemp("dist"))
