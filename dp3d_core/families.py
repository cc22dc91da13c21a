"""Model families (DiffPortrait3D, DiffPortrait360) and how to tell them apart from checkpoint key names.

Torch-free: it works on key names only, so the add-on can read a model folder's family too.

A model folder's ``model_index.json`` names its family (``"family"``; absent = DiffPortrait3D) and, for
DiffPortrait360, which of its two networks it holds (``"variant"``: ``"views"`` or ``"back_head"``).

The official checkpoints of the two families use the SAME key names for their motion (view) modules but at
different places (DiffPortrait360 README quirk V3): ``input_blocks_motion_module.3.0`` sits after input block 3
(a Downsample) in DiffPortrait3D and after input block 5 in DiffPortrait360, with identical shapes. The family
therefore comes from the complete set of motion-module names, never from shapes or file names:

* DiffPortrait3D: a module after every input block 1..11 (incl. the Downsamples), ``middle_block_motion_module``,
  one after every output block plus a second one after each Upsample (27 for 4 levels x 2 ResBlocks);
* DiffPortrait360 view model (``model_state-340000.th``): a module after every ResBlock input block only, no
  middle module, exactly one after every output block (20);
* DiffPortrait360 back-head model (``back_head-230000.th``): no motion modules, and (like the view model) no
  hint encoder in the reference net (``control_model.input_hint_block.*``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

DIFFPORTRAIT3D = "DiffPortrait3D"
DIFFPORTRAIT360 = "DiffPortrait360"
FAMILIES = (DIFFPORTRAIT3D, DIFFPORTRAIT360)
VIEWS = "views"
BACK_HEAD = "back_head"

UNET = "model.diffusion_model."
REFERENCE = "control_model."
POSE = "pose_control_model."
MOTION_MARK = "_motion_module."
REFERENCE_HINT = "control_model.input_hint_block."

_MOTION = re.compile(r"^model\.diffusion_model\.((?:input|output)_blocks_motion_module\.\d+\.\d+|"
                     r"middle_block_motion_module\.\d+)\.")


class FamilyError(ValueError):
    """Checkpoint keys that match no known model family, or not the family asked for."""


@dataclass(frozen=True)
class Family:
    """What a checkpoint (or model folder) holds."""

    name: str                  # DIFFPORTRAIT3D or DIFFPORTRAIT360
    variant: str | None        # DiffPortrait360: VIEWS or BACK_HEAD; DiffPortrait3D: None
    layout: str | None         # view-module layout ("diffportrait3d" / "diffportrait360"), None: no view modules

    def describe(self) -> str:
        if self.name == DIFFPORTRAIT3D:
            return "a DiffPortrait3D model (27 view modules incl. the middle one)"
        if self.variant == BACK_HEAD:
            return "a DiffPortrait360 back-head model (no view modules)"
        return "a DiffPortrait360 view model (20 view modules, no middle one)"

    @property
    def pipeline_class(self) -> str:
        """The pipeline that runs a model folder of this family (``model_index.json``'s ``_class_name``)."""
        if self.name == DIFFPORTRAIT3D:
            return "DiffPortrait3DPipeline"
        return "BackHeadPipeline" if self.variant == BACK_HEAD else "DiffPortrait360Pipeline"

    def index_fields(self) -> dict[str, str]:
        """The ``model_index.json`` fields that name this family."""
        fields = {"family": self.name}
        if self.variant is not None:
            fields["variant"] = self.variant
        return fields


FAMILY_3D = Family(DIFFPORTRAIT3D, None, "diffportrait3d")
FAMILY_360_VIEWS = Family(DIFFPORTRAIT360, VIEWS, "diffportrait360")
FAMILY_360_BACK_HEAD = Family(DIFFPORTRAIT360, BACK_HEAD, None)


def expected_motion_modules(layout: str, levels: int, layers: int) -> set[str]:
    """Official motion-module names (without the UNet prefix) of a layout, for ``levels`` x ``layers`` ResBlocks."""
    if layout == "diffportrait3d":
        down = levels * layers + levels - 1
        names = {f"input_blocks_motion_module.{k}.0" for k in range(down)} | {"middle_block_motion_module.0"}
        for i in range(levels * (layers + 1)):
            names.add(f"output_blocks_motion_module.{i}.0")
            if i % (layers + 1) == layers and i < (levels - 1) * (layers + 1):  # block ending in an Upsample
                names.add(f"output_blocks_motion_module.{i}.1")
        return names
    if layout == "diffportrait360":
        return ({f"input_blocks_motion_module.{k}.0" for k in range(levels * layers)}
                | {f"output_blocks_motion_module.{i}.0" for i in range(levels * (layers + 1))})
    raise ValueError(f"unknown view-module layout {layout!r}")


def unet_levels(keys: Iterable[str]) -> tuple[int, int]:
    """(levels, ResBlocks per level) of the official UNet, from its input-block key names."""
    blocks, downsamples = set(), set()
    for k in keys:
        m = re.match(r"^model\.diffusion_model\.input_blocks\.(\d+)\.(\d+)\.(op\.)?", k)
        if m:
            blocks.add(int(m.group(1)))
            if m.group(3):
                downsamples.add(int(m.group(1)))
    if not blocks:
        raise FamilyError("no 'model.diffusion_model.input_blocks.*' keys: not a DiffPortrait checkpoint")
    if not downsamples:
        return 1, max(blocks)
    layers = min(downsamples) - 1
    return len(downsamples) + 1, layers


def _expected() -> str:
    return ("a DiffPortrait3D checkpoint (model_state-540000-001.th) or a DiffPortrait360 one (model_state-340000.th "
            "or back_head-230000.th): the UNet under 'model.diffusion_model.', the appearance/reference net under "
            "'control_model.' and the camera ControlNet under 'pose_control_model.'")


def detect_family(keys: Iterable[str]) -> Family:
    """The family of an official checkpoint from its key names; :class:`FamilyError` when it matches none."""
    keys = list(keys)
    has = {p: any(k.startswith(p) for k in keys) for p in (UNET, REFERENCE, POSE)}
    motion = {m.group(1) for k in keys if (m := _MOTION.match(k))}
    stray_motion = [k for k in keys if MOTION_MARK in k and not _MOTION.match(k)]
    if has[UNET] and not (has[REFERENCE] or has[POSE] or motion):
        raise FamilyError(f"this looks like a plain Stable Diffusion checkpoint (only 'model.diffusion_model.' UNet "
                          f"weights, no reference net, camera ControlNet or view modules); expected {_expected()}")
    if has[REFERENCE] and not has[UNET]:
        raise FamilyError(f"this looks like a stand-alone ControlNet checkpoint; expected {_expected()}")
    if not (has[UNET] and has[REFERENCE] and has[POSE]):
        missing = [p for p, ok in has.items() if not ok]
        sample = ", ".join(keys[:3])
        raise FamilyError(f"not a DiffPortrait3D checkpoint (nor a DiffPortrait360 one): no {', '.join(missing)} "
                          f"keys (first keys: {sample}); expected {_expected()}")
    if stray_motion:
        raise FamilyError(f"unrecognised motion-module keys (e.g. {stray_motion[0]}); expected {_expected()}")
    hint = any(k.startswith(REFERENCE_HINT) for k in keys)
    if not motion:
        if hint:
            raise FamilyError("this checkpoint has a DiffPortrait3D reference net (with a hint encoder) but no view "
                              "modules ('*_motion_module.*'); it is incomplete")
        return FAMILY_360_BACK_HEAD
    levels, layers = unet_levels(keys)
    for family in (FAMILY_3D, FAMILY_360_VIEWS):
        if motion == expected_motion_modules(family.layout, levels, layers):
            return family
    closest = min((FAMILY_3D, FAMILY_360_VIEWS),
                  key=lambda f: len(motion ^ expected_motion_modules(f.layout, levels, layers)))
    want = expected_motion_modules(closest.layout, levels, layers)
    extra, lacking = sorted(motion - want), sorted(want - motion)
    counts = [len(expected_motion_modules(f.layout, levels, layers)) for f in (FAMILY_3D, FAMILY_360_VIEWS)]
    raise FamilyError(f"the checkpoint's {len(motion)} motion modules match neither DiffPortrait3D ({counts[0]}) nor "
                      f"DiffPortrait360 ({counts[1]}); closest is {closest.describe()}, but it "
                      + (f"lacks {', '.join(lacking[:4])}" if lacking else "")
                      + (" and " if lacking and extra else "")
                      + (f"has extra {', '.join(extra[:4])}" if extra else "")
                      + ". Loading it anyway would put view modules in the wrong places.")


def check_family(found: Family, expected_name: str | None) -> None:
    """A :class:`FamilyError` when ``expected_name`` (a family name, if given) is not what the keys say."""
    if expected_name is None:
        return
    if expected_name not in FAMILIES:
        raise FamilyError(f"unknown model family {expected_name!r}; choose one of {', '.join(FAMILIES)}")
    if found.name != expected_name:
        raise FamilyError(f"this checkpoint is {found.describe()}, not a {expected_name} checkpoint (its keys say so); "
                          f"convert it as {found.name}, or pick the {expected_name} checkpoint")


def family_from_index(index: dict[str, Any]) -> Family:
    """The family of a model folder from its ``model_index.json`` (absent ``family``: DiffPortrait3D)."""
    name = index.get("family", DIFFPORTRAIT3D)
    if name == DIFFPORTRAIT3D:
        return FAMILY_3D
    if name == DIFFPORTRAIT360:
        variant = index.get("variant", VIEWS)
        if variant == VIEWS:
            return FAMILY_360_VIEWS
        if variant == BACK_HEAD:
            return FAMILY_360_BACK_HEAD
        raise FamilyError(f"unknown DiffPortrait360 variant {variant!r} in model_index.json; expected "
                          f"{VIEWS!r} or {BACK_HEAD!r}")
    raise FamilyError(f"unknown model family {name!r} in model_index.json; this version knows {', '.join(FAMILIES)}")
