"""The worker subprocess: start, read its events, cancel, and explain a death in plain words.

Never touches bpy (the reader threads must not), so it can be polled from a Blender timer or a
modal operator on the main thread, or waited on in background mode.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .core import CORE_PARENT, failures, protocol

CANCEL_GRACE_S = 10.0
KILL_GRACE_S = 5.0
STDERR_KEEP = 200


# What survives a crash or a kill: the worker checkpoints the denoising state under <job dir>/state/ every few
# steps (dp3d_core.denoise_state), and a cancel saves the last completed step.
RESUME_WORDS = ("it continues from the last saved denoising step (saved every few steps), and frames finished by "
                "an earlier run are not recomputed")


class WorkerStartError(RuntimeError):
    """The worker could not be started; the message says what to fix."""


def resolve_worker_python(path: str | os.PathLike | None) -> Path:
    """The worker Python as an existing executable file, or WorkerStartError with the fix."""
    raw = "" if path is None else str(path).strip()
    if not raw:
        raise WorkerStartError(
            "No worker Python set: in Preferences > Add-ons > Portrait 3D, set Worker Python to the python "
            "executable of an environment with torch and diffusers (or set PORTRAIT3D_WORKER_PYTHON).")
    p = Path(os.path.expanduser(raw))
    if p.is_dir():
        for candidate in (p / "bin" / "python", p / "python.exe", p / "Scripts" / "python.exe", p / "python"):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise WorkerStartError(f"Worker Python {p} is a folder without a python executable in it; "
                                   "point Worker Python at the python executable itself.")
    if not p.exists():
        raise WorkerStartError(f"Worker Python not found: {p}. Set Worker Python in the add-on preferences to an "
                               "existing python executable with torch and diffusers.")
    if not os.access(p, os.X_OK):
        raise WorkerStartError(f"Worker Python {p} is not executable; point it at a python executable.")
    return p


# ---------------------------------------------------------------- the quick worker Python check

# Asks the interpreter for its version and whether the worker's packages can be found (importlib's find_spec:
# no import, so it takes the interpreter's start-up time, not torch's seconds). Written to run on any Python,
# so an old one still reports its version.
PROBE_SCRIPT = (
    "import sys\n"
    "sys.stdout.write('dp3d-probe-version %d.%d.%d\\n' % tuple(sys.version_info[:3]))\n"
    "from importlib.util import find_spec\n"
    f"missing = [n for n in {failures.PACKAGES!r} if find_spec(n) is None]\n"
    "sys.stdout.write('dp3d-probe-missing %s\\n' % (' '.join(missing) or '-'))\n"
)
PROBE_TIMEOUT = 60.0  # seconds: an interpreter's start on a cold, busy disk
MIN_PYTHON = (3, 10)
_probe_ok: dict[tuple[str, int, int], str] = {}


def probe_worker_python(python: str | os.PathLike, timeout: float = PROBE_TIMEOUT) -> str:
    """Check quickly that ``python`` is a Python 3.10+ that can find torch, diffusers and the rest.

    Returns its version; raises WorkerStartError with one plain sentence of what is wrong and one of what to do.
    A success is remembered for that executable (its path as given, mtime and size), so it costs one interpreter
    start once.
    Failures are not remembered: installing the missing package must make the next try pass.
    """
    exe = resolve_worker_python(python)
    try:
        st = exe.stat()
    except OSError as exc:
        raise WorkerStartError(str(failures.worker_python_failure("no_run", exe, exc.strerror or "unreadable")))
    # the path as given, not resolved: every venv's python links to the same interpreter binary, and what a venv
    # can import depends on where that link sits
    key = (os.path.abspath(exe), st.st_mtime_ns, st.st_size)
    if key in _probe_ok:
        return _probe_ok[key]
    try:
        r = subprocess.run([str(exe), "-c", PROBE_SCRIPT], cwd=str(CORE_PARENT), env=worker_env(CORE_PARENT),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerStartError(str(failures.worker_python_failure("timeout", exe, f"{timeout:.0f}"))) from None
    except OSError as exc:
        raise WorkerStartError(str(failures.worker_python_failure(
            "not_python", exe, (exc.strerror or "it cannot be executed").lower()))) from None
    out = r.stdout.decode("utf-8", "replace").splitlines()
    info = dict(line.split(" ", 1) for line in out if line.startswith("dp3d-probe-") and " " in line)
    version = info.get("dp3d-probe-version", "").strip()
    if not version:
        said = next((line.strip() for line in out + r.stderr.decode("utf-8", "replace").splitlines()
                     if line.strip()), "")
        detail = (f"it exited with code {r.returncode} and printed nothing" if not said else
                  f"it exited with code {r.returncode} and printed {failures.clip(said, 80)!r}")
        raise WorkerStartError(str(failures.worker_python_failure("not_python", exe, detail)))
    try:
        numbers = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        numbers = (0, 0)
    if numbers < MIN_PYTHON:
        raise WorkerStartError(str(failures.worker_python_failure("too_old", exe, f"Python {version}")))
    missing = info.get("dp3d-probe-missing", "-").split()
    if missing != ["-"] and missing:
        names = ", ".join(failures.pip_name(m) for m in missing)
        raise WorkerStartError(str(failures.worker_python_failure("missing", exe, names)))
    _probe_ok[key] = version
    return version


def worker_env(core_parent: str | os.PathLike = CORE_PARENT) -> dict[str, str]:
    """The environment of a worker: the bundled dp3d_core first on PYTHONPATH, UTF-8 pipes, unbuffered."""
    env = dict(os.environ)
    parts = [str(core_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONHOME", None)  # Blender's own Python home must not leak into another Python
    return env


def popen_kwargs() -> dict:
    kwargs: dict = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if os.name == "nt":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    return kwargs


@dataclass
class WorkerStatus:
    """What the UI shows. ``state``: running, done, cancelled or failed."""

    state: str = "running"
    frames_total: int = 0
    frames_done: int = 0
    frames_done_at_start: int = 0
    step: int = 0
    total_steps: int = 0
    window: int = 0
    windows: int = 1
    eta_seconds: float = -1.0
    message: str = "Starting the worker..."
    hint: str = ""
    log_tail: list[str] = field(default_factory=list)
    frames_written: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    job_hash: str = ""
    returncode: int | None = None
    resumed_step: int | None = None   # the denoising step a resumed run continued from (``resumed`` event)
    preview_step: int | None = None   # the step of the latest previews (``preview`` event)
    preview_folder: str = ""
    previews: int = 0                 # preview events so far
    stage: str = ""                   # DiffPortrait360: "back" while the back view is denoised, then "views"
    back_view: str = ""               # the back view the worker made (``back_view`` event; DiffPortrait360)
    back_view_seed: int = 0

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def fraction(self) -> float:
        """0..1: denoising work done, then 1 when all frames are written."""
        if self.state == "done":
            return 1.0
        if self.frames_total and self.frames_done >= self.frames_total:
            return 1.0
        units = max(1, self.total_steps * max(1, self.windows))
        done = max(0, (self.step - 1) * max(1, self.windows) + self.window) if self.step else 0
        return min(0.99, done / units) if self.total_steps else 0.0


def diagnose(returncode: int | None, stderr: Sequence[str]) -> tuple[str, str]:
    """(message, hint) for a worker that ended without an ``error`` event."""
    text = "\n".join(stderr)
    missing = re.findall(r"No module named '([^']+)'", text)
    if missing:
        name = missing[-1].split(".")[0]
        if name == "dp3d_core":
            return ("The worker could not find the bundled dp3d_core package.",
                    "reinstall the extension; the worker is started with its folder on PYTHONPATH")
        return (f"The worker Python lacks the package '{failures.pip_name(name)}'.", failures.PACKAGES_HINT)
    if "SyntaxError" in text or "requires Python" in text:
        return ("The worker Python is too old or not a CPython 3 interpreter.",
                "pick a Python 3.10 or newer with torch and diffusers as Worker Python")
    oom = failures.out_of_memory(text)
    if oom is not None:
        return oom.message, oom.hint
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return (f"The worker was stopped from outside ({sig}), or the system ran out of memory.",
                f"Generate again: {RESUME_WORDS}")
    return (f"The worker stopped unexpectedly (exit code {returncode}).",
            "read the worker log lines below; check that Worker Python has torch and diffusers (Check Worker)")


def cancelled_message(status: WorkerStatus) -> str:
    """What a cancelled run keeps, in plain words (the worker saves the state of its last completed step)."""
    if not status.total_steps:
        return "Cancelled before denoising began"
    return (f"Cancelled during step {status.step}/{status.total_steps}; Generate again continues from the last "
            "completed step")


class WorkerProcess:
    """One run of ``<python> -m dp3d_core.worker <job dir>``."""

    def __init__(self, job_dir: str | os.PathLike, worker_python: str | os.PathLike, *,
                 core_parent: str | os.PathLike = CORE_PARENT, cancel_grace: float = CANCEL_GRACE_S,
                 back_only: bool = False) -> None:
        self.job_dir = Path(job_dir)
        self.back_only = back_only  # DiffPortrait360: only the back view (``--back-only``)
        self.python = resolve_worker_python(worker_python)
        self.core_parent = Path(core_parent)
        self.cancel_grace = cancel_grace
        self.status = WorkerStatus()
        self.events: list[protocol.Event] = []
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP)
        self._cancel_at: float | None = None
        self._terminated = False
        self._error_event: protocol.Event | None = None
        self._first_progress: tuple[float, int] | None = None
        self.started_at = time.monotonic()
        protocol.clear_cancel(self.job_dir)
        cmd = [str(self.python), "-m", "dp3d_core.worker", str(self.job_dir.resolve())]
        if back_only:
            cmd.append("--back-only")
        try:
            self.proc = subprocess.Popen(cmd, cwd=str(self.core_parent), env=worker_env(self.core_parent),
                                         **popen_kwargs())
        except OSError as exc:
            raise WorkerStartError(f"Cannot start the worker Python {self.python}: {exc.strerror or exc}. "
                                   "Pick a working python executable as Worker Python.") from None
        self.reader = protocol.EventReader(self.proc.stdout)
        self._stderr_thread = threading.Thread(target=self._read_stderr, name="dp3d-worker-stderr", daemon=True)
        self._stderr_thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stderr(self) -> None:
        try:
            for raw in self.proc.stderr:
                self._stderr.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def stderr_tail(self, n: int = 8) -> list[str]:
        lines = [line for line in list(self._stderr) if line.strip()]
        return lines[-n:]

    # ------------------------------------------------------------ events

    def _apply(self, ev: protocol.Event) -> None:
        s = self.status
        self.events.append(ev)
        if ev.kind == "started":
            s.job_hash = ev["job_hash"]
            s.frames_total = int(ev["frames_total"])
            s.frames_done = s.frames_done_at_start = int(ev["frames_done"])
            s.message = (f"Resuming: {s.frames_done} of {s.frames_total} frames already done" if s.frames_done
                         else "Loading the model...")
        elif ev.kind == "progress":
            s.step, s.total_steps = int(ev["step"]), int(ev["total_steps"])
            s.window, s.windows = int(ev["window"]), int(ev.get("windows", 1) or 1)
            s.frames_done, s.frames_total = int(ev["frames_done"]), int(ev["frames_total"])
            units_done = (s.step - 1) * s.windows + s.window
            now = time.monotonic()
            stage = str(ev.get("stage") or "")
            if stage != s.stage:  # DiffPortrait360: the views after the back view; the ETA starts over
                s.stage, s.eta_seconds, self._first_progress = stage, -1.0, None
            if self._first_progress is None:
                self._first_progress = (now, units_done)
            t0, u0 = self._first_progress
            if units_done > u0:
                rate = (now - t0) / (units_done - u0)
                s.eta_seconds = rate * (s.total_steps * s.windows - units_done)
            s.message = (f"Back view: denoising step {s.step}/{s.total_steps}" if s.stage == "back" else
                         f"Denoising step {s.step}/{s.total_steps}")
        elif ev.kind == "resumed":
            s.resumed_step, s.total_steps = int(ev["step"]), int(ev["total_steps"])
            s.step = s.resumed_step
            s.message = f"Resumed from step {s.resumed_step}/{s.total_steps}"
        elif ev.kind == "preview":
            s.preview_step, s.preview_folder = int(ev["step"]), str(ev["folder"])
            s.previews += 1
        elif ev.kind == "back_view":
            s.back_view, s.back_view_seed = str(ev["path"]), int(ev["seed"])
            s.message = f"Back view ready (seed {s.back_view_seed})"
        elif ev.kind == "frame":
            s.frames_written.append(str(ev["path"]))
            s.frames_done = min(s.frames_total or 10**9, s.frames_done + 1)
            s.message = f"Wrote frame {ev['scene_frame']}"
        elif ev.kind == "warning":
            s.warnings.append(str(ev["message"]))
            s.message = str(ev["message"])  # shown until the next progress (e.g. while the networks compile)
        elif ev.kind == "error":
            self._error_event = ev
        elif ev.kind == "done":
            if ev["cancelled"]:
                s.message = "Cancelled"
            elif self.back_only:
                s.eta_seconds = 0.0
                s.message = f"Back view ready (seed {s.back_view_seed}) in {ev['seconds']:.0f} s"
            else:
                s.eta_seconds = 0.0
                s.message = f"Done: {s.frames_done} frames ({ev['frames_written']} new) in {ev['seconds']:.0f} s"

    def poll(self) -> list[protocol.Event]:
        """Apply the events that arrived; settle the final state once the process ended. Never blocks long."""
        new = self.reader.poll()
        for ev in new:
            self._apply(ev)
        if self._cancel_at is not None and self.proc.poll() is None:
            waited = time.monotonic() - self._cancel_at
            if waited > self.cancel_grace + KILL_GRACE_S:
                self.proc.kill()
            elif waited > self.cancel_grace and not self._terminated:
                self._terminated = True
                self.proc.terminate()
        if self.status.state == "running" and self.proc.poll() is not None:
            # The stream ends shortly after the exit; take the last events before judging.
            self.reader.join(timeout=2.0)
            self._stderr_thread.join(timeout=2.0)
            for ev in self.reader.poll():
                self._apply(ev)
                new.append(ev)
            self._settle(self.proc.returncode)
        return new

    def _settle(self, rc: int) -> None:
        s = self.status
        s.returncode = rc
        s.log_tail = self.stderr_tail()
        done = next((e for e in reversed(self.events) if e.kind == "done"), None)
        if done is not None and done["cancelled"] or rc == protocol.EXIT_CANCELLED:
            s.state, s.message = "cancelled", cancelled_message(s)
        elif self._cancel_at is not None and self._error_event is None:
            s.state = "cancelled"
            s.message = f"Cancelled (the worker had to be stopped); Generate again: {RESUME_WORDS}"
        elif rc == protocol.EXIT_OK and done is not None:
            s.state = "done"
        elif self._error_event is not None:
            s.state = "failed"
            s.message, s.hint = str(self._error_event["message"]), str(self._error_event["hint"])
            if self._error_event.get("log"):
                s.log_tail = []  # the raw text is in the log file the hint names, not for the user's eyes
        else:
            s.state = "failed"
            s.message, s.hint = diagnose(rc, list(self._stderr))
            log = failures.write_log([self.job_dir / "worker.log"], f"{self.python} -m dp3d_core.worker "
                                     f"{self.job_dir} ended with exit code {rc}; its stderr:\n" +
                                     "\n".join(self._stderr))
            if log is not None:
                s.hint = f"{s.hint} (details: {log})"
                s.log_tail = []

    # ------------------------------------------------------------ control

    def cancel(self) -> None:
        """Ask for a stop within the current denoising step (the worker saves its last completed step);
        terminate after the grace period."""
        if self.proc.poll() is None and self._cancel_at is None:
            protocol.request_cancel(self.job_dir)
            self._cancel_at = time.monotonic()
            self.status.message = "Cancelling: the worker saves its last completed step and stops..."

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_at is not None

    def wait(self, timeout: float | None = None, interval: float = 0.05, on_update=None) -> WorkerStatus:
        """Block until the worker ended (or ``timeout``); ``on_update(self)`` after each poll with news."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.status.finished:
            if self.poll() and on_update is not None:
                on_update(self)
            if self.status.finished:
                break
            if end is not None and time.monotonic() > end:
                break
            time.sleep(interval)
        if on_update is not None:
            on_update(self)
        return self.status

    def kill(self) -> None:
        """Stop the process now (Blender quitting, file reload)."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def run_python(python: str | os.PathLike, args: Sequence[str], *, timeout: float = 120.0,
               core_parent: str | os.PathLike = CORE_PARENT) -> subprocess.CompletedProcess:
    """Run ``<python> args...`` to completion with the worker's environment (text output)."""
    exe = resolve_worker_python(python)
    try:
        return subprocess.run([str(exe), *args], cwd=str(core_parent), env=worker_env(core_parent),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerStartError(f"{exe} did not finish within {timeout:.0f} s.") from None
    except OSError as exc:
        raise WorkerStartError(f"Cannot run {exe}: {exc.strerror or exc}.") from None


CHECK_SCRIPT = r"""
import sys
PACKAGES = %r
print("python", sys.version.split()[0], sys.executable)
missing = []
try:
    import torch
    print("torch", torch.__version__)
    if torch.cuda.is_available():
        print("cuda", torch.cuda.get_device_name(0))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("cuda", "none (Apple MPS available)")
    else:
        print("cuda", "none (CPU only)")
except Exception as exc:
    missing.append("torch")
    print("error torch", type(exc).__name__, exc)
for name in PACKAGES:
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:
        missing.append(name)
        print("error", name, type(exc).__name__, exc)
print("missing", " ".join(missing) or "-")
try:  # reference preparation (on by default at Generate) needs the face models; their absence is a warning
    from dp3d_core import face_landmarks
    face_landmarks.check_installed()
    print("reference-prep ok")
except Exception as exc:
    print("reference-prep", (str(exc) or type(exc).__name__).splitlines()[0])
""" % (tuple(p for p in failures.PACKAGES if p != "torch"),)  # torch is imported first, for its device


CHECK_TIMEOUT = 180.0  # seconds; a first torch import on a cold disk can take a minute


@dataclass
class WorkerCheck:
    ok: bool
    summary: str
    lines: list[str]
    warnings: list[str] = field(default_factory=list)  # usable, but something the artist will miss


def start_worker_check(python: str | os.PathLike) -> "BackgroundCommand":
    """Start the import check of ``python`` in the background (read it with :func:`worker_check_result`)."""
    return BackgroundCommand(python, ["-c", CHECK_SCRIPT])


def worker_check_result(python: str | os.PathLike, returncode: int, lines: Sequence[str]) -> WorkerCheck:
    """Plain-words verdict of a finished check: its exit code and output lines (stdout and stderr)."""
    lines = [line for line in lines if line.strip()]
    info = dict(line.split(" ", 1) for line in lines if " " in line)
    missing = info.get("missing", "").split() if info.get("missing", "-") != "-" else []
    if returncode != 0 or "missing" not in info:
        return WorkerCheck(False, f"{python} could not run the check (exit code {returncode}). "
                           "Is it a Python 3 interpreter?", lines[-11:])
    if missing:
        return WorkerCheck(False, f"Missing in {python}: {', '.join(failures.pip_name(m) for m in missing)}. "
                           f"{failures.PACKAGES_HINT}", lines)
    summary = (f"OK: Python {info.get('python', '?').split()[0]}, torch {info.get('torch')}, "
               f"diffusers {info.get('diffusers')}, GPU: {info.get('cuda')}")
    warnings = []
    prep = info.get("reference-prep", "ok").strip()
    if prep != "ok":
        warnings.append(f"Reference preparation will not work: {prep} (Or turn off Reference Preparation in the "
                        "Portrait 3D panel.)")
    return WorkerCheck(True, summary, lines, warnings)


def finish_worker_check(python: str | os.PathLike, cmd: "BackgroundCommand", timeout: float) -> WorkerCheck:
    """The verdict of a started check that ended, or (still running after ``timeout`` s) is stopped now."""
    returncode = cmd.poll()
    if returncode is None:
        cmd.kill()
        return WorkerCheck(False, f"{python} did not finish the check within {timeout:.0f} s.", cmd.tail(3))
    return worker_check_result(python, returncode, list(cmd.lines))


def check_worker_python(python: str | os.PathLike, timeout: float = CHECK_TIMEOUT) -> WorkerCheck:
    """Import torch and diffusers in ``python`` (blocking); versions and CUDA device in plain words."""
    try:
        cmd = start_worker_check(python)
    except WorkerStartError as exc:
        return WorkerCheck(False, str(exc), [])
    cmd.wait(timeout)
    return finish_worker_check(python, cmd, timeout)


class BackgroundCommand:
    """``<python> args...`` running in the background with the worker's environment; output lines kept."""

    def __init__(self, python: str | os.PathLike, args: Sequence[str], *,
                 core_parent: str | os.PathLike = CORE_PARENT) -> None:
        self.python = resolve_worker_python(python)
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP)
        self.started_at = time.monotonic()
        kwargs = popen_kwargs()
        kwargs["stderr"] = subprocess.STDOUT
        try:
            self.proc = subprocess.Popen([str(self.python), *args], cwd=str(core_parent),
                                         env=worker_env(core_parent), **kwargs)
        except OSError as exc:
            raise WorkerStartError(f"Cannot run {self.python}: {exc.strerror or exc}.") from None
        self._thread = threading.Thread(target=self._read, name="dp3d-command-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self.proc.stdout:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self._thread.join(timeout=2.0)
        return rc

    def tail(self, n: int = 5) -> list[str]:
        return [line for line in list(self.lines) if line.strip()][-n:]

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
