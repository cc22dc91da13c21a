"""Write tests/data/phone_photo.heic: a phone-style HEIC photo of the project's own proxy head.

    .venv/bin/pip install pillow-heif        # the encoder; not a project requirement (it bundles x265, GPL)
    .venv/bin/python scripts/make_heic_fixture.py
    .venv/bin/pip uninstall -y pillow-heif

The worker only decodes HEIC (with pi-heif); encoding needs pillow-heif, so the file is made once and kept.
Content: proxy head seed 21 (neutral; not one of the identities the 3D landmarks come from) seen by the frontal EG3D
camera at 256 px, placed at (PLACED_X, PLACED_Y) on a 300 x 400 portrait canvas, stored sideways the way
phones do (pixels rotated, the HEIF rotation property restores them). The tests know where the head is.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "data" / "phone_photo.heic"
SEED, SIZE = 21, 256
CANVAS = (300, 400)
PLACED_X, PLACED_Y = 20, 90  # top-left corner of the render on the upright canvas


def main() -> int:
    import pillow_heif
    from PIL import Image

    from scripts.make_face_landmarks_3d import render_views

    with tempfile.TemporaryDirectory() as tmp:
        [(path, _c2w)] = render_views(SEED, [(0.0, 0.0)], Path(tmp), size=SIZE)
        head = Image.open(path).convert("RGB")
    canvas = Image.new("RGB", CANVAS, head.getpixel((2, 2)))
    canvas.paste(head, (PLACED_X, PLACED_Y))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": pillow-heif stores it as the HEIF rotation
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pillow_heif.register_heif_opener()
    canvas.transpose(Image.Transpose.ROTATE_90).save(OUT, format="HEIF", quality=80, exif=exif.tobytes())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
