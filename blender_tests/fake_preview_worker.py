"""A stand-in worker for add-on tests: speaks the real protocol, writes previews and frames, no torch.

Run as ``python fake_preview_worker.py [--previews N] [--resume-from K] [--steps T] [--gate] -m dp3d_core.worker
JOB_DIR`` (the add-on's command line, with options in front). Each preview copies a condition image per view into
``<job dir>/preview/`` (view i shows condition (i + p) mod n at preview p, so consecutive previews differ),
atomically, then emits ``preview``; with ``--gate`` it then waits for the test to create ``<job dir>/go_<p>``.
At the end it writes every frame (the view's condition image) and ``done``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from dp3d_core import job as jobspec
from dp3d_core import protocol


def emit(kind: str, **fields) -> None:
    print(protocol.encode_event(kind, **fields), flush=True)


def copy_atomic(src: str | Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--previews", type=int, default=2)
    parser.add_argument("--resume-from", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("-m")
    parser.add_argument("job_dir")
    args = parser.parse_args()
    job_dir = Path(args.job_dir)
    job = jobspec.read_job(job_dir).resolve(job_dir)
    frames = job.ordered_frames()
    n = len(frames)
    emit("started", job_hash="fake", frames_total=n, frames_done=0)
    step = 0
    if args.resume_from >= 0:
        step = args.resume_from
        emit("resumed", step=step, total_steps=args.steps)
    folder = job_dir / "preview"
    folder.mkdir(exist_ok=True)
    for p in range(1, args.previews + 1):
        step = min(args.steps, step + 1)
        emit("progress", step=step, total_steps=args.steps, window=1, windows=1, frames_done=0, frames_total=n)
        for i, frame in enumerate(frames):
            copy_atomic(frames[(i + p) % n].condition, folder / job.frame_name(frame))
        emit("preview", step=step, total_steps=args.steps, folder=str(folder.resolve()))
        deadline = time.monotonic() + 120
        while args.gate and not (job_dir / f"go_{p}").exists():
            if protocol.cancel_requested(job_dir):
                emit("done", frames_written=0, seconds=0.0, cancelled=True)
                return protocol.EXIT_CANCELLED
            if time.monotonic() > deadline:
                emit("error", message="the test never said go", hint="")
                return protocol.EXIT_ERROR
            time.sleep(0.02)
    for frame in frames:
        path = job.output_path(frame)
        copy_atomic(frame.condition, path)
        emit("frame", index=frame.index, scene_frame=frame.scene_frame, path=str(path))
    emit("done", frames_written=n, seconds=0.1, cancelled=False)
    return protocol.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
