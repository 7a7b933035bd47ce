"""Rewriters keep the image and the gold option; stems from the real SGG-VQA files parse and invert."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from anatomy_lightning.augment.llm import LocalModelRewriter, validate_generated
from anatomy_lightning.augment.registry import REWRITERS, build_rewriter
from anatomy_lightning.augment.registry import Chain
from anatomy_lightning.augment.rules import AnswerForm, InvertRelation, ShuffleOptions, TemplateParaphrase
from anatomy_lightning.augment.stem import parse_stem
from anatomy_lightning.data.schema import Question

# stems as they appear in ../shared/data (SGG-VQA r1 / asc / gdqa) and in the synthetic scenes
REAL_STEMS = [
    "What anatomy is at the top-left of the frame ?",
    "What is the name of the anatomy that is within the gut thing and above the scissors object?",
    "There is a thing that is both below the top-right instrument and right of the brown liver anatomy?; "
    "what is its name?",
    "There is a red anatomy that is within the red top-left thing; what is it?",
    "What name is the top-mid object that is below the white top-mid gallbladder anatomy and horizontal the "
    "brown top-mid thing?",
    "What is the name of the top-mid thing above the bottom-left anatomy?",
    "What is the name of the anatomy that is retracted by the silver top-mid instrument?",
    "What is the brown top-left anatomy?",
    "There is a red bottom-mid anatomy, what is its name?",
    "What anatomy is at the top-left of the frame?",
    "What is the anatomy left of the gallbladder?",
    "What content appears in this image?",
]
OPTIONS = ["Liver", "Gut", "Gallbladder", "Omentum"]
ALL_REWRITERS = [
    TemplateParaphrase(num_variants=3),
    InvertRelation(num_variants=2),
    ShuffleOptions(num_variants=2),
    AnswerForm(num_variants=3),
    Chain(["template_paraphrase", "shuffle_options"], num_variants=2),
]


def _questions() -> list[Question]:
    return [
        Question(
            id=f"sgg-{i}",
            question=stem,
            options=list(OPTIONS),
            answer_index=i % len(OPTIONS),
            images=[f"/CholecT45/data/VID{i:02d}/000001.png"],
            metadata={"dataset": "sgg"},
            similarity=0.3 + i / 100,
            stage=i % 3,
        )
        for i, stem in enumerate(REAL_STEMS)
    ]


def _rewrite_all(seed: int) -> list[Question]:
    rng = random.Random(seed)
    return [r for q in _questions() for rewriter in ALL_REWRITERS for r in rewriter(q, rng)]


def test_every_rewriter_keeps_gold_image_stage_and_marks_the_rewrite():
    originals = {q.id: q for q in _questions()}
    rewrites = _rewrite_all(seed=0)
    by_rewriter = {r.metadata["rewriter"] for r in rewrites}
    assert by_rewriter == {"template_paraphrase", "invert_relation", "shuffle_options", "answer_form",
                           "template_paraphrase+shuffle_options"}
    for r in rewrites:
        orig = originals[r.metadata["augmented_from"]]
        assert r.answer_text == orig.answer_text
        assert sorted(r.options) == sorted(orig.options)
        assert (r.images, r.stage, r.similarity) == (orig.images, orig.stage, orig.similarity)
        assert r.metadata["augmented"] is True and r.metadata["dataset"] == "sgg"
        assert re.fullmatch(rf"{re.escape(orig.id)}#aug\d+-{re.escape(r.metadata['rewriter'])}", r.id)
        assert (r.question, r.options) != (orig.question, orig.options)
    assert "augmented" not in originals["sgg-0"].metadata  # the original is not touched


def test_rewrites_survive_the_generic_jsonl_round_trip(tmp_path: Path):
    loader = pytest.importorskip("anatomy_lightning.data.loader")
    rewrites = _rewrite_all(seed=1)
    path = tmp_path / "rewrites.jsonl"
    path.write_text("".join(json.dumps(r.to_record()) + "\n" for r in rewrites))
    loaded = loader.load_questions(str(path), format="generic", check_images=False).questions
    assert [q.id for q in loaded] == [r.id for r in rewrites]
    for back, r in zip(loaded, rewrites):
        assert back.answer_text == r.answer_text and back.answer_text in back.options
        assert back.options == r.options and back.question == r.question
        assert back.metadata["augmented_from"] == r.metadata["augmented_from"]


def test_rewriting_is_deterministic_under_a_seed():
    def snapshot(seed: int) -> list[tuple]:
        return [(r.id, r.question, tuple(r.options), r.answer_index) for r in _rewrite_all(seed)]

    assert snapshot(7) == snapshot(7)
    assert snapshot(7) != snapshot(8)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("What is the anatomy left of the gallbladder?", ["The gallbladder is to the right of which anatomy?"]),
        (
            "What is the name of the anatomy that is within the gut thing and above the scissors object?",
            [
                "The gut thing contains which anatomy, the one that is also above the scissors object?",
                "The scissors object is below which anatomy, the one that is also within the gut thing?",
            ],
        ),
        (
            "What is the name of the red thing left of the bottom-mid cystic_plate anatomy?",
            ["The bottom-mid cystic_plate anatomy is to the right of which red thing?"],
        ),
        (
            "There is a anatomy that is below the top-right hook object; what is it?",
            ["The top-right hook object is above which anatomy?"],
        ),
        (
            "What anatomy is at the top-left of the frame ?",
            [
                "The top-left of the frame shows which anatomy?",
                "Opposite the bottom-right of the frame, at the top-left, which anatomy is there?",
            ],
        ),
        ("What is the brown top-left anatomy?", []),  # an attribute, not a relation
        ("What content appears in this image?", []),
    ],
)
def test_invert_relation_on_real_style_stems(stem: str, expected: list[str]):
    assert InvertRelation().candidates(parse_stem(stem)) == expected
    q = Question("q", stem, list(OPTIONS), 2)
    assert sorted(r.question for r in InvertRelation(num_variants=5)(q, random.Random(0))) == sorted(expected)


def test_parse_stem_reads_kinds_and_slots():
    p = parse_stem("What is the name of the anatomy that is within the gut thing and above the scissors object?")
    assert p.kind == "relation" and p.target == "anatomy"
    assert [(c.relation, c.reference) for c in p.clauses] == [("within", "gut thing"), ("above", "scissors object")]
    p = parse_stem("There is a red top-mid thing that is on the right side of the grasper instrument?; what is it?")
    assert (p.kind, p.target, p.position) == ("relation", "red top-mid thing", "top-mid")
    assert [(c.relation, c.reference) for c in p.clauses] == [("right", "grasper instrument")]
    assert (parse_stem("What anatomy is at the bottom-mid of the frame ?").position) == "bottom-mid"
    assert parse_stem("What is the white top-mid anatomy?").kind == "attribute"
    assert parse_stem("What anatomy is at the None of the frame ?").kind == "unknown"


def test_real_sgg_stems_parse(shared_data: Path):
    stems = []
    for name in ("sgg_vqa_anatomy_r1.json", "sgg_vqa_anatomy_r1_asc.json", "sgg_vqa_anatomy_r1_gdqa.json"):
        for rec in json.loads((shared_data / name).read_text()):
            stems.append(re.search(r"Question:\n(.*?)\nAnatomy Options:", rec["instruction"], re.S)[1])
    kinds = [parse_stem(s).kind for s in stems]
    assert len(stems) == 3000
    assert kinds.count("unknown") / len(kinds) < 0.01  # measured: 3 of 3000 ("at the None of the frame")
    relations = [s for s, k in zip(stems, kinds) if k == "relation"]
    assert sum(bool(InvertRelation().candidates(parse_stem(s))) for s in relations) / len(relations) > 0.95


def test_template_paraphrase_rewords_known_and_unknown_stems():
    rng = random.Random(0)
    q = Question("q", "What anatomy is at the top-left of the frame ?", list(OPTIONS), 0)
    texts = [r.question for r in TemplateParaphrase(num_variants=10)(q, rng)]
    assert len(texts) == 5 and len(set(texts)) == 5
    assert all(t.endswith("?") and ("top-left" in t or "upper left" in t) for t in texts)
    unknown = Question("u", "What content appears in this image?", ["Liver tissue", "Breast tissue"], 1)
    texts = [r.question for r in TemplateParaphrase(num_variants=10)(unknown, rng)]
    assert "Which anatomy matches this description: what content appears in this image?" not in texts
    assert "Based on the image, what content appears in this image?" in texts
    anatomical = Question("a", "Which organ is shown?", ["Liver", "Gut"], 0)
    texts = [r.question for r in TemplateParaphrase(num_variants=10)(anatomical, rng)]
    assert "Which anatomy matches this description: which organ is shown?" in texts


def test_shuffle_options_changes_order_and_keeps_gold():
    q = Question("q", "What is the white anatomy?", list(OPTIONS), 2)
    rewrites = ShuffleOptions(num_variants=5)(q, random.Random(3))
    assert len({tuple(r.options) for r in rewrites}) == 5
    for r in rewrites:
        assert r.options != q.options and sorted(r.options) == sorted(q.options)
        assert r.answer_text == "Gallbladder" and r.question == q.question
    two = Question("t", "What is the white anatomy?", ["Liver", "Gut"], 0)
    [swapped] = ShuffleOptions(num_variants=3)(two, random.Random(0))
    assert (swapped.options, swapped.answer_index) == (["Gut", "Liver"], 1)
    six = Question("s", "Which?", list("UVWXYZ"), 5)
    assert all(r.answer_text == "Z" for r in ShuffleOptions(num_variants=4)(six, random.Random(0)))


def test_answer_form_restates_with_the_same_options():
    q = Question("q", "What anatomy is at the top-left of the frame ?", list(OPTIONS), 1)
    by_form = {r.metadata["answer_form"]: r.question for r in AnswerForm(num_variants=3)(q, random.Random(0))}
    assert by_form == {
        "text": "What anatomy is at the top-left of the frame? Answer with the text of the correct option, "
        "not its letter.",
        "which_of_following": "Which of the following is the anatomy at the top-left of the frame?",
        "fill_blank": "The anatomy at the top-left of the frame is ____. Which option fills the blank?",
    }
    with pytest.raises(ValueError, match="unknown forms \\['essay'\\]"):
        AnswerForm(forms=["essay"])


def test_registry_builds_from_names_and_mappings():
    assert set(REWRITERS) >= {"template_paraphrase", "invert_relation", "shuffle_options", "answer_form",
                              "local_model", "chain"}
    assert build_rewriter("shuffle_options").num_variants == 1
    assert build_rewriter({"name": "template_paraphrase", "num_variants": 4}).num_variants == 4
    chain = build_rewriter({"name": "chain", "steps": ["invert_relation", {"name": "shuffle_options"}]})
    assert chain.name == "invert_relation+shuffle_options"
    with pytest.raises(ValueError, match="unknown rewriter 'paraphrase'"):
        build_rewriter("paraphrase")
    with pytest.raises(ValueError, match="bad arguments for 'shuffle_options'"):
        build_rewriter({"name": "shuffle_options", "variants": 2})


def test_validate_generated_drops_what_loses_the_question_or_the_gold():
    q = Question("q", "What is the anatomy left of the gallbladder?", list(OPTIONS), 1)  # gold: Gut
    kept = validate_generated("Which anatomy lies to the left of the gallbladder?", q)
    assert kept is not None and kept.options == OPTIONS and kept.answer_text == "Gut"
    reordered = validate_generated(
        "Which anatomy lies to the left of the gallbladder?\nA. Omentum\nB. Gut\nC. Liver\nD. Gallbladder", q
    )
    assert reordered is not None and reordered.options == ["Omentum", "Gut", "Liver", "Gallbladder"]
    assert reordered.answer_index == 1
    assert validate_generated("Which anatomy lies to the left of the gallbladder", q) is None  # no '?'
    assert validate_generated("Which anatomy, the gut, is left of the gallbladder?", q) is None  # leaks gold
    assert validate_generated("Which anatomy is left of the gallbladder?\nA. Liver\nB. Spleen\nC. Gallbladder\n"
                              "D. Omentum", q) is None  # lost the gold option
    assert validate_generated("zq xv the wq rr pp?", q) is None  # gibberish
    stem = "\n Which anatomy lies to the left of the gallbladder?\n"
    rambling = validate_generated(stem + "A. Gut\nB. Liver\nC. Gallbladder\nD. Omentum\nQuestion: zz\nA. x", q)
    assert rambling is not None and rambling.options == ["Gut", "Liver", "Gallbladder", "Omentum"]
    assert rambling.answer_index == 0  # reading stops at the first line after the options
    assert validate_generated(stem + "B. Liver\nQuestion: zz", q) is None  # a partial option list
    assert validate_generated("What is the anatomy left of the gallbladder ?", q) is None  # unchanged


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A randomly initialised GPT-2-shaped LM with a word-level tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted({w for s in REAL_STEMS + list(OPTIONS) + [LocalModelRewriter.PROMPT]
                    for w in re.findall(r"\w+|[^\w\s]", s)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")
    config = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                        eos_token_id=2, pad_token_id=1, bos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_lm")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_local_model_rewriter_generates_and_drops_gibberish(tiny_lm: str):
    rewriter = build_rewriter({"name": "local_model", "model": tiny_lm, "num_candidates": 3, "max_new_tokens": 12})
    q = Question("q", "What is the anatomy left of the gallbladder?", list(OPTIONS), 1)
    first = rewriter.generate(q, random.Random(5))
    assert len(first) == 3 and all(isinstance(t, str) and t.strip() for t in first)
    assert rewriter.generate(q, random.Random(5)) == first  # seeded through rng
    # random weights give word salad: nothing passes validation, so no wrong rewrite gets through
    kept = rewriter(q, random.Random(5))
    assert all(validate_generated(t, q) is None for t in first) and kept == []


def test_local_model_rewriter_refuses_a_missing_folder(tmp_path: Path):
    q = Question("q", "What is the anatomy left of the gallbladder?", list(OPTIONS), 1)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LocalModelRewriter(str(tmp_path / "absent"))(q, random.Random(0))
