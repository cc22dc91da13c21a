"""The real worker subprocess, ``python -m dp3d_core.worker <job dir>``, on the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core import protocol
from dp3d_core.job import FrameSpec, GenerationSettings, Job, job_hash, read_job, write_job
from dp3d_core.protocol import Event, parse_event

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dp3d_core.tiny import make_tiny_model_folder
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def make_job_dir(root: Path, model: Path, frames: int = 3, steps: int = 2) -> Path:
    d = root / "job"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(d / "ref.png")   # non-square
    specs = []
    for i in range(frames):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / f"cond_{i}.png")
        specs.append(FrameSpec(index=i, scene_frame=i + 1, label=list(LABEL), condition=f"cond_{i}.png",
                               proxy="cond_0.png" if i == 1 else None))
    job = Job(references=["ref.png"], frames=specs, model=str(model), output="out", device="cpu",
              settings=GenerationSettings(steps=steps, seed=3, size=SIZE))
    write_job(job, d)
    return d


def run_worker(job_dir: Path | str, timeout: float = 300) -> tuple[int, list[Event], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "dp3d_core.worker", str(job_dir)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    events = [parse_event(line) for line in lines]
    assert all(e is not None for e in events), f"non-protocol output on stdout: {r.stdout!r}"
    return r.returncode, events, r.stderr  # type: ignore[return-value]


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def only(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def test_run_resume_cancel(tmp_path: Path, model_folder: Path) -> None:
    job_dir = make_job_dir(tmp_path, model_folder)
    out = job_dir / "out"

    # 1. a full run
    rc, events, err = run_worker(job_dir)
    assert rc == 0, err
    assert kinds(events)[0] == "started" and kinds(events)[-1] == "done"
    started = events[0]
    assert started["frames_total"] == 3 and started["frames_done"] == 0
    assert started["job_hash"] == job_hash(read_job(job_dir), job_dir)
    progress = only(events, "progress")
    assert progress and {p["total_steps"] for p in progress} == {2}
    assert [p["step"] for p in progress] == [1, 2]          # 3 views -> one window per step
    frames = only(events, "frame")
    assert [f["index"] for f in frames] == [0, 1, 2] and [f["scene_frame"] for f in frames] == [1, 2, 3]
    assert kinds(events).index("frame") > max(i for i, k in enumerate(kinds(events)) if k == "progress")
    for f in frames:
        p = Path(f["path"])
        assert p.parent == out.resolve() and p.name == f"frame_{f['scene_frame']:04d}.png"
        with Image.open(p) as im:
            im.load()                                        # a complete, decodable PNG
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    done = events[-1]
    assert done["frames_written"] == 3 and done["cancelled"] is False
    assert sorted(p.name for p in out.iterdir()) == ["frame_0001.png", "frame_0002.png", "frame_0003.png",
                                                     protocol.MANIFEST_FILE]

    # the worker's frames are the pipeline's output for the job's settings
    from dp3d_core.images import load_rgb
    from dp3d_core.pipeline import DiffPortrait3DPipeline
    pipe = DiffPortrait3DPipeline.from_pretrained(model_folder)
    conds = [load_rgb(job_dir / f"cond_{i}.png", SIZE) for i in range(3)]
    expected = pipe([load_rgb(job_dir / "ref.png", SIZE)], conds, proxy_images=[None, conds[0], None],
                    num_inference_steps=2, seed=3, output_type="np").images
    for i in range(3):
        got = np.asarray(Image.open(out / f"frame_{i + 1:04d}.png"), dtype=np.float32) / 255
        np.testing.assert_allclose(got, expected[i], atol=2 / 255)

    # 2. a re-run skips the finished frames and writes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, events, err = run_worker(job_dir)
    assert rc == 0, err
    assert kinds(events) == ["started", "done"]
    assert events[0]["frames_done"] == 3 and events[1]["frames_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # 3. cancel: stops within the first step, keeps the finished frames, exit code 3
    (out / "frame_0002.png").unlink()
    protocol.request_cancel(job_dir)
    rc, events, err = run_worker(job_dir)
    assert rc == protocol.EXIT_CANCELLED, err
    assert events[0]["frames_done"] == 2
    assert len(only(events, "progress")) <= 1 and not only(events, "frame")
    assert events[-1].kind == "done" and events[-1]["cancelled"] is True
    assert sorted(p.name for p in out.iterdir()) == ["frame_0001.png", "frame_0003.png", protocol.MANIFEST_FILE]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "frame_0002.png"} == \
        {k: v for k, v in before.items() if k != "frame_0002.png"}

    # 4. resume after the cancel: only the missing frame is written
    protocol.clear_cancel(job_dir)
    (out / ".frame_0002.png.abc123.tmp").write_bytes(b"half a frame from a killed worker")
    rc, events, err = run_worker(job_dir)
    assert rc == 0, err
    assert events[0]["frames_done"] == 2
    assert [f["scene_frame"] for f in only(events, "frame")] == [2] and events[-1]["frames_written"] == 1
    np.testing.assert_allclose(np.asarray(Image.open(out / "frame_0002.png"), dtype=np.float32) / 255,
                               expected[1], atol=2 / 255)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_missing_model_folder_is_an_error_event(tmp_path: Path) -> None:
    job_dir = make_job_dir(tmp_path, tmp_path / "no_such_model")
    rc, events, err = run_worker(job_dir)
    assert rc == protocol.EXIT_ERROR
    assert kinds(events) == ["error"]  # found by the pre-work checks, before the job is even hashed
    assert "no_such_model" in events[-1]["message"] and "model folder" in events[-1]["hint"].lower()
    assert "Traceback" not in err
    assert not (job_dir / "out").exists() or not any((job_dir / "out").iterdir())


def test_incomplete_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "DiffPortrait3DPipeline"}')
    job_dir = make_job_dir(tmp_path, model)
    rc, events, _ = run_worker(job_dir)
    assert rc == protocol.EXIT_ERROR and events[-1].kind == "error"
    assert "missing" in events[-1]["message"] and events[-1]["hint"]


def test_invalid_job_names_the_field(tmp_path: Path, model_folder: Path) -> None:
    job_dir = make_job_dir(tmp_path, model_folder)
    data = json.loads((job_dir / "job.json").read_text())
    data["settings"]["size"] = 100
    (job_dir / "job.json").write_text(json.dumps(data))
    rc, events, _ = run_worker(job_dir)
    assert rc == protocol.EXIT_ERROR and kinds(events) == ["error"]
    assert "settings.size" in events[0]["message"] and events[0]["hint"]


def test_bad_image_is_an_error_event(tmp_path: Path, model_folder: Path) -> None:
    job_dir = make_job_dir(tmp_path, model_folder)
    (job_dir / "cond_2.png").write_text("not a png")
    rc, events, _ = run_worker(job_dir)
    assert rc == protocol.EXIT_ERROR and events[-1].kind == "error"
    assert "cond_2.png" in events[-1]["message"]


def test_usage_error(tmp_path: Path) -> None:
    rc, events, _ = run_worker(tmp_path / "missing_job")
    assert rc == protocol.EXIT_ERROR and kinds(events) == ["error"] and "job.json" in events[0]["message"]


def test_error_hints_are_plain() -> None:
    from dp3d_core.schedulers import SchedulerError
    from dp3d_core.worker import _error_hint

    class OutOfMemoryError(RuntimeError):   # stands for torch.cuda.OutOfMemoryError
        pass
    message, hint = _error_hint(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "GPU ran out of memory" in message and "Output Size" in hint
    assert "Memory" in hint
    CompileError = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    message, hint = _error_hint(CompileError("backend='inductor' raised: no C compiler"))
    assert "torch.compile" in message and "Compile off" in hint
    message, hint = _error_hint(SchedulerError("unknown scheduler 'euler'"))
    assert message == "unknown scheduler 'euler'." and "settings" in hint
    message, hint = _error_hint(ModuleNotFoundError("no torch", name="torch"))
    assert "torch" in message and "Set Up Worker" in hint and "pip install" in hint
    message, hint = _error_hint(RuntimeError("weird"))
    assert "RuntimeError" not in message and "weird" not in message and "log" in hint


class _RecordingPipeline:
    """Stands in for DiffPortrait3DPipeline: records which speed/memory switches the worker turns on."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, tuple(sorted(kwargs.items()))))


@pytest.mark.parametrize("memory, compile, device, expected, warned", [
    ("normal", False, "cpu", [], 0),
    ("low", False, "cpu", ["set_fast_path", "enable_attention_slicing", "enable_vae_slicing"], 0),
    ("lowest", False, "cpu", ["set_fast_path", "enable_attention_slicing", "enable_vae_slicing"], 1),
    ("lowest", False, "meta", ["set_fast_path", "enable_attention_slicing", "enable_vae_slicing",
                               "enable_model_cpu_offload"], 0),
    ("normal", True, "cpu", ["enable_compile"], 1),
])
def test_speed_options_turn_on_the_pipeline_switches(memory, compile, device, expected, warned) -> None:
    import torch

    from dp3d_core.worker import apply_speed_options

    pipe, warnings = _RecordingPipeline(), []
    apply_speed_options(pipe, memory, compile, torch.device(device), warnings.append)
    assert [c[0] for c in pipe.calls] == expected
    assert len(warnings) == warned
    if memory != "normal":
        assert pipe.calls[0][2] == (("batch_passes", False),)


def test_low_memory_job_gives_the_same_frames(tmp_path: Path, model_folder: Path) -> None:
    """memory 'low' (sequential passes, sliced attention and VAE) through the real worker: same pixels up to
    rounding, same job hash, so a normal run's frames count as done for a low-memory rerun."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    normal = make_job_dir(tmp_path / "a", model_folder, frames=2, steps=1)
    low = make_job_dir(tmp_path / "b", model_folder, frames=2, steps=1)
    job = read_job(low)
    job.memory = "low"
    write_job(job, low)
    for d in (normal, low):
        rc, events, err = run_worker(d)
        assert rc == 0, err
    for name in sorted(p.name for p in (normal / "out").glob("*.png")):
        a = np.asarray(Image.open(normal / "out" / name), dtype=np.int16)
        b = np.asarray(Image.open(low / "out" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name
    assert job_hash(read_job(normal), normal) == job_hash(read_job(low), low)
