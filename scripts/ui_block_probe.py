"""How long does *Generate* hold Blender's main thread at a time? A diagnostic, not a test.

    .venv/bin/python scripts/ui_block_probe.py [--frames 48] [--size 512] [--proxy-views] [--background-blender]
                                               [--frames-per-step N] [--budget S] [--blocking] [--out DIR] [--json FILE]

In the UI, Generate runs as a modal operator whose timer calls ``GenerationRun.update()``: each call is one
preparation step (a few camera poses; then, with ``--background-blender``, writing the scene and starting a
background Blender that renders the images, then one poll of it per call; without, up to ``--frames-per-step``
condition / proxy renders inside one set-up and restore of the scene, none started after ``--budget`` seconds), then the worker start, then one poll of the worker per tick. Blender handles
events and redraws between two calls, so the longest call is the longest time the UI cannot react.

The ``bpy`` module used here has no event loop (it runs in background mode), so this script calls the same
``update()`` the timer calls, one after the other, and times each call. It also times what the UI does later in
a run: the first live preview on the card, a preview reload, and the import of the finished frames.
``--blocking`` times ``prepare_job`` as one call instead: what Generate did before the preparation was split
(and what background mode, the CLI and scripts still do, where there is no UI to keep responsive).

The bpy module has no Blender binary, so ``--background-blender`` starts a Python with the bpy module on the same
child script a real ``blender -b`` runs. The worker is a stand-in (a shell script that sleeps; POSIX only): the worker's own time is spent in another
process and never blocks Blender. The scene is a head anchor, the add-on's turntable and the procedural proxy
head, on the bundled example portrait; reference preparation is off (its face detection runs in the worker Python).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402

import addon  # noqa: E402
from addon import background_render, frame_import, job_runner, job_writer  # noqa: E402
from addon.preview_display import PREVIEW_SUBDIR, PreviewDisplay  # noqa: E402
from addon.worker_process import WorkerStatus  # noqa: E402

REFERENCE = ROOT / "examples" / "portrait_0000028.png"


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    for name, config in job_writer.MODEL_COMPONENTS.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / config).write_text("{}")
    return folder


def _sleeping_python(folder: Path) -> Path:
    path = folder / "python"
    # The add-on's quick worker check (python -c ...) goes to this Python; the worker itself just sleeps.
    path.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec "{sys.executable}" "$@"; fi\nexec sleep 30\n')
    path.chmod(0o755)
    return path


def _scene(out: Path, frames: int, size: int, proxy_views: bool) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    addon.register()
    scene = bpy.context.scene
    s = scene.portrait3d
    assert bpy.ops.portrait3d.add_head_anchor() == {'FINISHED'}
    s.turntable_frames, s.output_size = frames, size
    assert bpy.ops.portrait3d.add_turntable() == {'FINISHED'}
    s.reference_image = str(REFERENCE)
    s.output_folder = str(out / "out") + os.sep
    s.model_folder = str(_fake_model(out / "model")) + os.sep
    s.use_proxy_views = proxy_views
    if hasattr(s, "use_reference_prep"):  # face detection runs in the worker Python, not on the main thread
        s.use_reference_prep = False


class Timing(float):
    """Wall seconds of one call, with the process's CPU seconds of it in ``cpu`` (all threads)."""

    cpu: float


def _timed(fn, *args):
    t, c = time.perf_counter(), time.process_time()
    value = fn(*args)
    seconds = Timing(time.perf_counter() - t)
    seconds.cpu = time.process_time() - c
    return seconds, value


def _summary(name: str, seconds: list[Timing]) -> dict:
    return {"what": name, "calls": len(seconds), "total_s": round(sum(seconds), 3),
            "max_s": round(max(seconds), 3), "median_s": round(statistics.median(seconds), 3),
            "max_cpu_s": round(max(s.cpu for s in seconds), 3)}


def probe(out: Path, frames: int, size: int, proxy_views: bool, frames_per_step: int, budget: float,
          blocking: bool, background_blender: bool) -> dict:
    _scene(out, frames, size, proxy_views)
    # The bpy module has no Blender binary: a Python with the bpy module runs the child script instead.
    background_render.COMMAND = [sys.executable] if background_blender else None
    context = bpy.context
    os.environ["PORTRAIT3D_WORKER_PYTHON"] = str(_sleeping_python(out))
    rows: list[dict] = []
    slowest: list[tuple[float, float, str]] = []
    if blocking:
        seconds, prepared = _timed(job_writer.prepare_job, context)
        rows.append(_summary("prepare_job (one call)", [seconds]))
    else:
        seconds, run = _timed(lambda: job_runner.begin_generation(context, preparation={
            "frames_per_step": frames_per_step, "step_budget_s": budget, "render_elsewhere": background_blender}))
        rows.append(_summary("Generate pressed: quick checks, worker Python probe", [seconds]))
        phases: dict[str, list[float]] = {}
        while run.preparing:
            before = run.preparation.progress.text
            seconds, _ = _timed(run.update, context)
            phase = run.preparation.progress.phase if run.preparing else "finish: move images, write job, start worker"
            phases.setdefault(phase, []).append(seconds)
            slowest.append((seconds, seconds.cpu, f"after '{before}'"))
            time.sleep(run.poll_interval)  # the timer's interval: Blender's own work would go here
        if run.worker is None:
            raise SystemExit(f"preparation failed: {run.status.message}")
        polls = [_timed(run.update, context)[0] for _ in range(20)]
        rows += [_summary(phase, s) for phase, s in phases.items()]
        rows.append(_summary("poll of the worker", polls))
        prepared = run.prepared
        run.stop()
        job_runner.stop_all()

    # What the UI does later in a run: show previews on the card, reload them, import the finished frames.
    scene = context.scene
    scene.portrait3d.import_as = {'CARD'}
    job = prepared.job.resolve(prepared.job_dir)
    preview_dir = prepared.job_dir / PREVIEW_SUBDIR
    preview_dir.mkdir(exist_ok=True)
    for spec, frame in zip(job.ordered_frames(), prepared.frame_paths):
        shutil.copyfile(spec.condition, preview_dir / frame.name)
        shutil.copyfile(spec.condition, frame)
    status = WorkerStatus(previews=1, preview_step=10, preview_folder=str(preview_dir))
    display = PreviewDisplay()
    camera = bpy.data.objects[job_runner.active_camera(scene).name]
    first, shown = _timed(display.update, scene, camera, prepared, status, context)
    status.previews = 2
    reload, shown_again = _timed(display.update, scene, camera, prepared, status, context)
    assert shown and shown_again and display.reloads == 1
    seq = frame_import.frame_sequence(prepared.frame_paths, prepared.job.frames[0].scene_frame)
    imported, _ = _timed(frame_import.import_frames, scene, camera, seq, ("CARD",))
    rows += [_summary("first preview on the card", [first]), _summary("preview reload", [reload]),
             _summary("import of the finished frames", [imported])]
    if not blocking and background_blender and prepared.warnings:
        raise SystemExit(f"the background Blender failed: {prepared.warnings}")
    return {"frames": frames, "size": size, "proxy_views": proxy_views, "blocking": blocking,
            "background_blender": background_blender and not blocking,
            "frames_per_step": None if blocking else frames_per_step, "step_budget_s": None if blocking else budget,
            "rows": rows,
            "longest_block_s": max(r["max_s"] for r in rows),
            "slowest_steps": [{"wall_s": round(w, 3), "cpu_s": round(c, 3), "step": what}
                              for w, c, what in sorted(slowest, reverse=True)[:3]],
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{platform.system()} {platform.release()}, Blender (bpy) {bpy.app.version_string}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--proxy-views", action="store_true", help="also render the 3D-aware proxy views")
    parser.add_argument("--frames-per-step", type=int, default=job_writer.FRAMES_PER_STEP)
    parser.add_argument("--budget", type=float, default=job_writer.STEP_BUDGET_S,
                        help="no further render in a step after this many seconds")
    parser.add_argument("--background-blender", action="store_true",
                        help="render in a background Blender (here: a Python with the bpy module) instead of a few "
                             "renders per tick in this process")
    parser.add_argument("--blocking", action="store_true", help="time prepare_job as one call (the old Generate)")
    parser.add_argument("--out", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="p3d-ui-probe-"))
    try:
        result = probe(out.resolve(), args.frames, args.size, args.proxy_views, args.frames_per_step, args.budget,
                       args.blocking, args.background_blender)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{result['frames']} frames at {result['size']} px, proxy views {'on' if result['proxy_views'] else 'off'}, "
          f"{'blocking prepare_job' if result['blocking'] else 'renders in a background Blender' if result['background_blender'] else f'at most {args.frames_per_step} frame(s) per step'}")
    print(f"{'main-thread call':48s} {'calls':>6s} {'total s':>8s} {'max s':>7s} {'median s':>9s} {'max CPU s':>10s}")
    for r in result["rows"]:
        print(f"{r['what']:48s} {r['calls']:6d} {r['total_s']:8.3f} {r['max_s']:7.3f} {r['median_s']:9.3f} "
              f"{r['max_cpu_s']:10.3f}")
    for step in result["slowest_steps"]:
        print(f"  slow step {step['step']}: {step['wall_s']:.3f} s ({step['cpu_s']:.3f} s CPU)")
    load = f", load average {result['load_average']:.1f}" if result["load_average"] is not None else ""
    print(f"longest block: {result['longest_block_s']:.3f} s   machine: {result['machine']}{load}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
