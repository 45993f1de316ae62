"""Learner throughput with packed micro-batches against the padded batch, on a mixed-length batch.

    python -m benchmarks.learner_packing [--quick] [--few-shot [--cut N]] [--jemalloc]
                                         [--variants V ...]
                                         [--reps N] [--profile VARIANT] [--out PATH]

One GRPO update (forward, backward, AdamW step) of SmolLM2-135M-Instruct in the learner's
settings (fp32 master weights, bf16 compute, token-mean GRPO loss, grad clip 1.0, one optimizer
step per batch) on a GRPO-shaped batch: P random prompts x G completions whose lengths are
spread wide (uniform, plus a share truncated at the maximum). Variants, each in its own
subprocess so that its peak RSS is its own:

* packed:        the real learner in-process (`learners.learner.Learner`, a world of one,
                 compute_dtype=bfloat16) with packed micro-batches (`learners/packing.py`: each
                 prompt once, no padding, the "rlsys_packed" attention);
* padded:        the same model, loss, optimizer and token budget, the plain way: every
                 prompt + response its own row, right-padded to the longest row of its
                 micro-batch (rows x width <= budget, pad tokens counted), taken in batch order,
                 transformers' SDPA attention with an attention mask, bf16 autocast. The output
                 projection runs only on the positions that predict real response tokens, as in
                 the learner, so the comparison is of the packing alone;
* padded_sorted: as padded, rows sorted by length first (the usual trick to cut padding);
* packed_loop:   packed micro-batches through padded's own loop (autocast, no Learner), which
                 separates the effect of packing from that of the learner's machinery;
* packed_unshared: the real learner with the prompts' common prefix packed once per prompt, as
                 before prefixes were shared (each prompt whole, once per micro-batch);
* packed_one_block: the real learner with one attention block per kind of row, every row as
                 wide as the longest, as before `width_blocks` (learners/packing.py).

--few-shot: the demo's shape instead (conf=smol: 8 prompts x G=8 behind a common 140-token
few-shot prefix, 20-28 tokens of their own, responses of 18-40 tokens), packed against
packed_unshared and padded; writes results/learner_packing_few_shot.json. With --cut N, N of
its responses are cut off at the demo's max_new_tokens (96), as a run-on sample at temperature
1.5 is in about half the demo's steps: packed against packed_one_block, written to
results/learner_packing_few_shot_cut.json.

Per variant: the median seconds per update over --reps timed updates after one warm-up, tokens/s
(real prompt + response tokens of all sequences per second: the same numerator for every
variant), the process's peak RSS, and the RSS high-water mark over the timed updates above the
RSS before them (activations and other per-update memory), CPU and system seconds per update.
Prints a table and writes benchmarks/results/learner_packing.json (--quick: results/quick/).
The issue's target: packed >= 1.5x padded tokens/s.

Wall times on a shared 2-core machine are noisy: the JSON keeps every update's time, the load
average around the run and the ratio of the fastest updates too. --jemalloc runs the updates
with the allocator the learner actors run by default (learner.allocator=jemalloc, the
environment of rlsys.build.learner_env: jemalloc preloaded, freed memory never given back,
unless $MALLOC_CONF says otherwise): with glibc every micro-batch's [tokens, vocabulary]
log-softmax is freshly mapped memory, and its page faults (slow in a VM) are a large share of
the update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, result_path, versions

TARGET_RATIO = 1.5
VARIANTS = ("packed", "padded", "padded_sorted", "packed_loop", "packed_unshared",
            "packed_one_block")
CUT_LEN = 96  # conf/smol.yaml's rollout.max_new_tokens
REPO = Path(__file__).resolve().parent.parent

FULL = {"prompts": 8, "group": 8, "prompt_len": [60, 120], "response_len": [16, 256],
        "truncated_frac": 0.2, "budget": 4096, "reps": 3,
        "variants": ["packed", "padded", "padded_sorted"]}
QUICK = {"prompts": 4, "group": 4, "prompt_len": [60, 120], "response_len": [16, 128],
         "truncated_frac": 0.2, "budget": 2048, "reps": 2, "variants": ["packed", "padded"]}
FEW_SHOT = {"prompts": 8, "group": 8, "shared_prefix": 140, "prompt_len": [20, 28],
            "response_len": [18, 40], "truncated_frac": 0.0, "budget": 4096, "reps": 5,
            "variants": ["packed", "packed_unshared", "padded"]}


# --- the batch ----------------------------------------------------------------------------------

def make_batch(spec: dict, vocab_size: int) -> dict:
    """A GRPO batch: prompt-major, G completions per prompt, fixed seed.

    Response lengths: with probability `truncated_frac` the maximum (a completion cut off at
    max_new_tokens), otherwise uniform in [min, max]. Every prompt begins with the same
    `shared_prefix` tokens (few-shot examples), then `prompt_len` tokens of its own.
    """
    rng = random.Random(spec["seed"])
    lo, hi = spec["response_len"]
    prefix = [rng.randrange(10, vocab_size) for _ in range(spec.get("shared_prefix", 0))]
    prompts, responses = [], []
    for _ in range(spec["prompts"]):
        prompt = prefix + [rng.randrange(10, vocab_size)
                           for _ in range(rng.randint(*spec["prompt_len"]))]
        for _ in range(spec["group"]):
            n = hi if rng.random() < spec["truncated_frac"] else rng.randint(lo, hi)
            if len(responses) < spec.get("cut", 0):
                n = CUT_LEN
            prompts.append(prompt)
            responses.append([rng.randrange(10, vocab_size) for _ in range(n)])
    advantages = [rng.gauss(0.0, 1.0) for _ in responses]
    return {"prompt_ids": prompts, "response_ids": responses, "advantages": advantages,
            "rollout_logprobs": [[0.0] * len(r) for r in responses]}


def padded_microbatches(lengths: list[int], budget: int, sort: bool) -> list[list[int]]:
    """Rows (sequence indices) per padded micro-batch: rows x longest row <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else range(len(lengths))
    mbs: list[list[int]] = []
    width = 0
    for i in order:
        if mbs and (len(mbs[-1]) + 1) * max(width, lengths[i]) <= budget:
            mbs[-1].append(i)
            width = max(width, lengths[i])
        else:
            if lengths[i] > budget:
                raise ValueError(f"a sequence of {lengths[i]} tokens exceeds the budget {budget}")
            mbs.append([i])
            width = lengths[i]
    return mbs


def batch_stats(batch: dict, budget: int) -> dict:
    from learners.packing import pack_microbatches

    prompts, responses = batch["prompt_ids"], batch["response_ids"]
    seq_lens = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    r_lens = sorted(len(r) for r in responses)
    packed = pack_microbatches(prompts, responses, budget)
    stats = {
        "sequences": len(responses),
        "real_tokens": sum(seq_lens),
        "response_tokens": sum(r_lens),
        "prompt_lens": sorted({len(p) for p in prompts}),
        "response_len_min": r_lens[0], "response_len_median": statistics.median(r_lens),
        "response_len_mean": round(statistics.mean(r_lens), 1), "response_len_max": r_lens[-1],
        "response_lens": [len(r) for r in responses],
        "packed": {"microbatches": len(packed), "tokens": sum(mb.num_tokens for mb in packed),
                   "tokens_per_microbatch": [mb.num_tokens for mb in packed]},
        # Each distinct prompt whole (once per micro-batch it is in), as packed_unshared runs.
        "unshared_tokens": (sum(len(p) for p in {tuple(p) for p in prompts})
                            + sum(r_lens)),
    }
    for name, sort in (("padded", False), ("padded_sorted", True)):
        mbs = padded_microbatches(seq_lens, budget, sort)
        tokens = sum(len(rows) * max(seq_lens[i] for i in rows) for rows in mbs)
        stats[name] = {"microbatches": len(mbs), "tokens": tokens,
                       "pad_fraction": round(1 - sum(seq_lens) / tokens, 3)}
    return stats


# --- one variant, in a child process --------------------------------------------------------------

def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs) so it measures from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PlainLoop:
    """The padded (or packed) update written out by hand: autocast bf16, no Learner, no FSDP.

    Mirrors `Learner.train_step` with updates_per_batch=1 and kl_coef=0: token log-probs and an
    entropy metric per micro-batch, grpo_loss with the whole batch's normalisers, backward,
    clip the global grad norm to 1.0, fused AdamW. Self-contained (plain torch and rlsys.algo),
    so that it does not move when the learner's internals do.
    """

    def __init__(self, path: str, batch: dict, budget: int, mode: str,
                 max_response_len: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from learners.packing import ATTENTION_NAME, register_packed_attention

        self.mode, self.batch, self.budget = mode, batch, budget
        self.max_response_len = max_response_len
        attn = "sdpa"
        if mode == "packed_loop":
            register_packed_attention()
            attn = ATTENTION_NAME
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation=attn)
        self.model.train()
        # Fused (one kernel over all parameters), as the learner's.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.99),
                                           weight_decay=0.0, fused=True)

    def _padded_logprobs(self, rows: list[int]):
        """Log-probs [N] of the rows' response tokens (row-major) from one padded forward."""
        import torch

        prompts, responses = self.batch["prompt_ids"], self.batch["response_ids"]
        seqs = [prompts[i] + responses[i] for i in rows]
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        b_idx, t_idx, targets = [], [], []
        for r, (i, s) in enumerate(zip(rows, seqs, strict=True)):
            input_ids[r, :len(s)] = torch.tensor(s)
            attention_mask[r, :len(s)] = 1
            p, n = len(prompts[i]), len(responses[i])
            b_idx += [r] * n
            t_idx += range(p - 1, p + n - 1)
            targets += responses[i]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
            logits = self.model.lm_head(hidden[torch.tensor(b_idx), torch.tensor(t_idx)])
        return logits.float(), torch.tensor(targets), [len(responses[i]) for i in rows]

    def _packed_logprobs(self, mb):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None],
                             packed_layout=mb.layout, logits_to_keep=mb.predict_index,
                             use_cache=False)
        return out.logits[0].float(), mb.targets, mb.response_lens

    def train_step(self) -> dict[str, float]:
        import torch

        from learners.packing import pack_microbatches
        from rlsys.algo import grpo_loss

        prompts, responses = self.batch["prompt_ids"], self.batch["response_ids"]
        advantages = torch.tensor(self.batch["advantages"])
        agg = {"num_tokens": float(sum(len(r) for r in responses)),
               "num_seqs": float(len(responses)), "norm_len": self.max_response_len}
        if self.mode == "packed_loop":
            work = [(mb.index, mb) for mb in pack_microbatches(prompts, responses, self.budget)]
        else:
            lens = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
            work = [(rows, None) for rows in padded_microbatches(
                lens, self.budget, sort=self.mode == "padded_sorted")]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows, mb in work:
            logits, targets, lens = (self._packed_logprobs(mb) if mb is not None
                                     else self._padded_logprobs(rows))
            logp = torch.log_softmax(logits, dim=-1)
            lp_flat = logp.gather(-1, targets[:, None]).squeeze(-1)
            with torch.no_grad():  # the learner's entropy metric
                logp = logp.detach()
                (logp.exp() * logp).sum(-1)
            logprobs = torch.nn.utils.rnn.pad_sequence(list(lp_flat.split(lens)),
                                                       batch_first=True)
            mask = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
            loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages[rows], mask,
                                kl_coef=0.0, loss_agg="token-mean", **agg)
            loss.backward()
            total += float(loss.detach())
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": norm}


def run_variant(variant: str, spec: dict, profile: bool = False) -> dict:
    import torch

    from rlsys.models import default_cache_dir, resolve_model

    torch.set_num_threads(spec["threads"])
    path = str(resolve_model(spec["model"], default_cache_dir()))
    from transformers import AutoConfig

    batch = make_batch(spec, AutoConfig.from_pretrained(path).vocab_size)
    max_response_len = max(spec["response_len"][1], CUT_LEN if spec.get("cut") else 0)
    t0 = time.perf_counter()
    if variant == "packed_unshared":
        import learners.packing

        learners.packing.shared_prefix_len = lambda prompts: 0
    if variant == "packed_one_block":
        import learners.packing

        learners.packing.width_blocks = lambda rows: [rows] if rows else []
    if variant in ("packed", "packed_unshared", "packed_one_block"):
        from learners.learner import Learner
        from rlsys.config import AlgorithmConfig, LearnerConfig

        learner = Learner(path, LearnerConfig(compute_dtype="bfloat16",
                                              max_tokens_per_microbatch=spec["budget"],
                                              num_threads=spec["threads"], lr=1e-5),
                          AlgorithmConfig(kl_coef=0.0), max_response_len=max_response_len)

        def step() -> dict[str, float]:
            m = learner.train_step(batch)
            return {"loss": m["loss"], "grad_norm": m["grad_norm"]}
    else:
        loop = PlainLoop(path, batch, spec["budget"], variant, max_response_len)
        step = loop.train_step
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first = step()  # warm-up; also allocates AdamW's state
    warmup_s = time.perf_counter() - t0
    rss_before = _rss_mb("VmRSS")
    hwm_reset = _reset_peak_rss()
    times, cpu_times, sys_times, metrics = [], [], [], []
    for _ in range(spec["reps"]):
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        metrics.append(step())
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_times.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        sys_times.append(r1.ru_stime - r0.ru_stime)
    update_peak = _rss_mb("VmHWM") if hwm_reset else float("nan")
    result = {
        "variant": variant,
        "setup_s": round(setup_s, 2), "warmup_s": round(warmup_s, 2),
        "seconds_per_update": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        # CPU seconds (user + system) of all the process's threads: less sensitive to other
        # load than wall time; the system part is mostly page faults of fresh large tensors.
        "cpu_s_per_update": [round(t, 3) for t in cpu_times],
        "sys_s_per_update": [round(t, 3) for t in sys_times],
        "tokens_per_s": round(sum(len(p) + len(r) for p, r in zip(
            batch["prompt_ids"], batch["response_ids"], strict=True)) / statistics.median(times),
            1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_updates_mb": round(rss_before, 1),
        "update_peak_extra_mb": round(update_peak - rss_before, 1),
        "first_loss": round(first["loss"], 6), "first_grad_norm": round(first["grad_norm"], 4),
        "losses": [round(m["loss"], 6) for m in metrics],
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
              file=sys.stderr)
    return result


def _child(variant: str, spec: dict, profile: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(spec["threads"])}
    if spec["allocator"] == "jemalloc":
        # As the learner actors run it: glibc unmaps every large tensor and the next one
        # page-faults afresh, jemalloc keeps the pages.
        env |= {"LD_PRELOAD": spec["ld_preload"], "MALLOC_CONF": spec["malloc_conf"]}
    cmd = [sys.executable, "-m", "benchmarks.learner_packing", "--child", variant,
           "--spec", json.dumps(spec)] + (["--profile", variant] if profile else [])
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if profile:
        print(res.stderr[res.stderr.find("---"):] if "---" in res.stderr else res.stderr)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant} failed (rc {res.returncode}):\n"
                           f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _git_state() -> dict:
    """The commit measured and the tracked files that differ from it."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return res.stdout.strip()

    modified = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified": modified.splitlines()}


# --- the driver -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, fewer reps (< 3 min)")
    parser.add_argument("--few-shot", action="store_true",
                        help="the demo's shape: prompts behind a shared few-shot prefix")
    parser.add_argument("--cut", type=int, default=0, metavar="N",
                        help=f"with --few-shot: N responses cut off at {CUT_LEN} tokens")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reps", type=int, help="timed updates per variant (after 1 warm-up)")
    parser.add_argument("--budget", type=int, help="tokens per micro-batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="variants to run")
    parser.add_argument("--jemalloc", action="store_true",
                        help="run the variants with the learner's jemalloc settings")
    parser.add_argument("--profile", choices=VARIANTS,
                        help="print a torch.profiler table of one more update of this variant")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: "
                        "benchmarks/results/[quick/]learner_packing.json)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_variant(args.child, json.loads(args.spec), profile=bool(args.profile))
        print("RESULT " + json.dumps(result), flush=True)
        return result

    shape = FEW_SHOT if args.few_shot else QUICK if args.quick else FULL
    if args.cut and not args.few_shot:
        parser.error("--cut goes with --few-shot")
    spec = {**shape, "model": args.model, "threads": args.threads, "seed": args.seed}
    if args.cut:
        spec |= {"cut": args.cut, "variants": ["packed", "packed_one_block"]}
    for key in ("reps", "budget", "variants"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if spec["reps"] < 1:
        parser.error("--reps must be >= 1")
    spec["allocator"] = "glibc"
    if args.jemalloc:
        from rlsys.build import learner_env  # imports Ray: only when asked for
        from rlsys.config import ConfigError

        try:
            learner = learner_env(args.threads, "jemalloc")["env_vars"]
        except ConfigError as exc:
            parser.error(f"--jemalloc: {exc}")
        spec |= {"allocator": "jemalloc", "ld_preload": learner["LD_PRELOAD"],
                 "malloc_conf": learner["MALLOC_CONF"]}

    from transformers import AutoConfig

    from rlsys.models import default_cache_dir, resolve_model

    path = str(resolve_model(spec["model"], default_cache_dir()))
    batch = make_batch(spec, AutoConfig.from_pretrained(path).vocab_size)
    stats = batch_stats(batch, spec["budget"])
    print(f"learner packing: {spec['model']}, {spec['prompts']} prompts x G={spec['group']}, "
          f"{stats['real_tokens']} real tokens, budget {spec['budget']}, "
          f"{spec['threads']} threads, {machine()['cpu_model']}, allocator {spec['allocator']}")
    print(f"tokens through the model: packed {stats['packed']['tokens']}, padded "
          f"{stats['padded']['tokens']} ({stats['padded']['pad_fraction']:.0%} pad), "
          f"padded_sorted {stats['padded_sorted']['tokens']} "
          f"({stats['padded_sorted']['pad_fraction']:.0%} pad)", flush=True)

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    figures = {}
    for variant in spec["variants"]:
        figures[variant] = _child(variant, spec, profile=False)
        f = figures[variant]
        print(f"  {variant:<14} {f['median_s']:>7.2f} s/update  {f['tokens_per_s']:>8.1f} tok/s  "
              f"peak {f['peak_rss_mb']:>7.0f} MB", flush=True)
    if args.profile:
        _child(args.profile, {**spec, "reps": 1}, profile=True)

    base = figures.get("padded")
    ratios = {v: round(f["tokens_per_s"] / base["tokens_per_s"], 3)
              for v, f in figures.items()} if base else {}
    # The same from the fastest update of each: less exposed to other load on the machine.
    ratios_min = {v: round(base["min_s"] / f["min_s"], 3)
                  for v, f in figures.items()} if base else {}
    result = {
        "benchmark": "learner_packing",
        "machine": {**machine(), "platform": platform.platform()},
        "versions": versions("torch", "transformers"),
        "git": _git_state(),
        "spec": spec,
        "settings": {"param_dtype": "float32", "compute_dtype": "bfloat16",
                     "loss_agg": "token-mean", "optimizer": "AdamW(lr=1e-5, betas=0.9,0.99)",
                     "baseline_optimizer": "AdamW(fused=True)",
                     "grad_clip": 1.0, "optimizer_steps_per_update": 1},
        "batch": stats,
        "figures": figures,
        "ratio_vs_padded": ratios,
        "ratio_vs_padded_fastest_update": ratios_min,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratios) and ratios.get("packed", 0.0) >= TARGET_RATIO,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }

    print(f"\n{'variant':<14} {'tokens':>7} {'s/update':>9} {'min s':>7} {'tok/s':>8} "
          f"{'vs padded':>9} {'peak MB':>8} {'update +MB':>10}")
    for variant, f in figures.items():
        tokens = (stats["unshared_tokens"] if variant == "packed_unshared" else
                  stats[variant]["tokens"] if variant in stats else stats["packed"]["tokens"])
        print(f"{variant:<14} {tokens:>7} {f['median_s']:>9.2f} {f['min_s']:>7.2f} "
              f"{f['tokens_per_s']:>8.1f} "
              f"{ratios.get(variant, float('nan')):>8.2f}x {f['peak_rss_mb']:>8.0f} "
              f"{f['update_peak_extra_mb']:>10.0f}")
    if ratios:
        print(f"target packed/padded >= {TARGET_RATIO}: "
              f"{'met' if result['meets_target'] else 'NOT met'}")

    if "packed_unshared" in figures and "packed" in figures:
        speedup = figures["packed_unshared"]["median_s"] / figures["packed"]["median_s"]
        result["shared_prefix_speedup"] = round(speedup, 3)
        print(f"sharing the prompts' common prefix: {stats['unshared_tokens']} -> "
              f"{stats['packed']['tokens']} tokens, {speedup:.2f}x faster updates")
    if "packed_one_block" in figures and "packed" in figures:
        speedup = figures["packed_one_block"]["median_s"] / figures["packed"]["median_s"]
        result["width_blocks_speedup"] = round(speedup, 3)
        print(f"attention blocks by width: {speedup:.2f}x faster updates")
    name = ("learner_packing_few_shot_cut" if args.cut else
            "learner_packing_few_shot" if args.few_shot else "learner_packing")
    out = args.out or result_path(name, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
