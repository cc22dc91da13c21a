"""Prepare a reference photo: find the face, frame it like the training data, estimate the photo's camera.

    python -m dp3d_core.prepare_reference IMAGE [--out CROP.png] [--size 512] [--scale 1] [--offset-x 0]
                                                [--offset-y 0] [--yaw DEG] [--pitch DEG]

Prints one JSON object on stdout:

- ``crop``: [x0, y0, x1, y1], the square in the pixels of the upright image (EXIF orientation applied); it
  may extend past the image, where the edge is repeated and blurred (never mirrored: no second face);
- ``yaw``: degrees, the subject's (EG3D convention): > 0 when the subject is turned to its own left (the nose
  points to the image's right);
- ``pitch``, ``roll``: degrees, the photo camera's (see :mod:`dp3d_core.face_pose`): pitch > 0 when the photo
  was taken from above the head, roll > 0 when the head appears rotated counter-clockwise in the photo;
- ``label``: the 25-float EG3D camera label of the photo's camera for that crop;
- ``faces``: how many faces were found; ``warnings``: a list of sentences;
- ``image_size`` [w, h], ``face_box`` [x0, y0, x1, y1] and ``fit_rms`` (landmark residual, fraction of the
  crop) for the curious;
- ``found_yaw``, ``found_pitch``: the pose found in the photo (equal to ``yaw``, ``pitch`` unless set by hand).

``--out`` writes the crop (``--size`` pixels, composited like the worker does) atomically. ``--scale`` and
``--offset-x/-y`` (fractions of the crop side, x right, y down) nudge the found crop; the label follows.
``--yaw`` / ``--pitch`` set the pose by hand (the found pitch is the least certain angle, see
docs/REFERENCE_PREP.md; the one not given stays as found); roll and crop are refitted to the landmarks with the
pose held, and the label follows.
Exit 0 on success; 2 with one sentence on stderr when the input cannot be used (not an image, no face);
3 when the face models are not installed. The original file is only read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from . import face_landmarks, face_pose
from .images import ImageError, crop_square, load_photo, save_png

EXIT_BAD_INPUT = 2
EXIT_NO_MODELS = 3
DETECT_MAX_SIDE = 1280  # the detector sees at most this; landmarks are mapped back to full resolution
SMALL_FACE_PX = 256  # a crop smaller than this is upscaled more than 2x for a 512 px job
WIDE_YAW = 60.0


class PrepareError(ValueError):
    """The photo cannot be prepared; the message names the file and says what to do."""


# A photo whose face is on its side or upside down (stored turned, its orientation tag lost) fools the detector's
# keypoints, and the face mesh then finds a confident but wrong face. Measured (detector scores): the three official
# samples turned by 90, 180 or 270 degrees score 0.54-0.65 as they are and 0.90-0.92 turned upright; upright
# renders of the proxy head at yaw up to 60 and pitch up to 30 scored at most 0.11 higher turned by 90 degrees.
SIDEWAYS_MARGIN = 0.15
SIDEWAYS_MESH = 0.9
_TURNS = {1: "90° counter-clockwise", 2: "180°", 3: "90° clockwise"}  # np.rot90 turns that make the face upright


def _refuse_a_face_on_its_side(small: np.ndarray, detected: list[face_landmarks.Face], path: Path) -> None:
    """PrepareError when the face in ``small`` (the detector's copy; ``detected``: its detections) is clearly
    upright only once the photo is turned by 90, 180 or 270 degrees: the crop and pose would be wrong, so the artist
    is told which way to turn it."""
    def best(found: list[face_landmarks.Face]) -> float:
        return max((f.score for f in found), default=0.0)

    upright = best(detected)
    turned = {k: np.ascontiguousarray(np.rot90(small, k)) for k in _TURNS}
    score, k = max((best(face_landmarks.detect_faces(image)), k) for k, image in turned.items())
    if score < upright + SIDEWAYS_MARGIN:
        return
    faces = face_landmarks.find_faces(turned[k])
    if faces and faces[0].mesh_score >= SIDEWAYS_MESH:
        raise PrepareError(f"The face in {path} is on its side or upside down (the photo may have lost its "
                           f"orientation tag): rotate the photo {_TURNS[k]} so the face is upright and pick it "
                           "again.")


def _detect_image(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """uint8 copy for the detector, downscaled to DETECT_MAX_SIDE; (image, photo px per detector px)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    u8 = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    factor = max(w, h) / DETECT_MAX_SIDE
    if factor <= 1.0:
        return u8, 1.0
    small = Image.fromarray(u8).resize((round(w / factor), round(h / factor)), Image.LANCZOS)
    return np.asarray(small), w / small.size[0]


def prepare(image: str | Path, out: str | Path | None = None, *, size: int = 512, scale: float = 1.0,
            offset_x: float = 0.0, offset_y: float = 0.0, yaw: float | None = None,
            pitch: float | None = None) -> dict:
    """Prepare ``image``; returns the JSON object described in the module notes (PrepareError, ImageError or
    face_landmarks.FaceModelError otherwise). ``yaw`` (the subject's) and ``pitch``: the pose set by hand."""
    path = Path(image)
    if not (math.isfinite(scale) and 0.2 <= scale <= 5.0):
        raise PrepareError(f"--scale must be between 0.2 and 5, got {scale}")
    if not all(math.isfinite(v) and abs(v) <= 1.0 for v in (offset_x, offset_y)):
        raise PrepareError(f"--offset-x and --offset-y must be between -1 and 1, got {offset_x}, {offset_y}")
    for name, value, limit in (("yaw", yaw, face_pose.SET_YAW_LIMIT), ("pitch", pitch, face_pose.SET_PITCH_LIMIT)):
        if value is not None and not (math.isfinite(value) and abs(value) <= limit):
            raise PrepareError(f"--{name} must be between -{limit:.0f} and {limit:.0f} degrees, got {value}")
    photo = load_photo(path)  # a huge photo comes at 1/2, 1/4 or 1/8 scale: everything below is in its pixels
    rgb = photo.rgb
    small, factor = _detect_image(rgb)
    detected = face_landmarks.detect_faces(small)
    _refuse_a_face_on_its_side(small, detected, path)
    found = face_landmarks.find_faces(small, detected)
    # A detection the face mesh does not confirm is counted only when nothing else is found (a strongly turned
    # face), so a face-like pattern in the background does not make a "several faces" warning.
    faces = [f for f in found if f.mesh_score >= face_landmarks.MESH_MIN_FLAG] or found
    if not faces:
        raise PrepareError(f"No face found in {path}. Use a photo where the face is visible, lit and not too "
                           "small.")
    face = faces[0]
    landmarks = face.landmarks.copy()
    landmarks[:, :2] *= factor
    found = face_pose.fit_pose(landmarks, keypoints=face.keypoints * factor)
    fit = found
    if yaw is not None or pitch is not None:  # the one not given stays as found
        fit = face_pose.fit_pose(landmarks, yaw=found.yaw if yaw is None else face_pose.camera_yaw(yaw),
                                 pitch=found.pitch if pitch is None else pitch)
    crop = face_pose.nudge_crop(face_pose.framed_crop(fit), scale, offset_x, offset_y)
    warnings: list[str] = []
    if len(faces) > 1:
        warnings.append(f"{len(faces)} faces found in {path.name}; using the largest. Crop the photo to one "
                        "person to choose another.")
    side = (crop[2] - crop[0]) * photo.scale
    if side < SMALL_FACE_PX:
        warnings.append(f"The face is small: its crop is {side:.0f} px, so frames larger than that are upscaled "
                        "from it. A closer or sharper photo gives more detail.")
    if abs(fit.yaw) > WIDE_YAW:
        warnings.append(f"The face is turned {abs(fit.yaw):.0f} degrees from the camera (more than {WIDE_YAW:.0f}); "
                        "the model was trained on faces within about 60 degrees of frontal: expect a weaker result.")
    if face.mesh_score < face_landmarks.MESH_MIN_FLAG:
        warnings.append("The face landmarks are uncertain (a strongly turned, hidden or unusual face): check the "
                        "crop and the pose, and nudge the crop if needed.")
    if out is not None:
        save_png(_resized(crop_square(rgb, crop), size), out)
    k = photo.scale
    return {
        "crop": [round(v * k, 3) for v in crop],
        "yaw": round(face_pose.subject_yaw(fit.yaw), 3), "pitch": round(fit.pitch, 3), "roll": round(fit.roll, 3),
        "label": [round(v, 7) for v in face_pose.label_for_crop(fit, crop)],
        "faces": len(faces),
        "warnings": warnings,
        "image_size": list(photo.size),
        "face_box": [round(float(v) * factor * k, 2) for v in face.box],
        "fit_rms": round(fit.rms, 5),
        "found_yaw": round(face_pose.subject_yaw(found.yaw), 3), "found_pitch": round(found.pitch, 3),
    }


def _resized(square: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if square.shape[0] == size:
        return square
    im = Image.fromarray((np.clip(square, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(im.resize((size, size), Image.LANCZOS, reducing_gap=3.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.prepare_reference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the portrait photo (read only)")
    parser.add_argument("--out", help="write the prepared crop here (PNG)")
    parser.add_argument("--size", type=int, default=512, help="side of the written crop in pixels (default 512)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the found crop about its centre")
    parser.add_argument("--offset-x", type=float, default=0.0, help="move the crop right by this part of its side")
    parser.add_argument("--offset-y", type=float, default=0.0, help="move the crop down by this part of its side")
    parser.add_argument("--yaw", type=float, help="set the subject's yaw by hand (degrees, > 0 turned to its own "
                                                  "left) instead of the found one; crop and roll follow")
    parser.add_argument("--pitch", type=float, help="set the camera's pitch by hand (degrees, > 0 photo taken from "
                                                    "above) instead of the found one; crop and roll follow")
    args = parser.parse_args(argv)
    if not 16 <= args.size <= 4096:
        print(f"prepare_reference: error: --size must be between 16 and 4096, got {args.size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = prepare(args.image, args.out, size=args.size, scale=args.scale, offset_x=args.offset_x,
                         offset_y=args.offset_y, yaw=args.yaw, pitch=args.pitch)
    except (PrepareError, ImageError, face_pose.PoseFitError) as exc:
        print(f"prepare_reference: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except face_landmarks.FaceModelError as exc:
        print(f"prepare_reference: error: {exc}", file=sys.stderr)
        return EXIT_NO_MODELS
    except OSError as exc:
        print(f"prepare_reference: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
