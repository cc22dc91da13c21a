"""Everything knowable before the expensive work, checked in one pass (stdlib only: Blender imports it too).

The worker runs :func:`check_plan` before it imports torch or loads the model; the add-on and the command line
run the same checks before they render anything or write into the output folder. A check that fails raises
:class:`PreflightError` (one sentence of what is wrong, one of what to do); a doubtful setting becomes a warning.

Checked, cheapest first:

- the output folder can be created and written (a probe file, removed again; folders the probe had to create
  are removed too, so a failed check leaves nothing behind);
- every frame name is legal and, with the worker's temporary-name overhead, within the file system's name
  and path limits;
- the model folder holds weights in safetensors only (never a pickle), and the job's window equals the model's
  clip length (read from the configs, not the weights); a size beyond what the model was trained for is a warning;
- the job fits the model's family: a DiffPortrait360 model needs one reference and a back view (a given image,
  or a back-head model in ``<model>/back_head/`` to generate it); a DiffPortrait3D model ignores a back view
  (a warning);
- the images named up front (reference, condition folder) can be decoded;
- enough free disk for the frames (and the job's own condition images);
- a memory estimate for the size on the chosen device, a warning when it will not fit.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .failures import Failure, clip, translate
from .families import BACK_HEAD, DIFFPORTRAIT3D, DIFFPORTRAIT360, FamilyError, family_from_index

PROBE_NAME = ".portrait3d_write_probe"
# The worker writes each frame as ".<name>.<12 hex>.tmp" first (dp3d_core.protocol.write_atomic).
TEMP_NAME_OVERHEAD = len(".") + len(".0123456789ab.tmp")
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096 if os.name != "nt" else 260
CLIP_LENGTH = 8  # dp3d_core.models.config.CLIP_LENGTH (kept here: that module imports torch)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NETWORK_FOLDERS = ("unet", "reference_unet", "view_controlnet", "view_modules", "vae", "prompt_embedding")
BACK_HEAD_FOLDER = "back_head"  # a DiffPortrait360 model folder holds its back-head model here
# Plan.back: how a job gets its back view (None: it has none)
BACK_GENERATE = "generate"  # the worker makes it with the back-head model
BACK_IMAGE = "image"        # the job names the image
DISK_MARGIN = 16 << 20  # bytes kept free beyond the estimate
# Activation elements per view-pixel for an SD-1.5-width network (320 base channels), fitted to the measured
# peak of one 8-view window at 512 px in fp16 (docs/PERFORMANCE.md: 9.97 GiB normal, 7.53 GiB low).
ACTIVATIONS_PER_PIXEL = {"normal": 1250.0, "low": 620.0, "lowest": 620.0}
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class PreflightError(ValueError):
    """A problem found before any work; ``message`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} {hint}")
        self.message = message
        self.hint = hint

    @classmethod
    def from_failure(cls, failure: Failure) -> "PreflightError":
        return cls(failure.message, failure.hint)


# ---------------------------------------------------------------- output folder and names

def existing_ancestor(path: Path) -> Path:
    """The nearest folder or file on ``path``'s chain that exists (``path`` itself when it exists)."""
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def probe_output_folder(folder: str | os.PathLike) -> Path:
    """Prove that ``folder`` can be created and written; leave the disk as it was. Returns it absolute."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    base = existing_ancestor(out)
    if not base.is_dir():
        if base.is_symlink():
            raise PreflightError(f"Cannot write to the output folder {clip(out)}: {clip(base)} is a symbolic link "
                                 "that leads nowhere (broken, or a loop).",
                                 "Choose another output folder, or repair that link.")
        raise PreflightError(f"Cannot write to the output folder {clip(out)}: {clip(base)} is a file, "
                             "not a folder.", "Choose another output folder, or move that file away.")
    created: list[Path] = []
    probe = out / PROBE_NAME
    try:
        for part in reversed([p for p in [out, *out.parents] if not os.path.lexists(p)]):
            os.mkdir(part)
            created.append(part)
        if not out.is_dir():
            raise PreflightError(f"Cannot write to the output folder {clip(out)}: it is a file, not a folder.",
                                 "Choose a folder (or a new name) as the output folder.")
        with open(probe, "xb") as f:
            f.write(b"probe")
    except FileExistsError:  # a stale probe from a killed run: writable enough to be replaced
        pass
    except OSError as exc:
        failure = translate(exc)
        raise PreflightError(f"Cannot write to the output folder {clip(out)}: {failure.message}", failure.hint) \
            from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
        for part in reversed(created):
            try:
                os.rmdir(part)
            except OSError:
                pass
    return out


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(existing_ancestor(folder), name))
    except (OSError, ValueError, AttributeError):
        return default


def check_frame_names(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Every name is a legal file name inside ``folder`` within the file system's limits (temp name included)."""
    out = Path(os.path.abspath(folder))
    name_max = _limit(out, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    path_max = _limit(out, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    for name in names:
        shown = clip(name, 80)
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or any(ord(c) < 32 for c in name):
            raise PreflightError(f"The frame name {shown!r} is not a plain file name.",
                                 "Use a frame pattern such as 'frame_{scene_frame:04d}.png'.")
        if os.name == "nt" and (name.split(".")[0].upper() in _WINDOWS_RESERVED or name[-1] in " ." or
                                any(c in name for c in '<>:"|?*')):
            raise PreflightError(f"The frame name {shown!r} is not allowed on Windows.",
                                 "Use a frame pattern such as 'frame_{scene_frame:04d}.png'.")
        size = len(os.fsencode(name))
        if size + TEMP_NAME_OVERHEAD > name_max:
            raise PreflightError(
                f"The frame name {shown!r} is too long for this file system: {size} bytes, of at most "
                f"{name_max - TEMP_NAME_OVERHEAD} for a frame (its temporary name needs {TEMP_NAME_OVERHEAD} more).",
                "Use a shorter frame name pattern.")
        if (out / name).is_dir():
            raise PreflightError(f"The frame path {clip(out / name, 120)} is a folder, so the frame cannot be "
                                 "written there.", "Remove or rename that folder, or choose another output folder.")
        full = len(os.fsencode(str(out / name))) + TEMP_NAME_OVERHEAD
        if full > path_max:
            raise PreflightError(f"The frame path {clip(out / name, 120)} is {full} bytes long with its temporary "
                                 f"name; this system allows {path_max}.",
                                 "Choose an output folder with a shorter path, or a shorter frame name pattern.")


# ---------------------------------------------------------------- model folder (configs only)

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        failure = translate(exc)
        raise PreflightError(f"The model file {clip(path)} cannot be read: {failure.message}", failure.hint) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PreflightError(f"The model file {clip(path)} is not valid JSON.",
                             "Convert or download the model again into an empty folder.") from None
    return data if isinstance(data, dict) else {}


@dataclass
class ModelInfo:
    """What the configs of a model folder say (no weights read)."""

    path: Path
    family: str = DIFFPORTRAIT3D        # "DiffPortrait3D" or "DiffPortrait360" (model_index.json)
    variant: str | None = None          # DiffPortrait360: "views" or "back_head"
    back_head: bool = False             # a DiffPortrait360 view model with a usable back_head/ model folder inside
    back_head_problem: str | None = None  # why back_head/ cannot be used, when it exists but is not a back-head model
    clip_length: int = CLIP_LENGTH
    trained_size: int | None = None     # pixels: unet sample_size x the VAE's scale factor
    base_channels: int = 320
    parameters: int = 0                 # from the safetensors headers
    largest_component: int = 0          # parameters of the biggest network (what offload keeps on the GPU)
    weight_files: list[Path] = field(default_factory=list)


def _safetensors_parameters(path: Path) -> int:
    """Number of values in a safetensors file, from its JSON header (a few KB read; never the tensors)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error, RecursionError):
        raise PreflightError(f"The weight file {clip(path)} is damaged (its safetensors header cannot be read).",
                             "Convert or download the model again into an empty folder.") from None
    return sum(math.prod(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))


def read_model_info(folder: str | os.PathLike) -> ModelInfo:
    """Configs and weight formats of a model folder; PreflightError for a missing folder or pickled weights."""
    path = Path(folder)
    if not path.is_dir():
        raise PreflightError(f"The model folder {clip(path)} does not exist.",
                             "Set the model folder to a converted DiffPortrait3D model (the folder that holds "
                             "model_index.json).")
    if not (path / "model_index.json").is_file():
        raise PreflightError(f"{clip(path)} is not a DiffPortrait3D model folder (it has no model_index.json).",
                             "Choose the folder that holds model_index.json, or convert the official checkpoint "
                             "into a fresh folder.")
    try:
        family = family_from_index(_read_json(path / "model_index.json"))
    except FamilyError as exc:
        raise PreflightError(f"The model folder {clip(path)} cannot be used: {exc}.",
                             "Update the add-on and the worker, or choose another model folder.") from None
    info = ModelInfo(path, family=family.name, variant=family.variant)
    if family.name == DIFFPORTRAIT360 and family.variant != BACK_HEAD:
        info.back_head_problem = _back_head_problem(path / BACK_HEAD_FOLDER)
        info.back_head = (path / BACK_HEAD_FOLDER).is_dir() and info.back_head_problem is None
    for name in NETWORK_FOLDERS:
        sub = path / name
        if not sub.is_dir():
            continue
        safe = sorted(sub.glob("*.safetensors"))
        pickles = sorted(p for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not safe:
            raise PreflightError(
                f"The model component {name}/ holds only pickled weights ({pickles[0].name}); pickles can run "
                "code when loaded, so they are refused.",
                f"Convert them once with `python -m dp3d_core.convert_pickles {clip(path)}` (it loads them with "
                "weights_only=True and writes .safetensors beside them), or convert the official checkpoint again.")
        params = sum(_safetensors_parameters(p) for p in safe)
        info.parameters += params
        info.largest_component = max(info.largest_component, params)
        info.weight_files += safe
    view = _read_json(path / "view_modules" / "config.json")
    if isinstance(view.get("clip_length"), int) and view["clip_length"] > 0:
        info.clip_length = view["clip_length"]
    unet = _read_json(path / "unet" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    channels = unet.get("block_out_channels")
    if isinstance(channels, list) and channels and isinstance(channels[0], int):
        info.base_channels = channels[0]
    info.trained_size = _trained_size(unet, vae)
    return info


def _back_head_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a DiffPortrait360 back-head model folder (None: it is one, or it does not exist)."""
    if not folder.is_dir():
        return None if not os.path.lexists(folder) else f"{clip(folder)} is not a folder"
    index = folder / "model_index.json"
    if not index.is_file():
        return f"{clip(folder)} has no model_index.json"
    try:
        family = family_from_index(_read_json(index))
    except (FamilyError, PreflightError) as exc:
        return f"{clip(index)} cannot be read ({exc})"
    if family.name != DIFFPORTRAIT360 or family.variant != BACK_HEAD:
        return f"{clip(folder)} holds {family.describe()}, not the DiffPortrait360 back-head model"
    return None


def _trained_size(unet: dict, vae: dict) -> int | None:
    """Pixels: the UNet's sample_size x the VAE's scale factor (2 per VAE block after the first; 8 by default)."""
    vae_blocks = vae.get("block_out_channels")
    factor = 2 ** (len(vae_blocks) - 1) if isinstance(vae_blocks, list) and vae_blocks else 8
    size = unet.get("sample_size")
    return size * factor if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def trained_size(folder: str | os.PathLike) -> int | None:
    """The output size a model folder was trained at, from its configs only (the model list and the add-on's
    'Model's Resolution' read it here); None when the configs are missing, unreadable or do not say."""
    path = Path(folder)
    try:
        return _trained_size(_read_json(path / "unet" / "config.json"), _read_json(path / "vae" / "config.json"))
    except PreflightError:
        return None


def check_model(info: ModelInfo, window: int | None, size: int) -> list[str]:
    """Window against the model's clip length (error); size against its training size (warning)."""
    if window is not None and window != info.clip_length:
        raise PreflightError(f"The window is {window} views but this model denoises clips of exactly "
                             f"{info.clip_length} views.", f"Set the window to {info.clip_length} (settings.window "
                             "in job.json).")
    if info.trained_size and size > info.trained_size:
        return [f"The output size {size} px is larger than this model was trained for ({info.trained_size} px): "
                "expect repeated or smeared features; use "
                f"{info.trained_size} px for its best result."]
    return []


def check_family(info: ModelInfo, back: str | None, references: int = 1) -> list[str]:
    """The job against the model's family (``back``: None, BACK_GENERATE or BACK_IMAGE); returns warnings."""
    if info.variant == BACK_HEAD:
        raise PreflightError(f"The model folder {clip(info.path)} holds DiffPortrait360's back-head model, which "
                             "makes only the back view.",
                             "Choose the DiffPortrait360 view model folder; the back-head model belongs in its "
                             "back_head/ subfolder.")
    if info.family != DIFFPORTRAIT360:
        if back is not None:
            return ["The job has a back view, but this DiffPortrait3D model uses the front photo only; the back "
                    "view is ignored (choose a DiffPortrait360 model folder to use it)."]
        return []
    if references != 1:
        raise PreflightError(f"DiffPortrait360 takes one front photo, but the job names {references} references.",
                             "Keep one front photo; a photo of the back of the head goes in as the back view.")
    if back is None:
        raise PreflightError("This DiffPortrait360 model needs a view of the back of the head, and the job has "
                             "none.", "Generate the back view (or use your own photo of the back of the head) in "
                             "the add-on's panel, then generate again.")
    if back == BACK_GENERATE and not info.back_head:
        why = (f" ({info.back_head_problem})" if info.back_head_problem else
               f" (it has no {BACK_HEAD_FOLDER}/ folder)")
        raise PreflightError(f"The back view is to be generated, but the model folder {clip(info.path)} holds no "
                             f"back-head model{why}.",
                             "Use your own photo of the back of the head instead, or convert DiffPortrait360's "
                             "back_head-230000.th into the back_head/ folder inside the model folder "
                             "(python -m dp3d_core.convert back_head-230000.th MODEL/back_head).")
    if back == BACK_GENERATE:
        read_model_info(info.path / BACK_HEAD_FOLDER)  # pickled or damaged weights are refused here too
    return []


# ---------------------------------------------------------------- images

def image_header(path: str | os.PathLike) -> tuple[str, int | None, int | None] | None:
    """(format, width, height) from the file header, without decoding pixels; None when not an image we read.

    Formats: PNG, JPEG, GIF, BMP, WebP, HEIF (HEIC) and AVIF (sizes read) and TIFF (size not read). These are
    the ones the worker decodes (HEIF with pi-heif); Blender reads more (EXR, HDR), which the worker could not,
    and fewer (no HEIF, no AVIF).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head[4:8] == b"ftyp":
                return _heif_header(f, head)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return "PNG", w, h
            if head[:6] in (b"GIF87a", b"GIF89a"):
                w, h = struct.unpack("<HH", head[6:10])
                return "GIF", w, h
            if head[:2] == b"BM" and len(head) >= 26:
                w, h = struct.unpack("<ii", head[18:26])
                return "BMP", abs(w), abs(h)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                kind = head[12:16]
                f.seek(20)
                data = f.read(10)
                if kind == b"VP8 " and len(data) >= 10:
                    w, h = struct.unpack("<HH", data[6:10])
                    return "WEBP", w & 0x3FFF, h & 0x3FFF
                if kind == b"VP8L" and len(data) >= 5:
                    bits = int.from_bytes(data[1:5], "little")
                    return "WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
                if kind == b"VP8X" and len(data) >= 10:
                    return "WEBP", int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1
                return "WEBP", None, None
            if head[:4] in (b"II*\x00", b"MM\x00*"):
                return "TIFF", None, None
            if head[:2] != b"\xff\xd8":
                return None
            f.seek(2)
            while True:
                marker = f.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                kind = marker[1]
                if kind in (0xD8, 0x01, 0xFF) or 0xD0 <= kind <= 0xD7:
                    if kind == 0xFF:
                        f.seek(-1, os.SEEK_CUR)
                    continue
                length_bytes = f.read(2)
                if len(length_bytes) < 2:
                    return None
                length = struct.unpack(">H", length_bytes)[0]
                if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
                    data = f.read(5)
                    if len(data) < 5:
                        return None
                    h, w = struct.unpack(">HH", data[1:5])
                    return "JPEG", w, h
                f.seek(length - 2, os.SEEK_CUR)
    except (OSError, struct.error):
        return None


_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def _heif_header(f, head: bytes) -> tuple[str, int | None, int | None] | None:
    """An ISO-BMFF file (``ftyp`` box first): ("HEIF" | "AVIF", width, height) as displayed, or None for
    other brands (MP4, QuickTime). The size is the largest ``ispe`` (image spatial extent) property: the
    primary image's, since tiles and thumbnails are smaller; a 90/270-degree ``irot`` swaps it."""
    box = struct.unpack(">I", head[:4])[0]
    f.seek(8)
    brands_data = f.read(max(0, min(box, 4096) - 8))
    brands = {brands_data[i:i + 4] for i in range(0, len(brands_data) - 3, 4)} - {b"\0\0\0\0"}
    kind = "AVIF" if brands & _AVIF_BRANDS else "HEIF" if brands & _HEIF_BRANDS else None
    if kind is None:
        return None
    f.seek(0)
    data = f.read(1 << 20)  # the meta box comes first in phone photos; its properties are a few KB
    sizes = []
    at = data.find(b"ispe")
    while at >= 4 and at + 16 <= len(data):
        sizes.append(struct.unpack(">II", data[at + 8:at + 16]))
        at = data.find(b"ispe", at + 4)
    if not sizes:
        return kind, None, None
    w, h = max(sizes, key=lambda s: s[0] * s[1])
    at = data.find(b"irot")
    if at >= 4 and at + 5 <= len(data) and data[at + 4] & 1:
        w, h = h, w
    return kind, w, h


# Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS). The worker reads a bigger JPEG at a reduced
# scale (dp3d_core.images); it refuses any other format this big.
MAX_DECODE_PIXELS = 178_956_970


def too_many_pixels(path: str | os.PathLike, head: tuple[str, int | None, int | None] | None
                    ) -> PreflightError | None:
    """The error for an image the worker would refuse as too big (not a JPEG, over MAX_DECODE_PIXELS), else None;
    ``head``: the image's :func:`image_header`."""
    if head is None or head[0] == "JPEG" or head[1] is None or head[1] * head[2] <= MAX_DECODE_PIXELS:
        return None
    return PreflightError(f"{Path(path).name} is {head[1]}x{head[2]} px, more pixels than the worker decodes "
                          f"safely as {head[0]} ({MAX_DECODE_PIXELS // 1_000_000} million).",
                          "Save it as JPEG (read at a reduced scale) or save a smaller copy.")


def check_image(path: str | os.PathLike, what: str, min_side: int = 64) -> tuple[str, int | None, int | None]:
    """A header check (no decoding): exists, is a file, a format the worker reads, big enough, not too big.
    Returns the :func:`image_header`."""
    p = Path(path)
    if not p.exists():
        raise PreflightError(f"{what.capitalize()} not found: {clip(p)}.", "Pick an existing PNG or JPEG image.")
    if not p.is_file():
        raise PreflightError(f"The {what} {clip(p)} is a folder, not an image file.", "Pick an image file.")
    head = image_header(p)
    if head is None:
        raise PreflightError(f"The {what} {clip(p)} is not an image the worker can read.",
                             "Use a PNG or JPEG image (HEIC, WebP, AVIF, BMP, GIF and TIFF work too).")
    fmt, w, h = head
    if w is not None and h is not None and min(w, h) < min_side:
        raise PreflightError(f"The {what} {p.name} is only {w}x{h} px.",
                             f"Use an image at least {min_side} px on its shorter side.")
    huge = too_many_pixels(p, head)
    if huge is not None:
        raise huge
    return head


# ---------------------------------------------------------------- disk and memory

def frame_bytes(size: int) -> int:
    """An upper estimate of one PNG frame on disk (8-bit RGB never compresses to more than raw + overhead)."""
    return size * size * 3 + size * 8 + 4096


def check_disk(folder: str | os.PathLike, frames: int, size: int, extra_images: int = 0) -> None:
    """Enough free disk under ``folder`` for ``frames`` frames plus ``extra_images`` images of the job."""
    need = (frames + extra_images) * frame_bytes(size) + DISK_MARGIN
    try:
        free = shutil.disk_usage(existing_ancestor(Path(folder))).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < need:
        raise PreflightError(f"Not enough free disk space for {frames} frames at {size} px: about "
                             f"{_mib(need)} needed, {_mib(free)} free on the disk of {clip(folder)}.",
                             "Free space on that disk, or choose an output folder on another disk.")


def _mib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_ram() -> int | None:
    """Bytes of RAM available to a new process (Linux MemAvailable, else free pages), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def estimate_memory(info: ModelInfo, size: int, frames: int, device: str, dtype: str = "auto",
                    memory: str = "normal", proxies: bool = False) -> int:
    """Rough peak bytes on ``device`` ('cpu' or a GPU): weights + one window's activations (+ the inputs on CPU)."""
    cpu = device == "cpu"
    elem = 4 if cpu or dtype == "fp32" else 2
    gpu_resident = info.largest_component if (memory == "lowest" and not cpu) else info.parameters
    weights = gpu_resident * elem
    per_pixel = ACTIVATIONS_PER_PIXEL.get(memory, ACTIVATIONS_PER_PIXEL["normal"]) * info.base_channels / 320.0
    activations = per_pixel * info.clip_length * size * size * elem
    # on the CPU the worker also holds every frame's condition (and proxy) as float32, and the frames as uint8
    inputs = (frames * size * size * 3 * (4 * (2 if proxies else 1) + 1)) if cpu else 0
    return int(weights + activations + inputs)


def memory_warning(info: ModelInfo, size: int, frames: int, device: str, available: int | None,
                   dtype: str = "auto", memory: str = "normal", proxies: bool = False) -> list[str]:
    """A warning when the estimate exceeds ``available`` bytes on the device (nothing when unknown)."""
    if available is None:
        return []
    need = estimate_memory(info, size, frames, device, dtype, memory, proxies)
    if need <= available:
        return []
    where = "RAM" if device == "cpu" else f"{device.upper()} memory"
    fix = ("lower the Output Size or the frame count, or close other programs" if device == "cpu" else
           "set GPU Memory to Low or Lowest, or lower the Output Size")
    return [f"This job needs about {_mib(need)} of {where} but about {_mib(available)} is free: it may run out "
            f"of memory; {fix}."]


# ---------------------------------------------------------------- one pass

@dataclass
class Plan:
    """What a run will do, as far as the checks need it."""

    output: Path
    frame_names: list[str]
    size: int
    model: Path
    window: int | None = None
    images: list[tuple[Path, str]] = field(default_factory=list)  # (path, what it is) checked up front
    device: str | None = None    # "cpu" or a GPU ("cuda", "mps", "gpu"); None: not known yet, no memory check
    dtype: str = "auto"
    memory: str = "normal"
    proxies: bool = False
    job_images: int = 0           # images the add-on will render into the job folder (disk estimate)
    back: str | None = None       # how the job gets its back view: None (none), BACK_GENERATE or BACK_IMAGE
    references: int = 1           # reference photos (DiffPortrait360 takes exactly one)


def check_plan(plan: Plan, *, decode: Callable[[Path, str], None] | None = None,
               device_available: int | None = None) -> list[str]:
    """Every check, cheapest first; returns warnings, raises :class:`PreflightError`.

    ``decode(path, what)`` decodes an image fully (the worker passes Pillow's); without it images get the
    header check. ``device_available``: free bytes on the chosen GPU when known (None: no GPU warning);
    the CPU's free RAM is read here.
    """
    out = probe_output_folder(plan.output)
    check_frame_names(out, plan.frame_names)
    info = read_model_info(plan.model)
    warnings = check_family(info, plan.back, plan.references)
    warnings += check_model(info, plan.window, plan.size)
    for path, what in plan.images:
        (decode or check_image)(path, what)
    check_disk(out, len(plan.frame_names), plan.size, plan.job_images)
    if plan.device is not None:
        available = available_ram() if plan.device == "cpu" else device_available
        warnings += memory_warning(info, plan.size, len(plan.frame_names), plan.device, available, plan.dtype,
                                   plan.memory, plan.proxies)
    return warnings
