"""Small helpers for the Blender-side tests."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bpy


@dataclass
class ReportRecorder:
    """Stands in for an operator instance so ``execute`` can be called directly and its reports read."""

    reports: list[tuple[str, str]] = field(default_factory=list)

    def report(self, kinds, message: str) -> None:
        for kind in kinds:
            self.reports.append((kind, message))

    def messages(self, kind: str) -> list[str]:
        return [m for k, m in self.reports if k == kind]


def run_execute(op_cls, context=None, **props) -> tuple[set[str], ReportRecorder]:
    """Call an operator class's ``execute`` with a report recorder: (result set, recorder)."""
    recorder = ReportRecorder()
    for name, value in props.items():
        setattr(recorder, name, value)
    result = op_cls.execute(recorder, context or bpy.context)
    return set(result), recorder


def op_error(op, **props) -> str:
    """Run ``bpy.ops`` expecting a reported error; return Blender's message (it raises RuntimeError)."""
    try:
        op(**props)
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError(f"{op.idname_py()} did not report an error")


def wrap_deg(angle: float) -> float:
    """Angle in degrees wrapped into [-180, 180)."""
    return (angle + 180.0) % 360.0 - 180.0


# ---------------------------------------------------------------- generation

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT.parent / "shared" / "fixtures" / "official_samples" / "portraits" / "0000028.png"
CONDITIONS = ROOT.parent / "shared" / "fixtures" / "official_samples" / "camera_conditions"
_tiny_model: Path | None = None


def tiny_model_folder() -> Path:
    """A tiny random-weight model folder, made once per test process by the real ``python -m dp3d_core.tiny``."""
    global _tiny_model
    if _tiny_model is None:
        path = Path(tempfile.mkdtemp(prefix="p3d-tiny-")) / "tiny model"
        subprocess.run([sys.executable, "-m", "dp3d_core.tiny", str(path)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        _tiny_model = path
    return _tiny_model


def fake_model_folder(path: Path) -> Path:
    """A folder that passes the add-on's completeness check (configs only, no weights)."""
    from addon.job_writer import MODEL_COMPONENTS

    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text("{}")
    for name, config in MODEL_COMPONENTS.items():
        (path / name).mkdir(exist_ok=True)
        (path / name / config).write_text("{}")
    return path


FAKE_PROBE_ANSWER = 'if [ "$1" = "-c" ]; then echo "dp3d-probe-version 3.11.0"; echo "dp3d-probe-missing -"; exit 0; fi'


def fake_worker_python(folder: Path, body: str = "exec sleep 30") -> Path:
    """An executable standing in for the worker Python (a shell script running ``body``); it answers the quick
    worker Python check (``python -c ...``) like a Python with every package."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python"
    path.write_text(f"#!/bin/sh\n{FAKE_PROBE_ANSWER}\n{body}\n")
    path.chmod(0o755)
    return path


def setup_generation_scene(scene, *, out: Path, model: Path, frames: int = 8, size: int = 64, steps: int = 2,
                           seed: int = 0, source: str = "PROCEDURAL", reference: Path = PORTRAIT,
                           prepare: bool = False):
    """Anchor + turntable + generation settings for a small, fast job (reference preparation off unless
    ``prepare``: most tests stand in a fake worker Python)."""
    scene.cursor.location = (0.0, 0.0, 0.0)
    assert bpy.ops.portrait3d.add_head_anchor() == {'FINISHED'}
    s = scene.portrait3d
    s.turntable_frames = frames
    s.turntable_yaw_range = math.radians(30.0)
    s.output_size = size
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    s.reference_image = str(reference)
    s.use_reference_prep = prepare
    s.output_folder = str(out) + os.sep
    s.model_folder = str(model) + os.sep
    s.steps = steps
    s.seed = seed
    s.device = 'CPU'
    s.condition_source = source
    if source == "IMAGE_FOLDER":
        s.condition_folder = str(CONDITIONS) + os.sep
    return s


FAKE_PREVIEW_WORKER = Path(__file__).resolve().parent / "fake_preview_worker.py"


def fake_preview_worker_python(folder: Path, options: str = "") -> Path:
    """A worker Python whose ``-m dp3d_core.worker JOB`` runs blender_tests/fake_preview_worker.py (previews,
    resumed, frames; ``options`` go in front of its arguments); any other command (the quick worker check, the
    contact sheet) runs this Python."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python"
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exec "{sys.executable}" "{FAKE_PREVIEW_WORKER}" {options} '
                    f'"$@"; fi\nexec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    return path
