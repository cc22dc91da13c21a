"""Generate without freezing Blender: the job is prepared in small steps (what the UI's timer runs), the renders
happen in a background Blender or a few per step, cancel works while they run, and the worker's previews reach
the card and Image Editors.

bpy runs in background mode here (no event loop), so the tests call what the modal operator's timer calls
(``GenerationRun.update``, the operators' ``modal``) directly. The bpy module has no Blender binary: a Python with
the bpy module stands in for ``blender -b`` (same child script). The worker is a stand-in speaking the real
protocol (blender_tests/fake_preview_worker.py): no torch, fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import types
from pathlib import Path

import bpy
import pytest

import addon
from addon import condition_render as cr
from addon import background_render, frame_import, job_runner, job_writer, operators
from addon.properties import active_camera
from addon.proxy_head import remove_proxy_head
from blender_tests.helpers import (PORTRAIT, ReportRecorder, fake_model_folder, fake_preview_worker_python,
                                   fake_worker_python, setup_generation_scene)

FRAMES, SIZE = 4, 64


@pytest.fixture
def scene(empty_scene, monkeypatch, tmp_path):
    addon.register()
    setup_generation_scene(empty_scene, out=tmp_path / "out", model=fake_model_folder(tmp_path / "model"),
                           frames=FRAMES, size=SIZE)
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _scene_state(scene) -> dict:
    """The user-visible state the condition renders change and must put back."""
    r = scene.render
    return {
        "engine": r.engine, "resolution": (r.resolution_x, r.resolution_y, r.resolution_percentage),
        "file_format": r.image_settings.file_format, "view": scene.view_settings.view_transform,
        "world": scene.world.name if scene.world else None, "camera": scene.camera.name if scene.camera else None,
        "frame": scene.frame_current, "objects": sorted(o.name for o in bpy.data.objects),
        "hidden": sorted(o.name for o in scene.objects if o.hide_render),
        "counts": (len(bpy.data.images), len(bpy.data.meshes), len(bpy.data.materials), len(bpy.data.worlds)),
    }


def _step_all(prep: job_writer.JobPreparation, scene) -> list[int]:
    """Run every step; the number of frames each rendered. Between steps the scene must be the user's."""
    before = _scene_state(scene)
    rendered = []
    while True:
        count = prep.frames_rendered
        finished = prep.step()
        rendered.append(prep.frames_rendered - count)
        if finished:
            return rendered
        state = _scene_state(scene)
        state["objects"] = before["objects"] = [o for o in state["objects"] if o != "Proxy Head"]
        assert state == before | {"objects": state["objects"], "counts": state["counts"]}


def test_batched_preparation_renders_the_same_images(scene, tmp_path):
    scene.portrait3d.use_proxy_views = True
    prep = job_writer.JobPreparation(bpy.context, frames_per_step=1, render_elsewhere=False)
    rendered = _step_all(prep, scene)
    prepared = prep.result
    # Structure: no step renders more than frames_per_step frames; all 2 x FRAMES renders happen.
    assert max(rendered) == 1 and sum(rendered) == 2 * FRAMES
    assert not list(prepared.job_dir.glob(job_writer.STAGING_PREFIX + "*")), "staging folder left behind"

    # The same images as one call of the (unbatched) render functions with a single scene set-up.
    head = cr.find_proxy_heads(scene)[0]
    camera, anchor, frames = active_camera(scene), scene.portrait3d.head_anchor, list(range(1, FRAMES + 1))
    direct = cr.render_condition_images(scene, camera, frames, tmp_path / "direct", size=SIZE, objects=[head])
    direct += cr.render_proxy_views(scene, camera, frames, tmp_path / "direct", reference_image_path=PORTRAIT,
                                    proxy_object=head, anchor=anchor, size=SIZE)
    for path in direct:
        job_writer.strip_png_metadata(path)
    job = prepared.job.resolve(prepared.job_dir)
    batched = [Path(f.condition) for f in job.frames] + [Path(f.proxy) for f in job.frames]
    assert [p.name for p in batched] == [p.name for p in direct]
    assert [p.read_bytes() for p in batched] == [p.read_bytes() for p in direct]

    # Three frames per step (no time budget, so the count is exact): the bound follows the setting.
    scene.portrait3d.output_folder = str(tmp_path / "out3") + "/"
    scene.portrait3d.use_proxy_views = False
    rendered = _step_all(job_writer.JobPreparation(bpy.context, frames_per_step=3, step_budget_s=None,
                                                   poses_per_step=2, render_elsewhere=False), scene)
    assert [r for r in rendered if r] == [3, 1]  # 4 frames = 3 + 1


def test_cancel_while_rendering_restores_scene_and_starts_no_worker(scene, tmp_path, monkeypatch):
    marker = tmp_path / "worker started"
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON",
                       str(fake_worker_python(tmp_path / "bin", f'touch "{marker}"\nexec sleep 30')))
    s = scene.portrait3d
    job_writer.prepare_job(bpy.context)  # an earlier job in the same folder, which must stay intact
    job_dir = Path(s.output_folder) / job_writer.JOB_SUBDIR
    old_job = _digests(job_dir)
    assert remove_proxy_head("Proxy Head")  # so the next preparation builds (and must take back) its own
    s.proxy_seed = 7
    before = _scene_state(scene)

    assert bpy.ops.portrait3d.generate.poll()
    run = job_runner.begin_generation(bpy.context)
    p = bpy.context.window_manager.portrait3d_progress
    while not (run.preparation.progress.phase == "Rendering conditions" and run.preparation.progress.done >= 2):
        assert not run.update(bpy.context), run.status.message
    # The background render may finish a frame between two polls: 2/4 or 3/4, never all four yet.
    done = run.preparation.progress.done
    assert p.running and p.preparing and p.status == f"Rendering conditions {done}/4" and done < 4, p.status
    assert bpy.data.objects.get("Proxy Head") is not None
    assert not bpy.ops.portrait3d.generate.poll() and bpy.ops.portrait3d.cancel.poll()

    assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
    assert run.finished and run.status.state == "cancelled" and run.worker is None
    assert "no worker was started" in run.status.message
    assert not job_runner.is_running() and not p.running and not p.preparing and not p.last_error
    assert _scene_state(scene) == before, "the scene is as it was (and the proxy head it built is gone)"
    assert _digests(job_dir) == old_job, "the job folder is untouched (no staging folder, no new image)"
    time.sleep(0.3)
    assert not marker.exists(), "no worker was started"
    assert bpy.ops.portrait3d.generate.poll()


def test_loading_a_file_ends_a_preparation(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    run = job_runner.begin_generation(bpy.context)
    while run.preparation.progress.phase != "Rendering conditions":
        assert not run.update(bpy.context), run.status.message
    job_dir = run.preparation.job_dir
    assert list(job_dir.glob(job_writer.STAGING_PREFIX + "*"))
    bpy.ops.wm.read_factory_settings(use_empty=True)  # runs the load_pre handlers, like File > Open
    assert not job_runner.is_running() and run.finished and run.worker is None
    assert not list(job_dir.glob(job_writer.STAGING_PREFIX + "*")) and not (job_dir / "job.json").exists()


def _update_until(run, condition, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, run.status.message
        run.update(bpy.context)
        time.sleep(0.02)


def _card_image() -> bpy.types.Image:
    card = bpy.data.objects[frame_import.CARD_NAME]
    node = next(n for n in card.data.materials[0].node_tree.nodes if n.type == 'TEX_IMAGE')
    return node.image


def test_preview_events_update_the_card(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_preview_worker_python(
        tmp_path / "bin", "--gate --previews 2 --resume-from 3 --steps 10")))
    # Two Image Editors (bpy's background mode still has one window): an empty one, and one showing another image.
    empty, busy = bpy.context.window_manager.windows[0].screen.areas[:2]
    empty.type = busy.type = 'IMAGE_EDITOR'
    texture = bpy.data.images.new("user texture", 4, 4)
    busy.spaces.active.image = texture

    run = job_runner.begin_generation(bpy.context)
    p = bpy.context.window_manager.portrait3d_progress
    _update_until(run, lambda: run.preview.shown == 1)
    job_dir = run.prepared.job_dir
    assert p.resumed_step == 3 and p.preview_step == 4
    image = _card_image()
    assert image.name == frame_import.IMAGE_NAME and image.source == 'SEQUENCE'
    assert Path(image.filepath) == job_dir / "preview" / "frame_0001.png"
    assert run.preview.reloads == 0
    assert empty.spaces.active.image == image and busy.spaces.active.image == texture
    assert empty.spaces.active.image_user.frame_start == 1 and empty.spaces.active.image_user.frame_duration == FRAMES

    (job_dir / "go_1").touch()
    _update_until(run, lambda: run.preview.shown == 2)
    assert p.preview_step == 5 and run.preview.reloads == 1
    assert _card_image() == image and Path(image.filepath).parent == job_dir / "preview"
    assert [im.name for im in bpy.data.images if im.name.startswith(frame_import.IMAGE_NAME)] == [image.name]

    (job_dir / "go_2").touch()
    _update_until(run, lambda: run.finished)
    assert run.status.state == "done", run.status.message
    assert Path(_card_image().filepath) == run.prepared.out_dir / "frame_0001.png", "the card shows the frames"
    assert p.resumed_step == 3 and not p.running


def test_headless_run_prints_previews_and_writes_a_contact_sheet(scene, tmp_path):
    python = fake_preview_worker_python(tmp_path / "bin", "--previews 2 --steps 10")
    lines: list[str] = []
    sheet = tmp_path / "sheet.png"
    result = job_runner.run_turntable_job(tmp_path / "cli", frames=FRAMES, size=SIZE, reference=str(PORTRAIT),
                                          model=tmp_path / "model", worker_python=python, previews=False,
                                          preview_sheet=sheet, log=lines.append)
    assert result.status.state == "done" and result.status.previews == 2
    shown = [line for line in lines if line.startswith("preview of step")]
    assert [line.split(" in ")[0] for line in shown] == ["preview of step 1/10", "preview of step 2/10"]
    assert f"contact sheet {sheet}" in shown[-1], shown  # (the fake sends both at once: one sheet, the latest)
    image = bpy.data.images.load(str(sheet))
    assert tuple(image.size) == (FRAMES * SIZE, SIZE)  # one row of 4 views
    bpy.data.images.remove(image)


# ---------------------------------------------------------------- the modal operators' ticks

class _Event:
    def __init__(self, kind: str, timer=None) -> None:
        self.type, self.timer = kind, timer


def _operator(cls, **attrs) -> ReportRecorder:
    """Stands in for an operator instance: its helper methods bound, ``attrs`` set (modal() can then run without
    Blender's event loop; invoke() cannot, as it hands the instance to the window manager)."""
    op = ReportRecorder()
    for name in ("_add_timer", "_report_prepared", "_end"):
        if hasattr(cls, name):
            setattr(op, name, types.MethodType(getattr(cls, name), op))
    for name, value in attrs.items():
        setattr(op, name, value)
    return op


def _tick(cls, op, context, limit: int = 5000) -> tuple[set[str], int]:
    for ticks in range(1, limit):
        result = cls.modal(op, context, _Event('TIMER', op._timer))
        if result != {'PASS_THROUGH'}:
            return result, ticks
        assert cls.modal(op, context, _Event('MOUSEMOVE')) == {'PASS_THROUGH'}  # the UI keeps its events
        time.sleep(0.005)
    raise AssertionError("the operator never finished")


def test_generate_modal_ticks_prepare_then_poll_and_import(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_preview_worker_python(tmp_path / "bin", "--previews 1")))
    context = bpy.context
    op = _operator(operators.PORTRAIT3D_OT_generate, _run=job_runner.begin_generation(context))
    op._add_timer(context)
    assert op._interval == job_runner.PREPARE_INTERVAL
    intervals = []
    cls = operators.PORTRAIT3D_OT_generate
    for _ in range(5000):
        result = cls.modal(op, context, _Event('TIMER', op._timer))
        intervals.append(op._interval)
        if result != {'PASS_THROUGH'}:
            break
        time.sleep(0.005)
    assert result == {'FINISHED'}, op.reports
    assert intervals[0] == job_runner.PREPARE_INTERVAL and intervals[-1] == job_runner.WORKER_INTERVAL
    assert any("frames in" in m for m in op.messages('INFO'))
    assert Path(_card_image().filepath) == op._run.prepared.out_dir / "frame_0001.png"


def test_export_poses_modal_ticks_and_escape(scene, tmp_path):
    context = bpy.context
    s = scene.portrait3d
    s.turntable_frames = 20
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    cls = operators.PORTRAIT3D_OT_export_poses
    expected = operators.export_poses(scene)[0].read_text()
    s.output_folder = str(tmp_path / "modal") + "/"

    def fresh_op():
        folder, camera, anchor, frames = operators._pose_export_inputs(scene)
        timer = context.window_manager.event_timer_add(0.01, window=context.window)
        return _operator(cls, _folder=folder, _names=(scene.name, camera.name, anchor.name), _todo=frames,
                         _poses=[], _total=len(frames), _timer=timer)

    op = fresh_op()
    assert cls.modal(op, context, _Event('TIMER', op._timer)) == {'PASS_THROUGH'}
    assert cls.modal(op, context, _Event('ESC')) == {'CANCELLED'}
    assert not (tmp_path / "modal" / "dataset.json").exists()

    op = fresh_op()
    result, ticks = _tick(cls, op, context)
    assert result == {'FINISHED'} and ticks == 3  # 20 poses, 8 per tick
    assert (tmp_path / "modal" / "dataset.json").read_text() == expected
    assert op.messages('INFO') == [f"Wrote 20 camera poses to {tmp_path / 'modal' / 'dataset.json'}"]


def test_scripted_generate_in_background_prints_progress(scene, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_preview_worker_python(
        tmp_path / "bin", "--previews 1 --resume-from 2 --steps 10")))
    assert bpy.ops.portrait3d.generate() == {'FINISHED'}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("portrait3d: ")]
    assert "portrait3d: resumed from step 2/10 (a saved denoising state)" in lines, lines
    assert any(line.startswith("portrait3d: preview of step 3/10 in ") for line in lines), lines
    assert lines[-1].startswith("portrait3d: Done: 4 frames"), lines


def test_unexpected_error_while_rendering_is_one_sentence_and_a_log(scene, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    before = _scene_state(scene)
    real = cr.condition_renderer

    @contextlib.contextmanager
    def broken_renderer(*args, **kwargs):  # frames 1 and 2 render, frame 3 fails inside Blender's render call
        with real(*args, **kwargs) as render:
            def flaky(frame):
                if frame == 3:
                    raise RuntimeError("Blender could not render")
                return render(frame)
            yield flaky
    monkeypatch.setattr(cr, "condition_renderer", broken_renderer)
    with pytest.raises(job_runner.JobRunError, match="Preparing the job failed: Blender could not render"):
        job_runner.start_generation(bpy.context)
    p = bpy.context.window_manager.portrait3d_progress
    log = Path(s_out := scene.portrait3d.output_folder) / job_writer.JOB_SUBDIR / job_writer.ERROR_LOG
    assert p.last_error == "Preparing the job failed: Blender could not render" and str(log) in p.last_hint
    assert "Traceback" in log.read_text() and "RuntimeError: Blender could not render" in log.read_text()
    assert _scene_state(scene) == before and not job_runner.is_running()
    assert not list((Path(s_out) / job_writer.JOB_SUBDIR).glob(job_writer.STAGING_PREFIX + "*"))


# ---------------------------------------------------------------- renders in a background Blender

@pytest.fixture
def background_blender(monkeypatch):
    """A Python with the bpy module stands in for ``blender -b`` (the bpy module has no Blender binary)."""
    monkeypatch.setattr(background_render, "COMMAND", [sys.executable])


def _prepare_in_ui(run) -> list[tuple[str, float]]:
    """Step the run like the UI's timer until the worker starts: (progress text, timer interval) per step."""
    steps = []
    while run.preparing:
        run.update(bpy.context)
        if run.preparing:
            steps.append((run.preparation.progress.text, run.poll_interval))
        time.sleep(0.01)
    return steps


def test_background_blender_renders_the_same_images(scene, tmp_path, monkeypatch, background_blender):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    scene.portrait3d.use_proxy_views = True
    before = _scene_state(scene)
    run = job_runner.begin_generation(bpy.context)
    steps = _prepare_in_ui(run)
    assert run.worker is not None, run.status.message
    assert run.preparation.frames_rendered == 0, "nothing was rendered in this process"
    assert not run.prepared.warnings, run.prepared.warnings
    # While the child renders (every step after the one that starts it) the timer only polls it, less often.
    intervals = [interval for text, interval in steps if text.startswith("Rendering")]
    assert len(intervals) > 1 and set(intervals[1:]) == {job_runner.WAIT_INTERVAL}, intervals
    job = run.prepared.job.resolve(run.prepared.job_dir)
    background = [Path(f.condition) for f in job.frames] + [Path(f.proxy) for f in job.frames]
    job_runner.stop_all()
    state = _scene_state(scene)
    assert state == before | {"objects": state["objects"], "counts": state["counts"]}  # + the proxy head

    scene.portrait3d.output_folder = str(tmp_path / "here") + "/"
    here = job_writer.prepare_job(bpy.context)  # rendered in this process, one set-up per phase
    job = here.job.resolve(here.job_dir)
    local = [Path(f.condition) for f in job.frames] + [Path(f.proxy) for f in job.frames]
    assert [p.read_bytes() for p in background] == [p.read_bytes() for p in local]


def test_cancel_stops_the_background_blender(scene, tmp_path, monkeypatch, background_blender):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    run = job_runner.begin_generation(bpy.context)
    prep = run.preparation
    while not list(prep.job_dir.glob(job_writer.STAGING_PREFIX + "*/render_spec.json")):  # written at its start
        assert not run.update(bpy.context), run.status.message
    pids_before = _children()
    assert pids_before, "a background Blender is running"
    assert bpy.ops.portrait3d.cancel() == {'FINISHED'}
    assert run.status.state == "cancelled" and run.worker is None
    assert not (_children() & pids_before), "the background Blender was stopped"
    assert not list(prep.job_dir.glob(job_writer.STAGING_PREFIX + "*"))


def _children() -> set[int]:
    """Process ids of this process's children that run render_child.py."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[3]) == os.getpid() and b"render_child.py" in cmdline and stat[2] != "Z":
            found.add(int(proc.name))
    return found


def test_failing_background_blender_falls_back_to_rendering_here(scene, tmp_path, monkeypatch):
    broken = fake_worker_python(tmp_path / "broken", 'echo "Blender: cannot open display" >&2\nexit 1')
    monkeypatch.setattr(background_render, "COMMAND", [str(broken)])
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    run = job_runner.begin_generation(bpy.context)
    _prepare_in_ui(run)
    assert run.worker is not None and run.preparation.frames_rendered == FRAMES
    assert any("could not be rendered in a background Blender" in w for w in run.prepared.warnings)
    log = run.prepared.job_dir / job_writer.ERROR_LOG
    assert "cannot open display" in log.read_text()
    assert all(Path(f.condition).is_file() for f in run.prepared.job.resolve(run.prepared.job_dir).frames)


def test_stalled_background_blender_is_stopped(scene, tmp_path, monkeypatch):
    marker = tmp_path / "child pid"
    stalled = fake_worker_python(tmp_path / "stalled", f'echo $$ > "{marker}"\nexec sleep 60')
    monkeypatch.setattr(background_render, "COMMAND", [str(stalled)])
    monkeypatch.setattr(background_render, "STALL_S", 0.5)
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_worker_python(tmp_path / "bin")))
    run = job_runner.begin_generation(bpy.context)
    _prepare_in_ui(run)
    assert run.worker is not None and run.preparation.frames_rendered == FRAMES
    assert any("could not be rendered in a background Blender" in w for w in run.prepared.warnings)
    assert "no image for 0 s" in (run.prepared.job_dir / job_writer.ERROR_LOG).read_text()
    pid = int(marker.read_text())
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z", "the stalled child was stopped"


class _Layout:
    """Records what a panel draws (labels and progress bars)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def label(self, text="", icon='NONE'):
        self.lines.append(text)

    def progress(self, factor=0.0, type='BAR', text=""):
        self.lines.append(f"[{factor:.2f}] {text}")

    def box(self):
        return self


def test_panel_shows_preparation_resume_and_preview(scene, tmp_path, monkeypatch):
    from addon import panel

    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", str(fake_preview_worker_python(
        tmp_path / "bin", "--gate --previews 1 --resume-from 3 --steps 10")))
    p = bpy.context.window_manager.portrait3d_progress
    run = job_runner.begin_generation(bpy.context, preparation={"frames_per_step": 1})
    while not (run.preparing and run.preparation.progress.phase == "Rendering conditions"
               and run.preparation.progress.done == 2):
        run.update(bpy.context)
    layout = _Layout()
    panel.draw_progress(layout, p)
    assert layout.lines == ["[0.50] Rendering conditions 2/4"]
    _update_until(run, lambda: run.preview.shown == 1)
    layout = _Layout()
    panel.draw_progress(layout, p)
    assert "Resumed from step 3" in layout.lines and "Latest preview: step 4" in layout.lines, layout.lines
    assert layout.lines[0].startswith("[") and "0/4 frames  step 4/10" in layout.lines[0], layout.lines
    run.cancel()
    _update_until(run, lambda: run.finished)
    layout = _Layout()
    panel.draw_progress(layout, p)
    assert "Latest preview: step 4" not in layout.lines and "Resumed from step 3" in layout.lines
