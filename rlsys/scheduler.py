"""What to sample and when: prompt draws, sampling rounds, dynamic sampling, sampling ahead.

The training loop asks `next_batch(step)` for B groups of G scored completions. Behind it:
    * prompts are drawn from the task's sampler (its state is what a checkpoint keeps) and
      those too long for the engine's context are skipped and counted;
    * the engines sample G completions of each; the reward pool scores them (rlsys.sampling);
    * with `algorithm.dynamic_sampling` (DAPO) groups whose rewards are all equal are dropped
      and more prompts are drawn, up to `rollout.max_sampling_rounds` rounds;
    * with `rollout.max_staleness` = k > 0 the first rounds of the next k steps are started
      now (`sample_ahead`), so the engines sample while the learner trains; not during the
      first `rollout.on_policy_steps` steps (`ahead`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlsys.build import fitting_prompts
from rlsys.ray_errors import ACTOR_LOST
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

    def ahead(self, step: int) -> int:
        """How many steps past `step` the engines may start on before its update:
        `rollout.max_staleness`, or 0 while the next step is among the first
        `rollout.on_policy_steps` (it then samples with the weights that train on it)."""
        r = self.cfg.rollout
        return r.max_staleness if step >= r.on_policy_steps else 0

    def score(self, problems: list[Problem], samples: list[dict], n: int) -> list[dict]:
        """Rewards of the n completions of each problem (rlsys.sampling.score_samples)."""
        return score_samples(self.cfg, self.rewards, problems, samples, n)

    def submit_round(self, step: int, round_: int, count: int) -> SubmittedRound:
        """Draw `count` prompts and start the engines on G completions of each."""
        r = self.cfg.rollout
        task_state = self.task.state_dict()
        problems, prompts, skipped = fitting_prompts(self.cfg, self.tokenizer,
                                                     self.task.sample(count))
        chunks = self.fleet.rollout.submit(prompts, n=r.group_size,
                                           temperature=r.temperature_at(step),
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
        for later in range(last + 1, min(step + self.ahead(step), self.cfg.trainer.steps) + 1):
            self.pending.append(self.submit_round(later, 0, self.cfg.rollout.prompts_per_step))

    def in_flight(self) -> list:
        """Result refs of the rounds sampled ahead (the engines finish them before an update)."""
        return [chunk.ref for submitted in self.pending for chunk in submitted.chunks]

    def discard(self) -> None:
        """Forget the rounds sampled ahead: a learner restart rolls the run back to a
        checkpoint, whose sampler state draws them again. (The engines still finish them,
        before the restarted group's weights reach them.)"""
        self.pending.clear()

    def step_stats(self, batch: Batch) -> dict[str, float]:
        """Figures of the step `batch` was sampled for beyond step_metrics' own: none here
        (the in-flight scheduler has its idle fractions and engine time)."""
        return {}

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


@dataclass
class _Queued:
    """A group the engines are generating: its problem, prompt, engine, and the data sampler
    as it was before the problem was drawn (`order` counts draws)."""

    problem: Problem
    prompt: str
    worker: Any
    task_state: dict
    order: int


def inflight_capacity(prompts_per_step: int, steps: int, signal_frac: float,
                      max_sampling_rounds: int) -> int:
    """Groups that `steps` steps consume: B x steps groups with signal, expected at the last
    step's rate,

        ceil(B x steps / max(signal_frac, 1 / max_sampling_rounds)).

    With dynamic sampling a step consumes B / signal_frac groups, not B: starting only B per
    step would leave the trainer waiting, each step, for the groups it drops. The floor on the
    rate caps the draw at what a step may take.
    """
    rate = max(signal_frac, 1 / max_sampling_rounds)
    return math.ceil(prompts_per_step * steps / rate - 1e-9)


class StreamScheduler(RolloutScheduler):
    """`rollout.inflight`: the engines generate continuously and never drain.

    Every engine runs its step loop (actors/engine_stream.py). Once a step has taken its
    batch, and before its update, this starts the groups of the next rollout.max_staleness = k
    steps (`capacity`) across the engines, least-loaded first: they generate under the weights
    the step trains from, while the learner updates, and are at most k versions old when their
    turn comes (from step `rollout.on_policy_steps` on: before, the next step's groups start
    once this step's weights have landed). (Keeping k + 1 steps' worth in hand, as this did at
    first, ages the extra groups past k before their turn: measured, 6 groups dropped at one
    step and a 34 s wait.) `next_batch` takes finished groups as they come, starting more only
    if those in hand cannot fill the batch (the first step; dynamic sampling dropping more than
    expected), scores them and keeps those that are fresh enough: a group whose oldest token is
    more than `rollout.max_staleness` versions behind the policy about to train on it is dropped and
    counted (`rollout/stale_dropped`), not re-generated: a fresh draw costs the same and the
    data order stays simple. Groups beyond B wait for the next step. Weight updates reach the
    engines between decode steps (`EngineFleet.publish` does not wait for anything in flight).

    Dynamic sampling: groups without signal are dropped as in batch mode; a step that has
    taken B x `rollout.max_sampling_rounds` groups without B good ones trains on what it has.
    An engine that dies loses nothing: its groups in flight start again on the others.
    Checkpoints keep the sampler as it was before the oldest group in flight was drawn, so a
    resumed run draws every group that was in flight again (a group that finished out of order
    before the checkpoint may be drawn twice). Streamed samples are unseeded: which tokens an
    update splits depends on timing, so an in-flight run is not reproducible sample for sample.
    """

    POLL_S = 0.2  # longest an engine's stream_take waits; a weight update may queue behind it

    def __init__(self, cfg: Config, task: Task, tokenizer: PreTrainedTokenizerBase,
                 fleet: EngineFleet, rewards: RewardPool) -> None:
        super().__init__(cfg, task, tokenizer, fleet, rewards)
        self.queued: dict[str, _Queued] = {}
        self.polls: dict[Any, Any] = {}  # engine -> its outstanding stream_take ref
        # Scored groups not trained on yet, with (draw order, sampler state before the draw).
        self.finished: deque[tuple[Group, int, dict]] = deque()
        self.ids = itertools.count()
        self.engine_counters: dict[Any, dict[str, float]] = {}
        self.stale_dropped = 0
        # Of the fresh groups the last step took, the fraction with signal (dynamic sampling).
        self.signal_frac = 1.0
        self.window = {"engine_busy_s": 0.0, "engine_wall_s": 0.0, "trainer_wait_s": 0.0,
                       "since": time.perf_counter()}

    @property
    def capacity(self) -> int:
        """Groups to hold after a step's take: what the next max_staleness steps consume."""
        r = self.cfg.rollout
        return inflight_capacity(r.prompts_per_step, r.max_staleness, self.signal_frac,
                                 r.max_sampling_rounds)

    def wanted(self, missing: int) -> int:
        """Groups in hand that should fill the `missing` places of the batch being taken."""
        r = self.cfg.rollout
        return inflight_capacity(missing, 1, self.signal_frac, r.max_sampling_rounds)

    def next_batch(self, step: int) -> Batch:
        r, dynamic = self.cfg.rollout, self.cfg.algorithm.dynamic_sampling
        batch, taken = Batch([], [], rounds=1), 0
        wait_start = time.perf_counter()
        while len(batch.groups) < r.prompts_per_step:
            if not self.finished:
                self.refill(batch, self.wanted(r.prompts_per_step - len(batch.groups)))
                self.poll(batch)
                continue
            group, _, _ = self.finished.popleft()
            taken += 1
            oldest = min(s["weight_version"] for s in group.samples)
            if self.fleet.version - oldest > r.max_staleness:
                self.stale_dropped += 1
                continue
            batch.drawn.append(group)
            if group.has_signal or not dynamic:
                batch.groups.append(group)
            elif taken >= r.prompts_per_step * r.max_sampling_rounds:
                break
        fresh = len(batch.drawn)
        if dynamic and fresh:
            self.signal_frac = len(batch.groups) / fresh
        batch.gen_wait_s = time.perf_counter() - wait_start - batch.reward_s
        self.window["trainer_wait_s"] += batch.gen_wait_s
        # The next steps' groups, under the weights this batch trains from (see the class).
        if self.ahead(step):
            self.refill(batch, self.capacity)
        return batch

    def refill(self, batch: Batch, target: int) -> None:
        """Draw prompts until `target` groups are in hand (in flight, or finished and not yet
        trained on), least-loaded engine first."""
        self.fleet_changes()
        room = target - len(self.queued) - len(self.finished)
        if room <= 0:
            return
        task_state = self.task.state_dict()
        problems, prompts, skipped = fitting_prompts(self.cfg, self.tokenizer,
                                                     self.task.sample(room))
        batch.skipped += skipped
        order = next(self.ids)
        self.submit([_Queued(problem, prompt, None, task_state, order)
                     for problem, prompt in zip(problems, prompts, strict=True)])

    def submit(self, items: list[_Queued]) -> None:
        """Start the groups on the least-loaded engines."""
        import ray

        workers = self.fleet.rollout.workers
        load = {w: sum(q.worker is w for q in self.queued.values()) for w in workers}
        per_worker: dict[Any, list[dict]] = {}
        for item in items:
            item.worker = min(workers, key=lambda w: load[w])
            load[item.worker] += 1
            request_id = f"group-{next(self.ids)}"
            self.queued[request_id] = item
            per_worker.setdefault(item.worker, []).append(
                {"id": request_id, "prompt": item.prompt, "n": self.cfg.rollout.group_size,
                 "sampling": self.sampling()})
        # Adds are quick; waiting for them finds an engine that died since the last poll.
        refs = {w: w.stream_add.remote(requests) for w, requests in per_worker.items()}
        dead = []
        for worker, ref in refs.items():
            try:
                ray.get(ref)
            except ACTOR_LOST:
                dead.append(worker)
        if dead:
            self.fleet.rollout.forget(dead)
            self.fleet_changes()  # their groups start again on the others

    def sampling(self) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_new_tokens}

    def poll(self, batch: Batch) -> None:
        """Wait for some engine's finished groups (at most POLL_S), score them into
        `finished`; an engine found dead has its groups start again on the others."""
        import ray

        pool = self.fleet.rollout
        for worker in pool.workers:
            if worker not in self.polls:
                self.polls[worker] = worker.stream_take.remote(self.POLL_S)
        done, _ = ray.wait(list(self.polls.values()), num_returns=1,
                           timeout=10 * self.POLL_S)
        by_ref = {ref: w for w, ref in self.polls.items()}
        arrived: list[tuple[_Queued, list[dict]]] = []
        for ref in done:
            worker = by_ref[ref]
            del self.polls[worker]
            try:
                result = ray.get(ref)
            except ACTOR_LOST:
                pool.forget([worker])
                continue
            self.count_engine(worker, result["stats"])
            for group in result["groups"]:
                queued = self.queued.pop(group["id"], None)
                if queued is not None:
                    arrived.append((queued, group["samples"]))
        if arrived:
            t0 = time.perf_counter()
            n = self.cfg.rollout.group_size
            samples = [s for _, group in arrived for s in group]
            scores = self.score([q.problem for q, _ in arrived], samples, n)
            self.finished.extend(
                (Group(q.problem, samples[i * n:(i + 1) * n], scores[i * n:(i + 1) * n]),
                 q.order, q.task_state) for i, (q, _) in enumerate(arrived))
            batch.reward_s += time.perf_counter() - t0
        self.fleet_changes()

    def fleet_changes(self) -> None:
        """Engines gone (died, scaled down): their groups start again on the others; new
        engines (scaled up, replacements) start their step loop."""
        import ray

        pool = self.fleet.rollout
        if not pool.workers:
            self.fleet.replace_all_engines()
        live = set(pool.workers)
        orphans = [self.queued.pop(i) for i, q in list(self.queued.items())
                   if q.worker not in live]
        for worker in [w for w in self.polls if w not in live]:
            del self.polls[worker]
        new = [w for w in pool.workers if w not in self.engine_counters]
        if new:
            ray.get([w.stream_start.remote() for w in new])
            for w in new:
                self.engine_counters[w] = {}
        if orphans:
            self.submit(orphans)

    def refresh_engine_counters(self) -> None:
        """Read every engine's counters now: polls alone would leave out what an engine did
        since the step's last poll (e.g. all of an update's overlap), putting it in the next
        step's figures instead."""
        import ray

        refs = {w: w.stream_stats.remote() for w in self.fleet.rollout.workers
                if w in self.engine_counters}
        for worker, ref in refs.items():
            # One found gone is left to the next poll, which starts its groups again elsewhere.
            with contextlib.suppress(ACTOR_LOST):
                self.count_engine(worker, ray.get(ref))

    def count_engine(self, worker: Any, stats: dict[str, float]) -> None:
        last = self.engine_counters.get(worker) or {}
        self.window["engine_busy_s"] += stats["busy_s"] - last.get("busy_s", 0.0)
        self.window["engine_wall_s"] += stats["wall_s"] - last.get("wall_s", 0.0)
        self.engine_counters[worker] = stats

    def step_stats(self, batch: Batch) -> dict[str, float]:
        """Close the step `batch` was sampled for: its `gen_s` becomes the engines' busy seconds
        since the last call (the previous step), overlap with the update included; returns
        rollout/trainer_idle_frac (time the trainer waited for groups), engine_idle_frac (time
        engines had nothing to do or were held, e.g. by a weight update), stale_dropped and
        in_flight over the same window."""
        self.refresh_engine_counters()
        now = time.perf_counter()
        w = self.window
        wall = max(now - w["since"], 1e-9)
        batch.gen_s = w["engine_busy_s"]
        stats = {"rollout/trainer_idle_frac": w["trainer_wait_s"] / wall,
                 "rollout/engine_idle_frac": (1 - w["engine_busy_s"] / w["engine_wall_s"]
                                              if w["engine_wall_s"] else 0.0),
                 "rollout/stale_dropped": float(self.stale_dropped),
                 "rollout/in_flight": float(len(self.queued))}
        self.window = {"engine_busy_s": 0.0, "engine_wall_s": 0.0, "trainer_wait_s": 0.0,
                       "since": now}
        return stats

    def sample_ahead(self, step: int) -> None:
        """Nothing to do: `next_batch` has started the next steps' groups already."""

    def discard(self) -> None:
        """Abort the groups in flight and forget the finished ones (see
        RolloutScheduler.discard)."""
        import ray

        live, by_worker = set(self.fleet.rollout.workers), {}
        for request_id, queued in self.queued.items():
            by_worker.setdefault(queued.worker, []).append(request_id)
        ray.get([worker.stream_abort.remote(ids) for worker, ids in by_worker.items()
                 if worker in live])
        self.queued.clear()
        self.finished.clear()

    def in_flight(self) -> list:
        """Nothing for a weight update to wait for: it lands between decode steps."""
        return []

    def state_dict(self) -> dict:
        """The sampler before the oldest group still in flight or waiting was drawn."""
        held = [(q.order, q.task_state) for q in self.queued.values()]
        held += [(order, state) for _, order, state in self.finished]
        return min(held, key=lambda h: h[0])[1] if held else self.task.state_dict()
