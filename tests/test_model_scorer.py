"""The reward model (`preference` part): ModelScorer, its config, the prompts task, and the
reward pool serving it.

The models are tiny random Llamas (2 layers, hidden 32) built here with the tokenizer of the
built-in tiny-random model: their scores mean nothing, but every formula and every code path
(chat template, padding, truncation, the Yes/No tokens, batching in the actors) is real.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlsys.config import ConfigError, load_config
from rlsys.rewards import compute_reward
from rlsys.rewards.model_scorer import (
    DEFAULT_JUDGE_TEMPLATE,
    ModelScorer,
    ModelScorerError,
    render_judge_prompt,
)

PROMPTS = ["What is 2 + 3?", "Say hi to Bob.", "Name a prime number bigger than ten."]
RESPONSES = ["5", "hello there Bob, how are you today my friend",
             "<think>11 is prime</think> <answer>11</answer>"]


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """{"classifier": folder, "judge": folder}: tiny random reward models."""
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

    from rlsys.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random", cache_dir))
    root = tmp_path_factory.mktemp("reward-models")
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for kind, model in [
            ("classifier", LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))),
            ("judge", LlamaForCausalLM(_llama_config(tokenizer))),
        ]:
            model.save_pretrained(root / kind)
            tokenizer.save_pretrained(root / kind)
            out[kind] = root / kind
    return out


# --- ModelScorer ------------------------------------------------------------------------------

def test_classifier_scores_are_finite_deterministic_and_batch_invariant(models):
    scorer = ModelScorer(str(models["classifier"]), "classifier", batch_size=3)
    batched = scorer.score(PROMPTS, RESPONSES)
    assert len(batched) == 3 and all(0 < s < 1 and math.isfinite(s) for s in batched)
    assert scorer.score(PROMPTS, RESPONSES) == batched  # deterministic
    single = [scorer.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert single == pytest.approx(batched, abs=1e-5)
    # A fresh load scores the same; the score depends on the response.
    again = ModelScorer(str(models["classifier"]), "classifier", batch_size=2)
    assert again.score(PROMPTS, RESPONSES) == pytest.approx(batched, abs=1e-5)
    other = scorer.score(PROMPTS[:1], ["seven"])[0]
    assert abs(other - batched[0]) > 1e-6
    # The chat template renders the pair as a user and an assistant turn.
    text = scorer.render(PROMPTS[0], RESPONSES[0])
    assert text.index("user\nWhat is 2 + 3?") < text.index("assistant\n5")


def test_classifier_normalization_is_the_sigmoid_of_the_raw_logit(models):
    raw = ModelScorer(str(models["classifier"]), normalize="none").score(PROMPTS, RESPONSES)
    sig = ModelScorer(str(models["classifier"]), normalize="sigmoid").score(PROMPTS, RESPONSES)
    assert sig == pytest.approx([1 / (1 + math.exp(-z)) for z in raw], abs=1e-6)
    # One output: its softmax is 1 whatever the logit.
    assert ModelScorer(str(models["classifier"]), normalize="softmax").score(
        PROMPTS, RESPONSES) == pytest.approx([1.0] * 3)


def test_judge_p_yes_matches_a_softmax_by_hand(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = ModelScorer(str(models["judge"]), "judge", batch_size=3)
    scores = scorer.score(PROMPTS, RESPONSES)
    assert all(0 < s < 1 for s in scores)
    single = [scorer.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert single == pytest.approx(scores, abs=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(models["judge"])
    model = AutoModelForCausalLM.from_pretrained(models["judge"]).eval()
    # The tiny tokenizer splits both words: "Yes" -> "Y" "es", " Yes" -> "Ġ" "Y" "es", ...; the
    # lone space they share is dropped, so the answer tokens are "Y" and "N".
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("No", add_special_tokens=False)["input_ids"][0]
    assert (scorer.yes_ids, scorer.no_ids) == ([yes], [no])
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores, strict=True):
        question = DEFAULT_JUDGE_TEMPLATE.replace("{prompt}", prompt).replace(
            "{response}", response)
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        expected = torch.softmax(logits[[yes, no]], dim=-1)[0].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_long_responses_are_cut_at_their_end(models):
    scorer = ModelScorer(str(models["judge"]), "judge", max_length=80)
    long_response = "the answer is " + "very " * 200 + "long"
    ids = scorer.encode(PROMPTS[0], long_response)
    assert len(ids) <= 80
    text = scorer.tokenizer.decode(ids)
    # The request and the judge's question survive; the response's tail does not.
    assert PROMPTS[0] in text and "Answer Yes or No." in text and "long" not in text
    assert 0 < scorer.score([PROMPTS[0]], [long_response])[0] < 1


def test_scorer_rejects_bad_settings(models):
    with pytest.raises(ModelScorerError, match=r"kind"):
        ModelScorer(str(models["classifier"]), "ranker")
    with pytest.raises(ModelScorerError, match=r"not a sequence classifier.*kind=judge"):
        ModelScorer(str(models["judge"]), "classifier")
    with pytest.raises(ModelScorerError, match=r"label 3"):
        ModelScorer(str(models["classifier"]), label=3)
    with pytest.raises(ModelScorerError, match=r"\{response\}"):
        ModelScorer(str(models["judge"]), "judge", judge_template="Is it good?")
    with pytest.raises(ModelScorerError, match=r"reward.model.path"):
        ModelScorer("no-such-model", "judge")


def test_judge_template_fills_placeholders_once():
    out = render_judge_prompt("Q: {prompt} A: {response} {other}", "use {response}", "{x}")
    assert out == "Q: use {response} A: {x} {other}"


# --- rule-based parts without a gold answer ---------------------------------------------------

def test_rule_based_parts_score_zero_without_gold():
    response = "<think>hi</think>\n<answer>def f(): return 1</answer>"
    parts = compute_reward(response, "", {"accuracy": 1.0, "code_accuracy": 1.0, "format": 1.0})
    assert parts["accuracy"] == 0.0 and parts["code_accuracy"] == 0.0
    with pytest.raises(ValueError, match=r"reward model"):
        compute_reward(response, "", {"preference": 1.0})  # only the workers can score it


# --- config -----------------------------------------------------------------------------------

def test_preference_without_a_reward_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'reward.model.path'.*reward\.weights.*preference"):
        load_config(["reward.weights={accuracy: 1.0, preference: 1.0}"])
    with pytest.raises(ConfigError, match=r"'reward.model.path'.*reward\.per_task\.arithmetic"):
        load_config(["reward.per_task={arithmetic: {preference: 1.0}}"])
    with pytest.raises(ConfigError, match=r"'reward.model.kind'"):
        load_config(["reward.model.path=/m", "reward.model.kind=ranker"])
    with pytest.raises(ConfigError, match=r"'reward.model.kind'.*causal LM"):
        load_config(["reward.model.path=tiny-random"])  # built-ins are causal LMs
    with pytest.raises(ConfigError, match=r"'reward.model.judge_template'"):
        load_config(["reward.model.path=/m", "reward.model.kind=judge",
                     "reward.model.judge_template=Good?"])
    with pytest.raises(ConfigError, match=r"'reward.model.dtype'"):
        load_config(["reward.model.dtype=float64"])


def test_all_scenario_mix_config(tmp_path):
    cfg = load_config(["data.task=mix", "data.mix={arithmetic: 3, prompts: 1}",
                       "data.prompts_path=general.jsonl",
                       "reward.per_task={prompts: {preference: 1.0}}",
                       "reward.model.path=tiny-random", "reward.model.kind=judge"])
    assert cfg.reward.model.kind == "judge" and cfg.reward.per_task["prompts"] == {
        "preference": 1.0}
    with pytest.raises(ConfigError, match=r"'data.prompts_path'"):
        load_config(["data.task=prompts"])


# --- the prompts task -------------------------------------------------------------------------

def test_prompts_task_takes_rows_without_answers(tmp_path):
    from rlsys.build import build_task
    from rlsys.data import DataError, make_task

    path = tmp_path / "general.jsonl"
    rows = [{"prompt": f"Write a line about {i}."} for i in range(6)]
    rows += [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Hi?", "answer": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["data.task=prompts", f"data.path={path}", "data.eval_size=2",
                       "trainer.eval_size=2"])
    task = build_task(cfg)
    problems = task.sample(6) + task.eval_problems()
    assert {p.task for p in problems} == {"prompts"}
    assert {p.question for p in problems} == {r["prompt"] for r in rows}
    assert all(p.answer == ("2" if p.question == "What is 1 + 1?" else "") for p in problems)
    with pytest.raises(DataError, match=r"missing field 'answer'"):
        make_task("file", path=path, eval_size=2)  # the file task still needs answers


# --- serving: reward workers ------------------------------------------------------------------

def test_worker_without_prompts_marks_preference_items_as_errors(models):
    from actors.reward import RewardWorker

    worker = RewardWorker({"format": 1.0}, per_task={"chat": {"preference": 1.0}},
                          model={"path": str(models["judge"]), "kind": "judge"})
    out = worker.score(["<think>a</think>\n<answer>1</answer>", "hi"], ["1", ""],
                       ["arithmetic", "chat"])
    assert out[0] == {"total": 1.0, "format": 1.0, "error": 0.0}
    assert out[1] == {"total": 0.0, "preference": 0.0, "error": 1.0}
    assert worker._scorer is None  # nothing to score: the model was not even loaded


def test_reward_pool_mixes_accuracy_and_preference_per_task(ray_cluster, models):
    from actors.reward import RewardPool

    options = {"path": str(models["judge"]), "kind": "judge", "batch_size": 2}
    pool = RewardPool(2, {"format": 1.0}, num_cpus=0.1, timeout_s=120.0,
                      name_prefix="test-model-scorer",
                      per_task={"arithmetic": {"accuracy": 1.0},
                                "prompts": {"preference": 1.0, "format": 0.5}},
                      model=options)
    try:
        tasks = ["arithmetic", "prompts", "prompts", "arithmetic", "prompts"]
        prompts = ["What is 2 + 3?", "Say hi.", "Tell a joke.", "What is 1 + 1?", "Sing."]
        responses = ["<answer>5</answer>", "hi", "<think>ok</think>\n<answer>a joke</answer>",
                     "<answer>3</answer>", "la la"]
        golds = ["5", "", "", "2", ""]
        scores = pool.score(responses, golds, tasks, prompts=prompts)
        expected = ModelScorer(**options).score([prompts[i] for i in (1, 2, 4)],
                                                [responses[i] for i in (1, 2, 4)])
        assert [s["error"] for s in scores] == [0.0] * 5
        assert scores[0] == {"total": 1.0, "accuracy": 1.0, "error": 0.0}
        assert scores[3] == {"total": 0.0, "accuracy": 0.0, "error": 0.0}
        for i, value in zip((1, 2, 4), expected, strict=True):
            assert set(scores[i]) == {"total", "preference", "format", "error"}
            assert scores[i]["preference"] == pytest.approx(value, abs=1e-5)
            assert scores[i]["total"] == pytest.approx(value + 0.5 * scores[i]["format"])
        assert scores[2]["format"] == 1.0
        # Without prompts the preference items fail alone; the others are still scored.
        bare = pool.score(responses, golds, tasks)
        assert [s["error"] for s in bare] == [0.0, 1.0, 1.0, 0.0, 1.0]
        assert bare[0]["accuracy"] == 1.0
        with pytest.raises(ValueError, match=r"prompts"):
            pool.score(responses, golds, tasks, prompts=prompts[:2])
    finally:
        pool.shutdown()
