"""Training samples in TensorBoard (issue 23): prompts with their images and all G completions with
rewards and advantages, from a real CLI `fit` into a real event file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from anatomy_lightning.cli import main
from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.samples import sample_table

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_table_has_one_row_per_completion_with_its_reward_parts_and_advantage() -> None:
    q = Question(id="q", question="Which organ?", options=["liver", "gall|bladder"], answer_index=1, images=["a.png"])
    table = sample_table(q, ["<answer>B</answer>", "A\nno"], torch.tensor([1.5, 0.0]), torch.tensor([0.7071, -0.7071]),
                         {"accuracy": torch.tensor([1.0, 0.0]), "format": torch.tensor([0.5, 0.0])})
    lines = table.splitlines()
    assert "**gold** B. gall|bladder" in table and "**images** a.png" in table
    assert lines[-4] == "| # | completion | reward | accuracy | format | advantage |"
    assert lines[-2:] == ["| 0 | `<answer>B</answer>` | 1.500 | 1.000 | 0.500 | +0.707 |",
                          "| 1 | `A no` | 0.000 | 0.000 | 0.000 | -0.707 |"]


def test_fit_writes_samples_with_images_to_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 2, "val_check_interval": 1000, "enable_progress_bar": False, "callbacks": [],
                    "enable_checkpointing": False},
        "curriculum": {"enabled": False}, "augmentation": {"enabled": False, "encoder": "jaccard"},
        "model": {"num_generations": 3, "max_new_tokens": 5},
        "evaluation": {"sample_every_n_steps": 1, "sample_prompts": 2},
        "data": {"batch_size": 2, "synthetic": {"n_train": 6, "n_val": 2, "n_test": 2, "image_size": 64}},
    }))
    main(["fit", "--config", str(DEMO), "--config", str(override), "--run_name=samples"])
    runs = sorted((tmp_path / "outputs" / "tensorboard" / "samples").iterdir())
    ea = EventAccumulator(str(runs[-1]), size_guidance={"tensors": 0, "images": 0})
    ea.Reload()
    texts = {t: ea.Tensors(t) for t in ea.Tags()["tensors"] if t.startswith("train/sample")}
    assert set(texts) == {"train/sample_0/text_summary", "train/sample_1/text_summary"}, ea.Tags()
    assert len(texts["train/sample_0/text_summary"]) == 2  # every step (sample_every_n_steps: 1)
    table = texts["train/sample_1/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert table.count("\n| ") == 1 + 3  # the header and G = 3 completions
    images = {t: ea.Images(t) for t in ea.Tags()["images"]}
    assert set(images) == {"train/sample_0/image_0", "train/sample_1/image_0"}
    assert (images["train/sample_0/image_0"][-1].width, images["train/sample_0/image_0"][-1].height) == (64, 64)
