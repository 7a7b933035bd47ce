"""Answer parsing, the built-in rewards, user rewards by import path, and the weighted sum."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from anatomy_lightning.data.schema import Question
from anatomy_lightning.grpo.advantages import group_advantages
from anatomy_lightning.grpo.rewards import (
    REWARD_FUNCTIONS,
    RewardComputer,
    RewardFunctionError,
    accuracy_reward,
    extract_choice,
    format_reward,
    option_text_reward,
    resolve_reward_function,
    reward_metrics,
    soft_overlong_reward,
)

# tests/grpo/ is one level deeper than tests/: the repo root is parents[2], data sits beside it.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
OPTIONS = ["Gallbladder", "Gut", "Liver", "Omentum"]  # gold: C. Liver
QUESTION = Question(id="q1", question="Which organ?", options=OPTIONS, answer_index=2)


# User reward functions, resolved by import path in the tests below.
def length_penalty(completions: list[str], questions: list[Question], **kwargs) -> list[float]:
    return [-len(c) / 100 for c in completions]


def not_applicable_first(completions: list[str], questions: list[Question], **kwargs) -> list:
    return [None] + [1.0] * (len(completions) - 1)


def nan_second(completions: list[str], questions: list[Question], **kwargs) -> list[float]:
    return [0.0, math.nan] + [0.0] * (len(completions) - 2)


def text_reward(completions: list[str], questions: list[Question], **kwargs) -> list:
    return ["good"] * len(completions)


def raising_reward(completions: list[str], questions: list[Question], **kwargs) -> list:
    return [1.0 / (len(c) - len(c)) for c in completions]  # ZeroDivisionError


def multiline_error_reward(completions: list[str], questions: list[Question], **kwargs) -> list:
    raise ValueError("no gold answer for record q1\n  second line of detail")


def scores_odd_rows(completions: list[str], questions: list[Question], **kwargs) -> list:
    return [None if i % 2 == 0 else 1.0 for i in range(len(completions))]


def huge_reward(completions: list[str], questions: list[Question], **kwargs) -> list[float]:
    return [3e38] * len(completions)


def tensor_reward(completions: list[str], questions: list[Question], **kwargs) -> torch.Tensor:
    return torch.arange(len(completions), dtype=torch.float64) / 2


NOT_CALLABLE = 3


def _answer(text: str) -> str:
    return f"<think>the liver is the large organ</think> <answer>{text}</answer>"


# (answer content, expected index); options A Gallbladder, B Gut, C Liver, D Omentum
PARSE_TABLE = [
    ("C", 2),
    ("C.", 2),
    ("(C)", 2),
    ("[C]", 2),
    ("C)", 2),
    ("c", 2),
    (" C ", 2),
    ("C. Liver", 2),
    ("C) Liver", 2),
    ("C Liver", 2),
    ("(C) liver.", 2),
    ("Liver", 2),
    ("liver", 2),
    ("The liver", 2),
    ("Answer: C", 2),
    ("The answer is (C).", 2),
    ("Option C", 2),
    ("c) liver", 2),
    ("B", 1),
    ("Omentum", 3),
    ("C. Gut", None),  # letter and text disagree: a contradiction is wrong
    ("A. Liver", None),
    ("E", None),  # letter outside the four options
    ("F. Liver", None),
    ("A, C", None),  # two answers
    ("Liver or Gut", None),
    ("Spleen", None),
    ("", None),
    ("I am not sure", None),
]


@pytest.mark.parametrize(("content", "expected"), PARSE_TABLE)
def test_extract_choice_table(content: str, expected: int | None) -> None:
    assert extract_choice(_answer(content), OPTIONS) == expected
    reward = accuracy_reward([_answer(content)], [QUESTION])
    assert reward == [1.0 if expected == 2 else 0.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>A or C</think><answer>A</answer> wait <answer>C</answer>", 2),  # the last one
        ("The answer is C.", None),  # no tag
        ("<answer>C", None),  # unclosed tag
        ("<ANSWER>\n  C \n</ANSWER>", 2),
        ("<think>x</think><answer>Liver tissue</answer>", 2),  # option phrase inside longer text
    ],
)
def test_extract_choice_tags(completion: str, expected: int | None) -> None:
    assert extract_choice(completion, OPTIONS) == expected


def test_extract_choice_prefers_the_longest_option_named() -> None:
    options = ["Liver", "Liver tissue", "Gut"]
    assert extract_choice("<answer>Liver tissue</answer>", options) == 1
    assert extract_choice("<answer>liver</answer>", options) == 0
    assert extract_choice("<answer>B. Liver tissue</answer>", options) == 1


def test_extract_choice_does_not_read_a_word_initial_as_a_letter() -> None:
    # "Bone tissue" starts with B, "Cystic duct" with C: both must be read as text.
    options = ["Cystic artery", "Bone tissue", "Cystic duct"]
    assert extract_choice("<answer>Bone tissue</answer>", options) == 1
    assert extract_choice("<answer>Cystic duct</answer>", options) == 2
    assert extract_choice("<answer>cystic</answer>", options) is None


def test_accuracy_reward_batch_repeats_questions_per_group() -> None:
    other = Question(id="q2", question="?", options=["Yes", "No"], answer_index=1)
    completions = [_answer("C"), _answer("Gut"), _answer("B"), _answer("C")]
    # q2 has two options: B = No is right, C is out of range
    assert accuracy_reward(completions, [QUESTION, QUESTION, other, other]) == [1.0, 0.0, 1.0, 0.0]


def test_option_text_reward_scores_the_name_not_the_letter() -> None:
    completions = [
        _answer("Liver"),  # gold by name
        _answer("the liver"),  # article and case do not matter
        _answer("Answer: Liver"),  # lead-in dropped as in accuracy
        _answer("C"),  # gold letter: the shortcut this reward closes
        _answer("C. Liver"),  # the name is there, the letter is ignored
        _answer("C. Gut"),  # ...so this names Gut, not the gold letter's Liver
        _answer("Gut"),  # another option
        "<think>x</think> Liver",  # no answer tag
        _answer(""),
    ]
    assert option_text_reward(completions, [QUESTION] * len(completions)) == [1, 1, 1, 0, 1, 0, 0, 0, 0]
    assert accuracy_reward(completions[3:5], [QUESTION] * 2) == [1.0, 1.0]  # the lenient one accepts letters
    assert resolve_reward_function("option_text") is option_text_reward


FORMAT_TABLE = [
    ("<think>reasoning</think><answer>C</answer>", 1.0),
    ("<think>reasoning</think> <answer>C</answer>", 1.0),
    ("  <think>\nline 1\nline 2\n</think>\n\n<answer> C. Liver </answer>\n  ", 1.0),
    ("<think></think><answer>C</answer>", 1.0),  # empty thinking is still well formed
    ("<answer>C</answer>", 0.0),  # no think
    ("<think>reasoning</think>", 0.0),  # no answer
    ("<answer>C</answer><think>reasoning</think>", 0.0),  # wrong order
    ("<think>reasoning</think><answer>C</answer> because", 0.0),  # text after </answer>
    ("Sure! <think>reasoning</think><answer>C</answer>", 0.0),  # text before <think>
    ("<think>a</think><answer>C</answer><answer>C</answer>", 0.0),  # two answers
    ("<think>a <think> b</think><answer>C</answer>", 0.0),  # nested think
    ("<think>reasoning</think> text <answer>C</answer>", 0.0),  # text between the blocks
    ("<think>reasoning<answer>C</answer>", 0.0),  # unclosed think
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_TABLE)
def test_format_reward_table(completion: str, expected: float) -> None:
    assert format_reward([completion], [QUESTION]) == [expected]


def test_rewards_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 questions"):
        accuracy_reward(["a", "b"], [QUESTION])


# --- resolving and combining -------------------------------------------------------------------


def test_resolve_builtin_and_import_path() -> None:
    assert resolve_reward_function("accuracy") is accuracy_reward
    assert set(REWARD_FUNCTIONS) == {"accuracy", "format", "option_text", "soft_overlong"}
    user = resolve_reward_function("tests.grpo.test_rewards:length_penalty")
    assert user(["abcd", "ab"], [QUESTION, QUESTION]) == [-0.04, -0.02]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acuracy", "'acuracy' is neither a built-in nor an import path"),
        ("no_such_package.rewards:fn", "cannot import 'no_such_package.rewards'"),
        ("tests.grpo.test_rewards:missing", "has no attribute 'missing'"),
        ("tests.grpo.test_rewards:NOT_CALLABLE", "resolves to a int, not a callable"),
    ],
)
def test_resolve_errors_name_the_spec(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_reward_function(spec)


def test_soft_overlong_equals_trls_formula_in_its_three_regions() -> None:
    # L_max 10, L_cache 4: 0 up to 6 tokens, (6 - L) / 4 from 7 to 10, -1 beyond
    lengths = [1, 6, 7, 9, 10, 11, 30]
    expected = [0.0, 0.0, -0.25, -0.75, -1.0, -1.0, -1.0]
    ids = [[5] * n for n in lengths]
    got = soft_overlong_reward([""] * 7, [QUESTION] * 7, completion_ids=ids, soft_max_length=10, soft_cache_length=4)
    assert got == pytest.approx(expected)
    try:
        from trl.rewards import get_soft_overlong_punishment
    except ImportError:
        return  # TRL not installed: the hand-computed values above are its formula
    assert got == pytest.approx(get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)(ids))


def test_soft_overlong_through_the_reward_computer_and_without_its_lengths() -> None:
    computer = RewardComputer({"accuracy": 1.0, "soft_overlong": 2.0})
    answers = ["<think></think><answer>C</answer>", "<answer>A</answer>"]
    total, per_fn = computer(answers, [QUESTION] * 2, completion_ids=[[1] * 3, [1] * 8], soft_max_length=8,
                             soft_cache_length=2)
    assert per_fn["soft_overlong"].tolist() == [0.0, -1.0]  # 8 tokens: (6 - 8) / 2
    assert total.tolist() == [1.0, -2.0]
    with pytest.raises(RewardFunctionError, match="'soft_overlong' raised ValueError: soft_overlong needs"):
        computer(answers, [QUESTION] * 2)


def test_reward_computer_weighted_sum() -> None:
    computer = RewardComputer(
        {"accuracy": 1.0, "format": 0.5, "tests.grpo.test_rewards:length_penalty": 2.0}
    )
    completions = [_answer("C"), "<answer>C</answer>", _answer("B")]
    total, parts = computer(completions, [QUESTION] * 3)
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    assert parts["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 1.0]
    torch.testing.assert_close(parts["tests.grpo.test_rewards:length_penalty"], -lengths / 100)
    expected = torch.tensor([1.5, 1.0, 0.5]) - 2.0 * lengths / 100
    torch.testing.assert_close(total, expected)
    assert total.dtype == torch.float32 and total.shape == (3,)


def test_reward_computer_none_is_unscored_and_left_out_of_the_group() -> None:
    # One function, None for completion 0: nothing scored it, its total is NaN; the others 3.0.
    computer = RewardComputer({"tests.grpo.test_rewards:not_applicable_first": 3.0})
    total, parts = computer(["x", "y", "z"], [QUESTION] * 3)
    assert math.isnan(total[0]) and total[1:].tolist() == [3.0, 3.0]
    assert math.isnan(parts["tests.grpo.test_rewards:not_applicable_first"][0])


def test_reward_computer_none_of_one_function_leaves_the_others_in_the_sum() -> None:
    # TRL's nansum: accuracy scores every row; the second function only the odd ones, weight 0.5.
    #   completions [gold C, B, gold C, B] -> accuracy [1, 0, 1, 0]; odd rows +0.5 -> [1, 0.5, 1, 0.5]
    computer = RewardComputer({"accuracy": 1.0, "tests.grpo.test_rewards:scores_odd_rows": 0.5})
    total, parts = computer([_answer("C"), _answer("B")] * 2, [QUESTION] * 4)
    assert total.tolist() == [1.0, 0.5, 1.0, 0.5]
    odd = parts["tests.grpo.test_rewards:scores_odd_rows"]
    assert torch.isnan(odd[::2]).all() and odd[1::2].tolist() == [1.0, 1.0]
    metrics = reward_metrics(total, parts)
    # mean/std over scored values only: odd function [1, 1] -> mean 1, std 0 (TRL nanmean / nanstd)
    assert metrics["rewards/tests.grpo.test_rewards:scores_odd_rows/mean"] == 1.0
    assert metrics["rewards/tests.grpo.test_rewards:scores_odd_rows/std"] == 0.0
    # accuracy [1, 0, 1, 0]: mean 0.5, sample std sqrt(1 / 3) = 0.57735
    assert metrics["rewards/accuracy/mean"] == 0.5
    assert metrics["rewards/accuracy/std"] == pytest.approx(math.sqrt(1 / 3))
    assert metrics["reward"] == 0.75 and metrics["reward_unscored_share"] == 0.0


def test_unscored_rows_get_no_advantage_and_do_not_shift_the_group() -> None:
    # scores_odd_rows alone: group of 4 -> rows 0, 2 unscored, rows 1, 3 both 1.0 -> no signal;
    # with accuracy too the totals are [1, 0.5, 1, 0.5]: all four scored, mean 0.75, std 0.288675
    alone = RewardComputer({"tests.grpo.test_rewards:scores_odd_rows": 1.0})
    total, parts = alone(["a", "b", "c", "d"], [QUESTION] * 4)
    adv = group_advantages(total, group_size=4)
    assert adv.advantages.tolist() == [0.0] * 4 and adv.has_signal.tolist() == [False]
    assert adv.scored.tolist() == [False, True, False, True]
    metrics = reward_metrics(total, parts)
    assert metrics["reward"] == 1.0 and metrics["reward_unscored_share"] == 0.5


def test_a_raising_reward_function_is_one_line_naming_it() -> None:
    computer = RewardComputer({"accuracy": 1.0, "tests.grpo.test_rewards:raising_reward": 1.0})
    with pytest.raises(RewardFunctionError) as info:
        computer(["a", "b"], [QUESTION] * 2)
    assert str(info.value) == (
        "reward function 'tests.grpo.test_rewards:raising_reward' raised ZeroDivisionError: float division by zero"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the traceback is kept
    assert info.value.__cause__.__traceback__ is not None
    multi = RewardComputer({"tests.grpo.test_rewards:multiline_error_reward": 1.0})
    with pytest.raises(RewardFunctionError, match=r"raised ValueError: no gold answer for record q1$") as info:
        multi(["a"], [QUESTION])
    assert "\n" not in str(info.value)


def test_reward_computer_accepts_a_tensor_of_rewards() -> None:
    total, _ = RewardComputer({"tests.grpo.test_rewards:tensor_reward": 2.0})(["a", "b", "c"], [QUESTION] * 3)
    assert total.tolist() == [0.0, 1.0, 2.0]


def test_a_weighted_sum_that_overflows_names_the_functions() -> None:
    # 3e38 is a finite float32... until weight 2 doubles it past 3.4e38
    computer = RewardComputer({"accuracy": 1.0, "tests.grpo.test_rewards:huge_reward": 2.0})
    message = r"completion 0 overflows to inf .*'tests.grpo.test_rewards:huge_reward' 3\.0\d*e\+38 x 2\.0"
    with pytest.raises(ValueError, match=message):
        computer(["a", "b"], [QUESTION] * 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.grpo.test_rewards:nan_second", "test_rewards:nan_second' returned nan for completion 1"),
        ("tests.grpo.test_rewards:text_reward", "test_rewards:text_reward' returned 'good' for completion 0"),
    ],
)
def test_reward_computer_rejects_bad_values(spec: str, message: str) -> None:
    computer = RewardComputer({"accuracy": 1.0, spec: 1.0})
    with pytest.raises(ValueError, match=re.escape(message)):
        computer(["a", "b", "c"], [QUESTION] * 3)


def test_reward_computer_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardComputer({})
    with pytest.raises(ValueError, match="'format': weight must be a finite number"):
        RewardComputer({"format": float("inf")})
    with pytest.raises(ValueError, match="'nope' is neither"):
        RewardComputer({"accuracy": 1.0, "nope": 1.0})


def test_gold_answers_of_the_real_set_score_one() -> None:
    """Every gold letter and gold text of the SGG-VQA set parses back to the gold option."""
    path = DATA / "sgg_vqa_anatomy_r1.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    records = json.loads(path.read_text())
    completions, questions = [], []
    for rec in records:
        lines = rec["instruction"].split("Anatomy Options:")[1].strip().splitlines()
        options = [re.sub(r"^[A-F]\.\s*", "", line).strip() for line in lines]
        q = Question(id="x", question="?", options=options, answer_index="ABCDEF".index(rec["solution"]))
        assert q.answer_text == rec["answer"]
        completions += [_answer(rec["solution"]), _answer(rec["answer"]),
                        _answer(f"{rec['solution']}. {rec['answer']}")]
        questions += [q, q, q]
    assert len(records) == 1000
    assert accuracy_reward(completions, questions) == [1.0] * len(completions)
