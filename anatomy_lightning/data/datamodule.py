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
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from anatomy_lightning.data.audit import curriculum_audit, format_audit
from anatomy_lightning.data.batches import Augmenter, QuestionBatch, eval_loader, refill, train_loader
from anatomy_lightning.data.sampler import StageSampler
from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.data.settings import SimilaritySettings, SyntheticSettings, check_data_arguments
from anatomy_lightning.data.similarity import SimilarityScorer
from anatomy_lightning.data.sources import read_questions, write_synthetic_files
from anatomy_lightning.data.splits import Split, apply_split, hold_out, recorded_split
from anatomy_lightning.data.stages import StageThresholds, describe_thresholds, stage_against, stage_for
from anatomy_lightning.distributed import gather_objects
from anatomy_lightning.settings import coerce_settings

log = logging.getLogger(__name__)


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
            predict_file: the questions `predict` answers (greedy) into evaluation.predictions_file;
                None = the test questions. Staged with the training set's S(q) thresholds.
            similarity_encoder: renamed: use data.similarity.encoder.
            similarity_aggregation: renamed: use data.similarity.aggregation.
            embedding_cache_dir: renamed: use data.similarity.cache_dir.
        """
        super().__init__()
        retired = {"similarity_encoder": similarity_encoder, "similarity_aggregation": similarity_aggregation,
                   "embedding_cache_dir": embedding_cache_dir}
        has_source = synthetic is not None or train_file is not None or test_file is not None
        check_data_arguments(retired, has_source=has_source, prompt=prompt, on_bad_record=on_bad_record,
                             test_split=test_split, test_fraction=test_fraction)
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
        self.predict_questions: list[Question] = []
        self.stage_thresholds: list[float] | StageThresholds = []  # see `stages.assign_stages`
        self.scorer: SimilarityScorer | None = None  # the one that scored the questions (kept for the audit)
        self.audit: dict[str, Any] | None = None  # `data.audit.curriculum_audit` of the training questions
        self.sampler: StageSampler | None = None
        self.augmenter: Augmenter | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pool: list[Question] = []  # train_file's questions in file order, before any hold-out
        self.split: Split = {"val": None, "test": None}  # held-out uids (fractions only), see `data.splits`
        self.test_source = ""  # what `test` scores, for its banner
        self._prepared = False

    # -- loading -------------------------------------------------------------------------------
    def _load(self, path: str, image_root: str | None, answer_optional: bool = False) -> list[Question]:
        return read_questions(path, image_root, format=self.format, fields=self.fields, on_bad_record=self.on_bad_record,
                              check_images=self.check_images, prompt=self.prompt, answer_optional=answer_optional)

    def prepare_data(self) -> None:
        # Runs on one process per node: write the synthetic files once, before any rank reads them.
        if self.synthetic is not None:
            write_synthetic_files(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if not self._prepared:
            self._setup()
            self._prepared = True
        if stage == "predict":  # read here, so the model's pre-flight measures them before it loads
            self.predict_questions = self._predict_questions()
        if stage == "test" and not self.test_questions:
            raise DataError(
                "test: data.test_file is not set, and the validation questions are not a test set (the curriculum "
                "promotes on them); set data.test_file, or data.test_split: heldout (with data.test_fraction) to "
                "score a part of data.train_file that neither training nor validation sees (set it for fit too)"
            )

    def _setup(self) -> None:
        if self.synthetic is not None:
            files = write_synthetic_files(self.synthetic)
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
                self.split = hold_out(self._pool, self.seed, self.val_fraction, self.test_fraction,
                                      hold_val=not self.val_file, hold_test=self._scores_heldout(),
                                      source=str(self.train_file))
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
    def _scores_heldout(self) -> bool:
        return self.test_split == "heldout" and not self.test_file and self.synthetic is None

    def _apply_split(self) -> None:
        """train / val / held-out test questions from `self._pool` and the uids in `self.split`."""
        if not self._pool:
            return
        train, val, test = apply_split(self._pool, self.split, str(self.train_file))
        self.train_questions = train
        if val is not None:
            self.val_questions = val
        if test is not None and self._scores_heldout():
            self.test_questions = test
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
        self.stage_thresholds = stage_against(reference, everything, self.num_stages, self.similarity.stages)
        counts = Counter(q.stage for q in self.train_questions)
        log.info("curriculum stages (train): %s, thresholds %s", dict(sorted(counts.items())),
                 describe_thresholds(self.stage_thresholds))

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
        return train_loader(self.train_questions, self._sampler(), self.batch_size, self.num_workers, self.seed)

    def _eval_loader(self, questions: list[Question], what: str) -> DataLoader:
        rank, world = self._rank_world()
        return eval_loader(questions, self.eval_batch_size, rank, world, what, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_questions, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_questions, "test")

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_questions:
            self.predict_questions = self._predict_questions()
        return self._eval_loader(self.predict_questions, "predict")

    def _predict_questions(self) -> list[Question]:
        """data.predict_file (labelled questions scored and staged like the test questions; its answers
        are optional: S(q) and the stage need the gold, so unlabelled ones get neither), else the test questions."""
        path = self.hparams.get("predict_file")
        if path:
            questions = self._load(path, self.image_root, answer_optional=True)
            labelled = [q for q in questions if q.answer_index is not None]
            self._scorer().score(labelled)
            for q in labelled:
                q.stage = stage_for(q, self.stage_thresholds) if self.stage_thresholds else 0
        else:
            questions = self.test_questions
        if not questions:
            raise DataError("predict: no questions; set data.predict_file (or data.test_file)")
        return questions

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
        extra: list[Question] = []
        if self.augmenter is not None and not self._augments_same_step():
            rank, world = self._rank_world()
            n = self.augmenter.budget(len(questions))
            # every rank holds the same queue: take for all ranks, keep this rank's share
            extra = self.augmenter.take(n * world, self.active_stages)[rank::world]
        questions, self._deferred = refill(questions, self._deferred, self.train_questions, extra)
        return questions

    # -- state ---------------------------------------------------------------------------------
    # uids of training questions displaced by injected rewrites (augmentation.when: next_batches),
    # served first in the next batch; a tuple, always replaced, never changed in place
    _deferred: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        # called on every rank while a checkpoint is assembled; rank 0 writes it, so the deferred questions
        # (each rank's own) are gathered: resumed, rank r serves its own again
        return {
            "deferred": list(self._deferred),
            "deferred_by_rank": gather_objects(list(self._deferred)),
            "sampler": self.sampler.state_dict() if self.sampler is not None else self._pending_state,
            # held-out uids: a resumed run or a later `test` uses the questions this run held out
            "split": {"train_file": self.train_file, **self.split} if self._pool else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_split(state.get("split"), "split" in state)
        self._deferred = self._own_deferred(state)
        sampler_state = state.get("sampler")
        if sampler_state is None:
            return
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        else:
            self._pending_state = sampler_state

    def _own_deferred(self, state: dict[str, Any]) -> tuple[str, ...]:
        """This rank's deferred questions from a checkpoint; with another number of ranks, every rank's
        deferred questions dealt out again (older checkpoints hold rank 0's only)."""
        by_rank = state.get("deferred_by_rank")
        rank, world = self._rank_world()
        if by_rank is None:
            return tuple(state.get("deferred", ()))
        if len(by_rank) == world:
            return tuple(by_rank[rank])
        log.warning("the checkpoint was written by %d processes, this run has %d: its deferred questions are "
                    "dealt out again", len(by_rank), world)
        return tuple([uid for deferred in by_rank for uid in deferred][rank::world])

    def _restore_split(self, split: dict[str, Any] | None, recorded: bool) -> None:
        """Re-split train_file as the checkpoint's run did (setup runs before the checkpoint is read)."""
        if not self._pool:
            return
        if not recorded:
            log.warning("the checkpoint records no data split (written by an older version): the split is "
                        "recomputed from data.seed and the fractions")
            return
        restored = recorded_split(split, scores_heldout=self._scores_heldout(), has_val_file=bool(self.val_file),
                                  source=str(self.train_file))
        if restored is None or restored == self.split:
            return
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
