"""`GroupDiversityCallback`: runs the GDQA loop inside `Trainer.fit`.

After every training batch it reads the (N, G) group rewards of the groups as first sampled,
lets the augmenter count budgets (and, with `when: next_batches`, queue rewrites of the hard
questions), and logs the group-signal metrics. The DataModule is the injector: with `same_step`
the LightningModule asks it for `replacement_questions(...)` (rewrites of the step's own hard
no-signal groups, rolled out in the same step); with `next_batches` it serves the queue
(`augmenter.take()`) while building the next batches. This callback only hands the augmenter over
in `setup` and never touches the DataModule again.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from anatomy_lightning.augment.augmenter import (
    DEFAULT_DETECT,
    DEFAULT_REWRITERS,
    RENAMED_SETTINGS,
    GroupDiversityAugmenter,
    group_signal_stats,
)
from anatomy_lightning.augment.registry import Rewriter
from anatomy_lightning.callbacks.group_signal import gather_groups, scheduled_groups
from anatomy_lightning.data.schema import Question

__all__ = ["GroupDiversityCallback", "LazyEncoder", "make_embed"]

log = logging.getLogger(__name__)


class LazyEncoder:
    """Sentence embeddings for diversity selection; the model loads on first call, not at setup.

    `spec` is what `SimilarityScorer` takes as its encoder (None: its default, the offline MiniLM).
    """

    def __init__(self, spec: str | None = None) -> None:
        self.spec = spec
        self._scorer: Any = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._scorer is None:
            from anatomy_lightning.data.similarity import SimilarityScorer

            try:
                self._scorer = SimilarityScorer(self.spec)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"GroupDiversityCallback: encoder {self.spec!r} could not be loaded ({err}); "
                    "give a local sentence-transformers folder, or encoder: jaccard for no model"
                ) from err
        return np.asarray(self._scorer.embed(texts))


def make_embed(encoder: str | None) -> LazyEncoder | None:
    """The selection embedder for an `encoder` setting; None means token Jaccard.

    None picks the data layer's default encoder when that layer is installed, else Jaccard.
    """
    if encoder == "jaccard":
        return None
    if importlib.util.find_spec("anatomy_lightning.data.similarity") is None:
        if encoder is not None:
            raise ValueError(
                f"GroupDiversityCallback: encoder {encoder!r} needs anatomy_lightning.data.similarity, "
                "which is not installed; use encoder: jaccard"
            )
        log.warning("GDQA selection: anatomy_lightning.data.similarity is missing; using token Jaccard")
        return None
    return LazyEncoder(encoder)


class GroupDiversityCallback(Callback):
    """Group Diversity Question Augmentation. Knobs mirror `GroupDiversityAugmenter`, plus:

    Args:
        enabled: False turns the callback into a no-op (keeps a config's knobs for comparison).
        encoder: sentence encoder for diversity selection: None = the default offline MiniLM via
            `SimilarityScorer` if available, else token Jaccard; "jaccard" = no model.
        requeue_originals: re-queue hard original questions unchanged instead of rewriting them
            (DAPO-style bounded resampling), so the two can be compared (next_batches only).
        when: same_step (default): the step's all-wrong no-signal groups are replaced in the same
            step by rewrites of those questions, rolled out and scored (every completion counts);
            with model.dynamic_sample too, rewrites come first, then fresh prompts for what is
            still without signal. next_batches: rewrites are queued into later batches; the
            questions they displace are served first in the next batches.
        max_rounds_per_step: same_step: rewrite rounds per step (0 = no same-step replacement).
        queue_size: next_batches: queue cap; when full, the oldest rewrites are dropped first.
        max_age_steps: next_batches: a queued rewrite not trained on within this many steps
            expires (null: never); `augment/used` and `augment/dropped` count both fates.
        log_every_n_steps: compute and log metrics every this many training batches.
        dynamic_sampling: renamed: use requeue_originals.
    """

    def __init__(
        self,
        rewriters: Sequence[str | dict[str, Any] | Rewriter] = DEFAULT_REWRITERS,
        num_rewrites: int = 2,
        detect: Sequence[str] = DEFAULT_DETECT,
        std_tol: float = 1e-6,
        low_reward_threshold: float = 0.25,
        right_reward_threshold: float = 1.0,
        max_fraction: float = 0.25,
        max_rounds: int = 2,
        queue_size: int = 512,
        max_age_steps: int | None = 20,
        seed: int = 0,
        temperature: float | None = None,
        lambda_: float = 0.5,
        encoder: str | None = None,
        enabled: bool = True,
        requeue_originals: bool = False,
        when: str = "same_step",
        max_rounds_per_step: int = 1,
        log_every_n_steps: int = 1,
        dynamic_sampling: bool | None = None,
    ) -> None:
        if dynamic_sampling is not None:
            new = RENAMED_SETTINGS["dynamic_sampling"]
            raise ValueError(f"augmentation.dynamic_sampling was renamed: use augmentation.{new}")
        if log_every_n_steps < 1:
            raise ValueError(f"GroupDiversityCallback: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.enabled, self.log_every_n_steps, self.encoder = enabled, log_every_n_steps, encoder
        self.augmenter = GroupDiversityAugmenter(
            rewriters=rewriters,
            num_rewrites=num_rewrites,
            detect=detect,
            std_tol=std_tol,
            low_reward_threshold=low_reward_threshold,
            right_reward_threshold=right_reward_threshold,
            max_fraction=max_fraction,
            max_rounds=max_rounds,
            queue_size=queue_size,
            max_age_steps=max_age_steps,
            seed=seed,
            temperature=temperature,
            lambda_=lambda_,
            embed=None,  # set in setup(): building it may import sentence-transformers
            requeue_originals=requeue_originals,
            when=when,
            max_rounds_per_step=max_rounds_per_step,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "attach_augmenter"):
            raise ValueError(
                "GroupDiversityCallback needs a DataModule with `attach_augmenter(augmenter)` "
                f"(got {type(datamodule).__name__}); pass datamodule=AnatomyVQADataModule(...) to fit, "
                "or set enabled: false"
            )
        self.augmenter.embed = make_embed(self.encoder)
        datamodule.attach_augmenter(self.augmenter)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or outputs is None:  # None: the module skipped this step
            return
        # with dynamic sampling, the scheduled batch as first sampled: its no-signal groups are the hard
        # questions to rewrite (the trained batch had them replaced)
        questions, rewards = scheduled_groups(outputs) if isinstance(outputs, Mapping) else (None, None)
        if not isinstance(rewards, Tensor):
            raise ValueError(
                "GroupDiversityCallback: training_step must return a dict with 'group_rewards', a (N, G) "
                f"tensor of the batch's rewards; got {type(outputs).__name__} "
                f"{sorted(outputs) if isinstance(outputs, Mapping) else ''}"
            )
        questions = questions if questions is not None else _questions(batch)
        questions, rewards = gather_groups(questions, rewards.detach().float().cpu())
        enqueued = self.augmenter.observe(questions, rewards, step=trainer.global_step)
        if batch_idx % self.log_every_n_steps:
            return
        n = max(1, len(questions))
        # the share of *trained* groups that are rewrites (same_step: the replaced ones)
        trained = outputs.get("questions") if isinstance(outputs, Mapping) else None
        trained = trained if isinstance(trained, (list, tuple)) else questions
        metrics = {
            "augment/queue_size": float(len(self.augmenter)),
            "augment/batch_share": sum(bool(q.metadata.get("augmented")) for q in trained) / max(1, len(trained)),
            "augment/enqueued": float(len(enqueued)),
            # next_batches: rewrites trained on, and dropped unused (queue full or expired), so far
            "augment/used": float(self.augmenter.counters["taken"]),
            "augment/dropped": float(self.augmenter.counters["dropped"]),
        }
        stats = group_signal_stats(questions, rewards, self.augmenter.std_tol, self.augmenter.right_reward_threshold)
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        # identical on every rank (inputs were gathered), so no sync_dist reduction is needed
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)

    def state_dict(self) -> dict[str, Any]:
        # image paths under the run's folder (the working directory every output path is relative to)
        # are stored as "<run>/...", so a run folder that was moved or copied still resumes
        return {"augmenter": _map_images(self.augmenter.state_dict(), _to_run_relative)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.augmenter.load_state_dict(_map_images(state_dict["augmenter"], _from_run_relative))


RUN_PREFIX = "<run>/"


def _to_run_relative(path: str) -> str:
    run = os.getcwd()
    absolute = os.path.abspath(path)
    if os.path.commonpath([run, absolute]) == run:
        return RUN_PREFIX + os.path.relpath(absolute, run).replace(os.sep, "/")
    return path


def _from_run_relative(path: str) -> str:
    if path.startswith(RUN_PREFIX):
        return os.path.join(os.getcwd(), *path[len(RUN_PREFIX):].split("/"))
    return path


def _map_images(state: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """The augmenter state with `fn` applied to every queued question's image paths (a new dict)."""
    queue = []
    for entry in state.get("queue", []):
        record = dict(entry["record"])
        record["images"] = [fn(p) for p in record.get("images", [])]
        queue.append({**entry, "record": record})
    return {**state, "queue": queue}


def _questions(batch: Any) -> list[Question]:
    """The batch's questions: a list[Question], or its first element if it is a (questions, ...) pair."""
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], Question):
        batch = batch[0]
    if not isinstance(batch, (list, tuple)) or not all(isinstance(q, Question) for q in batch):
        raise ValueError(
            f"GroupDiversityCallback: training batches must be a list of Question, got {type(batch).__name__}"
        )
    return list(batch)

