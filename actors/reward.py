"""Reward workers: Ray actors that score completions with the pure functions of rlsys.rewards.

Verifiers run here, not in the driver: they can be slow (symbolic math, sandboxed code) and
math-verify's timeouts use `signal.alarm`, which only works in a process's main thread — the
thread a plain (synchronous) Ray actor runs its methods on.
"""

from __future__ import annotations

import threading

import ray

from rlsys.rewards import compute_reward


class RewardWorker:
    """Scores (response, gold answer) pairs; one instance per Ray actor."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)

    def score(self, responses: list[str], golds: list[str]) -> list[dict[str, float]]:
        return [compute_reward(r, g, self.weights) for r, g in zip(responses, golds, strict=True)]

    def in_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()


class RewardPool:
    """M reward workers; a batch is split into M contiguous chunks scored in parallel."""

    def __init__(self, num_workers: int, weights: dict[str, float], *, num_cpus: float = 0.5,
                 timeout_s: float = 60.0, name_prefix: str = "reward") -> None:
        actor_cls = ray.remote(RewardWorker)
        self.timeout_s = timeout_s
        self.workers = [
            actor_cls.options(name=f"{name_prefix}-{i}", num_cpus=num_cpus,
                              max_concurrency=1).remote(weights)
            for i in range(num_workers)
        ]

    def score(self, responses: list[str], golds: list[str]) -> list[dict[str, float]]:
        """Rewards of every response, in order: {"total": ..., <part>: ...} each."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        k = len(self.workers)
        bounds = [len(responses) * i // k for i in range(k + 1)]
        refs = [w.score.remote(responses[a:b], golds[a:b])
                for w, a, b in zip(self.workers, bounds, bounds[1:], strict=False) if b > a]
        out: list[dict[str, float]] = []
        for part in ray.get(refs, timeout=self.timeout_s):
            out += part
        return out

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
