"""Job spec (job.json) and worker protocol: round trips, validation, hashing, atomic files."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dp3d_core import job as jobmod
from dp3d_core import protocol
from dp3d_core.job import FrameSpec, GenerationSettings, Job, JobError, job_hash, read_job, write_job

LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]


def _png(path: Path, value: int) -> None:
    from PIL import Image
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(path)


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    _png(d / "ref.png", 10)
    for i in range(3):
        _png(d / f"cond{i}.png", 20 + i)
    _png(d / "proxy0.png", 99)
    (d / "model").mkdir()
    (d / "model" / "model_index.json").write_text('{"a": 1}')
    return d


def make_job(**over) -> Job:
    frames = [FrameSpec(index=i, scene_frame=10 + i, label=list(LABEL), condition=f"cond{i}.png",
                        proxy="proxy0.png" if i == 0 else None) for i in range(3)]
    kw = dict(references=["ref.png"], frames=frames, model="model", output="out",
              settings=GenerationSettings(steps=3, seed=7))
    kw.update(over)
    return Job(**kw)


def job_dict(**over) -> dict:
    d = make_job().to_dict()
    d.update(over)
    return d


# ---------------------------------------------------------------- job.json

def test_round_trip(job_dir: Path) -> None:
    job = make_job()
    path = write_job(job, job_dir)
    assert path.name == "job.json"
    assert json.loads(path.read_text())["version"] == 1
    back = read_job(job_dir)
    assert back == job
    assert not [p for p in job_dir.iterdir() if p.name.endswith(".tmp")]


def test_defaults_documented_values() -> None:
    s = GenerationSettings()
    assert (s.steps, s.guidance, s.eta, s.size, s.scheduler, s.window, s.overlap, s.share_noise) == \
        (50, 3.0, 0.0, 512, "ddim", 8, 4, False)
    minimal = {"version": 1, "references": "ref.png", "model": "m", "output": "o",
               "frames": [{"index": 0, "scene_frame": 1, "label": LABEL, "condition": "c.png"}]}
    job = jobmod.job_from_dict(minimal)
    assert job.references == ["ref.png"] and job.settings == GenerationSettings()
    assert job.frames[0].proxy is None and job.device == "auto" and job.dtype == "auto"
    assert job.memory == "normal" and job.compile is False


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d.update(references=[]), "references"),
    (lambda d: d.update(frames=[]), "frames"),
    (lambda d: d.update(device="tpu"), "device"),
    (lambda d: d.update(dtype="int8"), "dtype"),
    (lambda d: d.update(memory="tiny"), "memory"),
    (lambda d: d.update(compile="yes"), "compile"),
    (lambda d: d["settings"].update(steps=0), "settings.steps"),
    (lambda d: d["settings"].update(steps=2.5), "settings.steps"),
    (lambda d: d["settings"].update(size=100), "settings.size"),
    (lambda d: d["settings"].update(scheduler="plms"), "settings.scheduler"),
    (lambda d: d["settings"].update(overlap=8), "settings.overlap"),
    (lambda d: d["settings"].update(guidance=float("nan")), "settings.guidance"),
    (lambda d: d["settings"].update(share_noise="yes"), "settings.share_noise"),
    (lambda d: d["settings"].update(colour="red"), "settings"),
    (lambda d: d["frames"][1].update(label=LABEL[:24]), "frames[1].label"),
    (lambda d: d["frames"][1].update(label=LABEL[:3] + ["x"] + LABEL[4:]), "frames[1].label[3]"),
    (lambda d: d["frames"][2].update(label=LABEL[:15] + [0.0] + LABEL[16:]), "frames[2].label"),
    (lambda d: d["frames"][2].update(index=0), "frames[2].index"),
    (lambda d: d["frames"][0].pop("condition"), "frames[0].condition"),
    (lambda d: d["frames"][0].update(proxy=3), "frames[0].proxy"),
    (lambda d: d.update(frame_pattern="frame_{camera}.png"), "frame_pattern"),
    (lambda d: d.update(frame_pattern="frame.png"), "frame_pattern"),  # all frames -> one name
    (lambda d: d.update(frame_pattern="frame_{index}.jpg"), "frame_pattern"),
])
def test_validation_names_the_field(mutate, field: str) -> None:
    d = job_dict()
    mutate(d)
    with pytest.raises(JobError) as info:
        jobmod.job_from_dict(json.loads(json.dumps(d)))
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("pattern", ["../frame_{index}.png", "/tmp/frame_{index}.png", "sub/frame_{index}.png",
                                     "..\\frame_{index}.png", "C:frame_{index}.png"])
def test_path_escape_refused(pattern: str) -> None:
    with pytest.raises(JobError, match="frame_pattern"):
        jobmod.job_from_dict(job_dict(frame_pattern=pattern))


def test_output_path_inside_output_folder(job_dir: Path) -> None:
    job = make_job().resolve(job_dir)
    p = job.output_path(job.frames[1])
    assert p == (job_dir / "out" / "frame_0011.png").resolve()
    # A Job built in code bypasses the reader: output_path still refuses to leave the folder.
    bad = make_job(frame_pattern="../x{index}.png").resolve(job_dir)
    with pytest.raises(JobError, match="outside the output folder"):
        bad.output_path(bad.frames[0])


def test_read_job_errors(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="no job.json"):
        read_job(tmp_path)
    (tmp_path / "job.json").write_text("{not json")
    with pytest.raises(JobError, match="not valid JSON"):
        read_job(tmp_path)


def test_resolve_makes_paths_absolute(job_dir: Path, tmp_path: Path) -> None:
    absolute_ref = str(job_dir / "ref.png")
    job = make_job(references=[absolute_ref]).resolve(job_dir)
    assert job.references == [absolute_ref]
    assert job.frames[0].condition == str(job_dir / "cond0.png")
    assert job.frames[0].proxy == str(job_dir / "proxy0.png") and job.frames[1].proxy is None
    assert job.model == str(job_dir / "model") and job.output == str(job_dir / "out")


def test_ordered_frames() -> None:
    job = make_job()
    job.frames.reverse()
    assert [f.index for f in job.ordered_frames()] == [0, 1, 2]


# ---------------------------------------------------------------- hash

def test_hash_stable_and_sensitive(job_dir: Path, tmp_path: Path) -> None:
    base = job_hash(make_job(), job_dir)
    assert base == job_hash(make_job(), job_dir)
    assert len(base) == 64
    # NOT sensitive to where the frames go or how they are named
    assert job_hash(make_job(output="elsewhere", frame_pattern="v_{index}.png"), job_dir) == base
    # nor to the speed and memory switches, which keep the picture (frames already written stay valid)
    assert job_hash(make_job(memory="lowest", compile=True), job_dir) == base
    # relative vs absolute spelling of the same file
    assert job_hash(make_job(references=[str(job_dir / "ref.png")]), job_dir) == base
    changed = [
        make_job(settings=GenerationSettings(steps=4, seed=7)),
        make_job(settings=GenerationSettings(steps=3, seed=8)),
        make_job(settings=GenerationSettings(steps=3, seed=7, guidance=2.0)),
        make_job(settings=GenerationSettings(steps=3, seed=7, overlap=2)),
        make_job(settings=GenerationSettings(steps=3, seed=7, scheduler="unipc")),
        make_job(dtype="fp16"),
        make_job(references=["cond0.png"]),
    ]
    j = make_job()
    j.frames[1].label = LABEL[:3] + [0.5] + LABEL[4:]
    changed.append(j)
    hashes = {job_hash(c, job_dir) for c in changed}
    assert base not in hashes and len(hashes) == len(changed)


def test_hash_follows_file_contents(job_dir: Path) -> None:
    base = job_hash(make_job(), job_dir)
    _png(job_dir / "cond2.png", 200)
    h2 = job_hash(make_job(), job_dir)
    assert h2 != base
    _png(job_dir / "proxy0.png", 1)
    h3 = job_hash(make_job(), job_dir)
    assert h3 != h2
    (job_dir / "model" / "model_index.json").write_text('{"a": 2}')
    assert job_hash(make_job(), job_dir) != h3


def test_hash_missing_input_is_job_error(job_dir: Path) -> None:
    (job_dir / "cond1.png").unlink()
    with pytest.raises(JobError, match="cond1.png"):
        job_hash(make_job(), job_dir)


# ---------------------------------------------------------------- protocol

def test_event_round_trip() -> None:
    line = protocol.encode_event("progress", step=2, total_steps=5, window=1, frames_done=0, frames_total=11)
    assert "\n" not in line
    ev = protocol.parse_event(line + "\n")
    assert ev is not None and ev.kind == "progress"
    assert ev.fields == {"step": 2, "total_steps": 5, "window": 1, "frames_done": 0, "frames_total": 11}
    assert ev["step"] == 2 and ev.get("missing", 7) == 7
    err = protocol.parse_event(protocol.encode_event("error", message="boom", hint="try less").encode())
    assert err is not None and (err.kind, err["hint"]) == ("error", "try less")


@pytest.mark.parametrize("line", ["", "hello", "{", "[1, 2]", '{"event": "done"}', '{"dp3d": 1, "event": "nope"}',
                                  "Loading pipeline components...: 100%"])
def test_parse_ignores_non_protocol_lines(line: str) -> None:
    assert protocol.parse_event(line) is None


def test_encode_rejects_bad_events() -> None:
    with pytest.raises(protocol.ProtocolError, match="unknown event"):
        protocol.encode_event("hello", message="x")
    with pytest.raises(protocol.ProtocolError, match="hint"):
        protocol.encode_event("error", message="x")


@pytest.mark.parametrize("text_mode", [True, False])
def test_event_reader_from_subprocess(text_mode: bool) -> None:
    lines = [protocol.encode_event("started", job_hash="h", frames_total=2, frames_done=0), "noise from a library",
             protocol.encode_event("done", frames_written=2, seconds=0.1, cancelled=False)]
    script = "import sys\nfor l in sys.argv[1:]:\n    print(l, flush=True)\n"
    proc = subprocess.Popen([sys.executable, "-c", script, *lines], stdout=subprocess.PIPE, text=text_mode)
    reader = protocol.EventReader(proc.stdout)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    assert reader.finished
    kinds = [e.kind for e in reader.poll()]
    assert kinds == ["started", "done"]
    assert reader.other_lines == ["noise from a library"]
    assert reader.get(timeout=0.01) is None


def test_event_reader_in_memory_stream() -> None:
    stream = io.StringIO(protocol.encode_event("warning", message="w") + "\n")
    reader = protocol.EventReader(stream)
    ev = reader.get(timeout=5)
    assert ev is not None and ev["message"] == "w"


def test_cancel_file(tmp_path: Path) -> None:
    assert not protocol.cancel_requested(tmp_path)
    protocol.request_cancel(tmp_path)
    assert protocol.cancel_requested(tmp_path)
    assert (tmp_path / protocol.CANCEL_FILE).exists()
    protocol.clear_cancel(tmp_path)
    assert not protocol.cancel_requested(tmp_path)
    assert protocol.JOB_FILE == "job.json" and protocol.CANCEL_FILE == "cancel"


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    protocol.write_atomic(target, b"first")
    protocol.write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_write_atomic_honours_umask(tmp_path: Path) -> None:
    (tmp_path / "plain.bin").write_bytes(b"x")
    protocol.write_atomic(tmp_path / "atomic.bin", b"x")
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic.bin") == mode("plain.bin")


def test_write_atomic_failure_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a.bin"
    protocol.write_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(protocol.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        protocol.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_manifest_marks_frames_done(tmp_path: Path) -> None:
    import hashlib
    name = "frame_0001.png"
    data = b"png bytes"
    protocol.write_atomic(tmp_path / name, data)
    assert not protocol.frame_done(tmp_path, name, "h1")
    protocol.record_frame(tmp_path, name, "h1", index=0, scene_frame=1, sha256=hashlib.sha256(data).hexdigest())
    assert protocol.frame_done(tmp_path, name, "h1")
    assert not protocol.frame_done(tmp_path, name, "h2")  # another job hash
    assert protocol.frames_done(tmp_path, [name, "other.png"], "h1") == {name}
    (tmp_path / name).write_bytes(b"edited by hand")
    assert not protocol.frame_done(tmp_path, name, "h1")
    (tmp_path / protocol.MANIFEST_FILE).write_text("garbage")
    assert protocol.read_manifest(tmp_path) == {}


def test_torch_free_modules_do_not_import_torch() -> None:
    code = ("import sys; import dp3d_core.job, dp3d_core.protocol, dp3d_core.images; "
            "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
