"""Per-frame condition images and 3D-aware proxy views, rendered from the scene camera.

Condition images: the proxy head alone, seen from the output camera on a plain neutral background
(Workbench, studio light, material colours; see docs/CONDITIONS.md for the engine choice).
Proxy views: the reference portrait projected onto the proxy head from the reference camera
(EG3D frontal by default), rendered unlit from each output camera; surfaces the reference camera
cannot see get a neutral fill. With a back image (DiffPortrait360), the back image is projected too, from
the back camera (EG3D yaw 180 degrees by default), and the two are blended at the sides by per-corner weights
(:func:`blend_weights`).

Every render runs inside :class:`SceneState`, which records each setting it changes (engine,
resolution, colour management, shading, world, camera, frame, visibility, ...) and puts it back,
and deletes the temporary data it created, so the user's file is unchanged afterwards.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import bpy
import numpy as np
from mathutils import Matrix, Vector
from mathutils.bvhtree import BVHTree

from .proxy_head import PROXY_TAG

try:
    from .core import cameras
except ImportError:  # the add-on's core shim is not there (e.g. a partial checkout)
    from dp3d_core import cameras  # type: ignore[no-redef]

# sRGB 0-255: the mean corner colour of the official 3D-aware proxy views (a warm mid grey).
BACKGROUND_SRGB = (104, 100, 96)
# Surfaces the reference camera cannot see: a slightly lighter neutral grey.
FILL_SRGB = (128, 128, 128)
# Front/back blending: a camera's weight ramps (smoothstep) from 0 where the surface turns away from it
# (cosine between the normal and the direction to the camera = GRAZING_COS, the 'facing' threshold of the
# projection) to 1 at FULL_COS (about 75 degrees from the camera), so the texture fades before it stretches.
GRAZING_COS = 0.05
FULL_COS = 0.25
ENGINES = {"WORKBENCH": ("BLENDER_WORKBENCH",), "EEVEE": ("BLENDER_EEVEE", "BLENDER_EEVEE_NEXT"),
           "CYCLES": ("CYCLES",)}
STUDIO_LIGHT = "basic.sl"
_TMP_PREFIX = "DP3D tmp"
PASSES_PREFIX = "dp3d_proxy_passes_"


class ConditionRenderError(ValueError):
    """Condition or proxy renders cannot be made from the given inputs."""


def srgb_to_linear(c: float) -> float:
    c = c / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


class SceneState:
    """Records every attribute it changes and restores them (in reverse order) on ``restore``."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self._seen: set[tuple[int, str]] = set()
        self._undo: list[Any] = []

    def set(self, owner: Any, attr: str, value: Any) -> None:
        if not hasattr(owner, attr):
            return  # a setting this Blender version does not have
        key = (owner.as_pointer() if hasattr(owner, "as_pointer") else id(owner), attr)
        if key not in self._seen:
            self._seen.add(key)
            old = getattr(owner, attr)
            if hasattr(old, "copy") and not isinstance(old, bpy.types.ID):
                old = old.copy()  # mathutils values / bpy_prop_array snapshots
            elif not isinstance(old, (str, int, float, bool, type(None), bpy.types.ID)):
                old = tuple(old)
            self._saved.append((owner, attr, old))
        setattr(owner, attr, value)

    def on_restore(self, fn) -> None:
        """Run ``fn()`` on restore, after the attributes are back (cleanup of temporary data)."""
        self._undo.append(fn)

    def restore(self) -> None:
        errors = []
        pending = list(reversed(self._saved))
        for _ in range(2):  # a second pass for enums whose choices depend on another setting
            failed = []
            for owner, attr, old in pending:
                try:
                    setattr(owner, attr, old)
                except Exception as exc:  # keep restoring the rest
                    failed.append((owner, attr, old, exc))
            pending = [f[:3] for f in failed]
        errors.extend(f"{attr}: {exc}" for _, attr, _, exc in failed)
        for fn in reversed(self._undo):
            try:
                fn()
            except Exception as exc:
                errors.append(str(exc))
        self._saved.clear()
        self._seen.clear()
        self._undo.clear()
        if errors:
            raise ConditionRenderError("could not restore all scene settings: " + "; ".join(errors))


def _engine_id(engine: str) -> str:
    key = engine.upper().replace("BLENDER_", "").replace("_NEXT", "")
    if key not in ENGINES:
        raise ConditionRenderError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    available = {e.identifier for e in bpy.types.RenderSettings.bl_rna.properties["engine"].enum_items}
    for ident in ENGINES[key]:
        if ident in available or ident in ("BLENDER_WORKBENCH", "CYCLES"):
            return ident
    return ENGINES[key][0]


def _check_inputs(scene, camera, frames, out_dir, size) -> tuple[list[int], Path]:
    if scene is None or not isinstance(scene, bpy.types.Scene):
        raise ConditionRenderError("a scene is needed")
    if camera is None or getattr(camera, "type", None) != "CAMERA":
        raise ConditionRenderError("a camera object is needed: set the scene camera or pick one in the panel")
    frames = list(frames)
    if not frames or not all(isinstance(f, (int, np.integer)) and not isinstance(f, bool) for f in frames):
        raise ConditionRenderError(f"frames must be a non-empty list of whole frame numbers, got {frames!r}")
    if not isinstance(size, (int, np.integer)) or not 16 <= int(size) <= 8192:
        raise ConditionRenderError(f"size must be a whole number of pixels between 16 and 8192, got {size!r}")
    out = Path(bpy.path.abspath(str(out_dir)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConditionRenderError(f"cannot create the output folder {out}: {exc.strerror}") from exc
    if not os.access(out, os.W_OK):
        raise ConditionRenderError(f"the output folder {out} is not writable; choose another one")
    return [int(f) for f in frames], out


def _temp_world(state: SceneState, scene: bpy.types.Scene) -> None:
    world = bpy.data.worlds.new(f"{_TMP_PREFIX} background")
    lin = tuple(srgb_to_linear(c) for c in BACKGROUND_SRGB)
    world.color = lin
    if world.node_tree is None:
        world.use_nodes = True
    bg = next((n for n in world.node_tree.nodes if n.type == "BACKGROUND"), None)
    if bg is not None:
        bg.inputs["Color"].default_value = (*lin, 1.0)
        bg.inputs["Strength"].default_value = 1.0
    state.set(scene, "world", world)
    state.on_restore(lambda: bpy.data.worlds.remove(world))


def _render_settings(state: SceneState, scene: bpy.types.Scene, engine_id: str, size: int, *, flat: bool) -> None:
    r = scene.render
    state.set(r, "engine", engine_id)
    for attr, value in (("resolution_x", size), ("resolution_y", size), ("resolution_percentage", 100),
                        ("pixel_aspect_x", 1.0), ("pixel_aspect_y", 1.0), ("use_border", False),
                        ("film_transparent", False), ("use_compositing", False), ("use_sequencer", False),
                        ("use_stamp", False), ("dither_intensity", 0.0), ("use_single_layer", True),
                        ("use_motion_blur", False), ("use_simplify", False)):
        state.set(r, attr, value)
    im = r.image_settings
    state.set(im, "media_type", "IMAGE")
    state.set(im, "file_format", "PNG")
    state.set(im, "color_mode", "RGB")
    state.set(im, "color_depth", "8")
    state.set(im, "compression", 15)
    state.set(im, "color_management", "FOLLOW_SCENE")
    v = scene.view_settings
    state.set(scene.display_settings, "display_device", "sRGB")
    state.set(v, "view_transform", "Standard")
    state.set(v, "look", "None")
    state.set(v, "exposure", 0.0)
    state.set(v, "gamma", 1.0)
    state.set(v, "use_curve_mapping", False)
    state.set(v, "use_white_balance", False)
    if engine_id == "BLENDER_WORKBENCH":
        state.set(scene.display, "render_aa", "8")
        sh = scene.display.shading
        state.set(sh, "light", "FLAT" if flat else "STUDIO")
        if not flat:
            try:  # basic.sl lights a frontal face evenly from both sides; Default comes from one side
                state.set(sh, "studio_light", STUDIO_LIGHT)
            except TypeError:
                state.set(sh, "studio_light", "Default")
            state.set(sh, "use_world_space_lighting", False)
        state.set(sh, "color_type", "TEXTURE" if flat else "MATERIAL")
        state.set(sh, "show_cavity", not flat)
        state.set(sh, "cavity_type", "WORLD")
        state.set(sh, "cavity_ridge_factor", 1.0)
        state.set(sh, "cavity_valley_factor", 1.0)
        for attr in ("show_shadows", "show_xray", "show_object_outline", "use_dof", "show_backface_culling",
                     "show_specular_highlight"):
            state.set(sh, attr, False if (flat or attr != "show_specular_highlight") else True)
    elif engine_id == "CYCLES":
        state.set(scene.cycles, "samples", 16)
        state.set(scene.cycles, "use_denoising", False)
        state.set(scene.cycles, "device", "CPU")
    else:
        state.set(scene.eevee, "taa_render_samples", 16)


def _key_light(state: SceneState, scene: bpy.types.Scene, camera: bpy.types.Object) -> None:
    """A sun from the camera's upper left for the non-Workbench engines (the user's lights are hidden)."""
    data = bpy.data.lights.new(f"{_TMP_PREFIX} key", "SUN")
    data.energy = 3.0
    light = bpy.data.objects.new(f"{_TMP_PREFIX} key", data)
    scene.collection.objects.link(light)
    light.parent = camera
    light.rotation_euler = (math.radians(-25), math.radians(-25), 0.0)

    def remove() -> None:
        bpy.data.objects.remove(light, do_unlink=True)
        bpy.data.lights.remove(data)
    state.on_restore(remove)


def _show_only(state: SceneState, scene: bpy.types.Scene, visible: Sequence[bpy.types.Object]) -> None:
    keep = {o.as_pointer() for o in visible}
    for obj in scene.objects:
        if obj.as_pointer() not in keep:
            state.set(obj, "hide_render", True)
    for obj in visible:
        state.set(obj, "hide_render", False)
        if scene.collection.objects.get(obj.name) is None:
            # Linked to the scene's own collection, the object renders whatever its collections say.
            scene.collection.objects.link(obj)
            state.on_restore(lambda o=obj: scene.collection.objects.unlink(o))


FrameRenderer = Callable[[int], Path]


def _frame_renderer(state: SceneState, scene, camera, out: Path, prefix: str) -> FrameRenderer:
    """Point ``scene`` at ``camera`` (restored by ``state``) and return ``render(frame) -> path``, which renders
    one frame into ``<out>/<prefix>_<frame:04d>.png`` (temporary name, then renamed)."""
    state.set(scene, "camera", camera)
    view_layer = bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0]
    frame, subframe = scene.frame_current, scene.frame_subframe
    state.on_restore(lambda: scene.frame_set(frame, subframe=subframe))
    if bpy.data.images.get("Render Result") is None:
        def drop_result() -> None:
            result = bpy.data.images.get("Render Result")
            if result is not None:
                bpy.data.images.remove(result)
        state.on_restore(drop_result)

    def render(f: int) -> Path:
        scene.frame_set(f)
        final = out / f"{prefix}_{f:04d}.png"
        tmp = out / f".{prefix}_{f:04d}.tmp.png"
        bpy.ops.render.render(write_still=False, scene=scene.name, layer=view_layer.name)
        result = bpy.data.images.get("Render Result")
        if result is None:
            raise ConditionRenderError(f"Blender produced no render result for frame {f}")
        result.save_render(str(tmp), scene=scene)
        os.replace(tmp, final)
        return final
    return render


@contextmanager
def _restoring() -> Iterator[SceneState]:
    state = SceneState()
    try:
        yield state
    finally:
        state.restore()


def find_proxy_heads(scene: bpy.types.Scene) -> list[bpy.types.Object]:
    """Objects in ``scene`` made by ``build_proxy_head``."""
    return [o for o in scene.objects if o.get(PROXY_TAG)]


def render_condition_images(scene: bpy.types.Scene, camera: bpy.types.Object, frames: Iterable[int],
                            out_dir, *, size: int = 512, engine: str = "WORKBENCH",
                            objects: Sequence[bpy.types.Object] | None = None) -> list[Path]:
    """Render ``cond_{frame:04d}.png`` for each frame: only ``objects`` (default: the scene's proxy
    heads) visible, from ``camera``, ``size`` x ``size`` pixels, on the neutral background."""
    frames, out = _check_inputs(scene, camera, frames, out_dir, size)
    with condition_renderer(scene, camera, out, size=size, engine=engine, objects=objects) as render:
        return [render(f) for f in frames]


@contextmanager
def condition_renderer(scene: bpy.types.Scene, camera: bpy.types.Object, out_dir, *, size: int = 512,
                       engine: str = "WORKBENCH", objects: Sequence[bpy.types.Object] | None = None
                       ) -> Iterator[FrameRenderer]:
    """The scene set up for condition images (restored on exit): yields ``render(frame) -> path``.

    :func:`render_condition_images` renders all its frames inside one of these; the add-on's batched
    preparation opens one per batch of a few frames, so Blender's UI gets control back between batches
    and the user's scene is never left changed between them."""
    _, out = _check_inputs(scene, camera, [0], out_dir, size)
    objects = list(objects) if objects is not None else find_proxy_heads(scene)
    if not objects:
        raise ConditionRenderError("no proxy head in the scene: build one first (Add Proxy Head)")
    engine_id = _engine_id(engine)
    with _restoring() as state:
        _render_settings(state, scene, engine_id, int(size), flat=False)
        _temp_world(state, scene)
        _show_only(state, scene, objects)
        if engine_id != "BLENDER_WORKBENCH":
            _key_light(state, scene, camera)
        yield _frame_renderer(state, scene, camera, out, "cond")


# ---------------------------------------------------------------------------------------------
# 3D-aware proxy views.

def frontal_label() -> np.ndarray:
    """EG3D label of the frontal camera (radius 2.7, pivot (0, 0, 0.2), focal 4.2647)."""
    c2w = cameras.sample_lookat(math.pi / 2, math.pi / 2, cameras.EG3D_PIVOT, cameras.EG3D_RADIUS)
    return cameras.to_label(c2w, cameras.intrinsics_from_focal())


def back_label() -> np.ndarray:
    """EG3D label of the camera straight behind the head: the frontal camera turned by yaw 180 degrees (level,
    radius 2.7, looking at the pivot (0, 0, 0.2), focal 4.2647). The default back camera of a back image."""
    c2w = cameras.sample_lookat(math.pi / 2 + math.pi, math.pi / 2, cameras.EG3D_PIVOT, cameras.EG3D_RADIUS)
    return cameras.to_label(c2w, cameras.intrinsics_from_focal())


def blend_weights(cos_front: np.ndarray, cos_back: np.ndarray, seen_front: np.ndarray, seen_back: np.ndarray
                  ) -> np.ndarray:
    """(N, 3) weights (front image, back image, neutral fill) per surface point; each row sums to 1.

    ``cos_*``: cosine of the angle between the surface normal and the direction from the point to that camera;
    ``seen_*``: whether that camera sees the point at all (not turned away, not hidden behind another part).
    A camera's score is 0 where it does not see the point and rises smoothly from 0 at the grazing angle
    (``GRAZING_COS``) to 1 at ``FULL_COS``; the two scores are the weights (scaled down together where they add
    up to more than 1) and whatever is left goes to the fill, so a point neither camera sees is neutral grey
    (``FILL_SRGB``) and the front fades through the sides into the back without a seam."""
    def score(cos: np.ndarray, seen: np.ndarray) -> np.ndarray:
        x = np.clip((np.asarray(cos, float) - GRAZING_COS) / (FULL_COS - GRAZING_COS), 0.0, 1.0)
        return np.where(np.asarray(seen, bool), x * x * (3.0 - 2.0 * x), 0.0)

    front, back = score(cos_front, seen_front), score(cos_back, seen_back)
    total = np.maximum(1.0, front + back)
    front, back = front / total, back / total
    return np.stack([front, back, np.clip(1.0 - front - back, 0.0, 1.0)], axis=1)


def _unscaled(m: Matrix) -> np.ndarray:
    loc, rot, _ = m.decompose()
    return np.array(Matrix.LocRotScale(loc, rot, None))


def _reference_projection(reference, anchor, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(world-space OpenCV cam2world 4x4, normalized intrinsics 3x3) of the reference camera."""
    if isinstance(reference, bpy.types.Object):
        if reference.type != "CAMERA":
            raise ConditionRenderError(f"reference camera {reference.name!r} is not a camera object")
        cam = reference.data
        if cam.type != "PERSP":
            raise ConditionRenderError("the reference camera must be a perspective camera")
        bc = cameras.BlenderCamera(matrix_world=np.array(reference.matrix_world), lens=cam.lens,
                                   sensor_width=cam.sensor_width, sensor_height=cam.sensor_height,
                                   sensor_fit=cam.sensor_fit, shift_x=cam.shift_x, shift_y=cam.shift_y,
                                   resolution_x=width, resolution_y=height)
        return _unscaled(reference.matrix_world) @ cameras.BLENDER_CAM_TO_OPENCV, bc.intrinsics()
    if anchor is None:
        raise ConditionRenderError("a reference label needs the head anchor: parent the proxy head to it "
                                   "or pass anchor=")
    try:
        c2w_eg3d, k = cameras.from_label(np.asarray(reference, float).ravel())
    except (ValueError, TypeError) as exc:
        raise ConditionRenderError(f"the reference camera label is not a valid EG3D label: {exc}") from exc
    size = cameras.anchor_size_from_matrix(np.array(anchor.matrix_world),
                                           anchor.empty_display_size if anchor.type == "EMPTY" else 1.0)
    pose = c2w_eg3d.copy()
    pose[:3, 3] *= size
    world = _unscaled(anchor.matrix_world) @ cameras.BLENDER_TO_EG3D.T @ pose
    return world, k


def _project_uvs(mesh: bpy.types.Mesh, matrix_world: Matrix, c2w: np.ndarray, k: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex image UVs (Blender convention, v up) and a per-face 'seen by the camera' flag."""
    n = len(mesh.vertices)
    co = np.empty(n * 3)
    mesh.vertices.foreach_get("co", co)
    mw = np.array(matrix_world)
    world = co.reshape(-1, 3) @ mw[:3, :3].T + mw[:3, 3]
    origin = c2w[:3, 3]
    cam = (world - origin) @ c2w[:3, :3]  # rows: OpenCV camera coordinates
    z = cam[:, 2]
    safe = np.where(z > 1e-9, z, 1e-9)
    u = k[0, 0] * cam[:, 0] / safe + k[0, 1] * cam[:, 1] / safe + k[0, 2]
    v = k[1, 1] * cam[:, 1] / safe + k[1, 2]
    uv = np.stack([u, 1.0 - v], axis=1)

    nf = len(mesh.polygons)
    centres = np.empty(nf * 3)
    normals = np.empty(nf * 3)
    mesh.polygons.foreach_get("center", centres)
    mesh.polygons.foreach_get("normal", normals)
    centres = centres.reshape(-1, 3) @ mw[:3, :3].T + mw[:3, 3]
    normals = normals.reshape(-1, 3) @ np.linalg.inv(mw[:3, :3])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    to_cam = origin - centres
    dist = np.linalg.norm(to_cam, axis=1)
    facing = np.sum(normals * to_cam, axis=1) > 0.05 * dist

    # A face is seen when its centre is the first surface hit from the camera (faces cut by an
    # occluder's outline keep the texture; the occluder covers them in views near the reference).
    polys = [tuple(p.vertices) for p in mesh.polygons]
    tree = BVHTree.FromPolygons([tuple(p) for p in world], polys)
    o = Vector(origin)

    def visible(point: np.ndarray) -> bool:
        ray = point - origin
        length = float(np.linalg.norm(ray))
        hit = tree.ray_cast(o, Vector(ray / length), length * 1.01)
        return hit[0] is None or hit[3] >= length * (1.0 - 2e-3)

    seen_f = np.zeros(nf, bool)
    vertex_seen: dict[int, bool] = {}
    for i in np.flatnonzero(facing):
        if visible(centres[i]):
            seen_f[i] = True
            continue
        # A face whose centre is just behind a neighbouring part (lids, nose wings) still shows at its
        # corners: keep the texture when any corner is visible.
        for vi in polys[i]:
            if vi not in vertex_seen:
                vertex_seen[vi] = visible(world[vi])
            if vertex_seen[vi]:
                seen_f[i] = True
                break
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= 1) & (z > 1e-6)
    seen_f &= np.array([inside[list(p)].all() for p in polys], bool)
    return uv, seen_f


def _corner_cosines(mesh: bpy.types.Mesh, matrix_world: Matrix, origin: np.ndarray) -> np.ndarray:
    """Per face corner (loop): cosine between the corner normal and the direction to the camera at ``origin``."""
    mw = np.array(matrix_world)
    co = np.empty(len(mesh.vertices) * 3)
    mesh.vertices.foreach_get("co", co)
    world = co.reshape(-1, 3) @ mw[:3, :3].T + mw[:3, 3]
    loop_vi = np.empty(len(mesh.loops), np.int32)
    mesh.loops.foreach_get("vertex_index", loop_vi)
    normals = np.empty(len(mesh.loops) * 3)
    mesh.corner_normals.foreach_get("vector", normals)
    normals = normals.reshape(-1, 3) @ np.linalg.inv(mw[:3, :3])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    to_cam = origin - world[loop_vi]
    to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True) + 1e-12
    return np.sum(normals * to_cam, axis=1)


def _loop_faces(mesh: bpy.types.Mesh) -> np.ndarray:
    """Index of the face each loop (face corner) belongs to."""
    totals = np.empty(len(mesh.polygons), np.int32)
    mesh.polygons.foreach_get("loop_total", totals)
    return np.repeat(np.arange(len(mesh.polygons)), totals)


def _texture_material(name: str, image: bpy.types.Image) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    nodes.clear()
    tex = nodes.new("ShaderNodeTexImage")
    tex.image = image
    tex.extension = "EXTEND"
    emit = nodes.new("ShaderNodeEmission")
    out = nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(tex.outputs["Color"], emit.inputs["Color"])
    mat.node_tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    nodes.active = tex
    return mat


@dataclass
class ProxyProjection:
    """Where the reference portrait lands on the proxy head: per-vertex image UVs and a per-face 'seen by the
    reference camera' flag, for the evaluated mesh of ``proxy_object`` (see :func:`project_reference`).

    With a back image: ``back`` (its path), ``back_uv`` (per-vertex UVs in the back image) and ``weights``
    ((loops, 3): front, back and fill weight per face corner, each row summing to 1; :func:`blend_weights`)."""

    reference: Path
    uv: np.ndarray
    seen: np.ndarray
    back: Path | None = None
    back_uv: np.ndarray | None = None
    weights: np.ndarray | None = None


def _load_image(path: Path, what: str = "reference image", colorspace: str = "sRGB") -> bpy.types.Image:
    try:
        image = bpy.data.images.load(str(path), check_existing=False)
    except RuntimeError as exc:
        raise ConditionRenderError(f"cannot read the {what} {path}: {exc}") from exc
    image.colorspace_settings.name = colorspace
    if image.size[0] == 0 or image.size[1] == 0:
        bpy.data.images.remove(image)
        raise ConditionRenderError(f"the {what} {path} is empty or unreadable")
    return image


def _evaluated_mesh_copy(proxy_object: bpy.types.Object) -> bpy.types.Mesh:
    depsgraph = bpy.context.evaluated_depsgraph_get()
    return bpy.data.meshes.new_from_object(proxy_object.evaluated_get(depsgraph))


def _image_file(path_like, what: str) -> Path:
    path = Path(bpy.path.abspath(str(path_like)))
    if not path.is_file():
        raise ConditionRenderError(f"{what} not found: {path}")
    return path


def _image_size(path: Path, what: str) -> tuple[int, int]:
    image = _load_image(path, what)
    size = (int(image.size[0]), int(image.size[1]))
    bpy.data.images.remove(image)
    return size


def project_reference(proxy_object: bpy.types.Object, reference_image_path, reference_label_or_camera=None,
                      anchor: bpy.types.Object | None = None, *, back_image_path=None,
                      back_label_or_camera=None) -> ProxyProjection:
    """Project the reference portrait onto ``proxy_object`` from the reference camera (an EG3D label in the
    anchor frame, a camera object, or None = EG3D frontal). ``anchor`` defaults to the proxy's parent.

    ``back_image_path`` (optional, DiffPortrait360): a view of the back of the head, projected from
    ``back_label_or_camera`` (an EG3D label in the anchor frame, a camera object, or None = :func:`back_label`,
    straight behind). The image is used as it is, so it must be framed like a render from that camera (the
    back-head model's output is). Both projections are then blended per face corner by :func:`blend_weights`
    (front where the photo's camera sees the surface, back where the back camera does, smooth at the sides,
    neutral fill where neither does). Without a back image the result is exactly the front-only projection.
    Leaves no data behind."""
    if proxy_object is None or proxy_object.type != "MESH":
        raise ConditionRenderError("proxy_object must be a mesh object (the proxy head)")
    path = _image_file(reference_image_path, "reference image")
    if back_image_path is None and back_label_or_camera is not None:
        raise ConditionRenderError("a back camera was given without a back image; pass back_image_path too")
    back_path = None if back_image_path is None else _image_file(back_image_path, "back image")
    anchor = anchor if anchor is not None else proxy_object.parent
    reference = frontal_label() if reference_label_or_camera is None else reference_label_or_camera
    width, height = _image_size(path, "reference image")
    back_size = None if back_path is None else _image_size(back_path, "back image")
    mesh = _evaluated_mesh_copy(proxy_object)
    try:
        c2w, k = _reference_projection(reference, anchor, width, height)
        uv, seen = _project_uvs(mesh, proxy_object.matrix_world, c2w, k)
        if back_path is None:
            return ProxyProjection(path, uv, seen)
        back_ref = back_label() if back_label_or_camera is None else back_label_or_camera
        back_c2w, back_k = _reference_projection(back_ref, anchor, *back_size)
        back_uv, back_seen = _project_uvs(mesh, proxy_object.matrix_world, back_c2w, back_k)
        faces = _loop_faces(mesh)
        weights = blend_weights(_corner_cosines(mesh, proxy_object.matrix_world, c2w[:3, 3]),
                                _corner_cosines(mesh, proxy_object.matrix_world, back_c2w[:3, 3]),
                                seen[faces], back_seen[faces])
    finally:
        bpy.data.meshes.remove(mesh)
    return ProxyProjection(path, uv, seen, back_path, back_uv, weights)


def _view_object(state: SceneState, scene: bpy.types.Scene, proxy_object: bpy.types.Object,
                 projection: ProxyProjection, name: str, materials: Sequence[bpy.types.Material]
                 ) -> bpy.types.Object:
    """A temporary copy of the proxy head (same place, evaluated mesh) with ``materials`` as its only slots;
    deleted, with its mesh and the materials, on restore."""
    mesh = _evaluated_mesh_copy(proxy_object)
    view_obj = bpy.data.objects.new(name, mesh)

    def cleanup() -> None:
        bpy.data.objects.remove(view_obj, do_unlink=True)
        bpy.data.meshes.remove(mesh)
        for m in materials:
            bpy.data.materials.remove(m)
    state.on_restore(cleanup)
    if len(mesh.vertices) != len(projection.uv) or len(mesh.polygons) != len(projection.seen) or (
            projection.weights is not None and len(mesh.loops) != len(projection.weights)):
        raise ConditionRenderError("the proxy head changed after the reference was projected onto it; "
                                   "render the proxy views again")
    scene.collection.objects.link(view_obj)
    view_obj.parent = proxy_object.parent
    view_obj.matrix_parent_inverse = proxy_object.matrix_parent_inverse
    view_obj.matrix_basis = proxy_object.matrix_basis
    mesh.materials.clear()
    for m in materials:
        mesh.materials.append(m)
    return view_obj


def _set_uvs(mesh: bpy.types.Mesh, name: str, uv: np.ndarray) -> None:
    """Replace the mesh's UV maps with one: per-vertex ``uv`` spread to the face corners."""
    for layer in list(mesh.uv_layers):
        mesh.uv_layers.remove(layer)
    layer = mesh.uv_layers.new(name=name)
    loop_vi = np.empty(len(mesh.loops), np.int32)
    mesh.loops.foreach_get("vertex_index", loop_vi)
    layer.data.foreach_set("uv", uv[loop_vi].astype(np.float32).ravel())


@contextmanager
def proxy_view_renderer(scene: bpy.types.Scene, camera: bpy.types.Object, out_dir, *,
                        proxy_object: bpy.types.Object, projection: ProxyProjection, size: int = 512
                        ) -> Iterator[FrameRenderer]:
    """The scene set up for 3D-aware proxy views (restored on exit, temporary data deleted): yields
    ``render(frame) -> path``. Like :func:`condition_renderer`, opened once per batch of frames.

    ``projection`` comes from :func:`project_reference`; when it has a back image, each frame is three Workbench
    passes (front texture, back texture, blend weights, in a temporary folder) mixed per pixel into
    ``proxy_{frame:04d}.png``."""
    _, out = _check_inputs(scene, camera, [0], out_dir, size)
    with _restoring() as state:
        if projection.back is None:
            yield _front_renderer(state, scene, camera, out, proxy_object, projection, int(size))
        else:
            yield _front_back_renderer(state, scene, camera, out, proxy_object, projection, int(size))


def _front_renderer(state: SceneState, scene, camera, out: Path, proxy_object, projection: ProxyProjection,
                    size: int) -> FrameRenderer:
    image = _load_image(projection.reference)
    state.on_restore(lambda: bpy.data.images.remove(image))
    fill = bpy.data.images.new(f"{_TMP_PREFIX} fill", 4, 4)
    state.on_restore(lambda: bpy.data.images.remove(fill))
    fill.colorspace_settings.name = "sRGB"
    fill.pixels.foreach_set(np.tile([c / 255.0 for c in FILL_SRGB] + [1.0], 16).astype(np.float32))
    mats = [_texture_material(f"{_TMP_PREFIX} projected", image), _texture_material(f"{_TMP_PREFIX} fill", fill)]
    view_obj = _view_object(state, scene, proxy_object, projection, f"{_TMP_PREFIX} proxy view", mats)
    mesh = view_obj.data
    mesh.polygons.foreach_set("material_index", np.where(projection.seen, 0, 1).astype(np.int32))
    _set_uvs(mesh, "Reference Projection", projection.uv)
    mesh.update()

    _render_settings(state, scene, "BLENDER_WORKBENCH", size, flat=True)
    _temp_world(state, scene)
    _show_only(state, scene, [view_obj])
    return _frame_renderer(state, scene, camera, out, "proxy")


def _read_pixels(path: Path, colorspace: str) -> np.ndarray:
    """(H, W, 3) float pixels of a PNG as stored (bottom row first), read through Blender."""
    image = _load_image(path, "render pass", colorspace)
    try:
        w, h = image.size
        px = np.empty(w * h * 4, np.float32)
        image.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(image)
    return px.reshape(h, w, 4)[:, :, :3]


def _front_back_renderer(state: SceneState, scene, camera, out: Path, proxy_object,
                         projection: ProxyProjection, size: int) -> FrameRenderer:
    front_image = _load_image(projection.reference)
    state.on_restore(lambda: bpy.data.images.remove(front_image))
    back_image = _load_image(projection.back, "back image")
    state.on_restore(lambda: bpy.data.images.remove(back_image))
    views = {}
    for key, image, uv in (("front", front_image, projection.uv), ("back", back_image, projection.back_uv)):
        obj = _view_object(state, scene, proxy_object, projection, f"{_TMP_PREFIX} proxy {key}",
                           [_texture_material(f"{_TMP_PREFIX} projected {key}", image)])
        obj.data.polygons.foreach_set("material_index", np.zeros(len(obj.data.polygons), np.int32))
        _set_uvs(obj.data, f"{key.title()} Projection", uv)
        obj.data.update()
        views[key] = obj
    # Blend weights as a float (linear) colour per face corner: rendered flat with the 'Raw' view transform
    # into a 16-bit PNG, the pixel is the weights, interpolated across each face like the textures are.
    obj = _view_object(state, scene, proxy_object, projection, f"{_TMP_PREFIX} proxy weights", [])
    attr = obj.data.color_attributes.new("Blend Weights", "FLOAT_COLOR", "CORNER")
    rgba = np.concatenate([projection.weights, np.ones((len(projection.weights), 1))], axis=1)
    attr.data.foreach_set("color", rgba.astype(np.float32).ravel())
    obj.data.color_attributes.active_color = attr
    obj.data.update()
    views["weights"] = obj

    _render_settings(state, scene, "BLENDER_WORKBENCH", size, flat=True)
    _temp_world(state, scene)
    world = scene.world
    background = tuple(world.color)
    _show_only(state, scene, list(views.values()))
    # Pass files go to the system's temporary folder, so a killed render leaves nothing in the user's folder.
    passes = Path(tempfile.mkdtemp(prefix=PASSES_PREFIX))
    state.on_restore(lambda: shutil.rmtree(passes, ignore_errors=True))
    render_pass = _frame_renderer(state, scene, camera, passes, "pass")
    fill = np.array(FILL_SRGB, np.float32) / 255.0
    bg = np.array(BACKGROUND_SRGB, np.float32) / 255.0

    def render(f: int) -> Path:
        layers = {}
        for key in ("weights", "front", "back"):
            for other, view in views.items():
                state.set(view, "hide_render", other != key)
            weights = key == "weights"
            state.set(scene.display.shading, "color_type", "VERTEX" if weights else "TEXTURE")
            state.set(scene.view_settings, "view_transform", "Raw" if weights else "Standard")
            state.set(scene.render.image_settings, "color_depth", "16" if weights else "8")
            world.color = (0.0, 0.0, 0.0) if weights else background
            path = render_pass(f)
            layers[key] = _read_pixels(path, "Non-Color" if weights else "sRGB")
            path.unlink()
        w = np.clip(layers["weights"], 0.0, None)
        cover = w.sum(axis=2, keepdims=True)  # 1 on the head, 0 on the background, between at the outline
        w = np.where(cover > 1e-3, w / np.maximum(cover, 1e-3), np.array([1.0, 0.0, 0.0], np.float32))
        cover = np.clip(cover, 0.0, 1.0)
        fill_layer = cover * fill + (1.0 - cover) * bg
        mixed = w[..., :1] * layers["front"] + w[..., 1:2] * layers["back"] + w[..., 2:] * fill_layer
        return _write_png(scene, mixed, out / f"proxy_{f:04d}.png")
    return render


def _write_png(scene: bpy.types.Scene, rgb: np.ndarray, final: Path) -> Path:
    """Write (H, W, 3) display values in 0..1 (bottom row first) as an 8-bit RGB PNG, atomically."""
    h, w = rgb.shape[:2]
    image = bpy.data.images.new(f"{_TMP_PREFIX} mixed", w, h, alpha=False)
    try:
        image.colorspace_settings.name = "sRGB"
        rgba = np.concatenate([np.clip(rgb, 0.0, 1.0), np.ones((h, w, 1), np.float32)], axis=2)
        image.pixels.foreach_set(rgba.astype(np.float32).ravel())
        tmp = final.parent / f".{final.stem}.tmp.png"
        image.filepath_raw = str(tmp)
        image.file_format = "PNG"
        image.save()
        os.replace(tmp, final)
    finally:
        bpy.data.images.remove(image)
    return final


def render_proxy_views(scene: bpy.types.Scene, camera: bpy.types.Object, frames: Iterable[int], out_dir, *,
                       reference_image_path, proxy_object: bpy.types.Object,
                       reference_label_or_camera=None, anchor: bpy.types.Object | None = None,
                       size: int = 512, back_image_path=None, back_label_or_camera=None) -> list[Path]:
    """Render ``proxy_{frame:04d}.png``: the reference portrait projected onto ``proxy_object`` from the
    reference camera (an EG3D label in the anchor frame, a camera object, or None = EG3D frontal),
    seen from ``camera`` at each frame. ``anchor`` defaults to the proxy's parent. ``back_image_path`` and
    ``back_label_or_camera`` (optional, DiffPortrait360: the back view and its camera, default straight behind)
    are passed to :func:`project_reference`: front and back blended at the sides."""
    frames, out = _check_inputs(scene, camera, frames, out_dir, size)
    projection = project_reference(proxy_object, reference_image_path, reference_label_or_camera, anchor,
                                   back_image_path=back_image_path, back_label_or_camera=back_label_or_camera)
    with proxy_view_renderer(scene, camera, out, proxy_object=proxy_object, projection=projection,
                             size=size) as render:
        return [render(f) for f in frames]
