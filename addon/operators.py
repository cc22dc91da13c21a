"""Operators: head anchor, turntable, pose export, generate/cancel, import, worker check."""
from __future__ import annotations

import functools
from pathlib import Path

import bpy
from bpy.props import FloatProperty, StringProperty

from . import back_view, frame_import, job_runner, job_writer, preferences, reference_prep, rig, worker_env
from .model_family import scene_family
from .worker_process import (CHECK_TIMEOUT, BackgroundCommand, WorkerCheck, WorkerStartError, check_worker_python,
                             finish_worker_check, start_worker_check)
from .poses import FramePose, PoseError, output_folder, scene_poses, write_dataset
from .properties import active_camera, frame_range

_MAX_LISTED_WARNINGS = 5


def export_blocker(scene: bpy.types.Scene) -> str | None:
    """Why poses cannot be exported right now (None when they can)."""
    if scene.portrait3d.head_anchor is None:
        return "Add or pick a head anchor first"
    if active_camera(scene) is None:
        return "Add a turntable or set a camera first"
    start, end = frame_range(scene)
    if end < start:
        return f"Frame range {start}-{end} is empty"
    return None


def _pose_export_inputs(scene: bpy.types.Scene) -> tuple[Path, bpy.types.Object, bpy.types.Object, list[int]]:
    """(output folder, camera, anchor, frames) for a pose export; PoseError with the fix when impossible."""
    s = scene.portrait3d
    start, end = frame_range(scene)
    if s.head_anchor is None:
        raise PoseError("No head anchor: add one with 'Add Head Anchor' or pick an Empty as Head Anchor.")
    camera = active_camera(scene)
    if camera is None:
        raise PoseError("No camera: add a turntable, set the scene camera, or pick a camera in the settings.")
    if end < start:
        raise PoseError(f"The frame range {start}-{end} is empty: make End greater than or equal to Start.")
    return output_folder(scene), camera, s.head_anchor, list(range(start, end + 1))


def export_poses(scene: bpy.types.Scene) -> tuple[Path, list[FramePose]]:
    """Write dataset.json for the settings' frame range; raise PoseError with the fix when impossible."""
    folder, camera, anchor, frames = _pose_export_inputs(scene)
    poses = scene_poses(scene, camera, anchor, frames, all_around=_all_around(bpy.context, scene))
    return write_dataset(folder, poses), poses


def _all_around(context, scene) -> bool:
    """The scene's model sees heads from every side (DiffPortrait360): no beyond-+-90-degree pose warnings."""
    if context.scene != scene:
        with context.temp_override(scene=scene):
            family = scene_family(bpy.context)
    else:
        family = scene_family(context)
    return family is not None and family.is_360


class PORTRAIT3D_OT_add_head_anchor(bpy.types.Operator):
    """Add an Empty at the 3D cursor marking the head centre (-Y out of the face, +Z up)"""

    bl_idname = "portrait3d.add_head_anchor"
    bl_label = "Add Head Anchor"
    bl_options = {'REGISTER', 'UNDO'}

    size: FloatProperty(name="Size", default=1.0, min=1e-4, soft_max=10.0, unit='LENGTH',
                        description="Blender units per EG3D unit (the sphere's radius)")

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        return True

    def execute(self, context):
        rig.add_head_anchor(context, size=self.size)
        return {'FINISHED'}


class PORTRAIT3D_OT_add_turntable(bpy.types.Operator):
    """Add (or replace) a camera orbiting the head anchor the way EG3D cameras orbit a head"""

    bl_idname = "portrait3d.add_turntable"
    bl_label = "Add Turntable"
    bl_options = {'REGISTER', 'UNDO'}

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        if context.scene.portrait3d.head_anchor is None:
            cls.poll_message_set("Add or pick a head anchor first")
            return False
        return True

    def execute(self, context):
        scene = context.scene
        s = scene.portrait3d
        pitch, start_yaw = s.turntable_pitch, None
        family = scene_family(context)
        full_turn = family is not None and family.is_360 and s.turntable_full_turn
        try:
            if s.turntable_from_photo:
                start_yaw, pitch = rig.photo_view(context)
            rig.build_turntable(scene, s.head_anchor, frames=s.turntable_frames, yaw_range=s.turntable_yaw_range,
                                pitch=pitch, size_px=job_writer.output_size(context), start_yaw=start_yaw,
                                full_turn=full_turn)
        except (PoseError, reference_prep.ReferencePrepError) as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return {'FINISHED'}


def _report_written(op, path: Path, poses: list[FramePose]) -> set[str]:
    warnings = [f"frame {p.frame}: {w}" for p in poses for w in p.warnings]
    for w in warnings[:_MAX_LISTED_WARNINGS]:
        op.report({'WARNING'}, w)
    if len(warnings) > _MAX_LISTED_WARNINGS:
        op.report({'WARNING'}, f"... and {len(warnings) - _MAX_LISTED_WARNINGS} more pose warnings")
    op.report({'INFO'}, f"Wrote {len(poses)} camera poses to {path}")
    return {'FINISHED'}


class PORTRAIT3D_OT_export_poses(bpy.types.Operator):
    """Write dataset.json (EG3D camera labels) for every frame of the range into the output folder"""

    bl_idname = "portrait3d.export_poses"
    bl_label = "Export Camera Poses"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        # Missing anchor/camera/range are reported by execute (ERROR + CANCELLED) so scripts get a
        # clear message; the panel greys the button out and shows export_blocker() instead.
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        return True

    def execute(self, context):
        try:
            path, poses = export_poses(context.scene)
        except PoseError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return _report_written(self, path, poses)

    # In the UI: POSES_PER_STEP poses per timer tick (each one a scene.frame_set), Esc cancels; a long shot with
    # heavy rigs no longer freezes Blender. Objects are looked up by name at each tick (undo may replace them).

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        scene = context.scene
        try:
            self._folder, camera, anchor, frames = _pose_export_inputs(scene)
        except PoseError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self._names = (scene.name, camera.name, anchor.name)
        self._todo, self._poses, self._total = frames, [], len(frames)
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.01, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def _end(self, context) -> None:
        context.window_manager.event_timer_remove(self._timer)
        if context.workspace is not None:
            context.workspace.status_text_set(None)

    def modal(self, context, event):
        if event.type == 'ESC':
            self._end(context)
            self.report({'WARNING'}, "Pose export cancelled; dataset.json was not written")
            return {'CANCELLED'}
        if event.type != 'TIMER' or event.timer is not self._timer:
            return {'PASS_THROUGH'}
        scene_name, camera_name, anchor_name = self._names
        scene, camera = bpy.data.scenes.get(scene_name), bpy.data.objects.get(camera_name)
        anchor = bpy.data.objects.get(anchor_name)
        try:
            if scene is None or camera is None or anchor is None:
                raise PoseError("The scene, camera or head anchor was deleted or renamed during the export; "
                                "export again.")
            batch, self._todo = self._todo[:job_writer.POSES_PER_STEP], self._todo[job_writer.POSES_PER_STEP:]
            self._poses += scene_poses(scene, camera, anchor, batch, all_around=_all_around(context, scene))
            if self._todo:
                if context.workspace is not None:
                    context.workspace.status_text_set(
                        f"Exporting camera poses {len(self._poses)}/{self._total} (Esc to cancel)")
                return {'PASS_THROUGH'}
            path = write_dataset(self._folder, self._poses)
        except PoseError as exc:
            self._end(context)
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self._end(context)
        return _report_written(self, path, self._poses)


def _report_list(op, kind: str, messages: list[str]) -> None:
    for m in messages[:_MAX_LISTED_WARNINGS]:
        op.report({kind}, m)
    if len(messages) > _MAX_LISTED_WARNINGS:
        op.report({kind}, f"... and {len(messages) - _MAX_LISTED_WARNINGS} more")


def _redraw_ui(context) -> None:
    wm = context.window_manager if context else bpy.context.window_manager
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in {'VIEW_3D', 'PREFERENCES'}:
                area.tag_redraw()


class _WatchesCommand:
    """Modal-timer plumbing for operators that run a BackgroundCommand without blocking Blender: ``_tick`` is
    called on every timer event and returns None while the command runs, then the operator's result."""

    _interval = 0.5

    def _watch(self, context, cmd: BackgroundCommand) -> set[str]:
        self._cmd = cmd
        wm = context.window_manager
        self._timer = wm.event_timer_add(self._interval, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        if event.type != 'TIMER' or event.timer is not self._timer:
            return {'PASS_THROUGH'}
        result = self._tick(context, self._cmd)
        if result is None:
            return {'PASS_THROUGH'}
        context.window_manager.event_timer_remove(self._timer)
        _redraw_ui(context)
        return result


def _report_end(op, run: job_runner.GenerationRun) -> set[str]:
    s = run.status
    if s.state == "done":
        if run.import_error:
            op.report({'WARNING'}, run.import_error)
        if run.prepared.back_only:
            op.report({'INFO'}, f"{s.message}: {s.back_view}")
        else:
            op.report({'INFO'}, f"{s.message}; frames in {run.prepared.out_dir}")
        return {'FINISHED'}
    if s.state == "cancelled":
        op.report({'WARNING'}, s.message)
        return {'CANCELLED'}
    op.report({'ERROR'}, f"{s.message} {('Hint: ' + s.hint) if s.hint else ''}".strip())
    return {'CANCELLED'}


def _poll_run_timer(run: job_runner.GenerationRun) -> float | None:
    """bpy.app.timers callback for runs started from scripts in the UI (no modal operator)."""
    try:
        finished = run.update(bpy.context)
        _redraw_ui(bpy.context)
    except ReferenceError:  # the file was reloaded under us
        run.stop()
        return None
    return None if finished else run.poll_interval


class _Generates:
    """Generate and the back view's Generate / Regenerate: check, prepare step by step, run the worker."""

    bl_options = {'REGISTER'}
    _back_only = False  # Generate Back View: the worker's back stage only

    @classmethod
    def poll(cls, context):
        if context.scene is None:
            cls.poll_message_set("Needs a scene")
            return False
        if job_runner.is_running():
            cls.poll_message_set("A generation is already running: wait for it or press Cancel")
            return False
        return True

    def _start(self, context, begin) -> job_runner.GenerationRun | None:
        try:
            run = begin(context, back_only=self._back_only)
        except job_runner.JobRunError as exc:
            self.report({'ERROR'}, str(exc))
            return None
        return run

    def _report_prepared(self, run: job_runner.GenerationRun) -> None:
        if run.prepared is not None and not getattr(self, "_notes_reported", False):
            self._notes_reported = True
            _report_list(self, 'INFO', run.prepared.notes)
            _report_list(self, 'WARNING', run.prepared.warnings)

    def execute(self, context):
        if bpy.app.background:  # no event loop: prepare, run the worker and import, blocking
            run = self._start(context, job_runner.start_generation)
            if run is None:
                return {'CANCELLED'}
            self._report_prepared(run)
            job_runner.wait(run, context, on_update=job_runner.progress_printer(
                lambda line: print(f"portrait3d: {line}", flush=True), run))
            return _report_end(self, run)
        run = self._start(context, job_runner.begin_generation)
        if run is None:
            return {'CANCELLED'}
        bpy.app.timers.register(functools.partial(_poll_run_timer, run), first_interval=run.poll_interval)
        return {'FINISHED'}

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        run = self._start(context, job_runner.begin_generation)
        if run is None:
            return {'CANCELLED'}
        self._run = run
        self._add_timer(context)
        context.window_manager.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def _add_timer(self, context) -> None:
        self._interval = self._run.poll_interval
        self._timer = context.window_manager.event_timer_add(self._interval, window=context.window)

    def modal(self, context, event):
        if event.type != 'TIMER' or event.timer is not self._timer:
            return {'PASS_THROUGH'}
        finished = self._run.update(context)  # one small step: a render batch, or a poll of the worker
        _redraw_ui(context)
        self._report_prepared(self._run)
        if not finished:
            if self._run.poll_interval != self._interval:  # waiting for a process: poll less often
                context.window_manager.event_timer_remove(self._timer)
                self._add_timer(context)
            return {'PASS_THROUGH'}
        context.window_manager.event_timer_remove(self._timer)
        return _report_end(self, self._run)


class PORTRAIT3D_OT_generate(_Generates, bpy.types.Operator):
    """Make the camera poses and condition images (rendered in a background Blender, so this one stays responsive), start the generator and import the frames when it is done. DiffPortrait360: without an accepted back view the back view is generated first"""

    bl_idname = "portrait3d.generate"
    bl_label = "Generate"


class PORTRAIT3D_OT_generate_back_view(_Generates, bpy.types.Operator):
    """DiffPortrait360: make the back of the head with the model's back-head network (Back View Seed) and show it here; the condition images are rendered as for Generate. Accept it, regenerate it or use your own photo"""

    bl_idname = "portrait3d.generate_back_view"
    bl_label = "Generate Back View"
    _back_only = True


class PORTRAIT3D_OT_regenerate_back_view(_Generates, bpy.types.Operator):
    """DiffPortrait360: generate the back view again with the next seed"""

    bl_idname = "portrait3d.regenerate_back_view"
    bl_label = "Regenerate"
    _back_only = True

    def _start(self, context, begin):
        s = context.scene.portrait3d
        old = s.back_seed
        s.back_seed = (s.back_view_seed if s.back_origin == 'GENERATED' else s.back_seed) + 1
        run = super()._start(context, begin)
        if run is None:
            s.back_seed = old
        return run


class PORTRAIT3D_OT_accept_back_view(bpy.types.Operator):
    """DiffPortrait360: Generate uses the shown back view as it is (recorded in job.json)"""

    bl_idname = "portrait3d.accept_back_view"
    bl_label = "Accept"
    bl_options = {'REGISTER', 'UNDO'}

    def execute(self, context):
        s = context.scene.portrait3d
        try:
            key = back_view.inputs_key(s.reference_image, job_writer.model_folder(context),
                                       job_writer.output_size(context))
            path = back_view.accept(s, key)
        except (back_view.BackViewError, job_writer.JobSetupError) as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Back view accepted: {path.name}")
        return {'FINISHED'}


class PORTRAIT3D_OT_use_back_photo(bpy.types.Operator):
    """DiffPortrait360: use your own photo of the back of the head as the back view (a second reference, used as it is: its centre square)"""

    bl_idname = "portrait3d.use_back_photo"
    bl_label = "Use Photo..."
    bl_options = {'REGISTER', 'UNDO'}

    filepath: StringProperty(subtype='FILE_PATH', options={'SKIP_SAVE'})
    filter_image: bpy.props.BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    filter_folder: bpy.props.BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        if not self.filepath:
            self.report({'ERROR'}, "No file chosen: pick a photo of the back of the head.")
            return {'CANCELLED'}
        try:
            path = back_view.use_photo(context.scene.portrait3d, self.filepath)
        except back_view.BackViewError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Back view: your photo {path.name}")
        return {'FINISHED'}


class PORTRAIT3D_OT_cancel(bpy.types.Operator):
    """Stop the generation. While condition images render: stop at once, scene unchanged, no worker started. While denoising: stop within the current step and save the last completed one; Generate again continues from it. Frames are written only when a run completes"""

    bl_idname = "portrait3d.cancel"
    bl_label = "Cancel"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        if not job_runner.is_running():
            cls.poll_message_set("Nothing is running")
            return False
        return True

    def execute(self, context):
        run = job_runner.active_run()
        if run is None:
            self.report({'WARNING'}, "Nothing is running")
            return {'CANCELLED'}
        preparing = run.preparing
        run.cancel()
        self.report({'INFO'}, run.status.message if preparing else "Cancelling within the current denoising step")
        return {'FINISHED'}


def frames_on_disk(scene: bpy.types.Scene) -> frame_import.FrameSequence:
    """The output folder's frames for the settings' frame range (FrameImportError when missing)."""
    from .poses import frame_filename

    try:
        out = output_folder(scene)
    except PoseError as exc:
        raise frame_import.FrameImportError(str(exc)) from None
    start, end = frame_range(scene)
    if end < start:
        raise frame_import.FrameImportError(f"The frame range {start}-{end} is empty.")
    return frame_import.frame_sequence([out / frame_filename(f) for f in range(start, end + 1)], start)


class PORTRAIT3D_OT_import_frames(bpy.types.Operator):
    """Bring the generated frames into the scene as a card, camera background and/or sequencer strip (replaces an earlier import)"""

    bl_idname = "portrait3d.import_frames"
    bl_label = "Import Frames"
    bl_options = {'REGISTER', 'UNDO'}

    def execute(self, context):
        scene = context.scene
        modes = tuple(scene.portrait3d.import_as)
        if not modes:
            self.report({'ERROR'}, "Choose at least one Import As option (Card, Camera Background, Sequencer)")
            return {'CANCELLED'}
        try:
            seq = frames_on_disk(scene)
            frame_import.import_frames(scene, active_camera(scene), seq, modes)
        except frame_import.FrameImportError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"Imported {seq.count} frames as {', '.join(m.lower() for m in modes)}")
        return {'FINISHED'}


class PORTRAIT3D_OT_check_worker(_WatchesCommand, bpy.types.Operator):
    """Run the worker Python: import torch and diffusers, show their versions and the GPU"""

    bl_idname = "portrait3d.check_worker"
    bl_label = "Check Worker"
    bl_options = {'REGISTER'}

    python: StringProperty(name="Python", default="", options={'SKIP_SAVE'},
                           description="Python to check (empty: the Worker Python preference)")

    def _show(self, context, result: WorkerCheck) -> set[str]:
        prefs = preferences.get_preferences(context)
        if prefs is not None:
            prefs.check_result = "\n".join([result.summary] + [f"Warning: {w}" for w in result.warnings]
                                            + [f"  {line}" for line in result.lines[:8]])
        self.report({'INFO'} if result.ok else {'ERROR'}, result.summary)
        for warning in result.warnings:
            self.report({'WARNING'}, warning)
        return {'FINISHED'} if result.ok else {'CANCELLED'}

    def execute(self, context):
        self._python = self.python or preferences.worker_python(context)
        problem = worker_env.not_ready_problem(self._python) if self._python else None
        if problem:
            return self._show(context, WorkerCheck(False, problem, []))
        if bpy.app.background:
            return self._show(context, check_worker_python(self._python))
        try:  # in the UI the check runs in the background: importing torch can take many seconds
            cmd = start_worker_check(self._python)
        except WorkerStartError as exc:
            return self._show(context, WorkerCheck(False, str(exc), []))
        prefs = preferences.get_preferences(context)
        if prefs is not None:
            prefs.check_result = f"Checking {self._python}..."
        return self._watch(context, cmd)

    def _tick(self, context, cmd: BackgroundCommand) -> set[str] | None:
        if cmd.poll() is None and cmd.elapsed < CHECK_TIMEOUT:
            return None
        return self._show(context, finish_worker_check(self._python, cmd, CHECK_TIMEOUT))


class PORTRAIT3D_OT_prepare_reference(_WatchesCommand, bpy.types.Operator):
    """Find the face in the reference photo, crop it like the training data and estimate the photo's camera (runs in the worker Python)"""

    bl_idname = "portrait3d.prepare_reference"
    bl_label = "Prepare Reference"
    bl_options = {'REGISTER'}

    def _finish(self, context, result) -> set[str]:
        reference_prep.load_thumbnail(result)
        _report_list(self, 'WARNING', result.warnings)
        self.report({'INFO'}, f"Reference prepared: {result.summary()}")
        return {'FINISHED'}

    def _fail(self, context, message: str) -> set[str]:
        reference_prep.store_error(context.scene.portrait3d, message)
        self.report({'ERROR'}, message)
        return {'CANCELLED'}

    def execute(self, context):
        if bpy.app.background:
            try:
                return self._finish(context, reference_prep.run(context))
            except reference_prep.ReferencePrepError as exc:
                return self._fail(context, str(exc))
        try:
            cmd, self._key, self._out = reference_prep.start(context)
        except reference_prep.ReferencePrepError as exc:
            return self._fail(context, str(exc))
        context.scene.portrait3d.prep_error = ""
        return self._watch(context, cmd)

    def _tick(self, context, cmd: BackgroundCommand) -> set[str] | None:
        rc = cmd.poll()
        if rc is None and cmd.elapsed < reference_prep.TIMEOUT:
            return None
        if rc is None:
            cmd.kill()
            return self._fail(context, f"Preparing the reference did not finish within {reference_prep.TIMEOUT:.0f} s.")
        try:
            result = reference_prep.parse_output(rc, list(cmd.lines), self._out)
        except reference_prep.ReferencePrepError as exc:
            return self._fail(context, str(exc))
        reference_prep.store(context.scene.portrait3d, self._key, result)
        return self._finish(context, result)


classes = (
    PORTRAIT3D_OT_add_head_anchor,
    PORTRAIT3D_OT_add_turntable,
    PORTRAIT3D_OT_export_poses,
    PORTRAIT3D_OT_generate,
    PORTRAIT3D_OT_generate_back_view,
    PORTRAIT3D_OT_regenerate_back_view,
    PORTRAIT3D_OT_accept_back_view,
    PORTRAIT3D_OT_use_back_photo,
    PORTRAIT3D_OT_cancel,
    PORTRAIT3D_OT_import_frames,
    PORTRAIT3D_OT_check_worker,
    PORTRAIT3D_OT_prepare_reference,
)  # the converter's operator lives in model_operators (with the model list)
