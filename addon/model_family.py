"""Which model family a model folder holds, and whether it can make the back of the head (cached).

The add-on decides what to offer from two fields of ``dp3d_core.preflight.read_model_info`` only: ``family``
("DiffPortrait3D" / "DiffPortrait360") and ``back_head`` (a DiffPortrait360 folder with its back-head model in
``back_head/``). Reading them parses configs and safetensors headers, so the answer is kept per folder and read
again only when its ``model_index.json`` files change: panels ask on every redraw.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .core import preflight

DIFFPORTRAIT3D = "DiffPortrait3D"
DIFFPORTRAIT360 = "DiffPortrait360"
BACK_HEAD_DIR = "back_head"


@dataclass(frozen=True)
class ModelFamily:
    name: str = DIFFPORTRAIT3D
    back_head: bool = False  # DiffPortrait360 only: the folder can generate the back view itself

    @property
    def is_360(self) -> bool:
        return self.name == DIFFPORTRAIT360


DEFAULT = ModelFamily()
_cache: dict[str, tuple[tuple, ModelFamily]] = {}


def _stamp(folder: Path) -> tuple:
    """What must stay the same for a cached answer to hold: the model_index.json files' times and sizes."""
    out = []
    for p in (folder / "model_index.json", folder / BACK_HEAD_DIR / "model_index.json"):
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def family_of(folder: str | os.PathLike) -> ModelFamily:
    """The family of a model folder; preflight.PreflightError (plain words) when it cannot be read."""
    path = Path(folder).expanduser().resolve()
    key, stamp = str(path), _stamp(path)
    hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    info = preflight.read_model_info(path)
    family = ModelFamily(str(info.family), bool(info.family == DIFFPORTRAIT360 and info.back_head))
    _cache[key] = (stamp, family)
    return family


def scene_family(context, model: str | os.PathLike | None = None) -> ModelFamily | None:
    """The family of the model the scene would use (see job_writer.model_folder); None when there is no
    usable model yet (Generate says what is missing)."""
    from .job_writer import JobSetupError, model_folder

    try:
        return family_of(model_folder(context, model))
    except (JobSetupError, preflight.PreflightError):
        return None
