"""Rule-based rewards: answer extraction, strict R1 format, math-verify accuracy, weighting."""

from __future__ import annotations

import threading

import pytest

from rlsys.rewards import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    check_weights,
    compute_reward,
    extract_answer,
    format_reward,
    register_reward,
    rule_based,
    tag_count_reward,
)


def wrap(answer: str) -> str:
    return f"<think>some reasoning</think> <answer>{answer}</answer>"


# -- extract_answer


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<answer>42</answer>", "42"),
        ("<answer>  42 \n</answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>a<answer>b</answer>", "b"),  # nested opening tag: the inner, last one wins
        ("<answer>1</answer><answer>2", "1"),  # trailing unclosed tag is ignored
        ("<answer></answer>", ""),
        ("<answer>42", None),
        ("42</answer>", None),
        ("no tags at all", None),
        ("", None),
        ("<answer>x\ny</answer>", "x\ny"),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


# -- format_reward


@pytest.mark.parametrize(
    "response",
    [
        "<think>r</think><answer>42</answer>",
        "<think>r</think> <answer>42</answer>",
        "  \n<think>\nmulti\nline\n</think>\n\n<answer> 42 </answer>\n",
        "<think></think><answer>42</answer>",  # empty think is allowed: structure only
    ],
)
def test_format_reward_accepts(response: str) -> None:
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<think>r</think>",  # no answer
        "<think>r<answer>42</answer>",  # missing </think>
        "<think>r</think><answer>42",  # missing </answer>
        "<think>r</think><answer>42</answer> trailing text",
        "preamble <think>r</think><answer>42</answer>",
        "<think>r</think> text <answer>42</answer>",  # text between blocks
        "<think>r</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>a<think>b</think></think><answer>42</answer>",  # nested think
        "<think>r</think><answer>  </answer>",  # empty answer
        "<answer>42</answer><think>r</think>",  # wrong order
        "<think>r</think><answer><think>x</think>42</answer>",
        "",
        "\x00\xff garbage <<<>>>",
    ],
)
def test_format_reward_rejects(response: str) -> None:
    assert format_reward(response) == 0.0


# -- accuracy_reward


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("42", "42"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("1 000", "1000"),
        ("-3", "-3"),
        ("3.0", "3"),
        ("0.50", "0.5"),
        ("+7", "7"),
        ("1e3", "1000"),
        ("0.5", "1/2"),  # math-verify
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("$42$", "42"),
        ("\\boxed{42}", "42"),
        ("\\(42\\)", "42"),
        ("2^{10}", "1024"),
        ("\\sqrt{4}", "2"),
        ("Paris", "Paris"),
    ],
)
def test_accuracy_correct(pred: str, gold: str) -> None:
    assert accuracy_reward(wrap(pred), gold) == 1.0


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("43", "42"),
        ("-42", "42"),
        ("3,4", "34"),  # not a thousands separator: must not collapse to 34
        ("0.3333333", "0.333333"),  # fast path is exact
        ("1/3", "1/2"),
        ("\\frac{1}{3}", "0.5"),
        ("abc", "42"),
        ("<<>>{{}}\\\\\\", "42"),
        ("\\frac{", "42"),
        ("1e999999999", "1"),  # too long an exponent for the fast path; math-verify says no
        ("", "42"),
        ("   ", "42"),
    ],
)
def test_accuracy_wrong(pred: str, gold: str) -> None:
    assert accuracy_reward(wrap(pred), gold) == 0.0


def test_accuracy_needs_answer_tag() -> None:
    assert accuracy_reward("The answer is 42", "42") == 0.0
    assert accuracy_reward("<answer>42", "42") == 0.0
    # Only the last answer counts, and format is not required for accuracy.
    assert accuracy_reward("<answer>41</answer> no wait <answer>42</answer>", "42") == 1.0
    assert accuracy_reward("<answer>42</answer> no wait <answer>41</answer>", "42") == 0.0


def test_fast_path_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> bool:
        raise AssertionError("math-verify must not be called for plain numbers")

    monkeypatch.setattr(rule_based, "_math_verify_equal", boom)
    assert accuracy_reward(wrap("1,234"), "1234") == 1.0
    assert accuracy_reward(wrap("17"), "71") == 0.0


def test_math_verify_exception_scores_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(rule_based, "_math_verify_equal", boom)
    assert accuracy_reward(wrap("\\frac{1}{2}"), "0.5") == 0.0


def test_accuracy_outside_main_thread() -> None:
    # math-verify's signal-based timeout raises in other threads; the reward must still work.
    results: list[float] = []

    def run() -> None:
        results.append(accuracy_reward(wrap("\\frac{2}{4}"), "0.5"))
        results.append(accuracy_reward(wrap("\\frac{1}{3}"), "0.5"))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results == [1.0, 0.0]


def test_gold_may_be_a_number_like_object() -> None:
    assert accuracy_reward(wrap("42"), 42) == 1.0  # type: ignore[arg-type]


# -- compute_reward


def test_compute_reward_weights() -> None:
    good = wrap("42")
    out = compute_reward(good, "42", {"accuracy": 1.0, "format": 0.5})
    assert out == {"total": 1.5, "accuracy": 1.0, "format": 1.0}

    bad_format = "I think <answer>42</answer> ok"
    out = compute_reward(bad_format, "42", {"accuracy": 1.0, "format": 0.5})
    assert out == {"total": 1.0, "accuracy": 1.0, "format": 0.0}

    out = compute_reward(wrap("41"), "42", {"format": 1.0})
    assert out == {"total": 1.0, "format": 1.0}

    out = compute_reward(good, "42", {"accuracy": 1.0, "format": 0.0})
    assert out["total"] == 1.0 and out["format"] == 1.0  # zero-weight parts are still reported


def test_compute_reward_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match=r"unknown reward part 'lenght'.*accuracy.*format"):
        compute_reward("x", "1", {"lenght": 1.0})
    with pytest.raises(ValueError, match="empty"):
        compute_reward("x", "1", {})
    with pytest.raises(ValueError, match="finite number"):
        check_weights({"accuracy": float("nan")})
    with pytest.raises(ValueError, match="finite number"):
        check_weights({"accuracy": "1"})  # type: ignore[dict-item]


def test_register_reward() -> None:
    def length_part(response: str, gold: str) -> float:
        return float(len(response))

    register_reward("test_length", length_part)
    try:
        assert compute_reward("abc", "1", {"test_length": 2.0}) == {
            "total": 6.0,
            "test_length": 3.0,
        }
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_length", lambda r, g: 0.0)
        with pytest.raises(ValueError, match="total"):
            register_reward("total", length_part)
    finally:
        REWARD_FUNCTIONS.pop("test_length")


def test_pathological_answer_times_out() -> None:
    # sympy would try to build 9^(9^(9^9)); the signal timeout (main thread) bounds it.
    import time

    start = time.monotonic()
    assert accuracy_reward(wrap("9^{9^{9^{9}}}"), "5", timeout_s=1) == 0.0
    assert time.monotonic() - start < 4


@pytest.mark.parametrize(("response", "expected"), [
    ("<think>a</think><answer>1</answer>", 1.0),
    ("<think>a</think> 1", 0.5),
    ("no tags at all", 0.0),
    ("<think><think></think><answer>1</answer>", 0.75),  # a repeated tag earns nothing
])
def test_tag_count_gives_partial_credit(response, expected):
    assert tag_count_reward(response) == expected
    assert compute_reward(response, "1", {"tag_count": 1.0})["tag_count"] == expected
