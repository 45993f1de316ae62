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

Each runs in its own process; the update's process is started after the load reports it is
running, warms up with one update, then times --reps updates (median). Writes
benchmarks/results/core_contention.json (--quick: results/quick/) with each load's slowdown
(median seconds beside it / alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import child_result, machine, result_path, versions
from benchmarks.cpu_precision import LEARNER_SHAPE

LOADS = ("none", "compute", "memory", "engine")
LOAD_CORE, UPDATE_CORE = 0, 1


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


def update(prompts: int, reps: int) -> dict:
    """Seconds per demo-shaped update of the demo's learner (conf/smol.yaml's, its compute
    dtype resolved for this CPU) on core UPDATE_CORE, one thread (one warm-up first)."""
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
    model.train_step(batch)  # warm-up: AdamW's state, the allocator's pages
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.train_step(batch)
        times.append(round(time.perf_counter() - t0, 2))
    return {"seconds": times, "median_s": statistics.median(times),
            "sequences": len(batch["response_ids"]), "dtype": cfg.learner.compute_dtype}


def measure(kind: str, prompts: int, reps: int) -> dict:
    """The update's times beside load `kind` (none: alone), each in a process of its own."""
    from rlsys.build import learner_env

    loader = None
    if kind != "none":
        loader = subprocess.Popen([sys.executable, "-m", "benchmarks.core_contention",
                                   "--load", kind], stdout=subprocess.PIPE, text=True)
        line = loader.stdout.readline() if loader.stdout else ""
        if not line.startswith("READY"):
            loader.kill()
            raise SystemExit(f"core_contention: the {kind} load did not start "
                             f"(exit {loader.wait()})")
    try:
        return child_result(["benchmarks.core_contention", "--update", str(prompts), str(reps)],
                            f"the update beside {kind}",
                            env=os.environ | learner_env(1, "jemalloc")["env_vars"])
    finally:
        if loader is not None:
            loader.kill()
            loader.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 prompt, 2 reps")
    parser.add_argument("--reps", type=int, default=5, help="timed updates per load")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (x 8) per update")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--update", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load(args.load)
        return
    if args.update:
        print("RESULT " + json.dumps(update(*args.update)), flush=True)
        return
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("core_contention: needs two cores (the load on 0, the update on 1)")
    prompts, reps = (1, 2) if args.quick else (args.prompts, args.reps)
    results = {}
    for kind in LOADS:
        t0 = time.perf_counter()
        results[kind] = measure(kind, prompts, reps)
        print(f"update beside {kind}: {results[kind]} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    alone = results["none"]["median_s"]
    slowdown = {k: round(results[k]["median_s"] / alone, 3) for k in LOADS[1:]}
    record = {"benchmark": "core_contention", "machine": machine(),
              "versions": versions("torch", "vllm", "numpy"),
              "prompts": prompts, "reps": reps, "cores": {"load": LOAD_CORE,
                                                          "update": UPDATE_CORE},
              "results": results, "slowdown": slowdown}
    path = result_path("core_contention", args.quick)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"update slowdown beside each load: {slowdown}; wrote {path}")


if __name__ == "__main__":
    main()
