"""Option lists and answers, shared by every reader: option texts, their checks, and which option is gold.

Kept in one place so every format applies the same rules: 2-6 non-empty options, markers that an
option list carries itself ("(A) Gallbladder", "B. Liver") removed, twins told apart from
distractor look-alikes, and one answer resolver for letters, tags and option texts.
"""

from __future__ import annotations

import re
from typing import Any

from anatomy_lightning.data.loader.fields import kind, short
from anatomy_lightning.data.loader.report import (
    DUPLICATE,
    EMPTY_OPTION,
    MISMATCH,
    MISSING,
    NOT_AN_OPTION,
    TOO_FEW,
    TOO_MANY,
    WRONG_TYPE,
    RecordProblem,
)
from anatomy_lightning.data.schema import LETTERS, MAX_OPTIONS, MIN_OPTIONS


def option_text(value: Any, name: str) -> str:
    """One option as text (numbers allowed), or a WRONG_TYPE problem naming the option's field."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric options ("3") are still unambiguous text
    hint = ""
    if isinstance(value, dict) and {"letter", "content"} <= set(value):
        hint = " ({letter, content} objects are the medxpertqa format: set format: medxpertqa)"
    raise RecordProblem(WRONG_TYPE, name, f"expected option text, got {kind(value)}{hint}")


def normalize(text: str) -> str:
    """Comparison key for option and answer texts: case, spacing and a trailing period ignored."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def letter(i: int) -> str:
    return LETTERS[i] if i < len(LETTERS) else f"#{i + 1}"


def check_options(options: list[str], name: str = "options") -> list[str]:
    """2-6 non-empty options, or a RecordProblem saying which rule is broken."""
    if len(options) < MIN_OPTIONS:
        raise RecordProblem(TOO_FEW, name, f"has {len(options)} option(s); a question needs at least {MIN_OPTIONS}")
    if len(options) > MAX_OPTIONS:
        raise RecordProblem(
            TOO_MANY, name, f"has {len(options)} options; at most {MAX_OPTIONS} (A-{LETTERS[-1]}) are supported"
        )
    for i, text in enumerate(options):
        if not text.strip():
            raise RecordProblem(EMPTY_OPTION, name, f"option {letter(i)} is empty; every option needs a text")
    return options


def check_duplicates(options: list[str], answer_index: int | None, name: str = "options") -> str | None:
    """Options equal up to case/spacing: an error when one of them is the gold, else a warning message.

    A gold option with a twin ("Liver" / "liver") makes two answers correct, so the record is
    unusable. Twin distractors (12 records of the OmniMedVQA Med-R1 test file: "Thyroid Gland" /
    "Thyroid gland" next to the gold "aorta") leave exactly one correct answer; those records are
    kept verbatim (the benchmark stays comparable) and reported as a warning.
    """
    seen: dict[str, int] = {}
    twins: list[tuple[int, int]] = []
    for i, text in enumerate(options):
        key = normalize(text)
        if key in seen:
            twins.append((seen[key], i))
        seen.setdefault(key, i)
    if not twins:
        return None
    j, i = next((t for t in twins if answer_index in t), twins[0])
    said = f"options {letter(j)} and {letter(i)} are the same ({short(options[j])} / {short(options[i])})"
    if answer_index in (j, i):
        raise RecordProblem(DUPLICATE, name, f"{said} and one of them is the answer; options must differ")
    return f"{said}; both are distractors, so the record is kept"


_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_LETTER_ONLY = re.compile(r"\(?\s*([A-Fa-f])\s*\)?\s*[.):]?")
_LETTER_AND_TEXT = re.compile(r"\(?([A-F])\s*[.):]\)?\s*(\S.*)", re.S)


def resolve_answer(value: Any, options: list[str], name: str = "answer") -> int:
    """Index of the gold option from "C", "C.", "(C)", "C. Liver", "<answer> C </answer>" or the option text."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        raise RecordProblem(MISSING, name, "is missing; give the answer letter or the option text")
    if not isinstance(value, str):
        raise RecordProblem(WRONG_TYPE, name, f"expected a letter (A-{LETTERS[len(options) - 1]}) or the option "
                                              f"text, got {kind(value)}")
    text = value.strip()
    tag = _ANSWER_TAG.search(text)
    if tag:
        text = tag[1].strip()
    if not text:
        raise RecordProblem(MISSING, name, "is empty; give the answer letter or the option text")
    keys = [normalize(o) for o in options]
    span = f"A-{LETTERS[len(options) - 1]}"
    m = _LETTER_ONLY.fullmatch(text)
    if m and (m[1].isupper() or normalize(text) not in keys):
        idx = LETTERS.index(m[1].upper())
        if idx >= len(options):
            raise RecordProblem(
                NOT_AN_OPTION, name, f"is letter {m[1].upper()} but there are only {len(options)} options ({span})"
            )
        return idx
    if normalize(text) in keys:
        return keys.index(normalize(text))
    m = _LETTER_AND_TEXT.fullmatch(text)
    if m:
        idx = LETTERS.index(m[1])
        if idx < len(options) and normalize(m[2]) == keys[idx]:
            return idx
        said = f"option {m[1]} is {short(options[idx])}" if idx < len(options) else f"there is no option {m[1]}"
        raise RecordProblem(MISMATCH, name, f"says {short(text)} but {said}; fix the letter or the text")
    listed = "; ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    raise RecordProblem(
        NOT_AN_OPTION, name, f"{short(text)} is neither a letter {span} nor one of the options ({short(listed, 120)})"
    )



# "(A) Gallbladder", "A) Gut", "A. Liver", "A: Omentum" at the start of an option text
_OWN_MARKER = re.compile(r"\s*(?:\(([A-F])\)|([A-F])([.):]))\s*(?=\S)")


def strip_own_markers(options: list[str]) -> list[str]:
    """Options without the markers they carry themselves, when *every* option has its own letter in one style.

    ["(A) Gallbladder", "(B) Gut"] -> ["Gallbladder", "Gut"], so the gold text, the anatomy class
    and S(q) all see the bare name. A single "A. fib" among unmarked options is left alone: only
    a complete A, B, C... run in one style is read as markers.
    """
    matches = [_OWN_MARKER.match(o) for o in options]
    if not all(matches):
        return options
    styles = {("(A)" if m[1] else "A" + m[3]) for m in matches}
    letters = [m[1] or m[2] for m in matches]
    if len(styles) != 1 or letters != list(LETTERS[: len(options)]):
        return options
    return [o[m.end():].strip() for o, m in zip(options, matches)]


def clean_options(options: list[str], name: str = "options") -> list[str]:
    """The options every reader hands on: own markers stripped, then the 2-6 non-empty rule checked."""
    return check_options(strip_own_markers(options), name)


def options_list(value: Any, name: str = "options") -> list[str]:
    """Option texts from a list, or from a letter -> text mapping ({"A": "x", "B": "y"}) put in letter order."""
    if value is None:
        raise RecordProblem(MISSING, name, "is missing; give a list of option texts")
    if isinstance(value, dict):
        keys = [str(k).strip().rstrip(".)").upper() for k in value]
        if sorted(keys) != list(LETTERS[: len(keys)]):
            raise RecordProblem(
                WRONG_TYPE, name, f"mapping keys {list(value)} are not the letters A, B, C... in sequence"
            )
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        items = list(value.values())
        return [option_text(items[i], f"{name}.{keys[i]}") for i in order]
    if not isinstance(value, list):
        raise RecordProblem(WRONG_TYPE, name, f"expected a list of option texts or a letter->text mapping, "
                                              f"got {kind(value)}")
    return [option_text(v, f"{name}[{i}]") for i, v in enumerate(value)]
