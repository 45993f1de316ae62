"""Which precision the demo should compute in on this CPU: bfloat16 against float32, for the
rollout engine and for the learner, side by side.

    python -m benchmarks.cpu_precision [--quick] [--reps N]

`rollout.dtype` and `learner.compute_dtype` default to "auto" (rlsys.precision.resolve_dtype):
bfloat16 where the CPU computes in it natively (AVX-512 BF16, AMX, Arm BF16), float32
elsewhere, where bfloat16 is emulated. This measures the choice on the machine at hand:

* engine: a plain in-process `vllm.LLM.generate` with the demo's settings (conf/smol.yaml's
  engine, few-shot prompts, G completions at temperature 1.5, 48 tokens at most), in each
  dtype; tokens/s of sampled completions, median over --reps calls after a warm-up call;
* learner: `Learner.train_step` (the demo's learner: fp32 masters, packed micro-batches) on a
  demo-shaped batch (few-shot prompts sharing their prefix, ~30-token responses), with
  compute_dtype bfloat16 and float32; seconds per update, median over --reps after a warm-up.

Each measurement runs in its own child process, on every core, one after the other: the
engine in float32, then in bfloat16, then the learner in the same order. The gap measured on an
AVX2 box (3.8x, 19.7x) is far larger than the machine's drift between them.
Writes benchmarks/results/cpu_precision.json (--quick: results/quick/), with the CPU's
native-bfloat16 verdict and the dtype "auto" picks here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks.common import child_result, machine, result_path, timed_reps, versions

DTYPES = ("float32", "bfloat16")
FULL = {"prompts": 4, "group": 8, "max_new_tokens": 48, "learner_prompts": 1, "reps": 2}
QUICK = {"prompts": 2, "group": 4, "max_new_tokens": 16, "learner_prompts": 1, "reps": 1}
# The demo's learner batch, per prompt (benchmarks/learner_packing.py's few-shot shape).
LEARNER_SHAPE = {"shared_prefix": 140, "prompt_len": [20, 28], "response_len": [18, 40],
                 "truncated_frac": 0.0, "seed": 0}


def engine(dtype: str, spec: dict) -> dict:
    """Tokens/s of the demo's sampling in a raw vLLM engine holding `dtype` weights."""
    with tempfile.TemporaryDirectory(prefix="rlsys-precision-") as scratch:
        return _engine(dtype, spec, scratch)


def _engine(dtype: str, spec: dict, scratch: str) -> dict:
    from actors.rollout import rollout_env_vars
    from rlsys.build import fitting_prompts, prepare_model_and_task
    from rlsys.config import load_config

    cfg = load_config(["conf=smol", f"rollout.dtype={dtype}"])
    r = cfg.rollout
    # The engine actor's environment (its KV cache size, threads), set before vLLM loads.
    os.environ.update(rollout_env_vars(scratch, r.kv_cache_gb, os.cpu_count() or 1))
    model_path, task, tokenizer = prepare_model_and_task(cfg)
    _, prompts, _ = fitting_prompts(cfg, tokenizer, task.sample(spec["prompts"]))
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype=dtype, seed=0, max_model_len=r.max_model_len,
              enforce_eager=True, enable_chunked_prefill=False)
    sampling = SamplingParams(n=spec["group"], temperature=r.temperature,
                              max_tokens=spec["max_new_tokens"], seed=0)
    llm.generate(prompts[:1], SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # warm-up
    # The same seed every rep: each call samples the same tokens, so the reps differ in time only.
    runs = timed_reps(lambda rep: llm.generate(prompts, sampling, use_tqdm=False),
                      lambda out: sum(len(c.token_ids) for o in out for c in o.outputs),
                      spec["reps"], f"{dtype} ")
    times = [run["seconds"] for run in runs]
    tokens = runs[-1]["tokens"]
    return {"seconds": times, "tokens": tokens,
            "tokens_per_s": round(tokens / statistics.median(times), 1)}


def learner(dtype: str, spec: dict) -> dict:
    """Seconds per GRPO update of the demo's learner computing in `dtype`."""
    import torch
    from transformers import AutoConfig

    from benchmarks.learner_packing import make_batch
    from learners.learner import Learner
    from rlsys.config import AlgorithmConfig, LearnerConfig
    from rlsys.models import default_cache_dir, resolve_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    path = str(resolve_model("smollm2-135m-instruct", default_cache_dir()))
    shape = LEARNER_SHAPE | {"prompts": spec["learner_prompts"], "group": 8}
    batch = make_batch(shape, AutoConfig.from_pretrained(path).vocab_size)
    model = Learner(path, LearnerConfig(compute_dtype=dtype, num_threads=threads, lr=1e-5),
                    AlgorithmConfig(kl_coef=0.0), max_response_len=shape["response_len"][1])
    model.train_step(batch)  # warm-up: AdamW's state, the kernels' first calls
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        model.train_step(batch)
        times.append(time.perf_counter() - t0)
    prompts = {tuple(p) for p in batch["prompt_ids"]}
    return {"seconds": [round(t, 2) for t in times], "median_s": round(statistics.median(times), 2),
            "sequences": len(batch["response_ids"]),
            "response_tokens": sum(map(len, batch["response_ids"])),
            "prompt_tokens": sum(map(len, prompts))}


def child(part: str, dtype: str, spec: dict) -> dict:
    """Run one measurement in a fresh process (its own engine or learner, its own memory)."""
    return child_result(["benchmarks.cpu_precision", "--child", part, dtype, json.dumps(spec)],
                        f"the {part} child ({dtype})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny batch, one rep (~6 min on a 2-core AVX2 box)")
    parser.add_argument("--reps", type=int, help="timed calls per measurement")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        part, dtype, spec = args.child
        print("RESULT " + json.dumps((engine if part == "engine" else learner)(
            dtype, json.loads(spec))), flush=True)
        return
    from rlsys.precision import cpu_has_native_bf16, resolve_dtype

    spec = dict(QUICK if args.quick else FULL)
    if args.reps:
        spec["reps"] = args.reps
    results: dict[str, dict] = {"engine": {}, "learner": {}}
    for part in ("engine", "learner"):
        for dtype in DTYPES:
            t0 = time.perf_counter()
            results[part][dtype] = child(part, dtype, spec)
            print(f"{part} {dtype}: {results[part][dtype]} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    engine_ratio = (results["engine"]["float32"]["tokens_per_s"]
                    / results["engine"]["bfloat16"]["tokens_per_s"])
    learner_ratio = (results["learner"]["bfloat16"]["median_s"]
                     / results["learner"]["float32"]["median_s"])
    record = {
        "benchmark": "cpu_precision", "machine": machine(),
        "versions": versions("torch", "vllm", "transformers"), "spec": spec,
        "native_bf16": cpu_has_native_bf16(), "auto_picks": resolve_dtype("auto", gpu=False),
        "results": results,
        # > 1: float32 is faster by this factor.
        "float32_speedup": {"engine": round(engine_ratio, 2), "learner": round(learner_ratio, 2)},
    }
    path = result_path("cpu_precision", args.quick)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"float32 over bfloat16: engine {engine_ratio:.2f}x tokens/s, learner "
          f"{learner_ratio:.2f}x faster updates; auto picks {record['auto_picks']} here "
          f"(native bf16: {record['native_bf16']}); wrote {path}")


if __name__ == "__main__":
    main()
