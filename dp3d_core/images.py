"""Reading and writing the images of a job (PIL + numpy, torch-free).

Rules applied by :func:`load_rgb`, so every input reaches the model the same way:

- EXIF orientation is applied (phone photos are often stored sideways). HEIC/HEIF photos (the iPhone's
  default) are decoded by pi-heif, which applies their rotation itself; AVIF by Pillow.
- Colours tagged with a profile (an iPhone's Display P3, a camera's Adobe RGB) are converted to
  sRGB; untagged images are taken as sRGB.
- Transparency is composited over WHITE: a portrait cut out of its background is almost
  always shown on white (studio shots, matting tools, stock renders), and a black fill would
  put a dark halo around the hair after VAE encoding.
- Grayscale, palette, CMYK, 16-bit and float images are converted to RGB; 16-bit data keeps its
  precision until the final float32 array.
- A non-square image is centre-cropped to a square, then resized (never stretched): the
  model was trained on square, face-centred crops.
- Downscaling uses a Lanczos filter (JPEGs are first decoded at a reduced scale when far
  bigger than needed). A whole photo over PHOTO_MAX_PIXELS is read at a reduced scale
  (:func:`load_photo`). Pillow's decompression-bomb limit refuses absurd sizes with a clear error; a JPEG
  that fits it once reduced is read reduced instead.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .preflight import image_header
from .protocol import write_atomic

MIN_SIDE = 64
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


@lru_cache(maxsize=1)
def heif_decoder() -> bool:
    """Teach Pillow to open HEIC/HEIF files (pi-heif, a worker requirement); False when it is not installed."""
    try:
        import pi_heif
    except ImportError:
        return False
    pi_heif.register_heif_opener()
    return True


def _open(path: Path, size: int | None, max_pixels: int | None = None) -> tuple[Image.Image, int, tuple[int, int]]:
    """The image, upright; its reduction (1, 2, 4 or 8: photo pixels per pixel of the returned image); the
    upright photo's own size (width, height).

    ``size``: a JPEG far bigger than a ``size`` square is decoded at a reduced scale (its centre square is all
    that is used). ``max_pixels``: an image with more pixels is reduced by a power of two until it fits (a JPEG
    while decoding, cheaply; other formats after decoding). A JPEG is never refused by Pillow's
    decompression-bomb limit when the reduced decode fits: a 200 MP phone photo is an ordinary input."""
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    head = image_header(path)
    if not heif_decoder() and head is not None and head[0] == "HEIF":
        raise ImageError(f"{path} is a HEIC/HEIF photo and this worker Python has no HEIF decoder; install it with "
                         "`python -m pip install pi-heif` (Set Up Worker does), or save the photo as JPEG")
    jpeg_pixels = head[1] * head[2] if head is not None and head[0] == "JPEG" else 0
    reduce = 1
    if max_pixels is not None and jpeg_pixels > max_pixels:
        reduce = _power_of_two_reduction(jpeg_pixels, max_pixels)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if limit and reduce > 1 and reduce <= 8 and jpeg_pixels / reduce ** 2 <= limit:
                Image.MAX_IMAGE_PIXELS = None  # decoded at 1/reduce scale: the bomb check is on the reduced size
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            w, h = im.size
            if min(w, h) < MIN_SIDE:
                raise ImageError(f"{path} is {w}x{h} px; it needs at least {MIN_SIDE} px on the shorter side")
            far_bigger = size is not None and min(w, h) >= 2 * size
            if im.format == "JPEG" and (reduce > 1 or far_bigger):
                # decode at 1/2, 1/4 or 1/8 scale: at least `reduce`, and further while still at least `size` on
                # the short side (the centre square is all that is used then)
                target = ((w + reduce - 1) // reduce, (h + reduce - 1) // reduce)
                if far_bigger and size * w // min(w, h) < target[0]:
                    target = (size * w // min(w, h), size * h // min(w, h))
                im.draft("RGB", target)
                reduce = 1 << round(math.log2(w / im.size[0]))  # the scale the decoder chose
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
            ImageOps.exif_transpose(im, in_place=True)
            if max_pixels is not None and im.format != "JPEG" and w * h > max_pixels:
                reduce = _power_of_two_reduction(w * h, max_pixels)
                im = _reducible(im).reduce(reduce)
    except Image.DecompressionBombError:
        raise ImageError(f"{path.name} has more pixels than this tool decodes safely "
                         f"({2 * (limit or 0) // 1_000_000} million); save a smaller copy of the photo "
                         "(about 4000 px on the long side is plenty)") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or a format Pillow cannot read): {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {_reason(exc)}") from None
    return im, reduce, ((h, w) if turned else (w, h))


def _reducible(im: Image.Image) -> Image.Image:
    """``im`` in a mode Image.reduce takes, keeping what :func:`_float_rgb` reads (alpha, 16-bit range)."""
    if im.mode in _SIXTEEN_BIT:
        return im.convert("I")
    if im.mode == "P" or (im.mode in ("RGB", "L") and "transparency" in im.info):
        return im.convert("RGBA")
    if im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return im.convert("RGBA" if im.mode in _ALPHA_MODES else "RGB")
    return im


def _power_of_two_reduction(pixels: int, max_pixels: int) -> int:
    reduce = 1
    while pixels / reduce ** 2 > max_pixels:
        reduce *= 2
    return reduce


def _reason(exc: OSError) -> str:
    """Why an image could not be read, without exception names or errno numbers."""
    if exc.errno is not None and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or "damaged or unsupported data"


def _centre_square(w: int, h: int) -> tuple[int, int, int, int]:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def _resize_float(channel: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(channel.astype(np.float32)).resize((size, size), Image.LANCZOS))


def load_rgb(path: str | os.PathLike, size: int | None = None, crop: Sequence[float] | None = None) -> np.ndarray:
    """An RGB image as float32 ``[size, size, 3]`` in [0, 1] (see the module notes for the rules).

    ``size`` None keeps the square at its own resolution. ``crop`` (x0, y0, x1, y1), a square in the pixels of
    the upright image (EXIF orientation applied), replaces the centre square; parts of it outside the image
    are filled by :func:`crop_square`. Raises :class:`ImageError`.
    """
    path = Path(path)
    if crop is not None:
        photo = load_photo(path)
        square = crop_square(photo.rgb, [float(v) / photo.scale for v in crop])
        if size is None or square.shape[0] == size:
            return square
        return np.stack([_resize_float(square[..., c], size) for c in range(3)], axis=2).clip(0.0, 1.0)
    im, _, _ = _open(path, size, PHOTO_MAX_PIXELS)  # a huge JPEG is read reduced here too, as the preflight promises
    w, h = im.size
    try:
        im = im.crop(_centre_square(w, h))
    except OSError as exc:  # truncated or corrupt data shows up only on load
        raise ImageError(f"cannot decode image {path}: {exc}") from None
    return _float_rgb(path, im, size)


PHOTO_MAX_PIXELS = 16_000_000  # a bigger photo is read at 1/2, 1/4 or 1/8 scale by load_photo


@dataclass(frozen=True)
class Photo:
    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1], upright and composited like load_rgb
    scale: int  # photo pixels per pixel of ``rgb`` (1, or 2, 4, 8 for a photo over PHOTO_MAX_PIXELS)
    size: tuple[int, int]  # the upright photo's own (width, height)


def load_photo(path: str | os.PathLike) -> Photo:
    """The whole photo, for finding the face and cutting its crop. A photo of more than
    :data:`PHOTO_MAX_PIXELS` (a 48 or 200 MP phone shot) is read at a reduced scale: crops are asked for in the
    photo's own pixels and divided by ``scale``, and a face in such a photo still has far more pixels than the
    model's output size."""
    path = Path(path)
    im, scale, size = _open(path, None, PHOTO_MAX_PIXELS)
    return Photo(_float_rgb(path, im, None), scale, size)


def crop_square(image: np.ndarray, crop: Sequence[float]) -> np.ndarray:
    """The square ``crop`` (x0, y0, x1, y1, pixels, rounded to whole pixels) of an HxWx3 float image.

    Outside the image the edge pixels are repeated and blurred (a smooth continuation of the border: a mirror
    fill would invent a second face, black or white a hard frame the model has never seen).
    """
    x0, y0, x1, y1 = (float(v) for v in crop)
    side = int(round(max(x1 - x0, y1 - y0)))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or side < 1:
        raise ImageError(f"invalid crop {list(crop)}: it needs four finite numbers with x1 > x0 and y1 > y0")
    left, top = int(round(x0)), int(round(y0))
    h, w = image.shape[:2]
    if side > 8 * max(w, h):
        raise ImageError(f"the crop {list(crop)} is more than 8 times the image size {w}x{h}")
    ix0, iy0 = max(left, 0), max(top, 0)
    ix1, iy1 = min(left + side, w), min(top + side, h)
    if ix1 <= ix0 or iy1 <= iy0:
        raise ImageError(f"the crop {list(crop)} does not overlap the {w}x{h} image")
    inside = image[iy0:iy1, ix0:ix1]
    pads = ((iy0 - top, top + side - iy1), (ix0 - left, left + side - ix1), (0, 0))
    if not any(a or b for a, b in pads[:2]):
        return np.ascontiguousarray(inside, dtype=np.float32)
    out = np.pad(inside, pads, mode="edge").astype(np.float32)
    small = max(8, side // 24)
    blurred = np.stack([_resize_float(_resize_float(out[..., c], small), side) for c in range(3)], axis=2)
    mask = np.ones((side, side), bool)
    mask[pads[0][0]:side - pads[0][1], pads[1][0]:side - pads[1][1]] = False
    out[mask] = blurred[mask]
    return np.clip(out, 0.0, 1.0)


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """An RGB/RGBA ``im`` tagged with the colour profile ``icc`` (an iPhone's Display P3, a camera's Adobe RGB)
    converted to sRGB, the colours the model was trained on; untagged images are taken as sRGB already. A profile
    that cannot be read leaves the pixels as they are."""
    if not icc or im.mode not in ("RGB", "RGBA"):
        return im
    from PIL import ImageCms

    try:
        rgb = im.convert("RGB") if im.mode == "RGBA" else im
        out = ImageCms.profileToProfile(rgb, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im
    if im.mode == "RGBA":
        out.putalpha(im.getchannel("A"))
    return out


def _float_rgb(path: Path, im: Image.Image, size: int | None) -> np.ndarray:
    """``im`` converted to float32 RGB in [0, 1] (sRGB, see :func:`_to_srgb`); a square image is resized to
    ``size`` when given."""
    icc = im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None  # gray/CMYK profiles: not handled
    try:
        im.load()
        out_size = size if size is not None else im.size[0]
        resize = size is not None and im.size[0] != out_size
        if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
            a = np.asarray(im).astype(np.float32)
            if im.mode == "F":
                a = np.clip(a, 0.0, 1.0)
            else:
                a = a / (255.0 if im.mode == "I" and a.max(initial=0) <= 255 else 65535.0)
            if resize:
                a = _resize_float(a, out_size)
            return np.repeat(np.clip(a, 0.0, 1.0)[..., None], 3, axis=2)
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("RGB", "L") and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in _ALPHA_MODES:
            im = im.convert("RGBA")
        elif im.mode != "RGB":
            im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
        im = _to_srgb(im, icc)
        if resize:
            im = im.resize((out_size, out_size), Image.LANCZOS, reducing_gap=3.0)
        a = np.asarray(im).astype(np.float32) / 255.0
    except OSError as exc:  # truncated or corrupt data shows up only on load
        raise ImageError(f"cannot decode image {path}: {_reason(exc)}") from None
    if a.shape[2] == 4:
        alpha = a[..., 3:4]
        a = a[..., :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(a[..., :3], dtype=np.float32)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float [0, 1] (or uint8) HxWx3 to uint8, rounding to nearest."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 (or HxW) float [0, 1] or uint8 image."""
    a = to_uint8(array)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"expected an HxWx3 image array, got shape {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (temp file + rename): ``path`` is never seen half-written."""
    return write_atomic(path, encode_png(array))
