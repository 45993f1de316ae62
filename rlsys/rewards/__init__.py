"""Reward functions: pure functions of the response text and the gold answer.

No Ray, no actors, no model; the reward pool actors call these.
"""

from rlsys.rewards.registry import (
    REWARD_FUNCTIONS,
    RewardFn,
    check_weights,
    compute_reward,
    register_reward,
)
from rlsys.rewards.rule_based import (
    DEFAULT_TIMEOUT_S,
    accuracy_reward,
    extract_answer,
    format_reward,
    tag_count_reward,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "REWARD_FUNCTIONS",
    "RewardFn",
    "accuracy_reward",
    "check_weights",
    "compute_reward",
    "extract_answer",
    "format_reward",
    "register_reward",
    "tag_count_reward",
]
