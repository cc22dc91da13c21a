"""Pose accuracy of reference preparation on renders of held-out procedural heads (for docs/REFERENCE_PREP.md).

    .venv/bin/python scripts/measure_pose_accuracy.py [--seeds 11 12 13] [--size 256] [--cache FOLDER]

Renders each head (Workbench, like the condition images) from EG3D cameras on a yaw x pitch grid, runs the real
face models and the pose fit on each render, and prints the yaw/pitch errors per pose and overall (the grid's
yaw is the render camera's; the reported, subject's yaw is compared after converting it back). Needs the
bpy module and the face models (the project's venv has both). With ``--cache`` the renders are kept in FOLDER
and reused (a render is made only when its file is missing), so a change to the face models' use or the fit is
measured on the same images in a few seconds.

``--official``: no ground truth, a consistency check on real-looking faces instead. The shared fixtures hold
four identities seen by the same 16 cameras (the official condition images and the three samples' 3D-aware
proxy views, all EG3D renders); the pose found for one camera should not depend on whose face it shows. Prints
the spread (max - min over the four identities) of the found yaw and pitch per camera.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

YAWS = (-60, -45, -30, -15, 0, 15, 30, 45, 60)
PITCHES = (-30, -15, 0, 15, 30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cache", help="keep the renders here and reuse them")
    parser.add_argument("--official", action="store_true", help="consistency on the official fixtures instead")
    args = parser.parse_args(argv)
    if args.official:
        return official_consistency()
    from dp3d_core.face_pose import camera_yaw
    from dp3d_core.prepare_reference import prepare
    from scripts.make_face_landmarks_3d import render_views

    rows = []
    poses = [(float(y), float(p)) for p in PITCHES for y in YAWS]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.cache) / f"{args.size}px" if args.cache else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            paths = [folder / f"s{seed}_y{y:+.0f}_p{p:+.0f}.png" for y, p in poses]
            if not all(p.is_file() for p in paths):
                paths = [path for path, _c2w in render_views(seed, poses, folder, size=args.size)]
            for path in paths:
                yaw, pitch = (float(v) for v in path.stem.split("_y")[1].split("_p"))
                try:
                    r = prepare(path)
                    rows.append((seed, yaw, pitch, camera_yaw(r["yaw"]) - yaw, r["pitch"] - pitch))
                except Exception as exc:  # noqa: BLE001 - a measurement: note every failure and go on
                    rows.append((seed, yaw, pitch, np.nan, np.nan))
                    print(f"seed {seed} yaw {yaw:+.0f} pitch {pitch:+.0f}: {exc}")
    a = np.array(rows)
    print("pitch \\ yaw " + " ".join(f"{y:>11.0f}" for y in YAWS) + "   (mean |yaw err| / |pitch err|, degrees)")
    for p in PITCHES:
        cells = []
        for y in YAWS:
            m = (a[:, 1] == y) & (a[:, 2] == p)
            cells.append(f"{np.nanmean(np.abs(a[m, 3])):5.1f}/{np.nanmean(np.abs(a[m, 4])):<5.1f}")
        print(f"{p:>11.0f} " + " ".join(cells))
    for name, m in (("all", np.ones(len(a), bool)),
                    ("|yaw|<=45, |pitch|<=15", (np.abs(a[:, 1]) <= 45) & (np.abs(a[:, 2]) <= 15)),
                    ("|yaw|<=30, |pitch|<=15", (np.abs(a[:, 1]) <= 30) & (np.abs(a[:, 2]) <= 15)),
                    ("|yaw|<=60, |pitch|<=15", np.abs(a[:, 2]) <= 15),
                    ("|yaw|<=45, |pitch|<=30", np.abs(a[:, 1]) <= 45)):
        e = np.nanmax(np.abs(a[m][:, 3:5]), axis=1)
        print(f"{name}: {np.sum(np.isnan(e))} failed of {len(e)}; max(|yaw err|, |pitch err|) median "
              f"{np.nanmedian(e):.1f}, 90th percentile {np.nanpercentile(e, 90):.1f}, worst {np.nanmax(e):.1f}")
    return 0


def official_consistency() -> int:
    from dp3d_core.face_pose import camera_yaw
    from dp3d_core.prepare_reference import prepare

    samples = ROOT.parent / "shared" / "fixtures" / "official_samples"
    folders = [samples / "camera_conditions"] + sorted((samples / "proxy_views").iterdir())
    found = np.array([[(camera_yaw(r["yaw"]), r["pitch"]) for r in map(prepare, sorted(f.glob("*.png")))]
                      for f in folders])  # (identity, camera, yaw/pitch)
    spread = found.max(axis=0) - found.min(axis=0)
    print("camera  " + " ".join(f"{i:>5d}" for i in range(found.shape[1])))
    print("yaw     " + " ".join(f"{v:5.1f}" for v in found.mean(axis=0)[:, 0]) + "   (mean found camera yaw)")
    print("pitch   " + " ".join(f"{v:5.1f}" for v in found.mean(axis=0)[:, 1]) + "   (mean found pitch)")
    for k, name in enumerate(("yaw", "pitch")):
        print(f"{name} spread over {len(folders)} identities: " + " ".join(f"{v:5.1f}" for v in spread[:, k]) +
              f"   median {np.median(spread[:, k]):.1f}, worst {spread[:, k].max():.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
