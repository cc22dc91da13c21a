"""Regenerate dp3d_core/data/face_landmarks_3d.json: the generic 3D face landmarks and the framing correction.

    .venv/bin/python scripts/make_face_landmarks_3d.py [--out dp3d_core/data/face_landmarks_3d.json]

Needs the bpy module and the face models (the project's venv has both). About a minute on 2 CPU cores.

1. 3D landmarks from the project's own procedural head (addon/proxy_head.py): a few neutral identities are
   rendered (Workbench, like the condition images) from known EG3D cameras around the front; the face mesh
   finds its 468 landmarks in each render; each landmark is triangulated (linear least squares over the views,
   the cameras are exact), per identity, then averaged over identities. Landmarks whose triangulation does not
   explain the views (silhouette points that slide over the surface as the head turns) are left out. The
   detector's 6 keypoints (eyes, nose tip, mouth, ear tragions) are triangulated the same way: face_pose takes
   the yaw of a strongly turned face from them.
2. Framing: the fit of dp3d_core.face_pose on each official sample portrait gives the square EG3D's camera
   would frame; the mean ratio and offset to the sample's own square are the framing correction. The measured
   framing of the samples (eye line, eye distance, chin, as fractions of the image) is stored beside it.

Identities used for step 1 are seeds 1001-1004; the tests use other seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIBRATION_SEEDS = (1001, 1002, 1003, 1004)
YAWS = (-40.0, -20.0, 0.0, 20.0, 40.0)
PITCHES = (-20.0, 0.0, 20.0)
SIZE = 256
KEEP_FRACTION = 0.7  # the landmarks with the smallest triangulation residual that are kept
SAMPLES = ROOT.parent / "shared" / "fixtures" / "official_samples" / "portraits"


def render_views(seed: int, poses, folder: Path, size: int = SIZE,
                 head_turn: float = 0.0) -> list[tuple[Path, np.ndarray]]:
    """Render proxy head ``seed`` (neutral) at each camera (yaw, pitch) into a fresh empty Blender file (Workbench,
    like the condition images); (path, EG3D cam2world) per view. ``head_turn``: degrees the head itself is turned
    to its own left about its up axis (the cam2world stays the head anchor's). Imports bpy but never torch
    (Blender tests use it)."""
    import bpy
    from mathutils import Matrix

    from addon.condition_render import render_condition_images
    from addon.proxy_head import build_proxy_head, remove_proxy_head
    from dp3d_core import cameras
    from dp3d_core.face_pose import camera_from_pose

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    anchor = bpy.data.objects.new("Head Anchor", None)
    scene.collection.objects.link(anchor)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    head = build_proxy_head(seed, anchor, name="Subject", neutral=True)
    # The anchor's -Y is the face direction and +Z up, so the subject's left is +X: turning toward it is a
    # positive rotation about Z.
    head.rotation_euler = (0.0, 0.0, math.radians(head_turn))
    out = []
    for yaw, pitch in poses:
        c2w = camera_from_pose(yaw, pitch)
        label = cameras.to_label(c2w, cameras.intrinsics_from_focal())
        bc = cameras.label_to_blender(label, cameras.HeadAnchor(np.array(anchor.matrix_world), 1.0),
                                      sensor_fit="HORIZONTAL", resolution_x=size, resolution_y=size)
        cam.matrix_world = Matrix(bc.matrix_world.tolist())
        cam.data.lens, cam.data.sensor_width, cam.data.sensor_fit = bc.lens, bc.sensor_width, bc.sensor_fit
        cam.data.shift_x, cam.data.shift_y = bc.shift_x, bc.shift_y
        path = render_condition_images(scene, cam, [scene.frame_current], folder, size=size, objects=[head])[0]
        final = folder / (f"s{seed}_y{yaw:+.0f}_p{pitch:+.0f}.png" if not head_turn else
                          f"s{seed}_y{yaw:+.0f}_p{pitch:+.0f}_turn{head_turn:+.0f}.png")
        path.rename(final)
        out.append((final, c2w))
    remove_proxy_head("Subject")
    return out


def projection_matrix(c2w: np.ndarray, size: int) -> np.ndarray:
    from dp3d_core import cameras
    k = np.diag([cameras.EG3D_FOCAL * size, cameras.EG3D_FOCAL * size, 1.0])
    k[0, 2] = k[1, 2] = size / 2
    r = c2w[:3, :3].T
    return k @ np.concatenate([r, -(r @ c2w[:3, 3])[:, None]], axis=1)


def triangulate(views: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(N, 3) points from [(landmarks Nx2 px, 3x4 projection)] by linear least squares (DLT)."""
    n = len(views[0][0])
    points = np.zeros((n, 3))
    for i in range(n):
        rows = []
        for lm, p in views:
            x, y = lm[i, :2]
            rows.append(x * p[2] - p[0])
            rows.append(y * p[2] - p[1])
        a = np.array(rows)
        _, _, vt = np.linalg.svd(a)
        points[i] = vt[-1, :3] / vt[-1, 3]
    return points


def reprojection_error(points: np.ndarray, views) -> np.ndarray:
    errs = []
    for lm, p in views:
        h = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ p.T
        errs.append(np.linalg.norm(h[:, :2] / h[:, 2:3] - lm[:, :2], axis=1))
    return np.sqrt(np.mean(np.square(errs), axis=0))


def landmarks_of(path: Path, keypoints: bool = False):
    """The face mesh's 468 landmarks of the first face in ``path`` (None without a face); with ``keypoints``,
    (landmarks, the detector's 6 keypoints)."""
    from PIL import Image

    from dp3d_core.face_landmarks import find_faces
    faces = find_faces(np.asarray(Image.open(path).convert("RGB")))
    if not faces:
        return None
    return (faces[0].landmarks, faces[0].keypoints) if keypoints else faces[0].landmarks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dp3d_core" / "data" / "face_landmarks_3d.json"))
    args = parser.parse_args(argv)

    poses = [(y, p) for p in PITCHES for y in YAWS]
    per_identity, per_identity_kp, all_views = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in CALIBRATION_SEEDS:
            views, kp_views = [], []
            for path, c2w in render_views(seed, poses, Path(tmp)):
                found = landmarks_of(path, keypoints=True)
                if found is None:
                    print(f"  no face found in {path.name}; view skipped")
                    continue
                views.append((found[0], projection_matrix(c2w, SIZE)))
                kp_views.append((found[1], projection_matrix(c2w, SIZE)))
            points = triangulate(views)
            per_identity_kp.append(triangulate(kp_views))
            err = reprojection_error(points, views)
            print(f"seed {seed}: {len(views)} views, median reprojection error {np.median(err):.2f} px")
            per_identity.append(points)
            all_views.append(views)
    points = np.mean(per_identity, axis=0)
    err = np.mean([reprojection_error(points, v) for v in all_views], axis=0)
    keep = np.sort(np.argsort(err)[: int(round(KEEP_FRACTION * 468))])
    print(f"kept {len(keep)} of 468 landmarks (generic-set reprojection error <= {err[keep].max():.2f} px "
          f"at {SIZE} px)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "about": "Generic 3D face-mesh landmarks (EG3D units: +x subject's left, +y up, +z out of the face) "
                 "triangulated from renders of addon/proxy_head.py, and the framing correction measured on the "
                 "official sample portraits. Written by scripts/make_face_landmarks_3d.py; do not edit.",
        "seeds": list(CALIBRATION_SEEDS),
        "indices": [int(i) for i in keep],
        "points": [[round(float(v), 5) for v in points[i]] for i in keep],
        "keypoints_3d": [[round(float(v), 5) for v in p] for p in np.mean(per_identity_kp, axis=0)],
    }
    tmp_file = out.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(data), encoding="utf-8")
    tmp_file.replace(out)

    # Step 2 uses the landmark set just written.
    from PIL import Image

    from dp3d_core import face_pose
    face_pose.landmark_model.cache_clear()
    model = face_pose.landmark_model(str(out))
    scales, offsets, measured = [], [], {}
    for path in sorted(SAMPLES.glob("*.png")):
        size = Image.open(path).size[0]
        lm = landmarks_of(path)
        fit = face_pose.fit_pose(lm, model)
        x0, y0, side = fit.crop
        scales.append(size / side)
        offsets.append(((size / 2 - (x0 + side / 2)) / side, (size / 2 - (y0 + side / 2)) / side))
        eyes = (lm[33, :2] + lm[263, :2]) / 2
        measured[path.name] = {
            "eye_centre": [round(float(v) / size, 4) for v in eyes],
            "eye_distance": round(float(np.linalg.norm(lm[263, :2] - lm[33, :2])) / size, 4),
            "mouth_centre": [round(float(v) / size, 4) for v in (lm[61, :2] + lm[291, :2]) / 2],
            "chin": [round(float(v) / size, 4) for v in lm[152, :2]],
            "face_centre": [round(float(v) / size, 4) for v in lm[:, :2].mean(0)],
            "yaw": round(fit.yaw, 2), "pitch": round(fit.pitch, 2), "roll": round(fit.roll, 2),
            "fit_rms": round(fit.rms, 4),
        }
        print(f"{path.name}: {measured[path.name]}; fitted square {side / size:.3f} of the image")
    data["framing"] = {
        "scale": round(float(np.mean(scales)), 5),
        "offset": [round(float(v), 5) for v in np.mean(offsets, axis=0)],
        "spread": {"scale": round(float(np.ptp(scales)), 5),
                   "offset": [round(float(v), 5) for v in np.ptp(offsets, axis=0)]},
        "measured": measured,
    }
    tmp_file.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp_file.replace(out)
    print(f"framing correction: scale {data['framing']['scale']}, offset {data['framing']['offset']}; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
