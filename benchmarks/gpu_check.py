"""A prepared GPU check of the learner's path: `python -m benchmarks.gpu_check [--device cuda|cpu]`.

Needs only torch and transformers (no Ray, no vLLM, no omegaconf): the GPU machines that may be
lent for a short check have nothing else. It imports the learner's own pieces that are plain
torch (learners/packing.py, learners/parallel.py, rlsys/algo) and the memory plan
(rlsys/memory_plan.py), and runs in well under 8 minutes on one GPU:

1. a learner-style update in bf16 (fp32 master weights, bf16 autocast, packed micro-batches
   with the packed-attention kernel the learner picks, chunked log-probs, the GRPO token-mean
   surrogate, gradient clipping, fused AdamW) of randomly initialised SmolLM2-135M- and
   Qwen2.5-1.5B-shaped models, two micro-batches of >= 16k tokens per update, without and with
   activation checkpointing: tokens/s, MFU (model FLOPs, no recompute, against the GPU's dense
   bf16 peak from its spec sheet, and against a bf16 matmul measured here), peak memory
   (allocator statistics) against rlsys.memory_plan's estimate, and the memory checkpointing
   saves;
2. varlen against SDPA parity of the packed attention (`learners.packing.packed_attention_parity`);
3. a DCP (torch.distributed.checkpoint) save/load round trip of model and optimizer state;
4. the learner's end of a full weight sync on the GPU over NCCL (one rank): casting in the sync
   against weights staged in the update (`learner.stage_weights`).

Writes benchmarks/results/gpu_check.json. `--device cpu` runs the same code on the tiny model's
shape in well under a minute (CI runs it) and writes results/quick/gpu_check.json, so that it
never replaces GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.common import machine, result_path, versions
from benchmarks.memory_plan import allocator_peak

#: Dense bf16 tensor-core peaks from the vendors' spec sheets (TFLOP/s, no sparsity), by a
#: substring of torch.cuda.get_device_name(). FACTS.md: an H200 measured ~790 in practice.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GB200", 2500.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))
GPU_MODELS = ("smollm2-135m-instruct", "Qwen2.5-1.5B")
SYNC_BUCKET_BYTES = 64 << 20  # learner.sync_bucket_mb's default (the config needs omegaconf)
GPU_TOKENS = 16384  # per micro-batch
CPU_MODELS = ("tiny-random",)
CPU_TOKENS = 1024
MICRO_BATCHES = 2
TOLERANCE = 0.25  # plan vs measured peak


def bf16_peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in BF16_PEAK_TFLOPS if key in name), None)


def matmul_tflops(device: Any, size: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul throughput: the achievable peak on this GPU."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def hf_config(shape: Any) -> Any:
    """A transformers config of the shape (Llama, or Qwen2 when it has q/k/v biases)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                  tie_word_embeddings=shape.tied, max_position_embeddings=32768,
                  head_dim=shape.dim)
    return Qwen2Config(**common) if shape.attention_bias else LlamaConfig(**common)


def make_batch(budget: int, vocab: int, seed: int = 0) -> tuple[list, list]:
    """GRPO-shaped groups (8 responses of 64-1024 tokens to a 64-256-token prompt), enough to
    fill MICRO_BATCHES micro-batches of `budget` tokens."""
    rng = random.Random(seed)
    prompts, responses = [], []
    total = 0
    while total < MICRO_BATCHES * budget * 1.05:
        prompt = [rng.randrange(5, vocab) for _ in range(rng.randint(64, 256))]
        total += len(prompt)
        for _ in range(8):
            n = min(rng.randint(64, 1024), budget - len(prompt) - 8 * 64)
            prompts.append(prompt)
            responses.append([rng.randrange(5, vocab) for _ in range(n)])
            total += n
    return prompts, responses


def attention_visits(mb: Any) -> int:
    """Query-key pairs the attention computes for a packed micro-batch (causal, each response
    seeing its prompt): sum over rows of n * context + n (n + 1) / 2."""
    rows = mb.layout.varlen
    q = (rows.cu_q[1:] - rows.cu_q[:-1]).tolist()
    k = (rows.cu_k[1:] - rows.cu_k[:-1]).tolist()
    return sum(n * (kk - n) + n * (n + 1) // 2 for n, kk in zip(q, k, strict=True))


def model_flops(shape: Any, mbs: list) -> float:
    """Model FLOPs of forward + backward (no recompute): 6 per weight per token through every
    linear layer (the output projection on predicted positions only) and 12 x q_dim per
    attended query-key pair and layer."""
    linear = shape.layers * shape.layer_linear_params()
    flops = 0.0
    for mb in mbs:
        t, n = mb.num_tokens, int(mb.targets.numel())
        flops += 6 * (linear * t + shape.vocab * shape.hidden * n)
        flops += 12 * shape.q_dim * shape.layers * attention_visits(mb)
    return flops


def _state_bytes(model: Any, optimizer: Any) -> int:
    import torch

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values()
                     if isinstance(t, torch.Tensor))
    return total


def plan_namespace(device: str, tokens: int, mode: str, row_width: int, backend: str) -> Any:
    """What rlsys.memory_plan reads of a Config, without omegaconf. The plan counts no SDPA mask
    on CUDA; when the learner falls back to SDPA there, plan it as the CPU path (with masks)."""
    plan_device = "cuda" if device == "cuda" and backend != "sdpa" else "cpu"
    learner = SimpleNamespace(tp=1, dp=1, max_tokens_per_microbatch=tokens,
                              param_dtype="float32", compute_dtype="bfloat16",
                              device=plan_device, activation_checkpointing=mode,
                              device_memory_gb=1e9, sync_mode="full", stage_weights=False)
    return SimpleNamespace(learner=learner,
                           algorithm=SimpleNamespace(kl_coef=0.0, entropy_coef=0.0,
                                                     entropy_target=0.0),
                           rollout=SimpleNamespace(max_model_len=row_width, temperature=1.0),
                           distill=SimpleNamespace(loss="sft", teacher=None))


class Update:
    """The learner's update on one process: packed micro-batches, bf16 autocast over fp32
    masters, log-probs of the response tokens only, GRPO's token-mean surrogate (on-policy: the
    ratio against a detached copy of the same pass), clipping, fused AdamW."""

    def __init__(self, shape: Any, device: str, mode: str, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from learners import parallel
        from learners.packing import ATTENTION_NAME, register_packed_attention

        register_packed_attention()
        torch.manual_seed(seed)
        self.device = torch.device(device)
        with self.device:
            self.model = AutoModelForCausalLM.from_config(
                hf_config(shape), dtype=torch.float32, attn_implementation=ATTENTION_NAME)
        self.model.train()
        if mode == "full":
            parallel.apply_activation_checkpointing(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6,
                                           betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(self, mbs: list) -> float:
        import torch

        from learners import parallel

        dev = self.device
        num_tokens = sum(int(mb.targets.numel()) for mb in mbs)
        for mb in mbs:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = self.model(input_ids=mb.input_ids[None].to(dev),
                                 position_ids=mb.position_ids[None].to(dev),
                                 packed_layout=mb.layout.to(dev),
                                 logits_to_keep=mb.predict_index.to(dev), use_cache=False)
            logprobs, _ = parallel.token_logprobs(out.logits[0], mb.targets.to(dev))
            del out
            gen = torch.Generator().manual_seed(int(mb.targets.numel()))
            adv = torch.randn(len(mb.response_lens), generator=gen).to(dev)
            token_adv = adv.repeat_interleave(torch.tensor(mb.response_lens, device=dev))
            ratio = torch.exp(logprobs - logprobs.detach())
            loss = -(ratio * token_adv).sum() / num_tokens
            loss.backward()
        norm = parallel.clip_grad_norm(list(self.model.parameters()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def check_model(name: str, device: str, budget: int, steps: int, peak_tflops: dict) -> dict:
    """Both checkpointing modes of one model shape: speed, MFU, memory against the plan."""
    import gc

    import torch

    from learners.packing import attention_backend, pack_microbatches
    from rlsys.memory_plan import GiB, learner_plan, model_shape

    shape = model_shape(name)
    assert shape is not None, name
    prompts, responses = make_batch(budget, shape.vocab)
    mbs = pack_microbatches(prompts, responses, budget)[:MICRO_BATCHES]
    tokens = max(mb.num_tokens for mb in mbs)
    step_tokens = sum(mb.num_tokens for mb in mbs)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    backend = attention_backend(torch.device(device), torch.bfloat16, shape.dim)
    flops = model_flops(shape, mbs)
    result: dict[str, Any] = {"model": name, "shape": shape.describe(), "params": shape.params(),
                              "tokens_per_microbatch": tokens, "micro_batches": len(mbs),
                              "tokens_per_update": step_tokens, "attention_backend": backend,
                              "model_tflop_per_update": flops / 1e12, "modes": {}}
    for mode in ("none", "full"):
        update = Update(shape, device, mode)
        update.step(mbs)  # warm-up: kernels, AdamW's state
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            update.step(mbs)
            _sync(device)
            times.append(time.perf_counter() - start)
        resident = _state_bytes(update.model, update.optimizer)
        _, transient = allocator_peak(lambda u=update: u.step(mbs), device)
        del update
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        plan = learner_plan(plan_namespace(device, tokens, mode, width, backend), shape, mode)
        median = statistics.median(times)
        measured = (resident + transient) / GiB
        figures = {"step_s": times, "median_step_s": median,
                   "tokens_per_s": step_tokens / median,
                   "model_tflops": flops / median / 1e12,
                   "peak_gib": measured, "resident_gib": resident / GiB,
                   "plan_peak_gib": plan.peak, "plan_ratio": plan.peak / measured,
                   "plan_terms_gib": {t.name: t.gib for t in plan.terms if t.counted}}
        for key, tf in peak_tflops.items():
            if tf:
                figures[f"mfu_{key}"] = flops / median / 1e12 / tf
        figures["plan_within_tolerance"] = abs(figures["plan_ratio"] - 1) <= TOLERANCE
        result["modes"][mode] = figures
        print(f"{name:>22} ckpt {mode:<4}: {figures['tokens_per_s']:>10,.0f} tokens/s, "
              f"{figures['model_tflops']:8.2f} TFLOP/s, peak {measured:7.2f} GiB, plan "
              f"{plan.peak:7.2f} GiB ({figures['plan_ratio']:.2f}x)", flush=True)
    none, full = result["modes"]["none"], result["modes"]["full"]
    result["checkpointing_saved_gib"] = none["peak_gib"] - full["peak_gib"]
    result["checkpointing_saved_plan_gib"] = none["plan_peak_gib"] - full["plan_peak_gib"]
    result["checkpointing_time_cost"] = full["median_step_s"] / none["median_step_s"]
    return result


def check_parity(device: str) -> dict:
    """The packed-attention kernel the learner uses on this device against SDPA."""
    import torch

    try:
        from learners.packing import packed_attention_parity
    except ImportError:
        return {"available": False, "ok": None}
    if device == "cuda":
        out = packed_attention_parity("cuda", torch.bfloat16)
    else:  # SDPA against itself in float32: checks the harness, on small rows
        out = packed_attention_parity("cpu", torch.float32, num_heads=4, num_kv_heads=2,
                                      head_dim=32, prompt_lens=(30, 7),
                                      response_lens=(40, 1, 25, 3))
    return {"available": True, **{k: v for k, v in out.items() if _jsonable(v)}}


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def check_dcp(name: str, device: str) -> dict:
    """Save model + optimizer state with torch.distributed.checkpoint, load it into a fresh
    model and optimizer, and compare every tensor."""
    import torch
    import torch.distributed.checkpoint as dcp

    from learners.packing import pack_microbatches
    from rlsys.memory_plan import model_shape

    shape = model_shape(name)
    assert shape is not None
    prompts, responses = make_batch(CPU_TOKENS, shape.vocab)
    mbs = pack_microbatches(prompts, responses, CPU_TOKENS)[:1]
    source = Update(shape, device, "none", seed=0)
    source.step(mbs)  # AdamW state to save
    target = Update(shape, device, "none", seed=1)
    target.step(mbs)

    def state(u: Update) -> dict:
        return {"model": u.model.state_dict(), "optimizer": u.optimizer.state_dict()}

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-dcp-") as tmp:
        dcp.save(state(source), checkpoint_id=tmp, no_dist=True)
        saved = time.perf_counter()
        loaded = state(target)
        dcp.load(loaded, checkpoint_id=tmp, no_dist=True)
        target.model.load_state_dict(loaded["model"])
        target.optimizer.load_state_dict(loaded["optimizer"])
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    done = time.perf_counter()
    diff = 0.0
    a, b = state(source), state(target)
    for key, t in a["model"].items():
        diff = max(diff, float((t - b["model"][key]).abs().max()))
    for pid, s in a["optimizer"]["state"].items():
        for key, t in s.items():
            if isinstance(t, torch.Tensor):
                diff = max(diff, float((t.float() - b["optimizer"]["state"][pid][key].float())
                                       .abs().max()))
    return {"model": name, "bytes": size, "save_s": saved - start, "load_s": done - saved,
            "max_abs_diff": diff, "ok": diff == 0.0}


def check_weight_staging(name: str, device: str, reps: int = 3) -> dict:
    """The learner's end of a full weight sync on the wire device a learner there uses (CUDA
    with NCCL, host memory with gloo), over a one-rank group of that backend: casting in the
    sync (`WeightSender.send_full` of the fp32 parameters) against staging
    (learner.stage_weights: `stage` at the end of the update, then `send_full(None)`), in bf16
    buckets of the learner's default size. Medians of `reps`; any error is reported, not
    raised, so the other checks' figures are kept."""
    import torch

    from rlsys.memory_plan import model_shape
    from rlsys.weight_sync import (
        WeightSender,
        build_manifest,
        close_weight_sync_group,
        find_free_port,
        init_weight_sync_group,
    )

    shape = model_shape(name)
    assert shape is not None
    backend = "nccl" if device == "cuda" else "gloo"
    try:
        params = list(Update(shape, device, "none").model.named_parameters())
        manifest = build_manifest(params, torch.bfloat16)
        group = init_weight_sync_group(backend, "127.0.0.1", find_free_port(), 0, 1,
                                       timeout_s=120)
        try:
            sender = WeightSender(manifest, SYNC_BUCKET_BYTES, torch.device(device))
            cast, stage, staged = [], [], []
            for _ in range(reps + 1):  # the first one warms up
                t0 = time.perf_counter()
                sender.send_full(group, params)
                cast.append(time.perf_counter() - t0)
                stage.append(sender.stage(params))
                t0 = time.perf_counter()
                sender.send_full(group, None)
                staged.append(time.perf_counter() - t0)
        finally:
            close_weight_sync_group(group)
    except Exception as exc:  # a check's failure is one of its results
        return {"model": name, "backend": backend, "ok": False,
                "error": f"{type(exc).__name__}: {exc}"}
    return {"model": name, "backend": backend,
            "bytes": sum(math.prod(dims) * 2 for _, dims, _ in manifest),
            "cast_in_sync_s": statistics.median(cast[1:]),
            "stage_s": statistics.median(stage[1:]),
            "staged_sync_s": statistics.median(staged[1:]), "ok": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="same as --device cpu")
    parser.add_argument("--steps", type=int, help="timed updates per model and mode "
                        "(default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--tokens", type=int, help="tokens per micro-batch (default: "
                        f"{GPU_TOKENS} on cuda, {CPU_TOKENS} on cpu)")
    parser.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/"
                        "gpu_check.json on cuda, results/quick/gpu_check.json on cpu)")
    args = parser.parse_args(argv)
    device = "cpu" if args.quick else args.device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu for the CPU smoke check",
              file=sys.stderr)
        return 2
    started = time.time()
    cuda = device == "cuda"
    gpu = {"kind": device}
    peaks: dict[str, float | None] = {}
    if cuda:
        name = torch.cuda.get_device_name()
        _free, total = torch.cuda.mem_get_info()
        peaks = {"spec": bf16_peak_tflops(name), "measured": matmul_tflops("cuda")}
        gpu.update(name=name, memory_gib=total / 2**30, bf16_peak_tflops_spec=peaks["spec"],
                   bf16_matmul_tflops_measured=peaks["measured"])
        print(f"{name}: {total / 2**30:.0f} GiB, bf16 peak {peaks['spec']} TFLOP/s (spec), "
              f"{peaks['measured']:.0f} measured (8192^3 matmul)", flush=True)
    models = GPU_MODELS if cuda else CPU_MODELS
    budget = args.tokens or (GPU_TOKENS if cuda else CPU_TOKENS)
    steps = args.steps or (3 if cuda else 1)
    results = [check_model(m, device, budget, steps, peaks) for m in models]
    parity = check_parity(device)
    dcp = check_dcp(models[0], device)
    staging = check_weight_staging(models[0], device)
    print(f"weight staging ({staging['backend']}): {staging}", flush=True)
    print(f"parity: {parity.get('ok')} ({parity.get('backend', 'n/a')}); DCP round trip: "
          f"{dcp['ok']} ({dcp['bytes'] / 2**20:.0f} MiB, save {dcp['save_s']:.1f} s, load "
          f"{dcp['load_s']:.1f} s)", flush=True)
    plans_ok = all(m["plan_within_tolerance"] for r in results for m in r["modes"].values())
    result = {
        "command": "python -m benchmarks.gpu_check" + ("" if cuda else " --device cpu"),
        "machine": {**machine(), "platform": platform.platform()},
        "versions": versions("torch", "transformers", "flash-attn"),
        "device": gpu, "micro_batches": MICRO_BATCHES, "models": results,
        "parity": parity, "dcp": dcp, "weight_staging": staging, "plan_tolerance": TOLERANCE,
        "checks": {"plan_within_tolerance": plans_ok, "parity": parity.get("ok"),
                   "dcp_round_trip": dcp["ok"], "weight_staging": staging["ok"],
                   "checkpointing_saves_memory": all(r["checkpointing_saved_gib"] > 0
                                                     for r in results)},
        "minutes": (time.time() - started) / 60,
    }
    result["ok"] = all(v is not False for v in result["checks"].values())
    out = args.out or result_path("gpu_check", quick=not cuda)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_nan_safe) + "\n")
    print(f"wrote {out} in {result['minutes']:.1f} min; checks: {result['checks']}")
    return 0 if result["ok"] else 1


def _nan_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


if __name__ == "__main__":
    sys.exit(main())
