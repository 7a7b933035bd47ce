"""Peak GPU memory of a GRPO step on one consumer GPU: the Qwen2.5-VL-7B architecture (random
weights) with 4-bit QLoRA, G = 8, 256 new tokens, one 448x448 image per prompt. Target: < 20 GB.

    python benchmarks/gpu_memory.py                  # needs CUDA; builds the 7B checkpoint once (~16 GB disk)
    python benchmarks/gpu_memory.py --model tiny --device cpu --quantization none --new-tokens 8
                                                     # the same code on CPU, peak RSS instead (a smoke check)

Every training knob comes from the shipped config (`--config`, default configs/qwen2_5_vl_7b_qlora.yaml:
LoRA r/alpha, gradient checkpointing, beta (so the adapter-off reference forward runs), epsilon,
logprob_batch_size, the paged 8-bit optimiser, bf16-true); the command line only swaps in the
random-weight model and the sizes. Completions are forced to exactly `--new-tokens` tokens (the
worst case). The step runs under the real Lightning `Trainer` and `GRPOModule`; peaks are taken by
`torch.cuda.max_memory_allocated` / `max_memory_reserved` after generation and after each step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fewer, larger CUDA blocks: what a user of a 24 GB card would set to avoid fragmentation
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": "tiny-qwen2.5-vl", "small": "small-qwen2.5-vl", "3b": "random-qwen2.5-vl-3b", "7b": "random-qwen2.5-vl-7b",
}
NO_CUDA = (
    "CUDA is not available, and this script measures GPU memory. Run it on a machine with an NVIDIA GPU, "
    "or check the code path on CPU with: python benchmarks/gpu_memory.py --model tiny --device cpu "
    "--quantization none --new-tokens 8"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "qwen2_5_vl_7b_qlora.yaml"),
                   help="config whose model section is used")
    p.add_argument("--model", choices=sorted(MODELS), default="7b", help="built-in architecture with random weights")
    p.add_argument("--quantization", choices=("config", "4bit", "8bit", "none"), default="config")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448, help="square synthetic image side (448: 256 image tokens)")
    p.add_argument("--prompts-per-step", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="GRPO steps; the peak is over all of them")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's setting")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--target-gb", type=float, default=20.0)
    p.add_argument("--workdir", default=None, help="where the synthetic data go (default: a temp folder)")
    p.add_argument("--out", default="benchmarks/results/gpu_memory.json", help="JSON results ('' = do not write)")
    args = p.parse_args(argv)
    if args.image_size % 28:
        p.error(f"--image-size={args.image_size}: use a multiple of 28 (patch 14 x merge 2), e.g. 448")
    return args


def resolve_device(requested: str) -> str | None:
    """'cuda' or 'cpu'; None when CUDA was wanted (auto or cuda) but is not there."""
    import torch

    if requested == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def module_settings(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """`GRPOModule` keyword arguments: the config's model section with the benchmark's overrides."""
    import yaml

    from anatomy_lightning.models.loading import LoraSettings

    cfg = yaml.safe_load(Path(args.config).read_text())["model"]
    cfg["model"] = MODELS[args.model]
    cfg["num_generations"] = args.G
    cfg["max_new_tokens"] = cfg["min_new_tokens"] = args.new_tokens  # every completion full length: worst case
    cfg["max_pixels"] = max(cfg.get("max_pixels") or 0, args.image_size * args.image_size)
    if args.quantization != "config":
        cfg["quantization"] = None if args.quantization == "none" else args.quantization
    if args.gradient_checkpointing is not None:
        cfg["gradient_checkpointing"] = args.gradient_checkpointing
    if cfg.get("lora") is not None:
        cfg["lora"] = LoraSettings(**cfg["lora"])
    if device == "cpu":  # 8-bit paged optimisers and bf16 are GPU features; the CPU run only checks the code path
        cfg["dtype"], cfg["optimizer"] = "float32", "adamw"
    return cfg


class MemoryProbe:
    """Peak memory after generation and after each optimiser step (GPU: allocated/reserved; CPU: RSS)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.records: list[dict[str, Any]] = []
        self.weights_gb = 0.0

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.weights_gb = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()

    def record(self, phase: str, step: int) -> None:
        import torch

        row: dict[str, Any] = {"phase": phase, "step": step}
        if self.device == "cuda":
            torch.cuda.synchronize()
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            row["peak_rss_gb"] = _peak_rss_gb()
        self.records.append(row)

    def summary(self) -> dict[str, Any]:
        first = self.records[0] if self.records else {}
        keys = [k for k in ("peak_allocated_gb", "peak_reserved_gb", "peak_rss_gb") if k in first]
        out: dict[str, Any] = {k: max(r[k] for r in self.records) for k in keys}
        for phase in ("generation", "step"):
            rows = [r for r in self.records if r["phase"] == phase]
            for k in keys:
                if rows:
                    out[f"{phase}_{k}"] = max(r[k] for r in rows)
        out["weights_gb"] = self.weights_gb
        return out


def _peak_rss_gb() -> float:
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args: argparse.Namespace, device: str, workdir: Path) -> dict[str, Any]:
    """Run `--steps` GRPO steps under Lightning and return the memory summary."""
    import lightning as L
    import torch
    import yaml
    from torch.utils.data import DataLoader

    from anatomy_lightning.data.loader import load_questions
    from anatomy_lightning.data.synthetic import write_synthetic_split
    from anatomy_lightning.module import GRPOModule

    probe = MemoryProbe(device)

    class ProbedModule(GRPOModule):
        def configure_model(self) -> None:  # peak memory right after each rollout
            super().configure_model()
            sample = self.rollouts.sample

            def probed(*a: Any, **kw: Any) -> Any:
                ro = sample(*a, **kw)
                probe.record("generation", self.global_step)
                self.completion_tokens = int(ro.completion_mask.sum())
                return ro

            self.rollouts.sample = probed  # type: ignore[method-assign]

    class Probe(L.Callback):
        def on_train_start(self, *_: Any) -> None:
            probe.start()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            probe.record("step", trainer.global_step)

    n = args.prompts_per_step * args.steps
    data = write_synthetic_split(workdir / "data", n, seed=0, image_size=args.image_size)
    questions = load_questions(data).questions
    settings = module_settings(args, device)
    trainer_cfg = yaml.safe_load(Path(args.config).read_text()).get("trainer", {})
    module = ProbedModule(**settings)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=trainer_cfg.get("precision", "bf16-true") if device == "cuda" else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir / "run"),
        callbacks=[Probe()],
    )
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(questions, batch_size=args.prompts_per_step, collate_fn=list))
    out = probe.summary()
    out.update(
        seconds=time.perf_counter() - t0,
        completion_tokens_last_step=getattr(module, "completion_tokens", None),
        settings={k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else repr(v))
                  for k, v in settings.items()},
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        records=probe.records,
    )
    return out


def report(result: dict[str, Any], target_gb: float, device: str) -> str:
    lines = [f"device: {result['device']}"]
    if device == "cuda":
        lines[0] += f"    weights resident at the start: {result['weights_gb']:.2f} GB"
        lines.append(f"{'phase':<14}{'peak allocated GB':>20}{'peak reserved GB':>20}")
        for phase in ("generation", "step"):
            lines.append(f"{phase:<14}{result.get(f'{phase}_peak_allocated_gb', float('nan')):>20.2f}"
                         f"{result.get(f'{phase}_peak_reserved_gb', float('nan')):>20.2f}")
        peak = result["peak_reserved_gb"]
        verdict = "PASS" if peak < target_gb else "FAIL"
        lines.append(f"peak reserved {peak:.2f} GB vs target {target_gb:.0f} GB: {verdict}")
    else:
        lines.append(f"peak RSS {result['peak_rss_gb']:.2f} GB (CPU check run; the GPU target does not apply)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device is None:
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)
    sys.path.insert(0, str(ROOT))
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="gpu_memory-")
    workdir = Path(args.workdir or tmp.name)
    result = measure(args, device, workdir)
    result["target_gb"] = args.target_gb
    result["arguments"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
    print(report(result, args.target_gb, device))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
