"""`GroupSignalLogger`: the invalid gradient ratio of every run, whatever else is switched on.

`GroupDiversityCallback` logs the same figures only when augmentation is enabled; a comparison
with plain GRPO (or with dynamic sampling) needs them from every run, measured one way. Tags:
`signal/invalid_gradient_ratio[/<anatomy>]` (zero reward spread), split into
`signal/invalid_all_wrong[/<anatomy>]` (no signal on a question the policy cannot answer: the
paper's figure) and `signal/invalid_all_right[/<anatomy>]` (nothing left to learn).

Measured on the groups the data scheduled: with dynamic sampling that is the first rollout,
before groups without signal were replaced (the module returns it as `sampled_*`), so the
figure says how often the policy meets no-signal questions, not how well the filter worked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from anatomy_lightning.distributed import gather_objects, world_size
from anatomy_lightning.augment.augmenter import group_signal_stats
from anatomy_lightning.data.schema import Question

__all__ = ["SIGNAL_PREFIX", "GroupSignalLogger", "gather_groups", "scheduled_groups"]

SIGNAL_PREFIX = "signal"


def scheduled_groups(outputs: Mapping[str, Any]) -> tuple[Any, Any]:
    """(questions, (N, G) rewards) of the groups the data scheduled, from `training_step`'s outputs:
    with dynamic sampling the first rollout (`sampled_*`, before no-signal groups were replaced),
    else the trained batch (`questions`, `group_rewards`). None for what the step did not return."""
    if "sampled_group_rewards" in outputs:
        return outputs.get("sampled_questions"), outputs["sampled_group_rewards"]
    return outputs.get("questions"), outputs.get("group_rewards")


def gather_groups(questions: list[Question], rewards: Tensor) -> tuple[list[Question], Tensor]:
    """Every rank's (questions, (N, G) rewards), concatenated in rank order, identical on all ranks.

    One `all_gather_object` carries both: ranks may hold different N (last batch), which tensor
    all_gather cannot take, and the rewards are CPU tensors, which NCCL collectives cannot take.
    """
    if world_size() == 1:
        return questions, rewards
    gathered = gather_objects((questions, rewards))
    all_questions = [q for qs, _ in gathered for q in qs]
    return all_questions, torch.cat([r for _, r in gathered], dim=0)


class GroupSignalLogger(Callback):
    """Logs `signal/*` from the (N, G) rewards `training_step` returns.

    Args:
        std_tol: a group with reward std below this has no spread (the module's `std_tol`).
        right_reward_threshold: a zero-spread group whose mean reward reaches this is all right
            (accuracy worth 1 plus a smaller format reward: 1.0 separates the two).
    """

    def __init__(self, std_tol: float = 1e-6, right_reward_threshold: float = 1.0) -> None:
        self.std_tol = std_tol
        self.right_reward_threshold = right_reward_threshold

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, Mapping):
            return  # a skipped step: nothing was sampled
        questions, rewards = scheduled_groups(outputs)
        questions = batch if questions is None else questions
        questions = [q for q in questions if isinstance(q, Question)] if isinstance(questions, (list, tuple)) else []
        if not isinstance(rewards, Tensor) or not questions or len(questions) != rewards.shape[0]:
            return
        stats = group_signal_stats(questions, rewards, self.std_tol, self.right_reward_threshold)
        metrics = {f"{SIGNAL_PREFIX}/{k}": v for k, v in stats.items() if k.startswith("invalid_")}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(questions))
