"""Code I/O reward: reasoning-gym's `codeio` tasks, checked by value or by running the code.

A codeio problem shows a reference function `main_solution(**inputs)` and asks either for its
output on given inputs ("output" mode) or for inputs that produce a given output ("input" mode).
The answer is a JSON value. Gold answers are JSON objects tagged with the verifier:

    {"verifier": "codeio", "mode": "output" | "input", "code": ..., "input": {...},
     "output": ...}

* output mode: the answer must equal the gold output as a value (1 == 1.0, lists and tuples
  alike, floats to a relative 1e-6), not as text: the model may write `{"a": 1}` or `{'a': 1}`;
* input mode: many inputs can give the same output, so comparing against the one input the
  generator happened to draw would mark right answers wrong. The reference code is run on the
  proposed input in the sandbox and its output compared with the gold output, as above.

reasoning-gym's own `score_answer` gives partial credit by tree edit distance to the one drawn
answer; a binary, executed check is the verifier R1-style RL wants.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from rlsys.rewards.rule_based import extract_answer
from rlsys.sandbox import run_python

#: Wall-clock limit for running the reference code on a proposed input. The model chooses the
#: input, so it can choose a slow one; a timeout scores 0 like any wrong answer.
DEFAULT_CODEIO_TIMEOUT_S = 5.0
#: Relative tolerance for floats: reference outputs are floats printed at full precision, and
#: a model copying them through JSON must not lose the reward to the last digit.
REL_TOL = 1e-6

# The sandbox prints the result after this line, so whatever the reference code itself prints
# cannot be mistaken for its return value.
_RESULT_MARK = "\n@@rlsys-codeio-result@@\n"
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def codeio_gold(mode: str, code: str, inputs: dict[str, Any], output: Any) -> str:
    """The gold answer string of one codeio problem (see the module docstring)."""
    if mode not in ("input", "output"):
        raise ValueError(f"codeio mode must be 'input' or 'output', got {mode!r}")
    return json.dumps({"verifier": "codeio", "mode": mode, "code": code, "input": inputs,
                       "output": output}, default=repr)


def parse_value(text: str) -> tuple[bool, Any]:
    """(True, value) for the JSON value a model's answer text holds, else (False, None).

    Accepts JSON, a Python literal (the prompts show inputs as Python dicts, so models copy that
    style), either one inside a fenced block, or the outermost {...} / [...] span of the text.
    """
    candidates = [text.strip()]
    candidates += [m.strip() for m in reversed(_FENCE_RE.findall(text))]
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return True, json.loads(candidate)
        except ValueError:
            pass
        try:
            return True, ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return False, None


def values_equal(a: Any, b: Any, rel_tol: float = REL_TOL) -> bool:
    """Equality of two JSON-like values: numbers within `rel_tol`, lists equal to tuples, dict
    keys compared as text (JSON turns int keys into strings), bools distinct from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol * 1e-3)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(
            values_equal(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        a_keys, b_keys = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return a_keys.keys() == b_keys.keys() and all(
            values_equal(a_keys[k], b_keys[k], rel_tol) for k in a_keys)
    return type(a) is type(b) and a == b


def _parse_gold(gold: str) -> dict[str, Any]:
    try:
        data = json.loads(gold)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"codeio: gold answer is not valid JSON ({exc}): {gold!r:.200}") from None
    if not isinstance(data, dict) or data.get("mode") not in ("input", "output"):
        raise ValueError(f"codeio: gold must be an object with mode 'input' or 'output': "
                         f"{gold!r:.200}")
    missing = [k for k in ("code", "input", "output") if k not in data]
    if missing:
        raise ValueError(f"codeio: gold lacks {missing}: {gold!r:.200}")
    return data


def run_reference(code: str, inputs: dict[str, Any], *,
                  timeout_s: float = DEFAULT_CODEIO_TIMEOUT_S) -> tuple[bool, Any]:
    """(True, output) of `main_solution(**inputs)` run in the sandbox; (False, None) when it
    raises, times out or returns something JSON cannot carry."""
    program = (f"{code}\n\nimport json as _json, sys as _sys\n"
               f"_result = main_solution(**_json.loads({json.dumps(inputs)!r}))\n"
               f"_sys.stdout.write({_RESULT_MARK!r} + _json.dumps(_result))\n")
    result = run_python(program, timeout_s=timeout_s)
    if result.status == "sandbox_error":
        raise RuntimeError(f"codeio: the sandbox failed to start: {result.stderr[:500]}")
    if result.status != "ok" or result.stdout_truncated or _RESULT_MARK not in result.stdout:
        return False, None
    return True, json.loads(result.stdout.rsplit(_RESULT_MARK, 1)[1])


def codeio_reward(response: str, gold: str, *,
                  timeout_s: float = DEFAULT_CODEIO_TIMEOUT_S) -> float:
    """1.0 if the response's final <answer> is right for a codeio gold, else 0.0.

    Output mode compares values; input mode runs the reference code on the proposed input in
    the sandbox (unless it is the gold input itself) and compares what it returns. Malformed
    gold raises ValueError; a sandbox that cannot start raises RuntimeError.
    """
    data = _parse_gold(gold)
    answer = extract_answer(response)
    if not answer:
        return 0.0
    ok, value = parse_value(answer)
    if not ok:
        return 0.0
    # The gold passed through JSON, so the answer must too before comparing (tuples -> lists).
    try:
        value = json.loads(json.dumps(value))
    except (TypeError, ValueError):  # sets, bytes, ...: no JSON value can equal them
        return 0.0
    if data["mode"] == "output":
        return 1.0 if values_equal(value, data["output"]) else 0.0
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return 0.0
    if values_equal(value, data["input"]):
        return 1.0
    ran, output = run_reference(data["code"], value, timeout_s=timeout_s)
    return 1.0 if ran and values_equal(output, data["output"]) else 0.0
