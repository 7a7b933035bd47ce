"""The rewriter registry: YAML names -> rewriter classes, the `Rewriter` protocol they share, and
`Chain`, which composes registered rewriters by name.

YAML lists rewriters by registry name, with arguments where wanted:

    rewriters: [{name: eliminate_options, keep: 2}, contrast_cue, template_paraphrase]
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from anatomy_lightning.augment.llm import LocalModelRewriter
from anatomy_lightning.augment.rules import (
    AnswerForm,
    ContrastCue,
    EliminateOptions,
    InvertRelation,
    ShuffleOptions,
    TemplateParaphrase,
    derive,
)
from anatomy_lightning.data.schema import Question

__all__ = ["REWRITERS", "Chain", "Rewriter", "build_rewriter", "build_rewriters"]


@runtime_checkable
class Rewriter(Protocol):
    """Maps a question to zero or more rewrites; must only use `rng` for randomness."""

    name: str

    def __call__(self, q: Question, rng: random.Random) -> list[Question]: ...


class Chain:
    """Applies rewriters in sequence (each output of one goes through the next): composition."""

    def __init__(self, steps: Sequence[Rewriter | str | Mapping[str, Any]], num_variants: int = 2) -> None:
        self.steps = build_rewriters(steps)
        if not self.steps:
            raise ValueError("chain: `steps` is empty; list at least one rewriter name")
        self.name = "+".join(s.name for s in self.steps)
        self.num_variants = num_variants

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        current = [q]
        for step in self.steps:
            current = [r for c in current for r in step(c, rng)]
        chosen = rng.sample(current, min(self.num_variants, len(current)))
        keep = ("answer_form",)  # per-step annotations worth carrying to the final rewrite
        return [
            derive(q, k, self.name, question=c.question, options=c.options, answer_index=c.answer_index,
                   metadata={key: c.metadata[key] for key in keep if key in c.metadata})
            for k, c in enumerate(chosen)
        ]


REWRITERS: dict[str, Callable[..., Rewriter]] = {
    TemplateParaphrase.name: TemplateParaphrase,
    InvertRelation.name: InvertRelation,
    ShuffleOptions.name: ShuffleOptions,
    AnswerForm.name: AnswerForm,
    EliminateOptions.name: EliminateOptions,
    ContrastCue.name: ContrastCue,
    LocalModelRewriter.name: LocalModelRewriter,
    "chain": Chain,
}


def build_rewriter(spec: Rewriter | str | Mapping[str, Any]) -> Rewriter:
    """A rewriter from a registry name, a {name: ..., **args} mapping, or an instance."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        args = dict(spec)
        name = args.pop("name", None)
        if name not in REWRITERS:
            raise ValueError(
                f"augment rewriters: unknown rewriter {name!r} in {dict(spec)!r}; "
                f"choose one of {sorted(REWRITERS)} (as a name or as {{name: ..., <args>}})"
            )
        try:
            return REWRITERS[name](**args)
        except TypeError as err:
            raise ValueError(f"augment rewriters: bad arguments for {name!r}: {args!r} ({err})") from err
    if callable(spec) and isinstance(getattr(spec, "name", None), str):
        return spec
    raise ValueError(f"augment rewriters: {spec!r} is not a rewriter name, mapping or Rewriter object")


def build_rewriters(specs: Sequence[Rewriter | str | Mapping[str, Any]]) -> list[Rewriter]:
    """The rewriters of a YAML list, in order (see `build_rewriter`)."""
    return [build_rewriter(s) for s in specs]
