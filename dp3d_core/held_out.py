"""Which views of a multi-view dataset (EG3D ``dataset.json`` labels) form a held-out test window.

Shared by ``training.evaluate`` and ``dp3d_core.scheduler_steps``: per identity (the first path component),
sorted by name, the reference is the identity's first view by path (``v00``, frontal in our datasets) and the
targets are the next ``views`` views, sorted by camera yaw. Torch-free.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from .cameras import from_label, yaw_pitch_from_cam2world


def label_yaw(label: Sequence[float]) -> float:
    """Camera yaw in degrees of a 25-float label (0 = frontal, > 0 toward +X)."""
    return yaw_pitch_from_cam2world(from_label(label)[0])[0]


def reference_and_targets(labels: Iterable[tuple[str, Sequence[float]]],
                          views: int) -> Iterator[tuple[str, str, list[str]]]:
    """``(identity, reference path, target paths)`` for every identity with at least ``views + 1`` views."""
    by_id: dict[str, list[tuple[str, Sequence[float]]]] = {}
    for rel, label in labels:
        by_id.setdefault(str(rel).split("/")[0], []).append((str(rel), label))
    for name in sorted(by_id):
        entries = sorted(by_id[name], key=lambda e: e[0])
        if len(entries) < views + 1:
            continue
        targets = sorted(entries[1:1 + views], key=lambda e: label_yaw(e[1]))
        yield name, entries[0][0], [rel for rel, _ in targets]
