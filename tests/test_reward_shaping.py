"""Shaping rewards: R1 language consistency and DAPO's soft overlong penalty."""

from __future__ import annotations

import math
import pickle

import pytest

from rlsys.rewards import (
    REWARD_FUNCTIONS,
    LanguageReward,
    compute_reward,
    extract_reasoning,
    language_consistency,
    language_consistency_reward,
    make_language_reward,
    overlong_penalty,
    word_scripts,
)

# -- language_consistency


def test_english_text_is_fully_consistent() -> None:
    assert language_consistency("Let me think about this problem step by step.") == 1.0


def test_mixed_chinese_english() -> None:
    # 思 考 (2 CJK words) + "this" (1 Latin) + 问 题 (2 CJK) = 5 words.
    text = "思考 this 问题"
    assert language_consistency(text, "en") == pytest.approx(1 / 5)
    assert language_consistency(text, "zh") == pytest.approx(4 / 5)
    assert language_consistency(text, "latin") == pytest.approx(1 / 5)
    assert language_consistency(text, "cjk") == pytest.approx(4 / 5)


def test_mixed_english_majority() -> None:
    # "so the answer is" = 4 Latin words, 对 = 1 CJK word -> 4/5 English.
    assert language_consistency("so the answer is 对", "en") == pytest.approx(4 / 5)


def test_japanese_target_counts_kanji_and_kana() -> None:
    # 問 題 (CJK) + を で す (hiragana) + テ ス ト (katakana) = 8 words, + "test" (Latin) = 9.
    text = "問題をテストです test"
    assert language_consistency(text, "ja") == pytest.approx(8 / 9)
    # Chinese counts only the 2 ideographs.
    assert language_consistency(text, "zh") == pytest.approx(2 / 9)
    assert language_consistency(text, "hiragana") == pytest.approx(3 / 9)
    assert language_consistency(text, "katakana") == pytest.approx(3 / 9)


def test_korean_target() -> None:
    # 생 각 (2 hangul syllables) + 해 요 (2) = 4 hangul, + "ok" (1 Latin) = 5.
    text = "생각 해요 ok"
    assert language_consistency(text, "ko") == pytest.approx(4 / 5)
    assert language_consistency(text, "en") == pytest.approx(1 / 5)


def test_russian_target() -> None:
    # "Давайте подумаем" = 2 Cyrillic words, "about" = 1 Latin word.
    text = "Давайте подумаем about"
    assert language_consistency(text, "ru") == pytest.approx(2 / 3)
    assert language_consistency(text, "cyrillic") == pytest.approx(2 / 3)
    assert language_consistency(text, "en") == pytest.approx(1 / 3)


def test_other_scripts_dilute_the_proportion() -> None:
    # Greek, Arabic, Hebrew, Devanagari, Thai and Georgian ("other") words: 6, plus 1 Latin.
    text = "αλφα مرحبا שלום नमस्ते สวัสดี გამარჯობა yes"
    assert word_scripts(text) == [
        "greek", "arabic", "hebrew", "devanagari", "thai", "other", "latin",
    ]
    assert language_consistency(text, "en") == pytest.approx(1 / 7)
    assert language_consistency(text, "greek") == pytest.approx(1 / 7)


def test_digits_and_math_are_ignored() -> None:
    # Only "so" and "x" are words: digits, operators, ∑, ≤ and punctuation count for nothing.
    assert word_scripts("so 2x + 3 = 7, ∑ ≤ 10!") == ["latin", "latin"]
    assert language_consistency("so 2x + 3 = 7, ∑ ≤ 10!", "zh") == 0.0
    # No words at all -> nothing inconsistent.
    assert language_consistency("1 + 2 = 3; 3 * 4 = 12", "zh") == 1.0


def test_accents_and_script_changes() -> None:
    # Combining accent stays within "café" (1 word); "abcабв" is a Latin and a Cyrillic word.
    assert word_scripts("cafe\u0301") == ["latin"]
    assert word_scripts("abcабв") == ["latin", "cyrillic"]
    # Full-width Latin letters are Latin.
    assert word_scripts("ＡＢＣ") == ["latin"]


def test_empty_text_is_consistent() -> None:
    assert language_consistency("") == 1.0
    assert language_consistency("   \n") == 1.0
    assert language_consistency("", "zh") == 1.0


@pytest.mark.parametrize("target", ["fr", "", "english", "other"])
def test_unknown_target_raises(target: str) -> None:
    with pytest.raises(ValueError, match="supported: en, zh, ja, ko, ru, latin"):
        language_consistency("hello", target)
    with pytest.raises(ValueError, match="unknown language-consistency target"):
        make_language_reward(target)


def test_target_is_case_insensitive() -> None:
    assert language_consistency("思考 this", "ZH") == pytest.approx(2 / 3)


# -- chain-of-thought extraction


def test_reasoning_is_the_think_block() -> None:
    # The answer is Chinese but only the English think block is scored.
    response = "<think>I add the numbers</think><answer>答案是 5</answer>"
    assert extract_reasoning(response) == "I add the numbers"
    assert language_consistency_reward(response, "5") == 1.0
    # A Chinese think block: 计 算 = 2 CJK words, "sum" = 1 Latin word.
    response = "<think>计算 sum</think><answer>5</answer>"
    assert language_consistency_reward(response, "5") == pytest.approx(1 / 3)


def test_no_think_block_falls_back_to_text_before_answer() -> None:
    # "ok" (Latin) + 好 的 (2 CJK) before <answer>; the answer's Chinese is not counted.
    response = "ok 好的 <answer>答案</answer>"
    assert extract_reasoning(response) == "ok 好的 "
    assert language_consistency_reward(response, "") == pytest.approx(1 / 3)
    # Neither tag: the whole response.
    assert language_consistency_reward("plain English only", "") == 1.0


def test_stray_think_tags_are_not_words() -> None:
    # Pre-filled "<think>" leaves only "</think>"; a truncated response never closes it.
    # The tag letters must not count as English words: 想 (1 CJK) is the only word.
    assert language_consistency_reward("想</think><answer>1</answer>", "1") == 0.0
    assert language_consistency_reward("<think>想", "1") == 0.0
    assert language_consistency_reward("<think></think><answer>x</answer>", "x") == 1.0


def test_several_think_blocks_are_joined() -> None:
    response = "<think>one</think>中<think>二</think><answer>x</answer>"
    # "one" (Latin) and 二 (CJK); 中 lies outside any think block.
    assert language_consistency_reward(response, "x") == pytest.approx(1 / 2)


# -- picklable parts and the registry


def test_make_language_reward_pickles() -> None:
    reward = make_language_reward("zh")
    assert isinstance(reward, LanguageReward)
    assert reward.__name__ == "language_zh"
    clone = pickle.loads(pickle.dumps(reward))
    assert clone == reward
    assert clone.target == "zh"
    response = "<think>思考 this 问题</think><answer>1</answer>"
    assert clone(response, "1") == reward(response, "1") == pytest.approx(4 / 5)


def test_registered_language_part() -> None:
    assert REWARD_FUNCTIONS["language"] is language_consistency_reward
    response = "<think>思考 this 问题</think><answer>1</answer>"
    out = compute_reward(response, "1", {"language": 0.5, "accuracy": 1.0})
    assert out["language"] == pytest.approx(1 / 5)
    assert out["accuracy"] == 1.0
    assert out["total"] == pytest.approx(0.5 * 1 / 5 + 1.0)


def test_english_part_matches_object() -> None:
    response = "<think>思考 this 问题</think><answer>1</answer>"
    assert make_language_reward("en")(response, "1") == language_consistency_reward(response, "1")


# -- overlong_penalty


@pytest.mark.parametrize("factor", [1.0, 0.5, 2])
def test_overlong_penalty_shape(factor: float) -> None:
    # max 100, buffer 20: no penalty up to 80 tokens, linear to -factor at 100.
    assert overlong_penalty(0, 100, 20, factor) == 0.0
    assert overlong_penalty(50, 100, 20, factor) == 0.0
    assert overlong_penalty(80, 100, 20, factor) == 0.0
    # (80 - 90) / 20 = -0.5
    assert overlong_penalty(90, 100, 20, factor) == pytest.approx(-0.5 * factor)
    # (80 - 85) / 20 = -0.25
    assert overlong_penalty(85, 100, 20, factor) == pytest.approx(-0.25 * factor)
    assert overlong_penalty(100, 100, 20, factor) == pytest.approx(-factor)
    assert overlong_penalty(150, 100, 20, factor) == pytest.approx(-factor)


def test_overlong_penalty_default_factor() -> None:
    assert overlong_penalty(99, 100, 20) == pytest.approx(-19 / 20)


def test_overlong_penalty_zero_buffer_is_hard() -> None:
    assert overlong_penalty(99, 100, 0) == 0.0
    assert overlong_penalty(100, 100, 0) == -1.0
    assert overlong_penalty(101, 100, 0, 0.5) == -0.5


def test_overlong_penalty_buffer_equal_to_max() -> None:
    # The ramp starts at 0 tokens: (0 - 25) / 100 = -0.25.
    assert overlong_penalty(0, 100, 100) == 0.0
    assert overlong_penalty(25, 100, 100) == pytest.approx(-0.25)


@pytest.mark.parametrize(
    ("num_tokens", "max_tokens", "buffer_tokens", "factor"),
    [
        (-1, 100, 20, 1.0),
        (10, 0, 0, 1.0),
        (10, 100, -1, 1.0),
        (10, 100, 101, 1.0),
        (10, 100, 20, -1.0),
        (10, 100, 20, math.nan),
        (10, 100, 20, math.inf),
        (10.5, 100, 20, 1.0),
        (True, 100, 20, 1.0),
        (10, 100, 20, "1"),
    ],
)
def test_overlong_penalty_bad_args(
    num_tokens: int, max_tokens: int, buffer_tokens: int, factor: float
) -> None:
    with pytest.raises(ValueError):
        overlong_penalty(num_tokens, max_tokens, buffer_tokens, factor)


def test_language_part_can_be_given_another_target() -> None:
    from rlsys.rewards import compute_reward, make_language_reward

    response = "<think>思考 this 问题</think><answer>1</answer>"
    english = compute_reward(response, "1", {"language": 1.0})
    chinese = compute_reward(response, "1", {"language": 1.0},
                             {"language": make_language_reward("zh")})
    assert english["language"] == pytest.approx(1 / 5)
    assert chinese["language"] == pytest.approx(4 / 5)
