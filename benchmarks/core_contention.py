"""How much a learner update on one core slows when the other core is busy, and with what.

    python -m benchmarks.core_contention [--quick] [--reps N] [--prompts P]

Issue 20's split layout pins the rollout engine to core 0 and the learner to core 1. On a
2-core AMD EPYC VM the in-flight update took 9% longer beside the decoding engine than alone
(README: asynchronous rollouts), while on an Intel Xeon VM in-flight steps kept within 1.05x of
the slower side. This tells what the two cores share, by running the demo's learner update
(`Learner.train_step`, conf/smol.yaml's learner, its compute dtype resolved for the CPU,
jemalloc, one thread pinned to core 1, a demo-shaped batch of P prompts x G) alone
and beside one load pinned to core 0:

* compute: a bfloat16 256x256 matmul loop whose operands fit in the core's own L2 cache. It
  slows the update only if the two "cores" share execution units: hyperthreads of one
  physical core, which a VM's topology need not show;
* memory:  a loop copying one 256 MiB array into another, as fast as one core can: it slows
  the update through what the cores share beyond L2 (L3 cache, memory bandwidth);
* engine:  a vLLM engine sampling the demo's prompts (conf/smol.yaml: few-shot prompts, G
  completions at temperature 1.5, 48 tokens), call after call: the load the split layout has.

The learner and each load run in processes of their own, started once: the learner warms up
with WARMUP updates, then each of --reps rounds times one update per load, the load under test
resumed (SIGCONT) and the others stopped (SIGSTOP), so the box's drift falls on every load
alike. Writes benchmarks/results/core_contention.json (--quick: results/quick/) with each
load's slowdown: the median over rounds of its update's seconds over the round's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import machine, result_path, versions
from benchmarks.cpu_precision import LEARNER_SHAPE

LOADS = ("none", "compute", "memory", "engine")
LOAD_CORE, UPDATE_CORE = 0, 1
WARMUP = 3  # untimed updates first: on an AMD EPYC VM the 2nd to 4th still ran 10-20% slower


def load(kind: str) -> None:
    """Keep core LOAD_CORE busy with `kind` until killed; print READY once it runs."""
    os.sched_setaffinity(0, [LOAD_CORE])
    import torch

    torch.set_num_threads(1)
    if kind == "compute":
        a = torch.randn(256, 256, dtype=torch.bfloat16)
        b = torch.randn(256, 256, dtype=torch.bfloat16)
        print("READY", flush=True)
        while True:
            a = (a @ b).clamp_(-1, 1)
    elif kind == "memory":
        import numpy as np

        src = np.ones(64 << 20, dtype=np.float32)  # 256 MiB each, far beyond the L3
        dst = np.empty_like(src)
        print("READY", flush=True)
        while True:
            np.copyto(dst, src)
    elif kind == "engine":
        with tempfile.TemporaryDirectory(prefix="rlsys-contention-") as scratch:
            _engine_loop(scratch)
    else:
        raise SystemExit(f"core_contention: unknown load {kind!r}; one of {LOADS[1:]}")


def _engine_loop(scratch: str) -> None:
    from actors.rollout import rollout_env_vars
    from rlsys.build import fitting_prompts, prepare_model_and_task
    from rlsys.config import load_config

    cfg = load_config(["conf=smol"])  # rollout.dtype "auto" is resolved for this CPU
    r = cfg.rollout
    os.environ.update(rollout_env_vars(scratch, r.kv_cache_gb, 1))
    model_path, task, tokenizer = prepare_model_and_task(cfg)
    _, prompts, _ = fitting_prompts(cfg, tokenizer, task.sample(r.prompts_per_step))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=r.dtype, seed=0,
              max_model_len=r.max_model_len, enforce_eager=True, enable_chunked_prefill=False)
    sampling = SamplingParams(n=r.group_size, temperature=r.temperature,
                              max_tokens=r.max_new_tokens)
    llm.generate(prompts[:1], SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # warm-up
    print("READY", flush=True)
    while True:
        llm.generate(prompts, sampling, use_tqdm=False)


def serve_updates(prompts: int) -> None:
    """The demo's learner (conf/smol.yaml's, its compute dtype resolved for this CPU) on core
    UPDATE_CORE, one thread: after WARMUP updates it prints READY, then times one update of a
    demo-shaped batch per line read from stdin and prints `TIME seconds`."""
    import torch
    from transformers import AutoConfig

    from benchmarks.learner_packing import make_batch
    from learners.learner import Learner
    from rlsys.config import load_config
    from rlsys.models import default_cache_dir, resolve_model

    cfg = load_config(["conf=smol", "learner.num_threads=1",
                       f"learner.cpu_cores=[{UPDATE_CORE}]"])
    torch.set_num_threads(1)
    path = str(resolve_model(cfg.model.path, default_cache_dir()))
    shape = LEARNER_SHAPE | {"prompts": prompts, "group": cfg.rollout.group_size}
    batch = make_batch(shape, AutoConfig.from_pretrained(path).vocab_size)
    model = Learner(path, cfg.learner, cfg.algorithm, temperature=cfg.rollout.temperature,
                    max_response_len=shape["response_len"][1])
    for _ in range(WARMUP):  # AdamW's state, the allocator's pages: the first ones run slower
        model.train_step(batch)
    print(f"READY {len(batch['response_ids'])} {cfg.learner.compute_dtype}", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        model.train_step(batch)
        print(f"TIME {time.perf_counter() - t0:.3f}", flush=True)


def start(argv: list[str], what: str, env: dict[str, str] | None = None,
          stdin: int | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m benchmarks.core_contention ARGV` once it prints READY (and what follows it
    on that line); stops with one line naming `what` if it exits first."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.core_contention", *argv],
                            stdin=stdin, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # vLLM prints to stdout too
        if line.startswith("READY"):
            return proc, line[len("READY"):].strip()
    raise SystemExit(f"core_contention: {what} did not start (exit {proc.wait()})")


def measure(prompts: int, reps: int) -> dict:
    """Seconds per update beside each load, interleaved: every load runs in a process of its
    own, stopped (SIGSTOP) but for the one under test (SIGCONT), and each round times one
    update per load, so that the drift between rounds (up to 30% on an AMD EPYC VM) falls on
    every load alike. Each load's slowdown is the median over rounds of its time over the
    round's time alone."""
    from rlsys.build import learner_env

    loads: dict[str, subprocess.Popen] = {}
    learner = None
    try:
        for kind in LOADS[1:]:
            loads[kind], _ = start(["--load", kind], f"the {kind} load")
            loads[kind].send_signal(signal.SIGSTOP)
            # Keep draining its output, so that a full pipe never stops it.
            threading.Thread(target=loads[kind].stdout.read, daemon=True).start()
        learner, about = start(["--serve-updates", str(prompts)], "the learner",
                               env=os.environ | learner_env(1, "jemalloc")["env_vars"],
                               stdin=subprocess.PIPE)
        times: dict[str, list[float]] = {kind: [] for kind in LOADS}
        for _ in range(reps):
            for kind in LOADS:
                if kind != "none":
                    loads[kind].send_signal(signal.SIGCONT)
                    time.sleep(1.0)  # the load back at full speed before the update starts
                learner.stdin.write("go\n")
                learner.stdin.flush()
                line = next((x for x in learner.stdout if x.startswith("TIME ")), None)
                if kind != "none":
                    loads[kind].send_signal(signal.SIGSTOP)
                if line is None:
                    raise SystemExit(f"core_contention: the learner exited beside {kind} "
                                     f"(exit {learner.wait()})")
                times[kind].append(round(float(line.split()[1]), 2))
            print("round:", {k: v[-1] for k, v in times.items()}, flush=True)
    finally:
        for proc in [*loads.values(), *([learner] if learner else [])]:
            proc.kill()
            proc.wait()
    sequences, dtype = about.split()
    return {"sequences": int(sequences), "dtype": dtype, "seconds": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "slowdown": {k: round(statistics.median([t / alone for t, alone in
                                                     zip(times[k], times["none"], strict=True)]),
                                  3) for k in LOADS[1:]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 prompt, 2 rounds")
    parser.add_argument("--reps", type=int, default=7, help="rounds (one update per load each)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (x G) per update")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--serve-updates", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load(args.load)
        return
    if args.serve_updates:
        serve_updates(args.serve_updates)
        return
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("core_contention: needs two cores (the load on 0, the update on 1)")
    prompts, reps = (1, 2) if args.quick else (args.prompts, args.reps)
    t0 = time.perf_counter()
    results = measure(prompts, reps)
    record = {"benchmark": "core_contention", "machine": machine(),
              "versions": versions("torch", "vllm", "numpy"),
              "prompts": prompts, "reps": reps, "warmup": WARMUP,
              "cores": {"load": LOAD_CORE, "update": UPDATE_CORE},
              "minutes": round((time.perf_counter() - t0) / 60, 1), **results}
    path = result_path("core_contention", args.quick)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"update seconds (median): {results['median_s']}; slowdown beside each load "
          f"(median of per-round ratios): {results['slowdown']}; wrote {path}")


if __name__ == "__main__":
    main()
