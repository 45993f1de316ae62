"""Prompts in, scored completions out: the one generate-and-score path.

Training (rlsys.scheduler), evaluation (rlsys.eval.evaluator), rejection sampling and a
teacher's distillation data (rlsys.pipeline.stages) all sample with `sample_and_score`, or,
where generation was started earlier, score with `score_samples`; so a completion gets the same
rewards, and the same verdict (`rlsys.rewards.is_correct`), whichever path produced it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rlsys.rewards.length import overlong_penalty

if TYPE_CHECKING:
    from actors.reward import RewardPool
    from actors.rollout import RolloutPool
    from rlsys.config import Config
    from rlsys.data import Problem


def score_samples(cfg: Config, rewards: RewardPool, problems: list[Problem],
                  samples: list[dict[str, Any]], n: int) -> list[dict[str, float]]:
    """Rewards of the n completions of each problem (prompt-major, like the samples).

    The reward workers score `data.response_prefix` + the text (the prompt already opened the
    response with the prefix); length shaping needs token counts, so it is applied here:
    DAPO's soft overlong penalty (`reward.overlong_buffer`) and `reward.truncated=zero`.
    """
    rw, max_tokens = cfg.reward, cfg.rollout.max_new_tokens
    prefix = cfg.data.response_prefix
    each = [p for p in problems for _ in range(n)]
    scores = rewards.score([prefix + s["text"] for s in samples], [p.answer for p in each],
                           [p.task for p in each], prompts=[p.question for p in each])
    for sample, score in zip(samples, scores, strict=True):
        if rw.overlong_buffer:
            score["overlong"] = overlong_penalty(len(sample["token_ids"]), max_tokens,
                                                 rw.overlong_buffer, rw.overlong_factor)
            score["total"] += score["overlong"]
        if rw.truncated == "zero" and sample["finish_reason"] == "length":
            score["total"] = 0.0
    return scores


def sample_and_score(cfg: Config, rollout: RolloutPool, rewards: RewardPool,
                     problems: list[Problem], prompts: list[str], n: int, *,
                     temperature: float, top_p: float = 1.0, seed: int | None = None,
                     timings: dict[str, float] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """n completions of each prompt (at most `rollout.max_new_tokens`) and their rewards.

    Prompt i is sampled with seed `seed + i` whichever engine serves it, so its samples do not
    depend on the other prompts or on the number of engines. `timings`, if given, accumulates
    `gen_s` and `reward_s`.
    """
    t0 = time.perf_counter()
    samples = rollout.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                               max_tokens=cfg.rollout.max_new_tokens, seed=seed)
    t1 = time.perf_counter()
    scores = score_samples(cfg, rewards, problems, samples, n)
    if timings is not None:
        timings["gen_s"] = timings.get("gen_s", 0.0) + t1 - t0
        timings["reward_s"] = timings.get("reward_s", 0.0) + time.perf_counter() - t1
    return samples, scores
