"""One translation table from raw failures to plain words (stdlib only: Blender and the worker both use it).

Every failure a user can meet becomes a :class:`Failure`: one sentence of what happened, one sentence of what
to do, and the path of a log file holding the raw text and the traceback (written by :func:`write_log`). The
user never sees an exception class name or an ``[Errno N]``; the log keeps them for a bug report.

:func:`translate` covers out of memory (CPU and every GPU backend torch has), a full disk, permission denied,
a path through a file, a folder where a file belongs, a name too long for the file system, a read-only file
system, JSON nested too deeply, a missing package, torch.compile failures and our own input errors;
:func:`worker_python_failure` covers a worker Python that is not Python or lacks a package.
"""
from __future__ import annotations

import datetime
import errno
import os
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

LOG_DIR_ENV = "PORTRAIT3D_LOG_DIR"
MAX_TEXT = 300  # characters of a path or value quoted in a message
PACKAGES = ("torch", "diffusers", "safetensors", "PIL", "numpy")


def pip_name(module: str) -> str:
    """The name pip installs a top-level module under (``PIL`` -> ``pillow``)."""
    return {"PIL": "pillow"}.get(module, module)

PACKAGES_HINT = ("Press Set Up Worker in Preferences > Add-ons > Portrait 3D (it makes a complete worker environment), "
                 "or install them into that Python (`<python> -m pip install torch diffusers safetensors pillow "
                 "numpy`).")


@dataclass(frozen=True)
class Failure:
    """What happened (one sentence), what to do (one sentence), and where the raw details are."""

    message: str
    hint: str
    log: str | None = None

    def with_log(self, log: str | os.PathLike | None) -> "Failure":
        return replace(self, log=None if log is None else str(log))

    @property
    def hint_with_log(self) -> str:
        """The hint, plus where the details are when there is a log."""
        return f"{self.hint} Details: {self.log}" if self.log else self.hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint_with_log}"


def clip(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` shortened in the middle to at most ``limit`` characters (a 10 MB value never reaches the UI)."""
    s = str(text)
    if len(s) <= limit:
        return s
    keep = (limit - 5) // 2
    return f"{s[:keep]} ... {s[-keep:]}"


def _path_of(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else exc.filename2
    return clip(os.fsdecode(name)) if name is not None else "a file"


# ---------------------------------------------------------------- the table

def oom_backend(text: str) -> str | None:
    """The device whose allocator said 'out of memory' in ``text``, or None."""
    low = text.lower()
    if "mps backend out of memory" in low:
        return "mps"
    if "hip out of memory" in low or "hipErrorOutOfMemory".lower() in low:
        return "rocm"
    if "xpu out of memory" in low:
        return "xpu"
    if "cuda out of memory" in low or "cuda error: out of memory" in low or "cublas_status_alloc_failed" in low:
        return "cuda"
    if "defaultcpuallocator" in low or "can't allocate memory" in low or "not enough memory" in low:
        return "cpu"
    if "out of memory" in low:
        return "gpu"
    return None


_OOM = {
    "cuda": ("The GPU ran out of memory.",
             "Set GPU Memory to Low or Lowest, lower the Output Size, or close other programs that use the GPU."),
    "rocm": ("The AMD GPU ran out of memory.",
             "Set GPU Memory to Low or Lowest, lower the Output Size, or close other programs that use the GPU."),
    "xpu": ("The Intel GPU ran out of memory.",
            "Set GPU Memory to Low or Lowest, lower the Output Size, or close other programs that use the GPU."),
    "mps": ("The Apple GPU (Metal) ran out of memory.",
            "Set GPU Memory to Low or Lowest, lower the Output Size, or set Device to CPU."),
    "gpu": ("The GPU ran out of memory.",
            "Set GPU Memory to Low or Lowest, lower the Output Size, or close other programs that use the GPU."),
    "cpu": ("The computer ran out of memory (RAM).",
            "Lower the Output Size or the number of frames, or close other programs, and run it again."),
}


def out_of_memory(text: str) -> Failure | None:
    """The out-of-memory Failure for an allocator's raw text (any backend), or None when it is not one."""
    backend = oom_backend(text)
    return None if backend is None else Failure(*_OOM[backend])


def _os_failure(exc: OSError) -> Failure | None:
    where = _path_of(exc)
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return Failure(f"The disk is full (writing {where}).",
                       "Free space on that disk or choose an output folder on another disk, then run it again.")
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        return Failure(f"Permission denied for {where}.",
                       "Choose a folder you can write to, or change that folder's permissions.")
    if code == errno.EROFS:
        return Failure(f"{where} is on a read-only file system.", "Choose an output folder on a writable disk.")
    if code == errno.ENOTDIR or isinstance(exc, NotADirectoryError):
        return Failure(f"A part of the path {where} is a file, not a folder.",
                       "Choose an output folder whose parent folders are all folders (or remove the file).")
    if code == errno.EISDIR or isinstance(exc, IsADirectoryError):
        return Failure(f"{where} is a folder where a file must go.",
                       "Remove or rename that folder, or change the frame name pattern.")
    if code == errno.ENAMETOOLONG:
        return Failure(f"A file name is too long for the file system: {where}.",
                       "Use a shorter output folder path or frame name pattern.")
    if code == errno.ELOOP:
        return Failure(f"The path {where} goes round in a loop of symbolic links.",
                       "Choose a folder whose path does not pass through that link loop.")
    if code == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return Failure(f"{where} does not exist.", "Check the path, or export the job again from the add-on.")
    if code == errno.ENOMEM:
        return Failure(*_OOM["cpu"])
    return None


def translate(exc: BaseException) -> Failure:
    """The plain-words :class:`Failure` for ``exc`` (no log yet: see :func:`write_log`)."""
    text = str(exc).strip()
    first = clip(text.splitlines()[0] if text else "")
    if isinstance(exc, MemoryError):
        return Failure(*_OOM["cpu"])
    backend = oom_backend(text) if (isinstance(exc, RuntimeError) or "OutOfMemory" in type(exc).__name__) else None
    if backend is not None:
        return Failure(*_OOM[backend])
    if isinstance(exc, RuntimeError) and text.startswith("Symlink loop from"):  # pathlib.resolve, Python < 3.13
        return Failure(f"The path {clip(text[len('Symlink loop from '):].strip(chr(39)))} goes round in a loop of "
                       "symbolic links.", "Choose a folder whose path does not pass through that link loop.")
    if isinstance(exc, RecursionError):
        return Failure("A file is nested too deeply to read (JSON inside JSON thousands of levels deep).",
                       "Export the job again from the add-on instead of using this file.")
    if isinstance(exc, OSError):
        failure = _os_failure(exc)
        if failure is not None:
            return failure
    if isinstance(exc, ModuleNotFoundError):
        name = pip_name((exc.name or "a package").split(".")[0])
        return Failure(f"The worker Python lacks the package '{name}'.", PACKAGES_HINT)
    module = type(exc).__module__
    if module.startswith(("torch._dynamo", "torch._inductor")):
        return Failure("Compiling the networks (torch.compile) failed.",
                       "Turn Compile off for this job (compiling needs a C compiler, and triton on CUDA).")
    if isinstance(exc, ValueError) and module.startswith("dp3d_core") and first:
        # our own input errors (PipelineError, SchedulerError, ModelInputError) already say what is wrong
        return Failure(first if first.endswith(".") else first + ".",
                       "Change the job's settings as the message says and run it again.")
    if isinstance(exc, KeyboardInterrupt):
        return Failure("The worker was interrupted.",
                       "Run the job again: it continues from its last saved denoising step.")
    return Failure("The worker failed unexpectedly.",
                   "Run it again; if it fails the same way, report it with the log file.")


# ---------------------------------------------------------------- the worker Python

def worker_python_failure(kind: str, python: str | os.PathLike, detail: str = "") -> Failure:
    """A worker Python that cannot run the worker. ``kind``: not_python, too_old, missing, timeout, no_run."""
    p = clip(python)
    if kind == "missing":
        return Failure(f"The worker Python {p} lacks {detail}.", PACKAGES_HINT)
    if kind == "too_old":
        return Failure(f"The worker Python {p} is {detail or 'too old'}; the worker needs Python 3.10 or newer.",
                       "Pick a Python 3.10+ with torch and diffusers as Worker Python.")
    if kind == "timeout":
        return Failure(f"The worker Python {p} did not answer within {detail} s.",
                       "Check that it is a working Python (run it once in a terminal), or pick another one.")
    if kind == "no_run":
        return Failure(f"The worker Python {p} cannot be started ({detail}).",
                       "Point Worker Python at a python executable with torch and diffusers.")
    return Failure(f"The worker Python {p} is not a Python interpreter{f' ({detail})' if detail else ''}.",
                   "Point Worker Python at the python executable of an environment with torch and diffusers, or "
                   "press Set Up Worker in Preferences > Add-ons > Portrait 3D to make one.")


# ---------------------------------------------------------------- log files

def log_dir() -> Path:
    """Where logs go when the job folder cannot take one: $PORTRAIT3D_LOG_DIR, else the temp folder."""
    env = os.environ.get(LOG_DIR_ENV, "").strip()
    return Path(env) if env else Path(tempfile.gettempdir()) / "portrait3d-logs"


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def write_log(candidates: Iterable[str | os.PathLike], text: str, name: str = "worker.log") -> Path | None:
    """Write ``text`` (with a time stamp) to the first candidate file that can be written, else to
    :func:`log_dir`; the path written, or None when nothing could be written (never raises)."""
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    body = f"{stamp}\n{text.rstrip()}\n"
    fallback = log_dir() / f"{Path(name).stem}-{os.getpid()}-{datetime.datetime.now():%Y%m%d-%H%M%S}.log"
    for path in [*map(Path, candidates), fallback]:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="utf-8", errors="replace")
            os.replace(tmp, path)
            return path
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
    return None


def report(exc: BaseException, log_candidates: Iterable[str | os.PathLike], context: str = "",
           name: str = "worker.log") -> Failure:
    """Translate ``exc`` and write its raw text + traceback to a log; the Failure names the log."""
    raw = (context + "\n" if context else "") + format_exception(exc)
    return translate(exc).with_log(write_log(log_candidates, raw, name))
