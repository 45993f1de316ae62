"""The memory plan's learner estimate (rlsys/memory_plan.py) against measured peak memory, on CPU.

    python -m benchmarks.memory_plan [--quick] [--models NAME ...] [--budgets N ...] [--out PATH]

For each model and token budget, with activation checkpointing off and on, one GRPO update of
the real learner (`learners.learner.Learner`, a world of one in this process: fp32 master
weights, bf16 autocast, packed micro-batches, AdamW) on a batch of exactly two micro-batches,
so that the second micro-batch's activations are saved while the first one's gradients are
held, as in any update with gradient accumulation. Checkpointing is the learner's own
(`learner.activation_checkpointing=full`: every decoder layer under non-reentrant
torch.utils.checkpoint).

Measured: every allocation and free of the CPU allocator during the update, as the torch
profiler records them (`profile_memory=True`); the peak of their running sum is the memory the
update takes above what the learner held before it (its parameters and AdamW state, counted
from the tensors). Estimated: `rlsys.memory_plan.learner_plan` for the same shape, dtypes and
the micro-batch's real token count. Compared: the transient part (gradients, autocast's weight
copy, activations, logits; what the plan derives per token) and the total peak. The target is
the estimate within +-25% of the measurement.

Writes benchmarks/results/memory_plan.json (--quick: results/quick/, the tiny model only, in
well under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import machine, result_path, versions

TOLERANCE = 0.25
PROMPT_LEN, RESPONSE_LEN, GROUP = 16, 240, 4  # one group = 976 tokens
FULL = {"tiny-random": [1024, 4096, 16384], "smollm2-135m-instruct": [1024, 2048, 4096]}
QUICK = {"tiny-random": [1024, 2048, 4096]}
#: Tensor x data parallel learner worlds (TPxDP), measured on the tiny model at one budget: the
#: vocabulary-parallel log-softmax, TP-split activations and FSDP's gathered units.
PARALLEL, QUICK_PARALLEL, PARALLEL_BUDGET = ("2x1", "1x2", "2x2"), ("2x2",), 4096
MODES = ("none", "full")


def allocator_peak(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, int]:
    """Run `fn`; return its result and the peak bytes allocated above the allocation at the
    start. CUDA: the caching allocator's statistics. CPU: the allocation events the torch
    profiler records (`profile_memory=True`), summed in time order."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak


def grpo_batch(budget: int, vocab: int, micro_batches: int = 2, seed: int = 0) -> dict:
    """Groups of GROUP responses of RESPONSE_LEN tokens to a PROMPT_LEN-token prompt, as many
    as fill `micro_batches` micro-batches of `budget` tokens (whole groups per micro-batch)."""
    import random

    rng = random.Random(seed)
    per_mb = max(1, budget // (PROMPT_LEN + GROUP * RESPONSE_LEN))
    prompts, responses = [], []
    for _ in range(per_mb * micro_batches):
        prompt = [rng.randrange(5, vocab) for _ in range(PROMPT_LEN)]
        for _ in range(GROUP):
            prompts.append(prompt)
            responses.append([rng.randrange(5, vocab) for _ in range(RESPONSE_LEN)])
    n = len(responses)
    return {"prompt_ids": prompts, "response_ids": responses,
            "advantages": [(-1.0) ** i * 0.5 for i in range(n)],
            "rollout_logprobs": [[-2.0] * RESPONSE_LEN for _ in range(n)]}


def _state_bytes(learner: Any) -> int:
    """Bytes of this rank's parameters and AdamW state (local shards of DTensors)."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    total = sum(local(p) for p in learner.model.parameters())
    for state in learner.optimizer.state.values():
        total += sum(local(t) for t in state.values() if isinstance(t, torch.Tensor))
    return total


def plan_config(model_path: str, tokens: int, mode: str, tp: int = 1, dp: int = 1) -> Any:
    """The Config the plan sees for one measurement (learner defaults, no reference model)."""
    from rlsys.config import Config

    cfg = Config()
    cfg.model.path = model_path
    cfg.learner.max_tokens_per_microbatch = tokens
    cfg.learner.activation_checkpointing = mode
    cfg.learner.tp, cfg.learner.dp = tp, dp
    cfg.algorithm.kl_coef = 0.0
    cfg.rollout.max_model_len = PROMPT_LEN + RESPONSE_LEN  # the widest attention row
    return cfg


def _update_peak(model_path: str, budget: int, mode: str, threads: int, tp: int = 1,
                 dp: int = 1, rank: int = 0, port: int | None = None) -> dict:
    """One learner rank: a warm-up update, then the measured one; its bytes and tokens."""
    from learners.learner import Learner
    from learners.packing import pack_microbatches
    from rlsys.config import AlgorithmConfig, LearnerConfig
    from rlsys.memory_plan import model_shape

    shape = model_shape(model_path)
    assert shape is not None, model_path
    lc = LearnerConfig(max_tokens_per_microbatch=budget, activation_checkpointing=mode,
                       num_threads=threads, tp=tp, dp=dp)
    learner = Learner(model_path, lc, AlgorithmConfig(kl_coef=0.0),
                      max_response_len=RESPONSE_LEN, seed=0, rank=rank, master_port=port)
    batch = grpo_batch(budget, shape.vocab, seed=rank // tp)  # this dp rank's shard
    mbs = pack_microbatches(batch["prompt_ids"], batch["response_ids"], budget)
    learner.train_step(batch)  # warm-up: AdamW's state exists from here on
    resident = _state_bytes(learner)
    t0 = time.perf_counter()
    step = functools.partial(learner.train_step, batch)
    _, transient = allocator_peak(step)
    seconds = time.perf_counter() - t0
    del step, learner
    gc.collect()
    return {"resident": resident, "transient": transient, "seconds": seconds,
            "tokens": max(mb.num_tokens for mb in mbs), "micro_batches": len(mbs)}


def _rank_main(rank: int, tp: int, dp: int, port: int, model_path: str, budget: int, mode: str,
               out_dir: str) -> None:
    """A spawned learner rank of a (tp, dp) measurement; writes rank<N>.json."""
    import torch.distributed as dist

    result = _update_peak(model_path, budget, mode, 1, tp, dp, rank, port)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _parallel_peak(model_path: str, budget: int, mode: str, tp: int, dp: int) -> dict:
    """The busiest rank of a (tp, dp) learner world of spawned processes (gloo)."""
    import multiprocessing
    import tempfile

    from rlsys.weight_sync import find_free_port

    ctx = multiprocessing.get_context("spawn")
    port = find_free_port()
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, tp, dp, port, model_path, budget, mode,
                                                      tmp)) for r in range(tp * dp)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        if any(p.exitcode != 0 for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError(f"(tp={tp}, dp={dp}) ranks exited {[p.exitcode for p in procs]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(tp * dp)]
    return max(ranks, key=lambda r: r["resident"] + r["transient"])


def measure(model_path: str, name: str, budget: int, mode: str, threads: int, tp: int = 1,
            dp: int = 1) -> dict:
    """One model x budget x checkpointing mode (x parallel shape): measured and planned peaks."""
    from rlsys.memory_plan import GiB, learner_plan, model_shape

    shape = model_shape(model_path)
    assert shape is not None, model_path
    if tp * dp == 1:
        # In this process: a learner world of one (the default process group stays).
        m = _update_peak(model_path, budget, mode, threads)
    else:
        m = _parallel_peak(model_path, budget, mode, tp, dp)
    resident, transient, tokens, seconds = m["resident"], m["transient"], m["tokens"], m["seconds"]
    plan = learner_plan(plan_config(model_path, tokens, mode, tp, dp), shape, mode)
    resident_terms = ("parameters", "optimizer (AdamW)")
    plan_resident = sum(t.gib for t in plan.terms if t.counted and t.name in resident_terms)
    plan_transient = plan.peak - plan_resident
    measured_transient = transient / GiB
    measured_peak = (resident + transient) / GiB
    row = {
        "model": name, "tp": tp, "dp": dp, "budget": budget, "tokens_per_microbatch": tokens,
        "micro_batches": m["micro_batches"], "checkpointing": mode,
        "measured_resident_gib": resident / GiB, "measured_transient_gib": measured_transient,
        "measured_peak_gib": measured_peak,
        "plan_resident_gib": plan_resident, "plan_transient_gib": plan_transient,
        "plan_peak_gib": plan.peak,
        "ratio_transient": plan_transient / measured_transient,
        "ratio_peak": plan.peak / measured_peak,
        "plan_terms_gib": {t.name: t.gib for t in plan.terms if t.counted},
        "profiled_update_s": seconds,
    }
    row["within_target"] = all(abs(row[k] - 1) <= TOLERANCE
                               for k in ("ratio_transient", "ratio_peak"))
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only (< 1 min)")
    parser.add_argument("--models", nargs="+", help="built-in model names (default: "
                        f"{', '.join(FULL)}; --quick: {', '.join(QUICK)})")
    parser.add_argument("--budgets", nargs="+", type=int,
                        help="tokens per micro-batch (default: per model, see FULL/QUICK)")
    parser.add_argument("--parallel", nargs="*", metavar="TPxDP",
                        help="(tp, dp) learner worlds of spawned processes, tiny model, at "
                        f"{PARALLEL_BUDGET} tokens (default: {' '.join(PARALLEL)}; --quick: "
                        f"{' '.join(QUICK_PARALLEL)}; none: no argument)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: "
                        "benchmarks/results[/quick]/memory_plan.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rlsys.models import resolve_model

    table = QUICK if args.quick else FULL
    shapes = args.parallel if args.parallel is not None else (
        QUICK_PARALLEL if args.quick else PARALLEL)
    cases = [(name, budget, 1, 1) for name in args.models or list(table)
             for budget in args.budgets or table.get(name, FULL["tiny-random"])]
    cases += [("tiny-random", PARALLEL_BUDGET, *map(int, shape.split("x"))) for shape in shapes]
    rows = []
    started = time.time()
    for name, budget, tp, dp in cases:
        path = str(resolve_model(name))
        for mode in MODES:
            row = measure(path, name, budget, mode, args.threads, tp, dp)
            rows.append(row)
            print(f"{name:>22} tp {tp} dp {dp} {row['tokens_per_microbatch']:>6} tokens  ckpt "
                  f"{mode:<4}  measured {row['measured_transient_gib']:7.3f} + resident "
                  f"{row['measured_resident_gib']:.3f} GiB  plan "
                  f"{row['plan_transient_gib']:7.3f} + {row['plan_resident_gib']:.3f}  "
                  f"ratio {row['ratio_transient']:.2f} / peak {row['ratio_peak']:.2f}",
                  flush=True)
    worst = max(rows, key=lambda r: abs(r["ratio_transient"] - 1))
    result = {
        "command": "python -m benchmarks.memory_plan" + (" --quick" if args.quick else ""),
        "machine": {**machine(), "platform": platform.platform()},
        "versions": versions("torch", "transformers"),
        "tolerance": TOLERANCE,
        "batch": {"prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN, "group": GROUP,
                  "micro_batches": 2},
        "checkpointing": "the learner's own (learner.activation_checkpointing=full)",
        "rows": rows,
        "worst_ratio_transient": worst["ratio_transient"],
        "within_target": all(r["within_target"] for r in rows),
        "minutes": (time.time() - started) / 60,
    }
    out = args.out or result_path("memory_plan", args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; all within +-{TOLERANCE:.0%}: {result['within_target']}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
