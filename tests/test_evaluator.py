"""One generate-and-score path (rlsys.sampling), step metrics as a pure function, and one
evaluator: a training run's in-run figures equal `python -m rlsys.eval`'s for the same model,
seed and problems (real engines, reward workers and learner on the tiny model)."""

from __future__ import annotations

import dataclasses

import pytest

from rlsys.config import load_config
from rlsys.data import Problem
from rlsys.metrics import PhaseTimer, read_metrics, solved_fractions, step_metrics
from rlsys.sampling import sample_and_score, score_samples
from rlsys.scheduler import Batch, Group


class EchoRollout:
    """Stands in for RolloutPool.generate: sample j of prompt i is the text "i.j" with
    i + j + 1 tokens; the last token limit decides the finish reason."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts: list[str], n: int, **sampling) -> list[dict]:
        self.calls.append({"prompts": prompts, "n": n, **sampling})
        return [{"text": f"{i}.{j}", "token_ids": [0] * (i + j + 1),
                 "finish_reason": "length" if i + j + 1 >= sampling["max_tokens"] else "stop"}
                for i in range(len(prompts)) for j in range(n)]


class RecordingRewards:
    """Stands in for RewardPool.score: total 1 for every response, parts recorded."""

    def __init__(self) -> None:
        self.seen: dict[str, list] = {}

    def score(self, responses, golds, tasks, prompts=None) -> list[dict]:
        self.seen = {"responses": responses, "golds": golds, "tasks": tasks, "prompts": prompts}
        return [{"total": 1.0, "accuracy": 1.0} for _ in responses]


def test_sample_and_score_pairs_each_completion_with_its_problem_and_shapes_length() -> None:
    cfg = load_config(["conf=tiny", "rollout.max_new_tokens=4", "reward.overlong_buffer=2",
                       "reward.truncated=zero", "data.response_prefix=<think>"])
    problems = [Problem(id="a", question="qa", answer="1", task="t1"),
                Problem(id="b", question="qb", answer="2", task="t2")]
    rollout, rewards = EchoRollout(), RecordingRewards()
    timings: dict[str, float] = {}
    samples, scores = sample_and_score(cfg, rollout, rewards, problems, ["pa", "pb"], 3,
                                       temperature=0.7, top_p=0.9, seed=11, timings=timings)
    assert rollout.calls == [{"prompts": ["pa", "pb"], "n": 3, "temperature": 0.7,
                              "top_p": 0.9, "max_tokens": 4, "seed": 11}]
    assert rewards.seen["responses"][:2] == ["<think>0.0", "<think>0.1"]
    assert rewards.seen["golds"] == ["1"] * 3 + ["2"] * 3
    assert rewards.seen["tasks"] == ["t1"] * 3 + ["t2"] * 3
    assert rewards.seen["prompts"] == ["qa"] * 3 + ["qb"] * 3
    # Lengths 1, 2, 3 | 2, 3, 4 tokens of at most 4, buffer 2: penalty -(len - 2) / 2 past 2.
    assert [s["overlong"] for s in scores] == [0.0, 0.0, -0.5, 0.0, -0.5, -1.0]
    # The one cut at the limit scores 0 (reward.truncated=zero); the others pay the penalty.
    assert [s["total"] for s in scores] == [1.0, 1.0, 0.5, 1.0, 0.5, 0.0]
    assert len(samples) == 6 and set(timings) == {"gen_s", "reward_s"}
    # Scoring alone (generation started elsewhere, as in training) gives the same rewards.
    assert score_samples(cfg, RecordingRewards(), problems, samples, 3) == scores


def test_solved_fractions_count_groups_by_the_one_rule_for_correct() -> None:
    p = Problem(id="x", question="q", answer="1")

    def group(*scores: dict) -> Group:
        return Group(p, [{}] * len(scores), list(scores))

    right, wrong = {"total": 1.1, "accuracy": 1.0}, {"total": 0.1, "accuracy": 0.0}
    partial = {"total": 0.5, "code_accuracy": 0.5}  # half the tests pass: not correct
    groups = [group(right, right), group(wrong, wrong), group(right, wrong),
              group(partial, partial), group({"total": 1.0}, {"total": 1.0})]  # no accuracy part
    assert solved_fractions(groups) == {"groups/all_correct_frac": 0.4,
                                        "groups/none_correct_frac": 0.4}
    assert solved_fractions([]) == {}


def test_step_metrics_describe_every_group_drawn_and_the_trained_ones() -> None:
    import torch

    def sample(tokens: int, version: int, reason: str = "stop") -> dict:
        return {"token_ids": [0] * tokens, "text": "wait, " * tokens,
                "finish_reason": reason, "weight_version": version}

    p = Problem(id="x", question="q", answer="1")
    signal = Group(p, [sample(2, 3), sample(4, 2, "length")],
                   [{"total": 1.0, "accuracy": 1.0}, {"total": 0.0, "accuracy": 0.0}])
    flat = Group(p, [sample(6, 3), sample(8, 3)],
                 [{"total": 0.0, "accuracy": 0.0}, {"total": 0.0, "accuracy": 0.0}])
    batch = Batch(groups=[signal], drawn=[signal, flat], rounds=2, skipped=1, gen_s=2.0,
                  gen_wait_s=2.5, reward_s=0.5)
    timer = PhaseTimer()
    with timer.phase("update"):
        pass
    stats = step_metrics(batch, {"loss": 0.5, "time/ref_and_old_logprobs": 0.1,
                                 "tokens_per_s": 9.0}, {"bytes": 10.0, "seconds": 0.2},
                         timer, trained_version=3, reflection_words=["wait"],
                         advantages=torch.tensor([1.0, -1.0]))
    assert stats["reward/total"] == 0.25 and stats["reward/accuracy"] == 0.25
    assert stats["groups/no_signal_frac"] == 0.5 and stats["groups/trained"] == 1
    # The flat group is flat because no completion is right: none correct, none all correct.
    assert (stats["groups/none_correct_frac"], stats["groups/all_correct_frac"]) == (0.5, 0.0)
    assert (stats["rollout/rounds"], stats["data/skipped_overlong"]) == (2, 1)
    assert (stats["rollout/prompts"], stats["rollout/samples"]) == (2, 4)
    assert stats["response/length_mean"] == 5.0 and stats["response/length_max"] == 8
    assert stats["response/reflections"] == 5.0 and stats["response/truncated_frac"] == 0.25
    assert stats["throughput/gen_tokens_per_s"] == 10.0
    # Staleness of the trained samples only: versions 3 and 2 trained by version 3.
    assert (stats["rollout/staleness_mean"], stats["rollout/staleness_max"]) == (0.5, 1)
    assert stats["train/loss"] == 0.5 and "train/time/ref_and_old_logprobs" not in stats
    assert stats["advantage/abs_mean"] == 1.0 and stats["sync/bytes"] == 10.0
    assert stats["time/step"] >= stats["time/update"] >= 0.0


@pytest.mark.timeout(600)
def test_in_run_evaluation_equals_the_eval_cli(ray_cluster, tmp_path) -> None:
    """The last in-run evaluation of a run and `rlsys.eval` of its saved model, with the same
    seed and problems, give the same figures. Without an accuracy part in the weights,
    "correct" is total > 0, so the tiny model's partial format credit makes the figures
    non-trivial."""
    from rlsys.eval.evaluator import evaluate
    from rlsys.trainer import train

    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", "trainer.steps=1",
                       "reward.weights={format: 1.0, tag_count: 1.0}", "eval.k=4",
                       "algorithm.kl_coef=0.0"])
    train(cfg)
    in_run = read_metrics(out / "metrics.jsonl")[-1]
    ecfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=str(out / "final")),
        eval=dataclasses.replace(cfg.eval, size=cfg.trainer.eval_size,
                                 output_dir=str(tmp_path / "eval")))
    summary = evaluate(ecfg)
    assert summary["problems"] == cfg.trainer.eval_size
    assert 0.0 < summary["pass@1"] < 1.0 or 0.0 < summary["greedy_accuracy"] < 1.0, summary
    for figure in ("greedy_accuracy", "pass@1", "pass@2", "pass@4", "cons@4"):
        assert in_run[f"eval/{figure}"] == pytest.approx(summary[figure], abs=1e-12), figure
