"""Turntable rig, per-frame poses, pose export and the CLI job, with the source-tree add-on registered."""
from __future__ import annotations

import json
import math
import sys

import bpy
import numpy as np
import pytest

import addon
from addon import job_runner, operators, poses, rig
from blender_tests.helpers import op_error, run_execute, wrap_deg
from dp3d_core import cameras

TOL = 1e-6


@pytest.fixture
def scene(empty_scene):
    addon.register()
    yield empty_scene
    addon.unregister()


def add_anchor(scene, *, size=1.0, location=(0.0, 0.0, 0.0)):
    scene.cursor.location = location
    assert bpy.ops.portrait3d.add_head_anchor(size=size) == {'FINISHED'}
    return scene.portrait3d.head_anchor


def add_turntable(scene, frames=5, yaw_deg=45.0, pitch_deg=0.0, size_px=512):
    s = scene.portrait3d
    s.turntable_frames = frames
    s.turntable_yaw_range = math.radians(yaw_deg)
    s.turntable_pitch = math.radians(pitch_deg)
    s.output_size = size_px
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    return scene.camera


def all_poses(scene):
    return poses.scene_poses(scene, scene.camera, scene.portrait3d.head_anchor,
                             range(scene.frame_start, scene.frame_end + 1))


def eg3d_label(h: float, v: float) -> np.ndarray:
    return cameras.to_label(cameras.sample_lookat(h, v, cameras.EG3D_PIVOT, cameras.EG3D_RADIUS),
                            cameras.intrinsics_from_focal(cameras.EG3D_FOCAL))


def test_register_does_not_import_torch(scene):
    assert hasattr(bpy.types.Scene, "portrait3d")
    assert "torch" not in sys.modules


def test_add_head_anchor_at_cursor(scene):
    anchor = add_anchor(scene, size=0.3, location=(1.0, 2.0, 3.0))
    assert anchor.name == rig.ANCHOR_NAME and anchor.type == 'EMPTY'
    assert anchor.empty_display_type == 'SPHERE'
    assert anchor.empty_display_size == pytest.approx(0.3)
    assert tuple(anchor.location) == pytest.approx((1.0, 2.0, 3.0))
    assert poses.head_anchor(anchor).size == pytest.approx(0.3)


def test_turntable_keys_are_linear_one_per_frame_without_repeated_end(scene):
    add_anchor(scene)
    scene.frame_start = 10
    camera = add_turntable(scene, frames=7, yaw_deg=45.0, size_px=384)
    orbit = camera.parent
    fcurve = rig.yaw_fcurve(orbit)
    keys = list(fcurve.keyframe_points)
    assert [k.co.x for k in keys] == list(range(10, 17))
    assert all(k.interpolation == 'LINEAR' for k in keys)
    yaws = [math.degrees(k.co.y) for k in keys]
    assert yaws == pytest.approx([-45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0], abs=1e-4)
    assert (scene.frame_start, scene.frame_end) == (10, 16)
    assert scene.camera == camera
    assert (scene.render.resolution_x, scene.render.resolution_y) == (384, 384)


def test_full_turn_never_repeats_the_first_frame(scene):
    add_anchor(scene)
    add_turntable(scene, frames=8, yaw_deg=180.0)
    yaws = [p.yaw for p in all_poses(scene)]
    assert len(yaws) == 8
    steps = [wrap_deg(b - a) for a, b in zip(yaws, yaws[1:] + yaws[:1])]
    assert steps == pytest.approx([45.0] * 8, abs=1e-3)  # evenly around, last frame one step before the first


def test_radius_and_focal_follow_the_anchor_size(scene):
    anchor = add_anchor(scene, size=0.25, location=(0.5, -1.0, 1.5))
    anchor.scale = (2.0, 2.0, 2.0)
    anchor.rotation_euler = (0.2, -0.1, 0.7)
    camera = add_turntable(scene, frames=5)
    size = 0.5
    for frame in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(frame)
        dist = (camera.matrix_world.translation - anchor.matrix_world.translation).length
        assert dist == pytest.approx(cameras.EG3D_RADIUS * size, abs=1e-5)
    assert camera.data.lens / camera.data.sensor_width == pytest.approx(cameras.EG3D_FOCAL, abs=1e-5)
    for pose in all_poses(scene):
        assert pose.label[16] == pytest.approx(cameras.EG3D_FOCAL, abs=TOL)
        assert pose.label[20] == pytest.approx(cameras.EG3D_FOCAL, abs=TOL)


def test_poses_equal_blender_to_label_of_evaluated_matrices(scene):
    anchor = add_anchor(scene, size=0.7, location=(0.3, 0.2, 1.1))
    anchor.rotation_euler = (0.0, 0.0, 0.5)
    camera = add_turntable(scene, frames=6, yaw_deg=60.0, pitch_deg=10.0)
    got = all_poses(scene)
    for pose in got:
        scene.frame_set(pose.frame)
        dg = bpy.context.evaluated_depsgraph_get()
        cam_eval, anchor_eval = camera.evaluated_get(dg), anchor.evaluated_get(dg)
        expected = cameras.blender_to_label(
            cameras.BlenderCamera(np.array(cam_eval.matrix_world), cam_eval.data.lens,
                                  sensor_width=cam_eval.data.sensor_width, sensor_fit=cam_eval.data.sensor_fit,
                                  resolution_x=512, resolution_y=512),
            cameras.HeadAnchor(np.array(anchor_eval.matrix_world), 0.7))
        np.testing.assert_allclose(pose.label, expected, atol=1e-9)
    assert len({round(p.yaw, 3) for p in got}) == 6  # each frame is a different view


@pytest.mark.parametrize("case_name,frames,yaw_deg,pitch_deg,index", [
    ("frontal", 5, 45.0, 0.0, 2),             # middle frame of a symmetric sweep
    ("yaw_plus_30deg", 3, 30.0, 0.0, 2),
    ("yaw_minus_30deg", 3, 30.0, 0.0, 0),
])
def test_rig_reproduces_eg3d_reference_labels(scene, fixtures_dir, case_name, frames, yaw_deg, pitch_deg, index):
    reference = json.loads((fixtures_dir / "eg3d_reference_poses.json").read_text())
    case = next(c for c in reference["cases"] if c["name"] == case_name)
    add_anchor(scene, location=(2.0, -3.0, 1.0))
    add_turntable(scene, frames=frames, yaw_deg=yaw_deg, pitch_deg=pitch_deg)
    label = all_poses(scene)[index].label
    np.testing.assert_allclose(label, case["label"], atol=reference["tolerance"])


def test_pitched_rig_matches_eg3d_sampler(scene):
    add_anchor(scene, size=0.4)
    pitch = 20.0
    add_turntable(scene, frames=4, yaw_deg=40.0, pitch_deg=pitch)
    v = math.pi / 2 * (1.0 - math.sin(math.radians(pitch)))  # EG3D: pitch = asin(1 - 2 v / pi)
    for pose, yaw in zip(all_poses(scene), np.linspace(-40.0, 40.0, 4)):
        np.testing.assert_allclose(pose.label, eg3d_label(math.pi / 2 + math.radians(yaw), v), atol=TOL)
        assert pose.pitch == pytest.approx(pitch, abs=1e-4)


def test_rerunning_the_rig_replaces_it(scene):
    add_anchor(scene)
    add_turntable(scene, frames=5)
    counts = (len(bpy.data.objects), len(bpy.data.cameras), len(bpy.data.actions))
    add_turntable(scene, frames=9, yaw_deg=30.0)
    assert (len(bpy.data.objects), len(bpy.data.cameras), len(bpy.data.actions)) == counts
    assert len(rig.rig_objects(scene)) == 3
    assert len(list(rig.yaw_fcurve(scene.camera.parent).keyframe_points)) == 9


def test_constrained_parented_camera_uses_evaluated_matrix(scene):
    anchor = add_anchor(scene)
    carrier = bpy.data.objects.new("Carrier", None)
    scene.collection.objects.link(carrier)
    for frame, x in ((1, -2.0), (5, 2.0)):
        carrier.location = (x, -3.0, 0.5)
        carrier.keyframe_insert("location", frame=frame)
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(cam)
    cam.parent = carrier
    track = cam.constraints.new('TRACK_TO')
    track.target = anchor
    track.track_axis, track.up_axis = 'TRACK_NEGATIVE_Z', 'UP_Y'
    scene.camera = cam
    scene.frame_start, scene.frame_end = 1, 5
    got = poses.scene_poses(scene, cam, anchor, range(1, 6))
    yaws = [p.yaw for p in got]
    assert yaws[0] < -20.0 and yaws[-1] > 20.0 and yaws == sorted(yaws)  # follows the parent's animation
    for pose in got:
        # The Track To constraint aims the optical axis at the head centre: it projects to the image centre.
        c2w, k = cameras.from_label(pose.label)
        p = c2w[:3, :3].T @ -c2w[:3, 3]
        u, v, _ = k @ (p / p[2])
        assert (u, v) == pytest.approx((0.5, 0.5), abs=1e-5)
        assert pose.warnings == []
    # The camera's own (unparented, unconstrained) transform would give another pose.
    cam.matrix_basis.identity()
    raw = cameras.blender_to_label(cameras.BlenderCamera(np.array(cam.matrix_basis), cam.data.lens),
                                   poses.head_anchor(anchor))
    assert not np.allclose(raw, got[0].label, atol=1e-3)


def test_pose_warnings_for_bad_views():
    k = cameras.intrinsics_from_focal(cameras.EG3D_FOCAL)
    good = cameras.to_label(cameras.sample_lookat(math.pi / 2, math.pi / 2), k)
    assert poses.pose_warnings(good) == []
    behind = cameras.to_label(cameras.sample_lookat(math.pi / 2 + math.radians(120), math.pi / 2), k)
    assert any("yaw" in w for w in poses.pose_warnings(behind))
    above = cameras.to_label(cameras.sample_lookat(math.pi / 2, math.radians(20)), k)
    assert any("pitch" in w for w in poses.pose_warnings(above))
    away = good.copy()
    away[[0, 2, 8, 10]] = [-1.0, 0.0, 0.0, 1.0]  # rotate 180 deg about y: the camera faces away
    assert any("looks away" in w for w in poses.pose_warnings(away))


def test_export_writes_eg3d_dataset(scene, tmp_path):
    add_anchor(scene)
    add_turntable(scene, frames=4)
    scene.portrait3d.output_folder = str(tmp_path / "out") + "/"
    assert bpy.ops.portrait3d.export_poses() == {'FINISHED'}
    data = json.loads((tmp_path / "out" / "dataset.json").read_text())
    names = [name for name, _ in data["labels"]]
    assert names == ["frame_0001.png", "frame_0002.png", "frame_0003.png", "frame_0004.png"]
    expected = all_poses(scene)
    for (_, label), pose in zip(data["labels"], expected):
        assert len(label) == 25
        np.testing.assert_allclose(label, pose.label, atol=1e-12)


def test_export_custom_range_and_warnings(scene, tmp_path):
    add_anchor(scene)
    add_turntable(scene, frames=5, yaw_deg=120.0)
    s = scene.portrait3d
    s.use_scene_range, s.frame_start, s.frame_end = False, 1, 3  # yaw -120, -60, 0
    s.output_folder = str(tmp_path)
    result, rec = run_execute(operators.PORTRAIT3D_OT_export_poses)
    assert result == {'FINISHED'}
    warnings = rec.messages('WARNING')
    assert len(warnings) == 1 and warnings[0].startswith("frame 1:") and "yaw -120.0" in warnings[0]
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert [n for n, _ in data["labels"]] == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]


def _expect_cancelled(fragment: str) -> None:
    result, rec = run_execute(operators.PORTRAIT3D_OT_export_poses)
    assert result == {'CANCELLED'}
    errors = rec.messages('ERROR')
    assert len(errors) == 1 and fragment in errors[0].lower()
    message = op_error(bpy.ops.portrait3d.export_poses)
    assert fragment in message.lower() and "Traceback" not in message


def test_export_without_anchor_is_cancelled(scene, tmp_path):
    scene.portrait3d.output_folder = str(tmp_path)
    _expect_cancelled("no head anchor")
    assert not (tmp_path / "dataset.json").exists()


def test_export_without_camera_is_cancelled(scene, tmp_path):
    add_anchor(scene)
    scene.portrait3d.output_folder = str(tmp_path)
    _expect_cancelled("no camera")


def test_export_with_empty_range_is_cancelled(scene, tmp_path):
    add_anchor(scene)
    add_turntable(scene)
    s = scene.portrait3d
    s.use_scene_range, s.frame_start, s.frame_end = False, 5, 2
    s.output_folder = str(tmp_path)
    _expect_cancelled("frame range 5-2 is empty")
    assert not (tmp_path / "dataset.json").exists()


def test_export_to_unwritable_folder_is_cancelled(scene, tmp_path):
    add_anchor(scene)
    add_turntable(scene)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    scene.portrait3d.output_folder = str(blocker / "out")
    _expect_cancelled("cannot write to the output folder")


def test_export_relative_folder_in_unsaved_file_is_cancelled(scene):
    add_anchor(scene)
    add_turntable(scene)
    scene.portrait3d.output_folder = "//portrait3d/"
    _expect_cancelled("save the file")


def test_add_turntable_without_anchor_explains_why(scene):
    assert not bpy.ops.portrait3d.add_turntable.poll()
    with pytest.raises(RuntimeError, match="head anchor"):
        bpy.ops.portrait3d.add_turntable()


def test_cli_job_writes_dataset_and_blend(scene, tmp_path, fixtures_dir):
    portrait = fixtures_dir / "official_samples" / "portraits" / "0000028.png"
    out = tmp_path / "job"
    argv = ["--frames", "3", "--out", str(out), "--reference", str(portrait), "--yaw-range", "30", "--size", "256",
            "--poses-only"]
    assert job_runner.cli_main(argv) == 0
    data = json.loads((out / "dataset.json").read_text())
    assert len(data["labels"]) == 3
    np.testing.assert_allclose(data["labels"][2][1], eg3d_label(math.pi / 2 + math.radians(30), math.pi / 2),
                               atol=TOL)
    assert (out / "scene.blend").is_file()
    assert scene.portrait3d.reference_image == str(portrait.resolve())
    assert scene.render.resolution_x == 256
    # Re-running reuses the anchor and replaces the rig.
    assert job_runner.cli_main(argv) == 0
    assert len([o for o in scene.objects if o.type == 'EMPTY' and rig.RIG_KEY not in o]) == 1
    assert len(rig.rig_objects(scene)) == 3


def test_cli_job_rejects_bad_input(scene, tmp_path, capsys, fixtures_dir):
    missing = str(tmp_path / "nope.png")
    assert job_runner.cli_main(["--frames", "3", "--out", str(tmp_path), "--reference", missing]) == 1
    assert "Reference portrait not found" in capsys.readouterr().out
    assert job_runner.cli_main(["--frames", "0", "--out", str(tmp_path), "--poses-only"]) == 1
    assert "--frames must be at least 1" in capsys.readouterr().out
    assert job_runner.cli_main(["--frames", "3"]) != 0  # --out missing: argparse usage error, no traceback
    capsys.readouterr()
    portrait = str(fixtures_dir / "official_samples" / "portraits" / "0000028.png")
    assert job_runner.cli_main(["--out", str(tmp_path), "--reference", portrait, "--size", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().out
    argv = ["--out", str(tmp_path), "--reference", portrait, "--frames", "2", "--size", "64",
            "--conditions", str(fixtures_dir / "official_samples" / "camera_conditions"),
            "--model", str(tmp_path / "no model"), "--worker-python", sys.executable]
    assert job_runner.cli_main(argv) == 1
    assert "Model folder not found" in capsys.readouterr().out


class _FakeLayout:
    """Records what a panel draws; every sub-layout is itself."""

    def __init__(self):
        self.props: list[tuple[object, str]] = []
        self.operators: list[str] = []
        self.labels: list[str] = []

    def label(self, text="", **_kw):
        self.labels.append(text)

    def prop(self, data, name, **_kw):
        self.props.append((data, name))

    def operator(self, idname, **_kw):
        self.operators.append(idname)

    def __getattr__(self, name):
        return lambda *a, **k: self

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)


@pytest.mark.parametrize("source", ['PROCEDURAL', 'MESH', 'IMAGE_FOLDER'])
def test_panels_draw_existing_settings_and_operators(scene, source):
    from addon import panel

    scene.portrait3d.condition_source = source
    scene.portrait3d.use_scene_range = False
    layout = _FakeLayout()
    for cls in panel.classes:
        cls.draw(type("P", (), {"layout": layout})(), bpy.context)
    assert layout.props and layout.operators
    for data, name in layout.props:
        assert name in data.bl_rna.properties, name
    for idname in layout.operators:
        category, op = idname.split(".")
        assert hasattr(bpy.types, f"{category.upper()}_OT_{op}"), idname
    wanted = {"portrait3d.add_head_anchor", "portrait3d.add_turntable", "portrait3d.export_poses",
              "portrait3d.generate", "portrait3d.cancel", "portrait3d.import_frames"}
    assert wanted <= set(layout.operators)
