"""EG3D camera conventions: fixture poses, label round trips, Blender <-> EG3D mapping."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp3d_core import cameras
from dp3d_core.cameras import (
    EG3D_FOCAL,
    EG3D_PIVOT,
    EG3D_RADIUS,
    BlenderCamera,
    CameraError,
    HeadAnchor,
    anchor_size_from_matrix,
    blender_to_label,
    from_label,
    intrinsics_from_focal,
    intrinsics_from_fov,
    label_to_blender,
    sample_lookat,
    to_label,
    yaw_pitch_from_cam2world,
)

from tests.conftest import EG3D_POSES as FIXTURE
PROPS = settings(max_examples=100, deadline=None)


def _fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.fail(f"reference poses not found at {FIXTURE}")
    return json.loads(FIXTURE.read_text())


CASES = _fixture()["cases"]
TOL = _fixture()["tolerance"]


# --------------------------------------------------------------------------------- strategies

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def rotations(draw) -> np.ndarray:
    q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4)))
    if np.linalg.norm(q) < 0.1:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


@st.composite
def rigid(draw, reach: float = 20.0) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = draw(rotations())
    m[:3, 3] = draw(st.lists(st.floats(-reach, reach), min_size=3, max_size=3))
    return m


@st.composite
def scaled(draw, uniform: bool = False) -> np.ndarray:
    """A rigid transform with a positive per-axis scale (no shear)."""
    m = draw(rigid())
    if uniform:
        s = [draw(st.floats(0.2, 5.0))] * 3
    else:
        s = draw(st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3))
    m[:3, :3] = m[:3, :3] @ np.diag(s)
    return m


render_settings = st.fixed_dictionaries({
    "sensor_width": st.floats(5.0, 70.0),
    "sensor_height": st.floats(5.0, 70.0),
    "sensor_fit": st.sampled_from(cameras.SENSOR_FITS),
    "resolution_x": st.integers(16, 4096),
    "resolution_y": st.integers(16, 4096),
    "pixel_aspect_x": st.floats(0.25, 4.0),
    "pixel_aspect_y": st.floats(0.25, 4.0),
})


@st.composite
def blender_cameras(draw) -> BlenderCamera:
    return BlenderCamera(matrix_world=draw(scaled()), lens=draw(st.floats(5.0, 500.0)),
                         shift_x=draw(st.floats(-2.0, 2.0)), shift_y=draw(st.floats(-2.0, 2.0)),
                         **draw(render_settings))


@st.composite
def anchors(draw) -> HeadAnchor:
    return HeadAnchor(matrix_world=draw(scaled()), size=draw(st.floats(0.05, 20.0)))


def _unscaled(m: np.ndarray) -> np.ndarray:
    out = np.array(m, dtype=float)
    out[:3, :3] /= np.linalg.norm(out[:3, :3], axis=0)
    return out


def _settings_of(cam: BlenderCamera) -> dict:
    return {k: getattr(cam, k) for k in ("sensor_width", "sensor_height", "sensor_fit", "resolution_x",
                                         "resolution_y", "pixel_aspect_x", "pixel_aspect_y")}


# --------------------------------------------------------------------------------- fixture poses

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sample_lookat_reproduces_eg3d_reference(case):
    cam2world = sample_lookat(case["horizontal_mean"], case["vertical_mean"], case["lookat_position"], case["radius"])
    label = to_label(cam2world, intrinsics_from_focal(case["intrinsics_focal"]))
    assert label.shape == (25,) and label.dtype == np.float64
    np.testing.assert_allclose(label, case["label"], atol=TOL, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_intrinsics_are_eg3d_defaults(case):
    _, k = from_label(case["label"])
    np.testing.assert_allclose(k, intrinsics_from_focal(), atol=TOL, rtol=0)
    assert case["intrinsics_focal"] == EG3D_FOCAL


def test_constants_match_fixture_frontal():
    frontal = next(c for c in CASES if c["name"] == "frontal")
    assert tuple(frontal["lookat_position"]) == EG3D_PIVOT
    assert frontal["radius"] == EG3D_RADIUS
    cam2world, _ = from_label(frontal["label"])
    assert np.linalg.norm(cam2world[:3, 3]) == pytest.approx(EG3D_RADIUS)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_yaw_pitch_of_reference_cases(case):
    yaw, pitch = yaw_pitch_from_cam2world(from_label(case["label"])[0])
    expected_yaw = math.degrees(case["horizontal_mean"] - math.pi / 2)
    expected_yaw = (expected_yaw + 180.0) % 360.0 - 180.0
    dyaw = (yaw - expected_yaw + 180.0) % 360.0 - 180.0
    assert abs(dyaw) < 1e-5
    assert pitch == pytest.approx(math.degrees(math.asin(1 - 2 * case["vertical_mean"] / math.pi)), abs=1e-5)


def test_yaw_pitch_signs():
    assert yaw_pitch_from_cam2world(sample_lookat(math.pi / 2, math.pi / 2, EG3D_PIVOT, EG3D_RADIUS)) == \
        pytest.approx((0.0, 0.0), abs=1e-9)
    yaw, _ = yaw_pitch_from_cam2world(sample_lookat(math.pi / 2 + 0.5, math.pi / 2, EG3D_PIVOT, EG3D_RADIUS))
    assert yaw > 0  # toward +X, the subject's left
    _, pitch = yaw_pitch_from_cam2world(sample_lookat(math.pi / 2, math.pi / 2 - 0.5, EG3D_PIVOT, EG3D_RADIUS))
    assert pitch > 0  # above the head


@PROPS
@given(h=st.floats(-math.pi / 2 + 0.01, 3 * math.pi / 2 - 0.01), v=st.floats(0.05, math.pi - 0.05),
       radius=st.floats(0.5, 10.0))
def test_yaw_pitch_of_sampled_poses(h, v, radius):
    yaw, pitch = yaw_pitch_from_cam2world(sample_lookat(h, v, EG3D_PIVOT, radius))
    assert yaw == pytest.approx(math.degrees(h - math.pi / 2), abs=1e-6)
    assert pitch == pytest.approx(math.degrees(math.asin(1 - 2 * v / math.pi)), abs=1e-6)


@PROPS
@given(h=st.floats(-10, 10), v=st.floats(0.01, math.pi - 0.01), radius=st.floats(1.0, 10.0))
def test_sample_lookat_is_a_camera_looking_at_the_pivot(h, v, radius):
    c2w = sample_lookat(h, v, EG3D_PIVOT, radius)
    r = c2w[:3, :3]
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-9)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert np.linalg.norm(c2w[:3, 3]) == pytest.approx(radius)
    to_pivot = np.array(EG3D_PIVOT) - c2w[:3, 3]
    np.testing.assert_allclose(r[:, 2], to_pivot / np.linalg.norm(to_pivot), atol=1e-9)
    assert r[1, 0] == pytest.approx(0.0, abs=1e-12)  # no roll: camera x stays horizontal
    assert r[1, 1] < 0  # camera y (down) points toward world -Y


def test_sample_lookat_degenerate_direction_is_clear_error():
    with pytest.raises(CameraError, match="straight up or down"):
        sample_lookat(math.pi / 2, math.pi / 2, (0.0, 5.0, 2.7), EG3D_RADIUS)


def test_intrinsics_from_fov_matches_eg3d_focal():
    # EG3D's scripts use fov 18.837 deg as the equivalent of focal 4.2647 (with its rounded constants).
    k = intrinsics_from_fov(18.837)
    assert k[0, 0] == pytest.approx(EG3D_FOCAL, rel=1e-3)
    assert k[0, 0] == k[1, 1]
    np.testing.assert_array_equal(k[:, 2], [0.5, 0.5, 1.0])
    assert intrinsics_from_fov(30.0)[0, 0] < intrinsics_from_fov(10.0)[0, 0]
    with pytest.raises(CameraError):
        intrinsics_from_fov(0.0)


def test_intrinsics_from_focal_layout():
    k = intrinsics_from_focal(2.0, 0.4, 0.6, fy=3.0)
    np.testing.assert_array_equal(k, [[2.0, 0.0, 0.4], [0.0, 3.0, 0.6], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------- labels

@PROPS
@given(c2w=st.lists(finite, min_size=16, max_size=16), k=st.lists(finite, min_size=9, max_size=9))
def test_label_round_trip(c2w, k):
    c2w = np.array(c2w).reshape(4, 4)
    k = np.array(k).reshape(3, 3)
    label = to_label(c2w, k)
    assert label.shape == (25,) and label.dtype == np.float64
    np.testing.assert_array_equal(label[:16], c2w.reshape(-1))  # row-major
    back_c2w, back_k = from_label(label)
    np.testing.assert_array_equal(back_c2w, c2w)
    np.testing.assert_array_equal(back_k, k)
    np.testing.assert_array_equal(to_label(back_c2w, back_k), label)


@pytest.mark.parametrize("bad", [[0.0] * 24, [0.0] * 26, [[0.0] * 25], "abc", [float("nan")] + [0.0] * 24])
def test_from_label_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="label"):
        from_label(bad)


def test_to_label_rejects_wrong_shapes():
    with pytest.raises(CameraError, match="cam2world"):
        to_label(np.eye(3), np.eye(3))
    with pytest.raises(CameraError, match="intrinsics"):
        to_label(np.eye(4), np.eye(4))


# --------------------------------------------------------------------------------- Blender mapping

def _front_camera(distance: float = EG3D_RADIUS) -> np.ndarray:
    """Blender camera at (0, -distance, 0) looking along +Y with +Z up."""
    return np.array([[1.0, 0, 0, 0], [0, 0, -1, -distance], [0, 1, 0, 0], [0, 0, 0, 1]])


def test_front_camera_is_eg3d_frontal():
    frontal = next(c for c in CASES if c["name"] == "frontal")
    label = blender_to_label(BlenderCamera(_front_camera(), lens=50.0), HeadAnchor(np.eye(4)))
    np.testing.assert_allclose(label[:16], frontal["label"][:16], atol=1e-12)


def test_camera_on_blender_plus_x_is_on_subject_left():
    # Camera at Blender +X looking along -X: EG3D +X side (subject's left), positive yaw.
    m = np.array([[0.0, 0, 1, 2.7], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    c2w, _ = from_label(blender_to_label(BlenderCamera(m, lens=50.0), HeadAnchor(np.eye(4))))
    np.testing.assert_allclose(c2w[:3, 3], [2.7, 0, 0], atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 2], [-1, 0, 0], atol=1e-12)
    assert yaw_pitch_from_cam2world(c2w)[0] == pytest.approx(90.0)


def test_blender_intrinsics_hand_values():
    eye = np.eye(4)
    hor = BlenderCamera(eye, lens=50.0, sensor_fit="HORIZONTAL", resolution_x=1920, resolution_y=1080,
                        shift_x=0.1, shift_y=0.1)
    np.testing.assert_allclose(hor.intrinsics(), [[50 / 36, 0, 0.4], [0, 50 / 36 * 1920 / 1080, 0.5 + 0.1 * 1920 / 1080],
                                                  [0, 0, 1]], atol=1e-12)
    ver = BlenderCamera(eye, lens=50.0, sensor_fit="VERTICAL", resolution_x=1920, resolution_y=1080)
    np.testing.assert_allclose(ver.intrinsics()[:2, :2], [[50 / 24 * 1080 / 1920, 0], [0, 50 / 24]], atol=1e-12)
    # AUTO on a portrait frame fits the (larger) height with sensor_width, and shift is relative to it.
    auto = BlenderCamera(eye, lens=50.0, sensor_fit="AUTO", resolution_x=480, resolution_y=640, shift_x=0.1)
    np.testing.assert_allclose(auto.intrinsics(), [[50 / 36 * 640 / 480, 0, 0.5 - 0.1 * 640 / 480],
                                                   [0, 50 / 36, 0.5], [0, 0, 1]], atol=1e-12)
    # AUTO compares the displayed size: 640x480 with pixels 1.5 tall is 640x720 on screen, so it fits vertically.
    flipped = BlenderCamera(eye, lens=50.0, sensor_fit="AUTO", resolution_x=640, resolution_y=480,
                            pixel_aspect_y=1.5, shift_x=0.1)
    np.testing.assert_allclose(flipped.intrinsics(), [[50 * 720 / (36 * 640), 0, 0.5 - 0.1 * 720 / 640],
                                                      [0, 50 / 36, 0.5], [0, 0, 1]], atol=1e-12)
    # Tall pixels (aspect y > x): fewer pixels per unit angle vertically.
    tall = BlenderCamera(eye, lens=50.0, sensor_fit="HORIZONTAL", pixel_aspect_y=2.0)
    assert tall.intrinsics()[1, 1] == pytest.approx(tall.intrinsics()[0, 0] / 2)


@PROPS
@given(cam=blender_cameras(), anchor=anchors())
def test_blender_to_label_to_blender_round_trip(cam, anchor):
    label = blender_to_label(cam, anchor)
    c2w, _ = from_label(label)
    np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-9)
    back = label_to_blender(label, anchor, **_settings_of(cam))
    np.testing.assert_allclose(back.matrix_world, _unscaled(cam.matrix_world), atol=1e-7)
    assert back.lens == pytest.approx(cam.lens, rel=1e-9)
    assert back.shift_x == pytest.approx(cam.shift_x, abs=1e-9)
    assert back.shift_y == pytest.approx(cam.shift_y, abs=1e-9)
    assert _settings_of(back) == _settings_of(cam)
    np.testing.assert_allclose(blender_to_label(back, anchor), label, atol=1e-9)


@PROPS
@given(h=st.floats(-math.pi, 2 * math.pi), v=st.floats(0.1, math.pi - 0.1), radius=st.floats(1.0, 5.0),
       focal=st.floats(1.0, 10.0), cx=st.floats(0.2, 0.8), cy=st.floats(0.2, 0.8), anchor=anchors(),
       fit=st.sampled_from(cameras.SENSOR_FITS), side=st.integers(64, 2048))
def test_label_to_blender_to_label_round_trip(h, v, radius, focal, cx, cy, anchor, fit, side):
    label = to_label(sample_lookat(h, v, EG3D_PIVOT, radius), intrinsics_from_focal(focal, cx, cy))
    cam = label_to_blender(label, anchor, sensor_fit=fit, resolution_x=side, resolution_y=side)
    np.testing.assert_allclose(blender_to_label(cam, anchor), label, atol=1e-9)


@PROPS
@given(label_fx=st.floats(1.0, 10.0), w=st.integers(64, 2048), h=st.integers(64, 2048),
       pax=st.floats(0.5, 2.0), pay=st.floats(0.5, 2.0), fit=st.sampled_from(cameras.SENSOR_FITS))
def test_non_square_label_round_trip(label_fx, w, h, pax, pay, fit):
    # Only fx/fy = ycor * H / W is representable; such labels come back exactly.
    fy = label_fx / ((pay / pax) * h / w)
    label = to_label(sample_lookat(1.9, 1.4, EG3D_PIVOT, EG3D_RADIUS), intrinsics_from_focal(label_fx, 0.45, 0.55, fy))
    cam = label_to_blender(label, HeadAnchor(np.eye(4)), sensor_fit=fit, resolution_x=w, resolution_y=h,
                           pixel_aspect_x=pax, pixel_aspect_y=pay)
    np.testing.assert_allclose(blender_to_label(cam, HeadAnchor(np.eye(4))), label, atol=1e-9)


@PROPS
@given(cam=blender_cameras(), anchor=anchors(), motion=rigid())
def test_moving_camera_and_anchor_together_keeps_label(cam, anchor, motion):
    moved_cam = replace(cam, matrix_world=motion @ cam.matrix_world)
    moved_anchor = HeadAnchor(motion @ anchor.matrix_world, anchor.size)
    np.testing.assert_allclose(blender_to_label(moved_cam, moved_anchor), blender_to_label(cam, anchor), atol=1e-8)


@PROPS
@given(cam=blender_cameras(), anchor=anchors(), k=st.floats(0.1, 10.0))
def test_scaling_anchor_size_and_distance_together_keeps_label(cam, anchor, k):
    far = cam.matrix_world.copy()
    far[:3, 3] = anchor.matrix_world[:3, 3] + k * (cam.matrix_world[:3, 3] - anchor.matrix_world[:3, 3])
    far_cam = replace(cam, matrix_world=far)
    np.testing.assert_allclose(blender_to_label(far_cam, HeadAnchor(anchor.matrix_world, anchor.size * k)),
                               blender_to_label(cam, anchor), atol=1e-8)


@PROPS
@given(cam=blender_cameras(), anchor=anchors(), scale=st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
def test_camera_object_scale_is_ignored(cam, anchor, scale):
    scaled_cam = replace(cam, matrix_world=cam.matrix_world @ np.diag([*scale, 1.0]))
    np.testing.assert_allclose(blender_to_label(scaled_cam, anchor), blender_to_label(cam, anchor), atol=1e-9)


@PROPS
@given(m=scaled(), display=st.floats(0.1, 10.0))
def test_anchor_size_from_matrix(m, display):
    expected = display * np.mean(np.linalg.norm(m[:3, :3], axis=0))
    assert anchor_size_from_matrix(m, display) == pytest.approx(expected)


def test_anchor_size_uniform_scale():
    m = np.diag([3.0, 3.0, 3.0, 1.0])
    assert anchor_size_from_matrix(m, 0.5) == pytest.approx(1.5)
    assert anchor_size_from_matrix(m) == pytest.approx(3.0)


# --------------------------------------------------------------------------------- clear errors

def _frontal_label() -> np.ndarray:
    return np.array(next(c for c in CASES if c["name"] == "frontal")["label"], dtype=float)


def test_label_to_blender_rejects_skew():
    label = _frontal_label()
    label[17] = 0.01
    with pytest.raises(ValueError, match="skew"):
        label_to_blender(label, HeadAnchor(np.eye(4)))


def test_label_to_blender_rejects_non_rotation():
    label = _frontal_label()
    label[0] = 2.0  # x axis scaled
    with pytest.raises(ValueError, match="not a pure rotation"):
        label_to_blender(label, HeadAnchor(np.eye(4)))
    mirrored = _frontal_label()
    mirrored[0] = -1.0
    with pytest.raises(ValueError, match="not a pure rotation"):
        label_to_blender(mirrored, HeadAnchor(np.eye(4)))


def test_label_to_blender_rejects_aspect_mismatch_with_hint():
    with pytest.raises(ValueError, match="512x512"):
        label_to_blender(_frontal_label(), HeadAnchor(np.eye(4)), resolution_x=512, resolution_y=256)


def test_label_to_blender_rejects_bad_settings():
    with pytest.raises(ValueError, match="sensor_fit"):
        label_to_blender(_frontal_label(), HeadAnchor(np.eye(4)), sensor_fit="DIAGONAL")
    with pytest.raises(ValueError, match="resolution_x"):
        label_to_blender(_frontal_label(), HeadAnchor(np.eye(4)), resolution_x=0)


def test_sheared_or_mirrored_matrices_are_clear_errors():
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        blender_to_label(BlenderCamera(shear, lens=50.0), HeadAnchor(np.eye(4)))
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="mirrored"):
        blender_to_label(BlenderCamera(np.eye(4), lens=50.0), HeadAnchor(mirror))


def test_blender_camera_validates_fields():
    with pytest.raises(ValueError, match="sensor_fit"):
        BlenderCamera(np.eye(4), lens=50.0, sensor_fit="auto")
    with pytest.raises(ValueError, match="lens"):
        BlenderCamera(np.eye(4), lens=-1.0)
    with pytest.raises(ValueError, match="shape"):
        BlenderCamera(np.eye(3), lens=50.0)
    with pytest.raises(ValueError, match="size"):
        HeadAnchor(np.eye(4), size=0.0)
