"""What a user sees for bad input: one table, one row per mistake, each with the message it must give.

Data errors must name the file, the record and the field; image errors the image file; CLI errors
the flag or key, in one `error:` line with exit status 2 and no traceback. Unusual but valid image
modes must load as RGB. The detailed behaviour lives in tests/data/ and tests/models/; this table
is the user-facing contract.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anatomy_lightning.cli import main
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.images import load_image
from anatomy_lightning.data.loader import load_questions
from anatomy_lightning.data.schema import DataError
from anatomy_lightning.models.loading import check_quantization_supported

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
GOOD = {"id": "q0", "question": "Which organ is left of the hook?", "options": ["Liver", "Gut", "Omentum"],
        "answer": "A"}


def _jsonl(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(**change: Any) -> dict[str, Any]:
    return {**GOOD, "id": "q1", **change}


def _load(path: Path, **kwargs: Any) -> None:
    load_questions(path, **kwargs)


def _setup(train_file: Path, **kwargs: Any) -> None:
    """What `fit` does with data.train_file first (images are checked here, before any model work)."""
    AnatomyVQADataModule(train_file=str(train_file), val_fraction=0.0, **kwargs)._load(str(train_file), kwargs.get("image_root"))


def _cli(*args: str) -> Callable[[pytest.CaptureFixture[str]], str]:
    def run(capsys: pytest.CaptureFixture[str]) -> str:
        with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["anatomy_lightning"])  # as if typed: pytest's own flags are not ours
            main(["fit", "--config", str(DEMO), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert "Traceback" not in err
        return err

    return run


# -- the cases: (id, build(tmp) -> action, expected message parts) -------------------------------
# An action raises DataError (data, images) or is a CLI run returning stderr; `{file}` in the
# expectations is the bad file's path. `None` expected = must succeed.


def invalid_json(tmp: Path) -> Callable[[], Any]:
    path = tmp / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"question": "Which?", "options": ["a", "b"] "answer": "A"}\n')
    return lambda: _load(path)


def truncated_file(tmp: Path) -> Callable[[], Any]:
    path = tmp / "train.json"
    path.write_text(json.dumps([GOOD, _record()], indent=1)[:-30])
    return lambda: _load(path)


def options_not_a_list(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(options="Liver, Gut"))
    return lambda: _load(path)


def question_not_text(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(question=42))
    return lambda: _load(path)


def empty_option_text(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(options=["Liver", "  ", "Gut"]))
    return lambda: _load(path)


def answer_not_among_options(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(answer="Spleen"))
    return lambda: _load(path)


def duplicate_options(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(options=["Liver", "liver ", "Gut"], answer="A"))
    return lambda: _load(path)


def missing_answer(tmp: Path) -> Callable[[], Any]:
    rec = _record()
    del rec["answer"]
    path = _jsonl(tmp / "train.jsonl", GOOD, rec)
    return lambda: _load(path)


def non_utf8_bytes(tmp: Path) -> Callable[[], Any]:
    path = tmp / "train.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + '{"question": "Caf\xe9?"}\n'.encode("latin-1"))
    return lambda: _load(path)


def seven_options(tmp: Path) -> Callable[[], Any]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(options=[f"organ {i}" for i in range(7)]))
    return lambda: _load(path)


def corrupt_image(tmp: Path) -> Callable[[], Any]:
    path = tmp / "frame.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return lambda: load_image(path)


def missing_image(tmp: Path) -> Callable[[], Any]:
    (tmp / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp / "images" / "a.png")
    path = _jsonl(tmp / "train.jsonl", {**GOOD, "image": "a.png"}, _record(image="b.png"))
    return lambda: _setup(path, image_root=str(tmp / "images"))


def image_escapes_root(tmp: Path) -> Callable[[], Any]:
    (tmp / "images").mkdir()
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(image="../../etc/passwd"))
    return lambda: _load(path, image_root=tmp / "images")


def _image(tmp: Path, img: Image.Image, name: str) -> Callable[[], Any]:
    path = tmp / name
    img.save(path)

    def load() -> None:
        out = load_image(path)
        assert out.mode == "RGB" and out.size == img.size

    return load


def cmyk_jpeg(tmp: Path) -> Callable[[], Any]:
    return _image(tmp, Image.new("CMYK", (6, 4), (10, 20, 30, 0)), "cmyk.jpg")


def sixteen_bit_png(tmp: Path) -> Callable[[], Any]:
    return _image(tmp, Image.fromarray(np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000), "xray.png")


def grayscale_png(tmp: Path) -> Callable[[], Any]:
    return _image(tmp, Image.new("L", (6, 4), 90), "grey.png")


def rgba_png(tmp: Path) -> Callable[[], Any]:
    return _image(tmp, Image.new("RGBA", (6, 4), (255, 0, 0, 128)), "rgba.png")


def unknown_config_key(tmp: Path) -> Callable[..., str]:
    bad = tmp / "bad.yaml"
    bad.write_text("model:\n  num_generation: 4\n")
    return _cli("--config", str(bad))


def model_folder_missing(tmp: Path) -> Callable[..., str]:
    return _cli(f"--model.model={tmp / 'no-such-model'}")


def quantization_value(tmp: Path) -> Callable[..., str]:
    return _cli("--model.quantization=3bit")


def four_bit_unsupported(tmp: Path) -> Callable[..., str]:
    # bitsandbytes may well run 4-bit on this CPU, so make it unusable the way a machine without a
    # working build is: the import fails (the probe's error path is the same for a failing kernel)
    run = _cli("--model.quantization=4bit")

    def without_bitsandbytes(capsys: pytest.CaptureFixture[str]) -> str:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "bitsandbytes", None)
            check_quantization_supported.cache_clear()
            try:
                return run(capsys)
            finally:
                check_quantization_supported.cache_clear()

    return without_bitsandbytes


def bad_record_through_fit(tmp: Path) -> Callable[..., str]:
    path = _jsonl(tmp / "train.jsonl", GOOD, _record(answer="Spleen"))
    return _cli("--data.synthetic=null", f"--data.train_file={path}", "--trainer.logger=false")


@dataclass
class Case:
    build: Callable[[Path], Callable[..., Any]]
    expect: tuple[str, ...] | None  # regexes; None = must load fine


CASES = {
    "invalid JSON": Case(invalid_json, ("^{file}: 1 of 2 records", r"line 2: invalid JSON at column \d+")),
    "truncated file": Case(truncated_file, (r"^{file}: the file ends before the JSON is complete \(truncated",)),
    "wrong field type (options)": Case(options_not_a_list, ("^{file}: ", r'line 2, field "options": expected a list')),
    "wrong field type (question)": Case(question_not_text, ("^{file}: ", r'line 2, field "question": expected text')),
    "empty option text": Case(empty_option_text, ("^{file}: ", r'line 2, field "options": option B is empty')),
    "answer not among options": Case(answer_not_among_options, ("^{file}: ", r'line 2, field "answer": \'Spleen\'')),
    "duplicate options": Case(duplicate_options, ("^{file}: ", r'line 2, field "options": options A and B are the same')),
    "missing field": Case(missing_answer, ("^{file}: ", r'line 2, field "answer": is missing')),
    "non-UTF-8 bytes": Case(non_utf8_bytes, (r"^{file}: not UTF-8 text: byte 0xe9 at byte offset \d+ \(line 2\)",)),
    "more than 6 options": Case(seven_options, ("^{file}: ", r'line 2, field "options": has 7 options; at most 6')),
    "corrupt image": Case(corrupt_image, (r"^{file}: cannot read the image .*corrupt or not an image",)),
    "missing image": Case(missing_image, ("^{file}: 1 image files are missing", r"line 2 \(id 'q1'\): image .*b\.png")),
    "image path escapes image_root": Case(
        image_escapes_root, ("^{file}: ", r"line 2, field \"image\": '../../etc/passwd' points outside image_root")
    ),
    "CMYK image": Case(cmyk_jpeg, None),
    "16-bit image": Case(sixteen_bit_png, None),
    "greyscale image": Case(grayscale_png, None),
    "RGBA image": Case(rgba_png, None),
    "unknown config key": Case(unknown_config_key, (r"num_generation", r"did you mean model\.num_generations")),
    "model folder missing": Case(model_folder_missing, (r"^error: model folder '.*no-such-model' does not exist",)),
    "unsupported quantization value": Case(  # named with the valid choices by the up-front settings check
        quantization_value, (r"^error: .*model\.quantization = '3bit': must be one of \['4bit', '8bit'\], or null",)),
    "4-bit where bitsandbytes cannot run": Case(
        four_bit_unsupported, (r"^error: bitsandbytes cannot run 4bit quantisation on '(cpu|cuda)'", "quantization: null")
    ),
    "bad record through fit": Case(
        bad_record_through_fit, (r"^error: {file}: 1 of 2 records are unusable", r'line 2, field "answer"')
    ),
}

_FILES = {"corrupt image": "frame.png", "truncated file": "train.json"}  # else train.jsonl


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_a_clear_message(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI cases write the demo's relative output folders here
    case = CASES[name]
    action = case.build(tmp_path)
    if case.expect is None:
        action()
        return
    if action.__code__.co_argcount:  # a CLI run: its stderr is the message
        message = action(capsys)
        error_lines = [line for line in message.splitlines() if line.startswith("error:")]
        if name != "unknown config key":  # jsonargparse's usage + error, the rest are ours: exactly one line
            assert len(error_lines) == 1, message
    else:
        with pytest.raises(DataError) as err:
            action()
        message = str(err.value)
    bad_file = tmp_path / _FILES.get(name, "train.jsonl")
    for pattern in case.expect:
        pattern = pattern.replace("{file}", re.escape(str(bad_file)))
        assert re.search(pattern, message, re.MULTILINE), f"{pattern!r} not in:\n{message}"
    print(f"--- {name}\n{message}")  # pytest -s shows every message of the table
