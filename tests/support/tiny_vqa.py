"""Tiny generic-JSONL question files with 1-3 images each, and an in-process 1-step GRPO fit on a
stand-in model: what the export, multi-image and split tests share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.module import GRPOModule

ANATOMIES = ("Liver", "Gallbladder", "Omentum", "Gut")


def write_questions(folder: Path, n: int, *, image_size: int = 56, images: tuple[int, ...] = (1, 2, 3),
                    name: str = "questions.jsonl", seed: int = 0) -> Path:
    """`n` generic-format questions; question i has images[i % len(images)] images (random PNGs)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        paths = []
        for k in range(images[i % len(images)]):
            path = folder / f"{name}.q{i}_{k}.png"
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(path)
            paths.append(path.name)
        gold = i % len(ANATOMIES)
        rows.append({"id": f"q{i}", "question": f"Which anatomy is in frame {i}?", "options": list(ANATOMIES),
                     "answer": "ABCD"[gold], "images": paths})
    out = folder / name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def length_reward(completions: list[str], questions: list, **kwargs: Any) -> list[float]:
    """Spread inside every group whatever a random policy writes, so every step has a gradient."""
    return [float(len(c) % 5) for c in completions]


MODEL_KWARGS: dict[str, Any] = {
    "dtype": "float32", "num_generations": 2, "max_new_tokens": 6, "beta": 0.0, "learning_rate": 1e-2,
    "rewards": {"tests.support.tiny_vqa:length_reward": 1.0},
}


def tiny_fit(model: str, train_file: Path, root: Path, steps: int = 1, datamodule: AnatomyVQADataModule | None = None,
             **model_kwargs: Any) -> tuple[L.Trainer, GRPOModule, AnatomyVQADataModule]:
    """`steps` GRPO steps through `L.Trainer.fit` (CPU, float32, G=2, 6 new tokens, no validation)."""
    module = GRPOModule(model=model, **{**MODEL_KWARGS, **model_kwargs})
    dm = datamodule or AnatomyVQADataModule(train_file=str(train_file), val_fraction=0.0, batch_size=2,
                                            eval_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    return trainer, module, dm
