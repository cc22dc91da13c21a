"""The diffusers-style model folder: ``model_index.json`` plus one subfolder per component.

    unet/ (locked F)  reference_unet/ (F_ref)  view_controlnet/ (F_cam)  view_modules/  vae/  scheduler/
    prompt_embedding/ (the empty-prompt CLIP embedding; no text encoder is needed at run time)

A DiffPortrait360 model folder is its view model's folder with the back-head model's folder inside it, at
``back_head/`` (optional; docs/DESIGN.md, "Model folder"); each loads on its own with :func:`load_model_folder`.

``model_index.json`` follows diffusers' pipeline format (``[library, class]`` per component, our own classes under
the library ``dp3d_core.models``), so ``DiffusionPipeline``-style loaders can read it too.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "reference_unet": ("diffusers", "UNet2DConditionModel"),
    "view_controlnet": ("diffusers", "ControlNetModel"),
    "view_modules": ("dp3d_core.models", "ViewModules"),
    "vae": ("diffusers", "AutoencoderKL"),
    "scheduler": ("diffusers", "DDIMScheduler"),
    "prompt_embedding": ("dp3d_core.models", "PromptEmbedding"),
}
NETWORKS = ("unet", "reference_unet", "view_controlnet", "view_modules")

_HINTS = {
    "vae": "copy a diffusers SD-1.5 VAE folder (config.json + diffusion_pytorch_model.safetensors) into it, or "
           "convert a checkpoint that contains 'first_stage_model.' weights",
    "prompt_embedding": "re-run `python -m dp3d_core.convert` on a checkpoint with CLIP weights, or with "
                        "--context-from pointing at an embedding",
    "scheduler": "re-run the converter, or save a DDIMScheduler config there",
}


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete or unreadable."""


def _classes() -> dict[str, Any]:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from .models.prompt_embedding import PromptEmbedding
    from .models.view_modules import ViewModules
    return {"UNet2DConditionModel": UNet2DConditionModel, "ControlNetModel": ControlNetModel,
            "AutoencoderKL": AutoencoderKL, "ViewModules": ViewModules, "PromptEmbedding": PromptEmbedding}


def default_scheduler_config() -> dict[str, Any]:
    from .schedulers import DEFAULT_SCHEDULER_CONFIG
    return dict(DEFAULT_SCHEDULER_CONFIG)


def save_model_folder(components: dict[str, Any], path: str | Path, overwrite: bool = False,
                      family: Any = None, on_saved: Callable[[str], None] | None = None) -> Path:
    """Write ``components`` (name -> module / scheduler) as a model folder; a missing scheduler gets the default.
    ``on_saved(name)`` is called after each component is written (the converter's progress).

    ``family``: a :class:`dp3d_core.families.Family` written to ``model_index.json`` (default: DiffPortrait3D).

    The folder is written next to ``path`` first and moved into place, so a failed save leaves nothing half-written.
    """
    from diffusers import DDIMScheduler

    path = Path(path)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ModelFolderError(f"unknown component(s) {unknown}; a model folder holds {list(COMPONENTS)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise ModelFolderError(f"{path} already exists and is not empty; choose another folder or overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        from .families import FAMILY_3D
        family = family or FAMILY_3D
        index: dict[str, Any] = {"_class_name": family.pipeline_class, "_diffusers_version": _diffusers_version(),
                                 **family.index_fields()}
        items = dict(components)
        items.setdefault("scheduler", DDIMScheduler.from_config(default_scheduler_config()))
        for name in COMPONENTS:
            if name not in items or items[name] is None:
                continue
            items[name].save_pretrained(str(staging / name))
            index[name] = list(COMPONENTS[name])
            if on_saved is not None:
                on_saved(name)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


def read_model_index(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist; convert the official checkpoint with "
                               f"`python -m dp3d_core.convert <checkpoint> {path}` or make a test model with "
                               f"`python -m dp3d_core.tiny {path}`")
    index_file = path / "model_index.json"
    try:
        return json.loads(index_file.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{path} has no model_index.json; it is not a DiffPortrait3D model folder "
                               f"(re-run the converter into an empty folder)") from None
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{index_file} is not valid JSON: {exc}") from None


def refuse_pickles(path: Path, name: str) -> None:
    """ModelFolderError when component ``name`` has pickled weights but no safetensors (pickles can run code)."""
    from .preflight import PICKLE_SUFFIXES

    sub = path / name
    if not sub.is_dir() or any(sub.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFolderError(f"'{name}' holds only pickled weights ({pickles[0]}), which are refused because "
                               f"loading a pickle can run code; convert them once with "
                               f"`python -m dp3d_core.convert_pickles {path}`")


def load_model_folder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      components: Iterable[str] | None = None, family: Any = None) -> dict[str, Any]:
    """Load the components (all by default) of a model folder: name -> module (eval mode) or scheduler.

    ``family``: the :class:`dp3d_core.families.Family` the caller can run; a folder of another is refused."""
    from .schedulers import make_scheduler

    path = Path(path)
    index = read_model_index(path)
    found = model_family(index)
    if family is not None and found != family:
        raise ModelFolderError(f"{path} holds {found.describe()}, but {family.describe()} is needed here; pick "
                               f"the matching model folder (convert the matching official checkpoint into it)")
    wanted = list(components) if components is not None else default_components(index)
    classes = _classes()
    loaded: dict[str, Any] = {}
    for name in wanted:
        if name not in COMPONENTS:
            raise ModelFolderError(f"unknown component {name!r}; a model folder holds {list(COMPONENTS)}")
        sub = path / name
        if name not in index or not (sub / ("scheduler_config.json" if name == "scheduler" else "config.json")).is_file():
            hint = _HINTS.get(name, "re-convert the official checkpoint into a fresh folder")
            raise ModelFolderError(f"model folder {path} is missing the '{name}' component ({sub}); {hint}")
        if name == "scheduler":
            config = json.loads((sub / "scheduler_config.json").read_text())
            loaded[name] = make_scheduler("ddim", config)
            continue
        library, class_name = COMPONENTS[name]
        refuse_pickles(path, name)
        try:
            # use_safetensors=True: diffusers' default would fall back to unpickling a .bin
            module = classes[class_name].from_pretrained(str(sub), torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelFolderError(f"cannot load '{name}' from {sub}: {exc}") from None
        loaded[name] = module.to(device).eval()
    return loaded


def model_family(path_or_index: str | Path | dict[str, Any]):
    """The :class:`dp3d_core.families.Family` of a model folder (or of its parsed ``model_index.json``)."""
    from .families import FamilyError, family_from_index

    index = path_or_index if isinstance(path_or_index, dict) else read_model_index(path_or_index)
    try:
        return family_from_index(index)
    except FamilyError as exc:
        raise ModelFolderError(str(exc)) from None


def default_components(index: dict[str, Any]) -> list[str]:
    """The components a folder of this family must hold (a back-head model has no view modules)."""
    family = model_family(index)
    return [name for name in COMPONENTS if name != "view_modules" or family.layout is not None]


def make_denoiser(components: dict[str, Any], clip_length: int = 8):
    """A ``DiffPortrait3DDenoiser`` from loaded components."""
    from .models.denoiser import DiffPortrait3DDenoiser

    missing = [n for n in NETWORKS if n not in components and n != "view_modules"]
    if missing:
        raise ModelFolderError(f"cannot build the denoiser without {missing}")
    return DiffPortrait3DDenoiser(components["unet"], components["reference_unet"], components["view_controlnet"],
                                  components.get("view_modules"), clip_length=clip_length)
