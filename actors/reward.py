"""Reward workers: Ray actors that score completions with the pure functions of rlsys.rewards.

Verifiers run here, not in the driver: they can be slow (symbolic math, sandboxed code) and
math-verify's timeouts use `signal.alarm`, which only works in a process's main thread — the
thread a plain (synchronous) Ray actor runs its methods on.

Robustness: a verifier that raises on one completion must not cost the whole batch, and a
worker that hangs or dies must not stall training. So `RewardWorker.score` turns a per-item
exception into a zero reward marked `error`, and `RewardPool.score` puts a deadline on every
chunk it hands out, kills and replaces a hung or dead worker, and re-runs its chunk elsewhere.

Reward model: the `preference` part (R1's all-scenario RL, for prompts without a checkable
answer) is not a function of (response, gold) but of (prompt, response), scored by a model. A
worker whose weights (default or per task) use it loads the `reward.model` once, on first use
(rlsys.rewards.model_scorer), and scores the items that need it in batches; the value then
joins each item's parts and weighted total like any other part.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray

from rlsys.ray_errors import ACTOR_LOST
from rlsys.rewards import RewardFn, compute_reward
from rlsys.rewards.registry import PREFERENCE

logger = logging.getLogger(__name__)

#: How long to keep trying to re-create a named actor: the name of a killed actor is released
#: asynchronously by the GCS, so an immediate re-creation can still find it taken.
_RENAME_WAIT_S = 10.0


class RewardWorker:
    """Scores (response, gold answer) pairs; one instance per Ray actor.

    `parts` are reward functions by name that this worker uses instead of, or besides, the
    registered ones: the language-consistency part for the configured target language, or in
    tests parts that raise or hang (functions defined locally are pickled by value, so the
    worker needs no importable module for them).

    `model` holds the keyword arguments of rlsys.rewards.model_scorer.ModelScorer (path,
    kind, ...): the reward model of the `preference` part, built on first use. None = no
    reward model; an item whose weights use `preference` then gets error=1.
    """

    def __init__(self, weights: dict[str, float],
                 parts: Mapping[str, RewardFn] | None = None,
                 per_task: Mapping[str, dict[str, float]] | None = None,
                 model: Mapping[str, Any] | None = None) -> None:
        self.weights = dict(weights)
        self.parts = dict(parts or {})
        self.per_task = {task: dict(w) for task, w in (per_task or {}).items()}
        self.model_options = dict(model) if model else None
        self._scorer: Any = None  # a ModelScorer, built by `_preferences` on first use

    def _preferences(self, responses: list[str], prompts: list[str] | None,
                     need: list[int]) -> dict[int, float | str | BaseException]:
        """The `preference` value of items `need` (indices), or why an item has none."""
        if not need:
            return {}
        if prompts is None:
            return dict.fromkeys(need, f"the {PREFERENCE!r} reward part scores (prompt, "
                                       "response) pairs: pass prompts= to RewardPool.score")
        if self.model_options is None:
            return dict.fromkeys(need, f"the {PREFERENCE!r} reward part needs a reward model: "
                                       "set reward.model.path")
        if self._scorer is None:
            # A model that cannot be loaded raises (a configuration problem, not one item's):
            # the caller's `score` call fails loudly.
            from rlsys.rewards.model_scorer import ModelScorer

            self._scorer = ModelScorer(**self.model_options)
        try:
            values = self._scorer.score([prompts[i] for i in need], [responses[i] for i in need])
        except Exception as exc:  # a scoring bug costs these items, not the batch's other parts
            return dict.fromkeys(need, exc)
        return {i: v if math.isfinite(v) else f"the reward model scored {v}"
                for i, v in zip(need, values, strict=True)}

    def score(self, responses: list[str], golds: list[str], tasks: list[str] | None = None,
              offset: int = 0, prompts: list[str] | None = None) -> list[dict[str, float]]:
        """Rewards of each pair; an item whose verifier raises gets 0 everywhere and error=1.

        `tasks` names each item's task: its `per_task` weights replace the default ones.
        `offset` is the index of the first item in the caller's batch, only used in the log.
        `prompts` (the question of each item) are needed by items whose weights use the
        `preference` part; such an item without a prompt gets error=1.
        """
        out: list[dict[str, float]] = []
        failed: list[int] = []
        first_exc: BaseException | None = None
        tasks = tasks if tasks is not None else [""] * len(responses)
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        need = [i for i, task in enumerate(tasks)
                if PREFERENCE in self.per_task.get(task, self.weights)]
        preference = self._preferences(responses, prompts, need)
        for i, (r, g, task) in enumerate(zip(responses, golds, tasks, strict=True)):
            weights = self.per_task.get(task, self.weights)
            parts = self.parts
            if i in preference:
                parts = {**self.parts, PREFERENCE: _fixed(preference[i])}
            try:
                score = compute_reward(r, g, weights, parts)
            except Exception as exc:  # any verifier bug must only cost this one item
                failed.append(offset + i)
                first_exc = first_exc or exc
                score = {"total": 0.0, **dict.fromkeys(weights, 0.0), "error": 1.0}
            else:
                score["error"] = 0.0
            out.append(score)
        if first_exc is not None:
            # One record per call, not per item, so a systematic failure cannot flood the log.
            logger.error("reward computation raised for %d item(s) at batch indices %s; first:",
                         len(failed), failed, exc_info=first_exc)
        return out

    def in_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()


def _fixed(value: float | str | BaseException) -> Callable[[str, str], float]:
    """A reward part returning an already computed value, or raising why there is none (a
    message, or the exception scoring raised: a fresh error per item, caused by it)."""
    def part(response: str, gold: str) -> float:
        if isinstance(value, str):
            raise ValueError(value)
        if isinstance(value, BaseException):
            raise ValueError(f"the reward model failed: {value!r}") from value
        return value

    return part


@dataclass
class _Chunk:
    """A contiguous slice [start, stop) of the batch and how often it has been re-submitted."""

    start: int
    stop: int
    attempts: int = 0
    last_worker: int | None = None


class RewardPool:
    """M reward workers; a batch is split into M contiguous chunks scored in parallel.

    Each chunk gets `timeout_s` from the moment it is handed to an idle worker. A chunk whose
    worker times out or dies is re-submitted (preferably to a different worker) up to
    `max_retries` times; the failed worker is killed and replaced by a fresh actor of the same
    name, so the pool always has M workers.

    `model` (ModelScorer's keyword arguments) is the reward model of the `preference` part;
    each worker loads its own copy on first use, so `timeout_s` must cover that load.
    """

    def __init__(self, num_workers: int, weights: dict[str, float], *, num_cpus: float = 0.5,
                 timeout_s: float = 60.0, name_prefix: str = "reward", max_retries: int = 2,
                 parts: Mapping[str, RewardFn] | None = None,
                 per_task: Mapping[str, dict[str, float]] | None = None,
                 model: Mapping[str, Any] | None = None,
                 resources: Mapping[str, float] | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.name_prefix = name_prefix
        self._weights = dict(weights)
        self._parts = dict(parts or {})
        self._per_task = {task: dict(w) for task, w in (per_task or {}).items()}
        self._model = dict(model) if model else None
        self._actor_cls = ray.remote(RewardWorker)
        self._num_cpus = num_cpus
        self._resources = dict(resources or {})  # Ray custom resources (reward.resources)
        # retries: chunk re-submissions; restarts: workers replaced; errors: items that raised.
        self.stats: dict[str, int] = {"retries": 0, "restarts": 0, "errors": 0}
        self.workers = [self._spawn(i) for i in range(num_workers)]

    def _spawn(self, i: int) -> ray.actor.ActorHandle:
        name = f"{self.name_prefix}-{i}"
        deadline = time.monotonic() + _RENAME_WAIT_S
        while True:
            try:
                opts = self._actor_cls.options(name=name, num_cpus=self._num_cpus,
                                               resources=self._resources, max_concurrency=1)
                return opts.remote(self._weights, self._parts, self._per_task, self._model)
            except ValueError:  # name still held by the actor we just killed
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _restart(self, i: int) -> None:
        # no_restart: the handle must not come back; we make a new one under the same name.
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._spawn(i)
        self.stats["restarts"] += 1

    def score(self, responses: list[str], golds: list[str], tasks: list[str] | None = None,
              prompts: list[str] | None = None) -> list[dict[str, float]]:
        """Rewards of every response, in order: {"total": ..., <part>: ..., "error": 0|1} each.

        `tasks` names each response's task, which selects its `per_task` reward weights.
        `prompts` is each response's question, for the `preference` part (reward model).
        """
        tasks = tasks if tasks is not None else [""] * len(responses)
        if not len(responses) == len(golds) == len(tasks) or (
                prompts is not None and len(prompts) != len(responses)):
            raise ValueError(f"{len(responses)} responses, {len(golds)} gold answers, "
                             f"{len(tasks)} task names and "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        n, k = len(responses), len(self.workers)
        bounds = [n * i // k for i in range(k + 1)]
        queue = [_Chunk(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        results: dict[int, list[dict[str, float]]] = {}  # chunk start -> its scores
        # ref -> (chunk, worker index, monotonic deadline)
        in_flight: dict[ray.ObjectRef, tuple[_Chunk, int, float]] = {}
        idle = set(range(k))

        def fail(chunk: _Chunk, worker: int, why: str) -> None:
            self._restart(worker)
            idle.add(worker)
            if chunk.attempts >= self.max_retries:
                lost = chunk.stop - chunk.start + sum(c.stop - c.start for c in queue) + sum(
                    c.stop - c.start for c, _, _ in in_flight.values())
                raise RuntimeError(
                    f"reward pool: {lost} of {n} completions could not be scored; chunk "
                    f"[{chunk.start}, {chunk.stop}) {why} on {chunk.attempts + 1} attempt(s)")
            chunk.attempts += 1
            chunk.last_worker = worker
            self.stats["retries"] += 1
            logger.warning("reward chunk [%d, %d) %s on worker %d; retry %d/%d", chunk.start,
                           chunk.stop, why, worker, chunk.attempts, self.max_retries)
            queue.append(chunk)

        while queue or in_flight:
            while queue and idle:
                chunk = queue.pop(0)
                # Prefer a worker other than the one this chunk just failed on.
                others = sorted(idle - {chunk.last_worker})
                w = others[0] if others else idle.pop()
                idle.discard(w)
                part = slice(chunk.start, chunk.stop)
                ref = self.workers[w].score.remote(
                    responses[part], golds[part], tasks[part], chunk.start,
                    None if prompts is None else prompts[part])
                in_flight[ref] = (chunk, w, time.monotonic() + self.timeout_s)
            next_due = min(due for _, _, due in in_flight.values())
            ready, _ = ray.wait(list(in_flight), num_returns=1,
                                timeout=max(0.0, next_due - time.monotonic()))
            for ref in ready:
                chunk, w, _ = in_flight.pop(ref)
                try:
                    results[chunk.start] = ray.get(ref)
                except ACTOR_LOST as exc:
                    fail(chunk, w, f"lost its worker ({type(exc).__name__})")
                else:
                    idle.add(w)
            now = time.monotonic()
            for ref, (chunk, w, due) in list(in_flight.items()):
                if due <= now and ref not in ready:
                    del in_flight[ref]
                    fail(chunk, w, f"timed out after {self.timeout_s:g}s")

        out = [s for start in sorted(results) for s in results[start]]
        self.stats["errors"] += sum(int(s.get("error", 0.0)) for s in out)
        return out

    def pool_stats(self) -> dict[str, int]:
        """Counters since the pool started (retries, restarts, errors), for the trainer's log."""
        return dict(self.stats)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
