"""What every benchmark records beside its figures: the machine and the package versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
#: Where --quick runs write: apart, so that a smoke run never replaces the recorded figures.
QUICK_RESULTS = RESULTS / "quick"


def result_path(name: str, quick: bool) -> Path:
    """The JSON file benchmark `name` writes (results/NAME.json, or results/quick/NAME.json for
    a --quick run); its folder is created, so callers can write straight away."""
    folder = QUICK_RESULTS if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.json"


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version()}


def child_result(argv: list[str], what: str, env: Mapping[str, str] | None = None) -> dict:
    """Run `python -m ARGV` in a fresh process (its own memory, threads and allocator) and
    return the JSON of the last line it printed as `RESULT {...}`; if it failed, stop with one
    line naming `what` and the child's last line of output."""
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          env=None if env is None else dict(env))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{argv[0].rsplit('.', 1)[-1]}: {what} failed: {tail[0]}")
    return json.loads(lines[-1][len("RESULT "):])


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones are left out)."""
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


@contextlib.contextmanager
def run_dir(argv: list[str], prefix: str) -> Iterator[list[str]]:
    """`argv` with a `trainer.output_dir`: the caller's if it names one (kept), else a
    temporary one removed afterwards (a pipeline run holds GBs of checkpoints and models)."""
    if any(a.startswith("trainer.output_dir=") for a in argv):
        yield argv
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield [*argv, f"trainer.output_dir={Path(tmp) / 'run'}"]


# --- --keep: a run of new seeds joins the runs recorded for other seeds ----------------------

def flat_settings(tree: Mapping[str, object], leave_out: Collection[str] = (),
                  prefix: str = "") -> dict[str, object]:
    """A config (as `rlsys.config.to_dict` gives it) as {"section.key": value}, without the keys
    in `leave_out`: the form --keep compares, so that any setting that differs is named."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flat_settings(value, leave_out, f"{prefix}{key}.")
        elif f"{prefix}{key}" not in leave_out:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_settings(mine: Mapping[str, object], theirs: Mapping[str, object]) -> list[str]:
    """The keys whose values differ, sorted; a key only one side has is a newer option at its
    default, and not a difference."""
    return sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])


def merge_seeds(recorded: list[dict], runs: list[dict]) -> list[dict]:
    """`runs` and the `recorded` runs of seeds that `runs` has not, by seed (a stable sort, so
    the runs of one seed keep their order; a run without a seed is seed 0)."""
    seeds = {r.get("seed", 0) for r in runs}
    return sorted([*(r for r in recorded if r.get("seed", 0) not in seeds), *runs],
                  key=lambda r: r.get("seed", 0))


def timed_call(call: Callable[[int], Any], tokens_of: Callable[[Any], int], rep: int,
               label: str = "") -> dict:
    """Time one generation call, `call(rep)`: its seconds, the tokens it produced
    (`tokens_of(result)`) and their rate; the rep is printed as it ends."""
    t0 = time.perf_counter()
    result = call(rep)
    seconds = time.perf_counter() - t0
    tokens = tokens_of(result)
    print(f"  {label}rep {rep + 1}: {tokens} tokens in {seconds:.1f} s", flush=True)
    return {"seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1)}


def timed_reps(call: Callable[[int], Any], tokens_of: Callable[[Any], int], reps: int,
               label: str = "") -> list[dict]:
    """`timed_call` for reps 0 .. reps-1, one after the other."""
    return [timed_call(call, tokens_of, rep, label) for rep in range(reps)]
