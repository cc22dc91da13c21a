"""Reference preparation: face found, framed like the official samples, the photo's camera, bad input.

Runs the real face models (shipped .tflite files, LiteRT) on the official sample portraits and on images made
from them here; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core import cameras, face_pose
from dp3d_core import job as jobspec
from dp3d_core.images import ImageError, crop_square, load_photo, load_rgb
from dp3d_core.prepare_reference import PrepareError, prepare

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "fixtures" / "official_samples" / "portraits"
NAMES = ("0000028", "0000167", "0000270")


def sample(name: str) -> Path:
    path = SAMPLES / f"{name}.png"
    if not path.is_file():
        pytest.fail(f"official sample portrait missing: {path}")
    return path


@lru_cache(maxsize=None)
def prepared(path: str) -> dict:
    return prepare(path)


def centre_side(crop) -> tuple[np.ndarray, float]:
    x0, y0, x1, y1 = crop
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), x1 - x0


# ---------------------------------------------------------------- framing


def reframe(image: Image.Image, rng: np.random.Generator, canvas: tuple[int, int]):
    """The photo scaled 0.6-1.5, shifted +-20 % of its (scaled) size and rotated +-10 degrees on a new canvas
    big enough to keep the face inside; returns the new image and the 2x3 map from original to new pixels."""
    s = rng.uniform(0.6, 1.5)
    angle = math.radians(rng.uniform(-10.0, 10.0))
    w, h = image.size
    shift = rng.uniform(-0.2, 0.2, 2) * np.array([w, h]) * s
    a = s * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    t = np.array(canvas) / 2 + shift - a @ np.array([w / 2, h / 2])
    inv = np.linalg.inv(a)
    inv_t = -inv @ t
    data = (inv[0, 0], inv[0, 1], inv_t[0], inv[1, 0], inv[1, 1], inv_t[1])
    out = image.transform(canvas, Image.AFFINE, data, resample=Image.BICUBIC, fillcolor=(118, 112, 108))
    return out, np.concatenate([a, t[:, None]], axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_reframed_sample_maps_back_to_the_original_framing(name, tmp_path):
    original = Image.open(sample(name)).convert("RGB")
    size = original.size[0]
    found_centre, found_side = centre_side(prepared(str(sample(name)))["crop"])
    worst = 0.0
    for seed in range(3):
        rng = np.random.default_rng(1000 * NAMES.index(name) + seed)
        image, m = reframe(original, rng, (960, 880))
        path = tmp_path / f"{name}_{seed}.png"
        image.save(path)
        result = prepare(path)
        centre, side = centre_side(result["crop"])
        a, t = m[:, :2], m[:, 2]
        back_centre = np.linalg.solve(a, centre - t)
        back_side = side / math.sqrt(abs(np.linalg.det(a)))
        err = max(np.max(np.abs(back_centre - found_centre)), abs(back_side - found_side)) / size
        worst = max(worst, err)
        assert err <= 0.03, (f"{name} seed {seed}: crop {result['crop']} maps back to centre {back_centre}, side "
                             f"{back_side:.1f}; on the original: {found_centre}, {found_side:.1f}")
        # The recovered roll follows the rotation applied (camera roll = minus the image rotation).
        applied = math.degrees(math.atan2(a[1, 0], a[0, 0]))
        base_roll = prepared(str(sample(name)))["roll"]
        assert abs((result["roll"] - base_roll) + applied) < 2.0, (result["roll"], base_roll, applied)
    print(f"{name}: worst re-framing error {100 * worst:.2f} % of the image")


def test_official_samples_are_framed_like_themselves():
    """One framing rule for all samples (the mean correction measured by scripts/make_face_landmarks_3d.py):
    each sample's own square is found within the spread the samples have among themselves."""
    for name in NAMES:
        centre, side = centre_side(prepared(str(sample(name)))["crop"])
        size = Image.open(sample(name)).size[0]
        # Measured: centres within 0.08 of the image size, sides within 0.13 (the samples' faces are not framed
        # alike by any one landmark rule: eye distance 0.36-0.45 of the image, eye to chin 0.39-0.48).
        assert np.max(np.abs(centre / size - 0.5)) < 0.09, (name, centre)
        assert abs(side / size - 1.0) < 0.15, (name, side)


# ---------------------------------------------------------------- pose and label


def test_label_is_the_pose_and_the_crop():
    result = prepared(str(sample("0000167")))
    c2w, k = cameras.from_label(result["label"])
    yaw, pitch = cameras.yaw_pitch_from_cam2world(c2w)
    # The label's camera yaw and the reported (subject's) yaw are opposite: a camera on the subject's left sees
    # the subject turned to its right.
    assert yaw == pytest.approx(-result["yaw"], abs=1e-3)
    assert pitch == pytest.approx(result["pitch"], abs=1e-3)
    assert face_pose.roll_from_cam2world(c2w) == pytest.approx(result["roll"], abs=1e-3)
    assert np.linalg.norm(c2w[:3, 3]) == pytest.approx(cameras.EG3D_RADIUS, rel=1e-6)
    # The camera is the one that sees the project's proxy head as the photo shows the face: the official framing
    # is the fitted EG3D square scaled by the measured correction, so the focal is EG3D's divided by it.
    scale = face_pose.landmark_model().scale
    assert k[0, 0] == pytest.approx(cameras.EG3D_FOCAL / scale, rel=0.15)
    assert abs(k[0, 2] - 0.5) < 0.1 and abs(k[1, 2] - 0.5) < 0.1


def test_pose_set_by_hand_is_held_and_the_label_follows():
    found = prepared(str(sample("0000167")))
    assert (found["found_yaw"], found["found_pitch"]) == (found["yaw"], found["pitch"])
    result = prepare(sample("0000167"), yaw=12.0, pitch=-20.0)
    assert (result["yaw"], result["pitch"]) == (12.0, -20.0)
    assert (result["found_yaw"], result["found_pitch"]) == (found["yaw"], found["pitch"])
    c2w, _ = cameras.from_label(result["label"])
    yaw, pitch = cameras.yaw_pitch_from_cam2world(c2w)
    assert yaw == pytest.approx(-12.0, abs=1e-3) and pitch == pytest.approx(-20.0, abs=1e-3)
    assert face_pose.roll_from_cam2world(c2w) == pytest.approx(result["roll"], abs=1e-3)
    side = found["crop"][2] - found["crop"][0]
    np.testing.assert_allclose(result["crop"], found["crop"], atol=0.15 * side)  # refitted, still on the face
    assert result["crop"] != found["crop"]
    only_pitch = prepare(sample("0000167"), pitch=-20.0)
    assert (only_pitch["yaw"], only_pitch["pitch"]) == (found["yaw"], -20.0)  # the other angle stays as found
    with pytest.raises(PrepareError, match="--pitch must be between -60 and 60 degrees"):
        prepare(sample("0000167"), pitch=75.0)


def test_nudged_crop_keeps_the_camera_and_moves_the_principal_point(tmp_path):
    path = sample("0000270")
    base = prepared(str(path))
    nudged = prepare(path, scale=1.25, offset_x=0.1, offset_y=-0.05)
    assert nudged["yaw"] == base["yaw"] and nudged["pitch"] == base["pitch"]
    c0, s0 = centre_side(base["crop"])
    c1, s1 = centre_side(nudged["crop"])
    assert s1 == pytest.approx(1.25 * s0, rel=1e-4)
    np.testing.assert_allclose(c1 - c0, [0.1 * s0, -0.05 * s0], atol=0.01)
    _, k0 = cameras.from_label(base["label"])
    _, k1 = cameras.from_label(nudged["label"])
    assert k1[0, 0] == pytest.approx(k0[0, 0] / 1.25, rel=1e-4)
    # A point's normalised position in the nudged crop matches its pixel position.
    u_pixel = base["crop"][0] + k0[0, 2] * s0
    assert (u_pixel - nudged["crop"][0]) / s1 == pytest.approx(k1[0, 2], abs=1e-4)


def test_pose_fit_recovers_a_projected_camera():
    """The fit alone, on the generic landmarks seen by known cameras (noise 0.3 % of the crop)."""
    model = face_pose.landmark_model()
    rng = np.random.default_rng(3)
    for yaw, pitch, roll in [(0, 0, 0), (35, -15, 5), (-50, 20, -8), (60, 0, 0), (-20, -30, 10)]:
        c2w = face_pose.camera_from_pose(yaw, pitch, roll)
        uv = face_pose.project(c2w, model.points)
        landmarks = np.zeros((468, 3))
        landmarks[model.indices, :2] = 100 + 300 * uv + rng.normal(0, 1.0, uv.shape)
        fit = face_pose.fit_pose(landmarks, model)
        assert abs(fit.yaw - yaw) < 1.5 and abs(fit.pitch - pitch) < 1.5 and abs(fit.roll - roll) < 1.0, \
            (yaw, pitch, roll, fit)
        np.testing.assert_allclose(fit.crop, (100, 100, 300), atol=3.0)


def test_keypoint_yaw_only_beyond_45_degrees_and_on_the_mesh_side():
    """The detector's keypoints replace the mesh's yaw only beyond 45 degrees, further than the mesh's and the same
    way (exact projections of the generic sets)."""
    model = face_pose.landmark_model()

    def views(mesh_yaw, keypoint_yaw):
        landmarks = np.zeros((468, 3))
        landmarks[model.indices, :2] = 100 + 300 * face_pose.project(face_pose.camera_from_pose(mesh_yaw, 10),
                                                                      model.points)
        kp = 100 + 300 * face_pose.project(face_pose.camera_from_pose(keypoint_yaw, 10), model.keypoints)
        return face_pose.fit_pose(landmarks, model, keypoints=kp)

    turned = views(40.0, 62.0)
    assert abs(turned.yaw - 62.0) < 1.0 and abs(turned.pitch - 10.0) < 4.0, turned
    assert abs(views(-40.0, -62.0).yaw + 62.0) < 1.0
    for mesh_yaw, keypoint_yaw in ((40.0, -62.0), (20.0, 44.0), (50.0, 48.0)):
        assert abs(views(mesh_yaw, keypoint_yaw).yaw - mesh_yaw) < 1.0, (mesh_yaw, keypoint_yaw)


# ---------------------------------------------------------------- image formats


def test_exif_rotated_copy_gives_the_same_crop(tmp_path):
    upright = Image.open(sample("0000028")).convert("RGB")
    upright_path = tmp_path / "upright.jpg"
    upright.save(upright_path, quality=95)
    # Stored sideways with the EXIF tag that says "rotate 90 degrees clockwise to view" (orientation 6).
    rotated_path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(rotated_path, quality=95, exif=exif)
    assert Image.open(rotated_path).size == upright.size[::-1] or upright.size[0] == upright.size[1]
    a, b = prepare(upright_path), prepare(rotated_path)
    np.testing.assert_allclose(b["crop"], a["crop"], atol=0.01 * upright.size[0])
    assert abs(a["yaw"] - b["yaw"]) < 1.5 and abs(a["roll"] - b["roll"]) < 1.0


HEIC_PHOTO = ROOT / "tests" / "data" / "phone_photo.heic"  # made by scripts/make_heic_fixture.py


def test_heic_phone_photo_is_upright_and_framed_where_the_head_is():
    """An iPhone-style HEIC stored sideways: decoded upright (pi-heif applies the HEIF rotation) and the head
    found where the fixture script put its frontal render (so the crop is that square, framing corrected)."""
    from scripts.make_heic_fixture import CANVAS, PLACED_X, PLACED_Y, SIZE

    from dp3d_core.preflight import image_header
    assert image_header(HEIC_PHOTO) == ("HEIF", *CANVAS)
    assert load_photo(HEIC_PHOTO).rgb.shape == (CANVAS[1], CANVAS[0], 3)
    result = prepare(HEIC_PHOTO)
    placed = face_pose.PoseFit(0.0, 0.0, 0.0, (PLACED_X, PLACED_Y, SIZE), 0.0)
    np.testing.assert_allclose(result["crop"], face_pose.framed_crop(placed), atol=0.03 * SIZE)
    assert abs(result["yaw"]) < 5 and abs(result["pitch"]) < 5 and abs(result["roll"]) < 3, result


def test_avif_stored_sideways_gives_the_same_crop_as_png(tmp_path):
    upright = Image.open(sample("0000167")).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.avif"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif.tobytes())
    np.testing.assert_allclose(prepare(path)["crop"], prepared(str(sample("0000167")))["crop"], atol=0.01 * 512)


def test_heic_without_a_decoder_says_what_to_install(monkeypatch):
    from dp3d_core import images
    monkeypatch.setattr(images, "heif_decoder", lambda: False)
    with pytest.raises(ImageError, match="HEIC/HEIF photo .* no HEIF decoder.*pip install pi-heif"):
        load_photo(HEIC_PHOTO)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_huge_photo_is_read_at_a_reduced_scale_in_its_own_pixels(fmt, tmp_path, monkeypatch):
    """A 200 MP phone photo, scaled down here: with the limits shrunk by the same factor, the photo is over
    Pillow's decompression-bomb limit (a JPEG is decoded at 1/4 scale instead of refused; a PNG is refused in
    one sentence) and over PHOTO_MAX_PIXELS (prepared at reduced scale, crop and sizes in the photo's pixels)."""
    from dp3d_core import images
    canvas = Image.new("RGB", (1224, 1632), (90, 100, 110))
    canvas.paste(Image.open(sample("0000167")).convert("RGB").resize((520, 520)), (352, 370))
    path = tmp_path / f"phone.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways too
    canvas.transpose(Image.Transpose.ROTATE_90).save(path, format=fmt, exif=exif.tobytes(), quality=95)
    full = prepare(path)
    monkeypatch.setattr(images, "PHOTO_MAX_PIXELS", 160_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900_000)  # refused above 1.8 MP; the photo has 2.0 MP
    if fmt == "PNG":
        with pytest.raises(ImageError, match="more pixels than this tool decodes safely .1 million.; save a "
                                             "smaller copy"):
            load_photo(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # a PNG within the limit is reduced after decoding
    photo = load_photo(path)
    assert photo.scale == 4 and photo.size == (1224, 1632) and photo.rgb.shape == (408, 306, 3)
    reduced = prepare(path)
    assert reduced["image_size"] == [1224, 1632]
    np.testing.assert_allclose(reduced["crop"], full["crop"], atol=0.02 * (full["crop"][2] - full["crop"][0]))
    assert abs(reduced["yaw"] - full["yaw"]) < 2 and abs(reduced["pitch"] - full["pitch"]) < 3
    # The worker cuts the same square, given in the photo's own pixels.
    a = load_rgb(path, 64, crop=full["crop"])
    centre = load_rgb(path, 64)  # preparation off: the centre square, which the preflight let through too
    monkeypatch.undo()
    assert np.abs(a - load_rgb(path, 64, crop=full["crop"])).mean() < 0.02
    assert np.abs(centre - load_rgb(path, 64)).mean() < 0.02


def test_header_tells_heif_avif_and_video_apart(tmp_path):
    from dp3d_core.preflight import image_header

    def ftyp(*brands: bytes) -> bytes:
        body = b"ftyp" + brands[0] + b"\0\0\0\0" + b"".join(brands[1:])
        return (len(body) + 4).to_bytes(4, "big") + body

    for name, data, expected in [("clip.mp4", ftyp(b"isom", b"isom", b"mp41"), None),
                                 ("a.heic", ftyp(b"heic", b"mif1", b"heic"), ("HEIF", None, None)),
                                 ("a.avif", ftyp(b"avif", b"mif1", b"avif"), ("AVIF", None, None))]:
        (tmp_path / name).write_bytes(data + bytes(64))
        assert image_header(tmp_path / name) == expected, name


@pytest.mark.parametrize("name", NAMES)
def test_a_face_on_its_side_without_an_orientation_tag_is_refused_with_the_way_to_turn_it(name, tmp_path):
    """Stored turned and without EXIF (a messenger app stripped it): the detector's keypoints are wrong there and the
    face mesh finds a confident but wrong face, so the crop and pose would be silently wrong."""
    upright = Image.open(sample(name)).convert("RGB")
    for transpose, way in [(Image.Transpose.ROTATE_270, "rotate the photo 90° counter-clockwise"),
                           (Image.Transpose.ROTATE_180, "rotate the photo 180°"),
                           (Image.Transpose.ROTATE_90, "rotate the photo 90° clockwise")]:
        path = tmp_path / f"turned_{transpose.name}.jpg"
        upright.transpose(transpose).save(path, quality=95)
        with pytest.raises(PrepareError, match=f"on its side or upside down .*: {way} so the face is upright"):
            prepare(path)


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "P", "RGBA"])
def test_other_image_modes_are_prepared_like_rgb(mode, tmp_path):
    rgb = Image.open(sample("0000167")).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        alpha = np.full(rgb.size[::-1], 255, np.uint8)
        alpha[:, :40] = 0  # a transparent strip, composited over white
        image.putalpha(Image.fromarray(alpha))
    else:
        image = rgb.convert(mode)
    path = tmp_path / f"face_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    result = prepare(path)
    np.testing.assert_allclose(result["crop"], prepared(str(sample("0000167")))["crop"], atol=0.03 * 512)
    if mode == "RGBA":
        assert load_photo(path).rgb[10, 10] == pytest.approx([1.0, 1.0, 1.0])


# ---------------------------------------------------------------- bad input


def test_no_face_names_the_file(tmp_path):
    y, x = np.mgrid[0:300, 0:400]
    path = tmp_path / "landscape.png"
    Image.fromarray(np.stack([x * 0.6, y * 0.8, 120 + 0 * x], -1).astype(np.uint8)).save(path)
    with pytest.raises(PrepareError, match=r"No face found in .*landscape\.png"):
        prepare(path)


def test_two_faces_takes_the_larger_and_warns(tmp_path):
    big = Image.open(sample("0000167")).convert("RGB").resize((360, 360))
    small = Image.open(sample("0000028")).convert("RGB").resize((220, 220))
    canvas = Image.new("RGB", (700, 420), (120, 118, 115))
    canvas.paste(small, (20, 100))
    canvas.paste(big, (320, 30))
    path = tmp_path / "two.png"
    canvas.save(path)
    result = prepare(path)
    assert result["faces"] == 2
    assert any("2 faces found" in w and "largest" in w for w in result["warnings"])
    centre, _ = centre_side(result["crop"])
    assert 320 < centre[0] < 680, result["crop"]


def test_small_face_warns(tmp_path):
    face = Image.open(sample("0000270")).convert("RGB").resize((140, 140))
    canvas = Image.new("RGB", (800, 600), (110, 110, 110))
    canvas.paste(face, (400, 200))
    path = tmp_path / "far.png"
    canvas.save(path)
    result = prepare(path)
    assert any("The face is small" in w for w in result["warnings"])


def test_cli_prints_json_and_writes_the_crop(tmp_path):
    out = tmp_path / "crop.png"
    proc = subprocess.run([sys.executable, "-m", "dp3d_core.prepare_reference", str(sample("0000028")), "--out",
                           str(out), "--size", "256"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) >= {"crop", "yaw", "pitch", "roll", "label", "faces", "warnings"}
    assert len(data["label"]) == 25 and data["faces"] == 1
    assert Image.open(out).size == (256, 256)
    assert proc.stderr.strip() == ""


@pytest.mark.parametrize("content,needle", [(b"not an image at all", "not an image"), (None, "No face found")])
def test_cli_bad_input_exits_2_with_one_sentence(tmp_path, content, needle):
    path = tmp_path / "input.png"
    if content is None:
        Image.new("RGB", (200, 200), (90, 140, 200)).save(path)
    else:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "dp3d_core.prepare_reference", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], proc.stderr


# ---------------------------------------------------------------- crop in the worker and the job


def test_crop_outside_the_image_is_a_blurred_edge_not_a_mirror():
    image = np.zeros((100, 100, 3), np.float32)
    image[:, :50] = 1.0  # left half white, right half black
    out = crop_square(image, (-60, 0, 40, 100))
    assert out.shape == (100, 100, 3)
    np.testing.assert_array_equal(out[:, 60:], image[:, :40])  # the inside is untouched
    assert out[:, :50].min() > 0.9  # the fill continues the white edge (a mirror would too, but see below)
    image[:, :10] = 0.0  # a dark stripe at the very edge: a mirror would show a second stripe further out
    out = crop_square(image, (-60, 0, 40, 100))
    assert out[:, :45].max() < 0.6  # continuation of the dark edge, not the white beyond it
    with pytest.raises(ImageError, match="does not overlap"):
        crop_square(image, (200, 200, 300, 300))


def test_worker_loads_the_prepared_crop(tmp_path):
    path = sample("0000028")
    crop = prepared(str(path))["crop"]
    a = load_rgb(path, 64, crop=crop)
    assert a.shape == (64, 64, 3)
    ref = crop_square(load_photo(path).rgb, crop)
    small = np.asarray(Image.fromarray((ref * 255 + 0.5).astype(np.uint8)).resize((64, 64), Image.LANCZOS)) / 255.0
    assert np.abs(a - small).mean() < 0.02
    assert np.abs(a - load_rgb(path, 64)).mean() > 0.02  # not the centre square


def _job(tmp_path: Path, prep) -> jobspec.Job:
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64)).save(ref)
    cond = tmp_path / "cond.png"
    Image.new("RGB", (64, 64)).save(cond)
    (tmp_path / "model").mkdir(exist_ok=True)
    label = [float(v) for v in cameras.to_label(cameras.sample_lookat(math.pi / 2, math.pi / 2),
                                                cameras.intrinsics_from_focal())]
    return jobspec.Job(references=[str(ref)], frames=[jobspec.FrameSpec(0, 1, label, str(cond))],
                       model=str(tmp_path / "model"), output=str(tmp_path / "out"), reference_prep=prep)


def test_job_records_the_preparation_and_its_hash_covers_it(tmp_path):
    result = prepared(str(sample("0000028")))
    prep = jobspec.ReferencePrep(crop=result["crop"], yaw=result["yaw"], pitch=result["pitch"],
                                 roll=result["roll"], label=result["label"])
    job = _job(tmp_path, prep)
    jobspec.write_job(job, tmp_path / "job")
    back = jobspec.read_job(tmp_path / "job")
    assert back.reference_prep == prep
    plain = _job(tmp_path, None)
    moved = _job(tmp_path, jobspec.ReferencePrep(crop=[c + 4 for c in prep.crop], yaw=prep.yaw, pitch=prep.pitch,
                                                 roll=prep.roll, label=prep.label))
    hashes = {jobspec.job_hash(j, tmp_path) for j in (job, plain, moved)}
    assert len(hashes) == 3
    # A job without preparation keeps the hash it had before preparation existed (no new key in its payload).
    data = json.loads((tmp_path / "job" / "job.json").read_text())
    data["reference_prep"] = None
    assert jobspec.job_from_dict(data).reference_prep is None


@pytest.mark.parametrize("bad,needle", [
    ({"crop": [0, 0, 10, 20], "yaw": 0, "pitch": 0, "roll": 0}, "square"),
    ({"crop": [0, 0, 10], "yaw": 0, "pitch": 0, "roll": 0}, "four finite numbers"),
    ({"crop": [0, 0, 10, 10], "pitch": 0, "roll": 0}, "missing yaw"),
    ({"crop": [0, 0, 10, 10], "yaw": 0, "pitch": 0, "roll": 0, "zoom": 2}, "unknown key"),
    ("centre", "must be an object"),
])
def test_job_rejects_a_bad_reference_prep(tmp_path, bad, needle):
    data = _job(tmp_path, None).to_dict()
    if isinstance(bad, dict):
        bad = dict(bad)
        bad.setdefault("label", data["frames"][0]["label"])
    data["reference_prep"] = bad
    with pytest.raises(jobspec.JobError, match=needle):
        jobspec.job_from_dict(data)


def test_worker_cuts_the_reference_with_the_prepared_crop(tmp_path):
    """The real worker reads reference_prep.crop (before loading any network): a crop beside the photo is
    refused with the image error, where the same job without preparation would use the centre square."""
    from tests.test_worker import LABEL, run_worker

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")  # passes the early check; never loaded
    Image.new("RGB", (90, 120), (200, 100, 50)).save(tmp_path / "ref.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "cond.png")
    prep = jobspec.ReferencePrep(crop=[500.0, 500.0, 564.0, 564.0], yaw=0.0, pitch=0.0, roll=0.0, label=list(LABEL))
    job = jobspec.Job(references=["ref.png"], frames=[jobspec.FrameSpec(0, 1, list(LABEL), "cond.png")],
                      model=str(tmp_path / "model"), output="out", device="cpu", reference_prep=prep,
                      settings=jobspec.GenerationSettings(steps=1, size=64))
    jobspec.write_job(job, tmp_path)
    rc, events, err = run_worker(tmp_path)
    errors = [e for e in events if e.kind == "error"]
    assert rc != 0 and errors, (rc, err)
    assert "does not overlap" in str(errors[0]["message"]) or "does not overlap" in err


def test_strongly_turned_face_warns(monkeypatch):
    """|yaw| over 60 degrees gives the warning (the fit's answer is turned here: no photo in the fixtures is
    that far from frontal, and the face mesh does not find such faces reliably; see docs/REFERENCE_PREP.md)."""
    from dataclasses import replace

    import dp3d_core.prepare_reference as prep

    real_fit = face_pose.fit_pose
    monkeypatch.setattr(prep.face_pose, "fit_pose", lambda *a, **k: replace(real_fit(*a, **k), yaw=-72.0))
    result = prep.prepare(sample("0000167"))
    assert result["yaw"] == 72.0  # camera 72 degrees on the subject's right: the subject turned 72 to its left
    assert any("turned 72 degrees" in w for w in result["warnings"])


# ---------------------------------------------------------------- pose on renders of held-out heads

# Held out: the generic landmarks and keypoints were triangulated from seeds 1001-1004 (and the keypoint-yaw switch
# chosen on them); scripts/measure_pose_accuracy.py reports seeds 11-13 on a finer grid.
POSE_SEEDS = (11, 12)
POSE_YAWS = (-60.0, -30.0, 0.0, 30.0, 60.0)
POSE_PITCHES = (-30.0, -15.0, 0.0, 15.0, 30.0)


@pytest.fixture(scope="module")
def pose_errors(tmp_path_factory) -> np.ndarray:
    """Rows (seed, camera yaw, pitch, yaw error, pitch error, roll) of the whole path (detector, face mesh, fit) on
    Workbench renders of the project's proxy head made here (bpy module, no Blender process)."""
    from scripts.make_face_landmarks_3d import render_views

    folder = tmp_path_factory.mktemp("pose-renders")
    poses = [(y, p) for p in POSE_PITCHES for y in POSE_YAWS]
    rows = []
    for seed in POSE_SEEDS:
        for path, c2w in render_views(seed, poses, folder, size=256):
            yaw, pitch = cameras.yaw_pitch_from_cam2world(c2w)
            result = prepare(path)
            rows.append((seed, yaw, pitch, face_pose.camera_yaw(result["yaw"]) - yaw, result["pitch"] - pitch,
                         result["roll"]))
    import bpy
    bpy.ops.wm.read_factory_settings(use_empty=True)
    return np.array(rows)


def _table(rows: np.ndarray) -> str:
    return "\n".join(f"seed {s:.0f} yaw {y:+.0f} pitch {p:+.0f}: error yaw {dy:+.1f} pitch {dp:+.1f} roll {r:+.1f}"
                     for s, y, p, dy, dp, r in rows)


def test_pose_within_the_bound_where_the_face_mesh_follows(pose_errors):
    """Issue 13's bound (median <= 5, worst <= 10 degrees of max(|yaw error|, |pitch error|)) where it is met:
    |yaw| <= 30 and |pitch| <= 15; the renders have no roll."""
    e = pose_errors
    inner = e[(np.abs(e[:, 1]) <= 30.5) & (np.abs(e[:, 2]) <= 15.5)]
    worst = np.max(np.abs(inner[:, 3:5]), axis=1)
    assert np.median(worst) <= 5.0 and worst.max() <= 10.0, _table(inner)
    assert np.max(np.abs(inner[:, 5])) <= 5.0, _table(inner)


def test_strongly_turned_face_takes_its_yaw_from_the_keypoints(pose_errors):
    """At camera yaw +-60 (pitch within 15) the face mesh's landmarks fold back toward frontal (they gave yaw
    errors up to 40 degrees); the detector's keypoints keep the yaw within 15 degrees (measured within 11 over
    seeds 11-13, docs/REFERENCE_PREP.md)."""
    e = pose_errors
    wide = e[(np.abs(e[:, 1]) > 59.5) & (np.abs(e[:, 2]) <= 15.5)]
    assert len(wide) == 2 * 3 * len(POSE_SEEDS)
    assert np.max(np.abs(wide[:, 3])) <= 15.0, _table(wide)
    assert np.median(np.abs(wide[:, 3])) <= 7.0, _table(wide)


@pytest.mark.xfail(strict=True, reason="issue 13's bound over yaw +-60 / pitch +-30 is not met: the face mesh "
                                       "underestimates pitch beyond 15 degrees when the face is also turned "
                                       "(docs/REFERENCE_PREP.md, Accuracy)")
def test_pose_bound_over_the_issues_full_range(pose_errors):
    worst = np.max(np.abs(pose_errors[:, 3:5]), axis=1)
    assert np.median(worst) <= 5.0 and worst.max() <= 10.0, _table(pose_errors)
