"""`python -m benchmarks [--quick] [--only NAME ...] [--skip NAME ...] [--no-report]`: run the
benchmarks one after another, then `python -m benchmarks.report`.

Each benchmark runs as its own `python -m benchmarks.NAME` process, as a person would run it,
so that one's memory (models, a Ray cluster) is gone before the next starts and its timings are
its own. A failing benchmark does not stop the others: the failures are listed at the end and
the exit status is 1. --quick passes --quick to every benchmark (smaller runs written to
benchmarks/results/quick/) and to the report. async_rollouts, r1_smol, distill, memory_plan,
cpu_precision and core_contention are long, gpu_check needs a GPU (its --quick is the CPU
smoke run) and arithmetic_transfer wants a trained model: none is in the default set; name
them with --only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ("rollout_throughput", "trl_grpo", "weight_sync", "learner_packing",
           "sandbox_throughput", "smol_learning")
# memory_plan: ~10 min of profiled learner updates; gpu_check: needs a GPU (--quick: its CPU
# smoke run); cpu_precision: ~10 min where bfloat16 is emulated; arithmetic_transfer: the base
# model alone unless given --models (a trained one is a run's final/); core_contention: ~5 min,
# and only telling on a box whose cores are otherwise idle.
EXTRA = ("async_rollouts", "r1_smol", "distill", "memory_plan", "gpu_check", "cpu_precision",
         "arithmetic_transfer", "core_contention")
#: Benchmarks whose script has no --quick (a quick run of them would overwrite the full figures).
NO_QUICK = frozenset({"async_rollouts", "r1_smol", "distill"})


def _names(values: list[str] | None, parser: argparse.ArgumentParser, option: str) -> list[str]:
    unknown = [v for v in values or [] if v not in DEFAULT + EXTRA]
    if unknown:
        parser.error(f"{option}: unknown benchmark(s) {', '.join(unknown)}; valid: "
                     f"{', '.join(DEFAULT + EXTRA)}")
    return values or []


def select(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """The benchmarks to run, in order, and the parsed options; exits (status 2) naming the
    valid benchmarks when an unknown one is given."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Run the benchmarks, then the report.")
    parser.add_argument("--quick", action="store_true", help="small runs into results/quick/")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run these (also: {', '.join(EXTRA)})")
    parser.add_argument("--skip", nargs="+", metavar="NAME", help="leave these out")
    parser.add_argument("--no-report", action="store_true", help="do not rebuild README.md")
    args = parser.parse_args(argv)
    only = _names(args.only, parser, "--only")
    skip = _names(args.skip, parser, "--skip")
    names = [n for n in DEFAULT + EXTRA if n in only] if only else list(DEFAULT)
    names = [n for n in names if n not in skip]
    if args.quick and NO_QUICK.intersection(names):
        parser.error(f"--quick: no quick mode for {', '.join(sorted(NO_QUICK.intersection(names)))}"
                     " (run without --quick)")
    return names, args


def _run(module: str, quick: bool, header: str = "") -> int:
    """Run `python -m module [--quick]` from the repository root; its exit status."""
    cmd = [sys.executable, "-m", module, *(["--quick"] if quick else [])]
    print(f"\n=== {header}{' '.join(['python', *cmd[1:]])}", flush=True)
    start = time.monotonic()
    rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    minutes, seconds = divmod(time.monotonic() - start, 60)
    print(f"=== {module}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in "
          f"{int(minutes)} min {seconds:.0f} s", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    names, args = select(argv)
    failed = [n for i, n in enumerate(names, 1)
              if _run(f"benchmarks.{n}", args.quick, f"[{i}/{len(names)}] ") != 0]
    if not args.no_report and _run("benchmarks.report", args.quick) != 0:
        failed.append("report")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\nall {len(names)} benchmark(s) passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
