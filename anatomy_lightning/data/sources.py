"""Where the DataModule's questions come from: a question file (read, image-checked, its own prompts
pinned if asked) or the synthetic scenes written to disk first."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from anatomy_lightning.data.images import describe_image_issues, probe_images
from anatomy_lightning.data.loader import load_questions
from anatomy_lightning.data.prompts import attach_dataset_prompts
from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.data.settings import SyntheticSettings

__all__ = ["read_questions", "write_synthetic_files"]

log = logging.getLogger(__name__)


def read_questions(
    path: str, image_root: str | None, *, format: str, fields: dict[str, str] | None, on_bad_record: str,
    check_images: bool, prompt: str, answer_optional: bool = False,
) -> list[Question]:
    """The questions of `path` (see `data.loader.load_questions`), with skipped records and reader
    warnings logged; `check_images` opens every image first, `prompt: dataset` pins each record's
    own instruction (the DataModule's arguments of the same names)."""
    report = load_questions(
        path,
        format=format,
        on_bad_record=on_bad_record,
        image_root=image_root,
        check_images=False,  # the pre-flight below probes every image itself; the missing list is unused here
        fields=fields,
        answer_optional=answer_optional,  # the predict file only: unlabelled questions are what it answers
    )
    if report.skipped:
        log.warning("%s: skipped %d bad records (%s)", path, report.skipped, ", ".join(report.problems))
    for reason, n in report.warnings.items():
        log.warning("%s: %s x%d, e.g. %s", path, reason, n, "; ".join(report.warning_examples[reason][:3]))
    if check_images:
        _preflight_images(path, report.questions, report.unit)
    if prompt == "dataset":
        _pin_prompts(path, report.questions, report.format)
    log.info("%s: %d questions (%s format)", path, len(report.questions), report.format)
    return report.questions


def _pin_prompts(path: str, questions: list[Question], fmt: str) -> None:
    missing = attach_dataset_prompts(questions)
    if missing == len(questions):
        raise DataError(
            f"data.prompt: dataset, but {path} ({fmt} format) carries no prompt of its own (formats that do: "
            "anatomy_r1 `instruction`, r1 and medvlm_r1 `problem`, easyr1 `prompt`, medxpertqa `question`, "
            "generic metadata.prompt); use data.prompt: template"
        )
    if missing:
        log.warning("%s: %d of %d questions have no prompt of their own and use the template", path, missing,
                    len(questions))


def _preflight_images(path: str, questions: list[Question], unit: str) -> None:
    """Open every image once (size and mode, in a thread pool) before any model work, so a
    corrupt, empty or folder path stops the run now instead of when a batch reaches it."""
    issues = probe_images(p for q in questions for p in q.images)
    if issues:
        hint = "set data.image_root to the folder the paths are relative to, or fix or drop these records"
        raise DataError(f"{describe_image_issues(issues, questions, path, unit)}\n{hint}")


def write_synthetic_files(s: SyntheticSettings) -> dict[str, Path]:
    """Write (or find already written) the synthetic train/val/test splits; their JSONL paths by split."""
    from anatomy_lightning.data.synthetic import write_synthetic_dataset  # numpy / PIL only when used

    kw: dict[str, Any] = dict(
        image_size=s.image_size, grid=s.grid, num_options=s.num_options, kinds=tuple(s.kinds),
        questions_per_scene=s.questions_per_scene, unique_scenes=s.unique_scenes, benchmark=s.benchmark,
    )
    return write_synthetic_dataset(s.out_dir, s.n_train, s.n_val, s.n_test, seed=s.seed, **kw)
