"""The GRPO training loop (DeepSeekMath / DeepSeek-R1), driving Ray actors.

For each step:
    1. take B prompts from the task's sampler
    2. the rollout pool (vLLM engines) samples G completions per prompt, with log-probs
    3. the reward pool scores every completion (accuracy, format, ...); with dynamic sampling,
       groups whose rewards are all equal are dropped and more prompts are drawn
    4. advantages are normalised within each group of G (rlsys.algo.group_advantages); with
       `algorithm.kl_in_reward` each reward first pays the KL to the reference model
    5. the learner applies the clipped-ratio GRPO update with a KL penalty to the reference
       (in the loss unless it went into the reward)
    6. the learner broadcasts its new weights to every engine, which confirm the version
With `rollout.max_staleness` = k > 0 (asynchronous rollouts) the engines sample the next k
steps' first rounds during steps 4-5, with weights up to k versions old; truncated importance
sampling (`algorithm.rollout_is`) corrects for the gap. Between steps the engines are brought to
the count `python -m rlsys.scale` asked for (`apply_scaling`); an engine that dies mid-step has
its prompts re-run on another and is replaced.
Every K steps the held-out split is evaluated (greedy accuracy, and pass@1 over k samples),
and every N steps a resumable checkpoint is written (rlsys/checkpoint.py).
The driver only moves token ids, texts and metrics; weights go learner → engines directly.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from actors.controller import start_controller, stop_controller
from actors.rollout import Chunk, EnginesLost
from learners.group import LearnerFailed
from rlsys import checkpoint
from rlsys.algo import group_advantages, kl_shaped_rewards
from rlsys.build import (
    build_task,
    check_model_fits,
    check_prompt_renders,
    fitting_prompts,
    make_learner_group,
    make_metrics_logger,
    make_reward_pool,
    make_rollout_pool,
    prepare_output_dir,
    ray_session,
)
from rlsys.config import Config
from rlsys.data import Problem, Task
from rlsys.metrics import mean_parts, reflection_count
from rlsys.models import resolve_model
from rlsys.rewards.length import overlong_penalty

log = logging.getLogger("rlsys")


def train(cfg: Config) -> Path:
    """Run GRPO as configured; returns the output directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Model and data are checked before anything is written or started.
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    check_model_fits(cfg, model_path)
    task = build_task(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_renders(cfg, tokenizer, task)
    out, resume_from = prepare_output_dir(cfg)
    with ray_session(cfg):
        trainer = GRPOTrainer(cfg, model_path, tokenizer, task, out)
        try:
            trainer.fit(trainer.restore(resume_from) if resume_from else 0)
        except LearnerFailed as exc:
            raise RunStopped(exc, out) from None
        finally:
            trainer.shutdown()
    return out


class RunStopped(RuntimeError):
    """A failure the run cannot continue through, with where to resume from."""

    def __init__(self, cause: BaseException, out: Path) -> None:
        last = checkpoint.latest_checkpoint(out)
        where = (f"the last complete checkpoint is {last}; rerun with trainer.resume=auto and "
                 f"trainer.output_dir={out} to continue from it" if last else
                 "no checkpoint was written yet (trainer.checkpoint_every)")
        super().__init__(f"{cause}; the run stopped: {where}")


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


class GRPOTrainer:
    """Owns the actor pools and runs `fit()`: the loop in the module docstring."""

    def __init__(self, cfg: Config, model_path: str, tokenizer: PreTrainedTokenizerBase,
                 task: Task, out: Path) -> None:
        self.cfg, self.task, self.out = cfg, task, out
        self.tokenizer = tokenizer
        r, lc = cfg.rollout, cfg.learner
        # First, so that a second run in the same Ray namespace stops before starting actors;
        # `python -m rlsys.scale` reaches the run through it (see apply_scaling).
        self.controller = start_controller(r.num_workers)
        try:
            t0 = time.perf_counter()
            self.learner = make_learner_group(cfg, model_path, cfg.algorithm,
                                              temperature=r.temperature,
                                              max_response_len=r.max_new_tokens)
            self.rollout = make_rollout_pool(cfg, model_path, out / ".vllm")
            self.rewards = make_reward_pool(cfg)
            self.version = 0
            self.engine_restarts = 0  # engines lost (and replaced) so far
            self.pending: deque[SubmittedRound] = deque()  # rounds sampled ahead (staleness)
            self._connect_weight_sync()
            log.info("actors ready in %.1fs: %d rollout engine(s), %d reward worker(s), "
                     "%d learner worker(s) (tp=%d x dp=%d)", time.perf_counter() - t0,
                     r.num_workers, cfg.reward.num_workers, lc.tp * lc.dp, lc.tp, lc.dp)
            self.metrics = make_metrics_logger(cfg, out)
        except BaseException:
            # In a shared Ray session (pipeline stages, tests) the actors, and the controller's
            # name, would otherwise outlive the failed run.
            self.shutdown()
            raise
        if r.max_staleness and cfg.algorithm.rollout_is == "none":
            log.warning("rollout.max_staleness=%d trains on samples from older weights without "
                        "a correction; consider algorithm.rollout_is=token", r.max_staleness)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self, start_step: int = 0) -> None:
        """Train steps start_step + 1 .. trainer.steps (start_step > 0 after a resume)."""
        t = self.cfg.trainer
        if start_step == 0:
            self.metrics.log(0, self.evaluate(0))
        bar = _progress(t.steps, enabled=t.progress)
        bar.update(start_step)
        for step in range(start_step + 1, t.steps + 1):
            self.apply_scaling(step)
            stats = self.train_step(step)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                stats |= self.evaluate(step)
            self.metrics.log(step, stats)
            if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.steps):
                self.save_checkpoint(step)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{stats[k]:.2f}" for k in
                             ("reward/total", "reward/accuracy", "eval/accuracy") if k in stats})
        bar.close()
        if t.save_final:
            path = self.learner.save_pretrained(str(self.out / "final"))
            log.info("saved the trained policy to %s", path)

    def train_step(self, step: int) -> dict[str, float]:
        r, a = self.cfg.rollout, self.cfg.algorithm
        t0 = time.perf_counter()
        groups, drawn, timing = self.sample_groups(step)
        if r.max_staleness:
            self.prefetch(step)
        samples = [s for g in groups for s in g.samples]
        rewards = torch.tensor([sc["total"] for g in groups for sc in g.scores])
        t_update = t_sync = time.perf_counter()
        trained_version = self.version
        learner_stats: dict[str, float] = {}
        kl_stats: dict[str, float] = {}
        sync = {"bytes": 0.0, "seconds": 0.0}
        if groups:  # dynamic sampling can come back empty-handed: then there is nothing to learn
            batch = {"prompt_ids": [s["prompt_ids"] for s in samples],
                     "response_ids": [s["token_ids"] for s in samples],
                     "rollout_logprobs": [s["logprobs"] for s in samples],
                     "loss_mask": [not (self.cfg.reward.truncated == "mask"
                                        and s["finish_reason"] == "length") for s in samples]}
            if a.kl_in_reward:
                rewards, batch["ref_logprobs"], kl_stats = self.kl_in_reward(batch, rewards)
            advantages = group_advantages(rewards, r.group_size, normalize_std=a.normalize_std)
            batch["advantages"] = advantages.tolist()
            learner_stats = self.learner.train_step(batch)
            if a.ref_update_every and step % a.ref_update_every == 0:
                self.learner.update_reference()
            t_update = time.perf_counter()
            sync = self.broadcast_weights()
            t_sync = time.perf_counter()

        # Reward and response statistics describe every group drawn: the current policy.
        all_scores = [sc for g in drawn for sc in g.scores]
        all_samples = [s for g in drawn for s in g.samples]
        lengths = [len(s["token_ids"]) for s in all_samples]
        stats = {f"reward/{k}": v for k, v in mean_parts(all_scores).items()}
        stats |= {f"train/{k}": v for k, v in learner_stats.items() if not k.startswith("time/")}
        stats |= {
            "groups/no_signal_frac": statistics.fmean(not g.has_signal for g in drawn),
            "groups/trained": len(groups),
            "rollout/rounds": timing["rounds"],
            "data/skipped_overlong": timing["skipped"],
            "response/length_mean": statistics.fmean(lengths),
            "response/length_max": max(lengths),
            "response/reflections": statistics.fmean(
                reflection_count(s["text"], self.cfg.trainer.reflection_words)
                for s in all_samples),
            "response/truncated_frac": statistics.fmean(s["finish_reason"] == "length"
                                                        for s in all_samples),
            "time/gen": timing["gen"], "time/gen_wait": timing["gen_wait"],
            "time/reward": timing["reward"],
            "time/update": t_update - t0 - timing["gen_wait"] - timing["reward"],
            "time/sync": t_sync - t_update, "time/step": t_sync - t0,
            "throughput/gen_tokens_per_s": sum(lengths) / max(timing["gen"], 1e-9),
            "rollout/queue_depth": len(self.pending),
            "rollout/engines": len(self.rollout.workers),
            "rollout/engine_restarts": self.engine_restarts,
            "rollout/prompts": len(drawn), "rollout/samples": len(all_samples),
            "sync/bytes": sync["bytes"], "sync/seconds": sync["seconds"],
            "time/sync_wait": sync.get("wait_s", 0.0),
            "weight_version": self.version,
        }
        stats |= {f"reward_pool/{k}": v for k, v in self.rewards.pool_stats().items()}
        stats |= kl_stats
        if samples:
            # Versions behind the policy that trained on them (0 = on-policy).
            staleness = [trained_version - s["weight_version"] for s in samples]
            stats |= {"rollout/staleness_mean": statistics.fmean(staleness),
                      "rollout/staleness_max": max(staleness)}
        if learner_stats:
            stats |= {"advantage/abs_mean": float(advantages.abs().mean()),
                      "time/ref_and_old_logprobs": learner_stats["time/ref_and_old_logprobs"],
                      "throughput/train_tokens_per_s": learner_stats["tokens_per_s"]}
        return stats

    def sample_groups(self, step: int) -> tuple[list[Group], list[Group], dict[str, float]]:
        """B groups of G scored completions for the update, and every group drawn.

        With `algorithm.dynamic_sampling` (DAPO), groups whose G rewards are all equal are
        dropped, since their advantages are all zero and they would cost the learner a full
        pass for no gradient, and more prompts are drawn until B groups carry a signal or
        `rollout.max_sampling_rounds` is reached. Generation is cheap next to the update on
        this kind of machine, so trading extra rollouts for informative updates pays.
        With `rollout.max_staleness` > 0 the first round was submitted steps ahead
        (`prefetch`); later rounds sample with the current weights.
        """
        r, dynamic = self.cfg.rollout, self.cfg.algorithm.dynamic_sampling
        kept: list[Group] = []
        drawn: list[Group] = []
        timing = {"gen": 0.0, "gen_wait": 0.0, "reward": 0.0, "rounds": 0, "skipped": 0}
        while len(kept) < r.prompts_per_step and timing["rounds"] < r.max_sampling_rounds:
            if timing["rounds"] == 0 and self.pending and self.pending[0].step == step:
                batch = self.pending.popleft()
            else:
                need = r.prompts_per_step - len(kept)
                # Later rounds draw extra prompts, in proportion to how many groups were dropped.
                keep_rate = max(len(kept) / len(drawn), 0.25) if drawn else 1.0
                batch = self.submit_round(step, timing["rounds"],
                                          min(r.prompts_per_step, math.ceil(need / keep_rate)))
            timing["skipped"] += batch.skipped
            t0 = time.perf_counter()
            samples, gen_seconds = self.rollout.collect(batch.chunks,
                                                        recover=self._replace_all_engines)
            t1 = time.perf_counter()
            scores = self.score(batch.problems, samples, r.group_size)
            timing["gen"] += gen_seconds
            timing["gen_wait"] += t1 - t0
            timing["reward"] += time.perf_counter() - t1
            timing["rounds"] += 1
            n = r.group_size
            new = [Group(p, samples[i * n:(i + 1) * n], scores[i * n:(i + 1) * n])
                   for i, p in enumerate(batch.problems)]
            drawn += new
            kept += [g for g in new if g.has_signal or not dynamic]
            if not dynamic:
                break
        return kept[: r.prompts_per_step], drawn, timing

    def submit_round(self, step: int, round_: int, count: int) -> SubmittedRound:
        """Draw `count` prompts and start the engines on G completions of each."""
        r = self.cfg.rollout
        task_state = self.task.state_dict()
        problems, prompts, skipped = self.fitting(self.task.sample(count))
        chunks = self.rollout.submit(prompts, n=r.group_size, temperature=r.temperature,
                                     top_p=r.top_p, max_tokens=r.max_new_tokens,
                                     seed=self.request_seed(step, round_))
        return SubmittedRound(step, problems, chunks, skipped, task_state)

    def prefetch(self, step: int) -> None:
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

    # --- the parts ----------------------------------------------------------------------------

    def kl_in_reward(self, batch: dict[str, list], rewards: torch.Tensor
                     ) -> tuple[torch.Tensor, list[list[float]], dict[str, float]]:
        """`algorithm.kl_in_reward`: each reward minus kl_coef * sum_t k1_t (see
        `rlsys.algo.kl_shaped_rewards`), k1_t = log pi - log pi_ref of each sampled token.

        log pi is the engine's log-prob, that of the distribution the token was sampled from;
        log pi_ref takes one reference pass of the learner group. Returns the shaped rewards,
        the reference log-probs (the learner reports its KL from them without a second pass)
        and `reward/kl_penalty`, the mean penalty of the batch.
        """
        ref = self.learner.compute_logprobs(batch["prompt_ids"], batch["response_ids"],
                                            reference=True)
        lens = torch.tensor([len(lp) for lp in ref])
        mask = torch.arange(int(lens.max()))[None, :] < lens[:, None]
        shaped, penalty = kl_shaped_rewards(rewards, _padded(batch["rollout_logprobs"]),
                                            _padded(ref), mask, self.cfg.algorithm.kl_coef)
        return shaped, ref, {"reward/kl_penalty": float(penalty.mean())}

    def fitting(self, problems: list[Problem]) -> tuple[list[Problem], list[str], int]:
        return fitting_prompts(self.cfg, self.tokenizer, problems)

    def score(self, problems: list[Problem], samples: list[dict], n: int) -> list[dict]:
        """Rewards of the n completions of each problem (prompt-major, like the samples).

        The reward workers score the text; length shaping needs token counts, so it is
        applied here: DAPO's soft overlong penalty, and `reward.truncated=zero`.
        """
        rw, max_tokens = self.cfg.reward, self.cfg.rollout.max_new_tokens
        prefix = self.cfg.data.response_prefix
        golds = [p.answer for p in problems for _ in range(n)]
        tasks = [p.task for p in problems for _ in range(n)]
        scores = self.rewards.score([prefix + s["text"] for s in samples], golds, tasks,
                                    prompts=[p.question for p in problems for _ in range(n)])
        for sample, score in zip(samples, scores, strict=True):
            if rw.overlong_buffer:
                score["overlong"] = overlong_penalty(len(sample["token_ids"]), max_tokens,
                                                     rw.overlong_buffer, rw.overlong_factor)
                score["total"] += score["overlong"]
            if rw.truncated == "zero" and sample["finish_reason"] == "length":
                score["total"] = 0.0
        return scores

    def request_seed(self, step: int, stream: int) -> int:
        """Base seed of the engines' per-prompt seeds for one generate call of a step."""
        return random.Random(f"{self.cfg.trainer.seed}|{step}|{stream}").randrange(2**30)

    def save_checkpoint(self, step: int) -> Path:
        t0 = time.perf_counter()
        tmp = checkpoint.begin(self.out, step)
        self.learner.save_checkpoint(str(tmp / checkpoint.LEARNER_DIR))
        # Rounds sampled ahead are not kept: the sampler is saved as it was before they were
        # drawn, so a resumed run draws the same prompts and samples them again.
        task_state = self.pending[0].task_state if self.pending else self.task.state_dict()
        path = checkpoint.commit(tmp, step, {"weight_version": self.version,
                                             "task": task_state},
                                 keep=self.cfg.trainer.keep_checkpoints)
        log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)
        return path

    def restore(self, path: Path) -> int:
        """Continue from a checkpoint: learner state, data sampler, weights on the engines."""
        state = checkpoint.read_trainer_state(path)
        self.learner.load_checkpoint(str(path / checkpoint.LEARNER_DIR))
        self.task.load_state_dict(state["task"])
        self.version = state["weight_version"]
        self._send_weights()
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def broadcast_weights(self) -> dict[str, float]:
        """Learner → every engine over the weight-sync group; engines confirm the version.

        Batches sampled ahead finish first: the engines would take the update only after them
        anyway, and a broadcast left waiting that long could time out its process group.
        """
        t0 = time.perf_counter()
        in_flight = [chunk.ref for batch in self.pending for chunk in batch.chunks]
        ray.wait(in_flight, num_returns=len(in_flight), fetch_local=False)
        if self.rollout.reap():  # engines that died this step must leave the group first
            self._drop_lost_engines()
        self.version += 1
        return self._send_weights() | {"wait_s": time.perf_counter() - t0}

    def _send_weights(self) -> dict[str, float]:
        bucket = int(self.cfg.learner.sync_bucket_mb * 2**20)
        engine_refs = self.rollout.update_weights(self.manifest, bucket, self.version)
        sent = self.learner.broadcast_weights(self.manifest, bucket)
        results = ray.get([*sent, *engine_refs])
        stats, versions = results[0], results[len(sent):]
        if any(v != self.version for v in versions):
            raise RuntimeError(f"engines report weight versions {versions}, "
                               f"expected {self.version}")
        return stats

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy: greedy, and pass@1 over k samples (the paper's protocol)."""
        t, r = self.cfg.trainer, self.cfg.rollout
        if t.eval_size == 0:
            return {}
        t0 = time.perf_counter()
        problems, prompts, skipped = self.fitting(self.task.eval_problems()[: t.eval_size])
        greedy = self.rollout.generate(prompts, n=1, temperature=0.0,
                                       max_tokens=r.max_new_tokens)
        scores = self.score(problems, greedy, 1)
        stats = {f"eval/{k}": v for k, v in mean_parts(scores).items() if k != "total"}
        tasks = sorted({p.task for p in problems})
        if len(tasks) > 1:  # a mixed-task run: accuracy of each task too
            stats |= {f"eval/accuracy/{task}": statistics.fmean(
                s.get("accuracy", s["total"]) for p, s in zip(problems, scores, strict=True)
                if p.task == task) for task in tasks}
        if t.eval_samples > 0:
            sampled = self.rollout.generate(prompts, n=t.eval_samples,
                                            temperature=t.eval_temperature, top_p=t.eval_top_p,
                                            max_tokens=r.max_new_tokens,
                                            seed=self.request_seed(step, -1))
            sampled_scores = self.score(problems, sampled, t.eval_samples)
            stats["eval/pass@1"] = statistics.fmean(s.get("accuracy", s["total"])
                                                    for s in sampled_scores)
        if skipped:
            stats["eval/skipped_overlong"] = skipped
        stats["time/eval"] = time.perf_counter() - t0
        log.info("eval: %s", json.dumps({k: round(v, 4) for k, v in stats.items()}))
        return stats

    def _connect_weight_sync(self) -> None:
        backend = "nccl" if self.cfg.learner.device == "cuda" else "gloo"
        addr, port = self.learner.sync_address()
        refs = self.rollout.init_weight_sync(addr, port, backend)
        world = self.rollout.weight_sync_world_size  # learner rank 0 + every engine worker
        ray.get([*self.learner.init_weight_sync(addr, port, world, backend), *refs])
        self.manifest = self.learner.weight_manifest(self.cfg.rollout.dtype)

    def _close_weight_sync(self) -> None:
        """Every member leaves the weight-sync group at once (NCCL may tear down collectively).

        Engines run their calls in order, so this also waits for whatever they were given.
        """
        ray.get([*self.learner.close_weight_sync(), *self.rollout.close_weight_sync()])

    def _drop_lost_engines(self) -> None:
        """Re-form the weight-sync group without the engines the pool found dead (their
        unfinished prompts already ran elsewhere, see RolloutPool.collect). The run still
        wants as many engines, so `apply_scaling` starts replacements, which receive the
        current weights before they take work."""
        lost, self.rollout.lost = self.rollout.lost, []
        self.engine_restarts += len(lost)
        log.warning("rollout engine(s) %s died; %d left, replacement(s) starting", lost,
                    len(self.rollout.workers))
        self._close_weight_sync()
        self._connect_weight_sync()

    def _replace_all_engines(self) -> None:
        """RolloutPool.collect's `recover`: every engine died mid-step. Start one, wait for
        it, and give it the current weights, so the step's prompts can be sampled again."""
        self.rollout.add_workers(1)
        ready, errors = self.rollout.take_ready(timeout=None)
        if not ready:
            raise EnginesLost(f"every rollout engine died and a new one failed to start: "
                              f"{errors[0] if errors else 'no engine'}")
        self._drop_lost_engines()
        self._send_weights()

    def apply_scaling(self, step: int = 0) -> None:
        """Bring the rollout engines to the number asked for with `python -m rlsys.scale`.

        Runs between steps, when no weights are in flight. The weight-sync group has a fixed
        world size, so any change re-forms it: every member leaves, all join a new group on a
        fresh port, and the current weights go to every engine, so that a new one serves the
        current policy before it gets a prompt. New engines start in the background: until
        one answers, training goes on with the engines there are (a Ray autoscaler may take
        minutes to add a node). Engines finish the calls they were given (rounds sampled
        ahead with rollout.max_staleness too) before leaving the group or being removed.
        """
        pool = self.rollout
        desired = ray.get(self.controller.desired_rollout_workers.remote())
        planned = len(pool.workers) + len(pool.starting)
        if desired > planned:
            log.info("scaling: starting %d rollout engine(s) for %d requested",
                     desired - planned, desired)
            pool.add_workers(desired - planned)
        elif desired < planned and pool.cancel_starting(planned - desired):
            log.info("scaling: stopped rollout engine(s) still starting, %d requested", desired)
        ready, errors = pool.take_ready()
        if errors:
            log.error("scaling: %d new rollout engine(s) failed to start (not retried; ask "
                      "again with python -m rlsys.scale): %s", len(errors), errors[0])
            self.controller.request_rollout_workers.remote(len(pool.workers)
                                                           + len(pool.starting))
        excess = max(0, len(pool.workers) - desired)
        if ready or excess:
            t0 = time.perf_counter()
            self._close_weight_sync()
            removed = pool.remove_workers(excess)
            self._connect_weight_sync()
            self._send_weights()
            versions = pool.weight_versions()
            if any(v != self.version for v in versions):
                raise RuntimeError(f"after scaling, engines report weight versions {versions}, "
                                   f"expected {self.version}")
            log.info("scaling: %d rollout engine(s) from step %d (added %s, removed %s); "
                     "weights v%d sent in %.1fs", len(pool.workers), step,
                     [info["name"] for info in ready], removed, self.version,
                     time.perf_counter() - t0)
        self.controller.report.remote({"rollout_workers": len(pool.workers),
                                       "pending_rollout_workers": len(pool.starting),
                                       "weight_version": self.version, "step": step})

    def shutdown(self) -> None:
        for close in (getattr(self, "metrics", None) and self.metrics.close,
                      getattr(self, "rollout", None) and self.rollout.shutdown,
                      getattr(self, "rewards", None) and self.rewards.shutdown,
                      getattr(self, "learner", None) and self.learner.shutdown,
                      getattr(self, "controller", None)
                      and (lambda: stop_controller(self.controller))):
            if close:
                try:
                    close()
                except Exception as exc:  # keep shutting the rest down
                    log.warning("shutdown: %s", exc)


def _padded(rows: list[list[float]]) -> torch.Tensor:
    """Ragged per-token rows as a zero-padded [len(rows), longest] tensor."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(row, dtype=torch.float32)
                                            for row in rows], batch_first=True)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="GRPO", unit="step", disable=not enabled, dynamic_ncols=True)
