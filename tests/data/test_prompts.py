"""`data.prompt: dataset`: the record's own instruction is the prompt (the real Anatomy-R1, Med-R1,
EasyR1, MedXpertQA and MedVLM-R1 files); rewrites and records without one use the template."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoProcessor

from anatomy_lightning.augment.registry import REWRITERS
from anatomy_lightning.data.datamodule import AnatomyVQADataModule
from anatomy_lightning.data.prompts import NEUTRAL_EXAMPLE, dataset_prompt
from anatomy_lightning.data.schema import DataError
from anatomy_lightning.grpo.prompts import DEFAULT_SYSTEM_PROMPT, build_messages, encode_prompts
from tests.support.tiny_vqa import write_questions

# file, the record key holding its own prompt
REAL_FILES = [
    ("sgg_vqa_anatomy_r1.json", "instruction"),
    ("omnimedvqa_anatomy_identification_test_medr1.json", "problem"),
    ("more/easyr1_omnimed_isic_test.jsonl", "prompt"),
    ("more/medxpertqa_mm_input.jsonl", "question"),
    ("more/medvlm_r1_MRI_CT_XRAY_300each_dataset.json", "problem"),
]


def _load(path: Path, prompt: str = "dataset"):
    dm = AnatomyVQADataModule(train_file=str(path), prompt=prompt, check_images=False, on_bad_record="skip")
    return dm._load(str(path), None)


def _user_text(q) -> tuple[str | None, str]:
    messages = build_messages(q, DEFAULT_SYSTEM_PROMPT, "{question}\n{options}")
    system = next((m["content"][0]["text"] for m in messages if m["role"] == "system"), None)
    user = messages[-1]["content"]
    assert [c["type"] for c in user] == ["image"] * len(q.images) + ["text"]  # every image, then the text
    return system, user[-1]["text"]


@pytest.mark.parametrize("name, key", REAL_FILES)
def test_dataset_prompt_is_the_records_own_instruction(shared_data: Path, name: str, key: str) -> None:
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    questions = _load(path)[:50]
    for q in questions:
        system, text = _user_text(q)
        assert system is None  # no system turn of ours: the chat template's default, as the paper's setup
        assert q.question in text and all(o.split()[0] in text for o in q.options)
        assert "<answer> A </answer>" not in text and "<image>" not in text
    q = questions[0]
    own = q.metadata["prompt"]
    if key == "prompt":  # EasyR1: the literal answer example is replaced by a letter-free instruction
        assert own.rstrip().endswith("</answer>") and text_of(q).endswith(NEUTRAL_EXAMPLE)
        assert text_of(q).startswith(own[: own.rindex("<answer>")].strip())
    else:
        assert text_of(q) == own.strip()
    # the curriculum and the rewards still see the parsed question: a bare stem, options apart
    assert not q.question.lower().startswith("question") and q.options[q.answer_index] == q.answer_text
    template_q = _load(path, "template")[0]
    assert _user_text(template_q) == (DEFAULT_SYSTEM_PROMPT, f"{q.question}\n{q.options_block()}")


def text_of(q) -> str:
    return _user_text(q)[1]


def test_rewrites_fall_back_to_the_template(tmp_path: Path) -> None:
    path = tmp_path / "r1.jsonl"
    path.write_text('{"problem": "Which organ is shown? A) Liver, B) Gut, C) Omentum", "solution": "B", '
                    '"id": "x"}\n')
    q = _load(path)[0]
    assert dataset_prompt(q) == "Which organ is shown? A) Liver, B) Gut, C) Omentum"
    rng = random.Random(0)
    rewrites = [r for name in ("template_paraphrase", "shuffle_options", "answer_form")
                for r in REWRITERS[name]()(q, rng)]
    rewrites.append(q.replace(question="Which organ do you see?"))  # same uid, another stem (a model rewrite)
    assert rewrites
    for r in rewrites:
        system, text = _user_text(r)
        assert dataset_prompt(r) is None and system == DEFAULT_SYSTEM_PROMPT and r.question in text


def test_dataset_prompt_reaches_the_model_and_needs_a_format_that_has_one(standin, tmp_path: Path) -> None:
    path = tmp_path / "sgg.json"
    instruction = ("You are a surgeon. Answer in <answer> </answer>.\nQuestion:\nWhich anatomy is left?\n"
                   "Anatomy Options:\nA. Liver\nB. Gut")
    path.write_text(f'[{{"instruction": {instruction!r}, "solution": "B", "images": []}}]'.replace("'", '"'))
    q = _load(path)[0]
    processor = AutoProcessor.from_pretrained(standin("qwen2.5-vl"))
    ids = encode_prompts([q], processor, lambda p: None, DEFAULT_SYSTEM_PROMPT, "{question}")["input_ids"][0]
    shown = processor.tokenizer.decode(ids)
    assert instruction in shown and DEFAULT_SYSTEM_PROMPT not in shown
    generic = write_questions(tmp_path / "g", 2, images=(1,))
    with pytest.raises(DataError, match=r"data\.prompt: dataset.*no prompt of its own.*data\.prompt: template"):
        _load(generic)
    with pytest.raises(ValueError, match="data.prompt"):
        AnatomyVQADataModule(train_file=str(generic), prompt="own")
