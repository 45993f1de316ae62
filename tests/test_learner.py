"""The learner in-process (no Ray, a world of one): packing, log-probs and the GRPO update."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learners.learner import Learner, lr_factor
from learners.packing import pack_microbatches
from rlsys.build import learner_env
from rlsys.config import AlgorithmConfig, LearnerConfig
from rlsys.models import resolve_model


@pytest.fixture(scope="module")
def tiny_path(cache_dir):
    return str(resolve_model("tiny-random", cache_dir))


def make_learner(path: str, **overrides) -> Learner:
    lc = LearnerConfig(lr=1e-2, compute_dtype="float32", num_threads=2,
                       max_tokens_per_microbatch=overrides.pop("max_tokens", 256))
    algo = AlgorithmConfig(**overrides)
    return Learner(path, lc, algo, max_response_len=8, seed=0)


@torch.no_grad()
def plain_logprobs(model, prompt: list[int], response: list[int],
                   temperature: float = 1.0) -> torch.Tensor:
    """log-probs of `response`'s tokens under a plain (unpacked) forward pass, at `temperature`."""
    logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    return torch.log_softmax(logits, -1)[len(prompt) - 1: -1].gather(
        -1, torch.tensor(response)[:, None]).squeeze(-1)


def full_state(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in learner.model.state_dict().items()}


def test_packing_shares_prompts_and_respects_the_budget():
    prompts = [[1, 2, 3]] * 3 + [[4]] + [[5, 6]] * 2 + [[7, 8, 9, 10]]
    responses = [[11, 12], [13, 14, 15], [16], [17], [18], [19, 20], [21]]
    mbs = pack_microbatches(prompts, responses, max_tokens=12)
    assert sorted(i for mb in mbs for i in mb.index) == list(range(len(prompts)))
    for mb in mbs:
        assert mb.num_tokens <= 12
        tokens, positions = mb.input_ids.tolist(), mb.position_ids.tolist()
        # Every response token is predicted from its own sequence: the previous token of the
        # response, or the last token of its prompt (at the position just before).
        targets = mb.targets.split(mb.response_lens)
        predict = mb.predict_index.split(mb.response_lens)
        for i, t, p in zip(mb.index, targets, predict, strict=True):
            assert t.tolist() == responses[i]
            first = int(p[0])
            assert positions[first] == len(prompts[i]) - 1
            assert tokens[first - len(prompts[i]) + 1: first + 1] == prompts[i]
    # One micro-batch holds each prompt once: 4 prompts (10 tokens) + 11 response tokens.
    (whole,) = pack_microbatches(prompts, responses, max_tokens=100)
    assert whole.num_tokens == 10 + 11
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        pack_microbatches([[1] * 10], [[2]], max_tokens=8)


def test_logprobs_match_a_plain_forward_pass(tiny_path):
    """Packed micro-batches give each sequence's own full-forward (padding-free) log-probs."""
    from transformers import AutoModelForCausalLM

    learner = make_learner(tiny_path, kl_coef=0.0, max_tokens=12)
    plain = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [30, 31, 32, 33, 34]]
    responses = [[10, 11, 12, 13], [14], [15, 16], [17, 18, 19], [20, 21]]
    got = learner.compute_logprobs(prompts, responses)
    assert len(pack_microbatches(prompts, responses, 12)) > 1
    for p, r, lp in zip(prompts, responses, got, strict=True):
        torch.testing.assert_close(torch.tensor(lp), plain_logprobs(plain, p, r),
                                   atol=1e-5, rtol=1e-5)


def test_a_batch_is_scored_at_the_temperature_it_was_sampled_at(tiny_path):
    """Under a temperature schedule each call names the batch's temperature: log-probs are
    those of logits / T, and the update's ratio starts at 1 against samples drawn at T."""
    from transformers import AutoModelForCausalLM

    learner = make_learner(tiny_path, kl_coef=0.0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]]
    hot = learner.compute_logprobs(prompts, responses, temperature=2.0)
    for p, r, lp in zip(prompts, responses, hot, strict=True):
        torch.testing.assert_close(torch.tensor(lp), plain_logprobs(plain, p, r, 2.0),
                                   atol=1e-5, rtol=1e-5)
    metrics = learner.train_step({"prompt_ids": prompts, "response_ids": responses,
                                  "rollout_logprobs": hot, "advantages": [1.0, -1.0]},
                                 temperature=2.0)
    assert metrics["logprob_gap"] < 1e-5  # scored at 2.0, as sampled


def test_update_moves_probability_towards_positive_advantages(tiny_path):
    learner = make_learner(tiny_path, kl_coef=0.01)
    prompts, responses = [[5, 6, 7]] * 2, [[10, 11, 12], [20, 21, 22]]
    before = learner.compute_logprobs(prompts, responses)
    batch = {"prompt_ids": prompts, "response_ids": responses, "rollout_logprobs": before,
             "advantages": [1.0, -1.0]}
    metrics = learner.train_step(batch)
    after = learner.compute_logprobs(prompts, responses)
    # The positively rewarded response gains probability, and gains it relative to the other.
    assert sum(after[0]) > sum(before[0])
    assert sum(after[0]) - sum(after[1]) > sum(before[0]) - sum(before[1])
    assert metrics["logprob_gap"] < 1e-5  # same weights, fp32: train == rollout log-probs
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step
    assert metrics["grad_norm"] > 0
    # The entropy metric: mean over response tokens of the policy's entropy before the step.
    assert 0 < metrics["entropy"] <= math.log(learner.model.config.vocab_size) + 1e-4


def test_microbatch_split_gives_the_same_update(tiny_path):
    """The loss is normalised over the whole batch, so the micro-batch size must not matter."""
    prompts = [[5, 6, 7], [5, 6, 7], [10, 11, 12, 13], [14]]
    responses = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    results = []
    for max_tokens in (8, 256):
        learner = make_learner(tiny_path, kl_coef=0.0, max_tokens=max_tokens)
        # Plain SGD, so the new weights are w - lr * grad: Adam's first step, ~lr * sign(grad),
        # would blow float noise in near-zero gradients up to the size of the learning rate.
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
        lp = learner.compute_logprobs(prompts, responses)
        learner.train_step({"prompt_ids": prompts, "response_ids": responses,
                            "rollout_logprobs": lp, "advantages": [1.0, -0.5, 0.3, -0.8]})
        results.append(full_state(learner))
    assert len(pack_microbatches(prompts, responses, 8)) > 1
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=1e-5)


def test_later_minibatches_ratio_against_the_policy_before_the_first_step(tiny_path):
    """algorithm.updates_per_batch=2: two optimizer steps on halves of the batch. The first
    half's old log-probs are its own forward pass's (ratio 1); the second half's are recomputed
    before the first step, one extra forward pass over that half only, so after the first step
    its ratios move away from 1."""
    prompts = [[5, 6, 7]] * 4
    responses = [[10, 11, 12], [20, 21, 22], [13, 14], [23, 24, 25, 26]]
    batch = {"prompt_ids": prompts, "response_ids": responses, "advantages": [1.0, -1.0, 1.0, -1.0]}
    ratio_max = {}
    for updates in (1, 2):
        learner = make_learner(tiny_path, kl_coef=0.0, updates_per_batch=updates)
        batch["rollout_logprobs"] = learner.compute_logprobs(prompts, responses)
        recomputed: list[int] = []
        compute = learner.compute_logprobs

        def counted(p, r, compute=compute, recomputed=recomputed, **kw):
            recomputed.append(len(p))
            return compute(p, r, **kw)

        learner.compute_logprobs = counted
        ratio_max[updates] = learner.train_step(batch)["ratio_max"]
        assert recomputed == ([] if updates == 1 else [2])
        assert learner.step == 1 and learner.scheduler.last_epoch == updates
    assert ratio_max[1] == pytest.approx(1.0, abs=1e-6)
    assert 1.001 < ratio_max[2] < 2.0


def test_sft_step_is_the_token_mean_nll_of_the_responses(tiny_path):
    """The supervised update equals a plain forward pass's cross-entropy on the response
    tokens only (prompts carry no loss), averaged over all response tokens of the batch."""
    from transformers import AutoModelForCausalLM

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[1, 2], [3, 4, 5, 6], [7]]
    learner = make_learner(tiny_path, kl_coef=0.0, max_tokens=10)
    learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
    learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
    assert len(pack_microbatches(prompts, responses, 10)) > 1
    metrics = learner.sft_step({"prompt_ids": prompts, "response_ids": responses})

    plain = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    total = []
    for p, r in zip(prompts, responses, strict=True):
        logits = plain(torch.tensor([p + r])).logits[0]
        total.append(torch.nn.functional.cross_entropy(
            logits[len(p) - 1: -1], torch.tensor(r), reduction="sum"))
    loss = torch.stack(total).sum() / sum(map(len, responses))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), learner.cfg.grad_clip)
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert metrics["nll"] == pytest.approx(loss.detach().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.detach().item(), rel=1e-5)
    assert metrics["tokens"] == 7
    with torch.no_grad():
        for param in plain.parameters():
            param -= param.grad
    got = full_state(learner)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)


def test_masked_completions_contribute_no_gradient(tiny_path):
    """loss_mask=False (e.g. truncated completions) equals leaving the completion out."""
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9]]
    responses = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    advantages = [1.0, -1.0, 0.5]
    states = []
    for keep in ([0, 2], [0, 1, 2]):
        learner = make_learner(tiny_path, kl_coef=0.0)
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
        batch = {key: [values[i] for i in keep] for key, values in {
            "prompt_ids": prompts, "response_ids": responses, "advantages": advantages}.items()}
        batch["rollout_logprobs"] = learner.compute_logprobs(batch["prompt_ids"],
                                                             batch["response_ids"])
        batch["loss_mask"] = [i != 1 for i in keep]
        learner.train_step(batch)
        states.append(full_state(learner))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


def test_checkpoint_restores_weights_optimizer_and_step(tiny_path, tmp_path):
    """A DCP checkpoint brings back the exact state: the next update is the same as without it."""
    prompts, responses = [[5, 6, 7]] * 2 + [[8, 9]], [[10, 11, 12], [20, 21], [3]]
    batch = {"prompt_ids": prompts, "response_ids": responses, "advantages": [1.0, -1.0, 0.5]}

    def step(learner: Learner) -> dict[str, float]:
        lp = learner.compute_logprobs(prompts, responses)
        return learner.train_step(batch | {"rollout_logprobs": lp})

    learner = make_learner(tiny_path, kl_coef=0.05)
    step(learner)  # Adam moments are non-zero from here on
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    saved = full_state(learner)
    want = step(learner)
    after_want = full_state(learner)

    restored = make_learner(tiny_path, kl_coef=0.05)
    assert restored.load_checkpoint(str(tmp_path / "ckpt")) == 1
    for key, value in full_state(restored).items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
    got = step(restored)
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    for key, value in full_state(restored).items():
        torch.testing.assert_close(value, after_want[key], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rollout_is_weights_scale_the_policy_gradient(tiny_path, mode):
    """Truncated IS: the update's policy-gradient term is weighted by
    min(pi_old / pi_rollout, cap), with pi_old the learner's own (pre-update) log-probs."""
    prompts, responses = [[5, 6, 7]] * 2, [[10, 11, 12], [20, 21]]
    advantages = [1.0, -1.0]
    results = {}
    # The engine's log-probs shifted per token by log(c): w = c on every token ("token"), or
    # c^len truncated at the cap ("sequence").
    for name, algo, shift in [("plain", {}, 0.0), ("same", {"rollout_is": mode}, 0.0),
                              ("scaled", {"rollout_is": mode, "rollout_is_cap": 10.0}, 1.5),
                              ("capped", {"rollout_is": mode}, 3.0)]:
        learner = make_learner(tiny_path, kl_coef=0.0, **algo)
        lp = learner.compute_logprobs(prompts, responses)
        rollout = [[x - math.log(shift) if shift else x for x in row] for row in lp]
        results[name] = learner.train_step({"prompt_ids": prompts, "response_ids": responses,
                                            "rollout_logprobs": rollout,
                                            "advantages": advantages})
    assert "rollout_is/mean" not in results["plain"]
    # Rollout == learner log-probs: weights 1, the plain update.
    assert results["same"]["rollout_is/mean"] == pytest.approx(1.0, abs=1e-5)
    assert results["same"]["rollout_is/clipped_frac"] == 0.0
    assert results["same"]["pg_loss"] == pytest.approx(results["plain"]["pg_loss"], rel=1e-5)
    assert results["same"]["grad_norm"] == pytest.approx(results["plain"]["grad_norm"], rel=1e-5)
    if mode == "token":  # 1.5 on every token: loss and gradient x 1.5; 3 is capped at 2
        scaled, capped = 1.5, 2.0
    else:  # 1.5^3 = 3.375 and 1.5^2 = 2.25 below the cap of 10; 27 and 9 capped at 2
        scaled, capped = None, 2.0
    if scaled is not None:
        assert results["scaled"]["rollout_is/mean"] == pytest.approx(scaled, rel=1e-5)
        assert results["scaled"]["pg_loss"] == pytest.approx(
            scaled * results["plain"]["pg_loss"], rel=1e-4)
        assert results["scaled"]["grad_norm"] == pytest.approx(
            scaled * results["plain"]["grad_norm"], rel=1e-4)
    else:
        assert results["scaled"]["rollout_is/mean"] == pytest.approx(
            (3 * 1.5**3 + 2 * 1.5**2) / 5, rel=1e-5)
    assert results["scaled"]["rollout_is/clipped_frac"] == 0.0
    assert results["capped"]["rollout_is/mean"] == pytest.approx(capped, rel=1e-5)
    assert results["capped"]["rollout_is/clipped_frac"] == 1.0
    assert results["capped"]["pg_loss"] == pytest.approx(
        capped * results["plain"]["pg_loss"], rel=1e-4)
    assert results["capped"]["grad_norm"] == pytest.approx(
        capped * results["plain"]["grad_norm"], rel=1e-4)


def test_kl_in_reward_takes_the_kl_out_of_the_loss(tiny_path):
    """algorithm.kl_in_reward: the learner keeps a reference model (for the reward's KL) but
    its update has no KL term, i.e. equals a kl_coef=0 update on the same advantages; reference
    log-probs handed in with the batch are only reported as the "kl" metric."""
    prompts, responses = [[5, 6, 7]] * 2 + [[8, 9]], [[10, 11, 12], [20, 21], [3]]
    advantages = [1.0, -1.0, 0.5]
    states, metrics = [], []
    for algo in ({"kl_coef": 0.0}, {"kl_coef": 0.5, "kl_in_reward": True}):
        learner = make_learner(tiny_path, **algo)
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
        batch = {"prompt_ids": prompts, "response_ids": responses, "advantages": advantages,
                 "rollout_logprobs": learner.compute_logprobs(prompts, responses)}
        metrics.append(learner.train_step(batch))
        states.append(full_state(learner))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)
    assert "kl" not in metrics[1]  # no reference pass in the update
    assert metrics[1]["loss"] == pytest.approx(metrics[1]["pg_loss"])

    # The reference model moved away: the update's loss still carries no KL, the metric shows it.
    ref = learner.compute_logprobs(prompts, responses, reference=True)
    now = learner.compute_logprobs(prompts, responses)
    m = learner.train_step({"prompt_ids": prompts, "response_ids": responses,
                            "advantages": advantages, "rollout_logprobs": now,
                            "ref_logprobs": ref})
    assert m["kl"] > 1e-4
    assert m["loss"] == pytest.approx(m["pg_loss"])


def test_kd_sft_step_is_the_token_mean_kl_to_the_teacher(tiny_path, tmp_path):
    """distill.loss=kd: the update equals a plain pass's KL(teacher || student) at every
    response token, averaged over the batch's response tokens, with gradients into the student
    only; the teacher is unchanged. A teacher equal to the student gives a zero loss."""
    from transformers import AutoModelForCausalLM

    from rlsys.models import build_tiny_model

    teacher_path = str(build_tiny_model(tmp_path / "teacher", seed=1))  # same tokenizer
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[1, 2], [3, 4, 5, 6], [7]]
    lc = LearnerConfig(lr=1.0, compute_dtype="float32", num_threads=2,
                       max_tokens_per_microbatch=10)
    learner = Learner(tiny_path, lc, AlgorithmConfig(kl_coef=0.0), max_response_len=8, seed=0,
                      teacher_path=teacher_path)
    learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
    learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
    assert len(pack_microbatches(prompts, responses, 10)) > 1
    metrics = learner.sft_step({"prompt_ids": prompts, "response_ids": responses})

    student = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    kls, nlls = [], []
    for p, r in zip(prompts, responses, strict=True):
        at = slice(len(p) - 1, len(p) + len(r) - 1)  # positions predicting the response
        logp_s = torch.log_softmax(student(torch.tensor([p + r])).logits[0, at], -1)
        with torch.no_grad():
            logp_t = torch.log_softmax(teacher(torch.tensor([p + r])).logits[0, at], -1)
        kls.append((logp_t.exp() * (logp_t - logp_s)).sum())
        nlls.append(-logp_s.gather(-1, torch.tensor(r)[:, None]).sum())
    loss = torch.stack(kls).sum() / sum(map(len, responses))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), lc.grad_clip)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["kd"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["nll"] == pytest.approx(float(torch.stack(nlls).sum().detach()) / 7, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    with torch.no_grad():
        for param in student.parameters():
            param -= param.grad
    got = full_state(learner)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)
    for name, value in learner.teacher_model.state_dict().items():
        torch.testing.assert_close(value, teacher.state_dict()[name], atol=0, rtol=0)

    same = Learner(tiny_path, lc, AlgorithmConfig(kl_coef=0.0), max_response_len=8, seed=0,
                   teacher_path=tiny_path)
    zero = same.sft_step({"prompt_ids": prompts, "response_ids": responses})
    assert zero["kd"] == pytest.approx(0.0, abs=1e-6) and zero["grad_norm"] < 1e-5


def test_lr_schedules_warm_up_then_decay_to_the_floor():
    def curve(schedule: str, total: int = 12, min_ratio: float = 0.1) -> list[float]:
        return [lr_factor(s, warmup=2, total=total, schedule=schedule, min_ratio=min_ratio)
                for s in range(total)]

    for schedule in ("constant", "linear", "cosine"):
        assert curve(schedule)[:3] == [0.5, 1.0, 1.0]  # warm-up, then the full rate
    assert curve("constant") == [0.5] + [1.0] * 11
    assert [lr_factor(s, warmup=0, total=0, schedule="cosine", min_ratio=0.1)
            for s in range(5)] == [1.0] * 5  # no horizon: constant
    for schedule in ("linear", "cosine"):
        decay = curve(schedule)[2:]
        assert all(a > b for a, b in itertools.pairwise(decay))
        assert 0.1 < decay[-1] < 0.2  # the last step trains at about min_ratio x lr
        assert lr_factor(12, warmup=2, total=12, schedule=schedule, min_ratio=0.1) == (
            pytest.approx(0.1))
    assert curve("linear")[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert curve("cosine")[7] == pytest.approx(0.1 + 0.9 * 0.5)



FREED_PAGES_SCRIPT = """
import json
from learners.learner import host_rss_gb, return_freed_pages
before = host_rss_gb()
block = bytearray(512 << 20)
block[::4096] = b"x" * len(block[::4096])  # touch every page
del block
kept = host_rss_gb()
allocator = return_freed_pages()
print("RESULT " + json.dumps({"before": before, "kept": kept, "after": host_rss_gb(),
                              "allocator": allocator}))
"""


def test_return_freed_pages_gives_jemallocs_kept_pages_back():
    """The learner's jemalloc (rlsys.build.learner_env: preloaded, freed pages never decay)
    keeps a freed 512 MiB block resident; return_freed_pages hands it back."""
    env = {**os.environ, **learner_env(1, "jemalloc")["env_vars"],
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", FREED_PAGES_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert got["allocator"] == "jemalloc", got
    assert got["kept"] - got["before"] > 0.4, got  # freed, but still resident
    assert got["kept"] - got["after"] > 0.4, got  # given back


@pytest.mark.parametrize("min_available", [0.0, 1.0])
def test_updates_give_pages_back_only_when_the_node_is_short_of_memory(tiny_path,
                                                                         min_available):
    """learner.min_available_memory: 0 never gives pages back, 1 after every update."""
    learner = make_learner(tiny_path)
    learner.cfg.min_available_memory = min_available
    prompts, responses = [[5, 6, 7]] * 2, [[10, 11, 12], [20, 21, 22]]
    batch = {"prompt_ids": prompts, "response_ids": responses,
             "rollout_logprobs": learner.compute_logprobs(prompts, responses),
             "advantages": [1.0, -1.0]}
    for metrics in (learner.train_step(batch), learner.sft_step(batch)):
        assert metrics["host_pages_returned"] == min_available
        assert 0 < metrics["host_rss_gb"] < 64
