"""Throughput of the code sandbox (rlsys.sandbox.run_python) on this machine.

    python -m benchmarks.sandbox_throughput [--quick] [--n N]

Measures the per-launch overhead of a trivial program (median of N runs), then how many
HumanEval-sized checks (a small function plus 3 asserts) complete per second sequentially and
with 2 threads in parallel. Prints a table and writes benchmarks/results/sandbox_throughput.json
with the machine, the versions and the figures (--quick: 50 runs per measurement instead of 200,
written to benchmarks/results/quick/). The issue's target: >= 40 checks/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import machine, result_path
from rlsys.sandbox import SANDBOX_PYTHON, bwrap_path, run_python

TARGET_CHECKS_PER_S = 40.0

TRIVIAL = "pass\n"
# Roughly the size of a HumanEval task: a short solution and a handful of assertions.
CHECK = '''\
def running_max(xs: list[int]) -> list[int]:
    """Prefix maxima of xs."""
    out, best = [], None
    for x in xs:
        best = x if best is None or x > best else best
        out.append(best)
    return out


assert running_max([]) == []
assert running_max([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]
assert running_max([-2, -3, -1]) == [-2, -2, -1]
'''


def _bwrap_version() -> str | None:
    path = bwrap_path()
    if path is None:
        return None
    res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return res.stdout.strip() or None


def _sandbox_python_version() -> str | None:
    try:
        res = subprocess.run([SANDBOX_PYTHON, "--version"], capture_output=True, text=True,
                             check=False)
    except OSError:
        return None
    return res.stdout.strip().removeprefix("Python ") or None


def _run_ok(code: str) -> float:
    """Wall time of one sandboxed run; a failed run would make the figures meaningless."""
    t0 = time.perf_counter()
    res = run_python(code)
    elapsed = time.perf_counter() - t0
    if res.status != "ok":
        raise RuntimeError(f"benchmark program failed: {res.status}: {res.stderr[-500:]}")
    return elapsed


def measure(n: int) -> dict[str, float]:
    _run_ok(TRIVIAL)  # warm the page cache so the first launch does not skew the median
    launches = [_run_ok(TRIVIAL) for _ in range(n)]

    t0 = time.perf_counter()
    for _ in range(n):
        _run_ok(CHECK)
    seq = time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: _run_ok(CHECK), range(n)))
    par = time.perf_counter() - t0

    return {
        "launch_overhead_ms_median": 1000 * statistics.median(launches),
        "launch_overhead_ms_p90": 1000 * statistics.quantiles(launches, n=10)[-1],
        "checks_per_s_sequential": n / seq,
        "checks_per_s_parallel2": n / par,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="50 runs per measurement (unless --n), into benchmarks/results/quick/")
    parser.add_argument("--n", type=int, help="runs per measurement (>= 2; default 200)")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 50 if args.quick else 200
    if args.n < 2:
        parser.error("--n must be >= 2")

    figures = measure(args.n)
    result = {
        "machine": {**machine(), "platform": platform.platform()},
        # The driver's Python, and the one the sandbox runs the checks with.
        "versions": {"python": platform.python_version(),
                     "sandbox_python": _sandbox_python_version(),
                     "bubblewrap": _bwrap_version()},
        "n": args.n,
        "figures": {k: round(v, 2) for k, v in figures.items()},
        "target_checks_per_s": TARGET_CHECKS_PER_S,
        "meets_target": figures["checks_per_s_parallel2"] >= TARGET_CHECKS_PER_S,
    }

    print(f"sandbox throughput, n={args.n}, {result['machine']['cores']} cores, "
          f"{result['machine']['cpu_model']}")
    print(f"{'metric':<30} {'value':>10}")
    for key, value in result["figures"].items():
        print(f"{key:<30} {value:>10.2f}")
    print(f"{'target (parallel2) checks/s':<30} {TARGET_CHECKS_PER_S:>10.2f}  "
          f"{'met' if result['meets_target'] else 'NOT met'}")

    result_path("sandbox_throughput", args.quick).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
