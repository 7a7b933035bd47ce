"""Read question files in any supported format into `Question`s, or say exactly what is wrong.

Formats (auto-detected from the keys of the first records, or forced with `format=`):

* ``anatomy_r1``: Anatomy-R1 / ms-swift JSON list. `instruction` = system text + "Question:" + stem +
  an options block ("Anatomy Options:" / "Options:" then "A. x" lines); `solution` is the letter,
  `answer` the option text (both are checked against each other); `images` a path or a list.
* ``omnimedvqa``: `question`, `option_A`..`option_F` (absent/empty ones dropped), `gt_answer`
  (option text), `image_path`.
* ``r1``: Med-R1 / VLM-R1 `problem` (question with inline options such as "A)x, B)y" or "(A) x (B) y")
  and `solution` ("<answer> D </answer>", a bare letter or the option text); JSON list or JSONL.
* ``generic``: `question`, `options` (list, or letter -> text mapping), `answer` (letter or text),
  `image`/`images`, optional `id` and `metadata`. This is what `Question.to_record()` writes.

Why the strictness: a record whose answer silently points at the wrong option poisons the reward
signal, so every record either parses unambiguously or is reported (file, record, field, reason).
With ``on_bad_record="error"`` all problems of a file are collected and raised as one `DataError`;
with ``"skip"`` the bad records are dropped and counted in the `LoadReport`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from anatomy_lightning.data.schema import LETTERS, MAX_OPTIONS, MIN_OPTIONS, DataError, Question

FORMATS = ("auto", "anatomy_r1", "omnimedvqa", "r1", "generic")
MAX_EXAMPLES = 5  # messages kept per problem reason
_DETECT_RECORDS = 20  # how many leading records vote on the format

# problem reasons (the keys of LoadReport.problems)
INVALID_JSON = "invalid JSON"
TRUNCATED = "truncated record"
NOT_OBJECT = "record is not an object"
MISSING = "missing field"
WRONG_TYPE = "wrong field type"
EMPTY_QUESTION = "empty question"
EMPTY_OPTION = "empty option"
TOO_FEW = "too few options"
TOO_MANY = "too many options"
DUPLICATE = "duplicate options"
NOT_AN_OPTION = "answer not among options"
MISMATCH = "answer mismatch"
NO_OPTIONS = "options not found"
AMBIGUOUS = "ambiguous options"
ESCAPES = "escapes image_root"


class RecordProblem(Exception):
    """One unusable record: a reason (grouping key), the field at fault and what to do about it."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail

    def message(self, where: str) -> str:
        at = f', field "{self.field}"' if self.field else ""
        return f"{where}{at}: {self.detail}"


@dataclass
class LoadReport:
    """What `load_questions` read: the questions plus counts of what was dropped and why."""

    path: str
    format: str
    questions: list[Question] = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # first MAX_EXAMPLES messages per reason
    missing_images: list[str] = field(default_factory=list)
    problem_examples: dict[str, list[str]] = field(default_factory=dict, repr=False)  # reason -> messages
    warnings: dict[str, int] = field(default_factory=dict)  # kept records with a flaw, reason -> count
    warning_examples: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def add_problem(self, reason: str, message: str) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1
        kept = self.problem_examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message)
            self.examples.append(message)

    def add_warning(self, reason: str, message: str) -> None:
        self.warnings[reason] = self.warnings.get(reason, 0) + 1
        kept = self.warning_examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message)

    def summary(self) -> str:
        """One line: "answer not among options x2, missing field x1"."""
        return ", ".join(f"{reason} x{n}" for reason, n in sorted(self.problems.items(), key=lambda kv: -kv[1]))

    def error_message(self, hint: str = "") -> str:
        bad = sum(self.problems.values())
        lines = [f"{self.path}: {bad} of {self.records} records are unusable ({self.format} format): {self.summary()}"]
        if hint:
            lines.append(f"  note: {hint}")
        for reason, n in sorted(self.problems.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason} ({n}):")
            lines.extend(f"    {m}" for m in self.problem_examples[reason])
            if n > len(self.problem_examples[reason]):
                lines.append(f"    ... and {n - len(self.problem_examples[reason])} more")
        lines.append('Fix these records, or set on_bad_record="skip" (data.on_bad_record) to drop them.')
        return "\n".join(lines)


# -- reading the file ------------------------------------------------------------------------


class _Raw(NamedTuple):
    where: str  # "record 3" (JSON list, 0-based) or "line 4" (JSONL, 1-based)
    index: int
    value: Any
    problem: RecordProblem | None = None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (working directory {os.getcwd()}); check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a question file; give the .json/.jsonl file inside it") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark is fine
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + offset
        line = data.count(b"\n", 0, at) + 1
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} (line {line}) is not valid UTF-8; "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"
        ) from None


def _json_error(path: Path, text: str, e: json.JSONDecodeError) -> DataError:
    body = text.rstrip()
    closer = "]" if body.lstrip().startswith("[") else "}"
    if not body.endswith(closer) or e.pos >= len(body):
        return DataError(
            f"{path}: the file ends before the JSON is complete (truncated; parser stopped at line {e.lineno}, "
            f"column {e.colno}: {e.msg}); re-export or re-download the file"
        )
    return DataError(
        f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file there "
        "(a JSON list needs commas between records; JSON Lines needs one record per line)"
    )


_WRAPPER_KEYS = ("data", "questions", "records", "items", "annotations")


def _parse_document(path: Path, text: str) -> list[_Raw]:
    """Records of a JSON list (or {"data": [...]}), a single pretty-printed object, or JSON Lines."""
    head = text.lstrip()
    if not head:
        raise DataError(f"{path}: the file is empty; expected a JSON list of records or JSON Lines")
    if head[0] == "{" and "\n" in text.strip():
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return _parse_jsonl(text)  # JSON Lines (several objects): parsed line by line below
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if head[0] == "{":  # a single JSONL line
                return _parse_jsonl(text)
            raise _json_error(path, text, e) from None
    if isinstance(doc, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
        else:
            return [_Raw("record 0", 0, doc)]
    if not isinstance(doc, list):
        raise DataError(f"{path}: the top level is {_kind(doc)}; expected a JSON list of records or JSON Lines")
    return [_Raw(f"record {i}", i, rec) for i, rec in enumerate(doc)]


def _parse_jsonl(text: str) -> list[_Raw]:
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"line {i + 1}"
        try:
            out.append(_Raw(where, i + 1, json.loads(line)))
        except json.JSONDecodeError as e:
            if i == last and not text.endswith("\n") and (e.pos >= len(line.rstrip()) or "Unterminated" in e.msg):
                problem = RecordProblem(
                    TRUNCATED, None,
                    "the file ends in the middle of this record (truncated); re-export the file or delete the line",
                )
            else:
                problem = RecordProblem(
                    INVALID_JSON, None,
                    f"invalid JSON at column {e.colno}: {e.msg}; JSON Lines needs one complete object per line",
                )
            out.append(_Raw(where, i + 1, None, problem))
    return out


# -- field helpers ---------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A value's JSON type name, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _text(rec: dict[str, Any], name: str) -> str:
    """A required text field."""
    value = rec.get(name)
    if value is None:
        raise RecordProblem(MISSING, name, "is missing; every record of this format needs it")
    if not isinstance(value, str):
        raise RecordProblem(WRONG_TYPE, name, f"expected text, got {_kind(value)}")
    return value


def _option_text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric options ("3") are still unambiguous text
    raise RecordProblem(WRONG_TYPE, name, f"expected option text, got {_kind(value)}")


def normalize(text: str) -> str:
    """Comparison key for option and answer texts: case, spacing and a trailing period ignored."""
    return " ".join(text.split()).casefold().rstrip(".").strip()


def _letter(i: int) -> str:
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
            raise RecordProblem(EMPTY_OPTION, name, f"option {_letter(i)} is empty; every option needs a text")
    return options


def check_duplicates(options: list[str], answer_index: int, name: str = "options") -> str | None:
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
    said = f"options {_letter(j)} and {_letter(i)} are the same ({_short(options[j])} / {_short(options[i])})"
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
                                              f"text, got {_kind(value)}")
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
        said = f"option {m[1]} is {_short(options[idx])}" if idx < len(options) else f"there is no option {m[1]}"
        raise RecordProblem(MISMATCH, name, f"says {_short(text)} but {said}; fix the letter or the text")
    listed = "; ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    raise RecordProblem(
        NOT_AN_OPTION, name, f"{_short(text)} is neither a letter {span} nor one of the options ({_short(listed, 120)})"
    )


# -- inline options ----------------------------------------------------------------------------

# "(A)", or "A)" / "A." / "A:" with no letter or digit right before ("RPE)" is not a marker)
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
            f"option markers found in {_short(text, 100)} do not split into options consistently (mixed "
            "marker styles or separators, or unbalanced parentheses in an option); fix the markers or use "
            "the generic format with an explicit options list",
        )
    if not chains:
        raise RecordProblem(
            NO_OPTIONS, name,
            f"no options block found in {_short(text, 100)}; write the options as 'A) x, B) y', "
            "'(A) x (B) y' or 'A. x' lines, or use the generic format with an explicit options list",
        )
    if len(chains) > 1:
        splits = " vs ".join(_short(" | ".join(_chain_options(text, c)), 70) for c in chains[:2])
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


# -- images ------------------------------------------------------------------------------------


@dataclass
class _Context:
    path: str
    stem: str
    base: str  # the data file's folder: relative image paths are resolved against it
    root: str | None  # image_root, absolute
    format: str


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image(raw: str, base: str, root: str | None, name: str = "images") -> str:
    """Where an image path from a record points to on this machine.

    Without `root`, relative paths are taken from the data file's folder. With it, relative paths
    and dataset-absolute paths that do not exist here ("/CholecT45/data/VID66/000791.png") are
    looked up under `root`: the whole path first, then shorter tails (at least folder/file), so
    root may point at any level of the dataset's tree. A path escaping `root` via ".." is an error
    (absolute ones included: "/../../etc/passwd" is read as relative to `root`).
    """
    path = raw.strip()
    if root is None:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if os.path.isabs(path):
        if os.path.exists(path) and ".." not in Path(path).parts:
            return path
        path = path.lstrip("/\\")
    candidate = os.path.normpath(os.path.join(root, path))
    if not _within(candidate, root):
        raise RecordProblem(
            ESCAPES, name, f"{_short(raw)} points outside image_root {root} (via '..'); fix the path or image_root"
        )
    if os.path.exists(candidate):
        return candidate
    parts = Path(os.path.relpath(candidate, root)).parts
    for k in range(1, len(parts) - 1):
        tail = os.path.join(root, *parts[k:])
        if os.path.exists(tail):
            return tail
    return candidate


def _images(rec: dict[str, Any], ctx: _Context, names: tuple[str, ...] = ("images", "image")) -> list[str]:
    name = next((n for n in names if rec.get(n) is not None), None)
    if name is None:
        return []
    value = rec[name]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise RecordProblem(WRONG_TYPE, name, f"expected an image path or a list of paths, got {_kind(value)}")
    return [resolve_image(v, ctx.base, ctx.root, name) for v in items if v.strip()]


# -- formats -----------------------------------------------------------------------------------


class _Parsed(NamedTuple):
    question: str
    options: list[str]
    answer_index: int
    images: list[str]
    extra: dict[str, Any]  # goes into metadata
    id: str | None
    options_field: str  # named in option problems


def _record_id(rec: dict[str, Any], *names: str) -> str | None:
    for n in names:
        value = rec.get(n)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return None


def _stem(text: str, name: str) -> str:
    if not text.strip():
        raise RecordProblem(EMPTY_QUESTION, name, "the question text is empty")
    return text.strip()


_OPTIONS_HEADER = re.compile(r"(?:^|\n)[ \t]*(?:[A-Za-z]+[ \t]+)?(?:options|choices)[ \t]*:[ \t]*", re.I)
_QUESTION_LINE = re.compile(r"(?:^|\n)[ \t]*question[ \t]*:[ \t]*", re.I)


def _split_instruction(text: str) -> tuple[str, str, list[str]]:
    """(system text, stem, options) of an Anatomy-R1 instruction."""
    headers = list(_OPTIONS_HEADER.finditer(text))
    if headers:
        before, block = text[: headers[-1].start()], text[headers[-1].end():]
        _, options, _ = split_inline_options(block, "instruction")
    else:  # no header: the options are inline after the question
        before, options, _ = split_inline_options(text, "instruction")
    marks = list(_QUESTION_LINE.finditer(before))
    if marks:
        system, stem = before[: marks[-1].start()], before[marks[-1].end():]
    else:  # no "Question:" line: the stem is the last paragraph, the system text the rest
        system, _, stem = before.strip().rpartition("\n\n")
    return system.strip(), _stem(stem, "instruction"), options


def parse_anatomy_r1(rec: dict[str, Any], ctx: _Context) -> _Parsed:
    _, stem, options = _split_instruction(_text(rec, "instruction"))
    check_options(options, "instruction")
    if rec.get("solution") is not None:
        idx = resolve_answer(rec["solution"], options, "solution")
        if rec.get("answer") is not None and resolve_answer(rec["answer"], options, "answer") != idx:
            raise RecordProblem(
                MISMATCH, "answer",
                f"{_short(rec['answer'])} disagrees with solution {LETTERS[idx]} ({_short(options[idx])}); "
                "fix one of them",
            )
    elif rec.get("answer") is not None:
        idx = resolve_answer(rec["answer"], options, "answer")
    else:
        raise RecordProblem(MISSING, "solution", "is missing (and so is answer); give the answer letter")
    used = {"instruction", "solution", "answer", "images", "image", "id"}
    extra = {k: v for k, v in rec.items() if k not in used}
    return _Parsed(stem, options, idx, _images(rec, ctx), extra, _record_id(rec, "id"), "instruction")


def parse_omnimedvqa(rec: dict[str, Any], ctx: _Context) -> _Parsed:
    stem = _stem(_text(rec, "question"), "question")
    options: list[str] = []
    for letter in LETTERS:
        name = f"option_{letter}"
        if rec.get(name) is not None:
            text = _option_text(rec[name], name)
            if text:
                options.append(text)
    check_options(options, "option_A..option_F")
    idx = resolve_answer(rec.get("gt_answer"), options, "gt_answer")
    used = {"question", "gt_answer", "image_path", "image", "images", *(f"option_{x}" for x in LETTERS)}
    extra = {k: v for k, v in rec.items() if k not in used}
    images = _images(rec, ctx, ("image_path", "images", "image"))
    return _Parsed(stem, options, idx, images, extra, _record_id(rec, "question_id", "id"), "option_A..option_F")


def parse_r1(rec: dict[str, Any], ctx: _Context) -> _Parsed:
    stem, options, trailing = split_inline_options(_text(rec, "problem"), "problem")
    check_options(options, "problem")
    idx = resolve_answer(rec.get("solution"), options, "solution")
    used = {"problem", "solution", "image", "images", "id"}
    extra = {k: v for k, v in rec.items() if k not in used}
    if trailing:
        extra["prompt_suffix"] = trailing
    images = _images(rec, ctx)
    return _Parsed(_stem(stem, "problem"), options, idx, images, extra, _record_id(rec, "id", "question_id"), "problem")


def _generic_options(value: Any) -> list[str]:
    if value is None:
        raise RecordProblem(MISSING, "options", "is missing; give a list of option texts")
    if isinstance(value, dict):
        keys = [str(k).strip().rstrip(".)").upper() for k in value]
        if sorted(keys) != list(LETTERS[: len(keys)]):
            raise RecordProblem(
                WRONG_TYPE, "options", f"mapping keys {list(value)} are not the letters A, B, C... in sequence"
            )
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        items = list(value.values())
        return [_option_text(items[i], f"options.{keys[i]}") for i in order]
    if not isinstance(value, list):
        raise RecordProblem(WRONG_TYPE, "options", f"expected a list of option texts or a letter->text mapping, "
                                                   f"got {_kind(value)}")
    return [_option_text(v, f"options[{i}]") for i, v in enumerate(value)]


def parse_generic(rec: dict[str, Any], ctx: _Context) -> _Parsed:
    stem = _stem(_text(rec, "question"), "question")
    options = check_options(_generic_options(rec.get("options")), "options")
    idx = resolve_answer(rec.get("answer"), options, "answer")
    meta = rec.get("metadata", {})
    if not isinstance(meta, dict):
        raise RecordProblem(WRONG_TYPE, "metadata", f"expected an object, got {_kind(meta)}")
    used = {"id", "question", "options", "answer", "image", "images", "metadata"}
    extra = {**{k: v for k, v in rec.items() if k not in used}, **meta}
    return _Parsed(stem, options, idx, _images(rec, ctx), extra, _record_id(rec, "id", "question_id"), "options")


_PARSERS: dict[str, Callable[[dict[str, Any], _Context], _Parsed]] = {
    "anatomy_r1": parse_anatomy_r1,
    "omnimedvqa": parse_omnimedvqa,
    "r1": parse_r1,
    "generic": parse_generic,
}


def _format_of(keys: set[str]) -> str | None:
    if "instruction" in keys:
        return "anatomy_r1"
    if "option_A" in keys or "gt_answer" in keys:
        return "omnimedvqa"
    if "question" in keys and "options" in keys:
        return "generic"
    if "problem" in keys:
        return "r1"
    if "question" in keys:
        return "generic"
    return None


def detect_format(records: list[Any]) -> str | None:
    """The format most of the first records look like (by their keys), or None."""
    votes = Counter(
        f for f in (_format_of(set(r)) for r in records[:_DETECT_RECORDS] if isinstance(r, dict)) if f is not None
    )
    return votes.most_common(1)[0][0] if votes else None


# -- entry point -------------------------------------------------------------------------------


def _question(raw: _Raw, ctx: _Context) -> tuple[Question, str | None]:
    """The record's Question and an optional warning message, or a RecordProblem."""
    if raw.problem is not None:
        raise raw.problem
    if not isinstance(raw.value, dict):
        raise RecordProblem(NOT_OBJECT, None, f"expected an object with the question fields, got {_kind(raw.value)}")
    parsed = _PARSERS[ctx.format](raw.value, ctx)
    options = parsed.options
    warning = check_duplicates(options, parsed.answer_index, parsed.options_field)
    metadata = {**parsed.extra, "source": ctx.path, "record": raw.index}
    metadata.setdefault("anatomy", options[parsed.answer_index])
    question = Question(
        id=parsed.id if parsed.id is not None else f"{ctx.stem}:{raw.index}",
        question=parsed.question,
        options=options,
        answer_index=parsed.answer_index,
        images=parsed.images,
        metadata=metadata,
    )
    return question, warning and RecordProblem(DUPLICATE, parsed.options_field, warning).message(raw.where)


def load_questions(
    path: str | os.PathLike[str],
    format: str = "auto",
    on_bad_record: str = "error",
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> LoadReport:
    """Read a question file; see the module docstring for formats and error handling.

    Missing image files are listed in `report.missing_images` (not raised here), so callers decide
    whether that is fatal (training) or just worth reporting (`inspect_data`).
    """
    if format not in FORMATS:
        raise DataError(f"format={format!r} is not supported; use one of {list(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record={on_bad_record!r}: use 'error' or 'skip'")
    file = Path(path)
    raws = _parse_document(file, _read_text(file))
    if not raws:
        raise DataError(f"{file}: the file holds no records; expected a JSON list of records or JSON Lines")
    values = [r.value for r in raws]
    detected = detect_format(values)
    fmt = detected if format == "auto" else format
    if fmt is None:
        first = next((sorted(v) for v in values if isinstance(v, dict)), None)
        raise DataError(
            f"{file}: cannot tell the format from the record keys {first}; pass format= one of {list(FORMATS[1:])}"
        )
    root = os.path.abspath(image_root) if image_root is not None else None
    ctx = _Context(str(file), file.stem, os.path.dirname(os.path.abspath(file)), root, fmt)
    report = LoadReport(path=str(file), format=fmt, records=len(raws))
    for raw in raws:
        try:
            question, warning = _question(raw, ctx)
        except RecordProblem as problem:
            report.add_problem(problem.reason, problem.message(raw.where))
            continue
        report.questions.append(question)
        if warning:
            report.add_warning(DUPLICATE, warning)
    report.skipped = report.records - len(report.questions)
    hint = ""
    if detected not in (fmt, None):
        hint = f"the records look like the {detected} format; try format={detected!r}"
    if report.problems and (on_bad_record == "error" or not report.questions):
        if not report.questions:
            hint = "; ".join(filter(None, [hint, "no record is usable"]))
        raise DataError(report.error_message(hint))
    if check_images:
        report.missing_images = list(dict.fromkeys(p for q in report.questions for p in q.images
                                                   if not os.path.isfile(p)))
    return report
