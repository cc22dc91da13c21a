"""The procedural proxy head: determinism, symmetry, parts, clean rebuilds, anchor following."""
from __future__ import annotations

import bpy
import numpy as np
import pytest
from mathutils import Matrix

from addon import proxy_head
from addon.proxy_head import PART_NAMES, ProxyHeadError, build_proxy_head, head_params


def _anchor(scene, name="Head Anchor", display_size=1.0):
    anchor = bpy.data.objects.new(name, None)
    anchor.empty_display_size = display_size
    scene.collection.objects.link(anchor)
    return anchor


def _local_verts(obj) -> np.ndarray:
    co = np.empty(len(obj.data.vertices) * 3)
    obj.data.vertices.foreach_get("co", co)
    return co.reshape(-1, 3)


def _world_verts(obj) -> np.ndarray:
    bpy.context.view_layer.update()
    mw = np.array(obj.matrix_world)
    return _local_verts(obj) @ mw[:3, :3].T + mw[:3, 3]


def test_same_seed_same_vertices(empty_scene):
    anchor = _anchor(empty_scene)
    a = _local_verts(build_proxy_head(7, anchor, name="A")).copy()
    b = _local_verts(build_proxy_head(7, anchor, name="B"))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    assert head_params(7) == head_params(7)


def test_different_seeds_differ(empty_scene):
    anchor = _anchor(empty_scene)
    a = build_proxy_head(1, anchor, name="A")
    b = build_proxy_head(2, anchor, name="B")
    va, vb = _local_verts(a), _local_verts(b)
    assert va.shape != vb.shape or np.abs(va - vb).max() > 1e-3
    pa, pb = head_params(1), head_params(2)
    assert any(pa[k] != pb[k] for k in ("head_width", "nose_length", "skin_colour", "smile"))
    colours = {tuple(m.diffuse_color) for m in a.data.materials} ^ {tuple(m.diffuse_color) for m in b.data.materials}
    assert colours, "two seeds gave identical colours for every part"


def test_neutral_head_is_mirror_symmetric(empty_scene):
    anchor = _anchor(empty_scene)
    v = _local_verts(build_proxy_head(11, anchor, neutral=True, symmetric=True))
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    # Every vertex has a mirror partner (nearest-neighbour search on a sorted x axis is plenty here).
    from mathutils.kdtree import KDTree
    tree = KDTree(len(v))
    for i, co in enumerate(v):
        tree.insert(co, i)
    tree.balance()
    worst = max(tree.find(co)[2] for co in mirrored)
    assert worst < 1e-6
    assert abs(v[:, 0].mean()) < 1e-6


def test_asymmetric_option_breaks_symmetry(empty_scene):
    p = head_params(11, symmetric=False)
    assert p["smirk"] != 0.0 or p["hair_part"] != 0.0
    assert head_params(11)["smirk"] == 0.0 and head_params(11)["hair_part"] == 0.0


def test_parts_and_material_slots(empty_scene):
    anchor = _anchor(empty_scene)
    obj = build_proxy_head(3, anchor)
    slots = [m.name for m in obj.data.materials]
    for part in ("Skin", "Eye White", "Iris", "Pupil", "Hair", "Brow", "Lips"):
        assert f"Proxy Head {part}" in slots
    idx = np.empty(len(obj.data.polygons), np.int32)
    obj.data.polygons.foreach_get("material_index", idx)
    used = {PART_NAMES[i] for i in np.unique(idx)}
    assert {"Skin", "Eye White", "Iris", "Pupil", "Hair", "Brow", "Lips", "Cloth"} <= used
    skin = obj.data.materials[PART_NAMES.index("Skin")]
    bsdf = skin.node_tree.nodes.get("Principled BSDF")
    assert bsdf is not None
    np.testing.assert_allclose(bsdf.inputs["Base Color"].default_value[:3], skin.diffuse_color[:3])


def test_face_features_point_along_minus_y(empty_scene):
    anchor = _anchor(empty_scene)
    obj = build_proxy_head(5, anchor)
    v = _local_verts(obj)
    idx = np.empty(len(obj.data.polygons), np.int32)
    obj.data.polygons.foreach_get("material_index", idx)
    verts_of = {}
    for poly, mi in zip(obj.data.polygons, idx):
        verts_of.setdefault(PART_NAMES[mi], set()).update(poly.vertices)
    front_most = v[:, 1].argmin()
    assert front_most in verts_of["Skin"]  # the nose tip is the most forward point
    assert v[list(verts_of["Pupil"]), 1].mean() < -0.15  # eyes on the face side
    assert v[list(verts_of["Hair"]), 2].max() > v[list(verts_of["Skin"]), 2].max()  # hair on top
    # Chin-to-crown height in EG3D units, calibrated to the official framing (about 0.5).
    height = v[list(verts_of["Hair"]), 2].max() - v[list(verts_of["Lips"]), 2].min()
    assert 0.3 < height < 0.6


def test_rebuild_replaces_without_leaks(empty_scene):
    anchor = _anchor(empty_scene)
    build_proxy_head(1, anchor)
    counts = (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials))
    for seed in (2, 3):
        obj = build_proxy_head(seed, anchor)
    assert (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials)) == counts
    assert obj.name == "Proxy Head" and obj["proxy_head_seed"] == 3
    assert [o.name for o in empty_scene.objects].count("Proxy Head") == 1
    assert proxy_head.remove_proxy_head("Proxy Head")
    assert len(bpy.data.meshes) == 0 and len(bpy.data.materials) == 0


def test_follows_anchor_transform_and_size(empty_scene):
    anchor = _anchor(empty_scene)
    base = build_proxy_head(4, anchor, name="Base")
    ref = _world_verts(base)
    moved = _anchor(empty_scene, "Moved Anchor", display_size=0.5)
    moved.matrix_world = Matrix.LocRotScale((1.0, -2.0, 3.0), Matrix.Rotation(0.7, 3, "Z").to_quaternion(),
                                            (2.0, 2.0, 2.0))
    obj = build_proxy_head(4, moved, name="Moved")
    assert obj.parent == moved
    got = _world_verts(obj)
    mw = np.array(moved.matrix_world)
    rot = mw[:3, :3] / 2.0
    expected = (ref * 0.5 * 2.0) @ rot.T + mw[:3, 3]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_inputs_are_clear(empty_scene):
    with pytest.raises(ProxyHeadError, match="anchor"):
        build_proxy_head(1, None)
    with pytest.raises(ProxyHeadError, match="seed"):
        head_params("abc")


def _hit_parts(obj, origins, direction) -> list[str | None]:
    """Part name of the first surface each ray from ``origins`` along ``direction`` hits (local frame)."""
    from mathutils import Vector
    from mathutils.bvhtree import BVHTree
    mesh = obj.data
    tree = BVHTree.FromPolygons([tuple(v.co) for v in mesh.vertices], [tuple(p.vertices) for p in mesh.polygons])
    idx = np.empty(len(mesh.polygons), np.int32)
    mesh.polygons.foreach_get("material_index", idx)
    out = []
    for o in origins:
        hit = tree.ray_cast(Vector(o), Vector(direction))
        out.append(None if hit[0] is None else PART_NAMES[idx[hit[2]]])
    return out


@pytest.mark.parametrize("seed", [6, 4, 9])  # hair length 0, 0.5 and 1
def test_from_behind_hair_covers_the_skull_down_to_the_nape(empty_scene, seed):
    anchor = _anchor(empty_scene)
    obj = build_proxy_head(seed, anchor)
    # Straight down the back of the head, from the crown to below the ear lobes: all hair.
    skull = [(x, 1.0, z) for x in (-0.06, 0.0, 0.06) for z in np.linspace(-0.07, 0.25, 12)]
    assert set(_hit_parts(obj, skull, (0.0, -1.0, 0.0))) == {"Hair"}
    if head_params(seed)["hair_length"] == 0.0:
        # Short hair ends at the nape: below it, the neck (skin), then the shoulders (cloth).
        assert _hit_parts(obj, [(0.0, 1.0, -0.2)], (0.0, -1.0, 0.0)) == ["Skin"]
        assert _hit_parts(obj, [(0.0, 1.0, -0.33)], (0.0, -1.0, 0.0)) == ["Cloth"]


@pytest.mark.parametrize("seed", [6, 5, 8, 11])  # short hair, thin to thick
def test_ears_stand_out_of_short_hair_from_behind(empty_scene, seed):
    assert head_params(seed)["hair_length"] == 0.0
    obj = build_proxy_head(seed, _anchor(empty_scene))

    def outermost(zs, part: str) -> float:
        """Largest |x| where a ray from behind first hits ``part`` (both sides), over heights ``zs``."""
        best = 0.0
        for side in (1.0, -1.0):
            xs = np.linspace(0.30, 0.0, 151)
            for z in zs:
                hits = _hit_parts(obj, [(side * x, 1.0, z) for x in xs], (0.0, -1.0, 0.0))
                first = next((i for i, p in enumerate(hits) if p is not None), None)
                if first is not None and hits[first] == part:
                    best = max(best, float(xs[first]))
        return best

    ears = outermost(np.linspace(-0.02, 0.07, 10), "Skin")
    hair = outermost(np.linspace(0.0, 0.30, 16), "Hair")
    assert ears >= hair - 0.004, (ears, hair)  # the ears are (about) the widest thing seen from behind
