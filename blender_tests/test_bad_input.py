"""Bad input to Generate: each case gives a plain message (or works, where it must)."""
from __future__ import annotations

import shutil
from pathlib import Path
import sys
import time
import venv

import bpy
import pytest
from PIL import Image

import addon
from addon import job_runner, job_writer, reference_check, worker_process
from addon.worker_process import diagnose
from blender_tests.helpers import PORTRAIT, fake_model_folder, fake_worker_python, op_error, setup_generation_scene
from dp3d_core import job as jobspec


@pytest.fixture
def scene(empty_scene, monkeypatch, tmp_path):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "fake python")))
    addon.register()
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


@pytest.fixture
def ready(scene, tmp_path):
    """A scene that passes every check (image-folder conditions, a model folder with configs only)."""
    return setup_generation_scene(scene, out=tmp_path / "out", model=fake_model_folder(tmp_path / "model"),
                                  source="IMAGE_FOLDER")


def generate_error() -> str:
    return op_error(bpy.ops.portrait3d.generate)


def prepare():
    return job_writer.prepare_job(bpy.context)


# ---------------------------------------------------------------- scene


def test_no_camera(ready):
    camera = bpy.context.scene.camera
    bpy.data.objects.remove(camera, do_unlink=True)
    assert "No camera" in generate_error()


def test_static_camera_over_several_frames_is_refused(ready):
    scene = bpy.context.scene
    orbit = scene.camera.parent
    orbit.animation_data_clear()
    assert "does not move over frames 1-8" in generate_error()


def test_static_camera_single_frame_is_fine_and_says_so(ready):
    scene = bpy.context.scene
    scene.camera.parent.animation_data_clear()
    scene.frame_end = scene.frame_start
    prepared = prepare()
    assert len(prepared.job.frames) == 1
    assert any("One frame" in n and "single view" in n for n in prepared.notes)


def test_empty_frame_range(ready):
    s = bpy.context.scene.portrait3d
    s.use_scene_range = False
    s.frame_start, s.frame_end = 10, 4
    assert "frame range 10-4 is empty" in generate_error()


def test_output_size_not_multiple_of_64(ready):
    bpy.context.scene.portrait3d.output_size = 100
    assert "multiple of 64" in generate_error() and "use 128" in generate_error()


def test_output_folder_not_writable(ready, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    bpy.context.scene.portrait3d.output_folder = str(blocker / "out")  # a folder inside a file cannot exist
    msg = generate_error()
    assert "Cannot write to the output folder" in msg and "is a file, not a folder" in msg


def test_condition_folder_with_too_few_images(ready, tmp_path):
    folder = tmp_path / "conds"
    folder.mkdir()
    for i in range(3):
        shutil.copy(PORTRAIT, folder / f"c{i}.png")
    bpy.context.scene.portrait3d.condition_folder = str(folder)
    msg = generate_error()
    assert "has 3 image(s) but the frame range has 8 frames" in msg


def test_path_with_spaces_and_non_ascii_works(ready, tmp_path):
    odd = tmp_path / "my photos ö" / "portrait ü 1.png"
    odd.parent.mkdir()
    shutil.copy(PORTRAIT, odd)
    s = bpy.context.scene.portrait3d
    s.reference_image = str(odd)
    s.output_folder = str(tmp_path / "sortie été" / "")
    prepared = prepare()
    job = jobspec.read_job(prepared.job_dir)
    assert job.references == [str(odd.resolve())]
    assert (tmp_path / "sortie été" / ".job" / "job.json").is_file()



def test_memory_and_compile_reach_the_job(ready):
    s = bpy.context.scene.portrait3d
    job = jobspec.read_job(prepare().job_dir)
    assert (job.memory, job.compile) == ("normal", False)
    s.memory, s.use_compile = 'LOWEST', True
    job = jobspec.read_job(prepare().job_dir)
    assert (job.memory, job.compile) == ("lowest", True)


def test_proxy_views_reach_the_job(ready):
    """3D-Aware Noise: one proxy view per frame in the job for rendered conditions; for an image-folder source
    (no proxy head) a warning and no proxies."""
    s = bpy.context.scene.portrait3d
    s.use_proxy_views = True
    prepared = prepare()
    assert any("3D-Aware Noise needs a proxy head" in w for w in prepared.warnings)
    assert all(f.proxy is None for f in prepared.job.frames)
    s.condition_source = 'PROCEDURAL'
    job_dir = prepare().job_dir
    job = jobspec.read_job(job_dir).resolve(job_dir)
    assert job.frames and all(f.proxy for f in job.frames)
    assert all(Path(f.proxy).is_file() and f.proxy != f.condition for f in job.frames)


def test_cli_memory_is_checked(ready, tmp_path):
    with pytest.raises(job_runner.JobRunError, match="--memory must be normal, low or lowest"):
        job_runner.run_turntable_job(tmp_path / "cli", frames=2, memory="huge", generate=False)


# ---------------------------------------------------------------- reference portrait


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.png", "Reference portrait not found"),
    (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "not an image Blender can read"),
    (lambda d: Image.new("RGB", (40, 80)).save(d / "tiny.png") or d / "tiny.png", "needs at least 64 px"),
    (lambda d: d, "is a folder"),
])
def test_reference_refused(ready, tmp_path, make, expected):
    bpy.context.scene.portrait3d.reference_image = str(make(tmp_path))
    assert expected in generate_error()


def test_no_reference(ready):
    bpy.context.scene.portrait3d.reference_image = ""
    assert "No reference portrait" in generate_error()


@pytest.mark.parametrize("mode, note", [("I;16", "High bit-depth"), ("RGBA", "transparency"),
                                        ("L", "Grayscale"), ("LA", "transparency")])
def test_reference_converted_with_a_note(tmp_path, empty_scene, mode, note):
    path = tmp_path / f"ref {mode.replace(';', '')}.png"
    Image.new(mode, (96, 80)).save(path)
    info = reference_check.check_reference(path)
    assert (info.width, info.height) == (96, 80)
    assert any(note in n for n in info.notes), info.notes
    assert any("centre square" in n for n in info.notes)
    assert not bpy.data.images  # the check leaves nothing behind in the file


def test_huge_reference_is_a_warning_not_an_error(tmp_path, empty_scene):
    path = tmp_path / "huge.png"
    Image.new("RGB", (7680, 4320), (120, 100, 90)).save(path, compress_level=1)  # "8K UHD"
    info = reference_check.check_reference(path)
    assert (info.width, info.height) == (7680, 4320)
    assert any("downscaled" in w for w in info.warnings)
    jpg = tmp_path / "huge.jpg"
    Image.new("RGB", (5000, 4200), (120, 100, 90)).save(jpg, quality=20)
    info = reference_check.check_reference(jpg)
    assert (info.width, info.height) == (5000, 4200) and info.warnings


# ---------------------------------------------------------------- model folder


def test_model_folder_missing(ready, tmp_path):
    bpy.context.scene.portrait3d.model_folder = str(tmp_path / "no model")
    assert "Model folder not found" in generate_error()


def test_model_folder_incomplete(ready, tmp_path):
    model = fake_model_folder(tmp_path / "partial")
    shutil.rmtree(model / "vae")
    shutil.rmtree(model / "view_modules")
    bpy.context.scene.portrait3d.model_folder = str(model)
    msg = generate_error()
    assert "incomplete" in msg and "view_modules, vae" in msg
    (model / "model_index.json").unlink()
    assert "no model_index.json" in generate_error()


# ---------------------------------------------------------------- worker Python


def test_worker_python_unset(ready, monkeypatch):
    monkeypatch.delenv("PORTRAIT3D_WORKER_PYTHON")
    msg = generate_error()
    assert "No worker Python set" in msg and "Set Up Worker" in msg


def test_worker_python_missing(ready, monkeypatch, tmp_path):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(tmp_path / "nowhere" / "python3"))
    assert "Worker Python not found" in generate_error()


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A real Python without torch, numpy or anything else (a fresh venv without site packages)."""
    folder = tmp_path_factory.mktemp("bare venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    return folder / "bin" / "python"


def test_worker_python_without_torch_fails_with_hint(ready, monkeypatch, bare_python):
    """Found by the quick worker Python check, before anything is rendered or written."""
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(bare_python))
    with pytest.raises(job_runner.JobRunError, match="lacks torch, diffusers"):
        job_runner.start_generation(bpy.context)
    p = bpy.context.window_manager.portrait3d_progress
    assert not p.running and not job_runner.is_running()
    assert "lacks torch" in p.last_error and "pip install torch diffusers" in p.last_error
    assert not (Path(bpy.context.scene.portrait3d.output_folder) / ".job").exists()


def test_check_worker_button(scene, bare_python):
    assert bpy.ops.portrait3d.check_worker.poll()
    msg = op_error(bpy.ops.portrait3d.check_worker, python=str(bare_python))
    assert "Missing in" in msg and "torch" in msg and "diffusers" in msg
    result = worker_process.check_worker_python(sys.executable)
    assert result.ok, result.summary
    assert "torch" in result.summary and "GPU: none (CPU only)" in result.summary



def test_worker_check_in_the_background():
    """The UI runs the check without blocking: start, poll, then the same verdict as the blocking check."""
    cmd = worker_process.start_worker_check(sys.executable)
    assert cmd.wait(worker_process.CHECK_TIMEOUT) == 0
    result = worker_process.worker_check_result(sys.executable, 0, list(cmd.lines))
    assert result.ok and "GPU: none (CPU only)" in result.summary
    late = worker_process.check_worker_python(sys.executable, timeout=0.01)
    assert not late.ok and "did not finish the check within" in late.summary


def test_worker_warning_shows_as_the_status(tmp_path):
    """A warning the worker sends before its first step (e.g. 'compiling the networks') is the status text
    until progress arrives, so a long first step is explained in the panel."""
    from dp3d_core import protocol

    started = protocol.encode_event("started", job_hash="x", frames_total=2, frames_done=0)
    warning = protocol.encode_event("warning", message="compiling the networks")
    fake = fake_worker_python(tmp_path / "py", f"echo '{started}'\necho '{warning}'\nexec sleep 30")
    worker = worker_process.WorkerProcess(tmp_path / "job", fake)
    try:
        deadline = time.monotonic() + 20
        while worker.status.message != "compiling the networks" and time.monotonic() < deadline:
            worker.poll()
            time.sleep(0.05)
        assert worker.status.message == "compiling the networks"
        assert worker.status.warnings == ["compiling the networks"]
    finally:
        worker.kill()


def test_diagnose_plain_words():
    msg, hint = diagnose(1, ["Traceback ...", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"])
    assert "GPU ran out of memory" in msg and "Output Size" in hint
    msg, hint = diagnose(-9, [])
    assert "SIGKILL" in msg and "not recomputed" in hint
    msg, _ = diagnose(1, ["ModuleNotFoundError: No module named 'diffusers'"])
    assert "'diffusers'" in msg


# ---------------------------------------------------------------- one run at a time


def test_second_generate_while_one_runs(ready):
    run = job_runner.start_generation(bpy.context)  # the fake worker just sleeps
    assert job_runner.is_running() and bpy.context.window_manager.portrait3d_progress.running
    assert not bpy.ops.portrait3d.generate.poll()
    with pytest.raises(RuntimeError, match="already running"):
        bpy.ops.portrait3d.generate()
    with pytest.raises(job_runner.JobRunError, match="already running"):
        job_runner.start_generation(bpy.context)
    # Cancel: the cancel file first, then terminate after the grace period (shortened here).
    run.worker.cancel_grace = 0.2
    assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
    assert (run.prepared.job_dir / "cancel").is_file()
    started = time.monotonic()
    status = job_runner.wait(run, bpy.context, timeout=20)
    assert status.state == "cancelled" and time.monotonic() - started < 10
    assert not job_runner.is_running()
    assert not bpy.context.window_manager.portrait3d_progress.running


def test_a_reference_the_worker_would_refuse_as_too_big_is_refused_here(tmp_path, empty_scene):
    """Only the header is read: a 200 MP PNG (say) is refused before any work, in one sentence."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 16320, 12240, 8, 2, 0, 0, 0)
    path = tmp_path / "200mp.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr +
                     struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    with pytest.raises(reference_check.ReferenceImageError, match="200mp.png is 16320x12240 px, more pixels than "
                                                                  "the worker decodes safely as PNG"):
        reference_check.check_reference(path)
    assert not bpy.data.images
