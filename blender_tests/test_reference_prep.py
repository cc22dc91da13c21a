"""Reference preparation inside Blender: pose on rendered procedural heads, the pose fit on exact head geometry,
the operator, the job (crop + camera recorded, proxy views projected from the photo's camera), the turntable
from the photo's view and the CLI.

The renders and the preparation run the real face models in this venv's Python (the worker Python here).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import bpy
import numpy as np
import pytest
from mathutils import Vector
from mathutils.bvhtree import BVHTree
from PIL import Image

import addon
from addon import job_runner, job_writer, reference_prep, rig
from addon.poses import scene_poses
from addon.proxy_head import build_proxy_head
from blender_tests.helpers import PORTRAIT, fake_model_folder, setup_generation_scene
from dp3d_core import cameras, face_pose

HELD_OUT_SEEDS = (21, 22, 23)  # the generic landmarks were triangulated from seeds 1001-1004
RENDER_SIZE = 256


# ---------------------------------------------------------------- pose on rendered heads


@pytest.fixture(scope="session")
def rendered_heads(tmp_path_factory) -> list[tuple[int, float, float, Path]]:
    """Renders of two held-out heads at RENDER_POSES (yaw, pitch), made once per test session."""
    from scripts.make_face_landmarks_3d import render_views

    folder = tmp_path_factory.mktemp("prep-renders")
    out = []
    for seed in HELD_OUT_SEEDS[:2]:
        for path, _ in render_views(seed, list(RENDER_POSES), folder, size=RENDER_SIZE):
            out.append((seed, *(float(v) for v in path.stem.split("_y")[1].split("_p")), path))
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return out


RENDER_POSES = ((-45.0, 0.0), (-20.0, 15.0), (0.0, 0.0), (20.0, -15.0), (45.0, 0.0))


def test_pose_of_rendered_heads(rendered_heads):
    """The whole path (detector, face mesh, fit) on Workbench renders of held-out identities.

    On these synthetic heads the face mesh itself gives up beyond about 45 degrees of yaw and underestimates
    pitch beyond about 15 degrees (measured with scripts/measure_pose_accuracy.py, see docs/REFERENCE_PREP.md);
    the fit over the issue's full range is checked on exact geometry in the next test.
    """
    from dp3d_core.prepare_reference import prepare

    errors = []
    for seed, yaw, pitch, path in rendered_heads:  # yaw, pitch: the render camera's
        result = prepare(path)
        errors.append((seed, yaw, pitch, face_pose.camera_yaw(result["yaw"]) - yaw, result["pitch"] - pitch,
                       result["roll"]))
    e = np.array(errors)
    worst = np.max(np.abs(e[:, 3:5]), axis=1)
    table = "\n".join(f"seed {int(s)} yaw {y:+.0f} pitch {p:+.0f}: error yaw {dy:+.1f} pitch {dp:+.1f} roll {r:+.1f}"
                      for s, y, p, dy, dp, r in errors)
    assert np.median(worst) <= 5.0, table
    assert worst.max() <= 10.0, table
    assert np.max(np.abs(e[:, 5])) <= 5.0, table  # the renders have no roll


def test_yaw_sign_is_the_subjects(tmp_path):
    """The reported yaw is the subject's (issue 13: EG3D convention, > 0 when the subject turns to its left),
    pinned without the pose code's own conventions: the proxy head itself is turned 25 degrees to its own left
    (about its up axis; the anchor's -Y is the face, +Z up, so +X is the subject's left) and rendered by a
    camera straight in front. The panel's words say the same; the label's camera stays where it is."""
    from dp3d_core.prepare_reference import prepare
    from scripts.make_face_landmarks_3d import render_views

    turned = {}
    for turn in (25.0, -25.0):
        (path, _), = render_views(HELD_OUT_SEEDS[2], [(0.0, 0.0)], tmp_path, size=RENDER_SIZE, head_turn=turn)
        turned[turn] = prepare(path)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    left, right = turned[25.0], turned[-25.0]
    assert 15.0 < left["yaw"] < 35.0, left["yaw"]
    assert -35.0 < right["yaw"] < -15.0, right["yaw"]
    # The photo camera (label) of a subject turned to its left is on the subject's right (camera yaw < 0).
    assert cameras.yaw_pitch_from_cam2world(cameras.from_label(left["label"])[0])[0] < -15.0
    words = reference_prep.PrepResult(crop=left["crop"], yaw=left["yaw"], pitch=left["pitch"], roll=left["roll"],
                                      label=left["label"]).summary()
    assert words.startswith(f"turned {round(left['yaw'])}° to its left"), words


def _identity_landmarks(seed: int, anchor) -> np.ndarray:
    """The generic landmarks moved onto head ``seed``'s own surface (nearest point), in EG3D units, with
    their outward normals."""
    head = build_proxy_head(seed, anchor, name=f"Geometry {seed}", neutral=True)
    mesh = head.data
    verts = [tuple(v.co) for v in mesh.vertices]
    tree = BVHTree.FromPolygons(verts, [tuple(p.vertices) for p in mesh.polygons])
    model = face_pose.landmark_model()
    points, normals = [], []
    for x, y, z in model.points:  # EG3D (x, y, z) -> head-local Blender (x, -z, y)
        loc, normal, _, _ = tree.find_nearest(Vector((x, -z, y)))
        points.append((loc.x, loc.z, -loc.y))
        normals.append((normal.x, normal.z, -normal.y))
    return np.array(points), np.array(normals)


def test_pose_fit_on_exact_head_geometry_over_the_full_range(empty_scene):
    """Each held-out head's own landmark positions (the generic set snapped to its surface) seen by known EG3D
    cameras at yaw +-60 and pitch +-30, with 1 px noise at 256 px and the hidden landmarks (facing away from the
    camera) thrown 10 px off, as the face mesh guesses them: the fit's pose errors."""
    anchor = bpy.data.objects.new("Head Anchor", None)
    empty_scene.collection.objects.link(anchor)
    model = face_pose.landmark_model()
    rng = np.random.default_rng(7)
    errors = []
    for seed in HELD_OUT_SEEDS:
        points, normals = _identity_landmarks(seed, anchor)
        for yaw in (-60.0, -30.0, 0.0, 30.0, 60.0):
            for pitch in (-30.0, 0.0, 30.0):
                roll = float(rng.uniform(-10, 10))
                c2w = face_pose.camera_from_pose(yaw, pitch, roll)
                uv = face_pose.project(c2w, points) * RENDER_SIZE + rng.normal(0, 1.0, (len(points), 2))
                hidden = np.sum(normals * (c2w[:3, 3] - points), axis=1) <= 0
                uv[hidden] += rng.normal(0, 10.0, (int(hidden.sum()), 2))
                landmarks = np.zeros((468, 3))
                landmarks[model.indices, :2] = uv
                fit = face_pose.fit_pose(landmarks, model)
                errors.append(max(abs(fit.yaw - yaw), abs(fit.pitch - pitch), abs(fit.roll - roll)))
    errors = np.array(errors)
    assert np.median(errors) <= 5.0, errors
    assert errors.max() <= 10.0, errors


# ---------------------------------------------------------------- the add-on


@pytest.fixture
def prep_scene(empty_scene, monkeypatch, tmp_path):
    monkeypatch.setenv("PORTRAIT3D_WORKER_PYTHON", sys.executable)
    addon.register()
    setup_generation_scene(empty_scene, out=tmp_path / "out", model=fake_model_folder(tmp_path / "model"),
                           frames=3, size=64, prepare=True)
    yield empty_scene
    job_runner.stop_all()
    addon.unregister()


def test_operator_stores_the_crop_and_pose(prep_scene):
    s = prep_scene.portrait3d
    assert bpy.ops.portrait3d.prepare_reference() == {'FINISHED'}
    result = reference_prep.stored(s)
    assert result is not None and result.faces == 1 and len(result.label) == 25
    assert Path(result.crop_png).is_file() and Image.open(result.crop_png).size == (512, 512)
    assert reference_prep.thumbnail_image() is not None
    from addon.panel import PORTRAIT3D_PT_reference
    from blender_tests.test_rig_and_poses import _FakeLayout

    layout = _FakeLayout()
    PORTRAIT3D_PT_reference.draw(type("P", (), {"layout": layout})(), bpy.context)
    assert "portrait3d.prepare_reference" in layout.operators
    assert {name for _, name in layout.props} == {"prep_scale", "prep_offset_x", "prep_offset_y", "prep_set_pose"}
    # A nudge makes the stored result stale; preparing again applies it.
    s.prep_scale = 1.2
    assert reference_prep.stored(s) is None
    assert bpy.ops.portrait3d.prepare_reference() == {'FINISHED'}
    nudged = reference_prep.stored(s)
    assert nudged.crop[2] - nudged.crop[0] == pytest.approx(1.2 * (result.crop[2] - result.crop[0]), rel=1e-3)
    assert nudged.yaw == result.yaw


def test_background_preparation_is_stored_and_generate_waits_for_it(prep_scene):
    """What the UI does when the photo or a nudge changes (the timers are driven by hand here)."""
    import time

    s = prep_scene.portrait3d
    assert reference_prep.start_background(prep_scene, sys.executable)
    assert not reference_prep.start_background(prep_scene, sys.executable)  # the same inputs: not twice
    cmd = reference_prep._pending[prep_scene.name][0]
    while reference_prep._poll_background(prep_scene.name) is not None:
        time.sleep(0.1)
    result = reference_prep.stored(s)
    assert result is not None and result.faces == 1 and reference_prep.thumbnail_image() is not None
    assert cmd.poll() == 0 and not reference_prep._pending
    # A nudge while a preparation runs: Generate (ensure) waits for that run instead of starting another.
    s.prep_offset_x = 0.05
    assert reference_prep.start_background(prep_scene, sys.executable)
    running = reference_prep._pending[prep_scene.name][0]
    nudged = reference_prep.ensure(bpy.context)
    assert running.poll() == 0 and not reference_prep._pending
    assert nudged.crop[0] == pytest.approx(result.crop[0] + 0.05 * (result.crop[2] - result.crop[0]), abs=0.01)


def test_a_crashed_preparation_is_one_sentence_and_a_log(prep_scene):
    import re

    raw = re.compile(r'\b\w*(Error|Exception)\b|Errno|Traceback|\bFile "')
    crash = ["Traceback (most recent call last):", '  File "x.py", line 3, in <module>',
             "ModuleNotFoundError: No module named 'numpy'"]
    with pytest.raises(reference_prep.ReferencePrepError) as info:
        reference_prep.parse_output(1, crash, Path("crop.png"))
    message = str(info.value)
    assert "lacks the package 'numpy'" in message and not raw.search(message), message
    log = Path(message.split("details in ")[1].split(")")[0])
    assert "ModuleNotFoundError" in log.read_text()
    with pytest.raises(reference_prep.ReferencePrepError, match="stopped unexpectedly .exit code -9") as info:
        reference_prep.parse_output(-9, ["Segmentation fault"], Path("crop.png"))
    assert not raw.search(str(info.value))


def test_operator_reports_no_face(prep_scene, tmp_path):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (200, 200), (200, 190, 180)).save(blank)
    prep_scene.portrait3d.reference_image = str(blank)
    with pytest.raises(RuntimeError, match="No face found in .*wall.png"):
        bpy.ops.portrait3d.prepare_reference()
    assert "No face found" in prep_scene.portrait3d.prep_error
    # Generate refuses with the same sentence and the way out.
    with pytest.raises(job_writer.JobSetupError, match="No face found.*turn off Prepare Reference"):
        job_writer.prepare_job(bpy.context)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_job_records_the_prep_and_proxies_project_from_the_photo_camera(prep_scene):
    s = prep_scene.portrait3d
    s.use_proxy_views = True
    s.output_size = 128
    s.turntable_from_photo = True  # frame 1 looks from the photo's camera
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    prepared = job_writer.prepare_job(bpy.context)
    result = reference_prep.stored(s)
    data = json.loads((prepared.job_dir / "job.json").read_text())
    assert data["references"] == [str(PORTRAIT.resolve())]  # the original, cropped by the worker
    assert data["reference_prep"]["crop"] == pytest.approx(result.crop)
    assert data["reference_prep"]["label"] == pytest.approx(result.label)
    assert any("Reference prepared" in n for n in prepared.notes)
    # Frame 1's camera is the photo's (yaw, pitch), and its proxy view shows the photo's face where the crop has it.
    c2w = np.array(prepared.poses[0].label[:16]).reshape(4, 4)
    yaw, pitch = cameras.yaw_pitch_from_cam2world(c2w)
    assert yaw == pytest.approx(result.camera_yaw(), abs=1e-3) and pitch == pytest.approx(result.pitch, abs=1e-3)
    assert data["reference_prep"]["yaw"] == pytest.approx(result.yaw) == pytest.approx(-yaw, abs=1e-3)
    proxy = np.asarray(Image.open(prepared.job_dir / data["frames"][0]["proxy"]).convert("L"), float)
    n = proxy.shape[0]
    # What the photo shows through frame 1's camera: same place and direction, EG3D's focal instead of the
    # photo's (the crop resampled about the photo's principal point).
    _, k = cameras.from_label(result.label)
    zoom = k[0, 0] / cameras.EG3D_FOCAL
    crop_image = Image.open(prepared.job_dir / "reference_crop.png").convert("L")
    big = crop_image.size[0]
    a = zoom * big / n
    expected = crop_image.transform((n, n), Image.AFFINE, (a, 0.0, (k[0, 2] - 0.5 * zoom) * big, 0.0, a,
                                                           (k[1, 2] - 0.5 * zoom) * big), resample=Image.BILINEAR)
    crop = np.asarray(expected, float)
    face = (slice(n * 36 // 100, n * 64 // 100), slice(n * 36 // 100, n * 64 // 100))  # eyes to mouth
    seen_from_photo = _correlation(proxy[face], crop[face])
    # The same proxy view projected from the front camera instead (the old behaviour) matches worse.
    s.use_reference_prep = False
    frontal = job_writer.prepare_job(bpy.context)
    assert json.loads((frontal.job_dir / "job.json").read_text()).get("reference_prep") is None
    proxy_front = np.asarray(Image.open(frontal.job_dir / data["frames"][0]["proxy"]).convert("L"), float)
    frontal_match = _correlation(proxy_front[face], crop[face])
    print(f"proxy view vs photo: {seen_from_photo:.3f} from the photo camera, {frontal_match:.3f} from the front")
    assert seen_from_photo > 0.7 and seen_from_photo > frontal_match + 0.05, (seen_from_photo, frontal_match)


def test_turntable_starts_at_the_photo_view(prep_scene):
    s = prep_scene.portrait3d
    s.turntable_from_photo = True
    s.turntable_frames = 4
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    result = reference_prep.stored(s)
    poses = scene_poses(prep_scene, prep_scene.camera, s.head_anchor, range(1, 5))
    yaws = [cameras.yaw_pitch_from_cam2world(np.array(p.label[:16]).reshape(4, 4))[0] for p in poses]
    assert yaws[0] == pytest.approx(result.camera_yaw(), abs=1e-3)
    step = math.degrees(2 * s.turntable_yaw_range / 3)
    direction = -1.0 if result.camera_yaw() > 0 else 1.0
    np.testing.assert_allclose(np.diff(yaws), direction * step, atol=1e-3)
    expected = rig.expected_labels(4, s.turntable_yaw_range, math.radians(result.pitch),
                                   math.radians(result.camera_yaw()))
    np.testing.assert_allclose([p.label for p in poses], expected, atol=1e-4)


def test_cli_reports_the_pose_and_no_prepare_turns_it_off(prep_scene, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--frames", "3", "--out", str(out), "--reference", str(PORTRAIT), "--size", "64", "--poses-only",
            "--from-photo-view", "--worker-python", sys.executable]
    assert job_runner.cli_main(argv) == 0
    printed = capsys.readouterr().out
    result = reference_prep.stored(prep_scene.portrait3d)
    assert f"reference pose: yaw {result.yaw:+.1f}, pitch {result.pitch:+.1f}" in printed
    first = json.loads((out / "dataset.json").read_text())["labels"][0][1]
    yaw, _ = cameras.yaw_pitch_from_cam2world(np.array(first[:16]).reshape(4, 4))
    assert yaw == pytest.approx(result.camera_yaw(), abs=1e-3)
    assert job_runner.cli_main(argv + ["--no-prepare"]) == 1
    assert "--from-photo-view needs the prepared reference" in capsys.readouterr().out
    assert prep_scene.portrait3d.use_reference_prep is False
    assert "--no-prepare" in job_runner.cli_parser().format_help()


HEIC_PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "phone_photo.heic"


def test_heic_phone_photo_goes_through_generate(prep_scene):
    """An iPhone's HEIC: Blender cannot read it, so only the header is checked here; the worker Python prepares
    it, the proxy views project the PNG crop; with preparation off, 3D-aware noise refuses before any work."""
    from addon import back_view
    from addon.reference_check import check_reference

    s = prep_scene.portrait3d
    s.reference_image = str(HEIC_PHOTO)
    info = check_reference(s.reference_image, prepared=True)
    assert (info.width, info.height, info.blender_reads) == (300, 400, False)
    assert not any(im.filepath == str(HEIC_PHOTO) for im in bpy.data.images)
    s.use_proxy_views = True
    prepared = job_writer.prepare_job(bpy.context)
    data = json.loads((prepared.job_dir / "job.json").read_text())
    assert data["references"] == [str(HEIC_PHOTO.resolve())]
    assert abs(data["reference_prep"]["yaw"]) < 5 and abs(data["reference_prep"]["roll"]) < 3
    assert all((prepared.job_dir / f["proxy"]).is_file() for f in data["frames"])
    assert any("HEIF photo: the worker decodes it" in n for n in prepared.notes)
    s.use_reference_prep = False
    with pytest.raises(job_writer.JobSetupError, match="Blender, which cannot read phone_photo.heic: turn Prepare"):
        job_writer.prepare_job(bpy.context)
    s.use_proxy_views = False  # without 3D-aware noise the worker centre-crops the HEIC itself
    job_writer.prepare_job(bpy.context)
    with pytest.raises(back_view.BackViewError, match="Blender cannot read the HEIF photo phone_photo.heic"):
        back_view.use_photo(s, HEIC_PHOTO)


def test_pose_set_by_hand_flows_into_the_job_and_the_turntable(prep_scene, capsys, tmp_path):
    """The found pitch is the least certain angle: the artist can set yaw and pitch by hand; the crop, the job's
    reference_prep, the panel's words, Start at the Photo's View and the CLI all follow."""
    s = prep_scene.portrait3d
    assert bpy.ops.portrait3d.prepare_reference() == {'FINISHED'}
    found = reference_prep.stored(s)
    assert not found.set_by_hand
    s.prep_set_pose = True  # starts from the found pose
    assert math.degrees(s.prep_yaw) == pytest.approx(found.yaw, abs=1e-3)
    assert math.degrees(s.prep_pitch) == pytest.approx(found.pitch, abs=1e-3)
    s.prep_pitch = math.radians(-20.0)
    assert reference_prep.stored(s) is None  # the pose is an input: prepare again
    assert bpy.ops.portrait3d.prepare_reference() == {'FINISHED'}
    by_hand = reference_prep.stored(s)
    assert by_hand.pitch == pytest.approx(-20.0, abs=1e-3) and by_hand.yaw == pytest.approx(found.yaw, abs=1e-3)
    assert by_hand.found_pitch == pytest.approx(found.pitch) and by_hand.set_by_hand
    assert "set by hand (found: yaw" in by_hand.summary()
    from addon.panel import PORTRAIT3D_PT_reference
    from blender_tests.test_rig_and_poses import _FakeLayout

    layout = _FakeLayout()
    PORTRAIT3D_PT_reference.draw(type("P", (), {"layout": layout})(), bpy.context)
    assert {"prep_set_pose", "prep_yaw", "prep_pitch"} <= {name for _, name in layout.props}
    s.turntable_from_photo = True
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    prepared = job_writer.prepare_job(bpy.context)
    data = json.loads((prepared.job_dir / "job.json").read_text())
    assert data["reference_prep"]["pitch"] == pytest.approx(-20.0, abs=1e-3)
    _, pitch = cameras.yaw_pitch_from_cam2world(np.array(prepared.poses[0].label[:16]).reshape(4, 4))
    assert pitch == pytest.approx(-20.0, abs=1e-3)
    # Headless: --photo-pose sets it, the printed pose is the one set.
    argv = ["--frames", "3", "--out", str(tmp_path / "cli"), "--reference", str(PORTRAIT), "--size", "64",
            "--poses-only", "--from-photo-view", "--photo-pose", "15", "-10", "--worker-python", sys.executable]
    assert job_runner.cli_main(argv) == 0
    assert "reference pose: yaw +15.0, pitch -10.0" in capsys.readouterr().out
    assert job_runner.cli_main([a for a in argv if a != "--from-photo-view"] + ["--no-prepare"]) == 1
    assert "--photo-pose sets the prepared reference's pose: drop --no-prepare" in capsys.readouterr().out
