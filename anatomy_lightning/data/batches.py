"""What the DataModule's loaders are made of: the dataset, the evaluation sampler, the resumable
training loader, the batch type, and how rewrites from the augmenter fill a training batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from anatomy_lightning.data.sampler import Cursor, StageSampler
from anatomy_lightning.data.schema import DataError, Question

__all__ = [
    "Augmenter",
    "QuestionBatch",
    "QuestionDataset",
    "RankSlice",
    "TrainLoader",
    "collate_eval",
    "collate_train",
    "eval_loader",
    "own_generator",
    "refill",
    "train_loader",
]


class Augmenter(Protocol):
    """What the DataModule needs from the augmentation queue (see `augment.augmenter`)."""

    def take(self, n: int, active_stages: set[int] | None = None) -> list[Question]: ...

    def budget(self, batch_size: int) -> int: ...

    # optional (GroupDiversityAugmenter has them): same-step replacement
    # when: str  ("same_step" | "next_batches"); max_rounds_per_step: int
    # def same_step_targets(self, questions, group_rewards) -> list[int]: ...
    # def rewrite_now(self, questions, step, round_) -> list[Question | None]: ...


class QuestionDataset(Dataset):
    """The questions by index; a `Cursor` key (from `StageSampler`) also returns the cursor."""

    def __init__(self, questions: list[Question]) -> None:
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int | Cursor) -> Question | tuple[Question, Cursor]:
        if isinstance(key, Cursor):
            return self.questions[key.index], key
        return self.questions[key]


class RankSlice(Sampler[int]):
    """Sequential evaluation order, one contiguous slice per rank (no padding, no duplicates).

    Slice sizes differ by at most one, so no rank is left without questions while another has
    some: a rank with an empty loader skips validation and the others would wait for it forever
    in the cross-rank reductions of the accuracy.
    """

    def __init__(self, n: int, rank: int, world_size: int, what: str = "evaluation") -> None:
        if 0 < n < world_size:
            raise DataError(
                f"data: {n} {what} questions cannot be split over {world_size} processes (each needs at least one); "
                f"add {what} questions or run on at most {n} devices"
            )
        self.indices = list(range(rank * n // world_size, (rank + 1) * n // world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainLoader(DataLoader):
    """The training DataLoader, marked resumable for Lightning.

    The position inside the epoch lives in the `StageSampler` and is checkpointed with the
    DataModule's own `state_dict`; these two methods only tell Lightning that the loader resumes
    mid-epoch, so it does not warn that resuming from a mid-epoch checkpoint is unreliable.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def own_generator(seed: int) -> torch.Generator:
    """A private generator for a DataLoader: creating an iterator then draws its worker base seed
    from here instead of the global torch RNG, so starting an epoch (or a resumed run) does not
    shift the random stream that sampling completions uses."""
    return torch.Generator().manual_seed(seed)


class QuestionBatch:
    """A batch of questions (and, in training, their sampler cursors) kept opaque to Lightning.

    Under `bf16-true` / `16-true` precision Lightning's `convert_input` walks every batch to cast
    float tensors, recursing into lists and dataclasses, and refuses frozen dataclasses such as
    `Question`: every real-GPU config would crash on its first batch. Our batches hold no tensors
    (prompts are encoded on the device in the module), so nothing needs casting; the DataModule
    unwraps the batch in `on_before_batch_transfer`, after that walk.
    """

    __slots__ = ("questions", "cursors")

    def __init__(self, questions: list[Question], cursors: list[Cursor] | None = None) -> None:
        self.questions, self.cursors = questions, cursors


def collate_train(items: list[tuple[Question, Cursor]]) -> QuestionBatch:
    """Training items: questions with their sampler cursors (recorded as consumed on transfer)."""
    return QuestionBatch([q for q, _ in items], [c for _, c in items])


def collate_eval(items: list[Question]) -> QuestionBatch:
    """Evaluation items: questions only (`cursors` None marks a validation / test batch)."""
    return QuestionBatch(list(items))


def refill(
    questions: list[Question], deferred: Sequence[str], train_questions: Sequence[Question], extra: list[Question]
) -> tuple[list[Question], tuple[str, ...]]:
    """A training batch of `len(questions)` with the `extra` rewrites in it, and the uids deferred
    to the next batch.

    Questions displaced by rewrites earlier (`deferred` uids of `train_questions`) are served first,
    so none is lost; what does not fit now waits for the next batch, in order (uids, so the
    checkpoint stays plain data).
    """
    size = len(questions)
    if deferred:
        by_uid = {q.uid: q for q in train_questions}
        questions = [by_uid[u] for u in deferred if u in by_uid] + questions
    keep = size - len(extra)
    return questions[:keep] + extra, tuple(q.uid for q in questions[keep:])


def train_loader(
    questions: list[Question], sampler: StageSampler, batch_size: int, num_workers: int, seed: int
) -> TrainLoader:
    """Training batches in the `StageSampler`'s order, each question with its cursor."""
    return TrainLoader(
        QuestionDataset(questions),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_train,
        num_workers=num_workers,
        generator=own_generator(seed),
    )


def eval_loader(
    questions: list[Question], batch_size: int, rank: int, world_size: int, what: str, num_workers: int, seed: int
) -> DataLoader:
    """Evaluation batches in file order, this rank's slice only (`RankSlice`); `what` names the split in errors."""
    return DataLoader(
        QuestionDataset(questions),
        batch_size=batch_size,
        sampler=RankSlice(len(questions), rank, world_size, what),
        collate_fn=collate_eval,
        num_workers=num_workers,
        generator=own_generator(seed),
    )
