"""`python -m anatomy_lightning.inspect_data`: one JSON object on success, one stderr line and exit 2 otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anatomy_lightning.inspect_data", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def r1_file(tmp_path: Path) -> Path:
    rows = [
        {"image": "a.png", "problem": "What organ? A)Liver, B)Spleen, C)Kidney, D)Lung",
         "solution": "<answer> A </answer>"},
        {"image": "b.png", "problem": "What organ? A)Liver, B)Spleen", "solution": "B"},
        {"image": "a.png", "problem": "What organ? A)Liver, B)Heart", "solution": "A"},
        {"image": "c.png", "problem": "What organ? A)Liver, B)Spleen", "solution": "E"},
    ]
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "small.json"
    path.write_text(json.dumps(rows))
    return path


def test_summary_of_a_small_file(tmp_path: Path):
    proc = run(r1_file(tmp_path), "--no-similarity")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["format"], out["records"], out["questions"], out["skipped"]) == ("r1", 4, 3, 1)
    assert out["problems"]["answer not among options"]["count"] == 1
    assert out["problems"]["answer not among options"]["examples"][0].startswith('record 3, field "solution"')
    assert out["options_per_question"] == {"2": 2, "4": 1}
    assert out["answers"] == {"Liver": 2, "Spleen": 1}
    assert out["missing_images"] == {"count": 1, "first": [str(tmp_path / "b.png")]}
    assert out["similarity"] is None and out["stage_counts"] is None and out["seconds"] >= 0


def test_error_mode_and_unusable_files_exit_2_with_one_line(tmp_path: Path):
    proc = run(r1_file(tmp_path), "--no-similarity", "--on-bad-record", "error")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "1 of 4 records are unusable" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": ')
    proc = run(bad, "--no-similarity")
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tmp_path / "absent.json", "--no-similarity")
    assert proc.returncode == 2 and "file not found" in proc.stderr and proc.stderr.count("\n") == 1


def test_image_root_and_format_flags(tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "VID01").mkdir(parents=True)
    (root / "VID01" / "1.png").write_bytes(b"")
    rec = {"question": "Q?", "options": ["a", "b"], "answer": "a", "image": "/CholecT45/data/VID01/1.png"}
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    out = json.loads(run(path, "--no-similarity", "--image-root", root, "--format", "generic").stdout)
    assert out["format"] == "generic" and out["missing_images"]["count"] == 0


def test_similarity_and_stages(tmp_path: Path):
    pytest.importorskip("sentence_transformers")
    similarity = pytest.importorskip("anatomy_lightning.data.similarity")
    try:
        similarity.default_encoder_path()
    except ValueError:
        pytest.skip("no offline sentence encoder installed")
    rows = [{"question": f"Q{i}?", "options": opts, "answer": "A"} for i, opts in enumerate(
        [["Liver", "Gut"], ["Cystic Duct", "Cystic Artery"], ["Omentum", "Gallbladder", "Liver"], ["Gut", "Stomach"]])]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows))
    proc = run(path, "--stages", "2", "--no-check-images")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert -1 <= out["similarity"]["min"] <= out["similarity"]["mean"] <= out["similarity"]["max"] <= 1
    assert sum(out["stage_counts"].values()) == 4 and set(out["stage_counts"]) == {"0", "1"}


@pytest.mark.parametrize("name", ["sgg_vqa_anatomy_r1.json", "omnimedvqa_anatomy_identification_test_medr1.json"])
def test_shared_files(shared_data: Path, name: str):
    proc = run(shared_data / name, "--no-similarity")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["skipped"] == 0 and out["problems"] == {}
    if name.startswith("sgg"):
        assert out["records"] == 1000 and out["options_per_question"] == {"4": 1000} and len(out["answers"]) == 6
    else:
        assert out["records"] == 3329 and out["options_per_question"] == {"2": 85, "4": 3244}


# -- in-process: the report when nothing loads, --summary, --plot, --field, images ---------------


def main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    from anatomy_lightning.inspect_data import main as inspect_main

    code = inspect_main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_nothing_usable_still_shows_every_reason_per_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = [{"question": "Q?", "options": [{"letter": "A", "content": "x"}, {"letter": "B", "content": "y"}],
             "answer": "A"}] * 3 + [{"question": "Q?", "options": ["x", "y"], "answer": "Z"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    code, out, err = main(capsys, path, "--no-similarity")
    assert code == 2 and err.count("\n") == 1 and "4 of 4 records are unusable" in err
    report = json.loads(out)
    assert (report["questions"], report["skipped"]) == (0, 4)
    wrong = report["problems"]["wrong field type"]
    assert wrong["count"] == 3 and wrong["fields"] == {"options[0]": 3}
    assert wrong["examples"][0].startswith('record 0, field "options[0]": expected option text, got an object')
    assert report["problems"]["answer not among options"]["fields"] == {"answer": 1}


def test_summary_is_a_table_and_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    plot = tmp_path / "out.png"
    code, out, _ = main(capsys, r1_file(tmp_path), "--no-similarity", "--summary", "--plot", plot)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "file format   r1" and lines[1] == "records       4  (questions 3, skipped 1)"
    assert "  answer not among options  x1" in lines and "    fields: solution x1" in lines
    assert lines[lines.index("answers (top 2 of 2):") + 1].split() == ["Liver", "2"]
    assert "  zero size  x1" in lines and "  missing    x1" in lines  # a.png is empty, b.png absent
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(plot) as img:
        assert img.size[0] > 2 * img.size[1]  # three panels side by side


def test_field_flag_and_image_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "frames").mkdir()
    path = tmp_path / "m.jsonl"
    rec = {"q": "Which?", "opts": ["Liver", "Gut"], "gold": "Gut", "img": "frames"}
    path.write_text(json.dumps({**rec, "img": []}) + "\n" + json.dumps(rec) + "\n")
    code, out, err = main(capsys, path, "--no-similarity", "--field", "question=q", "--field", "options=opts",
                          "--field", "answer=gold", "--field", "images=img")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "generic" and report["answers"] == {"Gut": 2}
    assert report["missing_images"]["count"] == 0  # a folder is not "missing"
    assert report["image_problems"]["folder"]["examples"] == [
        f"line 2 (id 'm:2'): image {tmp_path / 'frames'} is a folder, not an image file"]
    with pytest.raises(SystemExit):
        main(capsys, path, "--field", "question")


@pytest.mark.parametrize("name, fmt, records, missing", [
    ("easyr1_omnimed_isic_test.jsonl", "easyr1", 551, 551),
    ("medxpertqa_mm_input.jsonl", "medxpertqa", 2000, 2852),  # 1-6 images per question
    ("medvlm_r1_MRI_CT_XRAY_300each_dataset.json", "medvlm_r1", 900, 900),
])
def test_more_shared_files(shared_data: Path, capsys: pytest.CaptureFixture[str], name: str, fmt: str, records: int,
                           missing: int):
    path = shared_data / "more" / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    code, out, err = main(capsys, path, "--no-similarity")
    assert code == 0, err
    report = json.loads(out)
    assert (report["format"], report["records"], report["questions"], report["skipped"]) == (fmt, records, records, 0)
    assert report["problems"] == {} and report["warnings"] == {}
    assert report["image_problems"]["missing"]["count"] == missing == report["missing_images"]["count"]
