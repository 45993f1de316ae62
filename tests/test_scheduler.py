"""The schedulers' rules: how far ahead the engines may sample, and the in-flight sizing (the
schedulers' behaviour end to end is in test_e2e and test_faults)."""

from __future__ import annotations

from rlsys.config import load_config
from rlsys.scheduler import RolloutScheduler, StreamScheduler, inflight_capacity


def test_the_first_on_policy_steps_sample_nothing_ahead():
    """rollout.on_policy_steps=3 with max_staleness=2: steps 1-3 train on samples of their own
    weights, so steps 1 and 2 start nothing for later steps; from step 3 on the engines start
    the next two steps' prompts before the update (step 4 is the first stale one)."""
    cfg = load_config(["conf=tiny", "rollout.max_staleness=2", "rollout.on_policy_steps=3"])
    for scheduler in (RolloutScheduler, StreamScheduler):
        plan = scheduler(cfg, None, None, None, None)
        assert [plan.ahead(step) for step in range(1, 6)] == [0, 0, 2, 2, 2]
    on_policy = load_config(["conf=tiny", "rollout.max_staleness=0"])
    assert RolloutScheduler(on_policy, None, None, None, None).ahead(1) == 0


def test_inflight_capacity_is_what_the_next_steps_consume():
    # Without dynamic sampling (every group kept): B per step.
    assert inflight_capacity(8, 1, 1.0, 4) == 8
    assert inflight_capacity(8, 2, 1.0, 4) == 16
    # 40% of groups carry signal: a step consumes 20 groups.
    assert inflight_capacity(8, 1, 0.4, 4) == 20
    assert inflight_capacity(8, 2, 0.4, 4) == 40
    # The rate is floored at 1 / max_sampling_rounds: never more than a step may take.
    assert inflight_capacity(8, 1, 0.0, 4) == 32
    assert inflight_capacity(8, 1, 0.1, 4) == 32
    # Rounding up, not down, and no float dust: 8 / 0.8 is 10, not 11.
    assert inflight_capacity(8, 1, 0.8, 4) == 10
    assert inflight_capacity(3, 1, 0.7, 4) == 5
