"""GRPO math: pure tensor functions for advantages, KL, loss aggregation and the GRPO loss."""

from rlsys.algo.grpo import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    policy_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
]
