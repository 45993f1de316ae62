"""The stages of the R1 recipe other than GRPO itself (which is `rlsys.trainer.train`).

* `run_sft`: supervised fine-tuning on question/response text, on the learner group (same
  tp x dp sharding, packing and DCP-free HF export as the RL learner), loss on response tokens.
* `run_rejection_sampling`: k completions per training prompt from a model on the rollout pool,
  scored by the reward pool, kept if correct and readable (rlsys.data.sft.rejection_reason),
  deduplicated, and written as an SFT dataset with provenance. With a teacher model this is
  also the data half of distillation.

Each takes the stage's resolved config, the model folder it starts from and its own output
folder, and returns what later stages consume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlsys.config import Config
from rlsys.data import Problem
from rlsys.data.sft import (
    SFTExample,
    arithmetic_cot,
    dedupe,
    example_from,
    read_examples,
    rejection_reason,
    write_examples,
)
from rlsys.metrics import MetricsLogger
from rlsys.trainer import (
    build_task,
    fitting_prompts,
    make_learner_group,
    make_reward_pool,
    make_rollout_pool,
    ray_session,
    render_prompts,
)

log = logging.getLogger(__name__)

DATASET = "dataset.jsonl"


def cold_start_examples(cfg: Config) -> list[SFTExample]:
    """`sft.num_examples` arithmetic problems with their worked solutions, written by code."""
    task = build_task(cfg)
    problems = task.sample(cfg.sft.num_examples)
    if any("expression" not in p.meta for p in problems):
        raise ValueError("sft.data=arithmetic_cot needs data.task=arithmetic")
    return [example_from(p, arithmetic_cot(p), source="arithmetic_cot") for p in problems]


def encode_examples(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                    examples: list[SFTExample]) -> tuple[list[list[int]], list[list[int]], int]:
    """Prompt and response token ids of each example that fits `rollout.max_model_len`, and
    how many did not. The prompt is rendered like an RL prompt, so SFT teaches exactly the
    format RL will sample in; where that template already opens the response (e.g. with
    "<think>\\n"), the response's copy of that opening is not learned twice."""
    problems = [Problem(id=str(i), question=ex.prompt, answer="") for i, ex in
                enumerate(examples)]
    prefix = cfg.data.response_prefix
    prompt_ids, response_ids, dropped = [], [], 0
    eos = tokenizer.eos_token_id
    for text, ex in zip(render_prompts(cfg, tokenizer, problems), examples, strict=True):
        response = ex.response.removeprefix(prefix) if prefix else ex.response
        p = tokenizer(text)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + (
            [eos] if eos is not None else [])
        if len(p) + len(r) > cfg.rollout.max_model_len:
            dropped += 1
            continue
        prompt_ids.append(p)
        response_ids.append(r)
    return prompt_ids, response_ids, dropped


def run_sft(cfg: Config, model_path: str, out: Path, examples: list[SFTExample]) -> Path:
    """Fine-tune `model_path` on the examples for `sft.epochs`; returns the HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts, responses, dropped = encode_examples(cfg, tokenizer, examples)
    if not prompts:
        raise ValueError(f"sft: none of the {len(examples)} examples fits "
                         f"rollout.max_model_len={cfg.rollout.max_model_len} tokens")
    s = cfg.sft
    steps_per_epoch = -(-len(prompts) // s.batch_size)
    log.info("sft: %d examples (%d too long), %d epoch(s) of %d steps", len(prompts), dropped,
             s.epochs, steps_per_epoch)
    metrics = MetricsLogger(out, tensorboard=cfg.trainer.tensorboard)
    with ray_session(cfg):
        # No reference model (KL 0) and temperature 1: the plain likelihood of the data.
        group = make_learner_group(cfg, model_path,
                                   dataclasses.replace(cfg.algorithm, kl_coef=0.0),
                                   temperature=1.0, max_response_len=max(map(len, responses)))
        try:
            step = 0
            for epoch in range(s.epochs):
                order = list(range(len(prompts)))
                random.Random(f"sft|{cfg.trainer.seed}|{epoch}").shuffle(order)
                for start in range(0, len(order), s.batch_size):
                    idx = order[start:start + s.batch_size]
                    t0 = time.perf_counter()
                    m = group.sft_step({"prompt_ids": [prompts[i] for i in idx],
                                        "response_ids": [responses[i] for i in idx]})
                    step += 1
                    metrics.log(step, {"epoch": epoch, "sft/examples": len(idx),
                                       "time/step": time.perf_counter() - t0,
                                       **{f"sft/{k}": v for k, v in m.items()}})
                    log.info("sft step %d/%d: nll %.4f", step, s.epochs * steps_per_epoch,
                             m["nll"])
            final = group.save_pretrained(str(out / "final"))
        finally:
            group.shutdown()
            metrics.close()
    return Path(final)


def sft_examples(cfg: Config, stage_outputs: dict[str, Path]) -> list[SFTExample]:
    """The examples `sft.data` names: generated, a file, or an earlier stage's dataset."""
    source = cfg.sft.data
    if source == "arithmetic_cot":
        return cold_start_examples(cfg)
    if source.startswith("stage:"):
        name = source.removeprefix("stage:")
        if name not in stage_outputs:
            raise ValueError(f"sft.data={source}: no earlier stage {name!r} wrote a dataset")
        return read_examples(stage_outputs[name] / DATASET, key="sft.data")
    return read_examples(source)


def run_rejection_sampling(cfg: Config, model_path: str, out: Path) -> Path:
    """Sample, score, filter and write the SFT dataset (`out/dataset.jsonl`); returns `out`."""
    rj, r = cfg.rejection, cfg.rollout
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = build_task(cfg)
    problems, prompts, skipped = fitting_prompts(cfg, tokenizer, task.sample(rj.num_prompts))
    prefix = cfg.data.response_prefix
    t0 = time.perf_counter()
    with ray_session(cfg):
        rollout = make_rollout_pool(cfg, model_path, out / ".vllm")
        rewards = make_reward_pool(cfg)
        try:
            samples = rollout.generate(prompts, n=rj.samples, temperature=rj.temperature,
                                       top_p=r.top_p, max_tokens=r.max_new_tokens,
                                       seed=cfg.trainer.seed)
            texts = [prefix + s["text"] for s in samples]
            scores = rewards.score(texts, [p.answer for p in problems for _ in range(rj.samples)],
                                   [p.task for p in problems for _ in range(rj.samples)])
        finally:
            rollout.shutdown()
            rewards.shutdown()
    reasons: Counter[str] = Counter()
    kept: list[SFTExample] = []
    for i, problem in enumerate(problems):
        accepted = 0
        for j in range(rj.samples):
            k = i * rj.samples + j
            reason = rejection_reason(
                texts[k], scores[k], target=cfg.reward.language_target,
                min_language=rj.min_language, num_tokens=len(samples[k]["token_ids"]),
                min_tokens=rj.min_tokens, truncated=samples[k]["finish_reason"] == "length")
            if reason is None and accepted >= rj.keep_per_prompt:
                reason = "enough_for_prompt"
            reasons[reason or "kept"] += 1
            if reason is None:
                accepted += 1
                kept.append(example_from(problem, texts[k], sample_index=j,
                                         source="rejection_sampling",
                                         rewards={key: v for key, v in scores[k].items()}))
    unique = dedupe(kept)
    merged = read_examples(rj.merge, key="rejection.merge") if rj.merge else []
    count = write_examples(out / DATASET, unique + merged)
    stats = {"prompts": len(problems), "skipped_overlong": skipped, "samples": len(samples),
             "kept": len(unique), "duplicates": len(kept) - len(unique), "merged": len(merged),
             "written": count, "acceptance": len(kept) / max(len(samples), 1),
             "reasons": dict(reasons), "seconds": time.perf_counter() - t0}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("rejection sampling: kept %d of %d samples (%s)", len(unique), len(samples),
             ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    if not count:
        raise ValueError(f"rejection sampling kept none of {len(samples)} samples "
                         f"({dict(reasons)}); a later SFT stage would have no data")
    return out
