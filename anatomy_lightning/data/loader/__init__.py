"""Read question files in any supported format into `Question`s, or say exactly what is wrong.

Formats (auto-detected from the keys of the first records, or forced with `format=`), one reader
each in `formats/` (copy `formats/generic.py` to add one):

* ``anatomy_r1``: Anatomy-R1 / ms-swift `instruction` + `solution` / `answer` + `images`.
* ``easyr1``: EasyR1 `prompt`, `images` list, `answer` object with `correct_answer`, `option_A`...
* ``omnimedvqa``: `question`, `option_A`..`option_F`, `gt_answer` (text), `image_path`.
* ``medvlm_r1``: MedVLM-R1 `question`, `options`, `answer` (text), checked against `solution`.
* ``medxpertqa``: MedXpertQA-MM `options` as `{letter, content}`, `label` a list, several images.
* ``r1``: Med-R1 / VLM-R1 `problem` with inline options and `solution`.
* ``generic``: `question`, `options` (list or letter mapping), `answer` (letter or text),
  `image`/`images`, optional `id` and `metadata`; what `Question.to_record()` writes. Any other
  JSON/JSONL file can be read as generic with a `fields` mapping (our field -> their key or dotted path).

Shared by all readers: `document` (UTF-8, any line ending, JSON list, wrapping object, JSON Lines),
`options` (option checks, own markers stripped, answer resolution), `inline` (options inside text),
`paths` (image paths), `report` (problem reasons, `LoadReport`).

Why the strictness: a record whose answer silently points at the wrong option poisons the reward
signal, so every record either parses unambiguously or is reported (file, record, field, reason).
With ``on_bad_record="error"`` all problems of a file are collected and raised as one `DataError`;
with ``"skip"`` the bad records are dropped and counted in the `LoadReport`.
"""

from anatomy_lightning.data.loader.base import Context, Parsed
from anatomy_lightning.data.loader.fields import FieldMap
from anatomy_lightning.data.loader.formats import FORMATS, READERS, detect_format
from anatomy_lightning.data.loader.inline import split_inline_options
from anatomy_lightning.data.loader.load import DUP_SUFFIX, load_questions
from anatomy_lightning.data.loader.options import normalize, resolve_answer, strip_own_markers
from anatomy_lightning.data.loader.paths import resolve_image
from anatomy_lightning.data.loader.report import (
    AMBIGUOUS,
    DUPLICATE,
    DUPLICATE_ID,
    EMPTY_OPTION,
    EMPTY_QUESTION,
    ESCAPES,
    INVALID_JSON,
    MAX_EXAMPLES,
    MISMATCH,
    MISSING,
    NO_OPTIONS,
    NOT_AN_OPTION,
    NOT_OBJECT,
    SEVERAL_ANSWERS,
    TOO_FEW,
    TOO_MANY,
    TRUNCATED,
    WRONG_TYPE,
    BadRecords,
    LoadReport,
    RecordProblem,
)

__all__ = [
    "AMBIGUOUS", "DUPLICATE", "DUPLICATE_ID", "DUP_SUFFIX", "EMPTY_OPTION", "EMPTY_QUESTION", "ESCAPES", "FORMATS",
    "INVALID_JSON", "MAX_EXAMPLES", "MISMATCH", "MISSING", "NOT_AN_OPTION", "NOT_OBJECT", "NO_OPTIONS", "READERS",
    "SEVERAL_ANSWERS", "TOO_FEW", "TOO_MANY", "TRUNCATED", "WRONG_TYPE", "BadRecords", "Context", "FieldMap",
    "LoadReport", "Parsed", "RecordProblem", "detect_format", "load_questions", "normalize", "resolve_answer",
    "resolve_image", "split_inline_options", "strip_own_markers",
]
