"""Rule-based rewards of the DeepSeek-R1 recipe: answer accuracy and the think/answer format.

Pure functions of the response text (and the gold answer). The response scored is the full
assistant turn: `response_prefix + completion` when the prompt pre-filled part of it.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = ("<think>", "</think>", _ANSWER_OPEN, _ANSWER_CLOSE)

# math-verify bounds parsing and comparison with signal.alarm; a pathological answer such as
# 9^{9^{9^{9}}} would otherwise stall a reward worker. The bound is per call (parse or verify).
DEFAULT_TIMEOUT_S = 5


def extract_answer(response: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair, stripped; None if there is none.

    "Last" is taken from the end: the last closing tag and the nearest opening tag before it,
    so in "<answer>a<answer>b</answer>" the answer is "b".
    """
    end = response.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = response.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return response[start + len(_ANSWER_OPEN) : end].strip()


_FORMAT_RE = re.compile(r"<think>.*</think>\s*<answer>(.*)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 if the response is exactly `<think>...</think>` + `<answer>...</answer>`, else 0.0.

    Surrounding whitespace is ignored; whitespace is allowed between the two blocks; each tag
    occurs exactly once (so nothing is nested or repeated); nothing follows </answer>; the
    answer is non-empty. The think block may be empty: the format reward checks structure only.
    """
    text = response.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _FORMAT_RE.fullmatch(text)
    return 1.0 if match is not None and match.group(1).strip() else 0.0


def tag_count_reward(response: str) -> float:
    """0.25 for each of <think>, </think>, <answer>, </answer> that occurs exactly once.

    A shaping reward: partial credit on the way to the strict format, for models that start
    out never producing the whole structure (so the strict reward alone has no variance within
    a group, and GRPO no signal).
    """
    return sum(0.25 for tag in _TAGS if response.count(tag) == 1)


# Plain decimal numbers, optionally with thousands separators ("1,000" or "1 000") and a short
# exponent. The exponent is capped at 3 digits so "1e999999999" cannot make Fraction build a
# billion-digit integer; longer forms fall through to math-verify, which has a timeout.
_PLAIN_NUMBER_RE = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d{1,3})?"
    r"|[+-]?\.\d+(?:[eE][+-]?\d{1,3})?"
)
_MAX_PLAIN_NUMBER_CHARS = 100


def plain_number(text: str) -> Fraction | None:
    """The exact value of a plain decimal number ("1,000", "-2.50", "1e3"; not "1/2"), or None."""
    text = text.strip()
    if len(text) > _MAX_PLAIN_NUMBER_CHARS or not _PLAIN_NUMBER_RE.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


_warned_thread = False


@functools.lru_cache(maxsize=4096)
def _parse(text: str, timeout_s: int | None) -> tuple[Any, ...]:
    """math-verify's parse, with bare LaTeX wrapped in $...$ so it is read as math.

    Unwrapped, math-verify reads "2^{10}" as 2 and "\\sqrt{2}" as nothing; wrapped, both parse.
    If the wrapped form yields nothing (e.g. prose like "The answer is 42"), the raw text is
    tried. Cached because every completion in a group is checked against the same gold answer.
    """
    from math_verify import parse

    delimited = "$" in text or "\\(" in text or "\\[" in text
    candidates = [text] if delimited else [f"${text}$", text]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=timeout_s)
        if parsed:
            return tuple(parsed)
    return ()


def _math_verify_equal(pred: str, gold: str, timeout_s: int | None) -> bool:
    from math_verify import verify

    gold_parsed = _parse(gold, timeout_s)
    pred_parsed = _parse(pred, timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout_s))


def accuracy_reward(response: str, gold: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the response's final <answer> equals `gold` mathematically, else 0.0.

    Order of checks:
    1. no <answer> tag or an empty answer -> 0.0;
    2. identical strings -> 1.0;
    3. both sides plain decimal numbers ("42", "-3.50", "1,000") -> exact numeric comparison.
       This fast path skips math-verify (a sympy parse costs milliseconds per call) for the
       common arithmetic case, and it is exact and deterministic: no timeouts, no float
       rounding. It is stricter than math-verify for long decimals ("0.3333333" vs
       "0.333333" differ here, while math-verify rounds to 6 digits);
    4. otherwise math-verify (fractions, LaTeX, \\boxed, percents, sets...).

    math-verify times itself out with signal.alarm, which only works in the main thread. From
    the main thread `timeout_s` bounds each parse/verify; from any other thread the timeout is
    disabled (with a one-time warning) rather than failing every call, so the caller must bound
    time itself there. Any exception inside math-verify scores 0.0 instead of crashing.
    """
    pred = extract_answer(response)
    if not pred:
        return 0.0
    gold = str(gold).strip()
    if pred == gold:
        return 1.0
    pred_value, gold_value = plain_number(pred), plain_number(gold)
    if pred_value is not None and gold_value is not None:
        return 1.0 if pred_value == gold_value else 0.0

    timeout: int | None = timeout_s
    if threading.current_thread() is not threading.main_thread():
        global _warned_thread
        if not _warned_thread:
            _warned_thread = True
            logger.warning(
                "accuracy_reward called outside the main thread: math-verify's signal-based "
                "timeout is disabled, so the caller must bound its run time"
            )
        timeout = None
    try:
        return 1.0 if _math_verify_equal(pred, gold, timeout) else 0.0
    except Exception as err:
        # A model can write anything inside the tags; a parser failure is a wrong answer, not
        # a crashed reward worker.
        logger.debug("math-verify failed on pred=%r gold=%r: %s", pred[:200], gold[:200], err)
        return 0.0
