"""The benchmark scripts: argument checks, the report maths, and (slow) one real step each on the
tiny model, which is what CI can afford; the figures themselves come from running the scripts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


trl_speed = _load("trl_speed")
gpu_memory = _load("gpu_memory")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- trl_speed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [(["--G", "1"], "--G=1 must be >= 2"), (["--steps", "0"], "--steps=0"), (["--systems", "ours"], "--systems")],
)
def test_trl_speed_rejects_bad_arguments(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        trl_speed.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


def test_trl_speed_worker_argv_drops_workdir() -> None:
    argv = ["--model", "tiny", "--workdir", "/x", "--steps", "2", "--workdir=/y"]
    assert trl_speed._without_workdir(argv) == ["--model", "tiny", "--steps", "2"]


def test_step_clock_times_steps_after_the_warm_up(monkeypatch) -> None:
    clock = trl_speed.StepClock("cpu")
    times = iter([10.0, 12.0, 13.0, 15.0])
    cpu = iter([1.0, 2.0, 2.5, 3.5])
    monkeypatch.setattr(trl_speed.time, "perf_counter", lambda: next(times))
    monkeypatch.setattr(trl_speed.time, "process_time", lambda: next(cpu))
    for _ in range(4):
        clock.step_end()
    clock.tokens = [100, 128, 128, 128]
    r = clock.result()
    assert r["step_seconds"] == [2.0, 1.0, 2.0] and r["cpu_seconds_per_step"] == pytest.approx(2.5 / 3)
    assert r["seconds_per_step"] == pytest.approx(5 / 3)
    assert r["tokens_per_step"] == 128 and r["tokens_per_second"] == pytest.approx(128 * 3 / 5)
    assert r["peak_rss_mb"] > 0


def test_summary_ratios_and_table() -> None:
    results = {
        "anatomy_lightning": {"seconds_per_step": 2.0, "cpu_seconds_per_step": 1.0, "tokens_per_second": 64.0,
                              "tokens_per_step": 128, "peak_rss_mb": 900.0, "peak_rss_above_start_mb": 50.0},
        "trl": {"seconds_per_step": 5.0, "cpu_seconds_per_step": 4.0, "tokens_per_second": 25.6,
                "tokens_per_step": 128, "peak_rss_mb": 1000.0, "peak_rss_above_start_mb": 100.0},
    }
    ratios = trl_speed.summarize(results)
    assert ratios["steps_per_second"] == pytest.approx(2.5)
    assert ratios["tokens_per_second"] == pytest.approx(2.5)
    assert ratios["peak_rss_mb"] == pytest.approx(0.9) and ratios["peak_rss_above_start_mb"] == pytest.approx(0.5)
    table = trl_speed.format_table(results, ratios)
    assert ratios["steps_per_cpu_second"] == pytest.approx(4.0)
    assert "x2.50" in table and "x4.00" in table and "x0.90" in table and "anatomy_lightning" in table
    assert trl_speed.summarize({"trl": results["trl"]}) == {}


def test_rounds_pool_timed_steps_and_keep_the_highest_peak() -> None:
    a = {"step_seconds": [1.0, 3.0], "step_cpu_seconds": [1.0, 1.0], "tokens_per_step": 10.0, "peak_rss_mb": 5.0,
         "rss_at_start_mb": 1.0, "seconds_per_step": 2.0, "cpu_seconds_per_step": 1.0, "tokens_per_second": 5.0}
    b = dict(a, step_seconds=[2.0], step_cpu_seconds=[4.0], peak_rss_mb=7.0)
    pooled = trl_speed.pool_rounds([a, b])
    assert pooled["seconds_per_step"] == pytest.approx(2.0) and pooled["cpu_seconds_per_step"] == pytest.approx(2.0)
    assert pooled["peak_rss_mb"] == 7.0 and pooled["rounds"] == 2 and pooled["tokens_per_second"] == pytest.approx(5.0)


@pytest.mark.parametrize("system", ["anatomy_lightning", "trl"])
def test_trl_speed_one_step_each_on_the_tiny_model(system: str, tmp_path: Path) -> None:
    """Both systems produce exactly G * N * L tokens per step: the fixed-length setting holds in both."""
    if system == "trl":
        pytest.importorskip("trl", reason="TRL is a benchmark-only dependency (benchmarks/requirements.txt)")
    args = trl_speed.parse_args(["--model", "tiny", "--steps", "1", "--G", "2", "--new-tokens", "4",
                                 "--prompts-per-step", "2", "--image-size", "56", "--device", "cpu"])
    model_dir, data = trl_speed.prepare_inputs(args, tmp_path)
    result = trl_speed.RUNNERS[system](args, model_dir, data, tmp_path)
    assert len(result["step_seconds"]) == 1 and result["seconds_per_step"] > 0
    assert result["tokens_per_step"] == 2 * 2 * 4
    assert result["peak_rss_mb"] > 0


# -- gpu_memory ------------------------------------------------------------------------------------


def test_gpu_memory_exits_with_a_clear_message_without_cuda(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_memory.main(["--out", ""])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err


def test_gpu_memory_settings_come_from_the_7b_qlora_config() -> None:
    import yaml

    args = gpu_memory.parse_args([])
    shipped = yaml.safe_load(Path(args.config).read_text())["model"]
    cfg = gpu_memory.module_settings(args, "cuda")
    assert cfg["model"] == "random-qwen2.5-vl-7b"  # the benchmark's overrides
    assert cfg["num_generations"] == 8 and cfg["max_new_tokens"] == cfg["min_new_tokens"] == 256
    assert cfg["max_pixels"] >= 448 * 448
    for key in ("quantization", "gradient_checkpointing", "beta", "optimizer", "logprob_batch_size", "dtype"):
        assert cfg[key] == shipped[key], key  # everything else as shipped
    assert cfg["lora"].r == shipped["lora"]["r"]
    cpu = gpu_memory.module_settings(gpu_memory.parse_args(["--quantization", "none", "--model", "tiny"]), "cpu")
    assert cpu["quantization"] is None and cpu["dtype"] == "float32" and cpu["optimizer"] == "adamw"


def test_gpu_memory_cpu_check_run(tmp_path: Path) -> None:
    result = gpu_memory.main(["--model", "tiny", "--device", "cpu", "--quantization", "none", "--G", "2",
                              "--new-tokens", "4", "--image-size", "56", "--steps", "1", "--workdir", str(tmp_path),
                              "--out", str(tmp_path / "memory.json")])
    assert result["peak_rss_gb"] > 0 and result["completion_tokens_last_step"] == 2 * 4
    assert [r["phase"] for r in result["records"]] == ["generation", "step"]
    assert (tmp_path / "memory.json").is_file()
