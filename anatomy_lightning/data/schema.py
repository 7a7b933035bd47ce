"""The one typed record every reader produces, and the error type for unusable input.

Every format (Anatomy-R1, OmniMedVQA, R1 problem/solution, generic JSON/JSONL, synthetic scenes)
becomes a list of `Question`; everything downstream (prompts, rewards, curriculum, augmentation)
only ever sees this type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEF"  # 2 to 6 options are supported
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)


class DataError(ValueError):
    """Input that cannot be used. The message names the file, record and field at fault."""


@dataclass
class Question:
    """One multiple-choice VQA item.

    `question` is the bare stem: no system text, no options block. `options` are the option
    texts in their original order; `answer_index` points into them (None: an unlabelled question,
    which only `predict` reads, and which has no gold letter, text or anatomy). `similarity` is S(q) and
    `stage` the curriculum stage, both filled in by `data.similarity` once the set is scored.
    `uid` is unique even where the file repeats an `id`.
    """

    id: str
    question: str
    options: list[str]
    answer_index: int | None
    images: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    similarity: float | None = None
    stage: int | None = None
    uid: str = ""  # unique key within a loaded file; "" means `id` (see `__post_init__`)

    def __post_init__(self) -> None:
        # Files may repeat an id; per-question state (the augmentation budget) must not be shared
        # between two questions, so it is keyed on `uid`: the id itself, or "<id>#dup<k>" for the
        # k-th repeat (set by the loader, which also warns about the repeats).
        if not self.uid:
            self.uid = self.id

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer_index is None else LETTERS[self.answer_index]

    @property
    def answer_text(self) -> str | None:
        return None if self.answer_index is None else self.options[self.answer_index]

    @property
    def anatomy(self) -> str | None:
        """The class a question is reported under: the gold option text (None when unlabelled)."""
        anatomy = self.metadata.get("anatomy", self.answer_text)
        return None if anatomy is None else str(anatomy)

    def options_block(self, header: str = "Options:") -> str:
        lines = [f"{LETTERS[i]}. {text}" for i, text in enumerate(self.options)]
        return "\n".join([header, *lines])

    def to_record(self) -> dict[str, Any]:
        """The generic JSONL form (readable back by `format: generic`)."""
        rec: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer_letter,
            "images": list(self.images),
        }
        extra = {k: v for k, v in self.metadata.items() if k not in ("source", "record")}
        if extra:
            rec["metadata"] = extra
        return rec

    def replace(self, **changes: Any) -> Question:
        """A changed copy; a new `id` without an explicit `uid` is its own uid (a rewrite is a new question)."""
        if "id" in changes and "uid" not in changes:
            changes["uid"] = changes["id"]
        return dataclasses.replace(self, **changes)
