"""EG3D camera conventions and the mapping to and from Blender cameras (numpy only).

EG3D world: +Y up, the face looks along +Z, +X is the subject's left. A camera pose is an OpenCV
cam2world matrix (camera x right, y down, z forward). A *label* is 25 floats: the 4x4 cam2world
row-major, then the 3x3 intrinsics row-major, normalized by image size (fx/W, fy/H, cx/W, cy/H,
pixel origin at the top-left corner, y down).

Blender: world Z up; a camera looks down its local -Z with local +Y up and +X right. The head
anchor is an Empty at the head centre whose -Y axis points out of the face and +Z points up.
In anchor-local coordinates (bx, by, bz) the EG3D point is (bx, bz, -by) / size, i.e.

    anchor +X (subject's left) -> EG3D +X
    anchor +Z (up)             -> EG3D +Y
    anchor -Y (out of face)    -> EG3D +Z

This is a proper rotation (no mirror): a subject facing a Blender front-view camera (numpad 1,
looking along +Y) has its left on the image's right, exactly as in EG3D's frontal view.

    EG3D cam2world = R . H^-1 . C . diag(1, -1, -1, 1), translation divided by ``size``

with C and H the camera and anchor world matrices with their scale removed.

Intrinsics follow Blender's view-plane rules (``BKE_camera_params_compute_viewplane``): with
``ycor = pixel_aspect_y / pixel_aspect_x`` the fitted axis is HORIZONTAL when
``resolution_x * pixel_aspect_x >= resolution_y * pixel_aspect_y`` (AUTO) or by choice; AUTO and
HORIZONTAL use ``sensor_width``, VERTICAL uses ``sensor_height``; ``viewfac`` is ``resolution_x``
(horizontal fit) or ``ycor * resolution_y`` (vertical fit), and both shifts are fractions of
``viewfac``. Then, in pixels::

    fx = lens * viewfac / sensor        cx = W / 2 - shift_x * viewfac
    fy = fx / ycor                      cy = H / 2 + shift_y * viewfac / ycor

What a Blender camera cannot represent (``label_to_blender`` raises :class:`CameraError`): skew,
a non-rotation cam2world (scale, shear, mirror), and an fx/fy ratio that does not match the
chosen resolution and pixel aspect (``fx_n / fy_n`` must equal ``ycor * H / W``). Orthographic and
panoramic cameras are out of scope.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

EG3D_FOCAL = 4.2647
EG3D_RADIUS = 2.7
EG3D_PIVOT = (0.0, 0.0, 0.2)

LABEL_SIZE = 25
SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")

# Blender (anchor-local) axes -> EG3D axes: x -> x, z -> y, -y -> z.
BLENDER_TO_EG3D = np.array(
    [[1.0, 0.0, 0.0, 0.0],
     [0.0, 0.0, 1.0, 0.0],
     [0.0, -1.0, 0.0, 0.0],
     [0.0, 0.0, 0.0, 1.0]])
# Blender camera-local axes (x right, y up, looks down -z) -> OpenCV camera axes.
BLENDER_CAM_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])

_ROTATION_TOL = 1e-5
_ASPECT_RTOL = 1e-6


class CameraError(ValueError):
    """A camera, label or matrix that cannot be used; the message says what is wrong and how to fix it."""


def _matrix(value, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CameraError(f"{what} must be numbers shaped {shape}; got {value!r:.80}") from exc
    if arr.shape != shape:
        raise CameraError(f"{what} must have shape {shape}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CameraError(f"{what} contains NaN or infinite values: {arr.tolist()}")
    return arr


def _normalize(v: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        raise CameraError(f"{what} has zero length, so the camera direction is undefined")
    return v / n


def _is_rotation(m: np.ndarray, tol: float = _ROTATION_TOL) -> bool:
    return bool(np.allclose(m.T @ m, np.eye(3), atol=tol) and abs(np.linalg.det(m) - 1.0) < tol)


# ---------------------------------------------------------------------------------------------
# EG3D side
# ---------------------------------------------------------------------------------------------

def _look_at_cam2world(forward: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """EG3D ``create_cam2world_matrix``: world +Y up, no roll."""
    forward = _normalize(forward, "camera forward vector")
    up = np.array([0.0, 1.0, 0.0])
    right = -_normalize(np.cross(up, forward), "camera right vector (camera looks straight up or down)")
    up = _normalize(np.cross(forward, right), "camera up vector")
    cam2world = np.eye(4)
    cam2world[:3, 0] = right
    cam2world[:3, 1] = up
    cam2world[:3, 2] = forward
    cam2world[:3, 3] = origin
    return cam2world


def sample_lookat(horizontal_mean: float, vertical_mean: float,
                  lookat_position: Sequence[float] = EG3D_PIVOT, radius: float = EG3D_RADIUS) -> np.ndarray:
    """EG3D ``LookAtPoseSampler.sample`` without noise (stddev 0, batch 1), in float64.

    ``horizontal_mean`` = pi/2 is frontal, larger moves the camera toward +X (subject's left);
    ``vertical_mean`` is the polar angle from +Y (pi/2 = level, smaller = above). The camera
    sits on the sphere of ``radius`` around the world origin (not around the look-at point).
    """
    lookat = _matrix(lookat_position, (3,), "lookat_position")
    h, v, r = float(horizontal_mean), float(vertical_mean), float(radius)
    if not all(math.isfinite(x) for x in (h, v, r)):
        raise CameraError(f"sample_lookat needs finite angles and radius, got {h}, {v}, {r}")
    v = min(max(v, 1e-5), math.pi - 1e-5)
    phi = math.acos(1.0 - 2.0 * (v / math.pi))
    origin = np.array([
        r * math.sin(phi) * math.cos(math.pi - h),
        r * math.cos(phi),
        r * math.sin(phi) * math.sin(math.pi - h),
    ])
    return _look_at_cam2world(lookat - origin, origin)


def intrinsics_from_focal(focal: float = EG3D_FOCAL, cx: float = 0.5, cy: float = 0.5,
                          fy: float | None = None) -> np.ndarray:
    """Normalized 3x3 intrinsics; ``fy`` defaults to ``focal``."""
    fx = float(focal)
    fy = fx if fy is None else float(fy)
    k = np.array([[fx, 0.0, float(cx)], [0.0, fy, float(cy)], [0.0, 0.0, 1.0]])
    if not np.all(np.isfinite(k)) or fx <= 0 or fy <= 0:
        raise CameraError(f"focal lengths must be positive and finite, got fx={fx}, fy={fy}")
    return k


def intrinsics_from_fov(fov_degrees: float) -> np.ndarray:
    """EG3D ``FOV_to_intrinsics`` (keeps its 3.14159 and 1.414 constants, so 18.837 deg -> ~4.2647)."""
    fov = float(fov_degrees)
    if not (0.0 < fov < 180.0):
        raise CameraError(f"field of view must be between 0 and 180 degrees, got {fov}")
    focal = 1.0 / (math.tan(fov * 3.14159 / 360.0) * 1.414)
    return intrinsics_from_focal(focal)


def to_label(cam2world, intrinsics) -> np.ndarray:
    """(25,) float64 label: 16 row-major cam2world values, then 9 row-major intrinsics."""
    c2w = _matrix(cam2world, (4, 4), "cam2world")
    k = _matrix(intrinsics, (3, 3), "intrinsics")
    return np.concatenate([c2w.reshape(16), k.reshape(9)])


def from_label(label) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_label`: (cam2world 4x4, intrinsics 3x3)."""
    try:
        arr = np.array(label, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CameraError(f"a camera label must be {LABEL_SIZE} numbers; got {label!r:.80}") from exc
    if arr.ndim != 1 or arr.shape[0] != LABEL_SIZE:
        raise CameraError(
            f"a camera label must be {LABEL_SIZE} numbers (16 for the 4x4 cam2world, 9 for the 3x3 "
            f"intrinsics); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CameraError(f"camera label contains NaN or infinite values: {arr.tolist()}")
    return arr[:16].reshape(4, 4).copy(), arr[16:].reshape(3, 3).copy()


def yaw_pitch_from_cam2world(cam2world) -> tuple[float, float]:
    """(yaw, pitch) in degrees of the camera position seen from the head centre (world origin).

    Yaw 0 / pitch 0 = frontal (camera on +Z). Yaw > 0: camera toward +X (the subject's left);
    pitch > 0: camera above the head. For ``sample_lookat`` this gives
    yaw = degrees(h - pi/2) and pitch = degrees(asin(1 - 2 v / pi)). A camera at the origin
    falls back to the reverse of its viewing direction.
    """
    c2w = _matrix(cam2world, (4, 4), "cam2world")
    direction = c2w[:3, 3]
    if np.linalg.norm(direction) < 1e-9:
        direction = -c2w[:3, 2]
    x, y, z = _normalize(direction, "camera position")
    yaw = math.degrees(math.atan2(x, z))
    pitch = math.degrees(math.atan2(y, math.hypot(x, z)))
    return yaw, pitch


# ---------------------------------------------------------------------------------------------
# Blender side (plain numbers; no bpy)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlenderCamera:
    """Plain numbers read off a Blender camera object and the scene's render settings."""

    matrix_world: np.ndarray
    lens: float
    sensor_width: float = 36.0
    sensor_height: float = 24.0
    sensor_fit: str = "AUTO"
    shift_x: float = 0.0
    shift_y: float = 0.0
    resolution_x: int = 512
    resolution_y: int = 512
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrix_world", _matrix(self.matrix_world, (4, 4), "camera matrix_world"))
        if self.sensor_fit not in SENSOR_FITS:
            raise CameraError(f"sensor_fit must be one of {SENSOR_FITS}, got {self.sensor_fit!r}")
        for name in ("lens", "sensor_width", "sensor_height", "resolution_x", "resolution_y",
                     "pixel_aspect_x", "pixel_aspect_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
                raise CameraError(f"camera {name} must be a positive number, got {value!r}")
        for name in ("shift_x", "shift_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value)):
                raise CameraError(f"camera {name} must be a finite number, got {value!r}")

    def intrinsics(self) -> np.ndarray:
        """Normalized OpenCV intrinsics of this camera under Blender's rules."""
        return _blender_intrinsics(self)


@dataclass(frozen=True)
class HeadAnchor:
    """World matrix of the head-anchor Empty and its size in Blender units per EG3D unit."""

    matrix_world: np.ndarray
    size: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrix_world", _matrix(self.matrix_world, (4, 4), "head anchor matrix_world"))
        if not (isinstance(self.size, (int, float, np.number)) and math.isfinite(self.size) and self.size > 0):
            raise CameraError(f"head anchor size must be a positive number, got {self.size!r}")


def anchor_size_from_matrix(matrix_world, display_size: float = 1.0) -> float:
    """Anchor size = ``display_size`` times the mean axis scale of ``matrix_world``."""
    m = _matrix(matrix_world, (4, 4), "head anchor matrix_world")
    scale = float(np.mean(np.linalg.norm(m[:3, :3], axis=0)))
    size = float(display_size) * scale
    if not (math.isfinite(size) and size > 0):
        raise CameraError(f"head anchor size must be positive; display size {display_size} x scale {scale}")
    return size


def _rigid(matrix: np.ndarray, what: str) -> np.ndarray:
    """The world matrix with its per-axis scale removed (as Blender's ``normalized()``)."""
    out = matrix.copy()
    if not np.allclose(out[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise CameraError(f"{what} has a projective bottom row {out[3].tolist()}; expected 0 0 0 1")
    norms = np.linalg.norm(out[:3, :3], axis=0)
    if np.any(norms < 1e-12):
        raise CameraError(f"{what} has a zero scale on an axis; give every axis a non-zero scale")
    out[:3, :3] /= norms
    if np.linalg.det(out[:3, :3]) < 0:
        raise CameraError(f"{what} is mirrored (negative scale); use positive scales on the object and its parents")
    if not _is_rotation(out[:3, :3]):
        raise CameraError(f"{what} is sheared (non-uniform scale on a rotated parent); "
                          "apply the parent's scale or use uniform scale")
    return out


def _fit_is_horizontal(sensor_fit: str, resolution_x: float, resolution_y: float,
                       pixel_aspect_x: float, pixel_aspect_y: float) -> bool:
    if sensor_fit == "AUTO":
        return resolution_x * pixel_aspect_x >= resolution_y * pixel_aspect_y
    return sensor_fit == "HORIZONTAL"


def _view_geometry(sensor_width: float, sensor_height: float, sensor_fit: str, resolution_x: float,
                   resolution_y: float, pixel_aspect_x: float, pixel_aspect_y: float) -> tuple[float, float, float]:
    """(sensor size, viewfac, ycor) as Blender computes them for the view plane."""
    ycor = pixel_aspect_y / pixel_aspect_x
    if _fit_is_horizontal(sensor_fit, resolution_x, resolution_y, pixel_aspect_x, pixel_aspect_y):
        viewfac = float(resolution_x)
    else:
        viewfac = ycor * resolution_y
    sensor = sensor_height if sensor_fit == "VERTICAL" else sensor_width
    return sensor, viewfac, ycor


def _blender_intrinsics(camera: BlenderCamera) -> np.ndarray:
    w, h = float(camera.resolution_x), float(camera.resolution_y)
    sensor, viewfac, ycor = _view_geometry(camera.sensor_width, camera.sensor_height, camera.sensor_fit,
                                           w, h, camera.pixel_aspect_x, camera.pixel_aspect_y)
    fx_px = camera.lens * viewfac / sensor
    fy_px = fx_px / ycor
    cx_px = w / 2.0 - camera.shift_x * viewfac
    cy_px = h / 2.0 + camera.shift_y * viewfac / ycor
    return intrinsics_from_focal(fx_px / w, cx_px / w, cy_px / h, fy=fy_px / h)


def blender_to_label(camera: BlenderCamera, anchor: HeadAnchor) -> np.ndarray:
    """(25,) EG3D label of a Blender camera, in the head frame given by ``anchor``."""
    c = _rigid(camera.matrix_world, "camera matrix_world")
    h = _rigid(anchor.matrix_world, "head anchor matrix_world")
    cam2world = BLENDER_TO_EG3D @ np.linalg.inv(h) @ c @ BLENDER_CAM_TO_OPENCV
    cam2world[:3, 3] /= anchor.size
    cam2world[3] = (0.0, 0.0, 0.0, 1.0)
    return to_label(cam2world, _blender_intrinsics(camera))


def label_to_blender(label, anchor: HeadAnchor, *, sensor_width: float = 36.0, sensor_height: float = 24.0,
                     sensor_fit: str = "HORIZONTAL", resolution_x: int = 512, resolution_y: int = 512,
                     pixel_aspect_x: float = 1.0, pixel_aspect_y: float = 1.0) -> BlenderCamera:
    """The Blender camera (world matrix, lens, shift) for ``label`` under the given sensor and render settings.

    Exact inverse of :func:`blender_to_label` for the same settings. Raises :class:`CameraError` for
    labels a Blender camera cannot represent (skew, non-rotation pose, fx/fy ratio that does not
    match the resolution and pixel aspect).
    """
    cam2world, k = from_label(label)
    if sensor_fit not in SENSOR_FITS:
        raise CameraError(f"sensor_fit must be one of {SENSOR_FITS}, got {sensor_fit!r}")
    if not np.allclose(cam2world[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise CameraError(f"label cam2world bottom row must be 0 0 0 1, got {cam2world[3].tolist()}")
    if not _is_rotation(cam2world[:3, :3]):
        raise CameraError("label cam2world rotation is not a pure rotation (it has scale, shear or a mirror); "
                          "a Blender camera can only be rotated and moved")
    if abs(k[0, 1]) > 1e-9:
        raise CameraError(f"label intrinsics have skew {k[0, 1]}; Blender cameras cannot represent skew")
    if abs(k[1, 0]) > 1e-9 or not np.allclose(k[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise CameraError(f"label intrinsics must have the form [[fx,0,cx],[0,fy,cy],[0,0,1]], got {k.tolist()}")
    fx_n, fy_n, cx_n, cy_n = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    if fx_n <= 0 or fy_n <= 0:
        raise CameraError(f"label focal lengths must be positive, got fx={fx_n}, fy={fy_n}")
    for name, value in (("resolution_x", resolution_x), ("resolution_y", resolution_y),
                        ("pixel_aspect_x", pixel_aspect_x), ("pixel_aspect_y", pixel_aspect_y),
                        ("sensor_width", sensor_width), ("sensor_height", sensor_height)):
        if not (math.isfinite(value) and value > 0):
            raise CameraError(f"{name} must be a positive number, got {value!r}")

    w, h = float(resolution_x), float(resolution_y)
    sensor, viewfac, ycor = _view_geometry(sensor_width, sensor_height, sensor_fit, w, h,
                                           pixel_aspect_x, pixel_aspect_y)
    wanted_ratio = ycor * h / w
    if not math.isclose(fx_n / fy_n, wanted_ratio, rel_tol=_ASPECT_RTOL):
        square = fx_n / fy_n * w
        raise CameraError(
            f"label focal ratio fx/fy = {fx_n / fy_n:.6g} does not fit a {resolution_x}x{resolution_y} render "
            f"with pixel aspect {pixel_aspect_x}:{pixel_aspect_y} (needs {wanted_ratio:.6g}); use a resolution "
            f"of {resolution_x}x{square:.6g} with square pixels, or set the pixel aspect to match")
    lens = fx_n * w * sensor / viewfac
    shift_x = (0.5 - cx_n) * w / viewfac
    shift_y = (cy_n - 0.5) * h * ycor / viewfac

    anchor_rigid = _rigid(anchor.matrix_world, "head anchor matrix_world")
    pose = cam2world.copy()
    pose[:3, 3] *= anchor.size
    # BLENDER_TO_EG3D and BLENDER_CAM_TO_OPENCV are orthogonal: their inverses are their transposes.
    matrix_world = anchor_rigid @ BLENDER_TO_EG3D.T @ pose @ BLENDER_CAM_TO_OPENCV
    matrix_world[3] = (0.0, 0.0, 0.0, 1.0)
    return BlenderCamera(matrix_world=matrix_world, lens=float(lens), sensor_width=float(sensor_width),
                         sensor_height=float(sensor_height), sensor_fit=sensor_fit, shift_x=float(shift_x),
                         shift_y=float(shift_y), resolution_x=resolution_x, resolution_y=resolution_y,
                         pixel_aspect_x=float(pixel_aspect_x), pixel_aspect_y=float(pixel_aspect_y))
