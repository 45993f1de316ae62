"""The GRPO training loop (DeepSeekMath / DeepSeek-R1), driving Ray actors.

For each step:
    1. the rollout scheduler draws B prompts, the engines sample G completions of each (with
       log-probs) and the reward pool scores them; with dynamic sampling, groups whose rewards
       are all equal are dropped and more prompts are drawn (rlsys/scheduler.py)
    2. advantages are normalised within each group of G (rlsys.algo.group_advantages); with
       `algorithm.kl_in_reward` each reward first pays the KL to the reference model
    3. the learner applies the clipped-ratio GRPO update with a KL penalty to the reference
       (in the loss unless it went into the reward)
    4. the learner broadcasts its new weights to every engine, which confirm the version
       (rlsys/fleet.py)
    5. the step's metrics are logged (rlsys.metrics.step_metrics)
With `rollout.max_staleness` = k > 0 the engines sample the next k steps' first rounds during
steps 2-3 (once past the first `rollout.on_policy_steps`); with `rollout.inflight` they generate
continuously, and step 4 lands between their decode steps (rlsys.scheduler.StreamScheduler).
Between steps the fleet brings the engines to the count `python -m rlsys.scale` asked for; an
engine that dies mid-step has its prompts re-run on another and is replaced. A learner rank
that dies takes the run back to its last checkpoint with a new learner group
(`trainer.max_learner_restarts`).
Every K steps the held-out split is evaluated (rlsys.eval.evaluator, the figures
`python -m rlsys.eval` gives), and every N steps a resumable checkpoint is written.
The driver only moves token ids, texts and metrics; weights go learner → engines directly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from actors.controller import start_controller, stop_controller
from learners.group import LearnerFailed, LearnerGroup
from rlsys import checkpoint
from rlsys.algo import adapt_entropy_coef, group_advantages, kl_shaped_rewards
from rlsys.build import (
    make_learner_group,
    make_metrics_logger,
    make_reward_pool,
    prepare_model_and_task,
    prepare_output_dir,
    ray_session,
)
from rlsys.config import Config
from rlsys.data import Task
from rlsys.eval.evaluator import evaluate_problems, held_out
from rlsys.fleet import EngineFleet
from rlsys.metrics import PhaseTimer, step_metrics
from rlsys.scheduler import Batch, RolloutScheduler, StreamScheduler

log = logging.getLogger("rlsys")


def train(cfg: Config) -> Path:
    """Run GRPO as configured; returns the output directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_path, task, tokenizer = prepare_model_and_task(cfg)
    out, resume_from = prepare_output_dir(cfg)
    with ray_session(cfg):
        trainer = GRPOTrainer(cfg, model_path, tokenizer, task, out)
        try:
            start = trainer.restore(resume_from) if resume_from else 0
            while True:
                try:
                    trainer.fit(start)
                    break
                except LearnerFailed as exc:
                    start = trainer.restart_learner(exc)  # or RunStopped
        finally:
            trainer.shutdown()
    return out


class RunStopped(RuntimeError):
    """A failure the run cannot continue through, with where to resume from."""

    def __init__(self, cause: BaseException, out: Path, restarts: int = 0) -> None:
        last = checkpoint.latest_checkpoint(out)
        where = (f"the last complete checkpoint is {last}; rerun with trainer.resume=auto and "
                 f"trainer.output_dir={out} to continue from it" if last else
                 "no checkpoint was written yet (trainer.checkpoint_every)")
        after = (f" after {restarts} learner restart(s) (trainer.max_learner_restarts)"
                 if restarts else "")
        super().__init__(f"{cause}; the run stopped{after}: {where}")


class GRPOTrainer:
    """Owns the learner group, the engine fleet, the reward pool and the rollout scheduler,
    and runs `fit()`: the loop in the module docstring."""

    def __init__(self, cfg: Config, model_path: str, tokenizer: PreTrainedTokenizerBase,
                 task: Task, out: Path) -> None:
        self.cfg, self.task, self.tokenizer, self.out = cfg, task, tokenizer, out
        r, lc = cfg.rollout, cfg.learner
        # The entropy bonus weight: fixed, or adapted each step (algorithm.entropy_target).
        self.entropy_coef = cfg.algorithm.entropy_coef
        # First, so that a second run in the same Ray namespace stops before starting actors;
        # `python -m rlsys.scale` reaches the run through it (see EngineFleet.apply_scaling).
        self.controller = start_controller(r.num_workers)
        try:
            t0 = time.perf_counter()
            self.model_path, self.learner_restarts = model_path, 0
            self.learner = self.make_learner()
            self.fleet = EngineFleet(cfg, model_path, out / ".vllm", self.learner,
                                     self.controller)
            self.rewards = make_reward_pool(cfg)
            scheduler = StreamScheduler if r.inflight else RolloutScheduler
            self.scheduler = scheduler(cfg, task, tokenizer, self.fleet, self.rewards)
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
            self.metrics.log(0, self.evaluate())
        bar = _progress(t.steps, enabled=t.progress)
        bar.update(start_step)
        for step in range(start_step + 1, t.steps + 1):
            self.fleet.apply_scaling(step)
            stats = self.train_step(step)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                stats |= self.evaluate()
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
        """One GRPO step: sample and score, update, publish; returns its metrics."""
        timer = PhaseTimer()
        batch = self.scheduler.next_batch(step)
        trained_version = self.fleet.version
        if self.cfg.rollout.max_staleness:
            self.scheduler.sample_ahead(step)
        learner_stats, extra, sync, advantages = {}, {}, {}, None
        if batch.groups:  # dynamic sampling can come back empty-handed: nothing to learn
            with timer.phase("update"):
                advantages, learner_stats, extra = self.update(step, batch)
            with timer.phase("sync"):
                sync = self.fleet.publish(self.scheduler.in_flight())
        scheduled = self.scheduler.step_stats(batch)  # before step_metrics: may set batch.gen_s
        stats = step_metrics(batch, learner_stats, sync, timer, trained_version=trained_version,
                             reflection_words=self.cfg.trainer.reflection_words,
                             advantages=advantages)
        stats |= extra | self.fleet.stats() | {"rollout/queue_depth": len(self.scheduler.pending),
                                               "rollout/temperature":
                                                   self.cfg.rollout.temperature_at(step)}
        stats |= scheduled
        return stats | {f"reward_pool/{k}": v for k, v in self.rewards.pool_stats().items()}

    def update(self, step: int, batch: Batch
               ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """Group advantages of the batch's rewards, then the learner's GRPO update; returns
        the advantages, the learner's figures and the KL-in-reward figures (if any)."""
        a = self.cfg.algorithm
        samples = [s for g in batch.groups for s in g.samples]
        rewards = torch.tensor([sc["total"] for g in batch.groups for sc in g.scores])
        mask_truncated = self.cfg.reward.truncated == "mask"
        learner_batch = {"prompt_ids": [s["prompt_ids"] for s in samples],
                         "response_ids": [s["token_ids"] for s in samples],
                         "rollout_logprobs": [s["logprobs"] for s in samples],
                         "loss_mask": [not (mask_truncated and s["finish_reason"] == "length")
                                       for s in samples]}
        extra: dict[str, float] = {}
        # The temperature the batch was sampled at: the learner scores its tokens at it.
        temperature = self.cfg.rollout.temperature_at(step)
        if a.kl_in_reward:
            rewards, learner_batch["ref_logprobs"], extra = self.kl_in_reward(
                learner_batch, rewards, temperature)
        advantages = group_advantages(rewards, self.cfg.rollout.group_size,
                                      normalize_std=a.normalize_std)
        learner_batch["advantages"] = advantages.tolist()
        learner_stats = self.learner.train_step(learner_batch, self.entropy_coef, temperature)
        if a.entropy_target:
            extra["train/entropy_coef"] = self.entropy_coef
            self.entropy_coef = adapt_entropy_coef(self.entropy_coef, learner_stats["entropy"],
                                                   a.entropy_target, a.entropy_coef_step,
                                                   a.entropy_coef_max)
        if a.ref_update_every and step % a.ref_update_every == 0:
            self.learner.update_reference()
        return advantages, learner_stats, extra

    # --- the parts ----------------------------------------------------------------------------

    def kl_in_reward(self, batch: dict[str, list], rewards: torch.Tensor, temperature: float
                     ) -> tuple[torch.Tensor, list[list[float]], dict[str, float]]:
        """`algorithm.kl_in_reward`: each reward minus kl_coef * sum_t k1_t (see
        `rlsys.algo.kl_shaped_rewards`), k1_t = log pi - log pi_ref of each sampled token.

        log pi is the engine's log-prob, that of the distribution the token was sampled from;
        log pi_ref takes one reference pass of the learner group. Returns the shaped rewards,
        the reference log-probs (the learner reports its KL from them without a second pass)
        and `reward/kl_penalty`, the mean penalty of the batch.
        """
        ref = self.learner.compute_logprobs(batch["prompt_ids"], batch["response_ids"],
                                            reference=True, temperature=temperature)
        lens = torch.tensor([len(lp) for lp in ref])
        mask = torch.arange(int(lens.max()))[None, :] < lens[:, None]
        shaped, penalty = kl_shaped_rewards(rewards, _padded(batch["rollout_logprobs"]),
                                            _padded(ref), mask, self.cfg.algorithm.kl_coef)
        return shaped, ref, {"reward/kl_penalty": float(penalty.mean())}

    def evaluate(self) -> dict[str, float]:
        """The held-out figures of the policy the engines serve (rlsys.eval.evaluator) on the
        first `trainer.eval_size` problems, as eval/* metrics."""
        if self.cfg.trainer.eval_size == 0:
            return {}
        t0 = time.perf_counter()
        problems, prompts, skipped = held_out(self.cfg, self.tokenizer, self.task,
                                              self.cfg.trainer.eval_size)
        result = evaluate_problems(self.cfg, self.fleet.rollout, self.rewards, problems,
                                   prompts, skipped)
        stats = result.step_metrics(self.cfg.eval.k) | {"time/eval": time.perf_counter() - t0}
        log.info("eval: %s", json.dumps({k: round(v, 4) for k, v in stats.items()}))
        return stats

    def save_checkpoint(self, step: int) -> Path:
        return checkpoint.save(self.out, step, self.learner,
                               {"weight_version": self.fleet.version,
                                "task": self.scheduler.state_dict(),
                                "entropy_coef": self.entropy_coef},
                               keep=self.cfg.trainer.keep_checkpoints)

    def restore(self, path: Path) -> int:
        """Continue from a checkpoint: learner state, data sampler, weights on the engines."""
        state = checkpoint.restore(path, self.learner)
        self.scheduler.load_state_dict(state["task"])
        self.fleet.version = state["weight_version"]
        self.entropy_coef = state.get("entropy_coef", self.cfg.algorithm.entropy_coef)
        self.fleet.send_weights()
        return int(state["step"])

    def make_learner(self) -> LearnerGroup:
        """A learner group as configured, holding the run's starting model (a restart then
        restores its checkpoint into it)."""
        r = self.cfg.rollout
        return make_learner_group(self.cfg, self.model_path, self.cfg.algorithm,
                                  temperature=r.temperature, max_response_len=r.max_new_tokens,
                                  total_steps=self.cfg.trainer.steps
                                  * self.cfg.algorithm.updates_per_batch)

    def restart_learner(self, cause: LearnerFailed) -> int:
        """A learner rank died: roll the run back to its last complete checkpoint with a new
        learner group, which the engines join; returns the checkpoint's step.

        What was drawn or logged after that checkpoint is dropped and done again, as a resume
        would (so the redone steps draw the same prompts and samples). Raises RunStopped when
        there is no checkpoint or trainer.max_learner_restarts restarts are spent.
        """
        last = checkpoint.latest_checkpoint(self.out)
        limit = self.cfg.trainer.max_learner_restarts
        if last is None or self.learner_restarts >= limit:
            raise RunStopped(cause, self.out, self.learner_restarts) from None
        self.learner_restarts += 1
        log.warning("%s; restarting the learner group from %s (restart %d of at most %d)",
                    cause, last, self.learner_restarts, limit)
        t0 = time.perf_counter()
        self.scheduler.discard()
        self.learner.shutdown()
        self.learner = self.make_learner()  # waits for learner capacity (a lost node's)
        self.fleet.reconnect(self.learner)
        step = self.restore(last)
        self.metrics.drop_after(step)
        log.info("learner group restarted in %.1fs; continuing from step %d",
                 time.perf_counter() - t0, step)
        return step

    def shutdown(self) -> None:
        for close in (getattr(self, "metrics", None) and self.metrics.close,
                      getattr(self, "fleet", None) and self.fleet.shutdown,
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
