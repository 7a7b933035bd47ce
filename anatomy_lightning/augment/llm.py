"""Optional: a local text-generation model as a GDQA paraphraser.

Generated text is untrusted: `validate_generated` keeps a candidate only if it still asks about the
same options without naming the gold, so a weak model yields fewer rewrites, never wrong ones.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable
from typing import Any

from anatomy_lightning.augment.rules import derive
from anatomy_lightning.augment.stem import same_stem
from anatomy_lightning.data.schema import LETTERS, Question

__all__ = ["LocalModelRewriter", "validate_generated"]

_OPTION_LINE_RE = re.compile(rf"^\s*\(?([{LETTERS}])[.)]\s*(.+?)\s*$")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_\-]+", text.lower()))


def validate_generated(
    text: str, q: Question, min_words: int = 4, max_words: int = 60, min_overlap: float = 0.2
) -> Question | None:
    """Turn one generated text into a rewrite of `q`, or None if it is unusable.

    Read: the first non-empty line is the new stem; option lines right after it ("A. Liver"), if
    any, are the new option order; anything after that is ignored (models ramble on). Kept only
    if the stem ends with '?', has min_words..max_words words, differs from the original, shares
    at least `min_overlap` of its word set with it (drops gibberish), does not name the gold option
    unless the original did (no answer leak), and any options listed are exactly the original
    option texts (so the gold option is still there; its index follows its text).
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    stem = " ".join(lines[0].split())
    options = [m[2] for m in itertools.takewhile(bool, (_OPTION_LINE_RE.match(ln) for ln in lines[1:]))]
    if not stem.endswith("?") or not (min_words <= len(stem.split()) <= max_words) or same_stem(stem, q.question):
        return None
    new, old = _words(stem), _words(q.question)
    if len(new & old) / max(1, len(new | old)) < min_overlap:
        return None
    gold = re.compile(rf"\b{re.escape(q.answer_text.lower())}\b")
    if gold.search(stem.lower()) and not gold.search(q.question.lower()):
        return None
    if not options:
        return q.replace(question=stem)
    if sorted(options) != sorted(q.options):
        return None  # lost, added or changed an option: the gold answer is no longer guaranteed
    return q.replace(question=stem, options=options, answer_index=options.index(q.answer_text))


class LocalModelRewriter:
    """Paraphrases with a local text-generation model (optional; never downloads anything).

    `model` is a folder holding a transformers causal LM and its tokenizer. Outputs are checked
    by `validate_generated`; candidates that fail are dropped, so a weak model yields fewer
    rewrites, never wrong ones. The model loads on first use, not at construction.
    """

    name = "local_model"
    PROMPT = (
        "Rewrite the multiple-choice question below so it asks the same thing in different words. "
        "Keep the options unchanged.\nQuestion: {question}\n{options}\nRewritten question:"
    )

    def __init__(
        self,
        model: str,
        num_variants: int = 2,
        num_candidates: int = 4,
        max_new_tokens: int = 48,
        temperature: float = 0.9,
        device: str | int | None = None,
    ) -> None:
        self.model_path, self.device = model, device
        self.num_variants, self.num_candidates = num_variants, num_candidates
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self._pipe: Callable[..., Any] | None = None

    def _pipeline(self) -> Callable[..., Any]:
        if self._pipe is None:
            from pathlib import Path

            from transformers import pipeline

            if not Path(self.model_path).is_dir():
                raise FileNotFoundError(
                    f"local_model rewriter: model folder {self.model_path!r} does not exist; give the path "
                    "of a locally saved causal LM (save_pretrained output); models are never downloaded"
                )
            # a folder path never touches the hub; HF_HUB_OFFLINE=1 guards the rest
            self._pipe = pipeline("text-generation", model=self.model_path, device=self.device)
        return self._pipe

    def generate(self, q: Question, rng: random.Random) -> list[str]:
        import torch

        pipe = self._pipeline()
        prompt = self.PROMPT.format(question=q.question.strip(), options=q.options_block())
        with torch.random.fork_rng(devices=[]):  # seeded from rng, global RNG state untouched
            torch.manual_seed(rng.randrange(2**31))
            out = pipe(
                prompt,
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.num_candidates,
                return_full_text=False,
                pad_token_id=pipe.tokenizer.pad_token_id or pipe.tokenizer.eos_token_id,
            )
        return [o["generated_text"] for o in out]

    def __call__(self, q: Question, rng: random.Random) -> list[Question]:
        kept: list[Question] = []
        for text in self.generate(q, rng):
            r = validate_generated(text, q)
            if r is not None and all(not same_stem(r.question, k.question) for k in kept):
                kept.append(r)
        kept = kept[: self.num_variants]
        return [
            derive(q, k, self.name, question=r.question, options=r.options, answer_index=r.answer_index)
            for k, r in enumerate(kept)
        ]
