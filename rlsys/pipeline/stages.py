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

from rlsys import checkpoint
from rlsys.build import (
    build_task,
    fitting_prompts,
    make_learner_group,
    make_metrics_logger,
    ray_session,
    render_prompts,
    sampling_pools,
)
from rlsys.config import Config, ConfigError
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
from rlsys.sampling import sample_and_score

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
        response = ex.response.removeprefix(prefix)
        p = tokenizer(text)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + (
            [eos] if eos is not None else [])
        if len(p) + len(r) > cfg.rollout.max_model_len:
            dropped += 1
            continue
        prompt_ids.append(p)
        response_ids.append(r)
    return prompt_ids, response_ids, dropped


def run_sft(cfg: Config, model_path: str, out: Path, examples: list[SFTExample],
            teacher: str | None = None) -> Path:
    """Fine-tune `model_path` on the examples for `sft.epochs`; returns the HF folder. With a
    `teacher` (distill.loss=kd) the loss is the KL to the teacher's next-token distribution
    at every response token instead of the tokens' likelihood (Learner.sft_step).

    Every `trainer.checkpoint_every` steps the learner state is checkpointed like a GRPO
    run's; with `trainer.resume=auto` an interrupted stage continues after its latest complete
    checkpoint. Batches are a function of (seed, epoch, step), so the resumed stage trains on
    exactly the batches the uninterrupted one would have.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if teacher is not None:
        check_same_vocabulary(model_path, teacher)
    prompts, responses, dropped = encode_examples(cfg, tokenizer, examples)
    if not prompts:
        raise ValueError(f"sft: none of the {len(examples)} examples fits "
                         f"rollout.max_model_len={cfg.rollout.max_model_len} tokens")
    s, t = cfg.sft, cfg.trainer
    steps_per_epoch = -(-len(prompts) // s.batch_size)
    total = s.epochs * steps_per_epoch
    log.info("sft: %d examples (%d too long), %d epoch(s) of %d steps", len(prompts), dropped,
             s.epochs, steps_per_epoch)
    with ray_session(cfg):
        # No reference model (KL 0) and temperature 1: the plain likelihood of the data.
        group = make_learner_group(cfg, model_path,
                                   dataclasses.replace(cfg.algorithm, kl_coef=0.0),
                                   temperature=1.0, max_response_len=max(map(len, responses)),
                                   teacher_path=teacher, total_steps=total)
        metrics = None
        try:
            resume_from, start = checkpoint.resume_point(out, t.resume)
            if resume_from is not None:
                checkpoint.restore(resume_from, group)
            metrics = make_metrics_logger(cfg, out)
            for step in range(start + 1, total + 1):
                epoch, batch = divmod(step - 1, steps_per_epoch)
                idx = epoch_order(len(prompts), t.seed, epoch)[
                    batch * s.batch_size:(batch + 1) * s.batch_size]
                t0 = time.perf_counter()
                m = group.sft_step({"prompt_ids": [prompts[i] for i in idx],
                                    "response_ids": [responses[i] for i in idx]})
                metrics.log(step, {"epoch": epoch, "sft/examples": len(idx),
                                   "time/step": time.perf_counter() - t0,
                                   **{f"sft/{k}": v for k, v in m.items()}})
                log.info("sft step %d/%d: nll %.4f%s", step, total, m["nll"],
                         f", kd {m['kd']:.4f}" if "kd" in m else "")
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                    checkpoint.save(out, step, group, {"epoch": epoch}, keep=t.keep_checkpoints)
            final = group.save_pretrained(str(out / "final"))
        finally:
            group.shutdown()
            if metrics is not None:
                metrics.close()
    return Path(final)


def check_same_vocabulary(student: str, teacher: str) -> None:
    """Logit-level distillation compares distributions token by token: the teacher's and the
    student's tokenizers must map the same strings to the same ids, and their output layers
    must have the same width. Raises ConfigError naming the first difference."""
    from transformers import AutoConfig

    vocab = {}
    for role, path in (("student", student), ("teacher", teacher)):
        vocab[role] = (AutoTokenizer.from_pretrained(path).get_vocab(),
                       AutoConfig.from_pretrained(path).vocab_size)
    (s_tok, s_width), (t_tok, t_width) = vocab["student"], vocab["teacher"]
    if s_tok != t_tok:
        differ = sorted(set(s_tok.items()) ^ set(t_tok.items()))[:1]
        raise ConfigError(f"distill.loss=kd: the teacher {teacher} and the student {student} "
                         f"have different tokenizers (first difference: {differ}); use "
                         "distill.loss=sft, which needs only text")
    if s_width != t_width:
        raise ConfigError(f"distill.loss=kd: the teacher {teacher} has {t_width} output logits "
                         f"and the student {student} {s_width}; they must match")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in during one SFT epoch (a function of seed and epoch
    alone, so a resumed stage sees the same batches)."""
    order = list(range(n))
    random.Random(f"sft|{seed}|{epoch}").shuffle(order)
    return order


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
    """Sample, score, filter and write the SFT dataset (`out/dataset.jsonl`); returns `out`.

    Prompts are sampled and scored `rejection.chunk_prompts` at a time, and each finished
    chunk is written to `out/samples/`; an interrupted stage rerun with `trainer.resume=auto`
    keeps those and generates only the rest. Prompt i is sampled with seed `trainer.seed + i`
    whichever chunk or run it falls in, so the dataset does not depend on the interruption.
    """
    rj, r = cfg.rejection, cfg.rollout
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = build_task(cfg)
    # Distinct prompts: a second draw of a prompt would only repeat its `samples` completions.
    drawn = task.sample_distinct(rj.num_prompts)
    if len(drawn) < rj.num_prompts:
        log.warning("rejection.num_prompts=%d: the task has only %d distinct training prompts; "
                    "sampling those", rj.num_prompts, len(drawn))
    problems, prompts, skipped = fitting_prompts(cfg, tokenizer, drawn)
    prefix = cfg.data.response_prefix
    chunks = [(start, min(start + rj.chunk_prompts, len(prompts)))
              for start in range(0, len(prompts), rj.chunk_prompts)]
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    done = {start: _read_chunk(folder, start) for start, _ in chunks} if (
        cfg.trainer.resume == "auto") else {}
    todo = [(a, b) for a, b in chunks if done.get(a) is None]
    if len(todo) < len(chunks):
        log.info("rejection sampling: %d of %d chunks already sampled, %d to go",
                 len(chunks) - len(todo), len(chunks), len(todo))
    t0 = time.perf_counter()
    if todo:
        with ray_session(cfg), sampling_pools(cfg, model_path, out / ".vllm") as (rollout,
                                                                                 rewards):
            for start, end in todo:
                samples, scores = sample_and_score(
                    cfg, rollout, rewards, problems[start:end], prompts[start:end], rj.samples,
                    temperature=rj.temperature, top_p=r.top_p, seed=cfg.trainer.seed + start)
                done[start] = [{"text": prefix + x["text"], "num_tokens": len(x["token_ids"]),
                                "truncated": x["finish_reason"] == "length", "rewards": score}
                               for x, score in zip(samples, scores, strict=True)]
                _write_chunk(folder, start, done[start])
                log.info("rejection sampling: prompts %d-%d of %d sampled", start + 1, end,
                         len(prompts))
    samples = [x for start, _ in chunks for x in done[start]]
    reasons: Counter[str] = Counter()
    kept: list[SFTExample] = []
    for i, problem in enumerate(problems):
        accepted = 0
        for j, x in enumerate(samples[i * rj.samples:(i + 1) * rj.samples]):
            reason = rejection_reason(
                x["text"], x["rewards"], target=cfg.reward.language_target,
                min_language=rj.min_language, num_tokens=x["num_tokens"],
                min_tokens=rj.min_tokens, truncated=x["truncated"])
            if reason is None and accepted >= rj.keep_per_prompt:
                reason = "enough_for_prompt"
            reasons[reason or "kept"] += 1
            if reason is None:
                accepted += 1
                kept.append(example_from(problem, x["text"], sample_index=j,
                                         source="rejection_sampling", rewards=x["rewards"]))
    unique = dedupe(kept)
    merged = read_examples(rj.merge, key="rejection.merge") if rj.merge else []
    count = write_examples(out / DATASET, unique + merged)
    stats = {"prompts": len(problems), "skipped_overlong": skipped, "samples": len(samples),
             "chunks": len(chunks), "chunks_reused": len(chunks) - len(todo),
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


def _chunk_path(folder: Path, start: int) -> Path:
    return folder / f"chunk_{start:06d}.json"


def _write_chunk(folder: Path, start: int, rows: list[dict]) -> None:
    # Renamed into place once whole: a chunk file that exists is a complete chunk.
    tmp = _chunk_path(folder, start).with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(_chunk_path(folder, start))


def _read_chunk(folder: Path, start: int) -> list[dict] | None:
    path = _chunk_path(folder, start)
    return json.loads(path.read_text()) if path.is_file() else None
