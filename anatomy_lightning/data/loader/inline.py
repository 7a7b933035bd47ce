"""Options written inside the question text ("A) x, B) y", "(A) x (B) y", "A. x" lines) and instruction prompts.

Used by the readers whose records carry the options only in text (R1 `problem`, Anatomy-R1
`instruction`), and to find the bare stem of prompts that repeat an explicit option list
(EasyR1 `prompt`, MedXpertQA `question`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from anatomy_lightning.data.loader.fields import short
from anatomy_lightning.data.loader.report import AMBIGUOUS, EMPTY_QUESTION, NO_OPTIONS, RecordProblem
from anatomy_lightning.data.schema import LETTERS, MIN_OPTIONS

_MARKER = re.compile(r"\(([A-F])\)|(?<![A-Za-z0-9])([A-F])(\)|[.:](?=\s|$))")
# an options header ending the stem ("...?\nOptions:", "...? Answer Choices:"), but not "the following options:"
_HEADER_TAIL = re.compile(r"(?:^|(?<=[?.!:\n]))\s*(?:(?:answer|anatomy)\s+)?(?:options|choices)\s*:\s*$", re.I)
_QUESTION_HEAD = re.compile(r"^\s*question\s*:\s*", re.I)


class _Mark(NamedTuple):
    letter: int
    start: int
    end: int
    style: str  # "(A)", "A)", "A." or "A:"


def _marks(text: str) -> dict[int, list[_Mark]]:
    out: dict[int, list[_Mark]] = {}
    for m in _MARKER.finditer(text):
        if m[1]:
            mark = _Mark(LETTERS.index(m[1]), m.start(), m.end(), "(A)")
        else:
            mark = _Mark(LETTERS.index(m[2]), m.start(), m.end(), "A" + m[3])
        out.setdefault(mark.letter, []).append(mark)
    return out


def _separator(gap: str) -> str:
    """What separates an option from the next marker: a newline, a comma/semicolon, a space or nothing."""
    tail = gap.rstrip(" \t")
    if tail.endswith(("\n", "\r")):
        return "newline"
    if tail.endswith((",", ";")):
        return "comma"
    return "space" if gap != gap.rstrip() else "none"


def _clean_option(gap: str) -> str:
    return gap.strip().rstrip(",;").strip()


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


def _option_ok(text: str) -> bool:
    return bool(text) and _balanced(text)


def _last_option(text: str, mark: _Mark) -> tuple[str, str]:
    """The last option runs to the end of its line; what follows is a trailing instruction."""
    rest = text[mark.end:]
    body, _, trailing = rest.lstrip(" \t").partition("\n")
    return _clean_option(body), trailing.strip()


def _chains(text: str) -> list[list[_Mark]]:
    """Every maximal run of markers A, B, C... (same style, same separator, sane option texts)."""
    marks = _marks(text)
    found: list[list[_Mark]] = []

    def extend(chain: list[_Mark], sep: str | None) -> None:
        last, grown = chain[-1], False
        for mark in marks.get(last.letter + 1, []):
            if mark.start < last.end or mark.style != last.style:
                continue
            gap = text[last.end:mark.start]
            kind = _separator(gap)
            if (sep is not None and kind != sep) or not _option_ok(_clean_option(gap)):
                continue
            grown = True
            extend([*chain, mark], kind)
        if not grown and len(chain) >= MIN_OPTIONS and _option_ok(_last_option(text, last)[0]):
            found.append(chain)

    for first in marks.get(0, []):
        extend([first], None)
    return found


def _starts_line(text: str, mark: _Mark) -> bool:
    return not text[: mark.start].strip(" \t") or text[: mark.start].rstrip(" \t").endswith(("\n", "\r", ":"))


def split_inline_options(text: str, name: str = "problem") -> tuple[str, list[str], str]:
    """(stem, options, trailing text) of a question with inline options, or a RecordProblem.

    Options are split only at markers for consecutive letters A, B, C... in order, all in one
    style ("A)", "(A)", "A.", "A:") and with one kind of separator, so commas and parentheses inside
    option texts ("Retinal pigmented epithelium (RPE)") stay put. More than one possible split is
    reported as ambiguous rather than guessed; for newline lists a split whose A starts a line wins.
    """
    chains = _chains(text)
    if len(chains) > 1:
        on_lines = [c for c in chains if _separator(text[c[0].end : c[1].start]) == "newline"
                    and _starts_line(text, c[0])]
        chains = on_lines if len(on_lines) == 1 else chains
    if not chains and {0, 1} <= set(_marks(text)):
        raise RecordProblem(
            AMBIGUOUS, name,
            f"option markers found in {short(text, 100)} do not split into options consistently (mixed "
            "marker styles or separators, or unbalanced parentheses in an option); fix the markers or use "
            "the generic format with an explicit options list",
        )
    if not chains:
        raise RecordProblem(
            NO_OPTIONS, name,
            f"no options block found in {short(text, 100)}; write the options as 'A) x, B) y', "
            "'(A) x (B) y' or 'A. x' lines, or use the generic format with an explicit options list",
        )
    if len(chains) > 1:
        splits = " vs ".join(short(" | ".join(_chain_options(text, c)), 70) for c in chains[:2])
        raise RecordProblem(
            AMBIGUOUS, name,
            f"the options can be split {len(chains)} ways ({splits}); make the option markers unambiguous "
            "or use the generic format with an explicit options list",
        )
    chain = chains[0]
    stem = _HEADER_TAIL.sub("", text[: chain[0].start].rstrip())
    stem = _QUESTION_HEAD.sub("", stem).strip()
    return stem, _chain_options(text, chain), _last_option(text, chain[-1])[1]


def _chain_options(text: str, chain: list[_Mark]) -> list[str]:
    opts = [_clean_option(text[a.end:b.start]) for a, b in zip(chain, chain[1:])]
    return [*opts, _last_option(text, chain[-1])[0]]




# -- stems of prompts and instructions ---------------------------------------------------------

_OPTIONS_HEADER = re.compile(r"(?:^|\n)[ \t]*(?:[A-Za-z]+[ \t]+)?(?:options|choices)[ \t]*:[ \t]*", re.I)
_QUESTION_LINE = re.compile(r"(?:^|\n)[ \t]*question[ \t]*:[ \t]*", re.I)
_INLINE_HEADER = re.compile(r"(?<=[?.!])[ \t]*(?:[A-Za-z]+[ \t]+)?(?:options|choices)[ \t]*:", re.I)  # "...? Choices:"


def stem(text: str, name: str) -> str:
    if not text.strip():
        raise RecordProblem(EMPTY_QUESTION, name, "the question text is empty")
    return text.strip()


def split_instruction(text: str) -> tuple[str, str, list[str]]:
    """(system text, stem, options) of an Anatomy-R1 instruction."""
    headers = list(_OPTIONS_HEADER.finditer(text))
    if headers:
        before, block = text[: headers[-1].start()], text[headers[-1].end():]
        _, options, _ = split_inline_options(block, "instruction")
    else:  # no header: the options are inline after the question
        before, options, _ = split_inline_options(text, "instruction")
    marks = list(_QUESTION_LINE.finditer(before))
    if marks:
        system, question = before[: marks[-1].start()], before[marks[-1].end():]
    else:  # no "Question:" line: the stem is the last paragraph, the system text the rest
        system, _, question = before.strip().rpartition("\n\n")
    return system.strip(), stem(question, "instruction"), options


def prompt_stem(text: str, name: str) -> str:
    """The bare question of a prompt that repeats options the record also lists explicitly.

    The text before the last "Options:" / "Answer Choices:" header (on its own line or inline),
    else before an inline options run, minus a leading "Question:"; the explicit list stays the
    source of truth for the options themselves.
    """
    headers = list(_OPTIONS_HEADER.finditer(text)) or list(_INLINE_HEADER.finditer(text))
    if headers:
        before = text[: headers[-1].start()]
    else:
        try:
            before = split_inline_options(text, name)[0]
        except RecordProblem:
            before = text
    marks = list(_QUESTION_LINE.finditer(before))
    if marks:
        before = before[marks[-1].end():]
    return stem(before, name)
