"""One GRPO step at real size on the CPU: the published Qwen2.5-VL-3B / Qwen3-VL-4B dimensions
(random weights, bf16), LoRA, G = 2, 32 new tokens, one 448x448 image. It shows that the real
dimensions, the family's LoRA targets, mrope positions and (Qwen3-VL) deepstack features work
before anyone pays for a GPU. Prints wall time per phase and peak RSS.

    python benchmarks/cpu_real_size.py                       # both families, one process each
    python benchmarks/cpu_real_size.py --family qwen3-vl     # one of them

The stand-in is written once with `save_pretrained` (about 8 GB per family, under --workdir) and
loaded through the same `load_policy` path as a real checkpoint; the step runs under the real
Lightning `Trainer` and `GRPOModule` with the model section of configs/qwen2_5_vl_3b_qlora.yaml
(LoRA r/alpha, beta, epsilon), minus 4-bit (bf16 LoRA, as the issue asks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2.5-vl", "qwen3-vl")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def run_one(family: str, workdir: Path, new_tokens: int, G: int, image_size: int) -> dict:
    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.module import GRPOModule
    from tests.support.standins import build_standin

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    folder = build_standin(family, workdir / f"{family}-real", size="real")
    t_build = time.perf_counter() - t0

    section = yaml.safe_load((ROOT / "configs" / "qwen2_5_vl_3b_qlora.yaml").read_text())["model"]
    module = GRPOModule(
        model=str(folder), dtype="bfloat16", quantization=None, lora=section["lora"], gradient_checkpointing=False,
        max_pixels=image_size * image_size, num_generations=G, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        beta=section["beta"], epsilon_low=section["epsilon_low"], epsilon_high=section["epsilon_high"],
        rewards={"benchmarks.cpu_real_size:spread_reward": 1.0},
    )
    t0 = time.perf_counter()
    module.configure_model()
    t_load = time.perf_counter() - t0
    data = AnatomyVQADataModule(
        synthetic={"n_train": 4, "n_val": 1, "n_test": 1, "image_size": image_size, "grid": 1, "kinds": ["position"],
                   "questions_per_scene": 1, "unique_scenes": False, "out_dir": str(workdir / f"data-{image_size}")},
        batch_size=1, eval_batch_size=1, num_stages=1,
    )
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-true", max_steps=1, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], default_root_dir=str(workdir))
    trainer.fit(module, datamodule=data)
    image_tokens = int((module.encode(data.train_questions[:1])["input_ids"] == module.family.image_token_id(module.policy)).sum())
    n_params = sum(p.numel() for p in module.policy.parameters())
    n_train = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    return {
        "family": family, "params_b": round(n_params / 1e9, 3), "lora_params_m": round(n_train / 1e6, 2),
        "image_tokens": image_tokens, "G": G, "new_tokens": new_tokens,
        "build_s": round(t_build, 1), "load_s": round(t_load, 1), "step_s": round(timer.seconds, 1),
        **(timer.loss or {}), "peak_rss_gb": round(_peak_rss_gb(), 2), "threads": torch.get_num_threads(),
    }


class StepTimer(L.Callback):
    """Wall time of the one training step (rollout, rewards, reference and policy forwards, backward, update)."""

    def __init__(self) -> None:
        self.seconds, self.loss = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seconds = time.perf_counter() - self._t
        metrics = trainer.callback_metrics  # the first step's loss is ~0 (ratio 1, zero-mean advantages):
        self.loss = {k: round(float(metrics[f"train/{k}"]), 5) for k in ("loss", "grad_norm") if f"train/{k}" in metrics}


def spread_reward(completions: list[str], questions: list, **kwargs) -> list[float]:
    """Different rewards inside the group, so the step has a gradient through every LoRA layer."""
    return [float(i % 2) for i in range(len(completions))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "anatomy_lightning" / "real_size"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--G", type=int, default=2)
    p.add_argument("--image-size", type=int, default=448)
    args = p.parse_args()
    workdir = Path(args.workdir)
    if args.family != "all":
        print(json.dumps(run_one(args.family, workdir, args.new_tokens, args.G, args.image_size)))
        return
    rows = []
    for family in FAMILIES:  # one process each: peak RSS is per family
        cmd = [sys.executable, __file__, "--family", family, "--workdir", str(workdir), "--new-tokens",
               str(args.new_tokens), "--G", str(args.G), "--image-size", str(args.image_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            sys.exit(f"{family} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("  ".join(f"{k:>13}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r[k]):>13}" for k in keys))


if __name__ == "__main__":
    main()
