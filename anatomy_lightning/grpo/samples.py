"""Training samples in TensorBoard: a few prompts of a step with their images, and all G completions
with their rewards and advantages (TRL's `log_completions`, readable in the TEXT and IMAGES tabs).

Why all G: GRPO learns from the differences inside a group, so one completion shows little; the
table shows which completions the step pushed up (advantage > 0) and which down, and the image
shows what the model was looking at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anatomy_lightning.data.schema import Question

__all__ = ["log_samples", "sample_table"]

MAX_SIDE = 448  # images are shown at most this large (a screenful, and small event files)
MAX_CHARS = 400  # a completion longer than this is cut in the table (the full text is in the run's rollouts)


def _cell(text: str) -> str:
    """One markdown table cell: no pipes or newlines, long text cut."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " …"


def sample_table(q: Question, completions: list[str], rewards: Tensor, advantages: Tensor,
                 per_fn: dict[str, Tensor]) -> str:
    """Markdown: the question, options and gold, then one row per completion of its group."""
    names = list(per_fn)
    head = (f"**question** {q.question}  \n**options** {' | '.join(q.options)}  \n"
            f"**gold** {q.answer_letter}. {q.answer_text}  \n**images** {', '.join(q.images) or 'none'}\n\n")
    rows = ["| # | completion | reward | " + " | ".join(names) + (" | " if names else "") + "advantage |",
            "|---|---|---|" + "---|" * len(names) + "---|"]
    for i, text in enumerate(completions):
        parts = [str(i), f"`{_cell(text)}`", f"{float(rewards[i]):.3f}",
                 *(f"{float(per_fn[n][i]):.3f}" for n in names), f"{float(advantages[i]):+.3f}"]
        rows.append("| " + " | ".join(parts) + " |")
    return head + "\n".join(rows)


def _chw(image: Any) -> np.ndarray:
    """A PIL image as a uint8 CHW array, at most MAX_SIDE on its longer side."""
    image = image.convert("RGB")
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)  # a writable copy


def log_samples(experiment: Any, step: int, questions: list[Question], texts: list[str], rewards: Tensor,
                advantages: Tensor, per_fn: dict[str, Tensor], group_size: int, load_image: Callable[[str], Any],
                prompts: int = 1) -> None:
    """The first `prompts` groups of the step: `train/sample_<k>` (text) and `train/sample_<k>/image_<j>`."""
    rewards, advantages = rewards.detach().float().cpu(), advantages.detach().float().cpu()
    per_fn = {n: v.detach().float().cpu() for n, v in per_fn.items()}
    for k, q in enumerate(questions[:prompts]):
        rows = slice(k * group_size, (k + 1) * group_size)
        table = sample_table(q, texts[rows], rewards[rows], advantages[rows], {n: v[rows] for n, v in per_fn.items()})
        experiment.add_text(f"train/sample_{k}", table, step)
        for j, path in enumerate(q.images):
            experiment.add_image(f"train/sample_{k}/image_{j}", torch.from_numpy(_chw(load_image(path))), step)
