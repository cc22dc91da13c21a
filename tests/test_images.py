"""Image loading: every awkward kind of input reaches the model as square float RGB in [0, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp3d_core.images import ImageError, encode_png, load_rgb, save_png


def _check(a: np.ndarray, size: int) -> None:
    assert a.shape == (size, size, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_rgb_exact_values(tmp_path: Path) -> None:
    src = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "a.png")
    a = load_rgb(tmp_path / "a.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a, src / 255.0, atol=1e-6)


def test_alpha_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255                   # red
    rgba[:, :32, 3] = 255                # left half opaque
    rgba[:, 32:, 3] = 0                  # right half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    a = load_rgb(tmp_path / "a.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a[:, :30], np.broadcast_to([1.0, 0.0, 0.0], (64, 30, 3)), atol=1e-6)
    np.testing.assert_allclose(a[:, 34:], 1.0, atol=1e-6)


def test_half_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 128                   # black at ~50 % over white -> ~0.5 grey
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_rgb(tmp_path / "a.png", 64), 1 - 128 / 255, atol=1e-6)


def test_grayscale_and_gray_alpha(tmp_path: Path) -> None:
    g = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))
    Image.fromarray(g).save(tmp_path / "g.png")
    a = load_rgb(tmp_path / "g.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a[..., 0], g / 255.0, atol=1e-6)
    assert np.array_equal(a[..., 0], a[..., 2])
    la = np.stack([g, np.zeros_like(g)], -1)
    Image.frombytes("LA", (64, 64), la.tobytes()).save(tmp_path / "la.png")
    np.testing.assert_allclose(load_rgb(tmp_path / "la.png", 64), 1.0, atol=1e-6)


def test_sixteen_bit_png_keeps_precision(tmp_path: Path) -> None:
    v = np.full((64, 64), 32768 + 100, np.uint16)     # not representable in 8 bits
    Image.fromarray(v).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    a = load_rgb(tmp_path / "a.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a, (32768 + 100) / 65535, atol=1e-6)
    b = load_rgb(tmp_path / "a.png", 32)       # the resize path for 16-bit data
    _check(b, 32)
    np.testing.assert_allclose(b, (32768 + 100) / 65535, atol=1e-4)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (0, 0, 255)
    im = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4)
    im.save(tmp_path / "p.png")
    a = load_rgb(tmp_path / "p.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a[0, 0], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(a[0, 63], [0, 0, 0], atol=1e-6)
    black = im.getpixel((63, 0))
    im.save(tmp_path / "pt.png", transparency=black)
    b = load_rgb(tmp_path / "pt.png", 64)
    np.testing.assert_allclose(b[0, 63], [1, 1, 1], atol=1e-6)   # transparent index over white
    np.testing.assert_allclose(b[0, 0], [0, 0, 1], atol=1e-6)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    a = load_rgb(tmp_path / "c.jpg", 64)
    _check(a, 64)
    assert a[..., 0].mean() > 0.9 and a[..., 1].mean() < 0.1 and a[..., 2].mean() < 0.1   # red


def test_non_square_is_centre_cropped_not_stretched(tmp_path: Path) -> None:
    rgb = np.zeros((64, 192, 3), np.uint8)   # 192 wide: left/right thirds red, centre green
    rgb[:, :64] = (255, 0, 0)
    rgb[:, 64:128] = (0, 255, 0)
    rgb[:, 128:] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    a = load_rgb(tmp_path / "wide.png", 64)
    _check(a, 64)
    np.testing.assert_allclose(a, np.broadcast_to([0.0, 1.0, 0.0], a.shape), atol=1e-6)
    tall = np.swapaxes(rgb, 0, 1).copy()
    Image.fromarray(tall).save(tmp_path / "tall.png")
    np.testing.assert_allclose(load_rgb(tmp_path / "tall.png", 64), a, atol=1e-6)


def test_odd_size_downscaled_and_native(tmp_path: Path) -> None:
    Image.fromarray(np.full((151, 97, 3), 77, np.uint8)).save(tmp_path / "odd.png")
    _check(load_rgb(tmp_path / "odd.png", 64), 64)
    native = load_rgb(tmp_path / "odd.png")
    _check(native, 97)
    np.testing.assert_allclose(native, 77 / 255, atol=1e-6)


def test_large_jpeg_downscaled(tmp_path: Path) -> None:
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "big.jpg")
    a = load_rgb(tmp_path / "big.jpg", 64)
    _check(a, 64)
    np.testing.assert_allclose(a.mean((0, 1)), np.array([10, 200, 30]) / 255, atol=0.03)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    rgb = np.zeros((64, 128, 3), np.uint8)
    rgb[:, :64] = 255                     # white left half, black right half (before rotation)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6                      # "rotate 90 CW to display"
    im.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    a = load_rgb(tmp_path / "o.jpg", 64)
    # displayed upright the image is 64 wide and 128 tall; the centre crop covers the seam
    assert a[:16].mean() > 0.9 and a[-16:].mean() < 0.1


def test_too_small_names_the_size(tmp_path: Path) -> None:
    Image.new("RGB", (40, 300)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match=r"40x300 px.*64"):
        load_rgb(tmp_path / "tiny.png", 64)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.png"):
        load_rgb(tmp_path / "nope.png", 64)
    with pytest.raises(ImageError, match="not a file"):
        load_rgb(tmp_path, 64)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("this is text, not pixels")
    with pytest.raises(ImageError, match="not an image.*fake.png"):
        load_rgb(tmp_path / "fake.png", 64)


def test_truncated_image(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png"):
        load_rgb(tmp_path / "t.png", 64)


def test_decompression_bomb_clear_error(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (200, 200)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 200*200 > 2 * limit -> Pillow refuses
    with pytest.raises(ImageError, match="more pixels than this tool decodes safely"):
        load_rgb(tmp_path / "b.png", 64)


def test_save_png_round_trip_atomic(tmp_path: Path) -> None:
    a = np.random.default_rng(2).random((32, 48, 3)).astype(np.float32)
    path = save_png(a, tmp_path / "out" / "f.png")
    back = np.asarray(Image.open(path)).astype(np.float32) / 255
    np.testing.assert_allclose(back, a, atol=0.5 / 255 + 1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.png"]
    assert encode_png(a).startswith(b"\x89PNG")
    with pytest.raises(ImageError, match="shape"):
        encode_png(np.zeros((4, 4, 5)))


def test_preflight_refuses_only_what_the_worker_would(tmp_path: Path) -> None:
    """A PNG over the decompression-bomb limit is refused from its header, before any work; a JPEG of the same
    size is not (the worker reads it at a reduced scale)."""
    import struct
    import zlib

    from dp3d_core import preflight

    def header_only_png(w: int, h: int) -> bytes:
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc

    (tmp_path / "huge.png").write_bytes(header_only_png(16320, 12240))
    with pytest.raises(preflight.PreflightError, match="huge.png is 16320x12240 px, more pixels than the worker "
                                                       "decodes safely as PNG .178 million.. Save it as JPEG"):
        preflight.check_image(tmp_path / "huge.png", "reference portrait")
    (tmp_path / "fine.png").write_bytes(header_only_png(12000, 12000))
    preflight.check_image(tmp_path / "fine.png", "reference portrait")
    jpeg = tmp_path / "huge.jpg"
    Image.new("RGB", (64, 64)).save(jpeg)
    data = bytearray(jpeg.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 12240, 16320)  # the frame header's height and width
    jpeg.write_bytes(bytes(data))
    assert preflight.image_header(jpeg) == ("JPEG", 16320, 12240)
    preflight.check_image(jpeg, "reference portrait")


def test_a_display_p3_photo_is_converted_to_srgb(tmp_path: Path) -> None:
    """An iPhone photo is Display P3: its pixel values mean other colours than sRGB's. Blender's own P3 profile
    (shipped in the bpy package) tags a copy converted to P3; it loads as the sRGB original, not as its raw values."""
    import bpy
    from PIL import ImageCms

    icc_dir = Path(bpy.utils.resource_path("LOCAL")) / "datafiles" / "colormanagement" / "icc"
    p3_file = icc_dir / "srgb_p3d65_display.icc"
    assert p3_file.is_file(), p3_file
    rng = np.random.default_rng(5)
    srgb = np.zeros((96, 96, 3), np.uint8)
    srgb[:48] = (220, 40, 30)  # saturated red and green: where P3 and sRGB values differ most
    srgb[48:] = (40, 190, 60)
    srgb[::7] = rng.integers(0, 256, (len(srgb[::7]), 96, 3))
    p3 = ImageCms.ImageCmsProfile(str(p3_file))
    tagged = ImageCms.profileToProfile(Image.fromarray(srgb), ImageCms.createProfile("sRGB"), p3,
                                       renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB")
    raw = np.asarray(tagged).astype(np.float32) / 255
    flat = np.ones(96, bool)
    flat[::7] = False  # JPEG blurs the noise rows; compare the flat colours there
    for fmt in ("PNG", "JPEG"):
        path = tmp_path / f"p3.{fmt.lower()}"
        tagged.save(path, format=fmt, icc_profile=p3.tobytes(), quality=100, subsampling=0)
        rows = slice(None) if fmt == "PNG" else flat
        loaded = load_rgb(path)
        assert np.abs(loaded - srgb / 255)[rows].mean() < 2.5 / 255, fmt
        assert np.abs(loaded - raw)[rows].max() > 10 / 255, fmt  # the raw P3 values are not what comes out
    rgba = tagged.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(tmp_path / "p3a.png", icc_profile=p3.tobytes())
    assert np.abs(load_rgb(tmp_path / "p3a.png") - srgb / 255).mean() < 2.5 / 255
    broken = tmp_path / "broken_profile.png"
    Image.fromarray(srgb).save(broken, icc_profile=b"not a colour profile")
    assert np.abs(load_rgb(broken) - srgb / 255).max() < 1e-6  # an unreadable profile leaves the pixels alone
