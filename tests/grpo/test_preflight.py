"""The prompt pre-flight (issue 24): every prompt measured with the model's processor before the
model loads; images the processor refuses and prompts over the limit are named, with counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from anatomy_lightning.cli import main
from anatomy_lightning.data.schema import DataError, Question
from anatomy_lightning.grpo.preflight import check_prompts, load_processor, measure_prompts
from anatomy_lightning.grpo.prompts import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, encode_prompts

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
SIZES = [(224, 224), (640, 480), (30, 2000), (3000, 10), (12, 12)]  # (width, height); 3000x10: ratio 300 > 200

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _questions(folder: Path, sizes: list[tuple[int, int]]) -> list[Question]:
    out = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.new("RGB", (w, h), (40 * i % 255, 90, 10)).save(path)
        out.append(Question(id=f"q{i}", question="Which structure is shown? " * (i + 1), images=[str(path)] * (1 + i % 2),
                            options=["liver", "gallbladder", "cystic duct"], answer_index=0, metadata={"record": i + 1}))
    out.append(Question(id="text", question="no image", options=["a", "b"], answer_index=1, metadata={"record": 99}))
    return out


def test_lengths_equal_the_real_encoding_and_refusals_are_named(tmp_path: Path) -> None:
    processor, family, _ = load_processor("tiny-qwen2.5-vl", None, None)
    questions = _questions(tmp_path, SIZES)
    report = measure_prompts(questions, processor, family, DEFAULT_SYSTEM_PROMPT, DEFAULT_PROMPT_TEMPLATE)
    assert set(report.refused) == {"q3"} and "aspect ratio" in report.refused["q3"]
    for q in questions:
        if q.uid in report.tokens:
            encoded = encode_prompts([q], processor, lambda p: Image.open(p).convert("RGB"), family=family)
            assert report.tokens[q.uid] == encoded["input_ids"].shape[1], q.uid
    with pytest.raises(DataError, match=r"refuses the images of 1 of 6 questions.*\n  record 4 \(id 'q3'\)"):
        check_prompts(questions, report, None, "limit", "raise", "fit")
    report.refused.clear()
    longest = max(report.tokens, key=report.tokens.get)
    limit = sorted(report.tokens.values())[-3]  # two prompts above it
    with pytest.raises(DataError, match=rf"2 of 6 prompts are longer than model.max_prompt_length={limit} tokens"):
        check_prompts(questions, report, limit, "model.max_prompt_length", "raise", "fit")
    dropped = check_prompts(questions, report, limit, "model.max_prompt_length", "delete", "fit")
    assert len(dropped) == 2 and longest in dropped


def _data_file(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (30 * i % 255, 60, 90)).save(folder / f"f{i}.png")
        rows.append({"id": f"r{i}", "question": "Which structure?", "options": ["liver", "gallbladder"],
                     "answer": "A", "images": [f"f{i}.png"]})
    path = folder / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fit_flags(folder: Path, data: Path) -> list[str]:
    return ["fit", "--config", str(DEMO), f"--data.train_file={data}", "--data.synthetic=null", "--data.val_fraction=0.25",
            "--curriculum.enabled=false", "--augmentation.enabled=false", "--trainer.max_steps=1",
            f"--trainer.default_root_dir={folder}", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false"]


@pytest.mark.parametrize(("sizes", "flags", "message"), [
    ([(56, 56)] * 6 + [(4000, 16)], [], "the processor refuses the images of 1 of 7 questions"),
    ([(56, 56)] * 3 + [(448, 448)] * 3 + [(56, 56)] * 2, ["--model.max_prompt_length=100"],
     "3 of 8 prompts are longer than model.max_prompt_length=100 tokens"),
])
def test_cli_refuses_before_the_model_loads(sizes, flags, message, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import anatomy_lightning.module as module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    monkeypatch.setattr(module, "load_policy", lambda *a, **k: pytest.fail("the model loaded before the pre-flight"))
    with pytest.raises(SystemExit) as stopped:
        main([*_fit_flags(tmp_path, _data_file(tmp_path, sizes)), *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    error = err[err.index("error: "):]  # the CLI's one error (exit 2), naming the records
    assert message in error and "\n  record " in error, err[-2000:]
