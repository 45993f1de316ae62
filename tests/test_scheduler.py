"""The in-flight scheduler's sizing rule (the scheduler's behaviour end to end is in test_e2e and
test_faults)."""

from __future__ import annotations

from rlsys.scheduler import inflight_capacity


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
