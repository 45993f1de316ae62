"""GRPO math: pure tensor functions for advantages, KL, loss aggregation and the GRPO loss,
rollout importance weights and KL-shaped rewards."""

from rlsys.algo.grpo import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    ROLLOUT_IS_MODES,
    adapt_entropy_coef,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    policy_loss,
    rollout_is_weights,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "ROLLOUT_IS_MODES",
    "adapt_entropy_coef",
    "aggregate_loss",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "policy_loss",
    "rollout_is_weights",
]
