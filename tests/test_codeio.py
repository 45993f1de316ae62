"""reasoning-gym's code I/O tasks: the value comparison, the executed check of predicted inputs,
and the accuracy part's choice of verifier by the gold answer."""

from __future__ import annotations

import json
import math

import pytest

from rlsys.data import make_task
from rlsys.rewards import compute_reward
from rlsys.rewards.codeio import codeio_gold, codeio_reward, parse_value, values_equal
from rlsys.rewards.verifiers import gold_verifier, verified_accuracy
from rlsys.sandbox import bwrap_path

needs_sandbox = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap not installed")

# A reference function with many inputs per output: any pair summing to 10 gives "ten".
CODE = """
def main_solution(a, b):
    if a > 10**6:
        while True:
            pass
    if a < 0:
        raise ValueError("negative")
    return {"sum": "ten" if a + b == 10 else a + b, "pair": (a, b)[:0]}
"""
INPUT_GOLD = codeio_gold("input", CODE, {"a": 3, "b": 7}, {"sum": "ten", "pair": []})
OUTPUT_GOLD = codeio_gold("output", CODE, {"a": 2, "b": 0.5}, {"sum": 2.5, "pair": []})


def answer(text: str) -> str:
    return f"<think>reasoning</think><answer>{text}</answer>"


@pytest.mark.parametrize(("a", "b", "equal"), [
    (1, 1.0, True), (0.1 + 0.2, 0.3, True), (1.0, 1.001, False), (True, 1, False),
    ([1, [2, 3]], (1, (2, 3)), True), ({1: "x"}, {"1": "x"}, True), ({"a": 1}, {"a": 1, "b": 2},
                                                                      False),
    ("1", 1, False), (None, None, True), (math.nan, math.nan, True), ([1, 2], [2, 1], False),
])
def test_values_equal(a, b, equal):
    assert values_equal(a, b) is equal
    assert values_equal(b, a) is equal


@pytest.mark.parametrize(("text", "value"), [
    ('{"a": 1}', {"a": 1}),
    ("{'a': (1, 2), 'b': None}", {"a": (1, 2), "b": None}),  # the prompts' Python style
    ('The input is {"n": 3}.', {"n": 3}),
    ("```json\n[1, 2]\n```", [1, 2]),
    ("42", 42), ('"abc"', "abc"), ("true", True),
])
def test_parse_value(text, value):
    assert parse_value(text) == (True, value)


@pytest.mark.parametrize("text", ["", "no value here", "{'a': }", "__import__('os')"])
def test_parse_value_rejects_what_is_no_value(text):
    assert parse_value(text) == (False, None)


def test_output_mode_compares_values_not_text():
    assert codeio_reward(answer('{"sum": 2.5, "pair": []}'), OUTPUT_GOLD) == 1.0
    assert codeio_reward(answer("{'pair': [], 'sum': 2.5000000001}"), OUTPUT_GOLD) == 1.0
    assert codeio_reward(answer('{"sum": 2.6, "pair": []}'), OUTPUT_GOLD) == 0.0
    assert codeio_reward(answer('{"sum": 2.5}'), OUTPUT_GOLD) == 0.0
    assert codeio_reward("<answer>unparseable {</answer>", OUTPUT_GOLD) == 0.0
    assert codeio_reward('{"sum": 2.5, "pair": []}', OUTPUT_GOLD) == 0.0  # no <answer>


@needs_sandbox
@pytest.mark.parametrize(("proposed", "reward"), [
    ('{"a": 3, "b": 7}', 1.0),        # the generator's own input
    ('{"a": 4, "b": 6}', 1.0),        # another input with the same output: run, and right
    ("{'a': 9.5, 'b': 0.5}", 1.0),
    ('{"a": 4, "b": 5}', 0.0),        # runs, wrong output
    ('{"a": -1, "b": 11}', 0.0),      # the reference raises
    ('{"a": 10000000, "b": -9999990}', 0.0),  # the reference loops: the deadline scores 0
    ('{"c": 1}', 0.0),                # not the function's parameters
    ("[4, 6]", 0.0),                  # inputs are keyword arguments
])
def test_input_mode_runs_the_reference_code(proposed, reward):
    assert codeio_reward(answer(proposed), INPUT_GOLD, timeout_s=2.0) == reward


def test_malformed_gold_raises():
    with pytest.raises(ValueError, match="codeio"):
        codeio_reward(answer("1"), json.dumps({"verifier": "codeio", "mode": "both"}))
    with pytest.raises(ValueError, match="lacks"):
        codeio_reward(answer("1"), json.dumps({"verifier": "codeio", "mode": "input"}))


def test_accuracy_picks_the_verifier_the_gold_names():
    assert gold_verifier("42") == "math"
    assert gold_verifier("{1, 2}") == "math"  # a set, not JSON
    assert gold_verifier(OUTPUT_GOLD) == "codeio"
    assert gold_verifier(json.dumps({"verifier": "code", "tests": ["assert f() == 1"]})) == "code"
    with pytest.raises(ValueError, match="unknown verifier 'lean'"):
        gold_verifier(json.dumps({"verifier": "lean"}))
    assert verified_accuracy(answer("\\frac{1}{2}"), "0.5") == 1.0
    assert verified_accuracy(answer('{"sum": 2.5, "pair": []}'), OUTPUT_GOLD) == 1.0
    # The registered "accuracy" part is this dispatch, so one weight set fits every task.
    scores = compute_reward(answer('{"sum": 2.5, "pair": []}'), OUTPUT_GOLD,
                            {"accuracy": 1.0, "format": 1.0})
    assert scores == {"total": 2.0, "accuracy": 1.0, "format": 1.0}


@needs_sandbox
def test_reasoning_gym_codeio_problems_score_their_own_answers():
    """Real codeio problems: reasoning-gym's answer scores 1, a wrong one 0, and in input mode
    the reference code, run in the sandbox, reproduces the gold output for most of them (a few
    reference programs draw random numbers, so their output is not a function of the input)."""
    from rlsys.rewards.codeio import run_reference

    task = make_task("reasoning_gym", dataset="codeio", seed=0, eval_size=2)
    problems = task.sample(24)
    modes = [json.loads(p.answer)["mode"] for p in problems]
    assert {"input", "output"} <= set(modes)
    reproduced = 0
    for problem, mode in zip(problems, modes, strict=True):
        gold = json.loads(problem.answer)
        assert problem.task == "reasoning_gym" and gold_verifier(problem.answer) == "codeio"
        assert "main_solution" in gold["code"]
        right = json.dumps(gold["output"] if mode == "output" else gold["input"])
        assert verified_accuracy(answer(right), problem.answer) == 1.0, problem.id
        assert verified_accuracy(answer('{"surely": "wrong"}'), problem.answer) == 0.0
        if mode == "input":
            ran, output = run_reference(gold["code"], gold["input"])
            reproduced += ran and values_equal(output, gold["output"])
    assert reproduced >= 0.75 * modes.count("input"), (reproduced, modes.count("input"))
