"""Where a DiffPortrait360 job's generated back view lives and when it can be reused (torch-free).

The worker's back stage writes ``<job dir>/back/back_seed<seed>.png`` (atomically) and then a record beside it,
``back_seed<seed>.json``: the key of everything the back view depends on (:func:`stage_key`) and the PNG's
sha256. A later run (or the view stage after ``--back-only``) reuses the PNG only when the record matches both,
so a changed photo, back camera, model or setting never reuses a stale back view of the same seed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .job import Job, file_digest, model_identity
from .preflight import BACK_HEAD_FOLDER
from .protocol import remove_stale_temp_files, write_atomic

BACK_DIR = "back"


def png_path(job_dir: str | os.PathLike, seed: int) -> Path:
    """The generated back view of ``seed``: ``<job dir>/back/back_seed<seed>.png``."""
    return Path(job_dir) / BACK_DIR / f"back_seed{seed}.png"


def _record_path(png: Path) -> Path:
    return png.with_suffix(".json")


def stage_key(job: Job) -> str:
    """Hash of what the generated back view depends on (``job`` resolved, with a back view): the reference and its
    preparation, the back camera's condition image, the seed, the sampling settings that apply to the back stage,
    device, dtype and the back-head model."""
    if job.back is None:
        raise ValueError("the job has no back view")
    s = job.settings
    payload = {
        "references": [file_digest(r) for r in job.references],
        "reference_prep": None if job.reference_prep is None else asdict(job.reference_prep),
        "condition": file_digest(job.back.condition), "seed": job.back.seed,
        "settings": {"steps": s.steps, "guidance": s.guidance, "eta": s.eta, "size": s.size,
                     "scheduler": s.scheduler},
        "device": job.device, "dtype": job.dtype,
        "model": model_identity(Path(job.model) / BACK_HEAD_FOLDER),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_valid(png: Path, key: str) -> bool:
    """True when ``png`` was written by a back stage with ``key`` and still has the recorded contents."""
    try:
        record = json.loads(_record_path(png).read_text(encoding="utf-8"))
        data = png.read_bytes()
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("key") == key
            and record.get("sha256") == hashlib.sha256(data).hexdigest())


def write(png: Path, data: bytes, key: str) -> Path:
    """Write the back view PNG, then its record (each atomically): a kill between the two leaves a PNG without
    a matching record, which the next run makes again (and the temporary files of such a kill are removed)."""
    remove_stale_temp_files(png.parent, [png.name, _record_path(png).name])
    _record_path(png).unlink(missing_ok=True)
    write_atomic(png, data)
    record = {"key": key, "sha256": hashlib.sha256(data).hexdigest()}
    write_atomic(_record_path(png), json.dumps(record, indent=1).encode())
    return png
