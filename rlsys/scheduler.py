"""What to sample and when: prompt draws, sampling rounds, dynamic sampling, sampling ahead.

The training loop asks `next_batch(step)` for B groups of G scored completions. Behind it:
    * prompts are drawn from the task's sampler (its state is what a checkpoint keeps) and
      those too long for the engine's context are skipped and counted;
    * the engines sample G completions of each; the reward pool scores them (rlsys.sampling);
    * with `algorithm.dynamic_sampling` (DAPO) groups whose rewards are all equal are dropped
      and more prompts are drawn, up to `rollout.max_sampling_rounds` rounds;
    * with `rollout.max_staleness` = k > 0 the first rounds of the next k steps are started
      now (`sample_ahead`), so the engines sample while the learner trains.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlsys.build import fitting_prompts
from rlsys.sampling import score_samples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from actors.reward import RewardPool
    from actors.rollout import Chunk
    from rlsys.config import Config
    from rlsys.data import Problem, Task
    from rlsys.fleet import EngineFleet


@dataclass
class Group:
    """One prompt's G completions and their rewards."""

    problem: Problem
    samples: list[dict]
    scores: list[dict[str, float]]

    @property
    def has_signal(self) -> bool:
        """Rewards differ within the group, so advantages are not all zero."""
        return len({s["total"] for s in self.scores}) > 1


@dataclass
class SubmittedRound:
    """A sampling round the engines were started on: its problems and the result refs."""

    step: int
    problems: list[Problem]
    chunks: list[Chunk]
    skipped: int  # prompts drawn but dropped for not fitting the context
    task_state: dict  # the sampler before these problems were drawn (what a checkpoint keeps)


@dataclass
class Batch:
    """What one step trains on (`groups`), every group drawn for it, and how it was sampled."""

    groups: list[Group]
    drawn: list[Group]
    rounds: int = 0
    skipped: int = 0
    gen_s: float = 0.0  # the engines' generation seconds (slowest engine per round)
    gen_wait_s: float = 0.0  # seconds the driver waited for the engines
    reward_s: float = 0.0


class RolloutScheduler:
    """Draws prompts and turns them into scored groups on the fleet's engines."""

    def __init__(self, cfg: Config, task: Task, tokenizer: PreTrainedTokenizerBase,
                 fleet: EngineFleet, rewards: RewardPool) -> None:
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.fleet, self.rewards = fleet, rewards
        self.pending: deque[SubmittedRound] = deque()  # rounds sampled ahead (staleness)

    def next_batch(self, step: int) -> Batch:
        """B groups of G scored completions for the update, and every group drawn.

        With dynamic sampling, groups whose G rewards are all equal are dropped, since their
        advantages are all zero and they would cost the learner a full pass for no gradient,
        and more prompts are drawn until B groups carry a signal or `rollout.max_sampling_rounds`
        is reached. Generation is cheap next to the update on this kind of machine, so trading
        extra rollouts for informative updates pays. A round sampled ahead for this step is
        taken first; later rounds sample with the current weights.
        """
        r, dynamic = self.cfg.rollout, self.cfg.algorithm.dynamic_sampling
        batch = Batch([], [])
        while len(batch.groups) < r.prompts_per_step and batch.rounds < r.max_sampling_rounds:
            if batch.rounds == 0 and self.pending and self.pending[0].step == step:
                submitted = self.pending.popleft()
            else:
                need = r.prompts_per_step - len(batch.groups)
                # Later rounds draw extra prompts, in proportion to how many groups were dropped.
                keep_rate = (max(len(batch.groups) / len(batch.drawn), 0.25) if batch.drawn
                             else 1.0)
                submitted = self.submit_round(step, batch.rounds,
                                              min(r.prompts_per_step, math.ceil(need / keep_rate)))
            batch.skipped += submitted.skipped
            t0 = time.perf_counter()
            samples, gen_seconds = self.fleet.rollout.collect(
                submitted.chunks, recover=self.fleet.replace_all_engines)
            t1 = time.perf_counter()
            scores = self.score(submitted.problems, samples, r.group_size)
            batch.gen_s += gen_seconds
            batch.gen_wait_s += t1 - t0
            batch.reward_s += time.perf_counter() - t1
            batch.rounds += 1
            n = r.group_size
            new = [Group(p, samples[i * n:(i + 1) * n], scores[i * n:(i + 1) * n])
                   for i, p in enumerate(submitted.problems)]
            batch.drawn += new
            batch.groups += [g for g in new if g.has_signal or not dynamic]
            if not dynamic:
                break
        batch.groups = batch.groups[: r.prompts_per_step]
        return batch

    def score(self, problems: list[Problem], samples: list[dict], n: int) -> list[dict]:
        """Rewards of the n completions of each problem (rlsys.sampling.score_samples)."""
        return score_samples(self.cfg, self.rewards, problems, samples, n)

    def submit_round(self, step: int, round_: int, count: int) -> SubmittedRound:
        """Draw `count` prompts and start the engines on G completions of each."""
        r = self.cfg.rollout
        task_state = self.task.state_dict()
        problems, prompts, skipped = fitting_prompts(self.cfg, self.tokenizer,
                                                     self.task.sample(count))
        chunks = self.fleet.rollout.submit(prompts, n=r.group_size, temperature=r.temperature,
                                           top_p=r.top_p, max_tokens=r.max_new_tokens,
                                           seed=self.request_seed(step, round_))
        return SubmittedRound(step, problems, chunks, skipped, task_state)

    def sample_ahead(self, step: int) -> None:
        """`rollout.max_staleness` = k > 0: submit the first rounds of steps step+1..step+k
        now, so that the engines sample them while the learner trains on step's batch.

        Engines take calls in order, so the weight update that ends this step reaches each
        engine after these batches, never inside one: a batch is sampled by one set of weights,
        at most k versions older than the policy that trains on it (each sample records its
        version; `rollout/staleness_*` logs the gap).
        """
        last = self.pending[-1].step if self.pending else step
        for ahead in range(last + 1, min(step + self.cfg.rollout.max_staleness,
                                         self.cfg.trainer.steps) + 1):
            self.pending.append(self.submit_round(ahead, 0, self.cfg.rollout.prompts_per_step))

    def in_flight(self) -> list:
        """Result refs of the rounds sampled ahead (the engines finish them before an update)."""
        return [chunk.ref for submitted in self.pending for chunk in submitted.chunks]

    def state_dict(self) -> dict:
        """The data sampler as a checkpoint keeps it: rounds sampled ahead are not kept, so
        the sampler is saved as it was before they were drawn, and a resumed run draws the
        same prompts and samples them again."""
        return self.pending[0].task_state if self.pending else self.task.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state)

    def request_seed(self, step: int, stream: int) -> int:
        """Base seed of the engines' per-prompt seeds for one generate call of a step."""
        return random.Random(f"{self.cfg.trainer.seed}|{step}|{stream}").randrange(2**30)
