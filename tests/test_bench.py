"""python -m dp3d_core.bench at the tiny size: both modes recorded, the fast path does fewer FLOPs."""
from __future__ import annotations

import json

import pytest
import torch

from dp3d_core import bench


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict:
    previous = torch.get_num_threads()
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    try:
        assert bench.main(["--size", "tiny", "--steps", "1", "--threads", "1", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(previous)
    return json.loads(path.read_text())


def test_json_has_both_modes_with_positive_numbers(record: dict) -> None:
    assert set(record["modes"]) == {"official", "fast"}
    for mode in record["modes"].values():
        for key in ("s_per_step", "s_per_frame", "s_per_frame_50_steps", "flops_per_step", "achieved_tflops"):
            assert mode[key] > 0, key
        assert mode["peak_memory_bytes"] >= 0 and mode["peak_memory_method"]
        assert mode["timed_steps"] == 1
    assert record["config"]["size"] == "tiny" and record["config"]["views"] == 8
    assert record["machine"]["torch"] == torch.__version__


def test_fast_needs_fewer_flops(record: dict) -> None:
    official, fast = record["modes"]["official"]["flops_per_step"], record["modes"]["fast"]["flops_per_step"]
    assert fast < official
    assert record["ratio"]["flops_fast_over_official"] == pytest.approx(fast / official)
    assert record["ratio"]["speedup_official_over_fast"] > 0


def test_fast_gives_the_official_guided_eps(record: dict) -> None:
    """fp32 rounding only (tests/test_fast_path.py has the exact float64 comparison)."""
    assert record["ratio"]["eps_relative_l2_fast_vs_official"] < 1e-4
    assert record["config"]["first_timestep"] == 981


def test_flop_count_includes_attention(record: dict) -> None:
    """CPU SDPA is counted (torch's counter alone only knows the CUDA kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 64, 8)
    bench._register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 64 * 64 * 8)


def test_bad_requests_get_clear_errors(capsys) -> None:
    with pytest.raises(bench.BenchError, match="steps"):
        bench.run_bench("tiny", steps=0)
    if not torch.cuda.is_available():
        assert bench.main(["--size", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--size", "huge"])


def test_pipeline_options_run_and_reset() -> None:
    """Every option runs a real pipeline call; options are undone before the next (default twice = same state)."""
    from dp3d_core import bench_options

    record = bench_options.run_options("tiny", "fp32", "cpu", steps=1,
                                       names=["default", "sequential-passes", "attention-slicing", "vae-slicing",
                                              "model-offload"])
    options = record["options"]
    assert options["model-offload"] == {"what": bench_options.OPTIONS["model-offload"].what,
                                        "skipped": "needs a CUDA device"}
    for name in ("default", "sequential-passes", "attention-slicing", "vae-slicing"):
        assert options[name]["s_per_call"] > 0 and options[name]["steps"] == 1
    table = bench_options.format_table(record)
    assert "attention-slicing" in table and "skipped" in table


def test_pipeline_options_bad_requests(capsys) -> None:
    from dp3d_core import bench_options

    assert bench_options.main(["--options", "nonsense"]) == 2
    assert "unknown option(s) nonsense" in capsys.readouterr().err


@pytest.mark.parametrize("choice, compiled_modes", [("fast", {"fast"}), ("both", {"official", "fast"})])
def test_compile_choice_compiles_the_chosen_modes(monkeypatch, choice: str, compiled_modes: set) -> None:
    """--compile compiles the fast mode only (official eager, as the official code runs); 'both' both. Dynamo
    traces for real; a recording backend stands in for inductor (too slow here) and notes the mode running."""
    import torch._dynamo

    from dp3d_core.models import DiffPortrait3DDenoiser

    running: list[str] = []
    traced: set[str] = set()

    def backend(gm, example_inputs):
        traced.add(running[-1])
        return gm.forward

    original = DiffPortrait3DDenoiser.compile_networks
    monkeypatch.setattr(DiffPortrait3DDenoiser, "compile_networks", lambda self: original(self, backend=backend))
    for name in ("official", "fast"):
        step = getattr(bench, f"{name}_step")
        monkeypatch.setattr(bench, f"{name}_step",
                            lambda *a, _step=step, _name=name: (running.append(_name), _step(*a))[1])
    torch._dynamo.reset()
    try:
        record = bench.run_bench("tiny", steps=1, compile=choice, threads=1)
    finally:
        torch._dynamo.reset()
    assert traced == compiled_modes
    assert record["config"]["compile"] == choice
    assert record["ratio"]["eps_relative_l2_fast_vs_official"] < 1e-4
    with pytest.raises(bench.BenchError, match="compile"):
        bench.run_bench("tiny", steps=1, compile="all")


def test_compile_option_is_undone_by_disable_compile() -> None:
    """The compile option of bench_options is reset between options: after disable_compile nothing is traced."""
    import torch._dynamo

    from dp3d_core import bench_options

    pipe = bench_options.build_pipeline("tiny", torch.float32, torch.device("cpu"))
    graphs: list = []
    torch._dynamo.reset()
    try:
        pipe.enable_compile(backend=lambda gm, example_inputs: (graphs.append(gm), gm.forward)[1])
        pipe.disable_compile()
        reference, conditions = bench_options._images("tiny")
        pipe(reference, conditions, num_inference_steps=1, guidance_scale=3.0, seed=0, output_type="np")
    finally:
        torch._dynamo.reset()
    assert graphs == []
    assert all(getattr(pipe, n)._compiled_call_impl is None for n in ("unet", "reference_unet", "view_controlnet"))


def test_diffportrait360_view_model_with_two_references() -> None:
    """--model diffportrait360: the 360 view modules, front + back reference in both modes, same guided eps."""
    cpu = torch.device("cpu")
    denoiser = bench.build_denoiser("tiny", cpu, torch.float32, model="diffportrait360")
    assert denoiser.view_modules.config.layout == "diffportrait360" and denoiser.view_modules.mid is None
    inputs = bench.make_inputs(denoiser, "tiny", cpu, torch.float32, references=2)
    assert len(inputs["reference"]) == 2
    with torch.no_grad():
        official = bench.official_step(denoiser, 981, inputs)
        fast = bench.fast_step(denoiser, 981, inputs)
        one_reference = bench.fast_step(denoiser, 981, {**inputs, "reference": inputs["reference"][:1]})
    assert float((fast - official).norm() / official.norm()) < 1e-4
    assert float((one_reference - fast).norm() / fast.norm()) > 1e-3  # the back reference is used
    with pytest.raises(bench.BenchError, match="unknown model"):
        bench.run_bench("tiny", steps=1, model="diffportrait4d")
