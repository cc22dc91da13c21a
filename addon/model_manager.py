"""The model list of the preferences: what is on disk, how big, which resolution, and safe deletion. No bpy.

Folders the add-on makes (conversion, hub download) carry a marker file; Delete refuses any folder without it,
and any folder outside the models folder, so a folder the user pointed at is never deleted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .core import CORE_PARENT, preflight

MARKER_NAME = ".portrait3d_model.json"   # same name as dp3d_core.hub_download.MARKER_NAME
PROGRESS_PREFIX = "progress "            # lines of `dp3d_core.convert --progress` / `dp3d_core.hub_download --progress`


class ModelManagerError(RuntimeError):
    """A model action that cannot be done; the message says why."""


def bundled_model() -> Path:
    """The small model shipped inside the extension (beside the bundled dp3d_core)."""
    return Path(CORE_PARENT) / "models" / "small"


@dataclass
class ModelEntry:
    path: Path
    name: str
    source: str             # bundled, converted, downloaded, added
    size_bytes: int
    resolution: int | None  # output size in pixels the model was made for
    family: str
    managed: bool           # made by this add-on (may be deleted)
    problem: str = ""       # why it cannot be used, '' when complete


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_resolution(path: Path) -> int | None:
    """The output size the model was trained at (preflight reads it from the configs), None when unknown."""
    return preflight.trained_size(path)


def read_marker(path: Path) -> dict | None:
    data = _json(Path(path) / MARKER_NAME)
    return data or None


def write_marker(path: Path, **info) -> None:
    target = Path(path) / MARKER_NAME
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"made_by": "Portrait 3D", "created": time.strftime("%Y-%m-%d %H:%M:%S"), **info},
                              indent=2) + "\n")
    os.replace(tmp, target)


def describe(path: Path, source: str, check: Callable[[Path], str] | None = None) -> ModelEntry:
    path = Path(path)
    marker = read_marker(path)
    if marker and source == "folder":
        source = "downloaded" if marker.get("source") == "hub" else "converted"
    problem = ""
    if not path.is_dir():
        problem = "folder not found"
    elif not (path / "model_index.json").is_file():
        problem = "no model_index.json"
    elif check is not None:
        problem = check(path)
    return ModelEntry(path=path, name=path.name, source=source,
                      size_bytes=folder_size(path) if path.is_dir() else 0, resolution=model_resolution(path),
                      family=str(_json(path / "model_index.json").get("family", "DiffPortrait3D")),
                      managed=marker is not None, problem=problem)


def scan(models_dir: Path | None, extra: list[Path], check: Callable[[Path], str] | None = None) -> list[ModelEntry]:
    """The bundled model, every model folder in ``models_dir`` (hidden partial folders skipped), then ``extra``."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()

    def add(path: Path, source: str) -> None:
        key = Path(path).resolve()
        if key not in seen:
            seen.add(key)
            entries.append(describe(path, source, check))

    if (bundled_model() / "model_index.json").is_file():
        add(bundled_model(), "bundled")
    if models_dir is not None and models_dir.is_dir():
        for child in sorted(models_dir.iterdir(), key=lambda p: p.name.lower()):
            if child.is_dir() and not child.name.startswith(".") and \
                    ((child / "model_index.json").is_file() or (child / MARKER_NAME).is_file()):
                add(child, "folder")
    for path in extra:
        add(Path(path), "added")
    return entries


def check_new_name(models_dir: Path, name: str) -> Path:
    name = name.strip()
    if not name or not re.match(r"^[\w][\w .-]*$", name) or name in (".", ".."):
        raise ModelManagerError("The model name must be a plain folder name (letters, digits, '-', '_', '.').")
    target = models_dir / name
    if target.exists():
        raise ModelManagerError(f"{target} already exists; choose another name or delete that model first.")
    return target


def delete_model(path: Path, models_dir: Path) -> None:
    """Delete a folder this add-on made inside ``models_dir``; anything else is refused."""
    path = Path(path)
    if path.resolve() == bundled_model().resolve():
        raise ModelManagerError("The bundled model is part of the extension and cannot be deleted.")
    if read_marker(path) is None:
        raise ModelManagerError(f"{path} was not made by Portrait 3D (no {MARKER_NAME}); it is left alone. "
                                "Remove it from the list instead, and delete it yourself if you want.")
    if not path.resolve().is_relative_to(models_dir.resolve()):
        raise ModelManagerError(f"{path} is outside the models folder {models_dir}; it is left alone.")
    shutil.rmtree(path)


def remove_partial_outputs(models_dir: Path, name: str) -> list[Path]:
    """Hidden leftovers of a cancelled conversion (``.<name>.*`` staging folders) or download (``.<name>.partial``
    is kept: a later download of the same name resumes it)."""
    removed = []
    if models_dir.is_dir():
        for child in models_dir.iterdir():
            if child.is_dir() and child.name.startswith(f".{name}.") and child.name != f".{name}.partial":
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


@dataclass
class ByteProgress:
    """Progress lines of the converter / downloader, with an ETA from the rate of the current phase."""

    phase: str = ""
    done: int = 0
    total: int = 0
    files_done: int = 0
    files: int = 0
    _phase_start: tuple[float, int] | None = None

    def feed(self, line: str, now: float | None = None) -> bool:
        if not line.startswith(PROGRESS_PREFIX):
            return False
        try:
            data = json.loads(line[len(PROGRESS_PREFIX):])
        except ValueError:
            return False
        now = time.monotonic() if now is None else now
        if data.get("phase") != self.phase:
            self.phase = str(data.get("phase"))
            self._phase_start = (now, int(data.get("done", 0)))
        self.done, self.total = int(data.get("done", 0)), int(data.get("total", 0))
        self.files_done, self.files = int(data.get("files_done", 0)), int(data.get("files", 0))
        self._now = now
        return True

    def eta(self, now: float | None = None) -> float | None:
        if self._phase_start is None or not self.total:
            return None
        t0, d0 = self._phase_start
        now = time.monotonic() if now is None else now
        if self.done <= d0 or now <= t0:
            return None
        rate = (self.done - d0) / (now - t0)
        return max(0.0, (self.total - self.done) / rate)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def words(self, now: float | None = None) -> str:
        if not self.phase:
            return "starting..."
        unit = (lambda n: human_size(n)) if self.phase in ("read", "write", "download") else str
        text = f"{self.phase}: {unit(self.done)} of {unit(self.total)}"
        if self.files:
            text += f" ({self.files_done}/{self.files} files)"
        eta = self.eta(now)
        if eta is not None and self.done < self.total:
            text += f", about {int(eta) // 60}m {int(eta) % 60:02d}s left"
        return text
