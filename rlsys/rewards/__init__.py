"""Reward functions: pure functions of the response text and the gold answer.

No Ray, no actors, no model; the reward pool actors call these.
"""

from rlsys.rewards.code import (
    DEFAULT_CODE_TIMEOUT_S,
    build_program,
    code_accuracy_reward,
    extract_code,
)
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
    "DEFAULT_CODE_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "REWARD_FUNCTIONS",
    "RewardFn",
    "accuracy_reward",
    "build_program",
    "check_weights",
    "code_accuracy_reward",
    "compute_reward",
    "extract_answer",
    "extract_code",
    "format_reward",
    "register_reward",
    "tag_count_reward",
]
