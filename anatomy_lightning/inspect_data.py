"""Look at a question file before training on it: what loads, what is dropped, how hard it is.

    python -m anatomy_lightning.inspect_data FILE [--format F] [--image-root DIR] [--stages K]
        [--on-bad-record skip|error] [--encoder X] [--no-similarity] [--no-check-images]

Prints one JSON object (format, records, skipped, problems, options per question, answers,
S(q) range, stage counts, missing images, seconds). It uses the training loader itself, so what it
reports is exactly what `fit` would see. Exit 0 on success; 2 with a one-line reason on stderr
when the file cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from anatomy_lightning.data.loader import FORMATS, LoadReport, load_questions
from anatomy_lightning.data.schema import DataError, Question

MISSING_SHOWN = 5


def _grouped(counts: dict[str, int], examples: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return {reason: {"count": n, "examples": examples.get(reason, [])} for reason, n in ordered}


def _similarity(questions: list[Question], encoder: str | None, stages: int) -> tuple[dict[str, float], dict[str, int]]:
    """S(q) summary and stage counts (imported here: the encoder stack is heavy and optional)."""
    from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages

    values = SimilarityScorer(encoder).score(questions)
    assign_stages(questions, stages)
    summary = {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}
    counts = Counter(q.stage for q in questions)
    return summary, {str(k): counts.get(k, 0) for k in range(stages)}


def summarize(report: LoadReport) -> dict[str, Any]:
    """Everything except similarity, from a loaded report."""
    qs = report.questions
    per_question = Counter(len(q.options) for q in qs)
    answers = Counter(q.answer_text for q in qs)
    return {
        "format": report.format,
        "records": report.records,
        "questions": len(qs),
        "skipped": report.skipped,
        "problems": _grouped(report.problems, report.problem_examples),
        "warnings": _grouped(report.warnings, report.warning_examples),
        "options_per_question": {str(k): per_question[k] for k in sorted(per_question)},
        "answers": dict(sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))),
        "missing_images": {"count": len(report.missing_images), "first": report.missing_images[:MISSING_SHOWN]},
    }


def inspect(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    report = load_questions(
        args.file,
        format=args.format,
        on_bad_record=args.on_bad_record,
        image_root=args.image_root,
        check_images=not args.no_check_images,
    )
    out = summarize(report)
    out["similarity"], out["stage_counts"] = (None, None)
    if not args.no_similarity:
        out["similarity"], out["stage_counts"] = _similarity(report.questions, args.encoder, args.stages)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anatomy_lightning.inspect_data", description=__doc__.split("\n")[0])
    p.add_argument("file", help="question file (JSON list or JSON Lines)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--stages", type=int, default=3, help="curriculum stages K for stage_counts")
    p.add_argument("--on-bad-record", default="skip", choices=("skip", "error"),
                   help="skip (default): count bad records; error: fail on the first file with any")
    p.add_argument("--encoder", default=None, help="sentence-transformers folder or id for S(q)")
    p.add_argument("--no-similarity", action="store_true", help="skip S(q) and stages (no encoder needed)")
    p.add_argument("--no-check-images", action="store_true", help="do not look for the image files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = inspect(args)
    except (DataError, ValueError) as e:  # unusable file or encoder: one line, no traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    except ImportError as e:
        reason = f"cannot compute S(q) ({e}); install the encoder stack or pass --no-similarity"
    else:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"inspect_data: {reason}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
