"""From per-problem records to the summary figures and the printed table (pure functions).

A record is one line of problems.jsonl (rlsys.eval.evaluator.build_records): the greedy
completion's correctness, the k samples' normalised answers and correctness, and the majority
vote, or None for it where the vote is not defined (code problems).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rlsys.eval.metrics import mean_pass_at_k, pass_at_1, pass_k_values


def figures(records: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """greedy accuracy, pass@1, pass@j for j in pass_k_values(k), cons@k over `records`.

    cons@k is averaged over the problems where the vote is defined ("cons_problems" says how
    many); it is None when there is none, and greedy accuracy is None when greedy decoding was
    off. With k = 0 (no samples) only the greedy accuracy is given.
    """
    if not records:
        raise ValueError("figures: no problems")
    correct = [[s["correct"] for s in r["samples"]] for r in records]
    counts = [(len(c), sum(c)) for c in correct]
    out: dict[str, Any] = {"problems": len(records)}
    greedy = [r["greedy"]["correct"] for r in records if r.get("greedy") is not None]
    out["greedy_accuracy"] = sum(greedy) / len(greedy) if greedy else None
    if k == 0:  # greedy decoding only (eval.k=0): no sampled figures
        return out | {"pass@1": None, "cons_problems": 0}
    out["pass@1"] = pass_at_1(correct)
    for j in pass_k_values(k)[1:]:
        out[f"pass@{j}"] = mean_pass_at_k(counts, j)
    votes = [r["cons"]["correct"] for r in records if r.get("cons") is not None]
    out[f"cons@{k}"] = sum(votes) / len(votes) if votes else None
    out["cons_problems"] = len(votes)
    samples = [s for r in records for s in r["samples"]]
    out["no_answer_frac"] = sum(s["answer"] is None for s in samples) / len(samples)
    out["truncated_frac"] = sum(s.get("truncated", False) for s in samples) / len(samples)
    return out


def by_task(records: Sequence[dict[str, Any]], k: int) -> dict[str, dict[str, Any]]:
    """`figures` of each task's records, for a mixed-task evaluation."""
    tasks = sorted({r["task"] for r in records})
    return {t: figures([r for r in records if r["task"] == t], k) for t in tasks}


def format_table(summary: dict[str, Any]) -> str:
    """The summary as plain aligned text: one row per figure, one column per task if a mix."""
    k = summary["k"]
    columns: dict[str, dict[str, Any]] = {"all": summary}
    columns |= summary.get("by_task") or {}
    rows = ["greedy_accuracy",
            *([*(f"pass@{j}" for j in pass_k_values(k)), f"cons@{k}"] if k else [])]
    labels = {"greedy_accuracy": "greedy"}
    header = ["", *(f"{name} ({col['problems']})" for name, col in columns.items())]
    table = [header]
    for row in rows:
        cells = [labels.get(row, row)]
        for col in columns.values():
            value = col.get(row)
            cells.append("-" if value is None or not math.isfinite(value) else f"{value:.3f}")
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in table]
    skipped = summary.get("skipped_overlong", 0)
    head = [f"{summary['model']} on {summary['task']}: {summary['problems']} held-out problems"
            + (f" ({skipped} skipped: prompt too long)" if skipped else ""),
            f"k={k} samples per problem at temperature {summary['temperature']:g}, "
            f"top-p {summary['top_p']:g}; at most {summary['max_new_tokens']} new tokens", ""]
    notes = ["", f"no final answer in {100 * summary['no_answer_frac']:.1f}% of the samples, "
             f"{100 * summary['truncated_frac']:.1f}% cut at the token limit"] if k else [""]
    if k and summary["cons_problems"] < summary["problems"]:
        notes.append(f"cons@{k} over the {summary['cons_problems']} problems with voteable "
                     "answers: code answers are programs and are not voted on")
    if summary["correctness"] != "accuracy":
        notes.append("correct = total reward > 0 (no accuracy part in reward.weights)")
    return "\n".join(head + lines + notes)
