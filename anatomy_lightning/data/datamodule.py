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

from anatomy_lightning.data.audit import curriculum_audit, format_audit
from anatomy_lightning.data.images import describe_image_issues, probe_images
from anatomy_lightning.data.loader import load_questions
from anatomy_lightning.data.prompts import PROMPTS, attach_dataset_prompts
from anatomy_lightning.data.sampler import Cursor, StageSampler
from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.data.similarity import SimilarityScorer, check_aggregation
from anatomy_lightning.data.stages import STAGINGS, StageThresholds, assign_stages, stage_for
from anatomy_lightning.settings import coerce_settings

log = logging.getLogger(__name__)


@dataclass
class SyntheticSettings:
    """The built-in offline benchmark: seeded surgical scenes written as generic JSONL.

    Args:
        n_train: training questions to write.
        n_val: validation questions to write.
        n_test: test questions to write.
        seed: seed of the scenes, questions and distractors.
        image_size: side of the square frames, in pixels.
        grid: scenes are grid x grid cells, one anatomy each (1 = one anatomy per frame).
        num_options: answer options per question.
        kinds: question kinds: position, relation, tool.
        questions_per_scene: questions asked about each scene.
        unique_scenes: never repeat a layout (a 1x1 grid has only as many layouts as anatomies: set false).
        out_dir: folder the JSONL files and images are written to.
    """

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
    benchmark: str = "v1"  # v2: alike-named anatomies also look alike (docs/benchmark_v2); v3: every class easy and hard (docs/benchmark_v3)


@dataclass
class SimilaritySettings:
    """S(q), the curriculum's difficulty measure, and how it is cut into stages.

    Args:
        encoder: sentence encoder for S(q): None = all-MiniLM-L6-v2 (offline package), or a folder / hub id.
        aggregation: all_pairs (mean cosine over every pair of options, gold-blind) | all_pairs_max |
            gold_mean (the paper's S(q): gold vs each distractor) | gold_max.
        stages: per_class (S(q) quantiles within each gold class, so every class is in every stage) |
            global (one set of quantiles: on SGG-VQA this makes stages a partition of classes).
        cache_dir: where option embeddings are cached (default: $ANATOMY_LIGHTNING_CACHE).
    """

    encoder: str | None = None
    aggregation: str = "all_pairs"
    stages: str = "per_class"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.aggregation = check_aggregation(self.aggregation)
        if self.stages not in STAGINGS:
            raise ValueError(f"data.similarity.stages must be one of {list(STAGINGS)}, got {self.stages!r}")


_RENAMED = {  # the flat keys before data.similarity
    "similarity_encoder": "data.similarity.encoder",
    "similarity_aggregation": "data.similarity.aggregation",
    "embedding_cache_dir": "data.similarity.cache_dir",
}


class Augmenter(Protocol):
    """What the DataModule needs from the augmentation queue (see `augment.augmenter`)."""

    def take(self, n: int, active_stages: set[int] | None = None) -> list[Question]: ...

    def budget(self, batch_size: int) -> int: ...

    # optional (GroupDiversityAugmenter has them): same-step replacement
    # when: str  ("same_step" | "next_batches"); max_rounds_per_step: int
    # def same_step_targets(self, questions, group_rewards) -> list[int]: ...
    # def rewrite_now(self, questions, step, round_) -> list[Question | None]: ...


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
        prompt: "template" (model.system_prompt / model.prompt_template around the parsed question)
            or "dataset": each record's own instruction verbatim (Anatomy-R1 `instruction`, R1
            `problem`, EasyR1 `prompt`, MedXpertQA `question`), to reproduce a paper's setup;
            rewritten questions and records without one use the template (see `data.prompts`).
        check_images: before training, open every image once (size and mode) and stop on missing,
            empty, undecodable or folder paths, naming their records.
        val_fraction: without val_file, this share of train_file is held out for validation (the
            curriculum promotes on it); the held-out uids are recorded in checkpoints.
        test_split: what `test` scores when there is no test_file. None: nothing, `test` refuses
            (the validation questions steer the curriculum, so they are not a test set). "heldout":
            a `test_fraction` share of train_file that neither training nor validation sees; set it
            for `fit` too (the uids are recorded in the checkpoint, and `test` on a checkpoint
            trained without it refuses). A test_file or synthetic data has its own test split.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        format: str = "auto",
        fields: dict[str, str] | None = None,
        image_root: str | None = None,
        prompt: str = "template",
        on_bad_record: str = "error",
        check_images: bool = True,
        synthetic: SyntheticSettings | None = None,
        val_fraction: float = 0.1,
        test_split: str | None = None,
        test_fraction: float = 0.1,
        num_stages: int = 3,
        similarity: SimilaritySettings | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        epoch_length: int | None = None,
        max_val_questions: int | None = None,
        seed: int = 0,
        predict_file: str | None = None,
        similarity_encoder: str | None = None,
        similarity_aggregation: str | None = None,
        embedding_cache_dir: str | None = None,
    ) -> None:
        """The options the class docstring does not describe (both appear in `fit --help`).

        Args:
            train_file: training questions (any supported format, see `format`).
            val_file: validation questions; None holds out `val_fraction` of the training file.
            test_file: test questions (`test`; also `predict` when predict_file is None).
            image_root: folder that relative (and dataset-absolute) image paths are resolved against.
            on_bad_record: "error" reports every bad record and stops; "skip" drops them with a warning.
            synthetic: write and use the built-in synthetic scenes instead of question files.
            val_fraction: share of the training file held out for validation when val_file is None.
            num_stages: curriculum stages, by quantile of the option similarity S(q) on the training set.
            similarity: S(q) encoder, aggregation (all_pairs | all_pairs_max | gold_mean | gold_max), stages
                (per_class | global) and embedding cache folder; see `SimilaritySettings`.
            batch_size: prompts per training step (each gets model.num_generations completions).
            eval_batch_size: questions per validation / test / predict batch.
            num_workers: DataLoader worker processes.
            epoch_length: questions per sampler epoch (default: the training set size).
            max_val_questions: cap on validation questions (validation drives the curriculum; it costs).
            seed: seed of the validation split and of the sampler's order.
            test_fraction: with test_split "heldout", the share of train_file held out for `test`.
            predict_file: the questions `predict` answers (greedy) into model.predictions_file;
                None = the test questions. Staged with the training set's S(q) thresholds.
            similarity_encoder: renamed: use data.similarity.encoder.
            similarity_aggregation: renamed: use data.similarity.aggregation.
            embedding_cache_dir: renamed: use data.similarity.cache_dir.
        """
        super().__init__()
        old = {"similarity_encoder": similarity_encoder, "similarity_aggregation": similarity_aggregation,
               "embedding_cache_dir": embedding_cache_dir}
        for key, value in old.items():
            if value is not None:
                raise ValueError(f"data.{key} was renamed: use {_RENAMED[key]}")
        if synthetic is None and train_file is None and test_file is None:
            raise ValueError("data: set `train_file` (and optionally val_file/test_file) or `synthetic`")
        if prompt not in PROMPTS:
            raise ValueError(f"data.prompt must be one of {list(PROMPTS)}, got {prompt!r}")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if test_split not in (None, "heldout"):
            raise ValueError(f"data.test_split must be null (test needs data.test_file) or 'heldout', got {test_split!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must be between 0 and 1, got {test_fraction}")
        self.save_hyperparameters(logger=False)
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.format, self.fields = format, fields
        self.image_root, self.on_bad_record, self.prompt = image_root, on_bad_record, prompt
        self.check_images = check_images
        self.synthetic = coerce_settings(SyntheticSettings, synthetic, "data.synthetic")  # a dict from Python or the CLI
        self.val_fraction, self.num_stages = val_fraction, num_stages
        self.test_split, self.test_fraction = test_split, test_fraction
        self.similarity = coerce_settings(SimilaritySettings, similarity, "data.similarity") or SimilaritySettings()
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.epoch_length, self.max_val_questions, self.seed = epoch_length, max_val_questions, seed

        self.train_questions: list[Question] = []
        self.val_questions: list[Question] = []
        self.test_questions: list[Question] = []
        self.stage_thresholds: list[float] | StageThresholds = []  # see `stages.assign_stages`
        self.scorer: SimilarityScorer | None = None  # the one that scored the questions (kept for the audit)
        self.audit: dict[str, Any] | None = None  # `data.audit.curriculum_audit` of the training questions
        self.sampler: StageSampler | None = None
        self.augmenter: Augmenter | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pool: list[Question] = []  # train_file's questions in file order, before any hold-out
        self.split: dict[str, list[str] | None] = {"val": None, "test": None}  # held-out uids (fractions only)
        self.test_source = ""  # what `test` scores, for its banner
        self._prepared = False

    # -- loading -------------------------------------------------------------------------------
    def _load(self, path: str, image_root: str | None) -> list[Question]:
        report = load_questions(
            path,
            format=self.format,
            on_bad_record=self.on_bad_record,
            image_root=image_root,
            check_images=False,  # the pre-flight below probes every image itself; the missing list is unused here
            fields=self.fields,
        )
        if report.skipped:
            log.warning("%s: skipped %d bad records (%s)", path, report.skipped, ", ".join(report.problems))
        for reason, n in report.warnings.items():
            log.warning("%s: %s x%d, e.g. %s", path, reason, n, "; ".join(report.warning_examples[reason][:3]))
        if self.check_images:
            self._preflight_images(path, report.questions, report.unit)
        if self.prompt == "dataset":
            self._pin_prompts(path, report.questions, report.format)
        log.info("%s: %d questions (%s format)", path, len(report.questions), report.format)
        return report.questions

    def _pin_prompts(self, path: str, questions: list[Question], fmt: str) -> None:
        missing = attach_dataset_prompts(questions)
        if missing == len(questions):
            raise DataError(
                f"data.prompt: dataset, but {path} ({fmt} format) carries no prompt of its own (formats that do: "
                "anatomy_r1 `instruction`, r1 and medvlm_r1 `problem`, easyr1 `prompt`, medxpertqa `question`, "
                "generic metadata.prompt); use data.prompt: template"
            )
        if missing:
            log.warning("%s: %d of %d questions have no prompt of their own and use the template", path, missing,
                        len(questions))

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
        if not self._prepared:
            self._setup()
            self._prepared = True
        if stage == "test" and not self.test_questions:
            raise DataError(
                "test: data.test_file is not set, and the validation questions are not a test set (the curriculum "
                "promotes on them); set data.test_file, or data.test_split: heldout (with data.test_fraction) to "
                "score a part of data.train_file that neither training nor validation sees (set it for fit too)"
            )

    def _setup(self) -> None:
        if self.synthetic is not None:
            files = self._synthetic_files()
            root = str(files["train"].parent)
            self.train_questions = self._load(str(files["train"]), root)
            self.val_questions = self._load(str(files["val"]), root)
            self.test_questions = self._load(str(files["test"]), root)
            self.test_source = f"the synthetic test split {files['test']}"
            if self.test_split:
                log.info("data.test_split is ignored: synthetic data has its own test split")
        else:
            if self.train_file:
                self._pool = self._load(self.train_file, self.image_root)
                self.split = self._hold_out(self._pool)
            if self.val_file:
                self.val_questions = self._load(self.val_file, self.image_root)
            if self.test_file:
                self.test_questions = self._load(self.test_file, self.image_root)
                self.test_source = f"test file {self.test_file}"
                if self.test_split:
                    log.warning("data.test_split: %s is ignored: data.test_file %s is set", self.test_split,
                                self.test_file)
            self._apply_split()
        self._score()

    # -- held-out splits -----------------------------------------------------------------------
    def _hold_out(self, pool: list[Question]) -> dict[str, list[str] | None]:
        """uids of the validation (val_fraction, without val_file) and held-out test (test_split
        heldout, without test_file) shares of train_file: one seeded shuffle, validation first,
        so turning the test hold-out on leaves the validation split as it was."""
        order = list(range(len(pool)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, int(len(order) * self.val_fraction)) if not self.val_file and self.val_fraction > 0 else 0
        heldout = self._scores_heldout()
        n_test = max(1, int(len(order) * self.test_fraction)) if heldout else 0
        if pool and n_val + n_test >= len(pool):
            raise DataError(
                f"data: {self.train_file} has {len(pool)} questions; holding out {n_val} for validation and {n_test} "
                "for test leaves none to train on; lower data.val_fraction / data.test_fraction or give data.val_file"
            )
        val, test = sorted(order[:n_val]), sorted(order[n_val:n_val + n_test])  # uids in file order
        return {"val": [pool[i].uid for i in val] if n_val else None,
                "test": [pool[i].uid for i in test] if heldout else None}

    def _scores_heldout(self) -> bool:
        return self.test_split == "heldout" and not self.test_file and self.synthetic is None

    def _apply_split(self) -> None:
        """train / val / held-out test questions from `self._pool` and the uids in `self.split`."""
        if not self._pool:
            return
        known = {q.uid for q in self._pool}
        for what, uids in self.split.items():
            lost = [u for u in uids or [] if u not in known]
            if lost:
                raise DataError(
                    f"data: the checkpoint's {what} split holds {len(lost)} questions that are not in "
                    f"data.train_file {self.train_file} (e.g. {lost[:3]}); the file changed since training: pass the "
                    f"file the checkpoint was trained on, or give data.{what}_file"
                )
        val, test = set(self.split["val"] or ()), set(self.split["test"] or ())
        self.train_questions = [q for q in self._pool if q.uid not in val and q.uid not in test]
        if self.split["val"] is not None:
            self.val_questions = [q for q in self._pool if q.uid in val]
        if self.split["test"] is not None and self._scores_heldout():
            self.test_questions = [q for q in self._pool if q.uid in test]
        if self.max_val_questions:
            self.val_questions = self.val_questions[: self.max_val_questions]

    def describe_test_split(self) -> str:
        """One line for `test`'s banner: which questions it scores, and how many."""
        n = len(self.test_questions)
        if self.synthetic is None and self._scores_heldout() and self.split["test"] is not None:
            n_val = len(self.split["val"] or self.val_questions)
            return (f"the held-out split of {self.train_file} ({n} of {len(self._pool)} questions, disjoint from "
                    f"train ({len(self.train_questions)}) and validation ({n_val}))")
        return f"{self.test_source or 'the test questions'} ({n} questions)"

    def _score(self) -> None:
        everything = self.train_questions + self.val_questions + self.test_questions
        if not everything:
            raise DataError("data: no questions were loaded")
        self._scorer().score(everything)
        self._assign_stages()
        self._audit()

    def _scorer(self) -> SimilarityScorer:
        if self.scorer is None:
            s = self.similarity
            self.scorer = SimilarityScorer(s.encoder, aggregation=s.aggregation, cache_dir=s.cache_dir)
        return self.scorer

    def _audit(self) -> None:
        """Log the class x stage table and text-shortcut accuracy of the training stages (`data.audit`)."""
        if not self.train_questions:
            return
        self.audit = curriculum_audit(self.train_questions, self._scorer(), self.num_stages)
        log.info("%s", format_audit(self.audit))
        for warning in self.audit["warnings"]:
            log.warning("curriculum: %s", warning)

    def _assign_stages(self) -> None:
        """Stages from the training set's S(q) quantiles (every question is scored already)."""
        everything = self.train_questions + self.val_questions + self.test_questions
        reference = self.train_questions or everything
        self.stage_thresholds = assign_stages(reference, self.num_stages, by=self.similarity.stages)
        in_reference = {id(q) for q in reference}
        for q in everything:
            if id(q) not in in_reference:
                q.stage = stage_for(q, self.stage_thresholds)
        counts = Counter(q.stage for q in self.train_questions)
        shown = self.stage_thresholds
        if isinstance(shown, StageThresholds):
            shown = f"per class ({len(shown.per_class)} classes; global {[round(t, 4) for t in shown.global_]})"
        log.info("curriculum stages (train): %s, thresholds %s", dict(sorted(counts.items())), shown)

    # -- curriculum and augmentation interface ---------------------------------------------------
    def set_active_stages(
        self, stages: Sequence[int], replay_stages: Sequence[int] = (), replay_fraction: float = 0.0
    ) -> None:
        """Called by `CurriculumCallback`: the training pool is `stages` plus a replay share."""
        self._sampler().set_active(stages, replay_stages, replay_fraction)

    @property
    def active_stages(self) -> set[int] | None:
        return set(self.sampler.active) if self.sampler is not None else None

    def resample_questions(self, n: int, key: str) -> list[Question]:
        """Fresh prompts for dynamic sampling (`model.dynamic_sample`): `n` training questions from
        the pool in play (the curriculum's active stages), without replacement where the pool
        allows. Drawn from (data.seed, key, rank) alone, so a resumed run draws the same ones and
        the epoch's own order (the StageSampler) is not disturbed."""
        active = self.active_stages
        pool = [q for q in self.train_questions if active is None or (q.stage or 0) in active]
        if not pool or n <= 0:
            return []
        rank, _ = self._rank_world()
        rng = random.Random(f"{self.seed}/resample/{key}/{rank}")
        return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]

    def attach_augmenter(self, augmenter: Augmenter) -> None:
        """Called by `GroupDiversityCallback`: with `when: next_batches` rewrites from its queue replace
        part of each batch; with `same_step` the module asks `replacement_questions` instead."""
        self.augmenter = augmenter

    def _augments_same_step(self) -> bool:
        return self.augmenter is not None and getattr(self.augmenter, "when", "next_batches") == "same_step"

    @property
    def replacement_rounds(self) -> int:
        """Same-step rewrite rounds per step the attached augmenter allows (0: no same-step replacement)."""
        return int(getattr(self.augmenter, "max_rounds_per_step", 0)) if self._augments_same_step() else 0

    def replacement_questions(
        self, questions: Sequence[Question], group_rewards: torch.Tensor, step: int, round_: int = 1
    ) -> list[tuple[int, Question]]:
        """Same-step GDQA (`augmentation.when: same_step`): rewrites of this step's hard groups.

        `questions` / `group_rewards` (n, G): groups of the step still without signal. Returns
        (index into `questions`, rewrite) pairs, all-wrong groups first, for the questions the
        augmenter's `detect` and budget select; empty without a same-step augmenter. Rewrites are
        deterministic in (augmenter seed, step, round, uid): the same on every rank and on resume.
        """
        if not self._augments_same_step() or not questions:
            return []
        targets = self.augmenter.same_step_targets(list(questions), group_rewards.detach().float().cpu())
        rewrites = self.augmenter.rewrite_now([questions[i] for i in targets], step, round_)
        return [(i, r) for i, r in zip(targets, rewrites) if r is not None]

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
        return self._eval_loader(self.test_questions, "test")

    def predict_dataloader(self) -> DataLoader:
        """data.predict_file (scored and staged like the test questions), else the test questions."""
        path = self.hparams.get("predict_file")
        if path:
            questions = self._load(path, self.image_root)
            self._scorer().score(questions)
            for q in questions:
                q.stage = stage_for(q, self.stage_thresholds) if self.stage_thresholds else 0
        else:
            questions = self.test_questions
        if not questions:
            raise DataError("predict: no questions; set data.predict_file (or data.test_file)")
        return self._eval_loader(questions, "predict")

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
        if self._deferred:  # questions displaced by rewrites earlier: served first, none is lost
            by_uid = {q.uid: q for q in self.train_questions}
            questions = [by_uid[u] for u in self._deferred if u in by_uid] + questions
            self._deferred = ()
        size = len(batch.questions)
        extra: list[Question] = []
        if self.augmenter is not None and not self._augments_same_step():
            rank, world = self._rank_world()
            n = self.augmenter.budget(size)
            # every rank holds the same queue: take for all ranks, keep this rank's share
            extra = self.augmenter.take(n * world, self.active_stages)[rank::world]
        keep = size - len(extra)
        # what does not fit waits for the next batch, in order (uids: the checkpoint stays plain data)
        self._deferred = tuple(q.uid for q in questions[keep:])
        return questions[:keep] + extra

    # -- state ---------------------------------------------------------------------------------
    # uids of training questions displaced by injected rewrites (augmentation.when: next_batches),
    # served first in the next batch; a tuple, always replaced, never changed in place
    _deferred: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return {
            "deferred": list(self._deferred),
            "sampler": self.sampler.state_dict() if self.sampler is not None else self._pending_state,
            # held-out uids: a resumed run or a later `test` uses the questions this run held out
            "split": {"train_file": self.train_file, **self.split} if self._pool else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_split(state.get("split"), "split" in state)
        self._deferred = tuple(state.get("deferred", ()))
        sampler_state = state.get("sampler")
        if sampler_state is None:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        else:
            self._pending_state = sampler_state


    def _restore_split(self, split: dict[str, Any] | None, recorded: bool) -> None:
        """Re-split train_file as the checkpoint's run did (setup runs before the checkpoint is read)."""
        if not self._pool:
            return
        heldout = self._scores_heldout()
        if not recorded:
            log.warning("the checkpoint records no data split (written by an older version): the split is "
                        "recomputed from data.seed and the fractions")
            return
        if heldout and (split is None or split.get("test") is None):
            raise DataError(
                "data.test_split is heldout, but the checkpoint was trained without it, so its run trained on "
                f"every question of {self.train_file} outside validation; set data.test_file to a file it never saw"
            )
        if split is None:
            return
        # a test hold-out stays out of training even if this run does not score it (resuming a fit)
        restored = {"val": None if self.val_file else split.get("val"), "test": split.get("test")}
        if restored != self.split:
            log.info("data: using the validation/test split recorded in the checkpoint")
            self.split = restored
            self.val_questions = [] if restored["val"] is None and not self.val_file else self.val_questions
            self._apply_split()
            self._assign_stages()
            self._audit()
            if self.sampler is not None:  # a sampler over the old training list is stale
                self.sampler = None


def stage_of(similarity: float, thresholds: Sequence[float] | StageThresholds, answer_text: str = "") -> int:
    """Stage index for an S(q) given the K-1 ascending quantile thresholds (or per-class ones, with
    the question's gold option text; see `stages.stage_for`)."""
    return stage_for((similarity, answer_text), thresholds)
