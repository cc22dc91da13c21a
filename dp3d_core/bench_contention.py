"""How much a busy machine slows the CPU worker: the demo's worker job, idle and next to one busy process.

    python -m dp3d_core.bench_contention [--model models/small] [--frames 16] [--steps 40] [--repeat 2]

Each run writes a fresh job (the example portrait as reference and as every condition image: the
content does not change the amount of work), runs ``python -m dp3d_core.worker`` on it and takes the
``seconds`` of its ``done`` event. "loaded" runs the same job while one other process keeps every core
busy (numpy matrix products on all cores, the way a render or a browser tab would). Idle and loaded
runs alternate, so a change in the machine's own load hits both. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .job import FrameSpec, GenerationSettings, Job, write_job
from .protocol import parse_event

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT = ROOT / "examples" / "portrait_0000028.png"
LABEL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0,
         4.2647, 0.0, 0.5, 0.0, 4.2647, 0.5, 0.0, 0.0, 1.0]
BUSY = ("import numpy as np\n"
        "a = np.random.rand(600, 600)\n"
        "while True:\n"
        "    a = (a @ a) / 600.0\n")


def write_demo_job(folder: Path, model: Path, frames: int, steps: int, size: int) -> Path:
    specs = [FrameSpec(index=i, scene_frame=i + 1, label=list(LABEL), condition=str(PORTRAIT))
             for i in range(frames)]
    job = Job(references=[str(PORTRAIT)], frames=specs, model=str(model.resolve()), output=str(folder / "out"),
              device="cpu", settings=GenerationSettings(steps=steps, size=size, seed=0))
    write_job(job, folder)
    return folder


def run_worker(job_dir: Path, env: dict[str, str]) -> float:
    r = subprocess.run([sys.executable, "-m", "dp3d_core.worker", str(job_dir)], capture_output=True, text=True,
                       env=env, cwd=env["PYTHONPATH"], timeout=3600)
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e is not None]
    done = [e for e in events if e.kind == "done"]
    if r.returncode != 0 or not done:
        raise SystemExit(f"worker failed (exit {r.returncode}): {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return float(done[-1]["seconds"])


def one_run(model: Path, frames: int, steps: int, size: int, loaded: bool, env: dict[str, str]) -> float:
    busy = None
    if loaded:
        busy_env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            busy_env[k] = str(os.cpu_count() or 1)
        busy = subprocess.Popen([sys.executable, "-c", BUSY], env=busy_env)
        time.sleep(1.0)
    try:
        with tempfile.TemporaryDirectory(prefix="p3d-contention-") as tmp:
            return run_worker(write_demo_job(Path(tmp), model, frames, steps, size), env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "small"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the worker (e.g. OMP_WAIT_POLICY=ACTIVE)")
    parser.add_argument("--worker-source", default=str(ROOT),
                        help="folder holding the dp3d_core to run as the worker (e.g. an older version's checkout)")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=args.worker_source)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    idle, loaded = [], []
    for _ in range(args.repeat):
        idle.append(one_run(Path(args.model), args.frames, args.steps, args.size, False, env))
        loaded.append(one_run(Path(args.model), args.frames, args.steps, args.size, True, env))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "frames": args.frames, "steps": args.steps, "size": args.size, "env": args.env,
        "worker_source": args.worker_source,
        "idle_s": idle, "loaded_s": loaded,
        "slowdown": [round(b / a, 2) for a, b in zip(idle, loaded)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
