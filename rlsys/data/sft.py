"""Supervised fine-tuning data: examples, the cold-start generator and the readability filters.

An example is a question and the response to learn, as text: a stage renders the question with
the run's prompt template and tokenizes both with its own model's tokenizer, so data written
with one model (a teacher, an RL checkpoint) trains another. Pure leaf: no Ray, no model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsys.data.arithmetic import worked_steps
from rlsys.data.tasks import DataError, Problem, read_jsonl
from rlsys.rewards.language import extract_reasoning, language_consistency
from rlsys.rewards.registry import is_correct
from rlsys.rewards.rule_based import format_reward


@dataclass(frozen=True)
class SFTExample:
    """A question, the whole response to learn (from "<think>" on, even where the prompt
    template already opens the think block), and where it came from (provenance)."""

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_examples(path: str | Path, key: str = "sft.data") -> list[SFTExample]:
    """Examples from a .jsonl file of {"prompt": ..., "response": ...} rows (other fields are
    kept as provenance); a bad row is reported with its file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={path}: no such file")
    out = []
    for lineno, row in read_jsonl(path, key):
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) and row[k] for k in ("prompt", "response")):
            raise DataError(f"{key}: {path}:{lineno}: a row needs non-empty string fields "
                            "'prompt' and 'response'")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "response")}
        out.append(SFTExample(row["prompt"], row["response"], meta))
    if not out:
        raise DataError(f"{key}={path}: no examples")
    return out


def write_examples(path: str | Path, examples: Iterable[SFTExample]) -> int:
    """Write examples as .jsonl (provenance fields beside prompt and response); returns the
    count. Written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w") as fh:
        for ex in examples:
            fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response, **ex.meta}) + "\n")
            count += 1
    tmp.replace(path)
    return count


# --- cold start: worked arithmetic, written by code ------------------------------------------

_TOKEN_RE = re.compile(r"\(?-?\d+\)?|[+\-*]")


def arithmetic_steps(expression: str) -> tuple[list[str], int]:
    """The worked steps of an arithmetic expression ("3 + 4 * (-2)") and its result, as
    rlsys.data.arithmetic.worked_steps gives them."""
    tokens = [t.strip("()") for t in _TOKEN_RE.findall(expression)]
    values, ops = [int(tokens[0])], tokens[1::2]
    values += [int(t) for t in tokens[2::2]]
    if len(values) != len(ops) + 1:
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return worked_steps(values, ops)


def arithmetic_cot(problem: Problem) -> str:
    """A readable R1-format solution of an arithmetic-task problem: the steps in the think
    block, then a one-line summary and the answer (R1's cold-start data pattern)."""
    expression = problem.meta["expression"]
    steps, result = arithmetic_steps(expression)
    if str(result) != problem.answer:
        raise ValueError(f"worked {expression} to {result}, but the answer is {problem.answer}")
    reasoning = " ".join(steps) if steps else f"The number is {result}."
    return (f"<think>\nI need to compute {expression}. {reasoning} So the result is "
            f"{result}.\n</think>\n<answer>{result}</answer>")


# --- rejection sampling: what is worth learning from -----------------------------------------

def repeated_paragraphs(text: str) -> bool:
    """A paragraph (or, in one-paragraph text, a sentence of 20+ characters) occurs twice: the
    loops of a degenerate sample."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) > 1:
        return len(set(paragraphs)) < len(paragraphs)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) >= 20]
    return len(set(sentences)) < len(sentences)


def rejection_reason(response: str, scores: dict[str, float], *, target: str,
                     min_language: float, num_tokens: int, min_tokens: int,
                     truncated: bool) -> str | None:
    """Why a sampled completion is not kept for SFT, or None to keep it.

    Kept: correct (rlsys.rewards.is_correct), in R1's format, finished (not cut at the token
    limit), at least `min_tokens` long, reasoning at least `min_language` in the target
    language (R1 drops mixed-language chains of thought), and no repeated paragraphs.
    """
    if not is_correct(scores):
        return "wrong"
    if truncated:
        return "truncated"
    if format_reward(response) < 1.0:
        return "format"
    if num_tokens < min_tokens:
        return "short"
    reasoning = extract_reasoning(response)
    if language_consistency(reasoning, target) < min_language:
        return "language"
    if repeated_paragraphs(reasoning):
        return "repetition"
    return None


def dedupe(examples: Iterable[SFTExample]) -> list[SFTExample]:
    """Drop examples whose prompt and response (whitespace-normalised) were already seen."""
    seen: set[tuple[str, str]] = set()
    out = []
    for ex in examples:
        key = (" ".join(ex.prompt.split()), " ".join(ex.response.split()))
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def example_from(problem: Problem, response: str, **provenance: Any) -> SFTExample:
    """An example for a task problem, keeping its id, task and gold answer as provenance."""
    return SFTExample(problem.question, response,
                      {"problem_id": problem.id, "task": problem.task, "answer": problem.answer,
                       **provenance})
