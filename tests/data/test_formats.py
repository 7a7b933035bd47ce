"""The EasyR1, MedXpertQA-MM and MedVLM-R1 readers, own option markers, and the real files in ../shared/data/more."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from anatomy_lightning.data.loader import (
    FORMATS,
    MISMATCH,
    SEVERAL_ANSWERS,
    WRONG_TYPE,
    detect_format,
    load_questions,
    strip_own_markers,
)
from anatomy_lightning.data.schema import DataError


def write_jsonl(tmp_path: Path, records: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def easyr1_record(**answer: Any) -> dict[str, Any]:
    return {
        "prompt": "Question: What type of abnormality is present in this image?\nOptions:\nA. Hemangioma\n"
                  "B. Sarcoma\nC. Melanoma\nAnswer with only the option letter (A, B, or C).\n<answer> A </answer>",
        "images": ["/Images/ISIC2018/val/ISIC_0034329.jpg"],
        "answer": {"label": "Melanoma", "answer_id": "C", "question_id": "ISIC2018_0099", "dataset": "ISIC2018",
                   "option_A": "Hemangioma", "option_B": "Sarcoma", "option_C": "Melanoma", "option_D": "",
                   "correct_answer": "C", **answer},
    }


def medxpertqa_record(**change: Any) -> dict[str, Any]:
    return {
        "id": "MM-1",
        "question": "Which approach is best?\nAnswer Choices: (A) Lateral (B) Inferior (C) Medial",
        "options": [{"letter": "A", "content": "Lateral"}, {"letter": "B", "content": "Inferior"},
                    {"letter": "C", "content": "Medial"}],
        "label": ["B"],
        "images": [{"image_path": "MM-1-a.png"}, {"image_path": "MM-1-b.png"}, {"image_path": "MM-1-c.png"}],
        "body_system": "Reproductive",
        **change,
    }


def test_all_readers_are_selectable():
    assert {"easyr1", "medxpertqa", "medvlm_r1", "anatomy_r1", "omnimedvqa", "r1", "generic"} == set(FORMATS[1:])


def test_easyr1_reads_prompt_stem_option_columns_and_answer(tmp_path: Path):
    report = load_questions(write_jsonl(tmp_path, [easyr1_record()]), check_images=False)
    q = report.questions[0]
    assert report.format == "easyr1"
    assert q.question == "What type of abnormality is present in this image?"
    assert q.options == ["Hemangioma", "Sarcoma", "Melanoma"]  # the empty option_D is dropped
    assert (q.answer_letter, q.id, q.images) == ("C", "ISIC2018_0099", ["/Images/ISIC2018/val/ISIC_0034329.jpg"])
    assert q.metadata["dataset"] == "ISIC2018" and q.metadata["prompt"].startswith("Question: What type")
    assert not any(k.startswith("option_") or k == "correct_answer" for k in q.metadata)


def test_easyr1_answers_that_disagree_name_the_field(tmp_path: Path):
    path = write_jsonl(tmp_path, [easyr1_record(), easyr1_record(label="Sarcoma"), easyr1_record(correct_answer="E")])
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert len(report.questions) == 1 and report.problems == {MISMATCH: 1, "answer not among options": 1}
    assert report.problem_examples[MISMATCH][0].startswith('line 2, field "answer.label": \'Sarcoma\' disagrees')
    assert report.problem_examples["answer not among options"][0].startswith('line 3, field "answer.correct_answer"')


def test_medxpertqa_options_objects_label_list_and_several_images(tmp_path: Path):
    report = load_questions(write_jsonl(tmp_path, [medxpertqa_record()]), check_images=False)
    q = report.questions[0]
    assert report.format == "medxpertqa"
    assert (q.question, q.options, q.answer_text) == ("Which approach is best?", ["Lateral", "Inferior", "Medial"],
                                                     "Inferior")
    assert q.images == [str(tmp_path / f"MM-1-{x}.png") for x in "abc"]
    assert q.metadata["body_system"] == "Reproductive" and "label" not in q.metadata


def test_medxpertqa_letters_out_of_order_are_sorted_and_bad_ones_reported(tmp_path: Path):
    shuffled = medxpertqa_record(options=[{"letter": "B", "content": "Inferior"},
                                          {"letter": "A", "content": "Lateral"}])
    records = [shuffled, medxpertqa_record(label=["A", "B"]),
               medxpertqa_record(options=[{"letter": "A", "content": "x"}, {"letter": "C", "content": "y"}]),
               medxpertqa_record(options=[{"letter": "A"}, {"letter": "B", "content": "y"}])]
    report = load_questions(write_jsonl(tmp_path, records), on_bad_record="skip", check_images=False)
    assert report.questions[0].options == ["Lateral", "Inferior"] and report.questions[0].answer_text == "Inferior"
    assert report.problems == {SEVERAL_ANSWERS: 1, WRONG_TYPE: 2}
    assert report.problem_examples[SEVERAL_ANSWERS][0].startswith('line 2, field "label": gives 2 answers')
    assert 'line 3, field "options": letters' in report.problem_examples[WRONG_TYPE][0]
    assert 'line 4, field "options[0]"' in report.problem_examples[WRONG_TYPE][1]


def test_medvlm_r1_is_its_own_format_and_checks_solution_against_answer(tmp_path: Path):
    rec = {"image": ["images/brain.png"], "problem": "What is apparent?\nA) Hemorrhage\nB) Chronic infarct",
           "solution": "B", "question": "What is apparent?", "options": ["Hemorrhage", "Chronic infarct"],
           "answer": "Chronic infarct", "dataset": "OmniMedVQA"}
    path = tmp_path / "medvlm.json"
    path.write_text(json.dumps([rec, {**rec, "solution": "A"}]))
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert report.format == "medvlm_r1" and detect_format([rec]) == "medvlm_r1"
    q = report.questions[0]
    assert (q.question, q.answer_text, q.metadata["dataset"]) == ("What is apparent?", "Chronic infarct", "OmniMedVQA")
    assert "problem" not in q.metadata and "solution" not in q.metadata
    assert report.problem_examples[MISMATCH][0].startswith('record 1, field "solution": \'A\' disagrees')


@pytest.mark.parametrize("options", [["(A) Gallbladder", "(B) Gut", "(C) Liver"],
                                     ["A. Gallbladder", "B. Gut", "C. Liver"],
                                     ["A) Gallbladder", "B) Gut", "C) Liver"],
                                     ["A:Gallbladder", "B: Gut", "C:  Liver"]])
@pytest.mark.parametrize("answer", ["A", "(A) Gallbladder", "Gallbladder"])
def test_own_option_markers_are_stripped_for_gold_anatomy_and_similarity(tmp_path: Path, options: list[str],
                                                                         answer: str):
    rec = {"question": "Which organ?", "options": options, "answer": answer}
    q = load_questions(write_jsonl(tmp_path, [rec]), check_images=False).questions[0]
    assert q.options == ["Gallbladder", "Gut", "Liver"]
    assert (q.answer_text, q.anatomy) == ("Gallbladder", "Gallbladder")


def test_marker_stripping_needs_a_complete_run_in_one_style():
    assert strip_own_markers(["A. fib", "Sinus rhythm"]) == ["A. fib", "Sinus rhythm"]  # one marker: a name
    assert strip_own_markers(["(A) x", "B. y"]) == ["(A) x", "B. y"]  # mixed styles
    assert strip_own_markers(["B) x", "A) y"]) == ["B) x", "A) y"]  # not A, B, C in order
    assert strip_own_markers(["(A) Retina (RPE)", "(B) Choroid"]) == ["Retina (RPE)", "Choroid"]


def test_the_same_markers_inside_omnimedvqa_columns(tmp_path: Path):
    rec = {"question": "Which organ?", "option_A": "A. Lung", "option_B": "B. Heart", "gt_answer": "B. Heart"}
    q = load_questions(write_jsonl(tmp_path, [rec]), check_images=False).questions[0]
    assert (q.options, q.answer_text) == (["Lung", "Heart"], "Heart")


# -- the real files ----------------------------------------------------------------------------


def _more(shared_data: Path, name: str) -> Path:
    path = shared_data / "more" / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


def test_shared_easyr1_file(shared_data: Path):
    path = _more(shared_data, "easyr1_omnimed_isic_test.jsonl")
    report = load_questions(path, check_images=False)
    qs = report.questions
    assert (report.format, report.records, report.skipped, len(qs)) == ("easyr1", 551, 0, 551)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for q, rec in zip(qs, raw):
        assert q.answer_letter == rec["answer"]["correct_answer"] and q.answer_text == rec["answer"]["label"]
        assert q.id == rec["answer"]["question_id"] and q.images == rec["images"]
        assert "Options" not in q.question and "<answer>" not in q.question and q.question.endswith("?")
    assert Counter(len(q.options) for q in qs) == {4: 340, 2: 211}


def test_shared_medxpertqa_file_with_several_images(shared_data: Path):
    path = _more(shared_data, "medxpertqa_mm_input.jsonl")
    report = load_questions(path, check_images=False)
    qs = report.questions
    assert (report.format, report.records, report.skipped, len(qs)) == ("medxpertqa", 2000, 0, 2000)
    assert Counter(len(q.images) for q in qs) == {1: 1581, 2: 236, 3: 59, 4: 22, 5: 78, 6: 24}
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for q, rec in zip(qs, raw):
        assert q.answer_letter == rec["label"][0] and q.options == [o["content"] for o in rec["options"]]
        assert "Answer Choices" not in q.question and rec["question"].startswith(q.question)


def test_shared_medxpertqa_forced_generic_names_the_field_and_type(shared_data: Path):
    path = _more(shared_data, "medxpertqa_mm_input.jsonl")
    with pytest.raises(DataError) as err:
        load_questions(path, format="generic", on_bad_record="skip", check_images=False)
    report = err.value.report
    assert report.problem_fields == {WRONG_TYPE: {"options[0]": 2000}}
    assert 'line 1, field "options[0]": expected option text, got an object' in report.problem_examples[WRONG_TYPE][0]


def test_shared_medvlm_r1_file(shared_data: Path):
    path = _more(shared_data, "medvlm_r1_MRI_CT_XRAY_300each_dataset.json")
    report = load_questions(path, check_images=False)
    qs = report.questions
    assert (report.format, report.records, report.skipped, len(qs)) == ("medvlm_r1", 900, 0, 900)
    raw = json.loads(path.read_text())
    assert all(q.answer_text == rec["answer"] and q.answer_letter == rec["solution"] for q, rec in zip(qs, raw))
    assert Counter(len(q.options) for q in qs) == {4: 825, 2: 75}
    assert all(q.images == [str(path.parent / rec["image"][0])] for q, rec in zip(qs, raw))
