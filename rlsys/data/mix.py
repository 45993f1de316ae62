"""The mix task: several tasks in one run, each problem drawn from one of them."""

from __future__ import annotations

import itertools
import random
from typing import Any

from rlsys.data.tasks import TASKS, DataError, Problem, RunConfig, Task, register_task


@register_task
class MixtureTask(Task):
    """Several tasks in one run (R1's all-scenario RL): each drawn problem comes from a task
    chosen at random with the given shares, and keeps that task's name in `Problem.task`, so the
    reward pool applies that task's reward weights.

    Draw i's task is a pure function of (seed, i), so the state is a draw counter plus each
    component's own state. The held-out split is every component's split, in order.
    """

    name = "mix"

    def __init__(self, tasks: dict[str, Task], shares: dict[str, float], seed: int = 0) -> None:
        if not tasks or set(tasks) != set(shares):
            raise DataError(f"mix task: tasks {sorted(tasks)} and shares {sorted(shares)} must "
                            "name the same, non-empty set of tasks")
        bad = {k: v for k, v in shares.items() if not (isinstance(v, int | float) and v > 0)}
        if bad:
            raise DataError(f"data.mix: shares must be positive numbers, got {bad}")
        self.tasks, self.seed = dict(tasks), seed
        self._names = list(tasks)
        self._shares = [float(shares[n]) for n in self._names]
        self._draws = 0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> MixtureTask:
        mix = cfg.data.mix
        return cls(tasks={name: TASKS[name].from_config(cfg) for name in mix}, shares=dict(mix),
                   seed=cfg.trainer.seed)

    def _choose(self, i: int) -> str:
        return random.Random(f"mix|{self.seed}|{i}").choices(self._names, self._shares)[0]

    def sample(self, n: int) -> list[Problem]:
        names = [self._choose(self._draws + i) for i in range(self._check_n(n))]
        self._draws += n
        drawn = {name: iter(self.tasks[name].sample(names.count(name))) for name in self._names}
        return [next(drawn[name]) for name in names]

    def eval_problems(self) -> list[Problem]:
        """Every component's held-out split, interleaved, so that a prefix (trainer.eval_size)
        still covers every task."""
        splits = [self.tasks[name].eval_problems() for name in self._names]
        return [p for row in itertools.zip_longest(*splits) for p in row if p is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.name, "draws": self._draws,
                "components": {name: t.state_dict() for name, t in self.tasks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ("draws",))
        saved = state.get("components")
        if not isinstance(saved, dict) or set(saved) != set(self.tasks):
            raise DataError(f"mix task: state dict holds tasks {sorted(saved or {})}, this run "
                            f"mixes {sorted(self.tasks)}")
        for name, task in self.tasks.items():
            task.load_state_dict(saved[name])
        self._draws = state["draws"]
