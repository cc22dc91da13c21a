"""Two processes (DDP over gloo, started by ``accelerate launch``) train like one process at the same global batch.

Stages 1, 2 and 3 on the tiny model: the loss of every step and the final weights agree within float tolerance;
a checkpoint written by two processes resumes on one and continues exactly like the uninterrupted run.

This file is also the script the launched processes run (``--worker``), so one launch covers all three stages.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("1", "2", "3")
STEPS = 2
SIZE = 32


def stage_config(stage: str, data: Path, model: Path, out: Path):
    from tests.test_training import config
    extra = {"1": {}, "2": {"ema": True, "ema_decay": 0.9, "grad_accum": 2, "uncond_prob": 0.3},
             "3": {"uncond_prob": 0.5, "num_targets": 4}}[stage]
    # float64: a batch of 2 and two batches of 1 round differently, and Adam (update g / (|g| + eps)) turns the
    # rounding error of a gradient near eps into an update error near lr; in float64 that stays below 1e-9, while
    # any real difference (a sample trained twice or not at all, gradients not averaged, another sample's noise)
    # shows up at full size.
    return config(stage, data, model, out, lr=1e-3, dtype="float64", max_steps=STEPS, log_every=1,
                  image_size=SIZE, **extra)


def worker(data: Path, model: Path, out: Path) -> None:
    """Run in each launched process: every stage for STEPS steps, then stage 2 once more, stopped after a step."""
    import logging

    from training.train import Trainer
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for stage in STAGES:
        Trainer(stage_config(stage, data, model, out / "full"), resume=False).run()
    trainer = Trainer(stage_config("2", data, model, out / "cut"), resume=False)
    assert trainer.world == 2 and len(trainer.positions) == 1
    trainer.run(max_steps=1)
    if trainer.is_main:
        (out / "world.json").write_text(json.dumps({"world": trainer.world, "engine": trainer.engine.value}))


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def weights(stage_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9, msg=key)


def well_conditioned_model(path: Path) -> Path:
    """dp3d_core.tiny's networks with two levels instead of four and no sharpened attention. The four-level tiny
    model has 1x1 latent levels, where a GroupNorm normalises one or two values: there, even float64 rounding
    grows into gradient differences of 1e-7 (stage 3) and the runs drift apart within two steps."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from dp3d_core.model_folder import save_model_folder
    from dp3d_core.models.config import network_configs, official_params
    from dp3d_core.models.prompt_embedding import PromptEmbedding
    from dp3d_core.models.view_modules import ViewModules
    from dp3d_core.tiny import TINY_OVERRIDES, TINY_VAE, _wake_zero_parameters
    configs = network_configs(official_params({**TINY_OVERRIDES, "channel_mult": [1, 2],
                                               "attention_resolutions": [1, 2]}))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet = {**configs["unet"], "sample_size": SIZE // 8}
    parts = {"unet": UNet2DConditionModel(**unet), "reference_unet": UNet2DConditionModel(**unet),
             "view_controlnet": ControlNetModel(**configs["view_controlnet"]),
             "view_modules": ViewModules(**configs["view_modules"]),
             "vae": AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE, scaling_factor=0.18215,
                                  **TINY_VAE)}
    for module in parts.values():
        _wake_zero_parameters(module, generator)  # zero convolutions / projections would hide the stages' paths
    parts["prompt_embedding"] = PromptEmbedding.from_tensor(
        torch.randn(1, 77, configs["unet"]["cross_attention_dim"], generator=generator))
    return save_model_folder(parts, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    from tests.test_training import make_dataset
    base = tmp_path_factory.mktemp("multiprocess")
    data = base / "data"
    make_dataset(data)
    model = well_conditioned_model(base / "model")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), __file__, "--worker", str(data), str(model), str(base / "two")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # the same stages in this process: one process, the same global batch
    from training.train import Trainer
    torch.set_num_threads(1)
    for stage in STAGES:
        Trainer(stage_config(stage, data, model, base / "one"), resume=False).run()
    return {"base": base, "data": data, "model": model, "log": done.stderr}


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_like_one(runs, stage: str) -> None:
    one, two = runs["base"] / "one" / f"stage{stage}", runs["base"] / "two" / "full" / f"stage{stage}"
    assert json.loads((runs["base"] / "two" / "world.json").read_text())["world"] == 2
    first, second = losses(one), losses(two)
    assert len(first) == len(second) == STEPS
    assert second == pytest.approx(first, rel=1e-9)
    before = load_file(str(runs["model"] / {"1": "reference_unet", "2": "view_controlnet",
                                             "3": "view_modules"}[stage] / "diffusion_pytorch_model.safetensors"))
    trained = weights(two, STEPS)
    assert any(not torch.equal(before[k], trained[f"network.{k}"]) for k in before)  # it did train
    assert_close(weights(one, STEPS), trained)
    # written once, by the main process: one log line per step, one model folder
    assert (two / "model" / "model_index.json").is_file()
    assert [json.loads(line)["world_size"] for line in (two / "log.jsonl").read_text().splitlines()] == [2] * STEPS


def test_logs_name_the_world_size(runs) -> None:
    assert "2 process(es) (MULTI_CPU)" in runs["log"] and "global batch 2 = 1 per process x 2" in runs["log"]


def test_a_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path: Path) -> None:
    import shutil

    from training.train import Trainer
    cut = tmp_path / "cut"
    shutil.copytree(runs["base"] / "two" / "cut", cut)
    progress = json.loads((cut / "stage2" / "checkpoints" / "step_0000001" / "progress.json").read_text())
    assert progress["world_size"] == 2 and progress["step"] == 1
    trainer = Trainer(stage_config("2", runs["data"], runs["model"], cut), resume=True)
    assert trainer.world == 1 and trainer.progress.step == 1
    loss = trainer.train_step()
    assert loss == pytest.approx(losses(runs["base"] / "one" / "stage2")[1], rel=1e-9)
    trainer.save_checkpoint()
    assert_close(weights(runs["base"] / "one" / "stage2", STEPS), weights(cut / "stage2", STEPS))
    ema = load_file(str(cut / "stage2" / "checkpoints" / "step_0000002" / "ema.safetensors"))
    expected = load_file(str(runs["base"] / "one" / "stage2" / "checkpoints" / "step_0000002" / "ema.safetensors"))
    assert_close(expected, ema)


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_and_deepspeed_on_the_cpu_are_refused_before_any_work(variable: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` (or deepspeed_zero2.yaml) sets; on a
    machine without GPUs accelerate cannot run either engine (docs/TRAINING.md), so the trainer says so first."""
    from training.train import Trainer, TrainingError
    monkeypatch.setenv(variable, "true")
    with pytest.raises(TrainingError, match="only on GPUs.*--multi_gpu"):
        Trainer(stage_config("1", tmp_path / "no-data", tmp_path / "no-model", tmp_path / "out"), resume=False)
    assert not (tmp_path / "out").exists()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
