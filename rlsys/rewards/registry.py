"""Named reward parts and their weighted sum.

Every part is a function `(response, gold) -> float`. Later parts (language consistency, code
execution) register themselves here with `register_reward`, and configs select and weight them
by name. One exception: `preference`, a reward model's score of (prompt, response), is
registered by name only; the reward workers compute it (actors/reward.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from rlsys.rewards.code import code_accuracy_reward
from rlsys.rewards.language import language_consistency_reward
from rlsys.rewards.rule_based import format_reward, tag_count_reward
from rlsys.rewards.verifiers import verified_accuracy

RewardFn = Callable[[str, str], float]

REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    """Add a reward part under `name` (not "total", which is the weighted sum)."""
    if not isinstance(name, str) or not name or name == "total":
        raise ValueError(
            f"reward part name must be a non-empty string other than 'total', got {name!r}"
        )
    if name in REWARD_FUNCTIONS and REWARD_FUNCTIONS[name] is not fn:
        raise ValueError(f"reward part {name!r} is already registered")
    REWARD_FUNCTIONS[name] = fn
    return fn


# Math, code or code I/O, by what the gold answer names (rlsys.rewards.verifiers).
register_reward("accuracy", verified_accuracy)


def _format_part(response: str, gold: str) -> float:
    # Adapts format_reward to the (response, gold) signature; a named function, not a lambda,
    # so the registry's values pickle by reference.
    return format_reward(response)


register_reward("format", _format_part)


def check_weights(weights: Mapping[str, float],
                  functions: Mapping[str, RewardFn] | None = None) -> None:
    """Raise ValueError for an empty mapping, unknown part names or non-finite weights.

    Separate from compute_reward so a config can be validated at startup, before any rollout.
    `functions` are parts known besides the registered ones (see compute_reward).
    """
    known = {**REWARD_FUNCTIONS, **(functions or {})}
    if not weights:
        raise ValueError(
            f"reward weights are empty; name at least one part of: {', '.join(known)}"
        )
    for name, weight in weights.items():
        if name not in known:
            raise ValueError(
                f"unknown reward part {name!r}; known parts: {', '.join(known)}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(
            weight
        ):
            raise ValueError(f"reward weight for {name!r} must be a finite number, got {weight!r}")


def compute_reward(response: str, gold: str, weights: Mapping[str, float],
                   functions: Mapping[str, RewardFn] | None = None) -> dict[str, float]:
    """Score one response: {"total": sum of weight * part, <part>: value for each weighted part}.

    Parts are computed even when their weight is 0, so they can still be logged as metrics.
    `functions` overrides registered parts by name (e.g. "language" for another target).
    """
    check_weights(weights, functions)
    table = {**REWARD_FUNCTIONS, **(functions or {})}
    parts = {name: float(table[name](response, gold)) for name in weights}
    return {"total": sum(weights[name] * value for name, value in parts.items()), **parts}


def _tag_count_part(response: str, gold: str) -> float:
    return tag_count_reward(response)


register_reward("tag_count", _tag_count_part)


def _code_accuracy_part(response: str, gold: str) -> float:
    # Gold is a JSON test spec (see rlsys.rewards.code); runs the code in the sandbox. No gold
    # (a general prompt of the prompts task): nothing to run, 0.
    return code_accuracy_reward(response, gold) if gold.strip() else 0.0


register_reward("code_accuracy", _code_accuracy_part)


# English by default; other targets are built with make_language_reward(target).
register_reward("language", language_consistency_reward)


#: The reward-model part (R1's all-scenario RL: general prompts have no checkable answer).
PREFERENCE = "preference"


def _preference_part(response: str, gold: str) -> float:
    # A score of (prompt, response) by the model of `reward.model`: the reward workers compute
    # it in batches (actors/reward.py, rlsys.rewards.model_scorer) and pass the value in as a
    # part. Registered so that weights may name it; it cannot be computed from these two.
    raise ValueError(f"the {PREFERENCE!r} reward part is scored by a reward model "
                     "(reward.model) in the reward workers, not from (response, gold)")


register_reward(PREFERENCE, _preference_part)


#: Reward parts that say whether an answer is right, in the order they are looked for.
ACCURACY_PARTS = ("accuracy", "code_accuracy")


def correctness_part(score: Mapping[str, float]) -> str:
    """The part of a scored completion that decides `is_correct` ("total > 0" if none)."""
    return next((part for part in ACCURACY_PARTS if part in score), "total > 0")


def is_correct(score: Mapping[str, float]) -> bool:
    """The one rule for "correct": the completion's accuracy part is 1, or, when the weights
    have no accuracy part, its total reward is > 0. Training statistics, evaluation and
    rejection sampling all count with it."""
    part = correctness_part(score)
    return score[part] >= 1.0 if part in score else score["total"] > 0
