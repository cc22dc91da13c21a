"""Preferences > Models: the model list and its actions (set default, delete, add a folder, get the official
weights and convert them, download from a hub). Conversion and download run in the worker Python in the
background with real progress (bytes done, ETA) and can be cancelled."""
from __future__ import annotations

import functools
from pathlib import Path

import bpy
from bpy.props import StringProperty

from . import model_manager, preferences
from .job_writer import JobSetupError, check_model_folder
from .operators import _redraw_ui, _WatchesCommand
from .worker_process import BackgroundCommand, WorkerStartError

# The official release's repository; its README links the single-file checkpoint (a file host that needs a browser).
OFFICIAL_PAGE = "https://github.com/FreedomGu/DiffPortrait3D"
_entries: list[model_manager.ModelEntry] | None = None


class ModelTask:
    """The conversion or download running now (one at a time), for the preferences to draw and to cancel."""

    current: "ModelTask | None" = None

    def __init__(self, kind: str, cmd: BackgroundCommand, out: Path, models_dir: Path) -> None:
        self.kind, self.cmd, self.out, self.models_dir = kind, cmd, out, models_dir
        self.progress = model_manager.ByteProgress()
        self.cancelled = False

    def update(self) -> None:
        for line in reversed(list(self.cmd.lines)):
            if line.startswith(model_manager.PROGRESS_PREFIX):
                self.progress.feed(line)
                break

    def words(self) -> str:
        verb = "Converting" if self.kind == "convert" else "Downloading"
        return f"{verb} {self.out.name}: {self.progress.words()}"

    def cancel(self) -> None:
        self.cancelled = True
        self.cmd.kill()

    def cleanup(self) -> None:
        """After a cancel or failure: a conversion's hidden staging folder goes; a download's partial folder stays
        (the next download of the same name resumes it)."""
        if self.kind == "convert":
            model_manager.remove_partial_outputs(self.models_dir, self.out.name)

    def cancelled_words(self) -> str:
        if self.kind == "convert":
            return f"Conversion cancelled; nothing was written to {self.out}."
        return (f"Download cancelled; {self.out.name} is not in the list. Download it again with the same name to "
                "resume.")


def stop_all() -> None:
    """Stop a running conversion or download (the add-on is being disabled)."""
    if ModelTask.current is not None:
        ModelTask.current.cancel()
        ModelTask.current = None


def _check(path: Path) -> str:
    try:
        check_model_folder(path)
    except JobSetupError as exc:
        return str(exc).split(". ")[0]
    return ""


def entries(context=None, refresh: bool = False) -> list[model_manager.ModelEntry]:
    global _entries
    if _entries is None or refresh:
        prefs = preferences.get_preferences(context)
        extra = [Path(bpy.path.abspath(item.path)) for item in prefs.extra_model_folders] if prefs else []
        _entries = model_manager.scan(preferences.models_dir(context), extra, _check)
    return _entries


def default_path(context=None) -> Path:
    """The model Generate uses when a scene sets none: the preference, else the bundled model."""
    value = preferences.default_model(context)
    return Path(bpy.path.abspath(value)) if value else model_manager.bundled_model()


def _same(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def draw_models_section(layout, prefs) -> None:
    context = bpy.context
    box = layout.box()
    row = box.row()
    row.label(text="Models", icon='FILE_3D')
    row.operator("portrait3d.model_refresh", text="", icon='FILE_REFRESH')
    default = default_path(context)
    for e in entries(context):
        row = box.row()
        is_default = _same(e.path, default)
        label = f"{e.name}  ({e.source}, {model_manager.human_size(e.size_bytes)}"
        label += f", {e.resolution} px)" if e.resolution else ")"
        row.label(text=label, icon='CHECKMARK' if is_default else ('ERROR' if e.problem else 'DOT'))
        if e.problem:
            row.label(text=e.problem)
        sub = row.row(align=True)
        op = sub.operator("portrait3d.model_set_default", text="Default" if is_default else "Set Default")
        op.path = str(e.path)
        sub.enabled = not is_default and not e.problem
        if e.managed and e.source != "bundled":
            row.operator("portrait3d.model_delete", text="", icon='TRASH').path = str(e.path)
        if e.source == "added":
            row.operator("portrait3d.model_remove_from_list", text="", icon='X').path = str(e.path)
    task = ModelTask.current
    if task is not None:
        box.progress(factor=task.progress.fraction, type='BAR', text=task.words()[:120])
        box.operator("portrait3d.cancel_model_task", icon='CANCEL')
    else:
        row = box.row()
        row.operator("portrait3d.get_official_weights", icon='URL')
        row.operator("portrait3d.download_model", icon='IMPORT')
        row = box.row()
        row.operator("portrait3d.convert_checkpoint", text="Convert a Downloaded Checkpoint...", icon='IMPORT')
        row.operator("portrait3d.model_add_folder", icon='FILE_FOLDER')
    if prefs.convert_status:
        box.label(text=prefs.convert_status[:200])
    box.prop(prefs, "models_folder")


class PORTRAIT3D_OT_model_refresh(bpy.types.Operator):
    """Read the model folders again (sizes, resolutions)"""

    bl_idname = "portrait3d.model_refresh"
    bl_label = "Refresh Models"

    def execute(self, context):
        entries(context, refresh=True)
        return {'FINISHED'}


class PORTRAIT3D_OT_model_set_default(bpy.types.Operator):
    """Use this model when a scene sets no Model Folder"""

    bl_idname = "portrait3d.model_set_default"
    bl_label = "Set Default Model"
    path: StringProperty(options={'SKIP_SAVE'})

    def execute(self, context):
        prefs = preferences.get_preferences(context)
        problem = _check(Path(self.path))
        if prefs is None or problem:
            self.report({'ERROR'}, problem or "Enable the extension first")
            return {'CANCELLED'}
        # The bundled model is the default when the preference is empty (it moves with the extension).
        prefs.default_model = "" if _same(Path(self.path), model_manager.bundled_model()) else self.path
        self.report({'INFO'}, f"Default model: {Path(self.path).name}")
        return {'FINISHED'}


class PORTRAIT3D_OT_model_delete(bpy.types.Operator):
    """Delete this model folder from disk (only folders this add-on made)"""

    bl_idname = "portrait3d.model_delete"
    bl_label = "Delete Model"
    path: StringProperty(options={'SKIP_SAVE'})

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event, title="Delete model",
                                                     message=f"Delete {self.path} from disk?")

    def execute(self, context):
        path = Path(self.path)
        try:
            model_manager.delete_model(path, preferences.models_dir(context))
        except (model_manager.ModelManagerError, OSError) as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        prefs = preferences.get_preferences(context)
        if prefs is not None and prefs.default_model and _same(Path(bpy.path.abspath(prefs.default_model)), path):
            prefs.default_model = ""
        entries(context, refresh=True)
        self.report({'INFO'}, f"Deleted {path}")
        return {'FINISHED'}


class PORTRAIT3D_OT_model_add_folder(bpy.types.Operator):
    """Add an existing model folder (one with model_index.json) to the list"""

    bl_idname = "portrait3d.model_add_folder"
    bl_label = "Add Model Folder..."
    directory: StringProperty(subtype='DIR_PATH', options={'SKIP_SAVE'})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        prefs = preferences.get_preferences(context)
        path = Path(bpy.path.abspath(self.directory))
        problem = _check(path)
        if prefs is None or problem:
            self.report({'ERROR'}, problem or "Enable the extension first")
            return {'CANCELLED'}
        if not any(_same(Path(bpy.path.abspath(i.path)), path) for i in prefs.extra_model_folders):
            prefs.extra_model_folders.add().path = str(path)
        entries(context, refresh=True)
        return {'FINISHED'}


class PORTRAIT3D_OT_model_remove_from_list(bpy.types.Operator):
    """Remove this folder from the list (nothing is deleted from disk)"""

    bl_idname = "portrait3d.model_remove_from_list"
    bl_label = "Remove from List"
    path: StringProperty(options={'SKIP_SAVE'})

    def execute(self, context):
        prefs = preferences.get_preferences(context)
        if prefs is not None:
            for i, item in enumerate(prefs.extra_model_folders):
                if _same(Path(bpy.path.abspath(item.path)), Path(self.path)):
                    prefs.extra_model_folders.remove(i)
                    break
        entries(context, refresh=True)
        return {'FINISHED'}


class PORTRAIT3D_OT_cancel_model_task(bpy.types.Operator):
    """Stop the running conversion or download (a conversion leaves nothing behind; a download resumes later)"""

    bl_idname = "portrait3d.cancel_model_task"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return ModelTask.current is not None

    def execute(self, context):
        if ModelTask.current is not None:
            ModelTask.current.cancel()
        return {'FINISHED'}


class _ModelTaskOperator(_WatchesCommand):
    """Runs one ModelTask: blocking in background mode, else from the modal timer."""

    kind = ""

    def _begin(self, context, args: list[str], out: Path) -> set[str]:
        if ModelTask.current is not None:
            self.report({'ERROR'}, "A conversion or download is already running: wait for it or cancel it.")
            return {'CANCELLED'}
        try:
            models_dir = preferences.models_dir(context)
            models_dir.mkdir(parents=True, exist_ok=True)
            cmd = BackgroundCommand(self.python or preferences.worker_python(context), args)
        except (WorkerStartError, OSError) as exc:
            self.report({'ERROR'}, f"{exc} (Set Up Worker in these preferences makes a worker Python.)")
            return {'CANCELLED'}
        ModelTask.current = self._task = ModelTask(self.kind, cmd, out, models_dir)
        _set_status(context, self._task.words())
        if bpy.app.background:
            cmd.wait()
            return self._finish(context)
        return self._watch(context, cmd)

    def _tick(self, context, cmd: BackgroundCommand) -> set[str] | None:
        self._task.update()
        if cmd.poll() is None:
            _redraw_ui(context)
            return None
        return self._finish(context)

    def _finish(self, context) -> set[str]:
        return finish_task(self._task, context, self.report)

    def cancel(self, context):
        """Blender ended the modal (its window closed): keep following the task from a timer."""
        bpy.app.timers.register(functools.partial(_follow, self._task), first_interval=0.5)


def _set_status(context, text: str) -> None:
    prefs = preferences.get_preferences(context)
    if prefs is not None:
        prefs.convert_status = text


def finish_task(task: ModelTask, context, report) -> set[str]:
    """The end of a conversion or download: log, clean up or mark and make default; one message."""
    if ModelTask.current is task:
        ModelTask.current = None
    task.update()
    rc = task.cmd.poll()
    log = preferences.user_data_dir() / "logs" / f"{task.kind}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(task.cmd.lines) + "\n")
    except OSError:
        pass
    if task.cancelled or rc != 0:
        task.cleanup()
        entries(context, refresh=True)
        if task.cancelled:
            message = task.cancelled_words()
        else:
            errors = [line[len("error: "):] for line in task.cmd.lines if line.startswith("error: ")]
            message = (f"{'Conversion' if task.kind == 'convert' else 'Download'} failed: "
                       f"{errors[-1] if errors else ' | '.join(task.cmd.tail(2))} (log: {log})")
        _set_status(context, message)
        report({'WARNING'} if task.cancelled else {'ERROR'}, message)
        return {'CANCELLED'}
    if model_manager.read_marker(task.out) is None:
        model_manager.write_marker(task.out, source=task.kind)
    entries(context, refresh=True)
    problem = _check(task.out)
    if problem:  # e.g. a checkpoint without VAE or CLIP weights: usable only after adding them
        message = f"{task.out.name} was written but cannot generate yet: {problem}. It was not made the default."
        _set_status(context, message)
        report({'WARNING'}, message)
        return {'FINISHED'}
    prefs = preferences.get_preferences(context)
    if prefs is not None:
        prefs.default_model = str(task.out)
    message = f"{task.out.name} is ready ({task.cmd.elapsed:.0f} s) and is now the default model"
    _set_status(context, message)
    report({'INFO'}, message)
    return {'FINISHED'}


def _follow(task: ModelTask) -> float | None:
    task.update()
    if task.cmd.poll() is None:
        _redraw_ui(bpy.context)
        return 0.5
    finish_task(task, bpy.context, lambda kinds, message: print(f"Portrait 3D: {message}"))
    _redraw_ui(bpy.context)
    return None


class PORTRAIT3D_OT_convert_checkpoint(_ModelTaskOperator, bpy.types.Operator):
    """Pick the downloaded official DiffPortrait3D checkpoint and convert it into a model folder (runs in the worker
    Python, in the background, with progress)"""

    bl_idname = "portrait3d.convert_checkpoint"
    bl_label = "Convert Official Checkpoint..."
    bl_options = {'REGISTER'}
    kind = "convert"

    filepath: StringProperty(subtype='FILE_PATH', options={'SKIP_SAVE'})
    filter_glob: StringProperty(default="*.th;*.ckpt;*.pt;*.pth;*.safetensors", options={'HIDDEN'})
    model_name: StringProperty(name="Model Name", default="diffportrait3d",
                               description="Folder name of the converted model inside the models folder")
    config: StringProperty(name="Config", default="", options={'SKIP_SAVE', 'HIDDEN'},
                           description="Optional JSON of the network parameters (default: read from the weights)")
    python: StringProperty(name="Python", default="", options={'SKIP_SAVE', 'HIDDEN'})

    def invoke(self, context, event):
        if bpy.app.background:
            return self.execute(context)
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        ckpt = Path(bpy.path.abspath(self.filepath))
        if not ckpt.is_file():
            self.report({'ERROR'}, f"Checkpoint not found: {ckpt}. Pick the downloaded official file.")
            return {'CANCELLED'}
        try:
            out = model_manager.check_new_name(preferences.models_dir(context), self.model_name)
        except model_manager.ModelManagerError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        args = ["-m", "dp3d_core.convert", str(ckpt), str(out), "--progress"]
        if self.config:
            args += ["--config", str(Path(bpy.path.abspath(self.config)))]
        return self._begin(context, args, out)



class PORTRAIT3D_OT_get_official_weights(bpy.types.Operator):
    """Open the official DiffPortrait3D page in the browser (download the checkpoint there), then pick the
    downloaded file to convert it"""

    bl_idname = "portrait3d.get_official_weights"
    bl_label = "Get Official Weights..."

    def execute(self, context):
        bpy.ops.wm.url_open(url=OFFICIAL_PAGE)
        bpy.ops.portrait3d.convert_checkpoint('INVOKE_DEFAULT')
        return {'FINISHED'}


class PORTRAIT3D_OT_download_model(_ModelTaskOperator, bpy.types.Operator):
    """Download a model folder from a Hugging Face-style hub repository (needs online access)"""

    bl_idname = "portrait3d.download_model"
    bl_label = "Download from Hub..."
    bl_options = {'REGISTER'}
    kind = "download"

    repo_id: StringProperty(name="Repository", description="Hub repository id, e.g. user/model-name")
    model_name: StringProperty(name="Model Name", default="",
                               description="Folder name inside the models folder (empty: the repository name)")
    revision: StringProperty(name="Revision", default="", description="Branch, tag or commit (empty: main)")
    endpoint: StringProperty(name="Hub URL", default="",
                             description="A hub mirror (empty: huggingface.co or the HF_ENDPOINT variable)")
    python: StringProperty(name="Python", default="", options={'SKIP_SAVE', 'HIDDEN'})

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self, width=420)

    def execute(self, context):
        if not bpy.app.online_access:
            from .worker_env import offline_message
            self.report({'ERROR'}, offline_message("download models", bpy.app.online_access_override))
            return {'CANCELLED'}
        repo = self.repo_id.strip()
        if not repo or repo.count("/") > 1 or " " in repo:
            self.report({'ERROR'}, "Repository must be a hub id like 'user/model-name'.")
            return {'CANCELLED'}
        try:
            out = model_manager.check_new_name(preferences.models_dir(context),
                                               self.model_name or repo.split("/")[-1])
        except model_manager.ModelManagerError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        args = ["-m", "dp3d_core.hub_download", repo, str(out), "--progress"]
        if self.revision.strip():
            args += ["--revision", self.revision.strip()]
        if self.endpoint.strip():
            args += ["--endpoint", self.endpoint.strip()]
        return self._begin(context, args, out)



classes = (
    PORTRAIT3D_OT_model_refresh,
    PORTRAIT3D_OT_model_set_default,
    PORTRAIT3D_OT_model_delete,
    PORTRAIT3D_OT_model_add_folder,
    PORTRAIT3D_OT_model_remove_from_list,
    PORTRAIT3D_OT_cancel_model_task,
    PORTRAIT3D_OT_convert_checkpoint,
    PORTRAIT3D_OT_get_official_weights,
    PORTRAIT3D_OT_download_model,
)
