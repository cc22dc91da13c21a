"""Multi-view training data in EG3D form.

Layout of a dataset root (see docs/TRAINING.md)::

    dataset.json                 {"labels": [["<identity>/<view>.png", [25 floats]], ...]}
    <identity>/<view>.png        the views of each identity
    cond/<identity>/<view>.png   condition image of that view: a DIFFERENT identity at the same camera

The identity is the first path component. A sample is one identity: a reference view and up to
``num_targets`` other views of it (random order), their condition images and labels.

A missing or unreadable image never stops training: it is reported once (path and reason, via
``logging`` and :attr:`MultiViewDataset.problems`) and the view is left out from then on.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dp3d_core.cameras import CameraError, from_label, to_label, yaw_pitch_from_cam2world

log = logging.getLogger(__name__)

CONDITION_DIR = "cond"
PROXY_DIR = "proxy"  # optional 3D-aware proxy views (training.render_dataset --proxies), read by training.evaluate
DATASET_FILE = "dataset.json"
MODES = ("any", "back", "dual")
FRONT_MAX_YAW = 20.0    # degrees: the reference of modes back/dual must be this close to frontal
BACK_MIN_YAW = 160.0    # degrees: and the back view this close to straight behind


class DatasetError(ValueError):
    """A dataset that cannot be used at all; the message says what to fix."""


class ImageLoadError(Exception):
    """One image that cannot be read (missing, truncated, not an image); ``key`` names it in reports."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.key = key


@dataclass
class View:
    path: str                      # relative to the root, e.g. "id0003/v02.png"
    label: np.ndarray              # (25,) float64
    has_condition: bool = True


@dataclass
class Identity:
    name: str
    views: list[View] = field(default_factory=list)


def normalize_label(label: Any, where: str) -> np.ndarray:
    """A label as (25,) float64, checked (and round-tripped) through ``dp3d_core.cameras``."""
    try:
        cam2world, intrinsics = from_label(label)
    except CameraError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return to_label(cam2world, intrinsics)


def read_labels(root: str | Path) -> list[tuple[str, np.ndarray]]:
    """The ``(relative path, label)`` entries of ``root/dataset.json``, validated."""
    root = Path(root)
    path = root / DATASET_FILE
    if not path.is_file():
        raise DatasetError(f"no {DATASET_FILE} in {root}; a dataset root holds dataset.json plus the images "
                           f"(make one with: python -m training.render_dataset --out DIR)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not readable JSON: {exc}") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list):
        raise DatasetError(f"{path} must hold an object with a 'labels' list of [path, [25 numbers]] pairs")
    out = []
    for i, entry in enumerate(labels):
        where = f"{path} entry {i}"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f"{where}: expected [\"<identity>/<view>.png\", [25 numbers]], got {entry!r:.80}")
        rel = entry[0].replace("\\", "/")
        if "/" not in rel or rel.startswith("/") or ".." in rel.split("/"):
            raise DatasetError(f"{where}: image path {rel!r} must be '<identity>/<view>.png' inside the root")
        out.append((rel, normalize_label(entry[1], where)))
    return out


def write_labels(root: str | Path, entries: list[tuple[str, Any]]) -> Path:
    """Write ``root/dataset.json`` (labels as plain float lists)."""
    path = Path(root) / DATASET_FILE
    data = {"labels": [[rel, [float(x) for x in np.asarray(label, dtype=np.float64).reshape(-1)]]
                       for rel, label in entries]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def load_image(path: Path, size: int) -> torch.Tensor:
    """An RGB image as float32 ``[3, size, size]`` in [-1, 1]; raises :class:`ImageLoadError`."""
    if not path.is_file():
        raise ImageLoadError(f"missing image {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BICUBIC)
    a = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


class MultiViewDataset(torch.utils.data.Dataset):
    """One item per identity: ``reference`` [3,S,S], ``targets`` [T,3,S,S], ``conditions`` [T,3,S,S] (images in
    [-1, 1]), ``labels`` [T,25], ``reference_label`` [25], ``identity`` (str).

    ``num_targets`` T views are drawn without replacement from the identity's other views (with replacement
    when it has fewer). ``need_conditions``: only views with a condition image can be targets. Draws come
    from a generator seeded by ``(seed, index, epoch)``, so an item is reproducible; :meth:`sample` takes
    an explicit generator instead. ``cache_images``: keep every decoded image in memory after its first read
    (for small datasets; 48 KiB per 64 px image).
    """

    def __init__(self, root: str | Path, size: int = 64, num_targets: int = 1, need_conditions: bool = True,
                 seed: int = 0, cache_images: bool = False, mode: str = "any") -> None:
        self.root = Path(root)
        if mode not in MODES:
            raise DatasetError(f"unknown dataset mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self._images: dict[str, torch.Tensor] | None = {} if cache_images else None
        if int(num_targets) < 1:
            raise DatasetError(f"num_targets must be at least 1, got {num_targets}")
        self.size = int(size)
        self.num_targets = int(num_targets)
        self.need_conditions = bool(need_conditions)
        self.seed = int(seed)
        self.epoch = 0
        self.problems: dict[str, str] = {}
        self._bad: set[str] = set()
        by_name: dict[str, Identity] = {}
        for rel, label in read_labels(self.root):
            name = rel.split("/", 1)[0]
            if not (self.root / rel).is_file():
                self._report(rel, f"missing image {self.root / rel}")
                continue
            has_cond = (self.root / CONDITION_DIR / rel).is_file()
            if not has_cond and self.need_conditions:
                self._report(f"{CONDITION_DIR}/{rel}",
                             f"missing condition image {self.root / CONDITION_DIR / rel}; view not used as a target")
            by_name.setdefault(name, Identity(name)).views.append(View(rel, label, has_cond))
        if mode != "any":
            for ident in by_name.values():
                if self._front_back(ident) is None:
                    self._report(ident.name, f"identity {ident.name} has no frontal view (|yaw| <= {FRONT_MAX_YAW:g} "
                                             f"degrees) and back view (|yaw| >= {BACK_MIN_YAW:g}), which stage "
                                             f"'{mode}' needs (render with --full-turn); identity not used")
        self.identities = [ident for ident in by_name.values() if self._usable(ident)]
        if not self.identities:
            need = (" with condition images" if self.need_conditions else "") + (
                ", a frontal view and a back view (render with training.render_dataset --full-turn)"
                if mode != "any" else "")
            raise DatasetError(f"{self.root}: no identity has at least two readable views{need}; "
                               f"{len(self.problems)} problem(s): {'; '.join(list(self.problems.values())[:3])}")

    # ------------------------------------------------------------------ bookkeeping
    def _report(self, rel: str, message: str) -> None:
        self._bad.add(rel)
        if rel not in self.problems:
            self.problems[rel] = message
            log.warning("dataset: %s (skipped)", message)

    def _targets_of(self, ident: Identity) -> list[View]:
        return [v for v in ident.views if v.path not in self._bad
                and (not self.need_conditions or (v.has_condition and f"{CONDITION_DIR}/{v.path}" not in self._bad))]

    def _front_back(self, ident: Identity) -> tuple[View, View] | None:
        """(frontal view, back view) of an identity by camera yaw, or None when it lacks either."""
        good = [v for v in ident.views if v.path not in self._bad]
        if len(good) < 2:
            return None
        yaw = {v.path: abs(yaw_pitch_from_cam2world(from_label(v.label)[0])[0]) for v in good}
        front = min(good, key=lambda v: (yaw[v.path], v.path))
        back = max(good, key=lambda v: (yaw[v.path], v.path))
        if yaw[front.path] > FRONT_MAX_YAW or yaw[back.path] < BACK_MIN_YAW:
            return None
        return front, back

    def _usable(self, ident: Identity) -> bool:
        if ident.name in self._bad:
            return False
        good = [v for v in ident.views if v.path not in self._bad]
        if len(good) < 2 or not self._targets_of(ident):
            return False
        if self.mode == "any":
            return True
        pair = self._front_back(ident)
        if pair is None:
            return False
        if self.mode == "back":
            return any(v.path == pair[1].path for v in self._targets_of(ident))
        return True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.identities)

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, int(index), self.epoch))
        return self.sample(index, rng)

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """The item for identity ``index``; skips (and reports) unreadable images, moving on to the next
        identity when one has run out of usable views."""
        count = len(self.identities)
        for offset in range(count):
            ident = self.identities[(int(index) + offset) % count]
            while self._usable(ident):
                try:
                    return self._build(ident, rng)
                except ImageLoadError as exc:
                    self._report(exc.key, exc.message)
        raise DatasetError(f"{self.root}: every identity has run out of readable views; problems: "
                           f"{'; '.join(list(self.problems.values())[:5])}")

    def _load(self, rel: str) -> torch.Tensor:
        if self._images is not None and rel in self._images:
            return self._images[rel]
        try:
            image = load_image(self.root / rel, self.size)
        except ImageLoadError as exc:
            raise ImageLoadError(exc.message, rel) from None
        if self._images is not None:
            self._images[rel] = image
        return image

    def _build(self, ident: Identity, rng: np.random.Generator) -> dict[str, Any]:
        if self.mode != "any":
            return self._build_360(ident, rng)
        candidates = self._targets_of(ident)
        good = [v for v in ident.views if v.path not in self._bad]
        target_idx = rng.permutation(len(candidates))
        # reference: any good view; prefer one that is not among the first targets
        reference = good[int(rng.integers(len(good)))]
        others = [candidates[i] for i in target_idx if candidates[i].path != reference.path]
        if not others:
            others = [candidates[i] for i in target_idx]
        if len(others) >= self.num_targets:
            targets = others[:self.num_targets]
        else:
            targets = others + [others[int(i)] for i in rng.integers(len(others), size=self.num_targets - len(others))]
        ref_img = self._load(reference.path)
        imgs = [self._load(v.path) for v in targets]
        conds = [self._load(f"{CONDITION_DIR}/{v.path}") if v.has_condition else torch.zeros_like(ref_img)
                 for v in targets]
        return {
            "identity": ident.name,
            "reference": ref_img,
            "reference_path": reference.path,
            "reference_label": torch.from_numpy(reference.label.astype(np.float32)),
            "targets": torch.stack(imgs),
            "conditions": torch.stack(conds),
            "labels": torch.from_numpy(np.stack([v.label for v in targets]).astype(np.float32)),
            "paths": [v.path for v in targets],
        }


    def _build_360(self, ident: Identity, rng: np.random.Generator) -> dict[str, Any]:
        """Modes back/dual: the reference is the frontal view; mode back: the target is the back view (its
        condition image = the back camera's); mode dual: the back view is the second reference and the targets
        are ``num_targets`` views in a row by yaw (every view can be one, the front and back included)."""
        front, back = self._front_back(ident)
        if self.mode == "back":
            targets = [back] * self.num_targets
        else:
            # a continuous view sequence (DiffPortrait360): consecutive views by yaw around the circle from a
            # random start, in order of yaw (wrapping past 180 degrees; repeating when there are too few)
            around = sorted(self._targets_of(ident),
                            key=lambda v: (yaw_pitch_from_cam2world(from_label(v.label)[0])[0], v.path))
            start = int(rng.integers(len(around)))
            targets = [around[(start + k) % len(around)] for k in range(self.num_targets)]
        ref_img = self._load(front.path)
        item = {
            "identity": ident.name,
            "reference": ref_img,
            "reference_path": front.path,
            "reference_label": torch.from_numpy(front.label.astype(np.float32)),
            "targets": torch.stack([self._load(v.path) for v in targets]),
            "conditions": torch.stack([self._load(f"{CONDITION_DIR}/{v.path}") for v in targets]),
            "labels": torch.from_numpy(np.stack([v.label for v in targets]).astype(np.float32)),
            "paths": [v.path for v in targets],
        }
        if self.mode == "dual":
            item["back_reference"] = self._load(back.path)
            item["back_reference_path"] = back.path
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch (tensors gain a leading batch axis; strings become lists)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def global_indices(dataset_len: int, step: int, batch_size: int, seed: int = 0) -> list[int]:
    """The identities of micro-batch ``step``'s global batch: consecutive slots of a stream that visits every
    identity once per epoch in an order shuffled per epoch (a pure function of (seed, step))."""
    n = max(int(dataset_len), 1)
    out, orders = [], {}
    for slot in range(int(step) * int(batch_size), (int(step) + 1) * int(batch_size)):
        epoch = slot // n
        if epoch not in orders:
            orders[epoch] = np.random.default_rng((int(seed), 104729, epoch)).permutation(n)
        out.append(int(orders[epoch][slot % n]))
    return out


def shard(batch_size: int, rank: int, world: int) -> range:
    """The positions of the global batch that process ``rank`` of ``world`` trains (contiguous, disjoint)."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by the {world} processes")
    per = batch_size // world
    return range(rank * per, (rank + 1) * per)


def batch_for_step(dataset: MultiViewDataset, step: int, batch_size: int, seed: int = 0,
                   positions: range | None = None) -> dict[str, Any]:
    """The batch of micro-batch ``step`` (``batch_size``: the global batch), or only its ``positions`` (this
    process's shard). Sample j of the global batch draws its views from a generator seeded by (seed, step, j),
    so a resumed run, and any split over processes, sees exactly the samples one uninterrupted process would."""
    indices = global_indices(len(dataset), step, batch_size, seed)
    positions = range(batch_size) if positions is None else positions
    return collate([dataset.sample(indices[j], np.random.default_rng((int(seed), 7919, int(step), j)))
                    for j in positions])


def split_counts(num_identities: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) identity counts: at least one test identity when there are two or more."""
    test = int(math.ceil(num_identities * float(test_fraction))) if num_identities > 1 else 0
    test = min(max(test, 1 if num_identities > 1 else 0), num_identities - 1) if num_identities > 1 else 0
    return num_identities - test, test
