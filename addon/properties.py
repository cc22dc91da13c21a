"""Scene settings: ``scene.portrait3d``."""
from __future__ import annotations

import math

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .core import face_pose

SCHEDULERS = (
    ("DDIM", "DDIM", "Denoising diffusion implicit models (the paper's sampler)"),
    ("DPMPP_2M", "DPM++ 2M", "DPM-Solver++ second order multistep"),
    ("UNIPC", "UniPC", "Unified predictor-corrector multistep"),
)
CONDITION_SOURCES = (
    ("PROCEDURAL", "Procedural Head", "Render the view conditions from a built-in procedural head"),
    ("MESH", "Custom Mesh", "Render the view conditions from a head mesh in the scene"),
    ("IMAGE_FOLDER", "Image Folder", "Read one condition image per frame from a folder"),
)
DEVICES = (
    ("AUTO", "Auto", "CUDA if available, then Apple MPS, else CPU"),
    ("CUDA", "CUDA", "NVIDIA GPU"),
    ("MPS", "MPS", "Apple Silicon GPU"),
    ("CPU", "CPU", "Processor only (very slow)"),
)
MEMORY_MODES = (
    ("NORMAL", "Normal", "Fastest; one 8-view window at 512 px needs about 10 GiB of GPU memory in fp16"),
    ("LOW", "Low", "Guidance passes one after the other, sliced attention and VAE decode (about 7.5 GiB)"),
    ("LOWEST", "Lowest", "Low, plus each network on the GPU only while it runs (about 4.6 GiB, several times "
                         "slower)"),
)
SIZE_MODES = (
    ("MODEL", "Model's Resolution", "The size the selected model was trained at, read from its folder (64 px for "
                                    "the bundled small model, 512 px for DiffPortrait3D)"),
    ("CUSTOM", "Custom", "Generate at Custom Size (a multiple of 64); above the model's resolution runs much "
                         "slower and is outside what it learned"),
)
IMPORT_MODES = (
    ("CARD", "Card", "A plane in front of the camera showing the frames (emission image sequence)"),
    ("BACKGROUND", "Camera Background", "The camera's background image sequence (viewport only)"),
    ("SEQUENCER", "Sequencer Strip", "An image strip in the Video Sequencer"),
)

BACK_ORIGINS = (
    ("NONE", "None", "No back view yet"),
    ("GENERATED", "Generated", "Made by the model's back-head network"),
    ("PHOTO", "Photo", "The artist's own photo of the back of the head"),
)

# Blender 4.5+ warns about "//" paths unless the property says it supports them.
_PATH_OPTIONS = {'PATH_SUPPORTS_BLEND_RELATIVE'} if bpy.app.version >= (4, 5, 0) else set()


def _prep_inputs_changed(self, context) -> None:
    from .reference_prep import inputs_changed

    inputs_changed(self, context)


def _set_pose_toggled(self, context) -> None:
    """Turning *Set Pose by Hand* on starts from the pose found in the photo (when one is stored)."""
    from .reference_prep import stored

    if self.prep_set_pose:
        found = stored(self, fresh=False)
        if found is not None:
            # item access: no update (and no preparation) yet, so no clamping either: clamp here
            for name, value, limit in (("prep_yaw", found.found_yaw, face_pose.SET_YAW_LIMIT),
                                       ("prep_pitch", found.found_pitch, face_pose.SET_PITCH_LIMIT)):
                self[name] = math.radians(max(-limit, min(limit, value)))
    _prep_inputs_changed(self, context)


def _custom_size_set(self, _context) -> None:
    """Typing a size (or a script setting one) means a custom size."""
    if self.size_mode != 'CUSTOM':
        self.size_mode = 'CUSTOM'


def _poll_empty(_self, obj: bpy.types.Object) -> bool:
    return obj.type == 'EMPTY'


def _poll_camera(_self, obj: bpy.types.Object) -> bool:
    return obj.type == 'CAMERA'


def _poll_mesh(_self, obj: bpy.types.Object) -> bool:
    return obj.type == 'MESH'


class PORTRAIT3D_PG_settings(bpy.types.PropertyGroup):
    reference_image: StringProperty(
        name="Reference Image", subtype='FILE_PATH', options=_PATH_OPTIONS,
        description="The portrait photo to turn into views", update=_prep_inputs_changed)
    head_anchor: PointerProperty(
        name="Head Anchor", type=bpy.types.Object, poll=_poll_empty,
        description="Empty at the head's centre; its -Y axis points out of the face, +Z up")
    camera: PointerProperty(
        name="Camera", type=bpy.types.Object, poll=_poll_camera,
        description="Camera whose views are generated (empty: the scene camera)")

    use_scene_range: BoolProperty(
        name="Use Scene Frame Range", default=True,
        description="Generate the scene's frame range; off: use the range below")
    frame_start: IntProperty(name="Start", default=1, min=0)
    frame_end: IntProperty(name="End", default=16, min=0)

    size_mode: EnumProperty(name="Output Size", items=SIZE_MODES, default="MODEL",
                            description="Width and height of the generated frames (and of the turntable camera)")
    output_size: IntProperty(name="Custom Size", default=512, min=64, max=2048, step=64, subtype='PIXEL',
                             description="Width and height of generated frames with Output Size set to Custom "
                                         "(setting it switches Output Size to Custom)",
                             update=_custom_size_set)
    steps: IntProperty(name="Steps", default=50, min=1, max=1000, description="Denoising steps")
    guidance: FloatProperty(name="Guidance", default=3.0, min=0.0, max=30.0,
                            description="Classifier-free guidance scale")
    eta: FloatProperty(name="Eta", default=0.0, min=0.0, max=1.0,
                       description="DDIM stochasticity (0 = deterministic)")
    seed: IntProperty(name="Seed", default=0, min=0)
    scheduler: EnumProperty(name="Scheduler", items=SCHEDULERS, default="DDIM")

    condition_source: EnumProperty(name="Condition Source", items=CONDITION_SOURCES, default="PROCEDURAL")
    condition_mesh: PointerProperty(name="Condition Mesh", type=bpy.types.Object, poll=_poll_mesh,
                                    description="Head mesh rendered as the view condition")
    condition_folder: StringProperty(name="Condition Folder", subtype='DIR_PATH',
                                     options=_PATH_OPTIONS,
                                     description="Folder with one condition image per frame")

    model_folder: StringProperty(name="Model Folder", subtype='DIR_PATH', options=_PATH_OPTIONS,
                                 description="Converted model folder (empty: the one in the add-on preferences)")
    proxy_seed: IntProperty(name="Proxy Head Seed", default=0, min=0,
                            description="Identity and expression of the procedural proxy head")
    use_proxy_views: BoolProperty(
        name="3D-Aware Noise", default=False,
        description="Project the reference onto the proxy head and start from its views "
                    "(more 3D-consistent, less faithful to fine detail)")
    device: EnumProperty(name="Device", items=DEVICES, default="AUTO")
    memory: EnumProperty(name="GPU Memory", items=MEMORY_MODES, default="NORMAL",
                         description="Trade speed for GPU memory (the picture stays the same)")
    use_compile: BoolProperty(
        name="Compile", default=False,
        description="torch.compile the networks: the first step takes minutes, later steps run about 1.4x faster "
                    "(worth it for long turntables; needs a C compiler, and triton on CUDA)")
    import_as: EnumProperty(name="Import As", items=IMPORT_MODES, options={'ENUM_FLAG'}, default={'CARD'},
                            description="How finished frames come into the scene")
    output_folder: StringProperty(name="Output Folder", subtype='DIR_PATH', options=_PATH_OPTIONS,
                                  default="//portrait3d/",
                                  description="Where frames and dataset.json are written")

    use_reference_prep: BoolProperty(
        name="Prepare Reference", default=True, update=_prep_inputs_changed,
        description="Find the face in the photo, crop it the way the model was trained (eyes, chin and size like "
                    "the official samples) and estimate where the photo's camera was. Off: the photo's centre "
                    "square is used as it is, seen from the front")
    prep_scale: FloatProperty(
        name="Crop Scale", default=1.0, min=0.5, max=2.0, step=1, update=_prep_inputs_changed,
        description="Nudge the found crop: larger shows more around the face")
    prep_offset_x: FloatProperty(
        name="Crop Offset X", default=0.0, min=-0.5, max=0.5, step=1, subtype='FACTOR',
        update=_prep_inputs_changed,
        description="Move the found crop right (a fraction of its side)")
    prep_offset_y: FloatProperty(
        name="Crop Offset Y", default=0.0, min=-0.5, max=0.5, step=1, subtype='FACTOR',
        update=_prep_inputs_changed,
        description="Move the found crop down (a fraction of its side)")
    prep_set_pose: BoolProperty(
        name="Set Pose by Hand", default=False, update=_set_pose_toggled,
        description="Use the yaw and pitch below instead of the ones found in the photo (pitch is the least "
                    "certain). The crop, roll, 3D-aware noise and Start at the Photo's View follow")
    prep_yaw: FloatProperty(
        name="Yaw", default=0.0, min=-math.radians(face_pose.SET_YAW_LIMIT),
        max=math.radians(face_pose.SET_YAW_LIMIT), subtype='ANGLE',
        update=_prep_inputs_changed,
        description="How far the subject is turned: positive when turned to its own left (the nose points to the "
                    "photo's right)")
    prep_pitch: FloatProperty(
        name="Pitch", default=0.0, min=-math.radians(face_pose.SET_PITCH_LIMIT),
        max=math.radians(face_pose.SET_PITCH_LIMIT), subtype='ANGLE',
        update=_prep_inputs_changed,
        description="Where the photo's camera was: positive when the photo was taken from above the head")
    prep_result: StringProperty(name="Prepared Reference", default="", options={'HIDDEN'},
                                description="The last preparation's result (JSON)")
    prep_key: StringProperty(name="Prepared Inputs", default="", options={'HIDDEN'},
                             description="What the stored preparation was made from")
    prep_error: StringProperty(name="Preparation Error", default="", options={'HIDDEN'})

    turntable_from_photo: BoolProperty(
        name="Start at the Photo's View", default=False,
        description="The first frame looks at the head from where the photo was taken (its prepared yaw and "
                    "pitch) and the sweep of twice the Yaw Range turns toward the other side; the Pitch setting "
                    "is replaced by the photo's")
    turntable_full_turn: BoolProperty(
        name="Full Turn", default=True,
        description="With a DiffPortrait360 model: the camera goes once around the head in equal steps from the "
                    "front (or the photo's view), the last frame one step before the first, and the frames are "
                    "generated as a closed loop (Yaw Range is not used). DiffPortrait3D models, which only saw "
                    "the front of heads, always use Yaw Range")
    turntable_frames: IntProperty(name="Frames", default=16, min=1, max=1000,
                                  description="Number of frames of the turntable")
    turntable_yaw_range: FloatProperty(
        name="Yaw Range", subtype='ANGLE', default=math.radians(45.0), min=0.0, max=math.pi,
        description="The camera sweeps from -range to +range around the head "
                    "(180 degrees: a full turn without repeating the first frame)")
    turntable_pitch: FloatProperty(
        name="Pitch", subtype='ANGLE', default=0.0, min=-math.radians(89.0), max=math.radians(89.0),
        description="Camera elevation; positive looks down on the head from above")


    # The back of the head (DiffPortrait360 models; see back_view.py).
    back_seed: IntProperty(name="Back View Seed", default=0, min=0,
                           description="Seed of the next back view the back-head model generates")
    back_view: StringProperty(name="Back View", default="", subtype='FILE_PATH', options={'HIDDEN'},
                              description="The back view shown in the panel: a generated one or your photo")
    back_origin: EnumProperty(name="Back View Origin", items=BACK_ORIGINS, default='NONE', options={'HIDDEN'})
    back_view_seed: IntProperty(name="Shown Back View Seed", default=0, min=0, options={'HIDDEN'},
                                description="The seed the shown back view was generated with")
    back_accepted: BoolProperty(name="Back View Accepted", default=False, options={'HIDDEN'},
                                description="Generate uses the shown back view as it is")
    back_key: StringProperty(name="Back View Inputs", default="", options={'HIDDEN'},
                             description="What the shown generated back view was made from")


class PORTRAIT3D_PG_progress(bpy.types.PropertyGroup):
    """Run-time state of the current or last generation (on the window manager, not saved)."""

    running: BoolProperty(name="Running", default=False)
    preparing: BoolProperty(name="Preparing", default=False,
                            description="Poses and condition images are being made, before the worker starts")
    resumed_step: IntProperty(name="Resumed From Step", default=-1,
                              description="The denoising step this run continued from (-1: it started afresh)")
    preview_step: IntProperty(name="Preview Step", default=-1,
                              description="The denoising step of the latest preview (-1: none yet)")
    status: StringProperty(name="Status", default="")
    back_stage: BoolProperty(name="Back Stage", default=False,
                             description="The worker is denoising the back view (DiffPortrait360)")
    fraction: FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype='FACTOR')
    frames_done: IntProperty(name="Frames Done", default=0)
    frames_total: IntProperty(name="Frames Total", default=0)
    step: IntProperty(name="Step", default=0)
    total_steps: IntProperty(name="Steps", default=0)
    eta_seconds: FloatProperty(name="ETA", default=-1.0)
    last_error: StringProperty(name="Last Error", default="")
    last_hint: StringProperty(name="Hint", default="")
    last_log: StringProperty(name="Worker Log", default="")
    output_folder: StringProperty(name="Output", default="", subtype='DIR_PATH')


def frame_range(scene: bpy.types.Scene) -> tuple[int, int]:
    """The (start, end) frames the settings select, inclusive."""
    s = scene.portrait3d
    if s.use_scene_range:
        return scene.frame_start, scene.frame_end
    return s.frame_start, s.frame_end


def active_camera(scene: bpy.types.Scene) -> bpy.types.Object | None:
    """The settings' camera, else the scene camera."""
    return scene.portrait3d.camera or scene.camera
