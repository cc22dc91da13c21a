"""Preferences > Set Up Worker: make the worker environment in the background, then check it.

The work itself (plan, subprocesses, pip progress, ready stamp) is in ``worker_env`` (no bpy). Here: reading the
preferences, Blender's online-access rule, the modal timer, the log Text datablock, and what happens at the end:
on success the Worker Python preference is set and Check Worker runs by itself; on failure or cancel nothing in
the preferences changes and the status line says what happened and where the log is.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import bpy

from . import preferences, worker_env
from .operators import _redraw_ui

LOG_TEXT = "Portrait3D Worker Setup"
_active: worker_env.SetupRun | None = None
# What the preferences show about the last setup (kept out of the preferences themselves, which a failed or
# cancelled setup must leave as they were).
last_result = {"state": "", "message": "", "log": ""}
_detection: worker_env.Detection | None = None


def active_setup() -> worker_env.SetupRun | None:
    return _active if _active is not None and _active.state == "running" else None


def stop_all() -> None:
    """Cancel a running setup (the add-on is being disabled or Blender quits)."""
    run = active_setup()
    if run is not None:
        run.cancel()
        run.poll()


def _detect() -> None:
    global _detection
    _detection = worker_env.detect_accelerator()


_detector = threading.Thread(target=_detect, name="portrait3d-detect-gpu", daemon=True)


def detection(wait: bool = True) -> worker_env.Detection | None:
    """This machine's GPU kind (nvidia-smi / rocminfo / platform), detected once per session in a thread so a slow
    nvidia-smi never stalls drawing; ``wait=False`` returns None while it runs."""
    if _detection is None:
        if not _detector.is_alive():
            try:
                _detector.start()
            except RuntimeError:  # already ran
                pass
        if wait:
            _detector.join(timeout=15.0)
    return _detection or (worker_env.Detection("CPU", "detection did not finish: assuming CPU") if wait else None)


def env_dir() -> Path:
    return preferences.user_data_dir() / worker_env.ENV_FOLDER


def log_path() -> Path:
    return preferences.user_data_dir() / "logs" / "worker_setup.log"


def _path_or_none(value: str) -> Path | None:
    value = value.strip()
    return Path(bpy.path.abspath(value)).expanduser() if value else None


def setup_options(prefs) -> worker_env.SetupOptions:
    accelerator = prefs.setup_accelerator
    if accelerator == 'AUTO':
        accelerator = detection().accelerator
    base = _path_or_none(prefs.setup_base_python) or worker_env.default_base_python()
    return worker_env.SetupOptions(
        env_dir=env_dir(), base_python=base, accelerator=accelerator,
        wheel_folder=_path_or_none(prefs.setup_wheel_folder), index_url=prefs.setup_index_url.strip(),
        share_from=_path_or_none(prefs.setup_share_from), online=bool(bpy.app.online_access),
        extra_requirements=prefs.setup_extra_packages.split())


def log_text(reset: bool = False) -> bpy.types.Text:
    text = bpy.data.texts.get(LOG_TEXT) or bpy.data.texts.new(LOG_TEXT)
    if reset:
        text.clear()
    return text


class PORTRAIT3D_OT_setup_worker(bpy.types.Operator):
    """Make the worker's Python environment in the extension's user folder: a virtual environment with torch for
    this machine's GPU and the pinned worker packages. Runs in the background; press again to repair or update"""

    bl_idname = "portrait3d.setup_worker"
    bl_label = "Set Up Worker"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        if active_setup() is not None:
            cls.poll_message_set("A worker setup is already running")
            return False
        return True

    def _fail(self, message: str) -> set[str]:
        last_result.update(state="failed", message=message, log="")
        self.report({'ERROR'}, message)
        return {'CANCELLED'}

    def execute(self, context):
        global _active
        prefs = preferences.get_preferences(context)
        if prefs is None:
            return self._fail("Set Up Worker needs the extension enabled (Preferences > Add-ons > Portrait 3D).")
        if active_setup() is not None:
            return self._fail("A worker setup is already running: wait for it or press Cancel Setup.")
        try:
            options = setup_options(prefs)
            steps = worker_env.plan_setup(options)
            run = worker_env.SetupRun(options, steps, log_path())
        except worker_env.SetupError as exc:
            if str(exc) == "offline":
                return self._fail(worker_env.offline_message("download the worker packages",
                                                             bpy.app.online_access_override)
                                  + " Or set a Wheel Folder (Studio Options) to install offline.")
            return self._fail(str(exc))
        except OSError as exc:
            return self._fail(f"Cannot write into {env_dir().parent}: {exc.strerror or exc}. Check the disk.")
        _active = run
        self._run = run
        log_text(reset=True)
        last_result.update(state="running", message="", log=str(run.log_path))
        if bpy.app.background:  # no event loop: block until done
            run.wait(on_update=_pump)
            return _complete(run, context, self.report)
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.25, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def invoke(self, context, event):
        return self.execute(context)

    def modal(self, context, event):
        if event.type != 'TIMER' or event.timer is not self._timer:
            return {'PASS_THROUGH'}
        self._run.poll()
        _pump(self._run)
        _redraw_ui(context)
        if self._run.state == "running":
            return {'PASS_THROUGH'}
        context.window_manager.event_timer_remove(self._timer)
        return _complete(self._run, context, self.report)

    def cancel(self, context):
        """Blender ended the modal (its window closed, a file was loaded): keep following the run from a timer."""
        bpy.app.timers.register(functools.partial(_follow, self._run), first_interval=0.25)


def _pump(run: worker_env.SetupRun) -> None:
    """New output lines into the log Text (found by name: a file reload may have replaced it)."""
    lines = run.new_lines()
    if lines:
        log_text().write("\n".join(lines) + "\n")


def _complete(run: worker_env.SetupRun, context, report) -> set[str]:
    """The end of a setup: on success set Worker Python and run Check Worker; otherwise change no preference."""
    _pump(run)
    log = f"The log is in the Text '{LOG_TEXT}' and in {run.log_path}."
    if run.state != "done":
        last_result.update(state=run.state, message=f"{run.message} {log}", log=str(run.log_path))
        report({'WARNING'} if run.state == "cancelled" else {'ERROR'}, f"{run.message} {log}")
        return {'CANCELLED'}
    python = worker_env.env_python(run.options.env_dir)
    prefs = preferences.get_preferences(context)
    if prefs is not None:
        prefs.worker_python = str(python)
    last_result.update(state="done", message=f"Worker environment ready: {python}", log=str(run.log_path))
    report({'INFO'}, f"Worker environment ready; Worker Python is now {python}. Checking it...")
    _redraw_ui(context)
    window = context.window or next(iter(context.window_manager.windows), None)
    if window is not None and not bpy.app.background:
        with context.temp_override(window=window):
            bpy.ops.portrait3d.check_worker(python=str(python))
    else:
        bpy.ops.portrait3d.check_worker(python=str(python))
    return {'FINISHED'}


def _follow(run: worker_env.SetupRun) -> float | None:
    """bpy.app.timers callback for a run whose modal operator was ended by Blender."""
    run.poll()
    _pump(run)
    if run.state == "running":
        return 0.25
    _complete(run, bpy.context, lambda kinds, message: print(f"Portrait 3D: {message}"))
    return None


class PORTRAIT3D_OT_cancel_setup(bpy.types.Operator):
    """Stop the running worker setup now (the environment stays marked not ready; Set Up Worker continues it)"""

    bl_idname = "portrait3d.cancel_setup"
    bl_label = "Cancel Setup"
    bl_options = {'REGISTER'}

    @classmethod
    def poll(cls, context):
        if active_setup() is None:
            cls.poll_message_set("No worker setup is running")
            return False
        return True

    def execute(self, context):
        run = active_setup()
        if run is None:
            self.report({'WARNING'}, "No worker setup is running")
            return {'CANCELLED'}
        run.cancel()
        return {'FINISHED'}


def draw_worker_section(layout, prefs) -> None:
    """The Worker part of the preferences: environment state, Set Up Worker, its options, Worker Python."""
    box = layout.box()
    box.label(text="Worker (runs the generator in its own Python)", icon='CONSOLE')
    run = active_setup()
    if run is not None:
        box.progress(factor=run.fraction, type='BAR', text=run.status_text()[:120])
        box.operator("portrait3d.cancel_setup", icon='CANCEL')
    else:
        state, words = worker_env.env_state(env_dir())
        box.label(text=words, icon='CHECKMARK' if state == "ready" else 'INFO')
        if last_result["state"] in ("failed", "cancelled"):
            for i, line in enumerate(_wrap(last_result["message"])):
                box.label(text=line, icon='ERROR' if i == 0 else 'BLANK1')
        box.operator("portrait3d.setup_worker", icon='PACKAGE',
                     text="Set Up Worker" if state in ("missing",) else "Set Up Worker (repair / update)")
    row = box.row()
    row.prop(prefs, "setup_accelerator")
    found = detection(wait=False)
    box.label(text=f"Detected: {found.description}" if found else "Detecting the GPU...", icon='INFO')
    if not bpy.app.online_access:
        box.label(text=worker_env.offline_message("download packages", bpy.app.online_access_override)
                  + " A Wheel Folder works offline.", icon='INTERNET_OFFLINE')
    box.prop(prefs, "show_setup_options", icon='TRIA_DOWN' if prefs.show_setup_options else 'TRIA_RIGHT',
             emboss=False)
    if prefs.show_setup_options:
        col = box.column()
        col.prop(prefs, "setup_base_python")
        col.prop(prefs, "setup_wheel_folder")
        col.prop(prefs, "setup_index_url")
        col.prop(prefs, "setup_share_from")
        col.prop(prefs, "setup_extra_packages")


def _wrap(text: str, width: int = 110) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + ([line] if line else [])


classes = (PORTRAIT3D_OT_setup_worker, PORTRAIT3D_OT_cancel_setup)
