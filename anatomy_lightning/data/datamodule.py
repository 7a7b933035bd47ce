"""`AnatomyVQADataModule`: questions in, curriculum stages and augmentation injection out.

Batches are plain `list[Question]`: the LightningModule builds prompts with the model's own
processor, so the DataModule stays model-agnostic and cheap, and the curriculum and augmentation
callbacks read the questions directly.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from anatomy_lightning.data.images import describe_image_issues, probe_images
from anatomy_lightning.data.loader import load_questions
from anatomy_lightning.data.sampler import Cursor, StageSampler
from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages
from anatomy_lightning.settings import coerce_settings

log = logging.getLogger(__name__)


@dataclass
class SyntheticSettings:
    """The built-in offline benchmark: seeded surgical scenes written as generic JSONL."""

    n_train: int = 512
    n_val: int = 96
    n_test: int = 192
    seed: int = 0
    image_size: int = 56
    grid: int = 2
    num_options: int = 4
    kinds: tuple[str, ...] = ("position", "relation")  # question kinds: position, relation, tool
    questions_per_scene: int = 2
    unique_scenes: bool = True  # grid 1 has only as many layouts as anatomies: set false there
    out_dir: str = "outputs/synthetic"
    benchmark: str = "v1"  # v2: alike-named anatomies also look alike, under per-frame lighting (docs/benchmark_v2)


class Augmenter(Protocol):
    """What the DataModule needs from the augmentation queue (see `augment.augmenter`)."""

    def take(self, n: int, active_stages: set[int] | None = None) -> list[Question]: ...

    def budget(self, batch_size: int) -> int: ...


class _Questions(Dataset):
    def __init__(self, questions: list[Question]) -> None:
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int | Cursor) -> Question | tuple[Question, Cursor]:
        if isinstance(key, Cursor):
            return self.questions[key.index], key
        return self.questions[key]


class _RankSlice(Sampler[int]):
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


class _TrainLoader(DataLoader):
    """The training DataLoader, marked resumable for Lightning.

    The position inside the epoch lives in the `StageSampler` and is checkpointed with the
    DataModule's own `state_dict`; these two methods only tell Lightning that the loader resumes
    mid-epoch, so it does not warn that resuming from a mid-epoch checkpoint is unreliable.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _own_generator(seed: int) -> torch.Generator:
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


def _collate_train(items: list[tuple[Question, Cursor]]) -> QuestionBatch:
    return QuestionBatch([q for q, _ in items], [c for _, c in items])


def _collate_eval(items: list[Question]) -> QuestionBatch:
    return QuestionBatch(list(items))


class AnatomyVQADataModule(L.LightningDataModule):
    """Loads train/val/test question files (any supported format) or the synthetic scenes.

    Every question gets S(q) (option similarity) and a stage from the training set's quantiles,
    so validation and test accuracy can be reported per stage with the same thresholds.

    Args:
        format: question file format, or "auto" to detect it from the record keys (anatomy_r1,
            easyr1, omnimedvqa, medvlm_r1, medxpertqa, r1, generic).
        fields: read any other JSON/JSONL file: our field -> their key or dotted path, e.g.
            {question: q.text, options: choices, answer: gold.letter, images: media}; implies generic.
        check_images: before training, open every image once (size and mode) and stop on missing,
            empty, undecodable or folder paths, naming their records.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        format: str = "auto",
        fields: dict[str, str] | None = None,
        image_root: str | None = None,
        on_bad_record: str = "error",
        check_images: bool = True,
        synthetic: SyntheticSettings | None = None,
        val_fraction: float = 0.1,
        num_stages: int = 3,
        similarity_encoder: str | None = None,
        similarity_aggregation: str = "mean",
        embedding_cache_dir: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        epoch_length: int | None = None,
        max_val_questions: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if synthetic is None and train_file is None and test_file is None:
            raise ValueError("data: set `train_file` (and optionally val_file/test_file) or `synthetic`")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.save_hyperparameters(logger=False)
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.format, self.fields = format, fields
        self.image_root, self.on_bad_record = image_root, on_bad_record
        self.check_images = check_images
        self.synthetic = coerce_settings(SyntheticSettings, synthetic, "data.synthetic")  # a dict from Python or the CLI
        self.val_fraction, self.num_stages = val_fraction, num_stages
        self.similarity_encoder, self.similarity_aggregation = similarity_encoder, similarity_aggregation
        self.embedding_cache_dir = embedding_cache_dir
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.epoch_length, self.max_val_questions, self.seed = epoch_length, max_val_questions, seed

        self.train_questions: list[Question] = []
        self.val_questions: list[Question] = []
        self.test_questions: list[Question] = []
        self.stage_thresholds: list[float] = []
        self.sampler: StageSampler | None = None
        self.augmenter: Augmenter | None = None
        self._pending_state: dict[str, Any] | None = None
        self._prepared = False

    # -- loading -------------------------------------------------------------------------------
    def _load(self, path: str, image_root: str | None) -> list[Question]:
        report = load_questions(
            path,
            format=self.format,
            on_bad_record=self.on_bad_record,
            image_root=image_root,
            check_images=self.check_images,
            fields=self.fields,
        )
        if report.skipped:
            log.warning("%s: skipped %d bad records (%s)", path, report.skipped, ", ".join(report.problems))
        for reason, n in report.warnings.items():
            log.warning("%s: %s x%d, e.g. %s", path, reason, n, "; ".join(report.warning_examples[reason][:3]))
        if self.check_images:
            self._preflight_images(path, report.questions, report.unit)
        log.info("%s: %d questions (%s format)", path, len(report.questions), report.format)
        return report.questions

    def _preflight_images(self, path: str, questions: list[Question], unit: str) -> None:
        """Open every image once (size and mode, in a thread pool) before any model work, so a
        corrupt, empty or folder path stops the run now instead of when a batch reaches it."""
        issues = probe_images(p for q in questions for p in q.images)
        if issues:
            hint = "set data.image_root to the folder the paths are relative to, or fix or drop these records"
            raise DataError(f"{describe_image_issues(issues, questions, path, unit)}\n{hint}")

    def _synthetic_files(self) -> dict[str, Path]:
        from anatomy_lightning.data.synthetic import write_synthetic_dataset

        s = self.synthetic
        assert s is not None
        return write_synthetic_dataset(
            s.out_dir, s.n_train, s.n_val, s.n_test, seed=s.seed,
            image_size=s.image_size, grid=s.grid, num_options=s.num_options, kinds=tuple(s.kinds),
            questions_per_scene=s.questions_per_scene, unique_scenes=s.unique_scenes, benchmark=s.benchmark,
        )

    def prepare_data(self) -> None:
        # Runs on one process per node: write the synthetic files once, before any rank reads them.
        if self.synthetic is not None:
            self._synthetic_files()

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        if self.synthetic is not None:
            files = self._synthetic_files()
            root = str(files["train"].parent)
            self.train_questions = self._load(str(files["train"]), root)
            self.val_questions = self._load(str(files["val"]), root)
            self.test_questions = self._load(str(files["test"]), root)
        else:
            if self.train_file:
                self.train_questions = self._load(self.train_file, self.image_root)
            if self.val_file:
                self.val_questions = self._load(self.val_file, self.image_root)
            elif self.train_questions and self.val_fraction > 0:
                rng = random.Random(self.seed)
                order = list(range(len(self.train_questions)))
                rng.shuffle(order)
                n_val = max(1, int(len(order) * self.val_fraction))
                held = set(order[:n_val])
                self.val_questions = [q for i, q in enumerate(self.train_questions) if i in held]
                self.train_questions = [q for i, q in enumerate(self.train_questions) if i not in held]
            if self.test_file:
                self.test_questions = self._load(self.test_file, self.image_root)
        if self.max_val_questions:
            self.val_questions = self.val_questions[: self.max_val_questions]
        self._score()
        self._prepared = True

    def _score(self) -> None:
        everything = self.train_questions + self.val_questions + self.test_questions
        if not everything:
            raise DataError("data: no questions were loaded")
        scorer = SimilarityScorer(
            self.similarity_encoder, aggregation=self.similarity_aggregation, cache_dir=self.embedding_cache_dir
        )
        scorer.score(everything)
        reference = self.train_questions or everything
        self.stage_thresholds = assign_stages(reference, self.num_stages)
        in_reference = {id(q) for q in reference}
        for q in everything:
            if id(q) not in in_reference:
                q.stage = stage_of(q.similarity or 0.0, self.stage_thresholds)
        counts = Counter(q.stage for q in self.train_questions)
        log.info("curriculum stages (train): %s, thresholds %s", dict(sorted(counts.items())), self.stage_thresholds)

    # -- curriculum and augmentation interface ---------------------------------------------------
    def set_active_stages(
        self, stages: Sequence[int], replay_stages: Sequence[int] = (), replay_fraction: float = 0.0
    ) -> None:
        """Called by `CurriculumCallback`: the training pool is `stages` plus a replay share."""
        self._sampler().set_active(stages, replay_stages, replay_fraction)

    @property
    def active_stages(self) -> set[int] | None:
        return set(self.sampler.active) if self.sampler is not None else None

    def attach_augmenter(self, augmenter: Augmenter) -> None:
        """Called by `GroupDiversityCallback`: rewrites from its queue replace part of each batch."""
        self.augmenter = augmenter

    # -- loaders -------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _sampler(self) -> StageSampler:
        if self.sampler is None:
            if not self.train_questions:
                raise DataError("data: no training questions (set data.train_file or data.synthetic)")
            rank, world = self._rank_world()
            self.sampler = StageSampler(
                [q.stage or 0 for q in self.train_questions],
                seed=self.seed,
                epoch_length=self.epoch_length or len(self.train_questions),
                rank=rank,
                world_size=world,
            )
            if self._pending_state is not None:
                self.sampler.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.sampler

    def train_dataloader(self) -> DataLoader:
        return _TrainLoader(
            _Questions(self.train_questions),
            batch_size=self.batch_size,
            sampler=self._sampler(),
            collate_fn=_collate_train,
            num_workers=self.num_workers,
            generator=_own_generator(self.seed),
        )

    def _eval_loader(self, questions: list[Question], what: str) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(
            _Questions(questions),
            batch_size=self.eval_batch_size,
            sampler=_RankSlice(len(questions), rank, world, what),
            collate_fn=_collate_eval,
            num_workers=self.num_workers,
            generator=_own_generator(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_questions, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_questions or self.val_questions, "test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the sampler position and swap in augmented questions (training batches only)."""
        if not isinstance(batch, QuestionBatch):
            return batch
        if batch.cursors is None:  # validation / test
            return batch.questions
        questions, cursors = batch.questions, batch.cursors
        if self.sampler is not None:
            for c in cursors:
                self.sampler.consumed(c)
        if self.augmenter is not None:
            rank, world = self._rank_world()
            n = self.augmenter.budget(len(questions))
            # every rank holds the same queue: take for all ranks, keep this rank's share
            extra = self.augmenter.take(n * world, self.active_stages)[rank::world]
            if extra:
                questions = questions[: len(questions) - len(extra)] + extra
        return questions

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict() if self.sampler is not None else self._pending_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler_state = state.get("sampler")
        if sampler_state is None:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        else:
            self._pending_state = sampler_state


def stage_of(similarity: float, thresholds: Sequence[float]) -> int:
    """Stage index for an S(q) given the K-1 ascending quantile thresholds."""
    return sum(1 for t in thresholds if similarity > t)
