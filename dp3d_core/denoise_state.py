"""Denoising checkpoints: the whole state of a run, kept beside the job so a rerun continues it.

A sequence is denoised as ONE trajectory (the overlapping windows are blended at every step), so
no frame is final before the last step. What a run has achieved after ``k`` steps is therefore
its :class:`DenoisingState`: the latents of ALL views, the reference latents (VAE posterior
samples, drawn once), the scheduler's mutable state (DPM++/UniPC multistep history, step index,
timestep lists ...) and the state of the random generator (DDIM with eta > 0 draws noise at every
step). Continuing from it gives bit-identical results to an uninterrupted run.

On disk, under ``<job dir>/state/`` (:data:`STATE_DIR`), never pickled:

- ``tensors-<step>-<token>.safetensors``: every tensor (latents, reference latents, scheduler
  tensors, generator state as uint8);
- ``checkpoint.json`` (:data:`MANIFEST`), written LAST: format version, job hash, step, total
  steps, scheduler class, latent shape, the scalars and layout of the scheduler state, and the
  name, size and sha256 of the tensor file.

Both are written atomically (temporary file + ``os.replace``); the previous tensor file is deleted
only after the new manifest is in place, so at any moment of a kill the manifest names a complete
tensor file. A checkpoint whose manifest is unreadable, of another format, of another job hash,
of other settings, or whose tensor file is missing or fails its checksum is ignored (the caller
gets one sentence to show as a ``warning``) and never loaded.

Importing this module does not import torch (a finished job removes its state without paying for it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .protocol import write_atomic

if TYPE_CHECKING:
    import torch

STATE_DIR = "state"
MANIFEST = "checkpoint.json"
FORMAT = 1
_TENSOR_GLOB = "tensors-*.safetensors"

# Cadence defaults (see CheckpointPolicy); the environment variables override them.
EVERY_STEPS = 5
EVERY_SECONDS = 10.0
MAX_OVERHEAD = 0.02
ENV_EVERY_STEPS = "DP3D_CHECKPOINT_EVERY_STEPS"
ENV_EVERY_SECONDS = "DP3D_CHECKPOINT_EVERY_SECONDS"


class StateError(ValueError):
    """A denoising state that cannot be captured, stored or used; the message says why."""


@dataclass
class DenoisingState:
    """Everything needed to continue a denoising run after ``step`` steps.

    Attributes:
        step: steps already done (the 0-based index of the next step); 0 = before the first step.
        total_steps: the run's number of denoising steps (``len(scheduler.timesteps)``).
        latents: ``[N, C, h, w]`` latents of all views after ``step`` steps.
        reference_latents: ``[R, C, h, w]`` VAE latents of the reference image(s), scaled.
        scheduler: the scheduler's mutable attributes (see :func:`scheduler_state`).
        scheduler_class: the scheduler's class name (a state only fits the same class).
        generator: ``torch.Generator.get_state()`` of the pipeline's generator (None: no generator).

    The pipeline hands out states that reference its live tensors; :meth:`detached` copies them.
    """

    step: int
    total_steps: int
    latents: torch.Tensor
    reference_latents: torch.Tensor
    scheduler: dict[str, Any]
    scheduler_class: str
    generator: torch.Tensor | None

    def detached(self) -> "DenoisingState":
        """A copy on the CPU that later denoising steps cannot change."""
        return unpack(*pack(self))


# ---------------------------------------------------------------- scheduler state

_SCALARS = (bool, int, float, str, type(None))


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's attributes (live references), minus its frozen config.

    Generic on purpose: diffusers' schedulers keep their runtime state in plain attributes
    (``model_outputs``, ``lower_order_nums``, ``_step_index``, ``timestep_list``, ``last_sample``,
    ``this_order`` ...). Raises :class:`StateError` for an attribute that is neither a tensor, a scalar
    nor a list of those, rather than silently dropping state a resumed run would need.
    """
    import torch

    out: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name == "_internal_dict":
            continue
        ok = isinstance(value, (torch.Tensor, *_SCALARS)) or (
            isinstance(value, list) and all(isinstance(v, (torch.Tensor, *_SCALARS)) for v in value))
        if not ok:
            raise StateError(f"the {type(scheduler).__name__} scheduler keeps {name!r} as a "
                             f"{type(value).__name__}, which a checkpoint cannot store")
        out[name] = value
    return out


def restore_scheduler(scheduler: Any, values: dict[str, Any], device: torch.device | str) -> None:
    """Set the attributes of ``scheduler_state`` back; call after ``set_timesteps`` (which resets them).

    A tensor goes to the device of the attribute it replaces (after ``set_timesteps``) when that is a
    tensor, else to ``device`` (the model outputs live beside the latents).
    """
    import torch

    for name, value in values.items():
        current = getattr(scheduler, name, None)
        target = current.device if isinstance(current, torch.Tensor) else device
        if isinstance(value, torch.Tensor):
            value = value.to(target)
        elif isinstance(value, list):
            value = [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
        setattr(scheduler, name, value)


# ---------------------------------------------------------------- tensors + JSON

def pack(state: DenoisingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)``: CPU copies of every tensor under a flat name, and JSON-ready scalars."""
    import torch

    tensors: dict[str, torch.Tensor] = {
        "latents": state.latents.detach().to("cpu", copy=True).contiguous(),
        "reference_latents": state.reference_latents.detach().to("cpu", copy=True).contiguous(),
    }
    if state.generator is not None:
        tensors["generator"] = state.generator.detach().to("cpu", copy=True).contiguous()

    def spec(key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, float) and not math.isfinite(value):
            raise StateError(f"the scheduler value {key} is {value}, which JSON cannot hold")
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            return {"tensor": key}
        return {"value": value}

    layout: dict[str, Any] = {}
    for name, value in state.scheduler.items():
        if isinstance(value, list):
            layout[name] = {"list": [spec(f"scheduler.{name}.{i}", v) for i, v in enumerate(value)]}
        else:
            layout[name] = spec(f"scheduler.{name}", value)
    meta = {"step": int(state.step), "total_steps": int(state.total_steps), "scheduler_class": state.scheduler_class,
            "scheduler": layout, "latent_shape": list(state.latents.shape)}
    return tensors, meta


def unpack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> DenoisingState:
    """Inverse of :func:`pack`. Raises :class:`StateError` when a named tensor is missing."""
    def value(entry: dict[str, Any]) -> Any:
        if "tensor" in entry:
            if entry["tensor"] not in tensors:
                raise StateError(f"the tensor {entry['tensor']!r} is missing")
            return tensors[entry["tensor"]]
        return entry["value"]

    try:
        sched = {name: [value(e) for e in entry["list"]] if "list" in entry else value(entry)
                 for name, entry in meta["scheduler"].items()}
        return DenoisingState(step=int(meta["step"]), total_steps=int(meta["total_steps"]),
                              latents=tensors["latents"], reference_latents=tensors["reference_latents"],
                              scheduler=sched, scheduler_class=str(meta["scheduler_class"]),
                              generator=tensors.get("generator"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"the checkpoint lacks {exc}") from None


# ---------------------------------------------------------------- checkpoint files

class Checkpoints:
    """The denoising checkpoint of one job: ``<job dir>/state/``, keyed by the job hash.

    ``expect`` holds the identity a checkpoint must match besides the job hash (``total_steps``,
    ``scheduler_class``, ``latent_shape``).
    """

    def __init__(self, job_dir: str | os.PathLike, job_hash: str, expect: dict[str, Any] | None = None) -> None:
        self.folder = Path(job_dir) / STATE_DIR
        self.job_hash = job_hash
        self.expect = dict(expect or {})

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest as written, or None when there is none (a broken one raises StateError)."""
        try:
            text = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"its manifest cannot be read ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise StateError("its manifest is not valid JSON") from None
        if not isinstance(data, dict):
            raise StateError("its manifest is not a JSON object")
        return data

    def load(self, warn: Callable[[str], None] | None = None) -> DenoisingState | None:
        """The saved state when it is valid for this job, else None (and one sentence to ``warn`` unless
        there was no checkpoint at all). Never raises for a bad checkpoint."""
        self.sweep(keep=None)
        try:
            state = self.read()
        except StateError as exc:
            if warn is not None:
                warn(f"ignored the saved denoising state in {self.folder}: {exc}; this run starts from step 0")
            return None
        if state is not None:
            self.sweep(keep=None)
        return state

    def read(self) -> DenoisingState | None:
        """The saved state, None when there is none; raises :class:`StateError` (saying why) for a checkpoint that
        must not be used. Changes no file."""
        manifest = self.read_manifest()
        return None if manifest is None else self._validated(manifest)

    def _validated(self, manifest: dict[str, Any]) -> DenoisingState:
        if manifest.get("format") != FORMAT:
            raise StateError(f"it has format {manifest.get('format')!r}, this version reads format {FORMAT}")
        if manifest.get("job_hash") != self.job_hash:
            raise StateError("it belongs to another job (other settings, images or model)")
        for key, want in self.expect.items():
            if manifest.get(key) != want:
                raise StateError(f"its {key} is {manifest.get(key)!r}, this job needs {want!r}")
        info = manifest.get("tensors")
        if not isinstance(info, dict) or not isinstance(info.get("file"), str) or "/" in info["file"] \
                or "\\" in info["file"] or not info["file"].startswith("tensors-"):
            raise StateError("its manifest does not name a tensor file")
        try:
            data = (self.folder / info["file"]).read_bytes()
        except OSError:
            raise StateError(f"its tensor file {info['file']} is missing or unreadable") from None
        if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise StateError(f"its tensor file {info['file']} is damaged (size or checksum differ)")
        import torch
        from safetensors.torch import load as load_tensors

        try:
            tensors = load_tensors(data)
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise StateError(f"its tensor file cannot be read ({exc})") from None
        state = unpack(tensors, manifest)
        if list(state.latents.shape) != manifest.get("latent_shape"):
            raise StateError("its latents do not have the recorded shape")
        if not 0 < state.step <= state.total_steps:
            raise StateError(f"its step {state.step} is outside 1..{state.total_steps}")
        if not torch.isfinite(state.latents).all():
            raise StateError("its latents hold NaN or infinite values")
        return state

    def save(self, state: DenoisingState) -> float:
        """Write ``state`` (tensor file, then the manifest); returns the seconds it took."""
        from safetensors.torch import save as save_tensors

        started = time.perf_counter()
        tensors, meta = pack(state)
        data = save_tensors(tensors, metadata={"format": f"dp3d-denoising-state-{FORMAT}"})
        name = f"tensors-{state.step:05d}-{secrets.token_hex(4)}.safetensors"
        write_atomic(self.folder / name, data)
        manifest = {"format": FORMAT, "job_hash": self.job_hash, **meta,
                    "tensors": {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                    "saved_at": time.time()}
        write_atomic(self.manifest_path, json.dumps(manifest, indent=1, allow_nan=False).encode())
        self.sweep(keep=name)
        return time.perf_counter() - started

    def sweep(self, keep: str | None) -> None:
        """Delete temporary files of killed writes, and tensor files other than ``keep`` (None: the one the
        manifest names, if it names one)."""
        if not self.folder.is_dir():
            return
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        if keep is None:
            try:
                manifest = self.read_manifest() or {}
            except StateError:
                return  # keep everything; the caller reports the broken manifest
            info = manifest.get("tensors")
            keep = info.get("file") if isinstance(info, dict) else None
        for path in self.folder.glob(_TENSOR_GLOB):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint (the manifest first, so a kill half-way leaves nothing loadable)."""
        if not self.folder.is_dir():
            return
        self.manifest_path.unlink(missing_ok=True)
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass  # something else lives there; leave it


# ---------------------------------------------------------------- cadence

@dataclass
class CheckpointPolicy:
    """When to save: after a step once ``every_steps`` steps OR ``every_seconds`` seconds have passed since
    the last save, but never so often that saving takes more than ``max_overhead`` of the run's time
    (the interval stretches to ``last save time / max_overhead``). The last step is always saved, so a run
    killed while decoding or writing frames only decodes again."""

    every_steps: int = EVERY_STEPS
    every_seconds: float = EVERY_SECONDS
    max_overhead: float = MAX_OVERHEAD
    last_step: int = 0
    last_time: float = 0.0
    last_cost: float = 0.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "CheckpointPolicy":
        env = os.environ if environ is None else environ
        policy = cls()
        if env.get(ENV_EVERY_STEPS):
            policy.every_steps = max(1, int(env[ENV_EVERY_STEPS]))
        if env.get(ENV_EVERY_SECONDS):
            policy.every_seconds = max(0.0, float(env[ENV_EVERY_SECONDS]))
        return policy

    def start(self, step: int, now: float) -> None:
        """The run begins (or resumes) at ``step``."""
        self.last_step, self.last_time = step, now

    def due(self, step: int, total_steps: int, now: float) -> bool:
        if step <= self.last_step:
            return False
        if step >= total_steps:
            return True
        elapsed = now - self.last_time
        if elapsed * self.max_overhead < self.last_cost:
            return False
        return step - self.last_step >= self.every_steps or elapsed >= self.every_seconds

    def saved(self, step: int, now: float, cost: float) -> None:
        self.last_step, self.last_time, self.last_cost = step, now, cost
