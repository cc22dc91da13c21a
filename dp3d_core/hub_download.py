"""Download a model folder from a Hugging Face-style hub repository (run in the worker Python):

    python -m dp3d_core.hub_download REPO_ID OUT [--revision REV] [--endpoint URL] [--progress]

Files go into a hidden partial folder beside OUT (``.<name>.partial``), which a later run resumes (huggingface_hub
keeps partly downloaded files there and continues them); only a complete model folder (``model_index.json``) is
moved to OUT. ``--endpoint`` (or ``HF_ENDPOINT``) points at a mirror. Torch-free.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROGRESS_PREFIX = "progress "
MARKER_NAME = ".portrait3d_model.json"  # the add-on's marker: this folder was made by Portrait 3D


class HubDownloadError(RuntimeError):
    pass


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def download_model(repo_id: str, out: str | os.PathLike, revision: str | None = None, endpoint: str | None = None,
                   progress=None) -> Path:
    """Fetch every file of ``repo_id`` into ``out``; ``progress(done_files, total_files, done_bytes, total_bytes)``."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise HubDownloadError("the worker Python lacks huggingface_hub: press Set Up Worker again") from None
    out = Path(out)
    if out.exists():
        raise HubDownloadError(f"{out} already exists; delete it or choose another name")
    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except HfHubHTTPError as exc:
        raise HubDownloadError(f"the hub refused {repo_id!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise HubDownloadError(f"cannot reach the hub for {repo_id!r}: {exc}") from None
    files = [(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
    if not any(name == "model_index.json" for name, _ in files):
        raise HubDownloadError(f"{repo_id} is not a model folder (it has no model_index.json at its top level)")
    total_bytes = sum(size for _, size in files)
    staging = partial_folder(out)
    staging.mkdir(parents=True, exist_ok=True)
    done_bytes = 0
    if progress:
        progress(0, len(files), 0, total_bytes)
    for i, (name, size) in enumerate(files, 1):
        try:
            hf_hub_download(repo_id, name, revision=info.sha, local_dir=str(staging), endpoint=endpoint)
        except HfHubHTTPError as exc:
            raise HubDownloadError(f"downloading {name} failed: {exc}") from None
        except OSError as exc:
            raise HubDownloadError(f"downloading {name} failed: {exc}") from None
        done_bytes += size
        if progress:
            progress(i, len(files), done_bytes, total_bytes)
    (staging / MARKER_NAME).write_text(json.dumps({"made_by": "Portrait 3D", "source": "hub", "repo_id": repo_id,
                                                   "revision": info.sha, "endpoint": endpoint or "",
                                                   "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    cache = staging / ".cache"
    if cache.is_dir():
        import shutil
        shutil.rmtree(cache, ignore_errors=True)
    os.replace(staging, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.hub_download", description=__doc__.split("\n")[0])
    parser.add_argument("repo_id")
    parser.add_argument("out")
    parser.add_argument("--revision")
    parser.add_argument("--endpoint", help="hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--progress", action="store_true", help="print machine-readable progress lines")
    args = parser.parse_args(argv)

    def show(files_done: int, files: int, done: int, total: int) -> None:
        if args.progress:
            print(PROGRESS_PREFIX + json.dumps({"phase": "download", "done": done, "total": total,
                                                "files_done": files_done, "files": files}), flush=True)

    try:
        out = download_model(args.repo_id, args.out, args.revision, args.endpoint or None, show)
    except HubDownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
