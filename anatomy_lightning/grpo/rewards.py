"""Reward functions for multiple-choice answers, and the weighted sum the trainer optimises.

Contract (mirrors TRL's, with our `Question` in place of dataset columns): a reward function is

    f(completions: list[str], questions: list[Question], **kwargs) -> list[float | None]

one value per completion, `questions[i]` being the question completion i answers (repeated G
times per group). `None` means "cannot score this one": as in TRL, that function is left out of
the completion's weighted sum, and a completion that no function scored gets a NaN total, which
`group_advantages` leaves out of its group's mean and std (advantage 0). Functions must be
deterministic and cheap: they run on every rollout. Built-ins are named in `REWARD_FUNCTIONS`; a
user function is given by import path, "package.module:function". An exception inside a function
surfaces as one `RewardFunctionError` line naming it (the original traceback is its `__cause__`).
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from anatomy_lightning.data.schema import LETTERS, Question

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardComputer",
    "RewardFunction",
    "RewardFunctionError",
    "accuracy_reward",
    "extract_choice",
    "format_reward",
    "resolve_reward_function",
    "reward_metrics",
    "soft_overlong_reward",
]

RewardFunction = Callable[..., Sequence[Any]]

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# "Answer: C", "The correct option is C", "Option (C)" -> drop the lead-in before parsing.
_LEAD_IN_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*",
    re.IGNORECASE,
)
# A letter in one of the shapes "C", "C.", "C)", "C:", "(C)", "[C]", "C Liver", "C. Liver".
_LETTER_RE = re.compile(
    rf"^(?:\((?P<paren>[{LETTERS}])\)|\[(?P<bracket>[{LETTERS}])\]"
    rf"|(?P<bare>[{LETTERS}])(?:(?P<sep>[.):\]])|(?=\s|$)))\s*(?P<rest>.*)$",
    re.IGNORECASE | re.DOTALL,
)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def _normalise(text: str) -> str:
    """Lower case, punctuation to spaces, one space between words, no leading article."""
    words = re.sub(r"[\W_]+", " ", text.lower()).split()
    if words and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


def _mentioned(text: str, options: Sequence[str]) -> set[int]:
    """Options whose full text appears (as whole words) in `text`.

    An option contained in a longer mentioned option ("liver" in "liver tissue") is not counted.
    """
    padded = f" {_normalise(text)} "
    norms = [_normalise(o) for o in options]
    hits = {i for i, n in enumerate(norms) if n and f" {n} " in padded}

    def inside_longer(i: int) -> bool:
        return any(norms[j] != norms[i] and f" {norms[i]} " in f" {norms[j]} " for j in hits)

    return {i for i in hits if not inside_longer(i)}


def _text_choice(text: str, options: Sequence[str]) -> int | None:
    """The one option a free-text answer names, exact match first, else unique mention."""
    target = _normalise(text)
    exact = [i for i, o in enumerate(options) if _normalise(o) == target]
    if exact:
        return exact[0] if len(exact) == 1 else None
    hits = _mentioned(text, options)
    return hits.pop() if len(hits) == 1 else None


def _answer_text(completion: str) -> str | None:
    """The content of the last <answer>...</answer>, lead-in ("Answer:", "The option is") dropped."""
    found = _ANSWER_RE.findall(completion)
    if not found:
        return None
    return _LEAD_IN_RE.sub("", found[-1].strip(), count=1).strip()


def extract_choice(completion: str, options: Sequence[str]) -> int | None:
    """Index of the option chosen inside the last <answer>...</answer>, or None.

    Accepts a letter ("C", "c", "C.", "(C)", "C) Liver", "C. Liver") or the option text
    ("Liver", "the liver"). A letter with text naming another option ("C. Gut" when C is Liver)
    is a contradiction and gives None, as do letters outside the option range, several options,
    and a missing tag. A lowercase letter followed by words ("a liver") is read as text.
    """
    answer = _answer_text(completion)
    if answer is None:
        return None
    m = _LETTER_RE.match(answer)
    if m:
        letter = m.group("paren") or m.group("bracket") or m.group("bare")
        rest = m.group("rest")
        plain_lower = m.group("bare") and not m.group("sep") and letter.islower()
        if not (plain_lower and _normalise(rest)):
            index = LETTERS.index(letter.upper())
            if index >= len(options):
                return None
            if not _normalise(rest):
                return index
            return index if _mentioned(rest, options) == {index} else None
    return _text_choice(answer, options)


def _check_lengths(completions: Sequence[str], questions: Sequence[Question]) -> None:
    if len(completions) != len(questions):
        raise ValueError(
            f"{len(completions)} completions but {len(questions)} questions; repeat each "
            "question once per completion of its group"
        )


def accuracy_reward(
    completions: list[str], questions: list[Question], **kwargs: Any
) -> list[float]:
    """1.0 when the last <answer> names the gold option (by letter or text), else 0.0."""
    _check_lengths(completions, questions)
    return [
        1.0 if extract_choice(c, q.options) == q.answer_index else 0.0
        for c, q in zip(completions, questions)
    ]


def option_text_reward(
    completions: list[str], questions: list[Question], **kwargs: Any
) -> list[float]:
    """1.0 when the last <answer> names the gold option by its *text*; a bare letter scores 0.

    For prompts that ask for the option's name: there a letter is a shortcut a weak policy can
    collapse onto (always "C" earns 1/4 of the reward without looking at the image).
    """
    _check_lengths(completions, questions)
    answers = [_answer_text(c) for c in completions]
    return [
        1.0 if a and _text_choice(a, q.options) == q.answer_index else 0.0
        for a, q in zip(answers, questions)
    ]


def format_reward(completions: list[str], questions: list[Question], **kwargs: Any) -> list[float]:
    """1.0 for exactly `<think>...</think> <answer>...</answer>` (whitespace around allowed).

    Exactly one of each tag and nothing but whitespace after </answer>, so the policy cannot farm
    the reward by repeating tags. Empty tag contents are allowed: accuracy judges the content.
    """
    _check_lengths(completions, questions)
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [
        1.0 if _FORMAT_RE.match(c) and all(c.count(t) == 1 for t in tags) else 0.0
        for c in completions
    ]


def soft_overlong_reward(
    completions: list[str], questions: list[Question], completion_ids: Sequence[Sequence[int]] | None = None,
    soft_max_length: int | None = None, soft_cache_length: int | None = None, **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Eq. 13; TRL's `get_soft_overlong_punishment`, ms-swift's
    `soft_overlong`): with L = len(completion_ids[i]) tokens (end-of-turn token included, as TRL
    counts), L_max = `soft_max_length` and L_cache = `soft_cache_length`,

        0                                  if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        -1                                 if L > L_max

    It only punishes length, never rewards brevity. `GRPOModule` passes the three keyword arguments
    (`model.soft_max_length`, default model.max_new_tokens, and `model.soft_cache_length`).
    ms-swift's version keeps falling linearly past L_max instead of stopping at -1; the two agree
    whenever L_max is max_new_tokens (no completion is longer).
    """
    _check_lengths(completions, questions)
    if completion_ids is None or soft_max_length is None or soft_cache_length is None:
        raise ValueError(
            "soft_overlong needs completion_ids, soft_max_length and soft_cache_length (GRPOModule passes them; "
            "set model.soft_cache_length)"
        )
    if len(completion_ids) != len(completions):
        raise ValueError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
    start = soft_max_length - soft_cache_length  # the punishment starts after this many tokens
    out = []
    for ids in completion_ids:
        n = len(ids)
        out.append(0.0 if n <= start else (start - n) / soft_cache_length if n <= soft_max_length else -1.0)
    return out


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "option_text": option_text_reward,
    "format": format_reward,
    "soft_overlong": soft_overlong_reward,
}


def resolve_reward_function(spec: str) -> RewardFunction:
    """A built-in name from REWARD_FUNCTIONS, or an import path "package.module:function"."""
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    hint = (
        f"use a built-in ({', '.join(sorted(REWARD_FUNCTIONS))}) or an import path "
        "'package.module:function' importable from the working directory"
    )
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {spec!r} is neither a built-in nor an import path; {hint}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward function {spec!r}: cannot import {module_name!r} ({exc}); {hint}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}; {hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward function {spec!r} resolves to a {type(obj).__name__}, not a callable"
        )
    return obj


class RewardFunctionError(RuntimeError):
    """A user reward function raised: the message names it and the exception in one line.

    The original exception, with its traceback, is `__cause__` (Python prints it under
    "The above exception was the direct cause"; a debug flag can choose to show it).
    """


class RewardComputer:
    """Calls each reward function once per batch and sums them with their weights.

    `funcs` maps a built-in name or import path to its weight; all are resolved here, so a bad
    config fails before any GPU time is spent.
    """

    def __init__(self, funcs: dict[str, float]) -> None:
        if not funcs:
            raise ValueError(
                "RewardComputer needs at least one reward function, e.g. {'accuracy': 1.0}"
            )
        self.weights: dict[str, float] = {}
        self.funcs: dict[str, RewardFunction] = {}
        for spec, weight in funcs.items():
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(
                    f"reward function {spec!r}: weight must be a finite number, got {weight!r}"
                )
            self.funcs[spec] = resolve_reward_function(spec)
            self.weights[spec] = float(weight)

    def __call__(
        self, completions: list[str], questions: list[Question], **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted total (B,), {name: unweighted values (B,)}), float32 on the CPU.

        A value a function could not give (None) is NaN in its per-function tensor and left out of
        the total; a total is NaN only where no function scored that completion.
        """
        _check_lengths(completions, questions)
        per_function: dict[str, Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        scored = torch.zeros(len(completions), dtype=torch.bool)
        for name, func in self.funcs.items():
            try:
                raw = func(completions, questions, **kwargs)
            except Exception as exc:  # user code: name it, keep the traceback as the cause
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise RewardFunctionError(
                    f"reward function {name!r} raised {type(exc).__name__}"
                    + (f": {first}" if first else "")
                ) from exc
            values = torch.tensor(self._checked(name, raw, len(completions)), dtype=torch.float32)
            per_function[name] = values
            ok = ~torch.isnan(values)
            total = total + torch.where(ok, self.weights[name] * values, torch.zeros_like(values))
            scored |= ok
        if not torch.isfinite(total).all():
            row = int((~torch.isfinite(total)).nonzero()[0])
            parts = ", ".join(f"{n!r} {float(v[row])!r} x {self.weights[n]}" for n, v in per_function.items())
            raise ValueError(
                f"the weighted reward of completion {row} overflows to {float(total[row])} ({parts}); "
                "scale the reward functions or their weights down"
            )
        total = torch.where(scored, total, torch.full_like(total, math.nan))
        return total, per_function

    @staticmethod
    def _checked(name: str, values: Any, expected: int) -> list[float]:
        """None -> NaN ("cannot score"); anything but a finite real number is the function's bug."""
        if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
            values = values.tolist()  # a tensor or an array of rewards
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise ValueError(
                f"reward function {name!r} returned {type(values).__name__}; "
                "expected a list with one float per completion"
            )
        if len(values) != expected:
            raise ValueError(
                f"reward function {name!r} returned {len(values)} values for "
                f"{expected} completions; return one value per completion"
            )
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(math.nan)
            elif isinstance(v, numbers.Real) and math.isfinite(v):
                out.append(float(v))
            else:
                raise ValueError(
                    f"reward function {name!r} returned {v!r} for completion {i}; rewards must be "
                    "finite numbers (or None for cannot score)"
                )
        return out


def _nan_mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and sample std of the non-NaN values (TRL's nanmean / nanstd); 0 where undefined."""
    v = values[~torch.isnan(values)].double()
    mean = float(v.mean()) if v.numel() else 0.0
    std = float(v.std()) if v.numel() > 1 else 0.0
    return mean, std


def reward_metrics(total: Tensor, per_function: dict[str, Tensor]) -> dict[str, float]:
    """TRL's tags `reward`, `rewards/<fn>/mean` and `rewards/<fn>/std`, over scored values only.

    Completions a function could not score (NaN) are left out of its statistics, as TRL's
    nanmean / nanstd do; `reward_unscored_share` is the share of completions no function scored.
    """
    mean, _ = _nan_mean_std(total.detach().cpu())
    out = {"reward": mean, "reward_unscored_share": float(torch.isnan(total).float().mean())}
    for name, values in per_function.items():
        fn_mean, fn_std = _nan_mean_std(values.detach().cpu())
        out[f"rewards/{name}/mean"] = fn_mean
        out[f"rewards/{name}/std"] = fn_std
    return out
