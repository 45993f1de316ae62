"""Tasks (samplers, held-out splits, checkpointable state) and prompt templates."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from rlsys.data import (
    CHAT_SYSTEM_PROMPT,
    FEW_SHOT_TURNS,
    R1_ZERO_TEMPLATE,
    ArithmeticTask,
    DataError,
    FileTask,
    MixtureTask,
    Problem,
    make_task,
    render_prompt,
)
from rlsys.rewards import compute_reward

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# -- ArithmeticTask


def ids(problems: list[Problem]) -> list[str]:
    return [p.id for p in problems]


def test_arithmetic_problem_shape() -> None:
    task = ArithmeticTask(seed=0)
    for p in task.sample(20):
        a, b = p.meta["expression"].split(" + ")
        assert p.question == f"What is {a} + {b}?"
        assert 1 <= int(a) <= 50 and 1 <= int(b) <= 50
        assert p.answer == str(int(a) + int(b))
    assert len(task.eval_problems()) == 100


def test_arithmetic_precedence_and_negatives() -> None:
    task = ArithmeticTask(seed=3, ops=("+", "-", "*"), min_value=-9, max_value=9, num_terms=4,
                          eval_size=10)
    for p in task.sample(200):
        expr = p.meta["expression"]
        assert "- -" not in expr and "+ -" not in expr  # negatives are parenthesised
        assert int(p.answer) == eval(expr)  # Python's precedence is the reference here


def test_arithmetic_deterministic_per_seed() -> None:
    a, b, c = ArithmeticTask(seed=1), ArithmeticTask(seed=1), ArithmeticTask(seed=2)
    first = ids(a.sample(50))
    assert first == ids(b.sample(50))
    assert first != ids(c.sample(50))
    # The held-out split is a property of the problem space, not of the sampling seed.
    assert ids(a.eval_problems()) == ids(c.eval_problems())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # small space: exact enumeration
        {"ops": ("+", "-", "*"), "min_value": 0, "max_value": 999, "num_terms": 3,
         "eval_size": 50},  # large space: hash threshold
    ],
)
def test_arithmetic_held_out_disjoint(kwargs: dict) -> None:
    task = ArithmeticTask(seed=0, **kwargs)
    held_out = set(ids(task.eval_problems()))
    assert len(held_out) == task.eval_size  # distinct
    seen = set(ids(task.sample(5000)))
    assert not seen & held_out


def test_arithmetic_small_space_rejects_exactly_eval() -> None:
    # 1..10 "+" has 100 expressions; 25 held out leaves exactly 75 to train on.
    task = ArithmeticTask(seed=0, min_value=1, max_value=10, eval_size=25)
    seen = set(ids(task.sample(3000)))
    assert len(seen) == 75


def test_arithmetic_state_round_trip() -> None:
    task = ArithmeticTask(seed=5, ops="+-")
    task.sample(37)
    state = json.loads(json.dumps(task.state_dict()))  # must survive JSON
    expected = ids(task.sample(20))
    resumed = ArithmeticTask(seed=5, ops="+-")
    resumed.load_state_dict(state)
    assert ids(resumed.sample(20)) == expected


def test_sample_distinct_draws_each_question_once_and_stops_at_the_tasks_size() -> None:
    """Rejection sampling's prompts: with-replacement draws repeat questions; these do not,
    and a request beyond the task's distinct training problems returns all of them."""
    task = ArithmeticTask(seed=3, max_value=20, eval_size=50)  # 400 problems, 350 to train on
    assert len({p.question for p in task.sample(300)}) < 300
    task = ArithmeticTask(seed=3, max_value=20, eval_size=50)
    drawn = task.sample_distinct(300)
    assert len({p.question for p in drawn}) == len(drawn) == 300
    assert len(ArithmeticTask(seed=3, max_value=20, eval_size=50).sample_distinct(1000)) == 350


def test_arithmetic_phrasings_ask_the_same_held_out_sums_in_other_words() -> None:
    """Held-out problem i is asked in phrasing i mod n; the expressions held out, their ids and
    answers do not depend on the wording, so a model is tested on its own held-out sums."""
    phrasings = ("Compute {expr}.", "What is {words}?", "What is the sum of {a} and {b}?")
    plain, worded = ArithmeticTask(seed=0), ArithmeticTask(seed=0, phrasings=phrasings)
    assert ids(worded.eval_problems()) == ids(plain.eval_problems())
    for i, (p, q) in enumerate(zip(plain.eval_problems(), worded.eval_problems(), strict=True)):
        a, b = p.meta["expression"].split(" + ")
        assert q.answer == p.answer and q.meta["phrasing"] == phrasings[i % 3]
        assert q.question == [f"Compute {a} + {b}.", f"What is {a} plus {b}?",
                              f"What is the sum of {a} and {b}?"][i % 3]
    # Training draws take a phrasing at random, and never a held-out sum.
    drawn = worded.sample(300)
    assert {p.question.split()[0] for p in drawn} == {"Compute", "What"}
    assert {p.question.startswith("What is the sum") for p in drawn} == {True, False}
    assert not set(ids(drawn)) & set(ids(worded.eval_problems()))
    # One phrasing consumes no draws: the stream is the one recorded runs sampled.
    assert [p.question for p in ArithmeticTask(seed=0, phrasings=["What is {expr}?"]).sample(50)
            ] == [p.question for p in ArithmeticTask(seed=0).sample(50)]


def test_arithmetic_words_name_operators_and_negatives() -> None:
    task = ArithmeticTask(seed=1, ops=("+", "-", "*"), min_value=-5, max_value=5, num_terms=3,
                          eval_size=10, phrasings=["{words}"])
    words = {"+": "plus", "-": "minus", "*": "times"}
    for p in task.sample(100):
        tokens = p.meta["expression"].replace("(", "").replace(")", "").split()
        expected = [words.get(t, f"negative {t[1:]}" if t.startswith("-") else t)
                    for t in tokens]
        assert p.question == " ".join(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"phrasings": []}, r"^data.arithmetic.phrasings: is empty"),
        ({"phrasings": ["Compute {x}."]},
         r"^data.arithmetic.phrasings\[0\]: 'Compute \{x\}.' has unknown placeholder"),
        ({"phrasings": ["What is {expr}?", "Sum {a} {b}", 3]},
         r"^data.arithmetic.phrasings\[2\]: must be a str"),
        ({"phrasings": ["What is {expr"]}, r"^data.arithmetic.phrasings\[0\]: .* not a valid"),
        ({"num_terms": 3, "phrasings": ["Add {a} and {b}."]}, r"need data.arithmetic.num_terms=2"),
        ({"ops": ("/",)}, r"^data.arithmetic.ops: unsupported op"),
        ({"ops": ()}, r"^data.arithmetic.ops: is empty"),
        ({"min_value": 5, "max_value": 1}, "greater than data.arithmetic.max_value=1"),
        ({"num_terms": 1}, r"^data.arithmetic.num_terms: must be >= 2"),
        ({"eval_size": -1}, r"^data.eval_size: must be >= 0"),
        ({"max_value": 3, "eval_size": 100}, r"^data.eval_size: only 9 distinct problems"),
        ({"seed": "0"}, r"^seed: must be an int"),
    ],
)
def test_arithmetic_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        ArithmeticTask(**kwargs)


def test_bad_state_dict() -> None:
    task = ArithmeticTask()
    with pytest.raises(DataError, match="belongs to task 'file'"):
        task.load_state_dict({"task": "file", "epoch": 0, "position": 0})
    with pytest.raises(DataError, match="next_index"):
        task.load_state_dict({"task": "arithmetic", "next_index": -1})


# -- FileTask


def write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "answer": str(i), "source": "t"} for i in range(n)]


def test_file_jsonl_split_and_sampling(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows(30))
    task = FileTask(path, eval_size=5, seed=0)
    eval_q = {p.question for p in task.eval_problems()}
    assert len(eval_q) == 5 and task.num_train == 25
    first_epoch = task.sample(25)
    assert {p.question for p in first_epoch}.isdisjoint(eval_q)
    assert len({p.question for p in first_epoch}) == 25  # an epoch visits each row once
    second_epoch = task.sample(25)
    assert ids(second_epoch) != ids(first_epoch)  # reshuffled
    p = first_epoch[0]
    assert p.meta == {"source": "t"} and p.id.startswith("train.jsonl:")
    # Split is independent of the sampling seed; order is not.
    other = FileTask(path, eval_size=5, seed=1)
    assert {q.question for q in other.eval_problems()} == eval_q
    assert ids(other.sample(25)) != ids(first_epoch)


def test_file_state_round_trip_across_epochs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    task = FileTask(path, eval_size=2, seed=3)
    task.sample(17)  # into the second epoch
    state = json.loads(json.dumps(task.state_dict()))
    expected = ids(task.sample(30))
    resumed = FileTask(path, eval_size=2, seed=3)
    resumed.load_state_dict(state)
    assert ids(resumed.sample(30)) == expected


def test_file_state_detects_changed_data(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows(12))
    state = FileTask(path, eval_size=2).state_dict()
    write_jsonl(path, rows(13))
    with pytest.raises(DataError, match="data file changed"):
        FileTask(path, eval_size=2).load_state_dict(state)


def test_file_eval_path_and_overlap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*rows(10), {"prompt": "shared", "answer": 1}])
    test = write_jsonl(tmp_path / "test.jsonl",
                       [{"prompt": "shared ", "answer": 1}, {"prompt": "e", "answer": 2.5}])
    with caplog.at_level(logging.WARNING):
        task = FileTask(train, eval_path=test)
    assert task.num_overlap_dropped == 1 and task.num_train == 10
    assert [p.answer for p in task.eval_problems()] == ["1", "2.5"]
    assert "dropped 1 training rows" in caplog.text


def test_file_custom_keys_and_ids(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"id": f"gsm-{i}", "question": f"q{i}", "final": i} for i in range(4)])
    task = FileTask(path, prompt_key="question", answer_key="final", eval_size=1)
    assert all(p.id.startswith("gsm-") for p in task.sample(3))


def test_file_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows(5)))
    assert FileTask(path, eval_size=1).num_train == 4


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "q", "answer": ', "invalid JSON"),
        ('{"prompt": "q"}', "missing field 'answer'"),
        ('{"prompt": "q", "answer": ""}', "empty field 'answer'"),
        ('{"prompt": "", "answer": "1"}', "empty field 'prompt'"),
        ('{"prompt": "q", "answer": null}', "missing field 'answer'"),
        ('{"prompt": "q", "answer": [1]}', "must be a string, a number or a list of test strings"),
        ('{"prompt": "q", "answer": true}', "must be a string, a number or a list of test strings"),
        ('{"prompt": 5, "answer": "1"}', "'prompt' must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_file_malformed_row_names_file_and_line(tmp_path: Path, bad_line: str,
                                                message: str) -> None:
    good = [json.dumps(r) for r in rows(3)]
    path = write_jsonl(tmp_path / "train.jsonl", [*good[:2], "", bad_line, good[2]])
    with pytest.raises(DataError) as info:
        FileTask(path, eval_size=1)
    text = str(info.value)
    assert text.startswith(f"data.path: {path}:4: ")  # 1-based, blank line counted
    assert message in text


def test_file_skip_malformed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "train.jsonl",
                       [*[json.dumps(r) for r in rows(5)], "{oops", '{"prompt": "x"}'])
    with caplog.at_level(logging.WARNING):
        task = FileTask(path, eval_size=1, skip_malformed=True)
    assert task.num_skipped == 2 and task.num_train == 4
    assert "skipped 2 malformed rows" in caplog.text and "6: invalid JSON" in caplog.text


def test_file_missing_key_hint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"missing field 'prompt' \(row has: 'question'.*"
                                        r"set data.prompt_key"):
        FileTask(path, eval_size=0)


def test_file_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data.path: file not found: .*nope.jsonl"):
        FileTask(tmp_path / "nope.jsonl")
    good = write_jsonl(tmp_path / "ok.jsonl", rows(3))
    with pytest.raises(DataError, match=r"^data.eval_path: file not found"):
        FileTask(good, eval_path=tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\nq,1\n")
    with pytest.raises(DataError, match=r"unsupported file type.*\.jsonl"):
        FileTask(tmp_path / "d.csv")
    with pytest.raises(DataError, match="only 3 valid rows"):
        FileTask(good, eval_size=3)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no valid rows"):
        FileTask(empty)


def test_file_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    table = pa.table({"prompt": [f"q{i}" for i in range(8)], "answer": list(range(8)),
                      "level": ["easy"] * 8})
    pq.write_table(table, path)
    task = FileTask(path, eval_size=2, seed=0)
    assert task.num_train == 6
    p = task.sample(1)[0]
    assert p.answer == p.question[1:] and p.meta == {"level": "easy"}

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", None], "answer": ["1", "2", "3"]}), bad)
    with pytest.raises(DataError, match=r"bad.parquet:row 3: missing field 'prompt'"):
        FileTask(bad, eval_size=0)
    no_col = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["1"]}), no_col)
    with pytest.raises(DataError, match=r"no column 'prompt'.*set data.prompt_key"):
        FileTask(no_col, eval_size=0)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="cannot read parquet file"):
        FileTask(junk)


# -- registry


def test_make_task(tmp_path: Path) -> None:
    assert isinstance(make_task("arithmetic", seed=2), ArithmeticTask)
    path = write_jsonl(tmp_path / "d.jsonl", rows(4))
    assert isinstance(make_task("file", path=str(path), eval_size=1), FileTask)
    with pytest.raises(ValueError, match=r"unknown task 'gsm8k'; available tasks: arithmetic"):
        make_task("gsm8k")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['max_val'\].*max_value"):
        make_task("arithmetic", max_val=3)
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['path'\]"):
        make_task("file")


# -- templates


def test_r1_zero_template() -> None:
    text = render_prompt("What is {2 + 3}?", "r1_zero", response_prefix=" <think>")
    assert text.startswith("A conversation between User and Assistant.")
    assert text.endswith("User: What is {2 + 3}?. Assistant: <think>")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in text
    assert R1_ZERO_TEMPLATE.count("{question}") == 1
    with pytest.raises(ValueError, match="system_prompt is only used by template 'chat'"):
        render_prompt("q", "r1_zero", system_prompt="x")
    with pytest.raises(ValueError, match=r"unknown template 'r1'.*r1_zero.*chat"):
        render_prompt("q", "r1")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast as Fast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "What": 3, "is": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Fast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)


def test_chat_template_with_real_tokenizer() -> None:
    tok = make_tokenizer(CHATML)
    text = render_prompt("What is 2 + 3?", "chat", tokenizer=tok, response_prefix="<think>\n")
    assert text == (
        f"<|im_start|>system\n{CHAT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    few = render_prompt("q", "chat", tokenizer=tok, few_shot=True)
    question, answer = FEW_SHOT_TURNS[0]
    # Examples are earlier turns, before the real question.
    assert few.index(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
                     f"{answer}<|im_end|>") < few.index("<|im_start|>user\nq<|im_end|>")
    with pytest.raises(ValueError, match="few_shot"):
        render_prompt("q", "r1_zero", few_shot=True)
    no_system = render_prompt("q", "chat", tokenizer=tok, system_prompt="")
    assert no_system == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_missing() -> None:
    with pytest.raises(ValueError, match=r"template 'chat' needs.*data.template=r1_zero"):
        render_prompt("q", "chat", tokenizer=make_tokenizer(None))
    with pytest.raises(ValueError, match=r"data.template=r1_zero"):
        render_prompt("q", "chat")


def test_system_prompt_and_examples() -> None:
    assert "<think>" in CHAT_SYSTEM_PROMPT and "<answer>" in CHAT_SYSTEM_PROMPT
    # Each worked example must earn full reward, or it would teach the wrong format.
    for question, response in FEW_SHOT_TURNS:
        a, b = (int(x) for x in question.removeprefix("What is ").rstrip("?").split(" + "))
        assert compute_reward(response, str(a + b), {"accuracy": 1, "format": 1})["total"] == 2.0


def test_response_prefix_is_scored_with_completion() -> None:
    prefix = "<think>\n"
    completion = "2 + 3 = 5</think><answer>5</answer>"
    assert compute_reward(prefix + completion, "5", {"format": 1.0})["total"] == 1.0
    assert compute_reward(completion, "5", {"format": 1.0})["total"] == 0.0


def test_reasoning_gym_task_samples_deterministically_and_holds_out() -> None:
    task = make_task("reasoning_gym", dataset="chain_sum", seed=3, eval_size=20)
    held_out = {p.question for p in task.eval_problems()}
    assert len(task.eval_problems()) == 20
    first = task.sample(50)
    assert not held_out & {p.question for p in first}
    assert all(p.answer.lstrip("-").isdigit() for p in first)
    state = task.state_dict()
    after = task.sample(5)
    again = make_task("reasoning_gym", dataset="chain_sum", seed=3, eval_size=20)
    assert [p.question for p in again.sample(50)] == [p.question for p in first]
    again.load_state_dict(state)
    assert [p.question for p in again.sample(5)] == [p.question for p in after]
    # The held-out split does not depend on the run's seed.
    other = make_task("reasoning_gym", dataset="chain_sum", seed=4, eval_size=20)
    assert {p.question for p in other.eval_problems()} == held_out


def test_reasoning_gym_task_errors_name_the_key() -> None:
    with pytest.raises(DataError, match=r"data.reasoning_gym.dataset='nope'"):
        make_task("reasoning_gym", dataset="nope")
    with pytest.raises(DataError, match=r"data.reasoning_gym.options"):
        make_task("reasoning_gym", dataset="chain_sum", options={"foo": 1})


# -- MixtureTask


def _mixture(seed: int = 0) -> MixtureTask:
    tasks = {"arithmetic": make_task("arithmetic", seed=seed, eval_size=3),
             "humaneval": make_task("humaneval", seed=seed, eval_size=2)}
    return make_task("mix", tasks=tasks, shares={"arithmetic": 3, "humaneval": 1}, seed=seed)


def test_mixture_draws_by_share_and_tags_each_problem() -> None:
    problems = _mixture().sample(400)
    names = [p.task for p in problems]
    assert set(names) == {"arithmetic", "humaneval"}
    assert 0.68 < names.count("arithmetic") / len(names) < 0.82  # share 3 of 4
    assert all(p.id.startswith("arith:") == (p.task == "arithmetic") for p in problems)
    assert ids(_mixture().sample(50)) == ids(problems[:50])  # deterministic per seed
    assert ids(_mixture(seed=1).sample(50)) != ids(problems[:50])


def test_mixture_state_round_trip() -> None:
    a = _mixture()
    a.sample(7)
    state = json.loads(json.dumps(a.state_dict()))
    expected = ids(a.sample(20))
    b = _mixture()
    b.load_state_dict(state)
    assert ids(b.sample(20)) == expected
    with pytest.raises(DataError, match="mixes"):
        make_task("mix", tasks={"arithmetic": make_task("arithmetic")},
                  shares={"arithmetic": 1}).load_state_dict(state)


def test_mixture_eval_interleaves_tasks() -> None:
    """A prefix of the eval split (trainer.eval_size) covers every task."""
    tasks = [p.task for p in _mixture().eval_problems()]
    assert tasks == ["arithmetic", "humaneval"] * 2 + ["arithmetic"]


def test_mixture_rejects_bad_shares() -> None:
    with pytest.raises(DataError, match="positive"):
        make_task("mix", tasks={"arithmetic": make_task("arithmetic")}, shares={"arithmetic": 0})
    with pytest.raises(DataError, match="same, non-empty set"):
        make_task("mix", tasks={"arithmetic": make_task("arithmetic")}, shares={"file": 1})


def test_prompts_too_long_for_the_engine_are_dropped() -> None:
    """An engine refuses a prompt that leaves no room for max_new_tokens; the trainer drops
    such problems (and counts them) instead of failing the batch, and names the settings when
    none fits."""
    from rlsys.build import fitting_prompts
    from rlsys.config import load_config

    tok = make_tokenizer(CHATML)
    cfg = load_config(["data.few_shot=false", "data.system_prompt=", "rollout.max_new_tokens=8",
                       "rollout.max_model_len=24", "learner.max_tokens_per_microbatch=24"])
    short, long = Problem("a", "What is", "1"), Problem("b", " ".join(["is"] * 40), "2")
    problems, prompts, dropped = fitting_prompts(cfg, tok, [long, short, long])
    assert [p.id for p in problems] == ["a"] and dropped == 2
    assert prompts == [render_prompt("What is", "chat", tokenizer=tok, system_prompt="")]
    with pytest.raises(DataError, match=r"all 2 prompts .* longer than rollout.max_model_len - "
                                        r"rollout.max_new_tokens = 16 tokens"):
        fitting_prompts(cfg, tok, [long, long])
