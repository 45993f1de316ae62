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

import json
import re
from pathlib import Path

from rlsys.data.tasks import BenchmarkTask, DataError, Problem, package_data_path, register_task

_EQUIVALENT_RE = re.compile(r"^(.*?),? or (?:equivalently|an equivalent form such as) (.+)$")
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
# A closed form: digits, single-letter variables, sqrt, arithmetic, factorial, brackets and the
# comma of an interval. Longer names (floor, sum_, C(n, k)) mean notation math-verify misreads.
_EXPRESSION_RE = re.compile(r"(?:sqrt|[a-z0-9+\-*/^().!\[\], ])+")


def champ_data_path() -> Path:
    """Location of ``v0.json`` inside the installed `champ-dataset` package (located, not
    imported: importing it needs natsort)."""
    return package_data_path("champ", "champ_dataset", "dataset_files/v0.json",
                             "champ-dataset==1.0.0", "reinstall `champ-dataset`")


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
class ChampTask(BenchmarkTask):
    """CHAMP problems with math answers, for evaluation (and, with what is left, training).

    The held-out split and sampling are BenchmarkTask's.
    """

    name = "champ"

    def load(self, path: str | None) -> list[Problem]:
        return load_champ(path)
