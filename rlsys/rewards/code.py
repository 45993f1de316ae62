"""Code-execution reward: run the response's Python against the gold tests in the sandbox.

Gold answers are JSON strings in one of two shapes:

* HumanEval style ``{"prompt": ..., "test": ..., "entry_point": ...}``: ``test`` defines
  ``check(candidate)``, which is called on the entry point;
* plain asserts ``{"tests": ["assert f(1) == 2", ...]}``, run after the code.

The program runs in :func:`rlsys.sandbox.run_python` (bubblewrap, rlimits, wall deadline);
nothing here executes model output in this process.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rlsys.sandbox import run_python

#: Wall-clock limit for one check. HumanEval checks take well under a second; the slack is
#: for a loaded machine, since a timeout scores 0 just like a wrong answer.
DEFAULT_CODE_TIMEOUT_S = 10.0

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A fenced block: ``` + optional info string on the same line, then everything up to the next
# ```. Non-greedy, so consecutive blocks pair up in order; an unclosed (truncated) fence is no
# block at all.
_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
# Info strings accepted as Python; an empty one is accepted too, because models often omit it.
_PYTHON_LANGS = {"", "python", "python3", "py"}
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _last_python_block(text: str) -> str | None:
    for match in reversed(list(_FENCE_RE.finditer(text))):
        lang = match.group(1).strip().lower()
        if lang in _PYTHON_LANGS:
            return match.group(2)
    return None


def extract_code(response: str) -> str | None:
    """The Python code a response commits to, or None when it has none.

    Order: the last ```python (or bare ```) block inside the last ``<answer>…</answer>``; else
    the last such block anywhere in the response; else the raw answer text (the ``<answer>``
    content, or without tags the text after ``</think>``) if it looks like code (contains
    ``def `` or ``return``).
    """
    answers = _ANSWER_RE.findall(response)
    answer = answers[-1] if answers else None
    for text in (answer or "", response):
        if (block := _last_python_block(text)) is not None:
            return block
    # Without <answer> tags the whole response is the answer, minus any reasoning, which is
    # prose and would only turn a correct bare function into a syntax error.
    raw = answer if answer is not None else response.rsplit("</think>", 1)[-1]
    if "def " in raw or "return" in raw:  # looks like code
        # Strip only blank lines at the ends: leading indentation is meaningful for a bare
        # function body that completes the prompt.
        return raw.strip("\n")
    return None


@dataclass(frozen=True)
class _Gold:
    prompt: str  # prepended to the code ("" for plain asserts)
    test: str
    entry_point: str | None  # None for plain asserts: no check() call


def _parse_gold(gold: str) -> _Gold:
    """Validate the gold JSON; malformed gold is a data bug, so it raises rather than scoring."""
    try:
        data = json.loads(gold)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"code_accuracy: gold answer is not valid JSON ({exc}): {gold!r:.200}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"code_accuracy: gold must be a JSON object, got {type(data).__name__}: {gold!r:.200}"
        )
    if "tests" in data:
        tests = data["tests"]
        if (
            not isinstance(tests, list)
            or not tests
            or not all(isinstance(t, str) and t.strip() for t in tests)
        ):
            raise ValueError(
                "code_accuracy: gold field 'tests' must be a non-empty list of non-empty "
                f"strings, got {tests!r:.200}"
            )
        return _Gold(prompt="", test="\n".join(tests), entry_point=None)
    missing = [k for k in ("prompt", "test", "entry_point") if not isinstance(data.get(k), str)]
    if missing:
        raise ValueError(
            f"code_accuracy: gold must have 'tests' (a list of asserts) or string fields "
            f"'prompt', 'test' and 'entry_point'; missing or not a string: {missing} "
            f"(keys: {sorted(data)})"
        )
    entry_point = data["entry_point"]
    if not _IDENTIFIER_RE.fullmatch(entry_point):
        raise ValueError(
            f"code_accuracy: gold 'entry_point' must be a Python identifier, got {entry_point!r}"
        )
    return _Gold(prompt=data["prompt"], test=data["test"], entry_point=entry_point)


def _defines(code: str, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\("
    return re.search(pattern, code, re.MULTILINE) is not None


def build_program(code: str, gold: str) -> str:
    """The program that ``code_accuracy_reward`` runs for ``code`` against ``gold``."""
    return _build(code, _parse_gold(gold))


def _build(code: str, parsed: _Gold) -> str:
    if parsed.entry_point is None:
        return f"{code}\n\n{parsed.test}\n"
    # A full function: the prompt still goes first, separated by blank lines. Every HumanEval
    # prompt is valid Python on its own (the stub's docstring is its body), and it carries the
    # imports (typing.List, math) and helper functions (poly, encode_cyclic) that a model's full
    # function usually relies on without repeating; the model's def comes later, so it replaces
    # the stub. Otherwise the code is a bare body completing the prompt (the original HumanEval
    # completion format), so it follows the prompt directly.
    full_function = _defines(code, parsed.entry_point)
    head = f"{parsed.prompt}\n\n" if full_function else parsed.prompt
    return f"{head}{code}\n\n{parsed.test}\n\ncheck({parsed.entry_point})\n"


def code_accuracy_reward(
    response: str, gold: str, *, timeout_s: float = DEFAULT_CODE_TIMEOUT_S
) -> float:
    """1.0 if the response's code passes the gold tests in the sandbox, else 0.0.

    No extractable code scores 0.0; malformed gold raises ValueError. A sandbox that cannot
    start raises RuntimeError (or ``SandboxUnavailable``) instead of scoring 0.0, because
    silently zeroing every reward would look like a model failure rather than a setup one.
    """
    parsed = _parse_gold(gold)  # validated first, so bad gold fails even without code
    code = extract_code(response)
    if code is None:
        return 0.0
    result = run_python(_build(code, parsed), timeout_s=timeout_s)
    if result.status == "sandbox_error":
        raise RuntimeError(f"code_accuracy: the sandbox failed to start: {result.stderr[:500]}")
    return 1.0 if result.status == "ok" else 0.0
