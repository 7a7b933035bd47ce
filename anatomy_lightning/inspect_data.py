"""Look at a question file before training on it: what loads, what is dropped, how hard it is.

    python -m anatomy_lightning.inspect_data FILE [--format F] [--field OURS=THEIRS ...] [--image-root DIR]
        [--stages K] [--on-bad-record skip|error] [--encoder X] [--no-similarity] [--no-check-images]
        [--summary] [--plot FILE.png]

Prints one JSON object (format, records, skipped, problems per reason and field with examples,
options and images per question, answers, image problems, S(q) range, stage thresholds and counts,
seconds), or with `--summary` the same as a readable table. `--plot` draws the S(q) histogram with
the stage thresholds and the option-count and answer distributions. It uses the training loader
and the pre-flight image check themselves, so what it reports is exactly what `fit` would see.
Exit 0 on success; 2 when the file cannot be used, with a one-line reason on stderr (and, when
records were read but none is usable, the full report on stdout, so every reason shows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from anatomy_lightning.data.images import issues_by_kind, probe_images
from anatomy_lightning.data.loader import FORMATS, BadRecords, LoadReport, load_questions
from anatomy_lightning.data.schema import DataError, Question

MISSING_SHOWN = 5
ANSWERS_SHOWN = 10  # rows of the answer table in --summary and bars in --plot


def _grouped(counts: dict[str, int], examples: dict[str, list[str]],
             fields: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        out[reason] = {"count": n, "examples": examples.get(reason, [])}
        if fields is not None:
            out[reason]["fields"] = dict(sorted(fields.get(reason, {}).items(), key=lambda kv: -kv[1]))
    return out


def _similarity(questions: list[Question], encoder: str | None, stages: int) -> dict[str, Any]:
    """S(q) summary, stage thresholds and counts (imported here: the encoder stack is heavy and optional)."""
    from anatomy_lightning.data.similarity import SimilarityScorer, assign_stages

    values = SimilarityScorer(encoder).score(questions)
    thresholds = assign_stages(questions, stages)
    counts = Counter(q.stage for q in questions)
    return {
        "similarity": {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())},
        "stage_thresholds": [round(t, 4) for t in thresholds],
        "stage_counts": {str(k): counts.get(k, 0) for k in range(stages)},
    }


def image_problems(questions: list[Question], unit: str) -> dict[str, dict[str, Any]]:
    """The pre-flight check of `fit`: every image opened once; kind -> count and first records."""
    return issues_by_kind(probe_images(p for q in questions for p in q.images), questions, unit, MISSING_SHOWN)


def summarize(report: LoadReport) -> dict[str, Any]:
    """Everything except similarity and image decoding, from a loaded (or wholly unusable) report."""
    qs = report.questions
    per_question = Counter(len(q.options) for q in qs)
    images = Counter(len(q.images) for q in qs)
    answers = Counter(q.answer_text for q in qs)
    return {
        "format": report.format,
        "records": report.records,
        "questions": len(qs),
        "skipped": report.skipped,
        "problems": _grouped(report.problems, report.problem_examples, report.problem_fields),
        "warnings": _grouped(report.warnings, report.warning_examples),
        "options_per_question": {str(k): per_question[k] for k in sorted(per_question)},
        "images_per_question": {str(k): images[k] for k in sorted(images)},
        "answer_letters": dict(sorted(Counter(q.answer_letter for q in qs).items())),
        "answers": dict(sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))),
        "missing_images": {"count": len(report.missing_images), "first": report.missing_images[:MISSING_SHOWN]},
    }


def inspect(args: argparse.Namespace) -> tuple[dict[str, Any], list[Question]]:
    start = time.perf_counter()
    report = load_questions(
        args.file,
        format=args.format,
        on_bad_record=args.on_bad_record,
        image_root=args.image_root,
        check_images=not args.no_check_images,
        fields=dict(args.field) or None,
    )
    out = summarize(report)
    out["image_problems"] = None if args.no_check_images else image_problems(report.questions, report.unit)
    out.update(similarity=None, stage_thresholds=None, stage_counts=None)
    if not args.no_similarity:
        out.update(_similarity(report.questions, args.encoder, args.stages))
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out, report.questions


# -- --summary ---------------------------------------------------------------------------------


def _rows(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    width = max(len(str(k)) for k, _ in rows)
    return [f"{title}:", *(f"  {str(k).ljust(width)}  {v}" for k, v in rows)]


def table(out: dict[str, Any]) -> str:
    """The JSON report as aligned text sections, for a person at a terminal."""
    lines = [f"file format   {out['format']}",
             f"records       {out['records']}  (questions {out['questions']}, skipped {out['skipped']})"]
    for title, key in (("problems (skipped records)", "problems"), ("warnings (kept records)", "warnings")):
        lines += _rows(title, [(reason, f"x{e['count']}") for reason, e in out[key].items()])
        for e in out[key].values():
            if e.get("fields"):
                lines.append("    fields: " + ", ".join(f"{f} x{n}" for f, n in e["fields"].items()))
            lines += [f"    {m}" for m in e["examples"][:3]]
    if out["questions"]:
        lines += _rows("options per question", list(out["options_per_question"].items()))
        lines += _rows("images per question", list(out["images_per_question"].items()))
        lines += _rows("answer letters", list(out["answer_letters"].items()))
        answers = list(out["answers"].items())
        lines += _rows(f"answers (top {min(ANSWERS_SHOWN, len(answers))} of {len(answers)})", answers[:ANSWERS_SHOWN])
    if out.get("image_problems") is not None:
        lines += _rows("image problems", [(k, f"x{e['count']}") for k, e in out["image_problems"].items()])
        lines += [f"    {m}" for e in out["image_problems"].values() for m in e["examples"][:2]]
    if out.get("similarity"):
        s = out["similarity"]
        lines.append(f"S(q)          min {s['min']:.3f}  mean {s['mean']:.3f}  max {s['max']:.3f}")
        lines.append(f"stages        thresholds {out['stage_thresholds']}  counts {out['stage_counts']}")
    if "seconds" in out:
        lines.append(f"seconds       {out['seconds']}")
    return "\n".join(lines)


# -- --plot ------------------------------------------------------------------------------------


def plot(out: dict[str, Any], questions: list[Question], path: str) -> None:
    """S(q) histogram with the stage thresholds, option counts and the most frequent answers, as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_n, ax_a) = plt.subplots(1, 3, figsize=(15, 4.2))
    values = [q.similarity for q in questions if q.similarity is not None]
    if values:
        ax_s.hist(values, bins=30, color="tab:blue")
        for i, t in enumerate(out["stage_thresholds"] or []):
            ax_s.axvline(t, color="tab:red", linestyle="--", label="stage thresholds" if i == 0 else None)
        if out["stage_thresholds"]:
            ax_s.legend()
        ax_s.set_xlabel("S(q): mean cosine, gold vs distractors")
    else:
        ax_s.text(0.5, 0.5, "S(q) not computed\n(--no-similarity)", ha="center", va="center")
    ax_s.set_title("option similarity S(q)")
    counts = out["options_per_question"]
    ax_n.bar(list(counts), list(counts.values()), color="tab:green")
    ax_n.set(title="options per question", xlabel="options", ylabel="questions")
    answers = list(out["answers"].items())[:ANSWERS_SHOWN][::-1]
    ax_a.barh([a[:30] for a, _ in answers], [n for _, n in answers], color="tab:orange")
    ax_a.set(title=f"answers (top {len(answers)} of {len(out['answers'])})", xlabel="questions")
    fig.suptitle(f"{out['format']}: {out['questions']} of {out['records']} records usable")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------


def _field(text: str) -> tuple[str, str]:
    ours, sep, theirs = text.partition("=")
    if not sep or not ours.strip() or not theirs.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write OURS=THEIRS, e.g. question=q.text or answer=gold.letter")
    return ours.strip(), theirs.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anatomy_lightning.inspect_data", description=__doc__.split("\n")[0])
    p.add_argument("file", help="question file (JSON list or JSON Lines)")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--field", action="append", type=_field, default=[], metavar="OURS=THEIRS",
                   help="data.fields entry: our field (question, options, answer, images, id) <- their key or "
                        "dotted path; repeatable")
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--stages", type=int, default=3, help="curriculum stages K for stage_counts")
    p.add_argument("--on-bad-record", default="skip", choices=("skip", "error"),
                   help="skip (default): count bad records; error: fail on the first file with any")
    p.add_argument("--encoder", default=None, help="sentence-transformers folder or id for S(q)")
    p.add_argument("--no-similarity", action="store_true", help="skip S(q) and stages (no encoder needed)")
    p.add_argument("--no-check-images", action="store_true", help="do not look for or open the image files")
    p.add_argument("--summary", action="store_true", help="print a readable table instead of one JSON line")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw S(q), option-count and answer plots")
    return p.parse_args(argv)


def _show(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(table(out) if args.summary else json.dumps(out, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    from anatomy_lightning.cli import quiet_library_noise

    quiet_library_noise()  # before the encoder pulls in bitsandbytes / transformers
    args = parse_args(argv)
    try:
        out, questions = inspect(args)
        if args.plot:
            plot(out, questions, args.plot)
    except BadRecords as e:  # the file was read: show every reason, as when some records load
        if not e.report.questions:
            _show(summarize(e.report), args)
        reason = str(e).splitlines()[0]
    except (DataError, ValueError) as e:  # unusable file or encoder: one line, no traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    except ImportError as e:
        reason = f"cannot compute S(q) ({e}); install the encoder stack or pass --no-similarity"
    else:
        _show(out, args)
        return 0
    print(f"inspect_data: {reason}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
