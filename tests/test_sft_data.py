"""SFT data: the cold-start generator, the rejection-sampling filters, dedupe and the files."""

from __future__ import annotations

import json

import pytest

from rlsys.data import DataError, Problem, make_task
from rlsys.data.sft import (
    SFTExample,
    arithmetic_cot,
    arithmetic_steps,
    dedupe,
    read_examples,
    rejection_reason,
    repeated_paragraphs,
    write_examples,
)
from rlsys.rewards import compute_reward


@pytest.mark.parametrize(("expression", "steps", "result"), [
    ("7", [], 7),
    ("3 + 4 * 5", ["4 * 5 = 20.", "3 + 20 = 23."], 23),
    ("2 * 3 - 4 * (-2)", ["2 * 3 = 6.", "4 * (-2) = -8.", "6 - (-8) = 14."], 14),
    ("-2 - 13 * (-4) - 14", ["13 * (-4) = -52.", "(-2) - (-52) = 50.", "50 - 14 = 36."], 36),
])
def test_arithmetic_steps_follow_precedence(expression, steps, result):
    assert arithmetic_steps(expression) == (steps, result)


def test_cold_start_solutions_are_right_and_in_format():
    """Every generated worked solution earns the full accuracy and format reward."""
    task = make_task("arithmetic", ops=("+", "-", "*"), num_terms=4, min_value=-9,
                     max_value=30, seed=3)
    for problem in task.sample(200):
        response = arithmetic_cot(problem)
        assert response.startswith("<think>\n")
        assert compute_reward(response, problem.answer, {"accuracy": 1, "format": 1}) == {
            "total": 2.0, "accuracy": 1.0, "format": 1.0}, response
    wrong = Problem("x", "What is 1 + 1?", "3", {"expression": "1 + 1"})
    with pytest.raises(ValueError, match="answer is 3"):
        arithmetic_cot(wrong)


GOOD = "<think>\nFirst 2 + 2 = 4. That is all.\n</think>\n<answer>4</answer>"
RIGHT = {"accuracy": 1.0, "format": 1.0}


@pytest.mark.parametrize(("response", "scores", "kwargs", "reason"), [
    (GOOD, RIGHT, {}, None),
    (GOOD, {"accuracy": 0.0}, {}, "wrong"),
    (GOOD, RIGHT, {"truncated": True}, "truncated"),
    ("<answer>4</answer>", RIGHT, {}, "format"),
    (GOOD, RIGHT, {"num_tokens": 3}, "short"),
    ("<think>\n二加二等于四, so it is 4\n</think>\n<answer>4</answer>", RIGHT, {}, "language"),
    ("<think>\nI add the numbers together now.\n\nI add the numbers together now.\n</think>\n"
     "<answer>4</answer>", RIGHT, {}, "repetition"),
])
def test_rejection_reasons(response, scores, kwargs, reason):
    args = {"target": "en", "min_language": 0.95, "num_tokens": 20, "min_tokens": 5,
            "truncated": False, **kwargs}
    assert rejection_reason(response, scores, **args) == reason


def test_repeated_paragraphs():
    assert not repeated_paragraphs("One idea here.\n\nAnother idea there.")
    assert repeated_paragraphs("Same paragraph.\n\nSame paragraph.\n\nEnd.")
    assert repeated_paragraphs("Let me check this sum again. Let me check this sum again.")
    assert not repeated_paragraphs("Short. Short. Short.")  # too short to be a loop


def test_dedupe_and_round_trip(tmp_path):
    examples = [SFTExample("q1", "a  b", {"problem_id": "1"}), SFTExample("q1", "a b"),
                SFTExample("q2", "a b", {"rewards": {"accuracy": 1.0}})]
    unique = dedupe(examples)
    assert [(e.prompt, e.meta) for e in unique] == [("q1", {"problem_id": "1"}),
                                                    ("q2", {"rewards": {"accuracy": 1.0}})]
    path = tmp_path / "data.jsonl"
    assert write_examples(path, unique) == 2
    assert read_examples(path) == unique
    assert not list(tmp_path.glob("*.tmp"))


def test_read_examples_names_the_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n"
                    + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: a row needs non-empty string fields"):
        read_examples(path)
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")


def test_reflection_count_counts_whole_phrases():
    from rlsys.metrics import reflection_count

    words = ["wait", "let me check", "verify"]
    text = "Wait, 2 + 2 = 5? Let me check. Hmm, waiting is not a reflection. VERIFY: wait."
    assert reflection_count(text, words) == 4
    assert reflection_count(text, []) == 0
