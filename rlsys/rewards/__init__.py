"""Reward functions: pure functions of the response text and the gold answer.

No Ray, no actors, no model; the reward pool actors call these.
"""

from rlsys.rewards.code import (
    DEFAULT_CODE_TIMEOUT_S,
    build_program,
    code_accuracy_reward,
    extract_code,
)
from rlsys.rewards.language import (
    SCRIPTS,
    TARGETS,
    LanguageReward,
    extract_reasoning,
    language_consistency,
    language_consistency_reward,
    make_language_reward,
    word_scripts,
)
from rlsys.rewards.length import overlong_penalty
from rlsys.rewards.registry import (
    ACCURACY_PARTS,
    REWARD_FUNCTIONS,
    RewardFn,
    check_weights,
    compute_reward,
    correctness_part,
    is_correct,
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
    "ACCURACY_PARTS",
    "DEFAULT_CODE_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "REWARD_FUNCTIONS",
    "SCRIPTS",
    "TARGETS",
    "LanguageReward",
    "RewardFn",
    "accuracy_reward",
    "build_program",
    "check_weights",
    "code_accuracy_reward",
    "compute_reward",
    "correctness_part",
    "extract_answer",
    "extract_code",
    "extract_reasoning",
    "format_reward",
    "is_correct",
    "language_consistency",
    "language_consistency_reward",
    "make_language_reward",
    "overlong_penalty",
    "register_reward",
    "tag_count_reward",
    "word_scripts",
]
