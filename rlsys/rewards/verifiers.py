"""The accuracy reward: every gold answer says which verifier checks it.

R1's accuracy reward is one idea with several checkers: a math answer is compared as math, a
program is run against its tests, a code I/O prediction is compared as a value or run. So that
a run mixing tasks needs only one `accuracy` part (and evaluation one accuracy figure), a gold
answer that is not plain math is a JSON object naming its checker:

    {"verifier": "code", ...}    HumanEval or assert tests   (rlsys.rewards.code)
    {"verifier": "codeio", ...}  reasoning-gym code I/O      (rlsys.rewards.codeio)

Anything else is a math answer, checked by math-verify (rlsys.rewards.rule_based).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from rlsys.rewards.code import code_accuracy_reward
from rlsys.rewards.codeio import codeio_reward
from rlsys.rewards.rule_based import accuracy_reward as math_accuracy_reward

VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "math": math_accuracy_reward,
    "code": code_accuracy_reward,
    "codeio": codeio_reward,
}


def gold_verifier(gold: str) -> str:
    """The name of the verifier for `gold`: its "verifier" field, else "math"."""
    if not gold.startswith("{"):
        return "math"
    try:
        data = json.loads(gold)
    except ValueError:  # e.g. a set "{1, 2}": math
        return "math"
    if not isinstance(data, dict) or "verifier" not in data:
        return "math"
    name = data["verifier"]
    if name not in VERIFIERS:
        raise ValueError(f"gold answer names unknown verifier {name!r}; known: "
                         f"{', '.join(VERIFIERS)}")
    return name


def verified_accuracy(response: str, gold: str) -> float:
    """1.0 if the response is right by its gold's verifier (see the module docstring); 0.0
    without a gold answer (a general prompt of the prompts task, scored by other parts)."""
    if not gold.strip():
        return 0.0
    return VERIFIERS[gold_verifier(gold)](response, gold)
