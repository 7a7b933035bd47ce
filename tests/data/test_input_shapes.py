"""Files as users have them: `data.fields` mappings, repeated ids, other line endings, wrapping objects,
and the image pre-flight check (missing, folder, empty and undecodable paths named with their record)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.images import FOLDER, MISSING_IMAGE, UNDECODABLE, ZERO_SIZE, probe_images
from anatomy_lightning.data.loader import DUPLICATE_ID, MISSING, load_questions
from anatomy_lightning.data.schema import DataError, Question

GOOD = {"question": "Which organ?", "options": ["Liver", "Gut", "Omentum"], "answer": "A"}


def jsonl(path: Path, records: list[Any], newline: str = "\n") -> Path:
    path.write_bytes("".join(json.dumps(r) + newline for r in records).encode())
    return path


# -- data.fields -------------------------------------------------------------------------------

THEIRS = {"uid": "x-1", "q": {"text": "Which organ is left of the hook?"}, "choices": ["Liver", "Gut"],
          "gold": {"letters": ["B"]}, "media": ["f.png"], "site": "A"}
MAPPING = {"id": "uid", "question": "q.text", "options": "choices", "answer": "gold.letters.0", "images": "media"}


def test_fields_map_keys_and_dotted_paths_onto_the_generic_reader(tmp_path: Path):
    report = load_questions(jsonl(tmp_path / "t.jsonl", [THEIRS]), fields=MAPPING, check_images=False)
    q = report.questions[0]
    assert report.format == "generic"
    assert (q.id, q.question, q.options, q.answer_text) == ("x-1", "Which organ is left of the hook?",
                                                            ["Liver", "Gut"], "Gut")
    assert q.images == [str(tmp_path / "f.png")]
    assert {k: v for k, v in q.metadata.items() if k not in ("source", "record")} == {"site": "A", "anatomy": "Gut"}


def test_fields_problems_name_their_key_and_the_mapping_entry(tmp_path: Path):
    bad = {**THEIRS, "gold": {"letters": []}, "choices": ["Liver", 3.5, {"x": 1}]}
    with pytest.raises(DataError) as err:
        load_questions(jsonl(tmp_path / "t.jsonl", [THEIRS, bad]), fields=MAPPING, check_images=False)
    message = str(err.value)
    assert f"{tmp_path / 't.jsonl'}: 1 of 2 records are unusable (generic format)" in message
    assert 'line 2, field "choices[2] (data.fields.options)": expected option text, got an object' in message


def test_fields_missing_path_and_bad_mapping(tmp_path: Path):
    path = jsonl(tmp_path / "t.jsonl", [THEIRS])
    with pytest.raises(DataError) as err:
        load_questions(path, fields={**MAPPING, "answer": "gold.label"}, check_images=False)
    assert err.value.report.problem_fields == {MISSING: {"gold.label (data.fields.answer)": 1}}
    with pytest.raises(DataError, match="data.fields must map our field names.*'answer': 3"):
        load_questions(path, fields={"answer": 3}, check_images=False)


def test_datamodule_passes_fields_to_the_loader(tmp_path: Path):
    path = jsonl(tmp_path / "t.jsonl", [THEIRS])
    dm = AnatomyVQADataModule(train_file=str(path), fields=MAPPING, check_images=False, val_fraction=0.0)
    assert [q.answer_text for q in dm._load(str(path), None)] == ["Gut"]


# -- duplicate ids -----------------------------------------------------------------------------


def test_duplicate_ids_warn_with_count_and_examples_and_get_distinct_uids(tmp_path: Path):
    records = [{**GOOD, "id": i} for i in ("a", "b", "a", "a", "c")]
    report = load_questions(jsonl(tmp_path / "d.jsonl", records), check_images=False)
    assert report.warnings == {DUPLICATE_ID: 2}
    assert report.warning_examples[DUPLICATE_ID][0] == "line 3: id 'a' is already used by line 1; kept as uid 'a#dup1'"
    assert [q.id for q in report.questions] == ["a", "b", "a", "a", "c"]  # the user's ids are kept
    assert [q.uid for q in report.questions] == ["a", "b", "a#dup1", "a#dup2", "c"]


def test_datamodule_logs_the_duplicate_id_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = jsonl(tmp_path / "d.jsonl", [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])
    with caplog.at_level(logging.WARNING):
        AnatomyVQADataModule(train_file=str(path), check_images=False)._load(str(path), None)
    assert "duplicate id x1" in caplog.text and "kept as uid 'a#dup1'" in caplog.text


def test_uid_follows_a_new_id_but_not_other_changes():
    q = Question(id="a", question="Q?", options=["x", "y"], answer_index=0, uid="a#dup1")
    assert Question(id="a", question="Q?", options=["x", "y"], answer_index=0).uid == "a"
    assert q.replace(question="Other?").uid == "a#dup1"  # same question, reworded: same budget
    assert q.replace(id="a#aug1").uid == "a#aug1"  # a rewrite is a question of its own


# -- line endings and wrapping objects ---------------------------------------------------------


@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_jsonl_with_any_line_ending(tmp_path: Path, newline: str):
    records = [GOOD, {**GOOD, "answer": "Spleen"}, {**GOOD, "id": "last"}]
    path = jsonl(tmp_path / "e.jsonl", records, newline)
    report = load_questions(path, on_bad_record="skip", check_images=False)
    assert [q.id for q in report.questions] == ["e:1", "last"] and report.skipped == 1
    assert report.examples[0].startswith('line 2, field "answer"')  # lines counted as the user sees them


def test_cr_only_pretty_json_list(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_bytes(json.dumps([GOOD, GOOD], indent=2).replace("\n", "\r").encode())
    assert len(load_questions(path, check_images=False).questions) == 2


@pytest.mark.parametrize("key", ["train", "rows", "vqa_items"])
def test_object_wrapping_one_list_under_any_key(tmp_path: Path, key: str):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"version": 2, "name": "mine", key: [GOOD, {**GOOD, "id": "q2"}]}, indent=1))
    report = load_questions(path, check_images=False)
    assert [q.id for q in report.questions] == ["w:0", "q2"] and report.records == 2


def test_object_with_several_lists_is_refused_saying_what_was_found(tmp_path: Path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"train": [GOOD, GOOD], "val": [GOOD]}))
    with pytest.raises(DataError) as err:
        load_questions(path, check_images=False)
    assert str(err.value) == (f"{path}: the top level is an object with several lists of records: 'train' (2 objects), "
                              "'val' (1 objects); keep one list per file (e.g. one file per split) or make the file "
                              "a JSON list")


def test_a_lone_record_is_still_a_record_and_no_object_says_what_it_found(tmp_path: Path):
    lone = tmp_path / "one.json"
    lone.write_text(json.dumps({**GOOD, "images": [{"image_path": "a.png"}, {"image_path": "b.png"}]}, indent=2))
    assert load_questions(lone, check_images=False).questions[0].images == [str(tmp_path / "a.png"),
                                                                            str(tmp_path / "b.png")]
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps([["a", "b"], ["c"]]))
    with pytest.raises(DataError, match=r"no record is a JSON object \(found a list\)"):
        load_questions(lists, check_images=False)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"foo": 1, "bar": 2}) + "\n")
    with pytest.raises(DataError, match=r"record keys \['bar', 'foo'\].*data.fields"):
        load_questions(unknown, check_images=False)


# -- images before fit -------------------------------------------------------------------------


def _image_set(tmp_path: Path) -> Path:
    Image.new("RGB", (4, 3)).save(tmp_path / "ok.png")
    (tmp_path / "frames").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    names = ["ok.png", "frames", "empty.png", "junk.jpg", "gone.png"]
    records = [{**GOOD, "id": f"q{i}", "images": ["ok.png", n]} for i, n in enumerate(names)]
    return jsonl(tmp_path / "imgs.jsonl", records)


def test_probe_tells_folder_empty_undecodable_and_missing_apart(tmp_path: Path):
    _image_set(tmp_path)
    names = ["ok.png", "frames", "empty.png", "junk.jpg", "gone.png", "ok.png"]
    issues = probe_images(str(tmp_path / n) for n in names)
    assert {Path(p).name: i.kind for p, i in issues.items()} == {
        "frames": FOLDER, "empty.png": ZERO_SIZE, "junk.jpg": UNDECODABLE, "gone.png": MISSING_IMAGE}


def test_loader_does_not_call_a_folder_missing(tmp_path: Path):
    report = load_questions(_image_set(tmp_path))
    assert report.missing_images == [str(tmp_path / "gone.png")]


def test_preflight_before_fit_names_every_bad_image_with_its_record(tmp_path: Path):
    path = _image_set(tmp_path)
    with pytest.raises(DataError) as err:
        AnatomyVQADataModule(train_file=str(path), val_fraction=0.0)._load(str(path), None)
    lines = str(err.value).splitlines()
    assert lines[0] == (f"{path}: 1 image paths are folders, 1 image files are empty (0 bytes), "
                        "1 image files cannot be decoded, 1 image files are missing")
    assert f"  line 2 (id 'q1'): image {tmp_path / 'frames'} is a folder, not an image file" in lines
    assert f"  line 3 (id 'q2'): image {tmp_path / 'empty.png'} is an empty file (0 bytes)" in lines
    assert any(line.startswith(f"  line 4 (id 'q3'): image {tmp_path / 'junk.jpg'} not a readable image")
               for line in lines)
    assert f"  line 5 (id 'q4'): image {tmp_path / 'gone.png'} image file not found" in lines
    assert "data.image_root" in lines[-1]
