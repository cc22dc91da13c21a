"""Head pose and EG3D framing from 2D face landmarks (numpy only; importable in Blender).

The photo's camera is modelled as an EG3D camera: it looks at the pivot (0, 0, 0.2) from radius 2.7
around the head centre, focal 4.2647 in units of the crop side, plus a roll about its viewing axis.
Fitting that camera to the detected landmarks of the generic 3D landmark set
(``data/face_landmarks_3d.json``, triangulated from renders of the project's procedural head by
``scripts/make_face_landmarks_3d.py``) gives, in one least-squares problem (a perspective-n-point fit
whose distance is fixed and whose image scale is free), the pose AND the square crop in which the head
sits where EG3D's camera would put it. The crop is then corrected by the framing measured on the
official sample portraits (stored in the same file).

Angles here, in degrees, are the camera's, as :func:`dp3d_core.cameras.yaw_pitch_from_cam2world`:
``yaw`` > 0 when the camera is on the subject's left (+X), so the face is seen turned toward the
subject's right (the nose points to the image's left); ``pitch`` > 0 when the camera is above the head;
``roll`` > 0 when the camera is rotated clockwise about its viewing axis, so the head appears rotated
counter-clockwise in the photo. What prepare_reference reports (JSON, job.json, the panel) is the
subject's yaw instead (> 0 when the subject turns to its left, the issue's EG3D convention): convert
with :func:`subject_yaw` / :func:`camera_yaw`, nowhere else.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import cameras

DATA_FILE = Path(__file__).resolve().parent / "data" / "face_landmarks_3d.json"


class PoseFitError(ValueError):
    """The landmarks cannot be fitted (too few, degenerate)."""


@dataclass(frozen=True)
class LandmarkModel:
    indices: np.ndarray  # face-mesh landmark numbers used for the fit
    points: np.ndarray  # (N, 3) EG3D coordinates
    scale: float  # framing correction: true crop side / fitted crop side
    offset: tuple[float, float]  # framing correction: (true - fitted) crop centre, in fitted crop sides
    keypoints: np.ndarray | None = None  # (6, 3) EG3D points of the detector's keypoints (eyes, nose, mouth, ears)


# Beyond this camera yaw (degrees, as the detector's keypoints see it) the face mesh's landmarks fold back toward
# frontal on the calibration heads while the keypoints (their ear tragions) still follow the turn: the yaw is then
# taken from the keypoints (chosen on the calibration identities, scripts/make_face_landmarks_3d.py; the mesh
# says as little as 19 there). In 225 measured renders at camera yaw within 30, the keypoints never said more than
# 43. Only when the mesh sees the face turned the same way: the keypoints never flip the side.
KEYPOINT_YAW = 45.0

# The range of a pose set by hand (degrees: the subject's yaw, the camera's pitch), in prepare_reference, the add-on's
# Set Pose by Hand fields and the command line's --photo-pose.
SET_YAW_LIMIT, SET_PITCH_LIMIT = 90.0, 60.0


@lru_cache(maxsize=1)
def landmark_model(path: str | None = None) -> LandmarkModel:
    data = json.loads(Path(path or DATA_FILE).read_text(encoding="utf-8"))
    framing = data.get("framing", {})
    keypoints = data.get("keypoints_3d")
    return LandmarkModel(indices=np.array(data["indices"], int), points=np.array(data["points"], float),
                         scale=float(framing.get("scale", 1.0)),
                         offset=tuple(float(v) for v in framing.get("offset", (0.0, 0.0))),
                         keypoints=None if keypoints is None else np.array(keypoints, float))


def subject_yaw(camera_yaw: float) -> float:
    """The subject's yaw (> 0: turned to its own left) of a photo taken by a camera at ``camera_yaw`` (> 0: on
    the subject's left, which shows the face turned to its right)."""
    return -float(camera_yaw)


def camera_yaw(subject_yaw: float) -> float:
    """Inverse of :func:`subject_yaw`: where the camera is for a subject turned by ``subject_yaw``."""
    return -float(subject_yaw)


def camera_from_pose(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """EG3D cam2world (4x4) of the camera at ``yaw``/``pitch`` (degrees) looking at the pivot, rolled by ``roll``."""
    # cameras.sample_lookat(pi / 2 + yaw, pi / 2 * (1 - sin(pitch))) written out in plain floats: the fit calls
    # this hundreds of times (tests check the two agree).
    y, p = math.radians(yaw), math.radians(pitch)
    radius = cameras.EG3D_RADIUS
    origin = (radius * math.cos(p) * math.sin(y), radius * math.sin(p), radius * math.cos(p) * math.cos(y))
    f = [t - o for t, o in zip(cameras.EG3D_PIVOT, origin)]
    n = math.sqrt(sum(v * v for v in f))
    f = [v / n for v in f]
    right = [-f[2], 0.0, f[0]]  # -(up x forward) with up = +Y
    n = math.hypot(right[0], right[2])
    right = [v / n for v in right]
    down = [f[1] * right[2] - f[2] * right[1], f[2] * right[0] - f[0] * right[2], f[0] * right[1] - f[1] * right[0]]
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, f, origin
    r = math.radians(roll)
    c, s = math.cos(r), math.sin(r)
    c2w[:3, :3] = c2w[:3, :3] @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return c2w


def roll_from_cam2world(c2w: np.ndarray) -> float:
    """The roll (degrees) of a cam2world relative to the no-roll look-at camera at the same place."""
    yaw, pitch = cameras.yaw_pitch_from_cam2world(c2w)
    base = camera_from_pose(yaw, pitch)[:3, :3]
    rel = base.T @ np.asarray(c2w, float)[:3, :3]
    return math.degrees(math.atan2(rel[1, 0], rel[0, 0]))


def project(c2w: np.ndarray, points: np.ndarray, focal: float = cameras.EG3D_FOCAL) -> np.ndarray:
    """(N, 2) positions in the crop (0..1, x right, y down) of EG3D ``points`` seen by ``c2w``."""
    cam = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = np.maximum(cam[:, 2], 1e-6)
    return focal * cam[:, :2] / z[:, None] + 0.5


@dataclass
class PoseFit:
    yaw: float
    pitch: float
    roll: float
    crop: tuple[float, float, float]  # x0, y0, side of the EG3D-framed square, photo pixels (before correction)
    rms: float  # residual, in fractions of the crop side

    def cam2world(self) -> np.ndarray:
        return camera_from_pose(self.yaw, self.pitch, self.roll)


def _residuals(theta: np.ndarray, pts3: np.ndarray, pts2: np.ndarray) -> np.ndarray:
    yaw, pitch, roll, x0, y0, log_side = theta
    uv = project(camera_from_pose(yaw, pitch, roll), pts3)
    side = math.exp(log_side)
    return ((np.array([x0, y0]) + side * uv - pts2) / side).ravel()


def _solve(theta: np.ndarray, pts3: np.ndarray, pts2: np.ndarray, weights: np.ndarray,
           iterations: int = 40, free: tuple[int, ...] = (0, 1, 2, 3, 4, 5)) -> tuple[np.ndarray, float]:
    """Levenberg-Marquardt with a numeric Jacobian; ``weights`` per landmark (IRLS by the caller); only the
    parameters numbered in ``free`` move."""
    w = np.repeat(np.sqrt(weights), 2)
    lam = 1e-3
    steps = np.array([1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-5]) * np.array([1, 1, 1, 1, 1, 1])
    r = _residuals(theta, pts3, pts2) * w
    cost = float(r @ r)
    for _ in range(iterations):
        h = steps * np.maximum(1.0, np.abs(theta))
        jac = np.stack([(_residuals(theta + np.eye(6)[k] * h[k], pts3, pts2) * w - r) / h[k] for k in free],
                       axis=1)
        g = jac.T @ r
        a = jac.T @ jac
        improved = False
        for _ in range(8):
            delta = np.zeros(6)
            delta[list(free)] = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), -g)
            cand = theta + delta
            cand[1] = float(np.clip(cand[1], -85.0, 85.0))
            rc = _residuals(cand, pts3, pts2) * w
            cc = float(rc @ rc)
            if cc < cost:
                theta, r, cost, improved = cand, rc, cc, True
                lam = max(lam / 3.0, 1e-7)
                break
            lam *= 4.0
        if not improved or np.max(np.abs(delta)) < 1e-6:
            break
    return theta, cost


def _robust_fit(theta: np.ndarray, pts3: np.ndarray, pts2: np.ndarray,
                free: tuple[int, ...] = (0, 1, 2, 3, 4, 5)) -> tuple[np.ndarray, float]:
    """Cauchy-reweighted refinement from ``theta``; (parameters, weighted rms)."""
    weights = np.ones(len(pts3))
    for _ in range(3):
        theta, _cost = _solve(theta, pts3, pts2, weights, free=free)
        err = np.linalg.norm(_residuals(theta, pts3, pts2).reshape(-1, 2), axis=1)
        scale = max(1.4826 * float(np.median(err)), 2e-3)
        weights = 1.0 / (1.0 + (err / (2.0 * scale)) ** 2)
    return theta, math.sqrt(float(np.sum(weights * err ** 2) / np.sum(weights)))


def _start(pts2: np.ndarray, pts3: np.ndarray) -> tuple[np.ndarray, float]:
    """Frontal start: the generic points scaled and moved onto ``pts2``'s box; (centre x0 y0, side)."""
    extent = float(np.max(np.ptp(pts2, axis=0)))
    if extent <= 1e-6:
        raise PoseFitError("the landmarks all sit on one point")
    front = project(camera_from_pose(0.0, 0.0), pts3)
    side0 = extent / float(np.max(np.ptp(front, axis=0)))
    return pts2.mean(0) - side0 * front.mean(0), side0


def keypoint_yaw(keypoints: np.ndarray, model: LandmarkModel | None = None) -> float:
    """The camera yaw (degrees) fitted to the detector's 6 keypoints alone (ValueError without a keypoint set)."""
    model = model or landmark_model()
    if model.keypoints is None:
        raise ValueError("the landmark set has no detector keypoints")
    kp = np.asarray(keypoints, float)[:, :2]
    if kp.shape != (6, 2) or not np.all(np.isfinite(kp)):
        raise PoseFitError(f"expected the detector's 6 keypoints, got an array shaped {kp.shape}")
    centre0, side0 = _start(kp, model.keypoints)
    starts = [np.array([yaw0, 0.0, 0.0, centre0[0], centre0[1], math.log(side0)]) for yaw0 in (0.0, -50.0, 50.0)]
    theta = min((_solve(t, model.keypoints, kp, np.ones(6)) for t in starts), key=lambda r: r[1])[0]
    return float((theta[0] + 180.0) % 360.0 - 180.0)


def fit_pose(landmarks: np.ndarray, model: LandmarkModel | None = None,
             keypoints: np.ndarray | None = None, yaw: float | None = None,
             pitch: float | None = None) -> PoseFit:
    """Fit the EG3D camera (yaw, pitch, roll) and the EG3D-framed crop to face-mesh ``landmarks`` (468 x >= 2,
    photo pixels). Robust to the landmarks the mesh model guesses on the hidden side of a turned face
    (iteratively reweighted, Cauchy weights). With the detector's 6 ``keypoints`` (same pixels), a face whose
    keypoints say it is turned further than :data:`KEYPOINT_YAW` and further than the mesh says (the same way)
    gets the keypoints' yaw, and pitch, roll and crop are refitted to the landmarks with that yaw held.
    ``yaw`` / ``pitch`` (the camera's, degrees): set by hand; the rest is refitted with them held."""
    model = model or landmark_model()
    lm = np.asarray(landmarks, float)
    if lm.ndim != 2 or lm.shape[0] <= int(model.indices.max()) or lm.shape[1] < 2:
        raise PoseFitError(f"expected the 468 face-mesh landmarks, got an array shaped {lm.shape}")
    pts2 = lm[model.indices, :2]
    pts3 = model.points
    if not np.all(np.isfinite(pts2)):
        raise PoseFitError("the landmarks contain NaN or infinite values")
    centre0, side0 = _start(pts2, pts3)
    # Three starting yaws (a strongly turned face can fall into the mirrored solution from a frontal start);
    # the best plain least-squares solution is then refined with robust weights.
    starts = [np.array([yaw0, 0.0, 0.0, centre0[0], centre0[1], math.log(side0)]) for yaw0 in (0.0, -40.0, 40.0)]
    ones = np.ones(len(pts3))
    theta = min((_solve(t, pts3, pts2, ones, iterations=15) for t in starts), key=lambda r: r[1])[0]
    theta, rms = _robust_fit(theta, pts3, pts2)
    held = {k: float(v) for k, v in ((0, yaw), (1, pitch)) if v is not None}  # parameter number: value set by hand
    if held:
        theta = theta.copy()
        theta[list(held)] = list(held.values())
        theta, rms = _robust_fit(theta, pts3, pts2, free=tuple(k for k in range(6) if k not in held))
    elif keypoints is not None and model.keypoints is not None:
        yaw_k = keypoint_yaw(keypoints, model)
        yaw_m = (theta[0] + 180.0) % 360.0 - 180.0
        if abs(yaw_k) > KEYPOINT_YAW and abs(yaw_k) > abs(yaw_m) and yaw_k * yaw_m > 0:
            theta = theta.copy()
            theta[0] = yaw_k
            theta, rms = _robust_fit(theta, pts3, pts2, free=(1, 2, 3, 4, 5))
    yaw, pitch, roll, x0, y0, log_side = theta
    yaw = (yaw + 180.0) % 360.0 - 180.0
    roll = (roll + 180.0) % 360.0 - 180.0
    return PoseFit(float(yaw), float(pitch), float(roll), (float(x0), float(y0), math.exp(log_side)), rms)


def framed_crop(fit: PoseFit, model: LandmarkModel | None = None) -> tuple[float, float, float, float]:
    """The square crop (x0, y0, x1, y1) in photo pixels that frames the face like the official samples."""
    model = model or landmark_model()
    x0, y0, side = fit.crop
    cx = x0 + side * (0.5 + model.offset[0])
    cy = y0 + side * (0.5 + model.offset[1])
    s = side * model.scale
    return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


def nudge_crop(crop, scale: float = 1.0, offset_x: float = 0.0, offset_y: float = 0.0) -> tuple[float, ...]:
    """``crop`` (x0, y0, x1, y1) scaled about its centre by ``scale`` and moved by ``offset_x``/``offset_y`` of
    its side (x right, y down)."""
    x0, y0, x1, y1 = (float(v) for v in crop)
    side = x1 - x0
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"crop scale must be a positive number, got {scale!r}")
    cx = (x0 + x1) / 2 + offset_x * side
    cy = (y0 + y1) / 2 + offset_y * side
    s = side * scale
    return (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)


def label_for_crop(fit: PoseFit, crop) -> list[float]:
    """The 25-float EG3D label of the photo's camera as seen through ``crop`` (x0, y0, x1, y1 photo pixels).

    The fitted square has EG3D's intrinsics (focal 4.2647, centred principal point); any other square (the
    framing correction, a nudge) changes the normalised focal and principal point accordingly.
    """
    fx0, fy0, fside = fit.crop
    x0, y0, x1, _y1 = (float(v) for v in crop)
    side = x1 - x0
    focal = cameras.EG3D_FOCAL * fside / side
    cx = (fx0 + 0.5 * fside - x0) / side
    cy = (fy0 + 0.5 * fside - y0) / side
    k = cameras.intrinsics_from_focal(focal, cx, cy)
    return [float(v) for v in cameras.to_label(fit.cam2world(), k)]
