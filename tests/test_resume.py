"""Resumable denoising: DenoisingState through the pipeline and through checkpoint files (tiny model, CPU, fp32)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dp3d_core.denoise_state import (MANIFEST, STATE_DIR, CheckpointPolicy, Checkpoints, DenoisingState,
                                     StateError, pack, unpack)
from dp3d_core.pipeline import Cancelled, DiffPortrait3DPipeline, PipelineError

VIEWS, STEPS, K = 9, 3, 1  # 9 views = two overlapping windows blended at every step; resume after step K


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> DiffPortrait3DPipeline:
    from dp3d_core.tiny import make_tiny_model_folder

    return DiffPortrait3DPipeline.from_pretrained(make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def inputs(pipe: DiffPortrait3DPipeline) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    size = pipe.size_multiple()
    rng = np.random.default_rng(7)
    imgs = [rng.random((size, size, 3)).astype(np.float32) for _ in range(VIEWS + 1)]
    proxies = [imgs[2] if i % 3 == 0 else None for i in range(VIEWS)]  # 3D-aware noise on some views
    return imgs[:1], imgs[1:], proxies


@pytest.mark.parametrize("scheduler, eta", [("ddim", 0.0), ("ddim", 0.8), ("dpm++2m", 0.0)])
def test_resumed_run_equals_uninterrupted(pipe, inputs, tmp_path: Path, scheduler: str, eta: float) -> None:
    """Save the state after step K from inside a full run (to disk, through the checkpoint files), resume from the
    file in a fresh call: the final latents are bit-identical."""
    refs, conds, proxies = inputs
    kwargs = dict(proxy_images=proxies, num_inference_steps=STEPS, guidance_scale=2.0, eta=eta, seed=11,
                  scheduler=scheduler, output_type="latent")
    checkpoints = Checkpoints(tmp_path, "job-a")
    seen: list[int] = []

    def save_at_k(p, step, t, kw):
        seen.append(kw["state"].step)
        assert kw["pred_x0"].shape == kw["latents"].shape
        if kw["state"].step == K:
            checkpoints.save(kw["state"])
    full = pipe(refs, conds, callback_on_step_end=save_at_k, **kwargs).images
    assert seen == list(range(1, STEPS + 1))

    state = Checkpoints(tmp_path, "job-a").load(pytest.fail)
    assert state is not None and state.step == K and state.total_steps == STEPS
    if scheduler == "dpm++2m":
        assert any(isinstance(m, torch.Tensor) for m in state.scheduler["model_outputs"])  # multistep history
    steps_run: list[int] = []
    resumed = pipe(refs, conds, state=state, callback_on_window=lambda s, n, w, nw: steps_run.append(s), **kwargs)
    assert sorted(set(steps_run)) == list(range(K, STEPS))  # only the remaining steps ran
    assert torch.equal(resumed.images, full)

    # the same run without the state differs (the check above could not pass by accident)
    if eta > 0:
        other = pipe(refs, conds, **{**kwargs, "seed": 12}).images
        assert not torch.equal(other, full)


def test_cancel_carries_the_last_completed_step(pipe, inputs) -> None:
    """A cancel in the middle of step 2 hands out the state after step 1 (DPM++ history included); resuming it
    gives the uninterrupted result."""
    refs, conds, proxies = inputs
    kwargs = dict(proxy_images=proxies, num_inference_steps=STEPS, seed=5, scheduler="dpm++2m", eta=0.0,
                  guidance_scale=1.0, output_type="latent")
    full = pipe(refs, conds, **kwargs).images

    def cancel_mid_step(step, num_steps, window, num_windows):
        return {"cancel": True} if (step, window) == (1, 1) else None
    with pytest.raises(Cancelled) as info:
        pipe(refs, conds, callback_on_window=cancel_mid_step, **kwargs)
    state = info.value.state
    assert info.value.step == 1 and state is not None and state.step == 1
    state = state.detached()  # a copy, as a checkpoint file would hold it
    assert torch.equal(pipe(refs, conds, state=state, **kwargs).images, full)

    # a state of other settings is refused with a plain message
    with pytest.raises(PipelineError, match="steps"):
        pipe(refs, conds, state=state, **{**kwargs, "num_inference_steps": STEPS + 2})
    with pytest.raises(PipelineError, match="scheduler"):
        pipe(refs, conds, state=state, **{**kwargs, "scheduler": "ddim"})
    with pytest.raises(PipelineError, match="latents"):
        pipe(refs, conds[:-1], state=state, **{**kwargs, "proxy_images": proxies[:-1]})


# ---------------------------------------------------------------- checkpoint files (no model)

def _state(step: int = 2, seed: int = 0) -> DenoisingState:
    g = torch.Generator().manual_seed(seed)
    return DenoisingState(step=step, total_steps=5, latents=torch.randn(3, 4, 8, 8, generator=g),
                          reference_latents=torch.randn(1, 4, 8, 8, generator=g),
                          scheduler={"model_outputs": [None, torch.randn(3, 4, 8, 8, generator=g)],
                                     "lower_order_nums": 1, "_step_index": step, "_begin_index": None,
                                     "timesteps": torch.tensor([801, 601, 401, 201, 1]), "init_noise_sigma": 1.0,
                                     "disable_corrector": [], "predict_x0": True},
                          scheduler_class="DPMSolverMultistepScheduler", generator=g.get_state())


def _same(a: DenoisingState, b: DenoisingState) -> None:
    assert (a.step, a.total_steps, a.scheduler_class) == (b.step, b.total_steps, b.scheduler_class)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.reference_latents, b.reference_latents)
    assert torch.equal(a.generator, b.generator)
    assert a.scheduler.keys() == b.scheduler.keys()
    for k, v in a.scheduler.items():
        w = b.scheduler[k]
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w) and v.dtype == w.dtype
        elif isinstance(v, list):
            assert len(v) == len(w) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                            for x, y in zip(v, w))
        else:
            assert v == w and type(v) is type(w)


def test_checkpoint_round_trip_and_no_pickles(tmp_path: Path) -> None:
    state = _state()
    _same(unpack(*pack(state)), state)
    ck = Checkpoints(tmp_path, "h1", {"total_steps": 5})
    assert ck.load(pytest.fail) is None                      # nothing saved yet: no warning either
    ck.save(state)
    folder = tmp_path / STATE_DIR
    files = sorted(p.name for p in folder.iterdir())
    assert files[0] == MANIFEST and len(files) == 2 and files[1].endswith(".safetensors")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["job_hash"] == "h1" and manifest["step"] == 2 and manifest["total_steps"] == 5
    _same(ck.load(pytest.fail), state)
    # a newer checkpoint replaces the older one (one tensor file left)
    ck.save(_state(step=3, seed=1))
    assert len(list(folder.glob("*.safetensors"))) == 1 and ck.load(pytest.fail).step == 3
    ck.remove()
    assert not folder.exists()


@pytest.mark.parametrize("damage, words", [
    ("other_job", "another job"),
    ("other_steps", "total_steps"),
    ("truncated", "damaged"),
    ("flipped", "damaged"),
    ("no_tensors", "missing"),
    ("manifest_garbage", "not valid JSON"),
    ("manifest_half", "not valid JSON"),
    ("format", "format"),
])
def test_bad_checkpoints_are_ignored_with_a_warning(tmp_path: Path, damage: str, words: str) -> None:
    Checkpoints(tmp_path, "h1").save(_state())
    folder = tmp_path / STATE_DIR
    tensors = next(folder.glob("*.safetensors"))
    manifest = folder / MANIFEST
    job_hash, expect = "h1", {"total_steps": 5}
    if damage == "other_job":
        job_hash = "h2"
    elif damage == "other_steps":
        expect = {"total_steps": 50}
    elif damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif damage == "flipped":
        data = bytearray(tensors.read_bytes())
        data[-5] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "no_tensors":
        tensors.unlink()
    elif damage == "manifest_garbage":
        manifest.write_bytes(b"\x00\xff garbage")
    elif damage == "manifest_half":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "format":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 99}))
    warnings: list[str] = []
    assert Checkpoints(tmp_path, job_hash, expect).load(warnings.append) is None
    assert len(warnings) == 1 and words in warnings[0] and "step 0" in warnings[0]


def test_kill_between_or_inside_writes_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path, "h1")
    ck.save(_state(step=2))
    folder = tmp_path / STATE_DIR
    # killed inside the next tensor write (temp file only) and after it (new tensor file, old manifest)
    (folder / ".tensors-00003-abcd.safetensors.1a2b3c.tmp").write_bytes(b"half")
    (folder / "tensors-00003-abcd.safetensors").write_bytes(b"complete but not yet in the manifest")
    (folder / f".{MANIFEST}.9f9f9f.tmp").write_text('{"format": 1, "step"')
    state = ck.load(pytest.fail)
    assert state is not None and state.step == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, json.loads(
        (folder / MANIFEST).read_text())["tensors"]["file"]])      # leftovers swept


def test_state_with_unsupported_scheduler_attribute() -> None:
    from dp3d_core.denoise_state import scheduler_state

    class Odd:
        def __init__(self) -> None:
            self.model = object()
    with pytest.raises(StateError, match="model"):
        scheduler_state(Odd())


def test_policy() -> None:
    p = CheckpointPolicy(every_steps=5, every_seconds=10.0, max_overhead=0.02)
    p.start(0, now=0.0)
    assert not p.due(1, 50, now=1.0) and not p.due(4, 50, now=9.9)
    assert p.due(5, 50, now=2.0)                         # K steps
    assert p.due(2, 50, now=10.0)                        # T seconds
    assert p.due(50, 50, now=0.5)                        # the last step is always saved
    p.saved(5, now=2.0, cost=1.0)                        # a slow disk: 1 s per checkpoint
    assert not p.due(10, 50, now=40.0)                   # 38 s * 2 % < 1 s: still too soon
    assert p.due(10, 50, now=52.0)
    assert not p.due(5, 50, now=100.0)                   # never the same step twice
    env = CheckpointPolicy.from_env({"DP3D_CHECKPOINT_EVERY_STEPS": "1", "DP3D_CHECKPOINT_EVERY_SECONDS": "0"})
    assert (env.every_steps, env.every_seconds) == (1, 0.0)


def test_worker_without_a_writable_state_folder_still_finishes(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint that cannot be written (here: ``state`` is a file; the same path as a full or read-only disk)
    costs resumability, not the run: one warning, and every frame is written."""
    from dp3d_core.tiny import make_tiny_model_folder
    from tests.test_worker import kinds, make_job_dir, run_worker

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job_dir = make_job_dir(tmp_path, make_tiny_model_folder(tmp_path / "model"), frames=2, steps=2)
    (job_dir / STATE_DIR).write_text("not a folder")
    rc, events, err = run_worker(job_dir)
    assert rc == 0, err
    warnings = [e["message"] for e in events if e.kind == "warning"]
    assert sum("could not save the denoising checkpoint" in m for m in warnings) == 1, warnings  # once per run
    assert all("state" in m for m in warnings), warnings
    assert kinds(events).count("frame") == 2 and "preview" in kinds(events)
    assert len(list((job_dir / "preview").glob("frame_*.png"))) == 2
