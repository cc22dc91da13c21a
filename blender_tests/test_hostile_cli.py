"""Hostile arguments for ``blender -c portrait3d`` (``job_runner.cli_main``): one plain error, before any work.

Every case asserts: exit code 1, exactly one ``portrait3d: error:`` line, no exception class name, ``Errno`` or
traceback in the output, no condition image rendered and no worker started, nothing written into ``--out``
(no dataset.json, no .job/) and no file changed anywhere else under the test's folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import venv
from pathlib import Path

import bpy
import pytest
from PIL import Image

import addon
from addon import job_runner, worker_process
from blender_tests.helpers import PORTRAIT, fake_model_folder, fake_worker_python
from dp3d_core import job as jobspec
from dp3d_core import preflight

RAW_TEXT = re.compile(r"\b\w*(Error|Exception)\b|Errno|Traceback|\bFile \"")


@pytest.fixture
def cli(empty_scene, tmp_path, monkeypatch, capsys):
    """Runs cli_main with a working (fake) worker Python and model unless the case overrides them."""
    monkeypatch.delenv("PORTRAIT3D_WORKER_PYTHON", raising=False)
    addon.register()
    base = {
        "--out": str(tmp_path / "out"),
        "--reference": str(PORTRAIT),
        "--frames": "4",
        "--size": "64",
        "--steps": "1",
        "--model": str(fake_model_folder(tmp_path / "model")),
        "--worker-python": str(fake_worker_python(tmp_path / "py", "exit 7")),
    }

    def run(**overrides: str | None) -> str:
        args = dict(base)
        for key, value in overrides.items():
            flag = "--" + key.replace("_", "-")
            if value is None:
                args.pop(flag, None)
            else:
                args[flag] = value
        argv = [x for k, v in args.items() for x in (k, v)]
        before = snapshot(tmp_path)
        capsys.readouterr()
        rc = job_runner.cli_main(argv)
        out = capsys.readouterr().out
        assert rc == 1, out
        errors = [line for line in out.splitlines() if line.startswith("portrait3d: error:")]
        assert len(errors) == 1, out
        assert not RAW_TEXT.search(out), out
        assert "worker started" not in out and not job_runner.is_running()
        produced = Path(args["--out"])
        assert not (produced / "dataset.json").exists() and not (produced / ".job").exists()
        assert snapshot(tmp_path) == before, sorted(set(snapshot(tmp_path).items()) ^ set(before.items()))
        return errors[0]
    yield run
    job_runner.stop_all()
    addon.unregister()


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Files under ``root`` with (size, mtime_ns); folders with (0, 0) (a probe file changes their mtime only)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (0, 0)
        for name in filenames:
            st = (Path(dirpath) / name).lstat()
            out[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bare venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    return folder / "bin" / "python"


# ---------------------------------------------------------------- arguments and limits


def test_frames_beyond_the_limit(cli):
    msg = cli(frames="100000")
    assert "100000" in msg and str(jobspec.MAX_FRAMES) in msg and "Split" in msg


@pytest.mark.parametrize("flag, value, expected", [
    ("size", "100", "multiple of 64"),
    ("size", "100000", "between 16 and 2048"),
    ("steps", "0", "--steps must be between 1 and 1000"),
    ("device", "tpu", "--device must be auto, cuda, mps or cpu"),
    ("memory", "huge", "--memory must be normal, low or lowest"),
    ("yaw_range", "720", "--yaw-range"),
    ("pitch", "95", "--pitch"),
    ("frames", "0", "at least 1"),
])
def test_bad_numbers_and_choices(cli, flag, value, expected):
    assert expected in cli(**{flag: value})


# ---------------------------------------------------------------- the worker Python


def test_bin_false_as_the_worker_python(cli):
    msg = cli(worker_python="/bin/false")
    assert "/bin/false is not a Python interpreter" in msg and "printed nothing" in msg


def test_a_non_python_executable(cli, tmp_path):
    liar = fake_worker_python(tmp_path / "liar", "echo hello").parent / "liar"
    liar.write_text("#!/bin/sh\necho 'I am not python'\n")
    liar.chmod(0o755)
    msg = cli(worker_python=str(liar))
    assert "is not a Python interpreter" in msg and "I am not python" in msg


def test_a_python_without_torch(cli, bare_python):
    msg = cli(worker_python=str(bare_python))
    assert "lacks torch, diffusers" in msg and "pip install" in msg


def test_a_missing_worker_python(cli, tmp_path):
    assert "Worker Python not found" in cli(worker_python=str(tmp_path / "nowhere" / "python"))


def test_a_text_file_as_the_worker_python(cli, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("just text")
    notes.chmod(0o644)
    assert "is not executable" in cli(worker_python=str(notes))


def test_an_executable_without_shebang(cli, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01\x02 not a program")
    blob.chmod(0o755)
    assert "is not a Python interpreter" in cli(worker_python=str(blob))


# ---------------------------------------------------------------- the reference portrait


def test_reference_is_a_folder(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    msg = cli(reference=str(tmp_path / "photos"))
    assert "is a folder, not an image file" in msg and "not found" not in msg


def test_reference_is_missing(cli, tmp_path):
    assert "Reference portrait not found" in cli(reference=str(tmp_path / "nope.png"))


def test_reference_is_text(cli, tmp_path):
    (tmp_path / "face.png").write_text("not an image")
    assert "not an image the worker can read" in cli(reference=str(tmp_path / "face.png"))


def test_reference_too_small(cli, tmp_path):
    Image.new("RGB", (40, 90)).save(tmp_path / "small.png")
    assert "40x90" in cli(reference=str(tmp_path / "small.png"))


def test_reference_in_a_format_the_worker_cannot_read(cli, tmp_path):
    (tmp_path / "face.exr").write_bytes(b"\x76\x2f\x31\x01" + b"\0" * 200)
    assert "not an image the worker can read" in cli(reference=str(tmp_path / "face.exr"))


# ---------------------------------------------------------------- the output folder


def test_out_under_a_file(cli, tmp_path):
    (tmp_path / "blocker").write_text("x")
    msg = cli(out=str(tmp_path / "blocker" / "deeper" / "out"))
    assert "Cannot write to the output folder" in msg and "is a file, not a folder" in msg


@pytest.mark.parametrize("target", ["loop", "nowhere"])
def test_out_through_a_broken_or_looping_link(cli, tmp_path, target):
    (tmp_path / "link").symlink_to(tmp_path / ("link" if target == "loop" else "nowhere"))
    assert "symbolic link that leads nowhere" in cli(out=str(tmp_path / "link" / "out"))


def test_out_is_a_file(cli, tmp_path):
    (tmp_path / "out.png").write_text("x")
    assert "is a file, not a folder" in cli(out=str(tmp_path / "out.png"))


def test_out_with_a_folder_where_a_frame_goes(cli, tmp_path):
    (tmp_path / "out" / "frame_0003.png").mkdir(parents=True)
    msg = cli()
    assert "frame_0003.png is a folder" in msg


def test_out_path_too_long(cli, tmp_path):
    deep = tmp_path / ("d" * 250) / ("e" * 250)
    msg = cli(out=str(deep / ("f" * 300)))
    assert "too long" in msg.lower()


def test_disk_full(cli, monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    msg = cli()
    assert "Not enough free disk space for 4 frames" in msg


# ---------------------------------------------------------------- the model and conditions


def test_model_missing(cli, tmp_path):
    assert "Model folder not found" in cli(model=str(tmp_path / "no model"))


def test_model_with_pickled_weights(cli, tmp_path):
    model = tmp_path / "model"
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    msg = cli()
    assert "pickled weights" in msg and "python -m dp3d_core.convert_pickles" in msg


def test_model_with_another_clip_length(cli, tmp_path):
    (tmp_path / "model" / "view_modules" / "config.json").write_text(json.dumps({"clip_length": 16}))
    assert "exactly 16 views" in cli()


def test_conditions_folder_missing(cli, tmp_path):
    assert "is not a folder of condition images" in cli(conditions=str(tmp_path / "none"))


def test_conditions_folder_with_too_few_images(cli, tmp_path):
    (tmp_path / "conds").mkdir()
    shutil.copy(PORTRAIT, tmp_path / "conds" / "a.png")
    assert "has 1 image(s) but the frame range has 4 frames" in cli(conditions=str(tmp_path / "conds"))


def test_conditions_folder_with_a_broken_image(cli, tmp_path):
    conds = tmp_path / "conds"
    conds.mkdir()
    for i in range(4):
        shutil.copy(PORTRAIT, conds / f"c{i}.png")
    (conds / "c2.png").write_bytes(b"\x89PNG broken")
    assert "c2.png" in cli(conditions=str(conds))


# ---------------------------------------------------------------- the quick worker Python check is cached


def test_probe_is_cached_by_path_and_mtime(tmp_path):
    counter = tmp_path / "calls"
    py = tmp_path / "py" / "python"
    py.parent.mkdir()
    py.write_text(f'#!/bin/sh\necho x >> "{counter}"\necho "dp3d-probe-version 3.11.0"\n'
                  'echo "dp3d-probe-missing -"\n')
    py.chmod(0o755)
    assert worker_process.probe_worker_python(py) == "3.11.0"
    assert worker_process.probe_worker_python(py) == "3.11.0"
    assert counter.read_text().count("x") == 1
    os.utime(py, (1, 1))  # a changed interpreter is checked again
    worker_process.probe_worker_python(py)
    assert counter.read_text().count("x") == 2
    # a venv's python is a link to a shared interpreter: another link to it is another environment
    (tmp_path / "venv2").mkdir()
    (tmp_path / "venv2" / "python").symlink_to(py)
    worker_process.probe_worker_python(tmp_path / "venv2" / "python")
    assert counter.read_text().count("x") == 3


# ---------------------------------------------------------------- the panel's Generate runs the same checks


@pytest.fixture
def panel(empty_scene, tmp_path, monkeypatch):
    from blender_tests.helpers import setup_generation_scene

    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "py", "exit 7")))
    addon.register()
    setup_generation_scene(empty_scene, out=tmp_path / "out", model=fake_model_folder(tmp_path / "model"),
                           frames=4)
    yield empty_scene.portrait3d
    job_runner.stop_all()
    addon.unregister()


def _generate_refused(tmp_path: Path) -> str:
    before = snapshot(tmp_path)
    with pytest.raises(job_runner.JobRunError) as info:
        job_runner.start_generation(bpy.context)
    message = str(info.value)
    assert not RAW_TEXT.search(message), message
    assert not job_runner.is_running()
    assert snapshot(tmp_path) == before
    return message


def test_panel_huge_frame_range_is_refused_before_the_poses(panel, tmp_path):
    panel.use_scene_range = False
    panel.frame_start, panel.frame_end = 1, 1_000_000
    msg = _generate_refused(tmp_path)
    assert "1000000 frames" in msg and str(jobspec.MAX_FRAMES) in msg


def test_panel_window_and_pickles_are_checked_before_rendering(panel, tmp_path):
    (tmp_path / "model" / "view_modules" / "config.json").write_text(json.dumps({"clip_length": 4}))
    assert "exactly 4 views" in _generate_refused(tmp_path)
    (tmp_path / "model" / "view_modules" / "config.json").write_text("{}")
    (tmp_path / "model" / "vae" / "diffusion_pytorch_model.ckpt").write_bytes(b"\x80\x04pickle")
    assert "pickled weights" in _generate_refused(tmp_path)


def test_panel_bin_false_worker(panel, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", "/bin/false")
    assert "is not a Python interpreter" in _generate_refused(tmp_path)
    p = bpy.context.window_manager.portrait3d_progress
    assert "/bin/false" in p.last_error and not p.running


def test_probe_says_too_old_and_times_out(tmp_path):
    """An old Python still prints its version first (the probe's first line runs on Python 2 too)."""
    old = tmp_path / "old" / "python"
    old.parent.mkdir()
    old.write_text('#!/bin/sh\necho "dp3d-probe-version 2.7.18"\nexit 1\n')
    old.chmod(0o755)
    with pytest.raises(worker_process.WorkerStartError, match="is Python 2.7.18; the worker needs Python 3.10"):
        worker_process.probe_worker_python(old)
    slow = tmp_path / "slow" / "python"
    slow.parent.mkdir()
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(worker_process.WorkerStartError, match="did not answer within 1 s"):
        worker_process.probe_worker_python(slow, timeout=1)
