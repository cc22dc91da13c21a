"""A procedural proxy head: the pose cue for DiffPortrait3D's view ControlNet.

The head is built in EG3D units in the head-anchor frame (anchor +X = subject's left, -Y = out of
the face, +Z = up; head centre at the origin) and parented to the anchor with a uniform scale of the
anchor's ``empty_display_size``, so one anchor-size unit is one EG3D unit. Sizes are calibrated so a
frontal render at the EG3D camera (radius 2.7, focal 4.2647) frames it like the official condition
images: eyes a little above the image centre, chin at about 80 % of the height, crown near the top.

Everything is one mesh with one material slot per part, so a rebuild replaces exactly one object,
one mesh and its own materials. Geometry is generated in numpy from a seed (``head_params``), so the
same seed always gives the same vertices, and the neutral head is mirror-symmetric in X.
"""
from __future__ import annotations

import math
from typing import Any

import bpy
import numpy as np
from mathutils import Vector
from mathutils.bvhtree import BVHTree

PART_NAMES = ("Skin", "Eye White", "Iris", "Pupil", "Hair", "Brow", "Lips", "Mouth", "Teeth", "Cloth")
PROXY_TAG = "dp3d_proxy_head"

# Linear-RGB palettes (Workbench and Cycles both take linear colours).
_SKIN_TONES = ((0.80, 0.55, 0.42), (0.72, 0.46, 0.33), (0.60, 0.37, 0.25), (0.45, 0.27, 0.17),
               (0.30, 0.17, 0.10), (0.85, 0.62, 0.50), (0.68, 0.48, 0.30))
_HAIR_COLOURS = ((0.020, 0.015, 0.012), (0.06, 0.035, 0.020), (0.14, 0.08, 0.04), (0.45, 0.32, 0.15),
                 (0.30, 0.10, 0.04), (0.35, 0.35, 0.35), (0.03, 0.03, 0.03))
_EYE_COLOURS = ((0.10, 0.05, 0.02), (0.05, 0.12, 0.25), (0.08, 0.15, 0.06), (0.18, 0.11, 0.04))
_CLOTH_COLOURS = ((0.05, 0.06, 0.10), (0.30, 0.05, 0.05), (0.20, 0.20, 0.22), (0.04, 0.12, 0.06),
                  (0.60, 0.58, 0.55))


class ProxyHeadError(ValueError):
    """The proxy head cannot be built from the given inputs."""


def head_params(seed: int, *, neutral: bool = False, symmetric: bool = True) -> dict[str, Any]:
    """Identity and expression parameters for ``seed`` (pure, deterministic).

    ``neutral`` zeroes the expression (closed mouth, no smile, relaxed brows, eyes open);
    ``symmetric=False`` adds a seed-driven one-sided smirk and hair parting.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ProxyHeadError(f"seed must be an integer, got {seed!r}")
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFF)
    u = rng.uniform
    p: dict[str, Any] = {
        "seed": int(seed),
        "head_width": u(0.92, 1.08),
        "head_height": u(0.95, 1.05),
        "head_depth": u(0.95, 1.05),
        "jaw_length": u(0.45, 0.7),
        "jaw_taper": u(0.18, 0.3),
        "chin_forward": u(0.6, 1.0),
        "nose_length": u(0.85, 1.2),
        "nose_width": u(0.85, 1.25),
        "nose_protrusion": u(0.85, 1.2),
        "eye_spacing": u(0.94, 1.06),
        "eye_size": u(0.9, 1.1),
        "ear_size": u(0.85, 1.15),
        "lip_width": u(0.85, 1.15),
        "lip_fullness": u(0.8, 1.3),
        "neck_width": u(0.85, 1.15),
        "hair_thickness": u(0.008, 0.035),
        "hair_length": float(rng.choice([0.0, 0.0, 0.5, 1.0])),
        "hairline": u(0.38, 0.55),
        "skin_colour": tuple(float(c) for c in _SKIN_TONES[rng.integers(len(_SKIN_TONES))]),
        "hair_colour": tuple(float(c) for c in _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]),
        "eye_colour": tuple(float(c) for c in _EYE_COLOURS[rng.integers(len(_EYE_COLOURS))]),
        "cloth_colour": tuple(float(c) for c in _CLOTH_COLOURS[rng.integers(len(_CLOTH_COLOURS))]),
        "mouth_open": u(0.0, 1.0) ** 2,
        "smile": u(-0.3, 1.0),
        "brow_raise": u(-0.6, 1.0),
        "eye_open": u(0.55, 1.0),
        "smirk": u(-1.0, 1.0) if not symmetric else 0.0,
        "hair_part": u(-1.0, 1.0) if not symmetric else 0.0,
    }
    if neutral:
        p.update(mouth_open=0.0, smile=0.0, brow_raise=0.0, eye_open=0.85, smirk=0.0)
    return p


# ---------------------------------------------------------------------------------------------
# Geometry helpers (numpy): every part is (vertices (N,3), faces list of index tuples).

def _sphere_grid(n_lat: int, n_lon: int, lat_max: float = math.pi) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Unit directions of a lat-long sphere (pole at +Z), cut at polar angle ``lat_max``.

    Longitude 0 points along -Y (the face); the grid is mirror-symmetric in X for even ``n_lon``.
    """
    full = lat_max >= math.pi - 1e-9
    rings = n_lat - 1 if full else n_lat
    theta = np.linspace(0.0, lat_max, n_lat + 1)[1:rings + 1]
    phi = 2.0 * math.pi * np.arange(n_lon) / n_lon
    st, ct = np.sin(theta)[:, None], np.cos(theta)[:, None]
    ring = np.stack([st * np.sin(phi), -st * np.cos(phi), np.broadcast_to(ct, (rings, n_lon))], axis=-1)
    verts = [np.array([[0.0, 0.0, 1.0]]), ring.reshape(-1, 3)]
    faces: list[tuple[int, ...]] = []
    for j in range(n_lon):
        faces.append((0, 1 + j, 1 + (j + 1) % n_lon))
    for r in range(rings - 1):
        a, b = 1 + r * n_lon, 1 + (r + 1) * n_lon
        for j in range(n_lon):
            k = (j + 1) % n_lon
            faces.append((a + j, b + j, b + k, a + k))
    if full:
        bottom = 1 + rings * n_lon
        verts.append(np.array([[0.0, 0.0, -1.0]]))
        last = 1 + (rings - 1) * n_lon
        for j in range(n_lon):
            faces.append((last + j, bottom, last + (j + 1) % n_lon))
    # Faces wind counter-clockwise seen from outside (normals point out).
    return np.concatenate(verts), faces


def _ellipsoid(centre, radii, n_lat=16, n_lon=24, lat_max=math.pi, rotate=None):
    d, faces = _sphere_grid(n_lat, n_lon, lat_max)
    v = d * np.asarray(radii, float)
    if rotate is not None:
        v = v @ np.asarray(rotate, float).T
    return v + np.asarray(centre, float), faces


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], float)


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], float)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _bump(d: np.ndarray, centre_dir, width: float) -> np.ndarray:
    """Gaussian falloff on the unit sphere around direction ``centre_dir``."""
    c = np.asarray(centre_dir, float)
    c = c / np.linalg.norm(c)
    return np.exp(-np.sum((d - c) ** 2, axis=1) / (width * width))


def _head_shape(d: np.ndarray, p: dict, *, scale: float = 1.0) -> np.ndarray:
    """Skull and face surface: a shaped ellipsoid over unit directions ``d``."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    hw, hd, hh = 0.166 * p["head_width"], 0.205 * p["head_depth"], 0.212 * p["head_height"]
    lower = np.clip(-z, 0.0, 1.0)
    front = np.clip(-y, 0.0, 1.0)
    px = x * hw * (1.0 - p["jaw_taper"] * _smoothstep(lower * 1.25) * (0.4 + 0.6 * front))
    py = y * hd
    pz = z * hh
    # Lower face longer than the cranium; chin pulled forward.
    pz = pz - p["jaw_length"] * hh * lower ** 1.6
    py = py - 0.09 * p["chin_forward"] * lower ** 2 * front ** 0.5
    # Flatter face front, fuller back of the skull.
    py = np.where(y < 0, py * (1.0 - 0.12 * front ** 2), py * 1.03)
    # Behind the jaw the head narrows into the neck: the skull's lower back is pulled in, only well behind
    # the ears (pulling in the sides too moved the face mesh's pitch read-out on renders, test_reference_prep).
    back = np.clip(y, 0.0, 1.0)
    tuck = _smoothstep(lower * 1.5) * _smoothstep((back - 0.35) / 0.5)
    px = px * (1.0 - 0.22 * tuck)
    py = py * (1.0 - 0.38 * tuck)
    pos = np.stack([px, py, pz], axis=1) + np.array([0.0, 0.015, 0.06])
    s = p["eye_spacing"]
    # Eye sockets in, brow ridge and cheekbones out (along the radial direction).
    disp = np.zeros(len(d))
    for side in (-1.0, 1.0):
        disp -= 0.016 * _bump(d, (side * 0.37 * s, -0.90, -0.06), 0.16)
        disp += 0.006 * _bump(d, (side * 0.36 * s, -0.88, 0.14), 0.14)
        disp += 0.010 * _bump(d, (side * 0.62, -0.70, -0.30), 0.25)
    pos += d * disp[:, None]
    return pos * scale


def _surface_hit(tree: BVHTree, origin, direction) -> np.ndarray:
    hit = tree.ray_cast(Vector(origin), Vector(direction))
    if hit[0] is None:
        raise ProxyHeadError(f"internal: no head surface along {direction} from {origin}")
    return np.array(hit[0])


def _mirror_pair(build, *args):
    """Build a part for the subject's left (+X) and mirror it exactly to the right."""
    v, f = build(1.0, *args)
    vm = v * np.array([-1.0, 1.0, 1.0])
    return [(v, f), (vm, [tuple(reversed(face)) for face in f])]


def _build_parts(p: dict) -> list[tuple[str, np.ndarray, list[tuple[int, ...]]]]:
    parts: list[tuple[str, np.ndarray, list[tuple[int, ...]]]] = []
    d, head_faces = _sphere_grid(48, 64)
    head_v = _head_shape(d, p)
    parts.append(("Skin", head_v, head_faces))
    tree = BVHTree.FromPolygons([tuple(v) for v in head_v], head_faces)

    def front_y(x: float, z: float) -> float:
        return float(_surface_hit(tree, (x, -1.0, z), (0.0, 1.0, 0.0))[1])

    def side_x(y: float, z: float) -> float:
        return float(_surface_hit(tree, (1.0, y, z), (-1.0, 0.0, 0.0))[0])

    # Neck and shoulders.
    nw = 0.085 * p["neck_width"]
    # Wider than deep, as a neck is from behind (the trapezius), and set back under the skull.
    parts.append(("Skin",) + _ellipsoid((0.0, 0.04, -0.23), (nw * 1.1, nw * 1.05, 0.17), 12, 32))
    sv, sf = _ellipsoid((0.0, 0.06, -0.47), (0.34, 0.16, 0.22), 20, 48)
    parts.append(("Cloth", sv, sf))

    # Eyes: eyeball, iris, pupil, lids.
    eye_r = 0.024 * p["eye_size"]
    eye_x = 0.056 * p["eye_spacing"]
    eye_z = 0.045
    eye_y = front_y(eye_x, eye_z) + eye_r * 0.55
    open_ = p["eye_open"]

    def eye(side: float):
        c = np.array([side * eye_x, eye_y, eye_z])
        out = []
        out.append(("Eye White",) + _ellipsoid(c, (eye_r,) * 3, 12, 20))
        look = _rot_x(math.pi / 2)  # cap axis +Z -> -Y (forward)
        out.append(("Iris",) + _ellipsoid(c, (eye_r * 1.02,) * 3, 6, 20, lat_max=0.55, rotate=look))
        out.append(("Pupil",) + _ellipsoid(c, (eye_r * 1.03,) * 3, 4, 16, lat_max=0.24, rotate=look))
        # Upper lid: a skin cap from the top down to the lid edge; lower lid from below.
        upper_edge = math.radians(100.0 - 40.0 * open_)
        out.append(("Skin",) + _ellipsoid(c, (eye_r * 1.10,) * 3, 12, 24, lat_max=upper_edge))
        out.append(("Skin",) + _ellipsoid(c, (eye_r * 1.08,) * 3, 10, 24, lat_max=math.radians(62.0),
                                          rotate=_rot_x(math.pi)))
        return out

    for name, v, f in eye(1.0):
        parts.append((name, v, f))
        parts.append((name, v * np.array([-1.0, 1.0, 1.0]), [tuple(reversed(face)) for face in f]))

    # Brows: arched bars following the forehead.
    brow_z = eye_z + 0.036 + 0.012 * p["brow_raise"]

    def brow(side: float):
        v, f = _ellipsoid((0.0, 0.0, 0.0), (0.030, 0.006, 0.0065), 6, 16)
        x = side * (eye_x + 0.004) + v[:, 0] * side
        t = v[:, 0] / 0.030
        z = brow_z + v[:, 2] - 0.006 * t ** 2 + 0.004 * p["brow_raise"] * (1 - t ** 2) - 0.003 * t
        y = np.array([front_y(float(xi), float(zi)) for xi, zi in zip(x, z)]) + v[:, 1] + 0.002
        return np.stack([x, y, z], axis=1), f

    for v, f in _mirror_pair(brow):  # mirrored, not re-built: ray hits differ with the triangulation
        parts.append(("Brow", v, f))

    # Nose: bridge-to-tip wedge plus nostril wings.
    nl, nwid, npro = p["nose_length"], p["nose_width"], p["nose_protrusion"]
    tip_z = eye_z - 0.085 * nl
    root_y = front_y(0.0, eye_z + 0.01)
    v, f = _sphere_grid(14, 24)
    root_z = eye_z + 0.01
    t = (1.0 - v[:, 2]) / 2.0  # 0 at the root, 1 at the tip
    nz = root_z + (tip_z - root_z) * t
    width = (0.010 + 0.012 * t ** 1.5) * nwid
    depth = (0.006 + 0.040 * t ** 1.2) * npro
    nx = v[:, 0] * width
    ny = root_y + 0.012 + (v[:, 1] - 1.0) * 0.5 * depth
    parts.append(("Skin", np.stack([nx, ny, nz], axis=1), f))
    tip_y = root_y + 0.012 - 0.046 * npro
    parts.append(("Skin",) + _ellipsoid((0.0, tip_y + 0.010, tip_z + 0.006), (0.015 * nwid, 0.013, 0.013), 12, 20))
    for side in (1.0, -1.0):
        wv, wf = _ellipsoid((side * 0.016 * nwid, tip_y + 0.026, tip_z + 0.006), (0.013 * nwid, 0.014, 0.010), 10, 16,
                            rotate=_rot_z(side * 0.5))
        parts.append(("Skin", wv, wf))

    # Mouth: lips, dark opening, teeth.
    mouth_z = tip_z - 0.045
    lw = 0.040 * p["lip_width"] * (1.0 + 0.12 * max(p["smile"], 0.0))
    full = p["lip_fullness"]
    gap = 0.022 * p["mouth_open"]
    mouth_y = front_y(0.0, mouth_z)

    def lip(z0: float, ry: float, rz: float):
        v, f = _ellipsoid((0.0, 0.0, 0.0), (lw, ry, rz), 8, 24)
        t = v[:, 0] / lw
        z = z0 + v[:, 2] + (0.010 * p["smile"] + 0.006 * p["smirk"] * t) * t ** 2
        y = mouth_y + v[:, 1] + 0.018 * t ** 2 - 0.002
        return np.stack([v[:, 0], y, z], axis=1), f

    parts.append(("Lips",) + lip(mouth_z + 0.007 + gap * 0.3, 0.010 * full, 0.0070 * full))
    parts.append(("Lips",) + lip(mouth_z - 0.009 - gap * 0.7, 0.011 * full, 0.0085 * full))
    if gap > 0.002 or p["smile"] > 0.4:
        ov, of = _ellipsoid((0.0, mouth_y - 0.0, mouth_z - gap * 0.2), (lw * 0.85, 0.004, 0.004 + gap * 0.5), 8, 20)
        ov[:, 1] += 0.018 * (ov[:, 0] / lw) ** 2
        parts.append(("Mouth", ov, of))
        tv, tf = _ellipsoid((0.0, mouth_y - 0.004, mouth_z + 0.001 + gap * 0.15), (lw * 0.6, 0.004, 0.0035 + gap * 0.1), 6, 16)
        tv[:, 1] += 0.018 * (tv[:, 0] / lw) ** 2
        parts.append(("Teeth", tv, tf))

    # Ears: flattened, tilted shells on the sides, with a dark-ish inner bowl.
    es = p["ear_size"]
    ear_z = eye_z - 0.020

    def ear(side: float):
        sx = side_x(0.035, ear_z)
        v, f = _ellipsoid((0.0, 0.0, 0.0), (0.011, 0.029 * es, 0.043 * es), 10, 20)
        v[:, 0] += 0.006 * (v[:, 1] / 0.029) ** 2  # cupped
        # Turned so the back rim stands off the skull (and clear of the hair): ears read from behind too.
        v = v @ (_rot_z(-0.75) @ _rot_x(-0.25)).T
        return v + np.array([sx + 0.014, 0.040, ear_z]), f

    for name, (v, f) in zip(("Skin", "Skin"), _mirror_pair(ear)):
        parts.append((name, v, f))

    # Hair: a shell over the skull, pulled under the skin below the hairline. The hairline (in the
    # direction's z) keeps the face's framing for fr >= 0; behind, it passes above the ear, drops behind it
    # and covers the back of the skull down to the nape.
    d2, hf = _sphere_grid(72, 96)
    shell = _head_shape(d2, p)
    centre = np.array([0.0, 0.015, 0.06])
    rel = shell - centre
    fr = -d2[:, 1]  # 1 at the face, -1 at the back
    part = p["hair_part"]
    nape = -0.50 - 0.08 * p["hair_length"]
    boundary = np.interp(fr, [-1.0, -0.6, -0.35, -0.15, 0.0, 0.2, 0.55, 1.0],
                         [nape, nape + 0.04, -0.22, 0.12, 0.048, 0.18, p["hairline"] - 0.05, p["hairline"]])
    boundary = boundary + 0.06 * part * d2[:, 0] * (fr > 0)
    behind = np.clip(-fr, 0.0, 1.0)
    soft = 0.16 + 0.30 * behind  # the hair thins out toward the nape instead of ending in a ledge
    mask = _smoothstep((d2[:, 2] - boundary) / soft + 0.5)
    # Short over the ears (the sides below the temples), so the ears stand out of it from behind.
    sides = np.abs(d2[:, 0]) ** 4 * (1.0 - _smoothstep((d2[:, 2] - 0.05) / 0.45)) * _smoothstep((0.2 - fr) / 0.3)
    thick = (p["hair_thickness"] / 0.17 + 0.04) * (1.0 - 0.6 * (1.0 - p["hair_length"]) * sides)
    grow = 1.0 + thick * mask - 0.06 * (1.0 - mask)
    grow = grow * (1.0 + 0.06 * mask * np.clip(d2[:, 2], 0, 1))  # volume on top
    cap = centre + rel * grow[:, None]
    parts.append(("Hair", cap, hf))
    if p["hair_length"] > 0:
        parts.append(("Hair",) + _long_hair(cap, p))
    return parts


def _long_hair(cap: np.ndarray, p: dict) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Hair falling from the cap's widest ring to ``hair_length``: its cross-section there is the cap's own
    (so it leaves the cap without a step), then it narrows in a rounded curve at the sides (the frontal framing)
    and falls straight, rounded at the ends, behind. The front stays behind the cheeks."""
    top, yc = 0.06, 0.015
    ring = cap[np.abs(cap[:, 2] - top) < 0.02]
    # The ring's radius around the skull's vertical axis per |angle| (0 = straight behind); mirror-symmetric.
    ring_a = np.abs(np.arctan2(ring[:, 0], ring[:, 1] - yc))
    ring_r = np.hypot(ring[:, 0], ring[:, 1] - yc)
    edges = np.linspace(0.0, math.pi, 37)
    which = np.clip(np.searchsorted(edges, ring_a, side="right") - 1, 0, 35)
    radius = np.zeros(36)
    np.maximum.at(radius, which, ring_r)
    centres = 0.5 * (edges[:-1] + edges[1:])
    filled = radius > 0
    radius = np.interp(centres, centres[filled], radius[filled])
    radius = np.convolve(np.pad(radius, 1, mode="reflect"), np.ones(3) / 3.0, mode="valid")
    bottom = -0.03 - (0.14 + 0.16 * p["hair_length"])
    d, faces = _sphere_grid(32, 64)
    horiz = np.hypot(d[:, 0], d[:, 1])
    ang = np.arctan2(d[:, 0], d[:, 1])
    r = 0.97 * np.interp(np.abs(ang), centres, radius)
    cz = d[:, 2]
    behind = _smoothstep(np.cos(ang) / 0.7)
    p_exp = 3.0 + 2.0 * behind  # 3 at the sides (the old frontal framing), 5 = a straight fall (back)
    h = np.where(cz < 0, (1.0 - np.abs(cz) ** p_exp) ** (1.0 / p_exp), horiz)
    x = r * h * np.sin(ang)
    y = yc + r * h * np.cos(ang)
    y = np.where(y < -0.02, -0.02 + (y + 0.02) * 0.25, y)  # never in front of the cheeks
    z = np.where(cz >= 0, top + 0.10 * cz, top + (top - bottom) * cz)
    return np.stack([x, y, z], axis=1), faces


# ---------------------------------------------------------------------------------------------
# Blender data.

def _material(name: str, colour: tuple[float, float, float], roughness: float = 0.6) -> bpy.types.Material:
    mat = bpy.data.materials.new(name)
    mat.diffuse_color = (*colour, 1.0)
    mat.roughness = roughness
    if mat.node_tree is None:  # Blender < 5.0 creates materials without nodes
        mat.use_nodes = True
    bsdf = mat.node_tree.nodes.get("Principled BSDF")
    if bsdf is not None:
        bsdf.inputs["Base Color"].default_value = (*colour, 1.0)
        bsdf.inputs["Roughness"].default_value = roughness
    return mat


def _part_colours(p: dict) -> dict[str, tuple[tuple[float, float, float], float]]:
    skin = p["skin_colour"]
    return {
        "Skin": (skin, 0.55),
        "Eye White": ((0.80, 0.78, 0.74), 0.2),
        "Iris": (p["eye_colour"], 0.2),
        "Pupil": ((0.005, 0.005, 0.005), 0.2),
        "Hair": (p["hair_colour"], 0.7),
        "Brow": (tuple(c * 0.8 for c in p["hair_colour"]), 0.8),
        "Lips": ((skin[0] * 0.85, skin[1] * 0.45, skin[2] * 0.45), 0.45),
        "Mouth": ((0.06, 0.01, 0.01), 0.8),
        "Teeth": ((0.80, 0.78, 0.70), 0.3),
        "Cloth": (p["cloth_colour"], 0.8),
    }


def remove_proxy_head(name: str = "Proxy Head") -> bool:
    """Delete the object ``name`` with the mesh and materials it owns; True if something was removed."""
    obj = bpy.data.objects.get(name)
    if obj is None:
        return False
    mesh = obj.data if obj.type == "MESH" else None
    mats = [m for m in (mesh.materials if mesh else []) if m is not None]
    bpy.data.objects.remove(obj, do_unlink=True)
    if mesh is not None and mesh.users == 0:
        bpy.data.meshes.remove(mesh)
    for mat in mats:
        if mat.users == 0:
            bpy.data.materials.remove(mat)
    return True


def anchor_display_size(anchor: bpy.types.Object) -> float:
    """EG3D-unit size in the anchor's local frame (Empty display size; 1 for other objects)."""
    return float(anchor.empty_display_size) if anchor.type == "EMPTY" else 1.0


def build_proxy_head(seed: int, anchor: bpy.types.Object, *, name: str = "Proxy Head",
                     collection: bpy.types.Collection | None = None, neutral: bool = False,
                     symmetric: bool = True) -> bpy.types.Object:
    """Build (or rebuild) the procedural head for ``seed`` parented to ``anchor``.

    The object lands in ``collection`` (default: the anchor's first collection, else the scene's).
    An existing object called ``name`` is replaced, with its mesh and materials.
    """
    if anchor is None or not isinstance(anchor, bpy.types.Object):
        raise ProxyHeadError("a head anchor object is needed: add one with 'Add Head Anchor' first")
    if anchor.name == name:
        raise ProxyHeadError(f"the head anchor is itself called {name!r}; pick another name for the proxy head")
    params = head_params(seed, neutral=neutral, symmetric=symmetric)
    parts = _build_parts(params)

    remove_proxy_head(name)
    verts: list[np.ndarray] = []
    faces: list[tuple[int, ...]] = []
    mat_idx: list[int] = []
    offset = 0
    for part, v, f in parts:
        verts.append(v)
        faces.extend(tuple(i + offset for i in face) for face in f)
        mat_idx.extend([PART_NAMES.index(part)] * len(f))
        offset += len(v)
    all_v = np.concatenate(verts)
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(all_v.tolist(), [], faces)
    mesh.validate(clean_customdata=False)
    mesh.polygons.foreach_set("material_index", mat_idx)
    mesh.polygons.foreach_set("use_smooth", [True] * len(mesh.polygons))
    colours = _part_colours(params)
    for part in PART_NAMES:
        colour, rough = colours[part]
        mesh.materials.append(_material(f"{name} {part}", colour, rough))
    mesh.update()

    obj = bpy.data.objects.new(name, mesh)
    if collection is None:
        collection = anchor.users_collection[0] if anchor.users_collection else bpy.context.scene.collection
    collection.objects.link(obj)
    obj.parent = anchor
    obj.matrix_parent_inverse.identity()
    s = anchor_display_size(anchor)
    obj.scale = (s, s, s)
    obj[PROXY_TAG] = True
    obj["proxy_head_seed"] = int(seed)
    return obj
