"""The GDQA queue: find the groups GRPO cannot learn from, rewrite those questions, serve rewrites.

A group whose G rewards are all equal has zero advantage and gives no gradient. `observe()` reads
each batch's (N, G) rewards, picks the hard questions (see `detect`), asks the rewriters for
candidates, keeps a diverse few (`select_diverse`) and queues them; `take()` hands queued rewrites
to the DataModule, which swaps them into the coming batches (`when="next_batches"`). With
`when="same_step"` (the default) nothing is queued: the LightningModule replaces the step's hard
no-signal groups by `rewrite_now()` rewrites of the same questions, rolled out in the same step,
and `observe()` only keeps the per-question budget (`max_rounds`). Pure Python: no Lightning here, so
the decisions are testable with scripted rewards, and a seeded augmenter makes identical decisions
on every rank and after a resume.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.augment.registry import Rewriter, build_rewriters
from anatomy_lightning.augment.selection import Embed, select_diverse
from anatomy_lightning.data.schema import LETTERS, Question

__all__ = [
    "DEFAULT_DETECT",
    "DEFAULT_REWRITERS",
    "DETECT_RULES",
    "RENAMED_SETTINGS",
    "WHEN",
    "GroupDiversityAugmenter",
    "group_signal_stats",
    "hard_groups",
    "hard_order",
]

DETECT_RULES = ("zero_std_wrong", "zero_std_right", "low_mean")
# all-wrong groups: no signal on a question the policy cannot answer (low_mean also fires on groups with spread)
DEFAULT_DETECT = ("zero_std_wrong",)
# rewrites that change what is asked; paraphrases etc. stay available by name (they cost accuracy, DESIGN.md)
DEFAULT_REWRITERS = ("eliminate_options", "contrast_cue")
WHEN = ("same_step", "next_batches")  # when rewrites are trained
# retired setting -> its new name: GroupDiversityCallback still accepts the old name so the CLI parses
# it, and the settings check refuses it naming the new one (dynamic_sampling read like model.dynamic_sample)
RENAMED_SETTINGS = {"dynamic_sampling": "requeue_originals"}
_HIDDEN_METADATA = ("source", "record")  # dropped by Question.to_record(); kept apart in state


def _spread(group_rewards: Tensor) -> Tensor:
    """Population std per group (a group of 1 has no spread)."""
    if group_rewards.shape[1] < 2:
        return torch.zeros(group_rewards.shape[0])
    return group_rewards.float().std(dim=1, unbiased=False)


def _check_shapes(questions: Sequence[Question], group_rewards: Tensor) -> None:
    if group_rewards.ndim != 2 or group_rewards.shape[0] != len(questions):
        raise ValueError(
            f"group_rewards must be (N, G) with N = {len(questions)} questions in the batch, "
            f"got shape {tuple(group_rewards.shape)}; return one row of G rewards per question"
        )


def hard_groups(
    group_rewards: Tensor,
    detect: Sequence[str],
    std_tol: float = 1e-6,
    low_reward_threshold: float = 0.25,
    right_reward_threshold: float = 1.0,
) -> Tensor:
    """(N,) bool: groups matching any rule in `detect`.

    zero_std_wrong: no spread and mean < right_reward_threshold (all completions wrong);
    zero_std_right: no spread and mean >= right_reward_threshold (all right);
    low_mean: mean < low_reward_threshold, whatever the spread.
    """
    rules = _rule_masks(group_rewards, std_tol, low_reward_threshold, right_reward_threshold)
    hard = torch.zeros(group_rewards.shape[0], dtype=torch.bool)
    for name in detect:
        hard |= rules[name]
    return hard


def _rule_masks(group_rewards: Tensor, std_tol: float, low: float, right_threshold: float) -> dict[str, Tensor]:
    """(N,) bool per detection rule (see `hard_groups`)."""
    rewards = group_rewards.detach().float().cpu()
    mean, flat = rewards.mean(dim=1), _spread(rewards) < std_tol
    right = mean >= right_threshold - std_tol
    return {"zero_std_wrong": flat & ~right, "zero_std_right": flat & right, "low_mean": mean < low}


def hard_order(
    group_rewards: Tensor,
    detect: Sequence[str],
    std_tol: float = 1e-6,
    low_reward_threshold: float = 0.25,
    right_reward_threshold: float = 1.0,
) -> list[int]:
    """Indices of the hard groups (`hard_groups`), all-wrong ones first, each kind in batch order:
    when hard questions compete for the queue or a budget, no-signal questions the policy cannot
    answer win over groups that still have spread."""
    hard = hard_groups(group_rewards, detect, std_tol, low_reward_threshold, right_reward_threshold).tolist()
    wrong = _rule_masks(group_rewards, std_tol, low_reward_threshold, right_reward_threshold)["zero_std_wrong"].tolist()
    return [i for i, h in enumerate(hard) if h and wrong[i]] + [i for i, h in enumerate(hard) if h and not wrong[i]]


def group_signal_stats(
    questions: Sequence[Question], group_rewards: Tensor, std_tol: float = 1e-6, right_reward_threshold: float = 1.0
) -> dict[str, float]:
    """Invalid gradient ratio (share of zero-spread groups), overall and per anatomy class, split
    into all-wrong groups (`invalid_all_wrong`: the paper's "no signal on a hard question") and
    all-right ones (`invalid_all_right`: nothing left to learn), plus the mean reward of augmented
    and of original questions where the batch has them. The split follows `hard_groups`: a
    zero-spread group is all right when its mean reward reaches `right_reward_threshold`."""
    _check_shapes(questions, group_rewards)
    if not questions:
        return {}
    rewards = group_rewards.detach().float().cpu()
    flat = _spread(rewards) < std_tol
    right = rewards.mean(dim=1) >= right_reward_threshold - std_tol
    kinds = {
        "invalid_gradient_ratio": flat.tolist(),
        "invalid_all_wrong": (flat & ~right).tolist(),
        "invalid_all_right": (flat & right).tolist(),
    }
    means = rewards.mean(dim=1).tolist()
    stats: dict[str, float] = {}
    for kind, flags in kinds.items():
        stats[kind] = sum(flags) / len(flags)
        by_class: dict[str, list[bool]] = {}
        for q, bad in zip(questions, flags):
            by_class.setdefault(q.anatomy, []).append(bad)
        for name in sorted(by_class):
            stats[f"{kind}/{name}"] = sum(by_class[name]) / len(by_class[name])
    for key, flag in (("reward/augmented", True), ("reward/original", False)):
        rows = [m for q, m in zip(questions, means) if bool(q.metadata.get("augmented")) is flag]
        if rows:
            stats[key] = sum(rows) / len(rows)
    return stats


class GroupDiversityAugmenter:
    """Rewrites hard questions and queues a diverse subset for injection into later batches.

    Args:
        rewriters: rewriter names, {name: ..., <args>} mappings or Rewriter objects (see
            `augment.registry.REWRITERS`); candidates from all of them compete in selection.
            Default: eliminate_options, contrast_cue (rewrites that change what is asked).
        num_rewrites: rewrites queued per hard question each time it is found hard (next_batches).
        detect: which groups count as hard: any of "zero_std_wrong" (all wrong, no spread; the
            default), "zero_std_right" (all right, no spread: nothing to fix there),
            "low_mean" (mean reward < low_reward_threshold, also groups with spread; next_batches
            only: a group with spread is never replaced in the same step). All-wrong ones come
            first when hard questions compete for the queue or a budget.
        std_tol: a group with reward std below this has no spread (no GRPO gradient).
        low_reward_threshold: the "low_mean" cut-off, in units of the total weighted reward.
        right_reward_threshold: a zero-spread group with mean reward >= this is "all right".
            With accuracy worth 1 and a smaller format reward, 1.0 separates the two.
        max_fraction: at most this share of each training batch is replaced by rewrites.
        max_rounds: how many times one original question may be rewritten over the run.
        queue_size: queue cap; when full, the oldest rewrites are dropped first.
        max_age_steps: a queued rewrite not trained on within this many steps expires (counted as
            dropped): a queue growing faster than batches drain it only serves stale rewrites.
        seed: seeds the rewriters' randomness (identical on every rank).
        temperature: sampling temperature for augmented groups, written to
            `q.metadata["temperature"]`; None samples them like any other question.
        lambda_: MMR trade-off in selection: 1 = only far from the original, 0 = only far apart.
        embed: texts -> (n, d) embeddings for selection; None uses token Jaccard (no model).
        requeue_originals: instead of rewriting, re-queue the hard original questions unchanged
            (DAPO-style bounded resampling, capped by max_rounds), to compare against GDQA.
        when: "same_step": the module replaces the step's hard no-signal groups by rewrites of the
            same questions (`rewrite_now`), rolled out in the same step; nothing is queued.
            "next_batches": rewrites are queued and swapped into later batches (the questions
            they displace are deferred to the next batches by the DataModule, not lost).
        max_rounds_per_step: same_step: rewrite rounds per step (a rewrite still without signal
            is rewritten again in the next round); 0 = no same-step replacement.
    """

    def __init__(
        self,
        rewriters: Sequence[Rewriter | str | Mapping[str, Any]] = DEFAULT_REWRITERS,
        num_rewrites: int = 2,
        detect: Sequence[str] = DEFAULT_DETECT,
        std_tol: float = 1e-6,
        low_reward_threshold: float = 0.25,
        right_reward_threshold: float = 1.0,
        max_fraction: float = 0.25,
        max_rounds: int = 2,
        queue_size: int = 512,
        seed: int = 0,
        temperature: float | None = None,
        lambda_: float = 0.5,
        embed: Embed | None = None,
        requeue_originals: bool = False,
        when: str = "same_step",
        max_rounds_per_step: int = 1,
        max_age_steps: int | None = 20,
    ) -> None:
        problems = []
        if max_age_steps is not None and (isinstance(max_age_steps, bool) or max_age_steps < 1):
            problems.append(f"max_age_steps must be an integer >= 1 or null, got {max_age_steps!r}")
        if when not in WHEN:
            problems.append(f"when must be one of {list(WHEN)}, got {when!r}")
        if isinstance(max_rounds_per_step, bool) or not isinstance(max_rounds_per_step, int) or max_rounds_per_step < 0:
            problems.append(f"max_rounds_per_step must be an integer >= 0, got {max_rounds_per_step!r}")
        if bad := [d for d in detect if d not in DETECT_RULES]:
            problems.append(f"detect has unknown rules {bad}; choose from {list(DETECT_RULES)}")
        if not 0.0 <= max_fraction <= 1.0:
            problems.append(f"max_fraction must be in [0, 1], got {max_fraction}")
        for name, value in (("num_rewrites", num_rewrites), ("max_rounds", max_rounds), ("queue_size", queue_size)):
            if value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if temperature is not None and temperature <= 0:
            problems.append(f"temperature must be > 0 or null, got {temperature}")
        if not 0.0 <= lambda_ <= 1.0:
            problems.append(f"lambda_ must be in [0, 1], got {lambda_}")
        if problems:
            raise ValueError("GroupDiversityAugmenter: " + "; ".join(problems))
        self.rewriters = build_rewriters(rewriters)
        self.num_rewrites, self.detect = num_rewrites, tuple(detect)
        self.std_tol, self.low_reward_threshold = std_tol, low_reward_threshold
        self.right_reward_threshold = right_reward_threshold
        self.max_fraction, self.max_rounds, self.queue_size = max_fraction, max_rounds, queue_size
        self.seed, self.temperature, self.lambda_ = seed, temperature, lambda_
        self.embed, self.requeue_originals = embed, requeue_originals
        self.when, self.max_rounds_per_step, self.max_age_steps = when, max_rounds_per_step, max_age_steps

        self.rng = random.Random(seed)
        self.queue: deque[Question] = deque()
        self.rounds: dict[str, int] = {}  # original uid -> times rewritten
        self.made: dict[str, int] = {}  # original uid -> rewrites made (numbers the ids)
        self.counters = dict.fromkeys(("observed", "hard", "enqueued", "taken", "dropped"), 0)
        self.last_enqueued = 0

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def embed(self) -> Embed | None:
        return self._embed

    @embed.setter
    def embed(self, embed: Embed | None) -> None:
        """Selection's encoder, handed to every rewriter with an `embed` slot (nearest distractor)."""
        self._embed = embed
        for rewriter in self.rewriters:
            for r in getattr(rewriter, "steps", [rewriter]):
                if hasattr(r, "embed"):
                    r.embed = embed

    # -- detection and rewriting ---------------------------------------------------------------
    def observe(self, questions: Sequence[Question], group_rewards: Tensor, step: int = 0) -> list[Question]:
        """Queue rewrites of this batch's hard original questions; returns what was queued.

        Rewrites in the batch are judged for statistics only, never rewritten again. `step` is
        recorded on the rewrites (metadata["augmented_at_step"]). Hard questions are taken
        all-wrong first. With `when="same_step"` nothing is queued: the hard questions the module
        rewrote in this step (`same_step_targets`) use one round of their `max_rounds` budget.
        """
        _check_shapes(questions, group_rewards)
        self.counters["observed"] += len(questions)
        if self.when == "same_step":
            self.last_enqueued = 0
            for i in self.same_step_targets(questions, group_rewards):
                self.rounds[questions[i].uid] = self.rounds.get(questions[i].uid, 0) + 1
            self.counters["hard"] += sum(
                1 for i in self._hard(group_rewards) if not questions[i].metadata.get("augmented"))
            return []
        self._expire(step)
        enqueued: list[Question] = []
        for i in self._hard(group_rewards):
            q = questions[i]
            if q.metadata.get("augmented"):
                continue
            self.counters["hard"] += 1
            # budgets keyed on uid: two questions that share an id in the file keep their own budget
            if self.rounds.get(q.uid, 0) >= self.max_rounds:
                continue
            self.rounds[q.uid] = self.rounds.get(q.uid, 0) + 1
            enqueued += self._rewrites(q, step)
        for r in enqueued:
            self._push(r)
        self.counters["enqueued"] += len(enqueued)
        self.last_enqueued = len(enqueued)
        return enqueued

    def _hard(self, group_rewards: Tensor) -> list[int]:
        return hard_order(group_rewards, self.detect, self.std_tol, self.low_reward_threshold,
                          self.right_reward_threshold)

    # -- same step -----------------------------------------------------------------------------
    def same_step_targets(self, questions: Sequence[Question], group_rewards: Tensor) -> list[int]:
        """Indices of the groups `rewrite_now` replaces: hard by `detect`, without reward spread
        (a group with spread already trains), original, and within the `max_rounds` budget;
        all-wrong ones first."""
        _check_shapes(questions, group_rewards)
        flat = (_spread(group_rewards.detach().float().cpu()) < self.std_tol).tolist()
        return [
            i for i in self._hard(group_rewards)
            if flat[i] and not questions[i].metadata.get("augmented")
            and self.rounds.get(questions[i].uid, 0) < self.max_rounds
        ]

    def rewrite_now(self, questions: Sequence[Question], step: int, round_: int = 1) -> list[Question | None]:
        """One rewrite per question for same-step replacement (None where no rewriter applies).

        The pick is the most novel candidate (`select_diverse`, k=1). Randomness comes from a
        generator seeded by (seed, step, round, uid) alone, and no state changes, so every rank
        makes the same rewrite of a question whatever else its batch holds, and a resumed run
        makes the same ones (the budget is counted by `observe`, on the gathered batch).
        """
        out: list[Question | None] = []
        for q in questions:
            rng = random.Random(f"{self.seed}/same_step/{step}/{round_}/{q.uid}")
            candidates = [c for rewriter in self.rewriters for c in rewriter(q, rng)]
            # round k takes the k-th most diverse candidate: a rewrite that gave no signal is not retried
            picked = select_diverse(candidates, round_, self.embed, self.lambda_, reference=q)
            if not picked:
                out.append(None)
                continue
            r = picked[min(round_, len(picked)) - 1]
            out.append(self._stamp(q, r, f"s{step}r{round_}-{r.metadata['rewriter']}", step))
        return out

    def _rewrites(self, q: Question, step: int) -> list[Question]:
        if self.requeue_originals:
            meta = {**q.metadata, "augmented_from": q.id, "rewriter": "resample", "augmented": True}
            picked = [q.replace(metadata=meta)]
        else:
            candidates = [c for rewriter in self.rewriters for c in rewriter(q, self.rng)]
            picked = select_diverse(candidates, self.num_rewrites, self.embed, self.lambda_, reference=q)
        out = []
        for r in picked:
            n = self.made.get(q.uid, 0)
            self.made[q.uid] = n + 1
            tag = f"resample{n}" if self.requeue_originals else f"aug{n}-{r.metadata['rewriter']}"
            out.append(self._stamp(q, r, tag, step))
        return out

    def _stamp(self, q: Question, rewrite: Question, tag: str, step: int) -> Question:
        """`rewrite` of `q` with its own id and uid (`<q>#<tag>`), the step it was made at and the
        augmented-group temperature."""
        meta = {**rewrite.metadata, "augmented_at_step": step}
        if self.temperature is not None:
            meta["temperature"] = self.temperature
        return rewrite.replace(id=f"{q.id}#{tag}", uid=f"{q.uid}#{tag}", metadata=meta)

    def _expire(self, step: int) -> None:
        """Drop queued rewrites made more than `max_age_steps` steps before `step`."""
        if self.max_age_steps is None:
            return
        fresh = [q for q in self.queue if step - int(q.metadata.get("augmented_at_step", step)) <= self.max_age_steps]
        self.counters["dropped"] += len(self.queue) - len(fresh)
        self.queue = deque(fresh)

    def _push(self, q: Question) -> None:
        if self.queue_size == 0:
            self.counters["dropped"] += 1
            return
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.counters["dropped"] += 1
        self.queue.append(q)

    # -- serving -------------------------------------------------------------------------------
    def budget(self, batch_size: int) -> int:
        """How many questions of a batch of this size may be rewrites."""
        return math.floor(self.max_fraction * batch_size + 1e-9)

    def take(self, n: int, active_stages: set[int] | None = None) -> list[Question]:
        """Up to n queued rewrites, oldest first, from the active curriculum stages only.

        Rewrites of inactive stages stay queued, in order, for when their stage is active.
        A question without a stage is always eligible.
        """
        taken: list[Question] = []
        kept: deque[Question] = deque()
        while self.queue:
            q = self.queue.popleft()
            eligible = active_stages is None or q.stage is None or q.stage in active_stages
            (taken if eligible and len(taken) < n else kept).append(q)
        self.queue = kept
        self.counters["taken"] += len(taken)
        return taken

    def metrics(self) -> dict[str, float]:
        """Counters for logging (cumulative unless named `last_*`)."""
        return {
            "queue_size": float(len(self.queue)),
            "last_enqueued": float(self.last_enqueued),
            **{f"{k}_total": float(v) for k, v in self.counters.items()},
            "originals_rewritten": float(len(self.rounds)),
        }

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain lists/dicts/numbers only (loads under torch.load(weights_only=True))."""
        version, internal, gauss = self.rng.getstate()
        return {
            "queue": [
                {
                    "record": q.to_record(),
                    "uid": q.uid,
                    "stage": q.stage,
                    "similarity": q.similarity,
                    "hidden_metadata": {k: q.metadata[k] for k in _HIDDEN_METADATA if k in q.metadata},
                }
                for q in self.queue
            ],
            "rounds": dict(self.rounds),
            "made": dict(self.made),
            "counters": dict(self.counters),
            "last_enqueued": self.last_enqueued,
            "rng_state": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.queue = deque(_question_from_state(entry) for entry in state["queue"])
        self.rounds = dict(state["rounds"])
        self.made = dict(state["made"])
        self.counters = {**dict.fromkeys(self.counters, 0), **state["counters"]}
        self.last_enqueued = int(state.get("last_enqueued", 0))
        version, internal, gauss = state["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))


def _question_from_state(entry: Mapping[str, Any]) -> Question:
    """Inverse of the queue entry written by `state_dict` (a generic record + stage/S(q))."""
    rec = entry["record"]
    answer = rec["answer"]
    if answer not in LETTERS[: len(rec["options"])]:
        raise ValueError(
            f"augmenter state: queued record {rec.get('id')!r} field 'answer' is {answer!r}, not one of "
            f"{list(LETTERS[: len(rec['options'])])}; the checkpoint is damaged or from another version"
        )
    return Question(
        id=rec["id"],
        uid=entry.get("uid", rec["id"]),
        question=rec["question"],
        options=list(rec["options"]),
        answer_index=LETTERS.index(answer),
        images=list(rec.get("images", [])),
        metadata={**rec.get("metadata", {}), **entry.get("hidden_metadata", {})},
        similarity=entry.get("similarity"),
        stage=entry.get("stage"),
    )
