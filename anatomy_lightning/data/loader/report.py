"""What a load found: the problem reasons, one unusable record (`RecordProblem`) and the `LoadReport`."""

from __future__ import annotations

from dataclasses import dataclass, field

from anatomy_lightning.data.schema import DataError, Question

MAX_EXAMPLES = 5  # messages kept per problem reason

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
SEVERAL_ANSWERS = "several answers"
ESCAPES = "escapes image_root"
# warning reasons (kept records)
DUPLICATE_ID = "duplicate id"


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
    unit: str = "record"  # how records are numbered in messages: "record" (JSON list, 0-based) or "line" (JSONL)
    skipped: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)  # first MAX_EXAMPLES messages per reason
    missing_images: list[str] = field(default_factory=list)  # paths that do not exist (folders are not "missing")
    problem_examples: dict[str, list[str]] = field(default_factory=dict, repr=False)  # reason -> messages
    problem_fields: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # reason -> field -> count
    warnings: dict[str, int] = field(default_factory=dict)  # kept records with a flaw, reason -> count
    warning_examples: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def add_problem(self, reason: str, message: str, field_name: str | None = None) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1
        per_field = self.problem_fields.setdefault(reason, {})
        per_field[field_name or "(record)"] = per_field.get(field_name or "(record)", 0) + 1
        kept = self.problem_examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(message)
            self.examples.append(message)

    def add_warning(self, reason: str, message: str, count: int = 1) -> None:
        self.warnings[reason] = self.warnings.get(reason, 0) + count
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


class BadRecords(DataError):
    """Raised for a file with unusable records; carries the full `LoadReport` so tools such as
    `inspect_data` can show every reason with examples even when no record loaded."""

    def __init__(self, report: LoadReport, hint: str = "") -> None:
        super().__init__(report.error_message(hint))
        self.report = report
