"""Dynamic sampling: groups without learning signal are replaced by freshly sampled prompts.

The peers' answer to "a group whose G rewards are all equal gives no gradient" (ms-swift's
`dynamic_sample` / `max_resample_times`, DAPO's dynamic sampling): after a step's rollout, keep
the groups with reward spread, draw new prompts for the rest, roll them out, keep those with
spread, and repeat up to `max_resample_times` rounds. If the batch is still short, the no-signal
groups fill it (original questions first), so every step trains on exactly N prompts x G
completions and every rank runs the same number of row chunks. Every generated completion
counts towards compute, kept or not (`Selection.generated`).

GDQA (augment/) answers the same problem by *rewriting* the hard question; comparing the two at
equal compute is the point of the ablation's `dynamic` arm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.advantages import GroupAdvantages
from anatomy_lightning.grpo.rollout import Rollouts
from anatomy_lightning.grpo.sequences import Rollout

__all__ = ["Piece", "Selection", "StepSampler", "dynamic_sample", "merge_pieces"]


@dataclass
class Piece:
    """One rollout of a step: its questions, completions and (N*G,) rewards."""

    questions: list[Question]
    rollout: Rollout
    rewards: Tensor  # (N*G,)
    per_fn: dict[str, Tensor]  # reward function -> (N*G,)
    has_signal: Tensor  # (N,) bool


@dataclass
class Selection:
    """What a dynamic-sampling step kept: (piece, group) pairs in batch order, plus its bookkeeping."""

    pieces: list[Piece]
    picks: list[tuple[int, int]]
    rounds: int = 0  # resampling rounds run (0: the first rollout already had signal everywhere)
    generated: int = 0  # completions generated in this step, every round included
    filled_without_signal: int = 0  # groups without signal kept to fill the batch

    @property
    def first(self) -> Piece:
        """The rollout of the scheduled batch (what the data asked for)."""
        return self.pieces[0]

    @property
    def unchanged(self) -> bool:
        """True when the step trains on the first rollout as it was (nothing to rebuild)."""
        n = len(self.pieces[0].questions)
        return self.picks == [(0, g) for g in range(n)]


def dynamic_sample(
    first: Piece,
    resample: Callable[[int, int], Piece | None],
    max_resample_times: int,
) -> Selection:
    """Pick N groups with signal, drawing new prompts for the missing ones.

    `resample(n, round)` rolls out n fresh prompts and returns their Piece (None: no prompts left
    to draw). Groups are kept in the order they were found; without enough signal after
    `max_resample_times` rounds, no-signal groups fill the batch, the first rollout's first.
    """
    n_target = len(first.questions)
    pieces = [first]
    picks = [(0, g) for g in range(n_target) if bool(first.has_signal[g])]
    generated = first.rollout.completion_ids.shape[0]
    rounds = 0
    while len(picks) < n_target and rounds < max_resample_times:
        rounds += 1
        piece = resample(n_target - len(picks), rounds)
        if piece is None:
            break
        pieces.append(piece)
        generated += piece.rollout.completion_ids.shape[0]
        k = len(pieces) - 1
        picks += [(k, g) for g in range(len(piece.questions)) if bool(piece.has_signal[g])][: n_target - len(picks)]
    filled = 0
    if len(picks) < n_target:
        for k, piece in enumerate(pieces):
            for g in range(len(piece.questions)):
                if len(picks) < n_target and not bool(piece.has_signal[g]):
                    picks.append((k, g))
                    filled += 1
    if all(k == 0 for k, _ in picks):
        picks.sort()  # only the first rollout's groups: train on it as it was, in batch order
    return Selection(pieces, picks, rounds, generated, filled)


def merge_pieces(
    selection: Selection, pad_id: int
) -> tuple[list[Question], Tensor, Tensor, Tensor, list[str], Tensor, dict[str, Tensor]]:
    """The picked groups as one batch: questions, completion ids / mask / truncated (right padded
    to the longest), texts, rewards and per-function rewards, in pick order."""
    G = selection.pieces[0].rollout.group_size
    questions, ids, masks, truncated, texts, rewards = [], [], [], [], [], []
    per_fn: dict[str, list[Tensor]] = {k: [] for k in selection.pieces[0].per_fn}
    for k, g in selection.picks:
        piece = selection.pieces[k]
        rows = slice(g * G, (g + 1) * G)
        questions.append(piece.questions[g])
        ids.append(piece.rollout.completion_ids[rows])
        masks.append(piece.rollout.completion_mask[rows])
        truncated.append(piece.rollout.truncated[rows])
        texts += piece.rollout.texts[rows]
        rewards.append(piece.rewards[rows])
        for name in per_fn:
            per_fn[name].append(piece.per_fn[name][rows])
    width = max(t.shape[1] for t in ids)
    ids = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_id) for t in ids]
    masks = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0.0) for t in masks]
    return (
        questions,
        torch.cat(ids),
        torch.cat(masks),
        torch.cat(truncated),
        texts,
        torch.cat(rewards),
        {name: torch.cat(parts) for name, parts in per_fn.items()},
    )



Score = Callable[[Rollout, list[Question]], tuple[Tensor, dict[str, Tensor]]]
Advantages = Callable[[Tensor, dict[str, Tensor]], GroupAdvantages]
StepBatch = tuple[list[Question], Rollout, Tensor, dict[str, Tensor], Selection]


class StepSampler:
    """The rollout a training step learns from, with dynamic sampling and same-step GDQA.

    The batch is rolled out and scored; with same-step augmentation its hard groups without signal
    are first replaced by rewrites of the same questions (the DataModule's `replacement_questions`,
    `rewrite_rounds` rounds: a question whose rewrite got signal is done, the others are rewritten
    again), then with `model.dynamic_sample` fresh prompts are drawn (`resample_questions`,
    `fresh_rounds` rounds) for what is still without signal. Groups still without signal fill the
    batch, the scheduled ones first.
    """

    def __init__(self, rollouts: Rollouts, score: Score, sampling: dict[str, Any], num_generations: int,
                 advantages: Advantages) -> None:
        self.rollouts, self.score, self.sampling = rollouts, score, sampling
        # (rewards, per-function rewards) -> GroupAdvantages with the run's estimator and aggregation,
        # so that "has signal" here is exactly what the training step computes
        self.G, self.advantages = num_generations, advantages

    def piece(self, questions: list[Question]) -> Piece:
        """Roll out and score `questions`: one Piece of a (dynamically sampled) step."""
        ro = self.rollouts.sample(questions, self.G, **self.sampling)
        rewards, per_fn = self.score(ro, questions)  # NaN where no reward function could score
        signal = self.advantages(rewards, per_fn)
        return Piece(questions, ro, rewards, per_fn, signal.has_signal.cpu())

    def sample(self, batch: list[Question], datamodule: Any, step: int, fresh_rounds: int,
               rewrite_rounds: int, micro: int = 0) -> tuple[StepBatch, dict[str, int]]:
        """(questions, rollout, rewards, per-function rewards, selection) of the step, and the draw counts.

        `micro` is the rollout's place in the step's accumulation window (`trainer.accumulate_grad_batches`):
        each rollout of a step draws its own fresh prompts."""
        first = self.piece(batch)
        rewrite = rewrite_rounds if not bool(first.has_signal.all()) else 0
        draw, counts = self._draws(first, datamodule, step, rewrite, fresh_rounds, micro)
        sel = dynamic_sample(first, draw, rewrite + fresh_rounds)
        if sel.unchanged:
            return (batch, first.rollout, first.rewards, first.per_fn, sel), counts
        return (*self.merged(sel), sel), counts

    def merged(self, sel: Selection) -> tuple[list[Question], Rollout, Tensor, dict[str, Tensor]]:
        """The picked groups of several rollouts as one Rollout (prompts re-encoded, completions as sampled)."""
        pad_id = self.rollouts.processor.tokenizer.pad_token_id
        questions, ids, mask, truncated, texts, rewards, per_fn = merge_pieces(sel, pad_id)
        ro = self.rollouts.from_completions(questions, ids, mask, truncated, texts, self.G)
        return questions, ro, rewards, per_fn

    def _draws(self, first: Piece, datamodule: Any, step: int, rewrite_rounds: int,
               fresh_rounds: int, micro: int = 0) -> tuple[Callable[[int, int], Piece | None], dict[str, int]]:
        """`dynamic_sample`'s resample function for this step: rewrites first, then fresh prompts."""
        rewards = first.rewards.detach().view(-1, self.G).cpu()
        pending = [g for g in range(len(first.questions)) if not bool(first.has_signal[g])]
        counts = {"rewrite_rounds": 0, "fresh_rounds": 0, "rewrites": 0}

        def draw(n: int, round_: int) -> Piece | None:
            nonlocal pending
            if counts["rewrite_rounds"] < rewrite_rounds and pending:
                counts["rewrite_rounds"] += 1
                pairs = datamodule.replacement_questions(
                    [first.questions[g] for g in pending], rewards[pending], step, counts["rewrite_rounds"]
                )[:n]
                if pairs:
                    piece = self.piece([r for _, r in pairs])
                    counts["rewrites"] += len(pairs)
                    # originals whose rewrite still has no signal are rewritten again next round
                    pending = [pending[i] for k, (i, _) in enumerate(pairs) if not bool(piece.has_signal[k])]
                    return piece
                pending = []
            if counts["fresh_rounds"] < fresh_rounds:
                counts["fresh_rounds"] += 1
                resample = getattr(datamodule, "resample_questions", None)
                if resample is None:
                    raise ValueError(
                        "model.dynamic_sample needs a datamodule with resample_questions(n, key) "
                        "(AnatomyVQADataModule has it); set model.dynamic_sample: false"
                    )
                # the step's first rollout keeps the key it always had (runs without accumulation unchanged)
                where = f"{step}" if micro == 0 else f"{step}.{micro}"
                questions = resample(n, f"{where}/{counts['fresh_rounds']}")
                return self.piece(questions) if questions else None
            return None

        return draw, counts
