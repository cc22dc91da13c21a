"""Worker -> add-on protocol, cancel files, atomic writes and the finished-frames manifest (stdlib only).

The worker prints one JSON object per line on stdout. Every protocol line carries
``"dp3d": PROTOCOL_VERSION`` and ``"event": <kind>``; anything else on stdout (a library
print that slipped through) is ignored by :func:`parse_event`.

Event kinds and their fields:

- ``started``: job_hash, frames_total, frames_done (already finished by an earlier run)
- ``resumed``: step (denoising steps already done, from a saved checkpoint; the run continues with step
  ``step + 1`` of ``total_steps``), total_steps. Sent after ``started``, before the first ``progress``.
- ``progress``: step, total_steps, window, frames_done, frames_total; in a DiffPortrait360 job also ``stage``
  (``"back"`` while the back view is generated, ``"views"`` while the frames are)
- ``back_view``: path (absolute path of the back view PNG, ``<job dir>/back/back_seed<seed>.png``), seed,
  origin (``"generated"``). DiffPortrait360 jobs only, once the back stage has made the back view or found it
  already made for the same inputs; sent before the view stage starts
- ``preview``: step (steps done), total_steps, folder (absolute path of the folder holding one preview PNG
  per view, named as that view's output frame; see dp3d_core.live_preview)
- ``frame``: index, scene_frame, path
- ``warning``: message
- ``error``: message, hint
- ``done``: frames_written, seconds, cancelled (bool)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from .job import JOB_FILE

PROTOCOL_VERSION = 1
CANCEL_FILE = "cancel"
MANIFEST_FILE = "frames.json"
EVENT_KINDS = ("started", "resumed", "progress", "preview", "back_view", "frame", "warning", "error", "done")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "started": ("job_hash", "frames_total", "frames_done"),
    "resumed": ("step", "total_steps"),
    "progress": ("step", "total_steps", "window", "frames_done", "frames_total"),
    "preview": ("step", "total_steps", "folder"),
    "back_view": ("path", "seed", "origin"),
    "frame": ("index", "scene_frame", "path"),
    "warning": ("message",),
    "error": ("message", "hint"),
    "done": ("frames_written", "seconds", "cancelled"),
}
# Exit codes of the worker process.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CANCELLED = 3

__all__ = ["JOB_FILE", "CANCEL_FILE", "MANIFEST_FILE", "Event", "ProtocolError", "encode_event", "parse_event",
           "EventReader", "request_cancel", "cancel_requested", "clear_cancel", "write_atomic",
           "read_manifest", "record_frame", "frame_done"]


class ProtocolError(ValueError):
    """An event that does not follow the protocol (unknown kind or missing field)."""


@dataclass
class Event:
    """One protocol message."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode_event(kind: str, **fields: Any) -> str:
    """One protocol line (no trailing newline). Raises ProtocolError on an unknown kind or missing field."""
    if kind not in EVENT_KINDS:
        raise ProtocolError(f"unknown event kind {kind!r}; expected one of {', '.join(EVENT_KINDS)}")
    missing = [f for f in REQUIRED_FIELDS[kind] if f not in fields]
    if missing:
        raise ProtocolError(f"event {kind!r} lacks field(s) {', '.join(missing)}")
    if "dp3d" in fields or "event" in fields:
        raise ProtocolError("'dp3d' and 'event' are reserved field names")
    return json.dumps({"dp3d": PROTOCOL_VERSION, "event": kind, **fields}, separators=(",", ":"),
                      allow_nan=False, default=str)


def parse_event(line: str | bytes) -> Event | None:
    """The event on ``line``, or None for anything that is not a protocol line."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("dp3d") != PROTOCOL_VERSION or obj.get("event") not in EVENT_KINDS:
        return None
    kind = obj.pop("event")
    obj.pop("dp3d")
    return Event(kind, obj)


class EventReader:
    """Reads a stream (a worker's stdout) on a daemon thread and queues the events.

    Non-protocol lines are kept (the last ``keep_lines``) in :attr:`other_lines` for diagnostics.
    Safe to poll from Blender's main thread with :meth:`poll`; never touches bpy.
    """

    def __init__(self, stream: IO[Any], keep_lines: int = 200) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.other_lines: list[str] = []
        self._keep = keep_lines
        self._stream = stream
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dp3d-event-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                event = parse_event(line)
                if event is not None:
                    self.events.put(event)
                else:
                    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
                    self.other_lines.append(text.rstrip("\n"))
                    del self.other_lines[:-self._keep]
        except (OSError, ValueError):  # stream closed under us
            pass
        finally:
            self._done.set()

    @property
    def finished(self) -> bool:
        """True once the stream reached its end (events may still wait in the queue)."""
        return self._done.is_set()

    def poll(self) -> list[Event]:
        """Every event queued so far, without blocking."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds; None on timeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


# ---------------------------------------------------------------- cancel

def request_cancel(job_dir: str | os.PathLike) -> None:
    """Ask the worker running ``job_dir`` to stop after its current denoising step."""
    (Path(job_dir) / CANCEL_FILE).write_text("cancel\n")


def cancel_requested(job_dir: str | os.PathLike) -> bool:
    return (Path(job_dir) / CANCEL_FILE).exists()


def clear_cancel(job_dir: str | os.PathLike) -> None:
    (Path(job_dir) / CANCEL_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------- atomic files

# Test hook: "SUBSTRING:SECONDS" makes write_atomic pause half-way through writing any file whose path (with
# forward slashes) contains SUBSTRING, so a test can kill the process in the middle of that write.
TEST_PAUSE_ENV = "DP3D_TEST_PAUSE_WRITE"


def _test_pause(path: Path) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if spec:
        needle, _, seconds = spec.rpartition(":")
        if needle and needle in path.as_posix():
            time.sleep(float(seconds))


def remove_stale_temp_files(folder: Path, names: Iterable[str]) -> None:
    """The temporary files :func:`write_atomic` left for ``names`` in ``folder`` when a worker was killed mid-write
    (never complete files, so safe to delete)."""
    if folder.is_dir():
        for name in names:
            for tmp in folder.glob(f".{glob.escape(name)}.*.tmp"):
                tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and rename it, so ``path`` is always complete.

    ``durable``: fsync the data before the rename, so it survives a power loss too (a killed process never
    leaves a partial ``path`` either way; previews skip the fsync, they are rewritten every few seconds).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the file private, 0600).
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            _test_pause(path)
            f.write(data[half:])
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ---------------------------------------------------------------- finished-frames manifest

def read_manifest(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{file name: {"job_hash", "index", "scene_frame", "sha256"}}``; empty when absent or unreadable."""
    path = Path(output_dir) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    frames = data.get("frames") if isinstance(data, dict) else None
    return frames if isinstance(frames, dict) else {}


def record_frame(output_dir: str | os.PathLike, name: str, job_hash: str, index: int, scene_frame: int,
                 sha256: str) -> None:
    """Mark ``name`` as finished for ``job_hash`` (manifest rewritten atomically). Single writer: the worker."""
    frames = read_manifest(output_dir)
    frames[name] = {"job_hash": job_hash, "index": index, "scene_frame": scene_frame, "sha256": sha256}
    body = json.dumps({"version": 1, "frames": frames}, indent=1, sort_keys=True).encode()
    write_atomic(Path(output_dir) / MANIFEST_FILE, body)


def frame_done(output_dir: str | os.PathLike, name: str, job_hash: str,
               manifest: dict[str, dict[str, Any]] | None = None) -> bool:
    """True when ``name`` exists, was written for ``job_hash`` and still has the recorded contents."""
    entry = (manifest if manifest is not None else read_manifest(output_dir)).get(name)
    path = Path(output_dir) / name
    if not entry or entry.get("job_hash") != job_hash or not path.is_file():
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256")


def frames_done(output_dir: str | os.PathLike, names: Iterable[str], job_hash: str) -> set[str]:
    """The subset of ``names`` already finished for ``job_hash``."""
    manifest = read_manifest(output_dir)
    return {n for n in names if frame_done(output_dir, n, job_hash, manifest)}
