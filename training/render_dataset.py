"""Render a synthetic multi-view portrait dataset with Blender (the bpy module or ``blender -b``).

    .venv/bin/python -m training.render_dataset --out DIR --identities N --views V --size 64 --seed S
    blender -b --python training/render_dataset.py -- --out DIR ...

Each identity is a procedural head (``addon.proxy_head``, shape/skin/hair/expression from its seed) seen
from V random EG3D cameras (yaw/pitch in the trained range, ``sample_lookat`` + ``label_to_blender`` with a
head anchor), rendered with Cycles under a random key light, fill and background colour. Each view's
condition image is a DIFFERENT identity at the same camera, rendered in the add-on's condition style
(``addon.condition_render.render_condition_images``). Output (see docs/TRAINING.md)::

    DIR/train/dataset.json, DIR/train/<identity>/vNN.png, DIR/train/cond/<identity>/vNN.png
    DIR/test/...           (held-out identities)

Deterministic by seed; resumable: an identity with a ``done.json`` is not rendered again.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # run as a file by Blender: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from dp3d_core.cameras import (HeadAnchor, intrinsics_from_focal, label_to_blender, sample_lookat, to_label)
from dp3d_core.held_out import reference_and_targets
from training.data import PROXY_DIR, DatasetError, read_labels, split_counts, write_labels

YAW_RANGE = 0.75      # radians either side of frontal (about 43 degrees)
PITCH_RANGE = 0.25    # radians above/below level
SENSOR = 36.0


class RenderDatasetError(RuntimeError):
    """The dataset cannot be rendered; the message says why."""


def identity_name(index: int) -> str:
    return f"id{index:05d}"


def identity_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng((int(seed), int(index), 1)).integers(2**30))


def condition_seed(seed: int, index: int, view: int) -> int:
    """Seed of the other identity shown in a view's condition image (a range apart from the dataset's own)."""
    return 2**30 + int(np.random.default_rng((int(seed), int(index), int(view), 2)).integers(2**30))


def sample_views(seed: int, index: int, views: int, yaw_range: float = YAW_RANGE,
                 pitch_range: float = PITCH_RANGE, full_turn: bool = False) -> list[np.ndarray]:
    """EG3D labels of an identity's views: view 0 frontal, the rest uniform in the yaw/pitch range.

    ``full_turn``: view 0 frontal, view 1 straight behind (yaw 180 degrees, level: the back-head stage's
    target), the rest uniform in yaw over the whole turn and in the pitch range."""
    rng = np.random.default_rng((int(seed), int(index), 3))
    labels = []
    for v in range(views):
        if v == 0:
            yaw, pitch = 0.0, 0.0
        elif full_turn and v == 1:
            yaw, pitch = math.pi, 0.0
        elif full_turn:
            yaw, pitch = rng.uniform(-math.pi, math.pi), rng.uniform(-pitch_range, pitch_range)
        else:
            yaw, pitch = rng.uniform(-yaw_range, yaw_range), rng.uniform(-pitch_range, pitch_range)
        c2w = sample_lookat(math.pi / 2 + yaw, math.pi / 2 + pitch)
        labels.append(to_label(c2w, intrinsics_from_focal()))
    return labels


def look(seed: int, index: int) -> dict[str, Any]:
    """Lighting and background of an identity's photo-style renders."""
    rng = np.random.default_rng((int(seed), int(index), 4))
    return {
        "background": tuple(float(c) for c in rng.uniform(0.05, 0.8, 3)),
        "key_rotation": (math.radians(rng.uniform(-60, -10)), math.radians(rng.uniform(-50, 50)), 0.0),
        "key_energy": float(rng.uniform(2.0, 5.0)),
        "key_colour": tuple(float(c) for c in 1.0 - rng.uniform(0.0, 0.25, 3)),
        "world_strength": float(rng.uniform(0.3, 1.0)),
    }


# --------------------------------------------------------------------------------------------- Blender side

def _scene(size: int):
    import bpy
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    anchor = bpy.data.objects.new("Head Anchor", None)
    anchor.empty_display_size = 1.0
    scene.collection.objects.link(anchor)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    r = scene.render
    r.resolution_x = r.resolution_y = size
    r.resolution_percentage = 100
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGB"
    scene.view_settings.view_transform = "Standard"
    return scene, anchor, cam


def _place_camera(cam, label: np.ndarray, anchor, size: int) -> None:
    from mathutils import Matrix
    bc = label_to_blender(label, HeadAnchor(np.array(anchor.matrix_world), 1.0), sensor_width=SENSOR,
                          sensor_fit="HORIZONTAL", resolution_x=size, resolution_y=size)
    cam.matrix_world = Matrix(bc.matrix_world.tolist())
    cam.data.lens = bc.lens
    cam.data.sensor_width = bc.sensor_width
    cam.data.sensor_fit = bc.sensor_fit
    cam.data.shift_x, cam.data.shift_y = bc.shift_x, bc.shift_y


def _photo_setup(scene, cam, style: dict[str, Any]) -> list:
    """Cycles with a key light parented to the camera, a coloured world; returns the temporary objects."""
    import bpy
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 24
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 3
    scene.render.filter_size = 1.5
    world = bpy.data.worlds.new("Photo World")
    world.use_nodes = True
    bg = world.node_tree.nodes["Background"]
    bg.inputs["Color"].default_value = (*style["background"], 1.0)
    bg.inputs["Strength"].default_value = style["world_strength"]
    scene.world = world
    light_data = bpy.data.lights.new("Key", "SUN")
    light_data.energy = style["key_energy"]
    light_data.color = style["key_colour"]
    light_data.angle = math.radians(10)
    light = bpy.data.objects.new("Key", light_data)
    scene.collection.objects.link(light)
    light.parent = cam
    light.rotation_euler = style["key_rotation"]
    return [light]


def _render_still(scene, path: Path) -> None:
    import bpy
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True, scene=scene.name)


def render_identity(out: Path, index: int, seed: int, views: int, size: int,
                    full_turn: bool = False) -> list[tuple[str, list[float]]]:
    """Render one identity's views and condition images into ``out``; returns its label entries."""
    from addon.condition_render import render_condition_images
    from addon.proxy_head import build_proxy_head, remove_proxy_head

    name = identity_name(index)
    scene, anchor, cam = _scene(size)
    labels = sample_views(seed, index, views, full_turn=full_turn)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / "cond" / name).mkdir(parents=True, exist_ok=True)
    build_proxy_head(identity_seed(seed, index), anchor, name="Subject")
    for obj in _photo_setup(scene, cam, look(seed, index)):
        obj.hide_render = False
    entries = []
    for v, label in enumerate(labels):
        _place_camera(cam, label, anchor, size)
        _render_still(scene, out / name / f"v{v:02d}.png")
        entries.append((f"{name}/v{v:02d}.png", [float(x) for x in label]))
    subject = scene.objects["Subject"]
    subject.hide_render = True
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for v, label in enumerate(labels):
            other = build_proxy_head(condition_seed(seed, index, v), anchor, name="Condition Head")
            _place_camera(cam, label, anchor, size)
            paths = render_condition_images(scene, cam, [scene.frame_current], tmp, size=size, objects=[other])
            shutil.move(str(paths[0]), out / "cond" / name / f"v{v:02d}.png")
            remove_proxy_head("Condition Head")
    remove_proxy_head("Subject")
    return entries


def render_proxies(split: str | Path, views: int = 8, proxy_seed: int = 0, log=print) -> int:
    """3D-aware proxy views of a rendered split, for ``training.evaluate``: per identity, the reference view it
    evaluates from (``dp3d_core.held_out``) projected onto the add-on's generic proxy head (Proxy Head Seed
    ``proxy_seed``, not the identity's own head) and seen from each target camera, exactly as the add-on makes
    the proxy views of 3D-aware noise. Written to ``split/proxy/<target path>``; resumable (existing files are
    kept). Returns the number of views rendered."""
    from addon.condition_render import render_proxy_views
    from addon.proxy_head import build_proxy_head

    split = Path(split)
    labels = read_labels(split)
    label_of = {rel: label for rel, label in labels}
    rendered = 0
    for name, reference, targets in reference_and_targets(labels, views):
        todo = [rel for rel in targets if not (split / PROXY_DIR / rel).is_file()]
        if not todo:
            continue
        with Image.open(split / reference) as im:
            size = im.width
        scene, anchor, cam = _scene(size)
        head = build_proxy_head(proxy_seed, anchor)
        (split / PROXY_DIR / name).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=split) as tmp:
            for rel in todo:
                _place_camera(cam, label_of[rel], anchor, size)
                paths = render_proxy_views(scene, cam, [scene.frame_current], tmp,
                                           reference_image_path=split / reference, proxy_object=head,
                                           reference_label_or_camera=label_of[reference], anchor=anchor, size=size)
                shutil.move(str(paths[0]), split / PROXY_DIR / rel)
                rendered += 1
        log(f"[render_dataset] proxy views of {name} done")
    return rendered


def write_index(out: str | Path) -> None:
    """(Re)write ``dataset.json`` of each split from its finished identities (usable while rendering goes on)."""
    for name in ("train", "test"):
        split = Path(out) / name
        if not split.is_dir():
            continue
        entries = []
        for done in sorted(split.glob("id*/done.json")):
            entries.extend((rel, label) for rel, label in json.loads(done.read_text())["labels"])
        write_labels(split, entries)


def render_dataset(out: str | Path, identities: int, views: int, size: int = 64, seed: int = 0,
                   test_fraction: float = 0.1, full_turn: bool = False, log=print) -> dict[str, Any]:
    """Render (or finish rendering) the whole dataset; returns counts and speed. ``full_turn``: cameras all
    around the head (see ``sample_views``)."""
    if identities < 2:
        raise RenderDatasetError("at least 2 identities are needed (conditions show a different identity)")
    if views < 2:
        raise RenderDatasetError("at least 2 views per identity are needed (a reference and a target)")
    if not 16 <= size <= 1024 or size % 8:
        raise RenderDatasetError(f"size must be a multiple of 8 between 16 and 1024, got {size}")
    out = Path(out)
    n_train, _ = split_counts(identities, test_fraction)
    rendered, t0 = 0, time.time()
    for index in range(identities):
        split = out / ("train" if index < n_train else "test")
        done = split / identity_name(index) / "done.json"
        if done.is_file():
            previous = json.loads(done.read_text())
            if bool(previous.get("full_turn", False)) != full_turn:
                raise RenderDatasetError(f"{done.parent} was rendered with full_turn={not full_turn}; "
                                         f"use another --out folder for a dataset of the other kind")
            continue
        entries = render_identity(split, index, seed, views, size, full_turn)
        done.write_text(json.dumps({"seed": seed, "views": views, "size": size, "full_turn": full_turn,
                                    "labels": entries}))
        rendered += views
        rate = rendered / max(time.time() - t0, 1e-9)
        log(f"[render_dataset] {identity_name(index)} done ({index + 1}/{identities}, {rate:.2f} views/s)")
    write_index(out)
    elapsed = time.time() - t0
    return {"views_rendered": rendered, "seconds": elapsed,
            "views_per_second": rendered / elapsed if rendered and elapsed > 0 else None}


def main(argv: Iterable[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    parser = argparse.ArgumentParser(prog="python -m training.render_dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--views", type=int, default=None, help="views per identity (default 12)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--full-turn", action="store_true",
                        help="cameras all around the head: view 0 frontal, view 1 straight behind (yaw 180), "
                             "the rest uniform over the whole turn (for DiffPortrait360 training)")
    parser.add_argument("--index-only", action="store_true", help="only rewrite dataset.json from finished identities")
    parser.add_argument("--proxies", action="store_true",
                        help="render the 3D-aware proxy views of the rendered split --out (e.g. DIR/test) for "
                             "training.evaluate; --views is then the number of target views per identity "
                             "(default 8, as evaluate)")
    args = parser.parse_args(list(argv))
    if args.index_only:
        write_index(args.out)
        return 0
    if args.proxies:
        try:
            count = render_proxies(args.out, args.views or 8)
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"proxy_views_rendered": count}))
        return 0
    try:
        stats = render_dataset(args.out, args.identities, args.views or 12, args.size, args.seed, args.test_fraction,
                               args.full_turn)
    except RenderDatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
