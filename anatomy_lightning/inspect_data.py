"""Look at a question file before training on it: what loads, what is dropped, how hard it is.

    python -m anatomy_lightning.inspect_data FILE [--format F] [--field OURS=THEIRS ...] [--image-root DIR]
        [--stages K] [--on-bad-record skip|error] [--encoder X] [--aggregation A] [--stages-by per_class|global]
        [--no-similarity] [--no-check-images] [--summary] [--plot FILE.png] [--questions OUT.jsonl]
    python -m anatomy_lightning.inspect_data --config FIT.yaml [--no-check-images] [--summary] ...

Prints one JSON object (format, records, skipped, problems per reason and field with examples,
options and images per question, answers, image problems, S(q) range, stage thresholds and counts,
the curriculum audit (class x stage table, text-shortcut accuracy per stage, warnings; see
`data.audit`), seconds), or with `--summary` the same as a readable table. `--config` reads a fit
YAML's `data:` section and builds the DataModule itself, so the stages are the ones `fit` trains
on (its training split). `--questions` writes one JSON line per question (uid, class = answer,
options, similarity, stage). `--plot` draws the S(q) histogram with
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
AGGREGATIONS_CLI = ("all_pairs", "all_pairs_max", "gold_mean", "gold_max", "mean", "max")  # similarity.AGGREGATIONS + old names
ANSWERS_SHOWN = 10  # rows of the answer table in --summary and bars in --plot


def _grouped(counts: dict[str, int], examples: dict[str, list[str]],
             fields: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        out[reason] = {"count": n, "examples": examples.get(reason, [])}
        if fields is not None:
            out[reason]["fields"] = dict(sorted(fields.get(reason, {}).items(), key=lambda kv: -kv[1]))
    return out


def _similarity(questions: list[Question], encoder: str | None, stages: int, aggregation: str = "all_pairs",
                by: str = "per_class") -> dict[str, Any]:
    """S(q) summary, stage thresholds and counts, and the curriculum audit (imported here: the
    encoder stack is heavy and optional)."""
    from anatomy_lightning.data.similarity import SimilarityScorer
    from anatomy_lightning.data.stages import assign_stages

    scorer = SimilarityScorer(encoder, aggregation=aggregation)
    scorer.score(questions)
    return _stages_report(questions, assign_stages(questions, stages, by=by), stages, scorer)


def _stages_report(questions: list[Question], thresholds: Any, stages: int, scorer: Any) -> dict[str, Any]:
    from anatomy_lightning.data.audit import curriculum_audit
    from anatomy_lightning.data.stages import StageThresholds

    values = [q.similarity for q in questions if q.similarity is not None]
    counts = Counter(q.stage for q in questions)
    per_class = thresholds.per_class if isinstance(thresholds, StageThresholds) else None
    overall = thresholds.global_ if isinstance(thresholds, StageThresholds) else thresholds
    return {
        "similarity": {"min": min(values), "mean": sum(values) / len(values), "max": max(values),
                       "aggregation": scorer.aggregation} if values else None,
        "stage_thresholds": [round(t, 4) for t in overall],  # global; per class below when stages are by class
        "stage_thresholds_per_class": None if per_class is None else {
            c: [round(t, 4) for t in ts] for c, ts in per_class.items()},
        "stage_counts": {str(k): counts.get(k, 0) for k in range(stages)},
        "audit": curriculum_audit(questions, scorer, stages) if questions else None,
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
    out.update(similarity=None, stage_thresholds=None, stage_counts=None, audit=None)
    if not args.no_similarity:
        out.update(_similarity(report.questions, args.encoder, args.stages or 3, args.aggregation or "all_pairs",
                               args.stages_by or "per_class"))
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out, report.questions


def data_section(path: str) -> dict[str, Any]:
    """The `data:` section of a fit YAML, interpolations resolved (class_path/init_args unwrapped)."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except OSError as err:
        raise DataError(f"--config {path}: cannot read it ({err})") from err
    if "data" not in cfg or cfg.data is None:
        raise DataError(f"--config {path}: no `data:` section")
    section = OmegaConf.to_container(cfg.data, resolve=True)
    if not isinstance(section, dict):
        raise DataError(f"--config {path}: `data:` is not a mapping")
    section.pop("class_path", None)
    return dict(section.pop("init_args", None) or {}, **section)


def inspect_config(args: argparse.Namespace) -> tuple[dict[str, Any], list[Question]]:
    """`--config`: the DataModule `fit` would build from the YAML's data section, set up for fit;
    the report (and the audit) is of its training questions, `--questions` lists every split."""
    from anatomy_lightning.data.datamodule import AnatomyVQADataModule
    from anatomy_lightning.data.sources import write_synthetic_files

    start = time.perf_counter()
    section = data_section(args.config)
    if args.no_check_images:
        section["check_images"] = False
    similarity = dict(section.get("similarity") or {})
    for key, flag in (("encoder", args.encoder), ("aggregation", args.aggregation), ("stages", args.stages_by)):
        if flag is not None:
            similarity[key] = flag
    section["similarity"] = similarity
    if args.stages is not None:
        section["num_stages"] = args.stages
    dm = AnatomyVQADataModule(**section)
    dm.setup("fit")
    train = write_synthetic_files(dm.synthetic)["train"] if dm.synthetic is not None else dm.train_file
    report = load_questions(str(train), format=dm.format, on_bad_record=dm.on_bad_record, image_root=dm.image_root,
                            check_images=False, fields=dm.fields) if train else None
    out = summarize(report) if report is not None else {}
    out["image_problems"] = None  # the DataModule's pre-flight already stopped on any (check_images)
    questions = dm.train_questions
    out.update(_stages_report(questions, dm.stage_thresholds, dm.num_stages, dm._scorer()))
    out["config"] = args.config
    out["splits"] = {"train": len(dm.train_questions), "val": len(dm.val_questions), "test": len(dm.test_questions)}
    out["seconds"] = round(time.perf_counter() - start, 3)
    splits = {"train": dm.train_questions, "val": dm.val_questions, "test": dm.test_questions}
    out["_split_of"] = [name for name, qs in splits.items() for _ in qs]  # popped by main, for --questions
    return out, [q for qs in splits.values() for q in qs]


def write_questions(questions: list[Question], path: str, splits: list[str] | None = None) -> None:
    """One JSON line per question: uid, answer (= class), options, similarity, stage (and split with --config)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            row = {"uid": q.uid, "answer": q.answer_text, "class": q.answer_text, "options": list(q.options),
                   "similarity": q.similarity, "stage": q.stage}
            if splits is not None:
                row["split"] = splits[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
        by = " (global; per class: see JSON)" if out.get("stage_thresholds_per_class") else ""
        lines.append(f"stages        thresholds {out['stage_thresholds']}{by}  counts {out['stage_counts']}")
    if out.get("audit"):
        from anatomy_lightning.data.audit import format_audit

        lines.append(format_audit(out["audit"]))
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
    p.add_argument("file", nargs="?", default=None, help="question file (JSON list or JSON Lines)")
    p.add_argument("--config", default=None, metavar="FIT.yaml",
                   help="instead of FILE: a fit YAML; its data section is loaded, scored and staged as fit would")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--field", action="append", type=_field, default=[], metavar="OURS=THEIRS",
                   help="data.fields entry: our field (question, options, answer, images, id) <- their key or "
                        "dotted path; repeatable")
    p.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--stages", type=int, default=None, help="curriculum stages K for stage_counts (default 3, "
                   "or the config's data.num_stages)")
    p.add_argument("--on-bad-record", default="skip", choices=("skip", "error"),
                   help="skip (default): count bad records; error: fail on the first file with any")
    p.add_argument("--encoder", default=None, help="sentence-transformers folder or id for S(q)")
    p.add_argument("--aggregation", default=None, choices=AGGREGATIONS_CLI,
                   help="S(q) aggregation (default all_pairs, or the config's data.similarity.aggregation)")
    p.add_argument("--stages-by", default=None, choices=("per_class", "global"),
                   help="stage quantiles within each gold class (default) or over all questions")
    p.add_argument("--no-similarity", action="store_true", help="skip S(q) and stages (no encoder needed)")
    p.add_argument("--no-check-images", action="store_true", help="do not look for or open the image files")
    p.add_argument("--summary", action="store_true", help="print a readable table instead of one JSON line")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw S(q), option-count and answer plots")
    p.add_argument("--questions", default=None, metavar="OUT.jsonl",
                   help="write one JSON line per question: uid, answer/class, options, similarity, stage")
    args = p.parse_args(argv)
    if (args.file is None) == (args.config is None):
        p.error("give a question FILE or --config FIT.yaml (one of them)")
    return args


def _show(out: dict[str, Any], args: argparse.Namespace) -> None:
    print(table(out) if args.summary else json.dumps(out, ensure_ascii=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before any heavy import: --help and usage errors print at once
    from anatomy_lightning.logs import quiet_library_noise

    quiet_library_noise()  # before the encoder pulls in bitsandbytes / transformers
    try:
        out, questions = inspect_config(args) if args.config else inspect(args)
        splits = out.pop("_split_of", None)
        if args.plot:
            plot(out, questions, args.plot)
        if args.questions:
            write_questions(questions, args.questions, splits)
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
