"""`load_questions`: a file in, `Question`s and a `LoadReport` out (the entry point of the package)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anatomy_lightning.data.loader.base import Context
from anatomy_lightning.data.loader.document import Raw, parse_document, read_text
from anatomy_lightning.data.loader.fields import ABSENT, FieldMap, kind, lookup
from anatomy_lightning.data.loader.formats import DETECT_RECORDS, FORMATS, PARSERS, detect_format, format_of
from anatomy_lightning.data.loader.options import check_duplicates
from anatomy_lightning.data.loader.report import (
    DUPLICATE,
    DUPLICATE_ID,
    NOT_OBJECT,
    BadRecords,
    LoadReport,
    RecordProblem,
)
from anatomy_lightning.data.schema import DataError, Question

DUP_SUFFIX = "#dup"  # uid of the k-th repeat of an id: "<id>#dup<k>"
# where each format reads the gold answer (after data.fields); a record with none of them is unlabelled
ANSWER_FIELDS = {
    "generic": ("answer",), "medvlm_r1": ("answer", "solution"), "r1": ("solution",), "omnimedvqa": ("gt_answer",),
    "anatomy_r1": ("solution", "answer"), "easyr1": ("answer.correct_answer", "answer.answer_id", "answer.label"),
    "medxpertqa": ("label",),
}


def _without_answer(rec: dict[str, Any], fmt: str) -> dict[str, Any] | None:
    """An unlabelled record with a placeholder answer "A", so the format's reader checks everything
    else as usual; None when the record has an answer (then it is read, and checked, as given)."""
    keys = ANSWER_FIELDS.get(fmt, ())
    if not keys or any(lookup(rec, k) not in (ABSENT, None, "", []) for k in keys):
        return None
    head, _, tail = keys[0].partition(".")
    if not tail:
        return {**rec, head: ["A"] if fmt == "medxpertqa" else "A"}
    return {**rec, head: {**rec[head], tail: "A"}} if isinstance(rec.get(head), dict) else None


def _question(raw: Raw, ctx: Context, fields: FieldMap) -> tuple[Question, str | None]:
    """The record's Question and an optional warning message, or a RecordProblem."""
    if raw.problem is not None:
        raise raw.problem
    if not isinstance(raw.value, dict):
        raise RecordProblem(NOT_OBJECT, None, f"expected an object with the question fields, got {kind(raw.value)}")
    rec = fields.apply(raw.value)
    placeholder = _without_answer(rec, ctx.format) if ctx.answer_optional else None
    parsed = PARSERS[ctx.format](placeholder or rec, ctx)
    if placeholder is not None:
        parsed = parsed._replace(answer_index=None)
    options = parsed.options
    warning = check_duplicates(options, parsed.answer_index, parsed.options_field)
    extra = {k: v for k, v in parsed.extra.items() if k not in fields.used()}
    metadata = {**extra, "source": ctx.path, "record": raw.index}
    if parsed.answer_index is not None:
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


def mark_duplicate_ids(questions: list[Question], report: LoadReport) -> None:
    """Repeated ids: one warning (count and first examples), and a distinct `uid` for each repeat.

    The id itself is kept (it is the user's, and reports print it); the k-th repeat of id "x" gets
    uid "x#dup<k>" so per-question state (the augmentation budget) is never shared by two questions.
    """
    first: dict[str, Question] = {}
    repeats: dict[str, int] = {}
    for q in questions:
        if q.id not in first:
            first[q.id] = q
            continue
        k = repeats[q.id] = repeats.get(q.id, 0) + 1
        q.uid = f"{q.id}{DUP_SUFFIX}{k}"
        report.add_warning(
            DUPLICATE_ID,
            f"{report.unit} {q.metadata.get('record')}: id {q.id!r} is already used by {report.unit} "
            f"{first[q.id].metadata.get('record')}; kept as uid {q.uid!r}",
        )


def _no_format_message(file: Path, raws: list[Raw]) -> str:
    """Why no format fits: the keys found, or what the records are when none is an object."""
    objects = [r.value for r in raws if isinstance(r.value, dict)]
    choices = f"pass format= one of {list(FORMATS[1:])}, or map your keys with data.fields"
    if objects:
        return f"{file}: cannot tell the format from the record keys {sorted(objects[0])}; {choices}"
    found = {kind(r.value) if r.problem is None else r.problem.reason for r in raws}
    return f"{file}: no record is a JSON object (found {', '.join(sorted(found))}); expected a JSON list of " \
           f"question objects or JSON Lines with one object per line"


def load_questions(
    path: str | os.PathLike[str],
    format: str = "auto",
    on_bad_record: str = "error",
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    fields: Mapping[str, str] | None = None,
    answer_optional: bool = False,
) -> LoadReport:
    """Read a question file; see the package docstring for formats and error handling.

    `fields` maps our field names onto the file's keys or dotted paths (`data.fields`); with it the
    format defaults to generic. Missing image files are listed in `report.missing_images` (not
    raised here), for `inspect_data` to report; training skips this list and runs the fuller
    pre-flight `images.probe_images` (folders, empty and undecodable files too). `answer_optional`
    (the `predict` file only): a record without an answer becomes a Question with answer_index None.
    """
    if format not in FORMATS:
        raise DataError(f"format={format!r} is not supported; use one of {list(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"on_bad_record={on_bad_record!r}: use 'error' or 'skip'")
    mapping = FieldMap(fields)
    file = Path(path)
    raws = parse_document(file, read_text(file), lambda d: format_of(mapping.apply(d)) is not None)
    if not raws:
        raise DataError(f"{file}: the file holds no records; expected a JSON list of records or JSON Lines")
    # only the leading records vote; each record is mapped again when it is read
    detected = detect_format([mapping.apply(r.value) if isinstance(r.value, dict) else r.value
                              for r in raws[:DETECT_RECORDS]])
    fmt = format if format != "auto" else "generic" if mapping else detected
    if fmt is None:
        raise DataError(_no_format_message(file, raws))
    root = os.path.abspath(image_root) if image_root is not None else None
    ctx = Context(str(file), file.stem, os.path.dirname(os.path.abspath(file)), root, fmt, answer_optional)
    report = LoadReport(path=str(file), format=fmt, records=len(raws), unit=raws[0].where.split()[0])
    for raw in raws:
        try:
            question, warning = _question(raw, ctx, mapping)
        except RecordProblem as problem:
            problem.field = mapping.name(problem.field)
            report.add_problem(problem.reason, problem.message(raw.where), problem.field)
            continue
        report.questions.append(question)
        if warning:
            report.add_warning(DUPLICATE, warning)
    report.skipped = report.records - len(report.questions)
    mark_duplicate_ids(report.questions, report)
    hint = ""
    if detected not in (fmt, None) and not mapping:
        hint = f"the records look like the {detected} format; try format={detected!r}"
    if report.problems and (on_bad_record == "error" or not report.questions):
        if not report.questions:
            hint = "; ".join(filter(None, [hint, "no record is usable"]))
        raise BadRecords(report, hint)
    if check_images:
        report.missing_images = list(dict.fromkeys(p for q in report.questions for p in q.images
                                                   if not os.path.exists(p)))
    return report
