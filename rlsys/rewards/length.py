"""DAPO's soft overlong punishment: a penalty that ramps up as a response nears the length cap.

Truncated responses have no answer and score 0, which GRPO cannot tell apart from a wrong
answer; a hard penalty at the cap is noisy (a sound but long chain of thought is punished as
hard as garbage). DAPO instead adds a linear penalty over the last `buffer_tokens` before the
cap. It depends on the token count, not on the text, so it is not a registered reward part: the
trainer adds it to the total reward of each response after decoding.
"""

from __future__ import annotations

import math


def _check_int(name: str, value: int, minimum: int) -> None:
    # bool is an int subclass; True as a token count is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def overlong_penalty(
    num_tokens: int, max_tokens: int, buffer_tokens: int, factor: float = 1.0
) -> float:
    """The soft overlong penalty for a response of `num_tokens` tokens, in [-factor, 0].

    With L_max = max_tokens, L_cache = buffer_tokens and |y| = num_tokens:

        0                                     if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache * factor   if L_max - L_cache < |y| < L_max
        -factor                               if |y| >= L_max

    so the penalty falls linearly from 0 to -factor across the buffer. With buffer_tokens == 0
    it is a hard penalty: -factor at or beyond max_tokens, 0 below.

    Raises ValueError unless num_tokens >= 0, max_tokens >= 1, 0 <= buffer_tokens <=
    max_tokens (all integers) and factor is finite and >= 0.
    """
    _check_int("num_tokens", num_tokens, 0)
    _check_int("max_tokens", max_tokens, 1)
    _check_int("buffer_tokens", buffer_tokens, 0)
    if buffer_tokens > max_tokens:
        raise ValueError(
            f"buffer_tokens ({buffer_tokens}) must not exceed max_tokens ({max_tokens})"
        )
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not (
        math.isfinite(factor) and factor >= 0
    ):
        # A negative factor would turn the punishment into a bonus for rambling.
        raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")

    if num_tokens >= max_tokens:
        return -float(factor)
    start = max_tokens - buffer_tokens
    if num_tokens <= start:
        # Also covers buffer_tokens == 0 (start == max_tokens), avoiding a division by zero.
        return 0.0
    return (start - num_tokens) / buffer_tokens * factor
