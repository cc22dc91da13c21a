"""Hostile jobs for ``python -m dp3d_core.worker``: each fails with one plain message, before any work.

Every case asserts: a non-zero exit code, exactly one ``error`` event and no ``progress`` event (no denoising
step ran), a message and hint without exception class names, ``Errno`` or a traceback, nothing written into the
output folder and no file changed anywhere else under the test's folder. Most cases run the worker's entry
(:func:`dp3d_core.worker.run`, what ``main`` runs after setting up its streams) in-process to stay fast on a
loaded machine; the ones marked ``subprocess`` run the real ``python -m dp3d_core.worker`` and also check its
exit status and stderr. Cases that need a full disk, a read-only folder as root, or a real out-of-memory go
through the same checks and translation table in-process.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core import failures, preflight, protocol
from dp3d_core.job import MAX_FRAMES, FrameSpec, GenerationSettings, Job, write_job
from dp3d_core.protocol import parse_event

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ROOT / "models" / "small"
LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]
RAW_TEXT = re.compile(r"\b\w*(Error|Exception|Interrupt)\b|Errno|Traceback|\bFile \"")


def plain(text: str) -> bool:
    return not RAW_TEXT.search(text)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns), every folder with (0, 0): the probe file the checks write
    and remove changes a folder's mtime, nothing else."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (0, 0)
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def make_job(root: Path, model: Path = SMALL_MODEL, frames: int = 3, **overrides) -> Path:
    """A valid 64-px job in ``root/job`` (images inside it, output ``root/out``); ``overrides`` edit job.json."""
    d = root / "job"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "ref.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "cond.png")
    specs = [FrameSpec(index=i, scene_frame=i + 1, label=list(LABEL), condition="cond.png") for i in range(frames)]
    write_job(Job(references=["ref.png"], frames=specs, model=str(model), output=str(root / "out"), device="cpu",
                  settings=GenerationSettings(steps=2, size=64)), d)
    if overrides:
        data = json.loads((d / "job.json").read_text())
        for key, value in overrides.items():
            target = data
            *parents, last = key.split(".")
            for part in parents:
                target = target[part]
            target[last] = value
        (d / "job.json").write_text(json.dumps(data))
    return d


def run_worker(job_dir: Path, timeout: float = 300):
    """The real worker process: (exit code, events, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "dp3d_core.worker", str(job_dir)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    events = [parse_event(line) for line in r.stdout.splitlines() if line.strip()]
    assert all(e is not None for e in events), r.stdout
    return r.returncode, events, r.stderr


def run_in_process(job_dir: Path):
    """``worker.run`` in this process: (exit code, events, '')."""
    from dp3d_core import worker

    stream = io.StringIO()
    rc = worker.run(Path(job_dir), worker.Emitter(stream))
    return rc, [parse_event(line) for line in stream.getvalue().splitlines()], ""


def assert_refused(root: Path, job_dir: Path, *expected: str, subprocess: bool = False) -> str:
    """Run the worker on ``job_dir``; assert the hostile-case contract; return message + hint."""
    before = snapshot(root)
    rc, events, stderr = (run_worker if subprocess else run_in_process)(job_dir)
    assert rc == protocol.EXIT_ERROR, (rc, events, stderr)
    errors = [e for e in events if e.kind == "error"]
    assert len(errors) == 1 and events[-1].kind == "error", events
    assert not [e for e in events if e.kind in ("progress", "frame")], "work started before the failure"
    text = f"{errors[0]['message']} {errors[0]['hint']}"
    assert plain(text), text
    assert len(text) < 1200, len(text)
    assert "Traceback" not in stderr, stderr[-2000:]
    for word in expected:
        assert word.lower() in text.lower(), (word, text)
    out = root / "out"
    assert not out.exists() or not [p for p in out.rglob("*")], list(out.rglob("*"))
    after = snapshot(root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    return text


def assert_refused_keeping_out(root: Path, job_dir: Path, *expected: str) -> None:
    """Like assert_refused for an output folder that already holds something: it is left exactly as it was."""
    before = snapshot(root)
    rc, events, _ = run_in_process(job_dir)
    assert rc == protocol.EXIT_ERROR and [e.kind for e in events] == ["error"], events
    text = f"{events[0]['message']} {events[0]['hint']}"
    assert plain(text), text
    for word in expected:
        assert word in text, (word, text)
    assert snapshot(root) == before


# ---------------------------------------------------------------- the output folder and frame names


def test_output_folder_under_a_file(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "blocker").write_text("x")
    data = json.loads((job / "job.json").read_text())
    data["output"] = str(tmp_path / "blocker" / "out")
    (job / "job.json").write_text(json.dumps(data))
    assert_refused(tmp_path, job, "is a file", "choose another output folder", subprocess=True)


def test_output_folder_through_a_symlink_loop(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    data = json.loads((job / "job.json").read_text())
    data["output"] = str(tmp_path / "loop" / "out")
    (job / "job.json").write_text(json.dumps(data))
    assert_refused(tmp_path, job, "loop of symbolic links", "output")


def test_output_folder_is_a_file(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "out").write_text("x")
    text = assert_refused(tmp_path, job, "is a file")
    assert (tmp_path / "out").read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders; the same path is covered in-process below")
def test_read_only_output_folder(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o555)
    try:
        assert_refused(tmp_path, job, "permission denied", subprocess=True)
    finally:
        (tmp_path / "out").chmod(0o755)


def test_frame_name_too_long_for_the_file_system(tmp_path):
    job = make_job(tmp_path, frame_pattern="é" * 120 + "_{index}.png")  # 120 chars, 240+ bytes
    assert_refused(tmp_path, job, "too long", "bytes", "shorter frame name pattern")


def test_ten_million_character_frame_pattern(tmp_path):
    job = make_job(tmp_path, frame_pattern="x" * 10_000_000 + "{index}.png")
    text = assert_refused(tmp_path, job, "frame_pattern", "at most 200", subprocess=True)
    assert len(text) < 600


@pytest.mark.parametrize("pattern", ["frame\n{index}.png", "frame\x00{index}.png", "../{index}.png"])
def test_frame_pattern_with_control_characters_or_folders(tmp_path, pattern):
    assert_refused(tmp_path, make_job(tmp_path, frame_pattern=pattern), "frame_pattern")


def test_frame_path_is_a_folder(tmp_path):
    job = make_job(tmp_path)
    (tmp_path / "out" / "frame_0002.png").mkdir(parents=True)
    assert_refused_keeping_out(tmp_path, job, "is a folder", "frame_0002.png")


# ---------------------------------------------------------------- the job file


def test_deeply_nested_job_json(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("[" * 200_000 + "]" * 200_000)
    assert_refused(tmp_path, job, "nested too deeply", subprocess=True)


def test_job_json_not_utf8(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_bytes(b"\xff\xfe{\x00")
    assert_refused(tmp_path, job, "not valid JSON")


def test_too_many_frames_names_the_limit(tmp_path):
    job = make_job(tmp_path)
    data = json.loads((job / "job.json").read_text())
    data["frames"] = [dict(data["frames"][0], index=i, scene_frame=i + 1) for i in range(MAX_FRAMES + 1)]
    (job / "job.json").write_text(json.dumps(data))
    assert_refused(tmp_path, job, str(MAX_FRAMES), str(MAX_FRAMES + 1), "split")


def test_job_folder_is_a_file(tmp_path):
    (tmp_path / "job").write_text("x")
    assert_refused(tmp_path, tmp_path / "job", "job.json")


@pytest.mark.parametrize("field, value, expected", [
    ("settings.steps", 10**9, "settings.steps"),
    ("settings.size", 4096, "settings.size"),
    ("settings.guidance", float("nan"), "settings.guidance"),
    ("device", "tpu", "device"),
    ("frames", [], "frames"),
    ("references", "", "references"),
])
def test_bad_fields_are_named(tmp_path, field, value, expected):
    job = make_job(tmp_path)
    data = json.loads((job / "job.json").read_text())
    target = data
    *parents, last = field.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    (job / "job.json").write_text(json.dumps(data))  # NaN is written as NaN, which json reads back
    assert_refused(tmp_path, job, expected)


# ---------------------------------------------------------------- the model


def test_window_other_than_the_models_clip_length(tmp_path):
    job = make_job(tmp_path, **{"settings.window": 6, "settings.overlap": 2})
    assert_refused(tmp_path, job, "window is 6", "exactly 8 views", "set the window to 8")


def test_pickled_weights_are_refused_with_the_conversion_command(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, model)
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 pickle stand-in")
    job = make_job(tmp_path, model=model)
    assert_refused(tmp_path, job, "pickled", "vae/", "python -m dp3d_core.convert_pickles", subprocess=True)


def test_damaged_safetensors_header(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    assert_refused(tmp_path, make_job(tmp_path, model=model), "damaged", "again")


def test_model_index_not_json(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, model)
    (model / "model_index.json").write_text("{ nope")
    assert_refused(tmp_path, make_job(tmp_path, model=model), "not valid JSON")


def test_model_folder_is_a_file(tmp_path):
    (tmp_path / "model").write_text("x")
    assert_refused(tmp_path, make_job(tmp_path, model=tmp_path / "model"), "does not exist")


# ---------------------------------------------------------------- images


def test_reference_is_a_folder(tmp_path):
    job = make_job(tmp_path)
    (job / "ref.png").unlink()
    (job / "ref.png").mkdir()
    assert_refused(tmp_path, job, "ref.png")


def test_truncated_condition_image(tmp_path):
    job = make_job(tmp_path)
    data = (job / "cond.png").read_bytes()
    (job / "cond.png").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, job, "cond.png")


def test_condition_image_that_is_text(tmp_path):
    job = make_job(tmp_path)
    (job / "cond.png").write_text("not a png")
    assert_refused(tmp_path, job, "cond.png", "not an image")


# ---------------------------------------------------------------- cancel lifecycle


def test_stale_cancel_file_is_ignored_with_a_warning(tmp_path):
    """A cancel left by a killed run is older than this run: warned about, removed, not honoured."""
    job = make_job(tmp_path, frames=1)
    cancel = job / protocol.CANCEL_FILE
    cancel.write_text("cancel\n")
    old = time.time() - 3600
    os.utime(cancel, (old, old))
    # a run that has nothing to denoise (its frame is finished) still reads the cancel file first
    from dp3d_core.job import job_hash, read_job
    j = read_job(job).resolve(job)
    digest = job_hash(j)
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (64, 64)).save(out / "frame_0001.png")
    import hashlib
    protocol.record_frame(out, "frame_0001.png", digest, 0, 1, hashlib.sha256((out / "frame_0001.png").read_bytes())
                          .hexdigest())
    rc, events, _ = run_in_process(job)
    assert rc == protocol.EXIT_OK, events
    warnings = [e["message"] for e in events if e.kind == "warning"]
    assert any("ignored a cancel request left over" in w for w in warnings), warnings
    assert not cancel.exists()


def test_fresh_cancel_is_honoured_before_loading_and_removed(tmp_path):
    """A cancel written while the worker starts (stamped later than its start) stops it before the model loads."""
    job = make_job(tmp_path)
    cancel = job / protocol.CANCEL_FILE
    cancel.write_text("cancel\n")
    later = time.time() + 30
    os.utime(cancel, (later, later))
    rc, events, _ = run_in_process(job)
    assert rc == protocol.EXIT_CANCELLED
    assert [e.kind for e in events] == ["started", "done"] and events[-1]["cancelled"] is True
    assert not (job / protocol.CANCEL_FILE).exists(), "an honoured cancel must not stop the next run"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- in-process: the translation table


@pytest.mark.parametrize("exc, expected", [
    (MemoryError(), "ran out of memory (RAM)"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: you tried "
                  "to allocate 10737418240 bytes."), "ran out of memory (RAM)"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU ran out of memory"),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "GPU ran out of memory"),
    (RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"), "AMD GPU ran out of memory"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB, other allocations: 0 bytes)"),
     "Apple GPU (Metal) ran out of memory"),
    (RuntimeError("XPU out of memory. Tried to allocate 3.00 GiB"), "Intel GPU ran out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/frame_0001.png"), "disk is full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/out/x.png"), "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), "Permission denied for /out"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/out"), "is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/out/frame_0001.png"), "is a folder where a file"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/out/" + "x" * 5000), "too long"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro"), "read-only"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/a/loop/out"), "loop of symbolic links"),
    (RuntimeError("Symlink loop from '/a/loop/out'"), "/a/loop/out goes round in a loop of symbolic links"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (ModuleNotFoundError("No module named 'diffusers'", name="diffusers"), "lacks the package 'diffusers'"),
    (KeyboardInterrupt(), "interrupted"),
    (ZeroDivisionError("division by zero"), "failed unexpectedly"),
])
def test_translation_table(exc, expected):
    f = failures.translate(exc)
    text = str(f)
    assert expected in text, text
    assert plain(text) and f.message.endswith(".") and f.hint.endswith(".")
    assert len(text) < 800


def test_report_writes_the_raw_text_to_a_log_it_names(tmp_path):
    try:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "frame.png"))
    except OSError as exc:
        f = failures.report(exc, [tmp_path / "worker.log"])
    assert f.log == str(tmp_path / "worker.log") and str(tmp_path / "worker.log") in f.hint_with_log
    log = (tmp_path / "worker.log").read_text()
    assert "Errno 28" in log and "Traceback" in log  # the raw text is kept, for the log only
    # an unwritable first choice falls back to the log folder
    (tmp_path / "blocker").write_text("x")
    path = failures.write_log([tmp_path / "blocker" / "worker.log"], "raw")
    assert path is not None and path.is_file() and path.parent == failures.log_dir()
    path.unlink()


def test_worker_python_messages_are_plain():
    for kind, detail in [("not_python", "it printed nothing"), ("missing", "torch"), ("too_old", "Python 2.7"),
                         ("timeout", "30"), ("no_run", "exec format error")]:
        f = failures.worker_python_failure(kind, "/opt/py/bin/python", detail)
        assert plain(str(f)) and "/opt/py/bin/python" in f.message and f.hint


# ---------------------------------------------------------------- in-process: checks that need a sick machine


def test_disk_full_is_found_before_the_work(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=5 << 20))
    with pytest.raises(preflight.PreflightError, match="Not enough free disk space for 48 frames") as info:
        preflight.check_disk(tmp_path, 48, 512)
    assert "MiB needed" in info.value.message and plain(str(info.value))


def test_permission_denied_probe_as_root_too(tmp_path, monkeypatch):
    real_open = open

    def denied(path, *args, **kwargs):
        if str(path).endswith(preflight.PROBE_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(preflight.PreflightError, match="Permission denied") as info:
        preflight.probe_output_folder(tmp_path / "new" / "out")
    assert plain(str(info.value))
    assert not (tmp_path / "new").exists(), "the probe leaves no folder behind"


def test_probe_leaves_nothing_behind(tmp_path):
    out = preflight.probe_output_folder(tmp_path / "a" / "b" / "out")
    assert out == tmp_path / "a" / "b" / "out" and not (tmp_path / "a").exists()
    (tmp_path / "existing").mkdir()
    preflight.probe_output_folder(tmp_path / "existing")
    assert list((tmp_path / "existing").iterdir()) == []


def test_memory_estimate_warns_when_it_will_not_fit():
    info = preflight.read_model_info(SMALL_MODEL)
    assert info.clip_length == 8 and info.trained_size == 64 and info.parameters > 1_000_000
    need = preflight.estimate_memory(info, 64, 16, "cpu")
    assert need > info.parameters * 4
    assert preflight.memory_warning(info, 64, 16, "cpu", need * 2) == []
    (warning,) = preflight.memory_warning(info, 512, 16, "cpu", need)
    assert "RAM" in warning and "may run out of memory" in warning
    (warning,) = preflight.memory_warning(info, 512, 16, "cuda", 1 << 20, memory="normal")
    assert "GPU Memory to Low" in warning
    # a real SD-1.5-size model at 512 px, fp16: about the measured 10 GiB (normal) and 7.5 GiB (low)
    sd = preflight.ModelInfo(SMALL_MODEL, parameters=2_550_000_000, largest_component=860_000_000)
    assert 8.5 < preflight.estimate_memory(sd, 512, 16, "cuda", memory="normal") / 2**30 < 11.5
    assert 6.5 < preflight.estimate_memory(sd, 512, 16, "cuda", memory="low") / 2**30 < 8.5


def test_size_beyond_training_is_a_warning():
    info = preflight.read_model_info(SMALL_MODEL)
    assert preflight.check_model(info, 8, 64) == []
    (warning,) = preflight.check_model(info, 8, 256)
    assert "256 px" in warning and "trained for (64 px)" in warning


def test_image_header_formats(tmp_path):
    for fmt, suffix in [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp"),
                        ("TIFF", "tif")]:
        path = tmp_path / f"x.{suffix}"
        Image.new("RGB", (96, 80)).save(path, format=fmt)
        found = preflight.image_header(path)
        assert found is not None and found[0] == fmt
        if fmt != "TIFF":
            assert found[1:] == (96, 80), (fmt, found)
    (tmp_path / "x.exr").write_bytes(b"\x76\x2f\x31\x01" + b"\0" * 60)
    with pytest.raises(preflight.PreflightError, match="not an image the worker can read"):
        preflight.check_image(tmp_path / "x.exr", "reference portrait")


def test_convert_pickles_makes_a_refused_folder_loadable(tmp_path):
    import torch
    from safetensors.torch import load_file

    from dp3d_core.convert_pickles import convert_folder

    model = tmp_path / "model"
    shutil.copytree(SMALL_MODEL, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    torch.save(state, model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(preflight.PreflightError, match="pickled"):
        preflight.read_model_info(model)
    assert convert_folder(model) == [weights]
    restored = load_file(str(weights))
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert preflight.read_model_info(model).parameters == preflight.read_model_info(SMALL_MODEL).parameters
    # a pickle that is not plain tensors is refused by weights_only=True, and nothing is written
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "hook": shutil.copytree}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        convert_folder(model)
    assert not (model / "unet" / "diffusion_pytorch_model.safetensors").exists()


# ---------------------------------------------------------------- failures during the work, through the worker


class _FakePipe:
    """Stands in for the loaded pipeline: runs ``action`` instead of denoising (no model is loaded)."""

    def __init__(self, action):
        self.action = action

    def __call__(self, references, conditions, **kwargs):
        from types import SimpleNamespace
        self.action()
        return SimpleNamespace(images=[np.zeros((64, 64, 3), np.float32) for _ in conditions])


def _raise(exc):
    def action():
        raise exc
    return action


@pytest.mark.parametrize("action, expected", [
    (_raise(RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: "
                         "you tried to allocate 68719476736 bytes.")), "The computer ran out of memory (RAM)."),
    (_raise(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 GiB")),
     "The GPU ran out of memory."),
    (_raise(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")), "Apple GPU (Metal) ran out"),
])
def test_out_of_memory_during_the_work(tmp_path, monkeypatch, action, expected):
    from dp3d_core import worker

    job = make_job(tmp_path)
    monkeypatch.setattr(worker, "load_pipeline", lambda *a, **k: _FakePipe(action))
    rc, events, _ = run_in_process(job)
    assert rc == protocol.EXIT_ERROR
    error = events[-1]
    assert error.kind == "error" and expected in error["message"] and plain(error["message"] + error["hint"])
    log = job / "worker.log"
    assert error["log"] == str(log) and str(log) in error["hint"]
    assert "Traceback" in log.read_text()  # the raw text is in the log, not in the message
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".png"]


def test_disk_full_while_writing_frames(tmp_path, monkeypatch):
    from dp3d_core import worker

    job = make_job(tmp_path)
    monkeypatch.setattr(worker, "load_pipeline", lambda *a, **k: _FakePipe(lambda: None))

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(protocol, "write_atomic", full)
    rc, events, _ = run_in_process(job)
    assert rc == protocol.EXIT_ERROR and events[-1].kind == "error"
    assert events[-1]["message"].startswith("The disk is full") and "frame_0001.png" in events[-1]["message"]
    assert plain(events[-1]["message"] + events[-1]["hint"])


def test_a_folder_appears_where_a_frame_goes_during_the_work(tmp_path, monkeypatch):
    from dp3d_core import worker

    job = make_job(tmp_path)
    monkeypatch.setattr(worker, "load_pipeline", lambda *a, **k: _FakePipe(
        lambda: (tmp_path / "out" / "frame_0002.png").mkdir(parents=True)))
    rc, events, _ = run_in_process(job)
    assert rc == protocol.EXIT_ERROR and events[-1].kind == "error"
    assert "is a folder where a file must go" in events[-1]["message"]
    assert [e["scene_frame"] for e in events if e.kind == "frame"] == [1]  # the frame before it is complete
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- CPU threads


def test_thread_policy_is_set_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the worker module must not import torch itself,
    so main() can set the policy first; a user's own setting wins."""
    from dp3d_core.worker import configure_cpu_threads, cpu_threads

    code = "import sys, dp3d_core.worker; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.stdout.strip() == "False", r.stderr[-2000:]
    env: dict[str, str] = {}
    configure_cpu_threads(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    configure_cpu_threads(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert cpu_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert 1 <= cpu_threads({}) <= (os.cpu_count() or 1)


def test_a_worker_python_without_pillow_gets_one_error_event(tmp_path):
    """Even a missing Pillow (imported by the worker module itself) ends in one plain error event."""
    job = make_job(tmp_path)
    code = ("import runpy, sys\n"
            "sys.modules['PIL'] = None\n"
            f"sys.argv = ['dp3d_core.worker', {str(job)!r}]\n"
            "runpy.run_module('dp3d_core.worker', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    events = [parse_event(line) for line in r.stdout.splitlines() if line.strip()]
    assert r.returncode == protocol.EXIT_ERROR and [e.kind for e in events] == ["error"], (r.stdout, r.stderr)
    assert "lacks the package 'pillow'" in events[0]["message"] and "Traceback" not in r.stderr
