"""Questions with 1-3 images through the whole pipeline on tiny stand-ins of a fast-path family
(Qwen2.5-VL) and a generic one (Gemma 3): prompts hold every image, a real GRPO step through
`L.Trainer.fit` moves the adapter, `test` lists every image per prediction, and every rewriter
keeps all of a question's images. (Log-probs equal generate's logits with 1-2 images:
tests/grpo/test_family_logprobs.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from anatomy_lightning.augment.registry import REWRITERS
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.evaluation import EvaluationSettings
from anatomy_lightning.grpo.prompts import build_messages
from tests.support.standins import standin_image_size
from tests.support.tiny_vqa import tiny_fit, write_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3"])
def test_grpo_step_and_test_report_with_one_to_three_images(family: str, standin, tmp_path: Path) -> None:
    data = write_questions(tmp_path / "data", 3, image_size=standin_image_size(family), images=(1, 2, 3))
    dm = AnatomyVQADataModule(train_file=str(data), val_fraction=0.0, batch_size=3, eval_batch_size=3)
    trainer, module, dm = tiny_fit(str(standin(family)), data, tmp_path, lora=LORA, datamodule=dm)
    assert trainer.global_step == 1 and sorted(len(q.images) for q in dm.train_questions) == [1, 2, 3]
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the step trained (B starts at zero)
    assert torch.isfinite(trainer.callback_metrics["train/reward"])
    for q in dm.train_questions:  # one image slot per image in the prompt the processor saw
        assert [c["type"] for c in build_messages(q, "", "{question}")[-1]["content"]].count("image") == len(q.images)

    preds = tmp_path / "preds.jsonl"
    module.evaluation = EvaluationSettings(predictions_file=str(preds), max_new_tokens=4)
    trainer.test(module, datamodule=AnatomyVQADataModule(train_file=str(data), test_file=str(data),
                                                         val_fraction=0.0, eval_batch_size=3))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [len(r["images"]) for r in rows] == [1, 2, 3]
    assert [r["images"] for r in rows] == [q.images for q in sorted(dm.train_questions, key=lambda q: q.id)]


def test_every_rewriter_keeps_all_images() -> None:
    q = Question(id="q", question="What anatomy is at the top-left of the frame?",
                 options=["Liver", "Gut", "Gallbladder", "Omentum"], answer_index=1,
                 images=["/a/1.png", "/a/2.png", "/a/3.png"], stage=0, similarity=0.5)
    rng = random.Random(0)
    names = [n for n in REWRITERS if n not in ("local_model", "chain")]
    rewrites = [r for n in names for r in REWRITERS[n]()(q, rng)]
    rewrites += REWRITERS["chain"](["template_paraphrase", "shuffle_options"])(q, rng)
    assert {r.metadata["rewriter"] for r in rewrites} >= set(names)
    assert all(r.images == q.images for r in rewrites)
