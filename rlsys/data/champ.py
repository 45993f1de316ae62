"""CHAMP (Concept and Hint-Annotated Math Problems; Mao, Kim & Zhou 2024) as a task.

The data is the `champ-dataset` PyPI package's bundled ``dataset_files/v0.json`` (270
competition problems: number theory, inequalities, polynomials, sequences, combinatorics); only
the file is read, the package itself is never imported.

Only problems whose final answer a rule can check are kept: a number, or one closed-form
expression such as ``2^(n-1)``, ``n(n+1)/2`` or ``1/sqrt(3)`` (math-verify compares these with
the model's LaTeX or plain answer, through the ordinary ``accuracy`` reward part). Where the
dataset gives an answer and "or equivalently" another form, the second (the closed form or the
number) is the gold. Answers in prose ("No", "No integer solutions", "The limit exists and is
equal to 2/3") and equations or lists of cases ("x=2, y=1") are left out: the CHAMP paper grades
those with a language-model judge, which rlsys does not use. That leaves 122 of the 270.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from rlsys.data.tasks import DataError, Problem, ProblemListTask, register_task

_EQUIVALENT_RE = re.compile(r"^(.*?),? or (?:equivalently|an equivalent form such as) (.+)$")
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
# A closed form: digits, single-letter variables, sqrt, arithmetic, factorial, brackets and the
# comma of an interval. Longer names (floor, sum_, C(n, k)) mean notation math-verify misreads.
_EXPRESSION_RE = re.compile(r"(?:sqrt|[a-z0-9+\-*/^().!\[\], ])+")


def champ_data_path() -> Path:
    """Location of ``v0.json`` inside the installed `champ-dataset` package."""
    spec = importlib.util.find_spec("champ_dataset")  # locate, do not import (needs natsort)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("champ task: the `champ-dataset` package is not installed; install it "
                        "with `pip install champ-dataset==1.0.0`")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / "v0.json"
    if not path.is_file():
        raise DataError(f"champ task: {path} not found; reinstall `champ-dataset`")
    return path


def checkable_answer(raw_answer: str) -> str | None:
    """The gold answer a rule can check, from CHAMP's raw answer (math marked by @@...@@), or
    None when the answer is prose, an equation or a list of cases."""
    text = raw_answer.strip()
    match = _EQUIVALENT_RE.match(text)
    if match:
        text = match.group(2).strip()
    if text.startswith("@@") and text.endswith("@@") and text.count("@@") == 2:
        text = text[2:-2].strip()
    if "@@" in text or not text:
        return None
    if _NUMBER_RE.fullmatch(text):
        return text
    if _EXPRESSION_RE.fullmatch(text) and "..." not in text and re.search(r"[a-z0-9]", text):
        # Every letter outside "sqrt" must be a lone variable: "n(n-3)/2" yes, "no" no.
        words = re.findall(r"[a-z]+", text.replace("sqrt", " "))
        if all(len(w) == 1 for w in words):
            return text
    return None


def load_champ(path: str | Path | None = None) -> list[Problem]:
    """The CHAMP problems with a checkable answer, in the dataset's order."""
    path = Path(path) if path is not None else champ_data_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["problems"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"champ task: cannot read the problems of {path}: {err}") from None
    problems = []
    for key, row in rows.items():
        question, raw_answer = row.get("_text"), row.get("_raw_answer")
        if not isinstance(question, str) or not isinstance(raw_answer, str):
            raise DataError(f"champ task: {path}: problem {key} has no _text or _raw_answer")
        gold = checkable_answer(raw_answer)
        if gold is not None:
            problems.append(Problem(
                id=str(row.get("identifier", key)), question=question, answer=gold,
                meta={"category": row.get("category"), "raw_answer": raw_answer},
                task=ChampTask.name))
    if not problems:
        raise DataError(f"champ task: {path}: no problem with a checkable answer")
    return problems


@register_task
class ChampTask(ProblemListTask):
    """CHAMP problems with math answers, for evaluation (and, with what is left, training).

    Held-out split: `eval_size` problems chosen by a shuffle seeded with `split_seed` (so runs
    with different seeds share it), in the dataset's order; an `eval_size` of at least the
    number of problems holds out all of them, which is how the benchmark is usually run, and
    then there is nothing to train on.
    """

    name = "champ"

    def __init__(self, seed: int = 0, eval_size: int = 100, split_seed: int = 0,
                 path: str | None = None) -> None:
        for key, value in (("eval_size", eval_size), ("seed", seed), ("split_seed", split_seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"data.{key}: must be an int, got {value!r}")
        if eval_size < 0:
            raise DataError(f"data.eval_size: must be >= 0, got {eval_size}")
        problems = load_champ(path)
        self._hold_out(problems, eval_size, split_seed)
        self._start_sampler(seed)

    def sample(self, n: int) -> list[Problem]:
        if n and not self._train:
            raise DataError(f"champ task: data.eval_size={len(self._eval)} holds out every "
                            "problem, so none is left to train on; lower data.eval_size")
        return super().sample(n)

    def _state_mismatch(self, state: dict[str, Any]) -> str:
        return (f"champ task: state dict (num_train={state['num_train']}, position="
                f"{state['position']}) does not match this split's {len(self._train)} training "
                "problems; eval_size or the data changed")
