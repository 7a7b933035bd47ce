"""load_questions: every format, every inline option style, every answer form, and every bad input
reported with file, record and field (all problems at once in error mode, counted in skip mode)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from anatomy_lightning.data.loader import (
    AMBIGUOUS,
    DUPLICATE,
    ESCAPES,
    MISMATCH,
    MISSING,
    NOT_AN_OPTION,
    load_questions,
    split_inline_options,
)
from anatomy_lightning.data.schema import DataError, Question

SYSTEM = (
    "You are an expert in cholecystectomy surgical procedures. Please analyze the image and answer the "
    "question.\n\n1.Select the most suitable option. Output the final answer in <answer> </answer> tags."
)


def write_json(tmp_path: Path, records: list[Any], name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, records: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def anatomy_record(stem: str = "What anatomy is at the top-left of the frame ?", header: str = "Anatomy Options:",
                   options: tuple[str, ...] = ("Liver", "Cystic Plate", "Gut", "Abdominal Wall Cavity"),
                   solution: str = "D", answer: str | None = "Abdominal Wall Cavity", **extra: Any) -> dict[str, Any]:
    block = "\n".join(f"{'ABCDEF'[i]}. {o}" for i, o in enumerate(options))
    rec = {"instruction": f"{SYSTEM}\nQuestion:\n{stem}\n{header}\n{block}", "solution": solution,
           "images": " /CholecT45/data/VID35/002056.png", **extra}
    if answer is not None:
        rec["answer"] = answer
    return rec


def generic_record(**over: Any) -> dict[str, Any]:
    rec = {"question": "Which organ is shown?", "options": ["Liver", "Spleen", "Kidney"], "answer": "B"}
    rec.update(over)
    return rec


def load_error(path: Path, **kw: Any) -> str:
    with pytest.raises(DataError) as info:
        load_questions(path, check_images=False, **kw)
    return str(info.value)


# -- formats -----------------------------------------------------------------------------------


def test_anatomy_r1_stem_excludes_system_text_and_options(tmp_path: Path):
    rec = anatomy_record(sft_prompt="<image>sft text")
    path = write_json(tmp_path, [rec], "sgg.json")
    report = load_questions(path, check_images=False)
    assert report.format == "anatomy_r1" and report.records == 1 and report.skipped == 0
    q = report.questions[0]
    assert q.question == "What anatomy is at the top-left of the frame ?"
    assert q.options == ["Liver", "Cystic Plate", "Gut", "Abdominal Wall Cavity"]
    assert q.answer_index == 3 and q.answer_text == "Abdominal Wall Cavity"
    assert q.images == ["/CholecT45/data/VID35/002056.png"]  # stray leading space stripped
    assert q.id == "sgg:0"
    assert q.metadata == {"sft_prompt": "<image>sft text", "source": str(path), "record": 0,
                          "anatomy": "Abdominal Wall Cavity", "prompt": rec["instruction"]}  # data.prompt: dataset


def test_anatomy_r1_plain_options_header_image_list_and_sft_instruction(tmp_path: Path):
    rec = anatomy_record(header="Options:", solution="B", answer=None, sft_instruction="<image>x")
    rec["images"] = ["a/1.png ", " b/2.png"]
    q = load_questions(write_json(tmp_path, [rec]), check_images=False).questions[0]
    assert q.question == "What anatomy is at the top-left of the frame ?" and q.answer_text == "Cystic Plate"
    assert q.images == [str(tmp_path / "a/1.png"), str(tmp_path / "b/2.png")]
    assert q.metadata["sft_instruction"] == "<image>x"


def test_anatomy_r1_solution_and_answer_must_agree(tmp_path: Path):
    path = write_json(tmp_path, [anatomy_record(), anatomy_record(solution="A")])  # A is Liver, answer says AWC
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert report.skipped == 1 and report.problems == {MISMATCH: 1}
    assert report.examples[0].startswith('record 1, field "answer"')


def test_omnimedvqa_drops_empty_options_and_keeps_metadata(tmp_path: Path):
    rec = {"question": "What organ is shown?", "option_A": "Lung", "option_B": "Heart", "option_C": "",
           "gt_answer": "heart", "image_path": "Images/x.png", "question_id": "q-17", "dataset": "RadImageNet",
           "modality_type": "CT", "question_type": "Anatomy Identification"}
    report = load_questions(write_json(tmp_path, [rec]), check_images=False)
    q = report.questions[0]
    assert report.format == "omnimedvqa"
    assert (q.id, q.question, q.options, q.answer_index) == ("q-17", "What organ is shown?", ["Lung", "Heart"], 1)
    assert q.images == [str(tmp_path / "Images/x.png")]
    assert {k: q.metadata[k] for k in ("modality_type", "question_type", "dataset", "question_id", "anatomy")} == {
        "modality_type": "CT", "question_type": "Anatomy Identification", "dataset": "RadImageNet",
        "question_id": "q-17", "anatomy": "Heart"}


@pytest.mark.parametrize(
    "problem",
    [
        "What is shown? A)Liver, B)Spleen, C)Kidney",
        "What is shown? A) Liver B) Spleen C) Kidney",
        "What is shown?\nA. Liver\nB. Spleen\nC. Kidney",
        "What is shown? (A) Liver (B) Spleen (C) Kidney",
        "What is shown? A: Liver B: Spleen C: Kidney",
        "What is shown?\nOptions:\nA) Liver\nB) Spleen\nC) Kidney\n",
    ],
)
def test_r1_inline_option_styles(tmp_path: Path, problem: str):
    rec = {"image": "img.png", "problem": problem, "solution": "<answer> B </answer>"}
    report = load_questions(write_json(tmp_path, [rec]), check_images=False)
    q = report.questions[0]
    assert report.format == "r1"
    assert (q.question, q.options, q.answer_index) == ("What is shown?", ["Liver", "Spleen", "Kidney"], 1)


def test_r1_options_with_commas_and_parentheses(tmp_path: Path):
    records = [
        {"image": "a.png", "problem": "What is depicted? A)Vitreous humor, B)Retinal pigmented epithelium (RPE), "
                                      "C)Prostate (for males), D)Liver, left lobe", "solution": "<answer>b</answer>"},
        {"image": "b.png", "problem": "Which? A) Folate (vitamin B), B) Iron, C) Zinc", "solution": "A"},
    ]
    qs = load_questions(write_json(tmp_path, records), check_images=False).questions
    assert qs[0].options == ["Vitreous humor", "Retinal pigmented epithelium (RPE)", "Prostate (for males)",
                             "Liver, left lobe"]
    assert qs[0].answer_text == "Retinal pigmented epithelium (RPE)"
    assert qs[1].options == ["Folate (vitamin B)", "Iron", "Zinc"] and qs[1].answer_index == 0


def test_r1_stem_mentioning_a_letter_and_trailing_instruction(tmp_path: Path):
    rec = {"image": "a.png", "problem": "Vitamin A. Which organ stores it?\nA. Liver\nB. Skin\nAnswer with the letter.",
           "solution": "Liver"}
    q = load_questions(write_json(tmp_path, [rec]), check_images=False).questions[0]
    assert (q.question, q.options, q.answer_index) == ("Vitamin A. Which organ stores it?", ["Liver", "Skin"], 0)
    assert q.metadata["prompt_suffix"] == "Answer with the letter."


def test_r1_ambiguous_and_unparseable_options_are_reported_not_guessed(tmp_path: Path):
    records = [
        {"image": "a.png", "problem": "Is vitamin (A) shown? (A) yes (B) no", "solution": "A"},
        {"image": "b.png", "problem": "What? A) x, B) y, C) Vitamin D) deficiency", "solution": "A"},
        {"image": "c.png", "problem": "What is shown here?", "solution": "A"},
        {"image": "d.png", "problem": "What? A) Liver, B) Spleen", "solution": "A"},
    ]
    path = write_json(tmp_path, records, "medr1.json")
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert [q.metadata["record"] for q in report.questions] == [3]
    assert report.problems == {AMBIGUOUS: 2, "options not found": 1}
    first = report.problem_examples[AMBIGUOUS][0]
    assert first.startswith('record 0, field "problem": the options can be split 2 ways')
    assert report.problem_examples[AMBIGUOUS][1].startswith('record 1, field "problem"')
    assert report.problem_examples["options not found"][0].startswith('record 2, field "problem"')


def test_split_inline_options_keeps_numbers_of_options_exact():
    assert split_inline_options("Which eye? A)right eye, B)left eye") == ("Which eye?", ["right eye", "left eye"], "")
    stem, options, _ = split_inline_options("Q: pick\nA. one\nB. two\nC. three\nD. four\nE. five\nF. six")
    assert stem == "Q: pick" and len(options) == 6


def test_r1_jsonl_records_are_numbered_by_line(tmp_path: Path):
    path = tmp_path / "r1.jsonl"
    rows = [{"images": ["x.png"], "problem": "Q? A)a, B)b", "solution": s} for s in ("A", "B")]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    report = load_questions(path, check_images=False)
    assert [q.metadata["record"] for q in report.questions] == [1, 3]
    assert [q.id for q in report.questions] == ["r1:1", "r1:3"]
    assert [q.answer_index for q in report.questions] == [0, 1]


def test_generic_list_mapping_metadata_and_extra_fields(tmp_path: Path):
    records = [
        generic_record(id="g1", image="x.png", metadata={"dataset": "demo"}, split="train"),
        generic_record(options={"B": "Spleen", "A": "Liver"}, answer="liver"),
    ]
    report = load_questions(write_jsonl(tmp_path, records), check_images=False)
    a, b = report.questions
    assert report.format == "generic"
    assert (a.id, a.options, a.answer_text, a.images) == ("g1", ["Liver", "Spleen", "Kidney"], "Spleen",
                                                          [str(tmp_path / "x.png")])
    assert a.metadata == {"split": "train", "dataset": "demo", "source": str(tmp_path / "data.jsonl"),
                          "record": 1, "anatomy": "Spleen"}
    assert (b.id, b.options, b.answer_index) == ("data:2", ["Liver", "Spleen"], 0)


def test_generic_round_trip_of_to_record(tmp_path: Path):
    originals = [
        Question("q-1", "What is left of the liver?", ["Gut", "Liver, left lobe", "Omentum (greater)"], 2,
                 ["images/a.png"], {"anatomy": "Omentum (greater)", "kind": "relation", "augmented_from": "q-0"}),
        Question("q-2", "Which organ?", ["Liver", "Spleen"], 0, [], {"source": "old.json", "record": 9}),
    ]
    path = tmp_path / "rt.jsonl"
    path.write_text("".join(json.dumps(q.to_record()) + "\n" for q in originals))
    loaded = load_questions(path, format="generic", check_images=False).questions
    for back, q in zip(loaded, originals):
        assert (back.id, back.question, back.options, back.answer_index) == (q.id, q.question, q.options,
                                                                             q.answer_index)
        assert back.images == [str(tmp_path / p) for p in q.images]
        record = back.to_record()
        record["images"] = q.images  # paths come back resolved against the file's folder
        expected = q.to_record()
        expected.setdefault("metadata", {}).setdefault("anatomy", q.answer_text)
        assert record == expected
    assert loaded[1].metadata["source"] == str(path)  # the file it was read from, not the stale one


@pytest.mark.parametrize(
    "answer", ["C", "C.", "(C)", "C)", "c", "C. Kidney", "(C) kidney", "kidney", "  KIDNEY ", "Kidney.",
               "<answer> C </answer>", "<ANSWER>C</ANSWER>", "<think>hm</think><answer>Kidney</answer>"],
)
def test_every_answer_form(tmp_path: Path, answer: str):
    q = load_questions(write_json(tmp_path, [generic_record(answer=answer)]), check_images=False).questions[0]
    assert q.answer_index == 2 and q.metadata["anatomy"] == "Kidney"


def test_auto_detection_and_bad_format_argument(tmp_path: Path):
    path = write_json(tmp_path, [generic_record()])
    assert load_questions(path, check_images=False).format == "generic"
    assert "format='csv' is not supported" in load_error(path, format="csv")
    assert "cannot tell the format" in load_error(write_json(tmp_path, [{"prompt": "x"}], "odd.json"))


def test_forced_wrong_format_explains_itself(tmp_path: Path):
    message = load_error(write_json(tmp_path, [anatomy_record()]), format="r1")
    assert 'field "problem": is missing' in message and "try format='anatomy_r1'" in message


# -- bad input ---------------------------------------------------------------------------------


def test_invalid_json_names_line_and_column(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"question": "q", "options": ["a", "b"] "answer": "A"}\n]\n')
    message = load_error(path)
    assert str(path) in message and "invalid JSON at line 2, column" in message


def test_truncated_json_list(tmp_path: Path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([generic_record()] * 3)[:-30])
    message = load_error(path)
    assert str(path) in message and "truncated" in message


def test_jsonl_bad_line_and_truncated_last_line(tmp_path: Path):
    path = tmp_path / "cut.jsonl"
    good = json.dumps(generic_record())
    path.write_text(f"{good}\n{{'question': 1}}\n{good}\n{good[:25]}")
    message = load_error(path)
    assert message.startswith(f"{path}: 2 of 4 records are unusable")
    assert "line 2: invalid JSON at column 2" in message
    assert "line 4: the file ends in the middle of this record (truncated)" in message
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert len(report.questions) == 2 and report.problems == {"invalid JSON": 1, "truncated record": 1}


def test_non_utf8_bytes_name_the_byte_offset(tmp_path: Path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "caf\xe9?", "options": ["a", "b"], "answer": "A"}\n')
    message = load_error(path)
    assert str(path) in message and "not UTF-8" in message and "byte offset 17" in message and "line 1" in message


@pytest.mark.parametrize(
    ("change", "reason", "field", "text"),
    [
        ({"options": 5}, "wrong field type", "options", "got a number (5)"),
        ({"options": ["Liver", None]}, "wrong field type", "options[1]", "got null"),
        ({"question": ["what?"]}, "wrong field type", "question", "expected text, got a list"),
        ({"question": None}, MISSING, "question", "is missing"),
        ({"question": "   "}, "empty question", "question", "empty"),
        ({"options": None}, MISSING, "options", "is missing"),
        ({"answer": None}, MISSING, "answer", "is missing"),
        ({"answer": 2}, "wrong field type", "answer", "got a number (2)"),
        ({"options": ["Liver", " ", "Kidney"]}, "empty option", "options", "option B is empty"),
        ({"answer": "Heart"}, NOT_AN_OPTION, "answer", "'Heart' is neither a letter A-C"),
        ({"answer": "D"}, NOT_AN_OPTION, "answer", "letter D but there are only 3 options"),
        ({"answer": "B. Kidney"}, MISMATCH, "answer", "option B is 'Spleen'"),
        ({"options": ["Liver", "spleen ", "Spleen"]}, DUPLICATE, "options", "options B and C are the same"),
        ({"options": ["Liver"], "answer": "A"}, "too few options", "options", "has 1 option(s)"),
        ({"options": list("abcdefg"), "answer": "A"}, "too many options", "options", "at most 6"),
        ({"image": 3}, "wrong field type", "image", "expected an image path"),
        ({"metadata": "x"}, "wrong field type", "metadata", "expected an object"),
        ({"options": {"A": "x", "C": "y"}}, "wrong field type", "options", "not the letters A, B, C"),
    ],
)
def test_bad_record_messages_name_file_record_and_field(tmp_path: Path, change: dict, reason: str, field: str,
                                                        text: str):
    path = write_json(tmp_path, [generic_record(), generic_record(), {**generic_record(), **change}], "bad.json")
    message = load_error(path)
    assert message.splitlines()[0] == f"{path}: 1 of 3 records are unusable (generic format): {reason} x1"
    line = next(m for m in message.splitlines() if "record 2" in m)
    assert f'record 2, field "{field}"' in line and text in line
    assert "Traceback" not in message


def test_record_that_is_not_an_object(tmp_path: Path):
    message = load_error(write_json(tmp_path, [generic_record(), ["not", "an", "object"]]))
    assert "record 1: expected an object with the question fields, got a list" in message


def test_duplicate_distractors_are_kept_with_a_warning(tmp_path: Path):
    rec = generic_record(options=["Thyroid Gland", "aorta", "Right atrium", "Thyroid gland"], answer="B")
    report = load_questions(write_json(tmp_path, [rec]), check_images=False)
    assert len(report.questions) == 1 and report.questions[0].options[3] == "Thyroid gland"
    assert report.problems == {} and report.warnings == {DUPLICATE: 1}
    assert "both are distractors" in report.warning_examples[DUPLICATE][0]


@pytest.mark.parametrize("text", ["", "  \n", "[]", "42"])
def test_unusable_files(tmp_path: Path, text: str):
    path = tmp_path / "x.json"
    path.write_text(text)
    message = load_error(path)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file(tmp_path: Path):
    assert "file not found" in load_error(tmp_path / "nope.json")


def test_error_mode_reports_every_problem_at_once(tmp_path: Path):
    records = [generic_record(), generic_record(answer="Heart"), generic_record(options=7),
               generic_record(answer="Lung"), generic_record(question=None)]
    message = load_error(write_json(tmp_path, records, "many.json"))
    first = message.splitlines()[0]
    assert "3 of 5 records" not in first and "4 of 5 records are unusable" in first
    assert "answer not among options x2" in first and "wrong field type x1" in first and "missing field x1" in first
    for i in (1, 2, 3, 4):
        assert f"record {i}, field" in message
    assert 'on_bad_record="skip"' in message


def test_skip_mode_counts_and_keeps_the_good(tmp_path: Path):
    records = [generic_record(answer="Heart")] * 7 + [generic_record(id="ok")]
    report = load_questions(write_json(tmp_path, records), on_bad_record="skip", check_images=False)
    assert [q.id for q in report.questions] == ["ok"]
    assert (report.records, report.skipped, report.problems) == (8, 7, {NOT_AN_OPTION: 7})
    assert len(report.examples) == 5 and report.examples[0].startswith('record 0, field "answer"')
    assert ", ".join(report.problems) == NOT_AN_OPTION


def test_skip_mode_with_nothing_usable_still_raises(tmp_path: Path):
    message = load_error(write_json(tmp_path, [generic_record(answer="Heart")]), on_bad_record="skip")
    assert "no record is usable" in message


# -- images ------------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_image_root_reroots_relative_and_dataset_absolute_paths(tmp_path: Path):
    root = tmp_path / "datasets"
    full = touch(root / "CholecT45/data/VID35/002056.png")
    rel = touch(root / "Images/MIAS/mdb132.png")
    records = [generic_record(image=" /CholecT45/data/VID35/002056.png"),
               generic_record(image="Images/MIAS/mdb132.png")]
    (tmp_path / "ann").mkdir()
    path = write_json(tmp_path / "ann", records, "d.json")
    report = load_questions(path, image_root=root)
    assert [q.images for q in report.questions] == [[str(full)], [str(rel)]]
    assert report.missing_images == []
    # image_root at a deeper level of the dataset tree: the shortest matching tail is found
    deeper = load_questions(path, image_root=root / "CholecT45", check_images=True)
    assert deeper.questions[0].images == [str(full)]
    assert deeper.missing_images == [str(root / "CholecT45/Images/MIAS/mdb132.png")]


def test_existing_absolute_paths_stay_and_relative_paths_use_the_file_folder(tmp_path: Path):
    real = touch(tmp_path / "elsewhere/a.png")
    path = write_json(tmp_path, [generic_record(images=[str(real), "imgs/b.png"])])
    report = load_questions(path, image_root=None)
    assert report.questions[0].images == [str(real), str(tmp_path / "imgs/b.png")]
    assert report.missing_images == [str(tmp_path / "imgs/b.png")]
    assert load_questions(path, image_root=tmp_path / "root").questions[0].images[0] == str(real)


def test_dotdot_escaping_image_root_is_a_problem(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    records = [generic_record(image="../secret.png"), generic_record(image="a/../b.png"),
               generic_record(image="/../../etc/passwd")]
    path = write_json(tmp_path, records, "esc.json")
    report = load_questions(path, image_root=root, on_bad_record="skip", check_images=False)
    assert report.problems == {ESCAPES: 2} and len(report.questions) == 1
    assert report.questions[0].images == [str(root / "b.png")]
    assert report.examples[0].startswith('record 0, field "image": \'../secret.png\' points outside image_root')
    # without image_root a ".." path is simply relative to the data file
    assert load_questions(path, check_images=False, on_bad_record="skip").skipped == 0


def test_missing_images_are_listed_not_raised(tmp_path: Path):
    touch(tmp_path / "here.png")
    records = [generic_record(image="here.png"), generic_record(image="gone.png"), generic_record(image="gone.png")]
    path = write_json(tmp_path, records)
    assert load_questions(path).missing_images == [str(tmp_path / "gone.png")]  # once, not per record
    assert load_questions(path, check_images=False).missing_images == []


# -- the real files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgg_vqa_anatomy_r1.json", "sgg_vqa_anatomy_r1_asc.json",
                                  "sgg_vqa_anatomy_r1_gdqa.json"])
def test_shared_sgg_files(shared_data: Path, name: str):
    report = load_questions(shared_data / name, check_images=False)
    qs = report.questions
    assert (report.format, report.records, report.skipped, len(qs)) == ("anatomy_r1", 1000, 0, 1000)
    assert {len(q.options) for q in qs} == {4}
    assert len({q.answer_text for q in qs}) == 6
    raw = json.loads((shared_data / name).read_text())
    assert all(q.answer_text == rec["answer"].strip() for q, rec in zip(qs, raw))
    for q in qs:
        assert "Question:" not in q.question and "Options" not in q.question and "\n" not in q.question
        assert "expert" not in q.question and q.images and not q.images[0].startswith(" ")
    sft = "sft_instruction" if name.endswith("gdqa.json") else "sft_prompt"
    assert all(sft in q.metadata for q in qs)


def test_shared_medr1_file(shared_data: Path):
    path = shared_data / "omnimedvqa_anatomy_identification_test_medr1.json"
    report = load_questions(path, check_images=False)
    qs = report.questions
    assert (report.format, report.records, report.skipped, len(qs)) == ("r1", 3329, 0, 3329)
    assert Counter(len(q.options) for q in qs) == {4: 3244, 2: 85}
    assert report.warnings == {DUPLICATE: 12}  # case-only twin distractors, gold unique: kept
    raw = json.loads(path.read_text())
    for q, rec in zip(qs, raw):
        letter = re.search(r"<answer>\s*([A-F])\s*</answer>", rec["solution"])[1]
        assert q.answer_letter == letter
        assert q.question == rec["problem"][: rec["problem"].index(" A)")].strip()
        assert ", ".join(f"{'ABCDEF'[i]}){o}" for i, o in enumerate(q.options)) in rec["problem"]
    rpe = [q for q in qs if "Retinal pigmented epithelium (RPE)" in q.options]
    assert rpe and all(len(q.options) == 4 for q in rpe)
    assert os.path.isabs(qs[0].images[0]) and qs[0].images[0].endswith("Images/MIAS/mdb132.png")
