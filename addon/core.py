"""The torch-free part of dp3d_core, wherever it lives.

In the extension zip ``dp3d_core`` is bundled inside the add-on package; in the source tree it sits
beside ``addon/``. ``CORE_PARENT`` is the folder that contains ``dp3d_core`` (put it on PYTHONPATH
to start the worker subprocess).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent

if (_HERE / "dp3d_core" / "__init__.py").is_file():
    from .dp3d_core import cameras, face_pose, failures, job, preflight, protocol  # noqa: F401
    CORE_PARENT: Path = _HERE
else:
    CORE_PARENT = _HERE.parent
    if str(CORE_PARENT) not in sys.path:
        sys.path.append(str(CORE_PARENT))
    from dp3d_core import cameras, face_pose, failures, job, preflight, protocol  # noqa: F401

__all__ = ["cameras", "face_pose", "failures", "job", "preflight", "protocol", "CORE_PARENT"]
