"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

accelerate's ``save_state``/``load_state`` pickle the RNG states and custom objects (and load them with
``weights_only=False``); a checkpoint folder from elsewhere could then run code on resume. This module writes
and reads a fixed set of files and refuses a folder that holds anything else:

    model.safetensors                 the trainable network's full state dict (unwrapped, gathered)
    optimizer.safetensors / .json     optimizer tensors by "<parameter name>/<state key>[/<inner key>]";
                                      param_groups + scalars
    scheduler.json                    the LR schedule's state (its lambdas are code, rebuilt from the config)
    ema.safetensors / ema.json        EMA shadow weights and counters (when EMA is on)
    rng.safetensors / rng.json        torch CPU (+ CUDA) generator states; Python and NumPy states
    progress.json                     step, world size that wrote it, stage, format version
    done                              written last: a folder without it is never resumed

The folder is written under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint with a ``done`` marker.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = 1
FILES = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "ema.safetensors",
         "ema.json", "rng.safetensors", "rng.json", "progress.json", "done"}
PICKLE_SUFFIXES = {".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt"}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot (or must not) be resumed; the message says why and what to do."""


# ---------------------------------------------------------------------------- checks
def check_folder(folder: Path) -> None:
    """Refuse a folder with any file this module does not write (pickles above all)."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    names = sorted(p.name for p in folder.iterdir())
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"checkpoint {folder} holds {', '.join(pickles)}: pickled files can run code when loaded, so this "
            f"trainer never reads them (checkpoints written by older versions through accelerate's save_state "
            f"look like this). Start the stage over with --no-resume, or resume from a checkpoint written by "
            f"this version.")
    unknown = [n for n in names if n not in FILES]
    if unknown:
        raise CheckpointError(f"checkpoint {folder} holds unexpected file(s) {', '.join(unknown)}; a checkpoint "
                              f"holds only {', '.join(sorted(FILES))}. Remove them or resume from another one.")
    for required in ("model.safetensors", "progress.json", "done"):
        if required not in names:
            raise CheckpointError(f"checkpoint {folder} has no {required}; it is incomplete. Resume from an "
                                  f"older checkpoint with --resume-from, or start over with --no-resume.")


def is_complete(folder: Path) -> bool:
    return (folder / "done").is_file()


# ---------------------------------------------------------------------------- (de)serialising
def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (keys: parameter names or ids) -> (tensors, JSON part). A parameter's state may
    nest dicts (bitsandbytes keeps its 8-bit moments under ``__bnb_optimizer_quant_state__``): their keys join
    with "/", as in "<parameter>/<key>/<inner key>"."""
    tensors, scalars = {}, {}

    def walk(param: str, path: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(param, f"{path}/{key}" if path else str(key), inner)
        elif isinstance(value, torch.Tensor) and value.ndim > 0:
            tensors[f"{param}/{path}"] = value
        else:
            scalars.setdefault(param, {})[path] = {"tensor": isinstance(value, torch.Tensor),
                                                   "value": _jsonable(value)}
    for param, entries in state["state"].items():
        walk(str(param), "", entries)
    return _tensors(tensors), {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}

    def put(param: str, path: str, value: Any) -> None:
        *outer, name = path.split("/")
        entry = state.setdefault(param, {})
        for key in outer:
            entry = entry.setdefault(key, {})
        entry[name] = value
    for key, value in tensors.items():
        param, _, path = key.partition("/")
        put(param, path, value)
    for param, entries in meta["scalars"].items():
        for path, item in entries.items():
            put(param, path, torch.tensor(item["value"], dtype=torch.float32) if item["tensor"] else item["value"])
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": _jsonable(random.getstate()),
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); resume from another checkpoint") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); resume from another "
                              f"checkpoint") from None


# ---------------------------------------------------------------------------- folders
def write(folder: Path, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any] | None,
          scheduler: dict[str, Any] | None, ema: dict[str, Any] | None, progress: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (call on the main process only)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        save_file(_tensors(model), str(staging / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = split_optimizer_state(optimizer)
            save_file(tensors, str(staging / "optimizer.safetensors"))
            _write_json(staging / "optimizer.json", meta)
        if scheduler is not None:
            _write_json(staging / "scheduler.json", _jsonable({k: v for k, v in scheduler.items()
                                                               if k != "lr_lambdas"}))
        if ema is not None:
            shadow = ema.get("shadow_params") or []
            save_file(_tensors({str(i): p for i, p in enumerate(shadow)}), str(staging / "ema.safetensors"))
            _write_json(staging / "ema.json", _jsonable({k: v for k, v in ema.items()
                                                         if k not in ("shadow_params", "model_cls", "model_config")}))
        tensors, meta = rng_state()
        save_file(_tensors(tensors), str(staging / "rng.safetensors"))
        _write_json(staging / "rng.json", meta)
        _write_json(staging / "progress.json", {"format": FORMAT, **progress})
        (staging / "done").write_text(str(progress.get("step", "")))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read(folder: Path) -> dict[str, Any]:
    """Everything in a checkpoint folder (checked first; nothing is unpickled). Keys: model, optimizer,
    scheduler, ema (or None each), rng (tensors, meta), progress."""
    folder = Path(folder)
    check_folder(folder)
    progress = _read_json(folder / "progress.json")
    if progress.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder} has format {progress.get('format')!r}; this version reads "
                              f"format {FORMAT}")
    out: dict[str, Any] = {"progress": progress, "model": _read_tensors(folder / "model.safetensors"),
                           "optimizer": None, "scheduler": None, "ema": None, "rng": None}
    if (folder / "optimizer.safetensors").is_file():
        out["optimizer"] = join_optimizer_state(_read_tensors(folder / "optimizer.safetensors"),
                                                _read_json(folder / "optimizer.json"))
    if (folder / "scheduler.json").is_file():
        out["scheduler"] = _read_json(folder / "scheduler.json")
    if (folder / "ema.safetensors").is_file():
        shadow = _read_tensors(folder / "ema.safetensors")
        out["ema"] = {**_read_json(folder / "ema.json"),
                      "shadow_params": [shadow[str(i)] for i in range(len(shadow))]}
    if (folder / "rng.safetensors").is_file():
        out["rng"] = (_read_tensors(folder / "rng.safetensors"), _read_json(folder / "rng.json"))
    return out
