"""The CHAMP task: which answers are kept, the held-out split, and grading through the
ordinary accuracy reward (math-verify)."""

from __future__ import annotations

import json

import pytest

from rlsys.data import ChampTask, DataError, load_champ, make_task
from rlsys.data.champ import checkable_answer
from rlsys.rewards import compute_reward


@pytest.mark.parametrize(("raw", "gold"), [
    ("239", "239"),
    ("-9", "-9"),
    ("@@4^n@@", "4^n"),
    ("@@n(n-3)/2@@", "n(n-3)/2"),
    ("@@C(10, 5)@@, or equivalently @@252@@", "252"),
    ("@@(20*10^15-2)/17@@, or equivalently 1176470588235294", "1176470588235294"),
    ("@@sum_(i=1)^n i^3@@, or equivalently @@(n(n+1)/2)^2@@", "(n(n+1)/2)^2"),
    ("@@C(n, 4)@@, or an equivalent form such as @@n(n-1)(n-2)(n-3)/4!@@",
     "n(n-1)(n-2)(n-3)/4!"),
    ("@@1/sqrt(3)@@", "1/sqrt(3)"),
    ("@@[-1, 1]@@", "[-1, 1]"),
    # Prose, equations, cases and notation math-verify misreads are left out.
    ("No", None),
    ("No integer solutions", None),
    ("@@x=2, y=1@@", None),
    ("@@x=0, y=2@@ and @@x=9, y=11@@", None),
    ("The limit exists and is equal to @@2/3@@", None),
    ("@@2^floor(n/2)*floor(n/2)!@@", None),
    ("@@x(x-1)(x-2)...(x-2022)@@", None),
    ("376 and 625", None),
])
def test_checkable_answer(raw: str, gold: str | None) -> None:
    assert checkable_answer(raw) == gold


def test_the_packaged_problems() -> None:
    problems = load_champ()
    assert len(problems) == 122
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.task == "champ" and p.question and p.answer for p in problems)
    assert {p.meta["category"] for p in problems} == {
        "Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence"}


def test_split_is_seeded_disjoint_and_can_hold_out_everything() -> None:
    task = make_task("champ", seed=1, eval_size=20)
    again = ChampTask(seed=2, eval_size=20)
    held_out = [p.id for p in task.eval_problems()]
    assert held_out == [p.id for p in again.eval_problems()]  # the split ignores the seed
    assert len(held_out) == 20 and task.num_train == 102
    assert not set(held_out) & {p.id for p in task.sample(300)}

    everything = ChampTask(eval_size=1000)
    assert len(everything.eval_problems()) == 122 and everything.num_train == 0
    with pytest.raises(DataError, match=r"data\.eval_size"):
        everything.sample(1)


def test_gold_answers_are_graded_by_the_accuracy_part() -> None:
    by_gold = {p.answer: p for p in load_champ()}
    weights = {"accuracy": 1.0}
    for gold, good, bad in [("(n(n+1)/2)^2", r"\frac{n^2(n+1)^2}{4}", r"\frac{n(n+1)}{2}"),
                            ("1/sqrt(3)", r"\frac{\sqrt{3}}{3}", r"\sqrt{3}"),
                            ("2^(n-1)", "2^{n-1}", "2^n"),
                            ("252", "252", "250")]:
        assert gold in by_gold
        assert compute_reward(f"<answer>{good}</answer>", gold, weights)["accuracy"] == 1.0
        assert compute_reward(f"<answer>{bad}</answer>", gold, weights)["accuracy"] == 0.0


def test_unreadable_file_is_a_data_error(tmp_path) -> None:
    bad = tmp_path / "v0.json"
    bad.write_text(json.dumps({"problems": {"P_1": {"_text": "q", "_raw_answer": "No"}}}))
    with pytest.raises(DataError, match="no problem with a checkable answer"):
        load_champ(bad)
    bad.write_text("not json")
    with pytest.raises(DataError, match="cannot read"):
        load_champ(bad)
