"""Tensor x data parallel parity of the learner on CPU/gloo (no Ray: plain spawned processes).

For the same seed and batch, (tp, dp) = (2, 1), (1, 2) and (2, 2) must reproduce the
(1, 1) learner: log-probs (policy and reference), the update's loss and grad norm, and the
updated weights. Each configuration runs once, in `tp * dp` fresh processes (a process can be
in only one default process group), and is cached for the module.

What one configuration does, every rank on its data-parallel shard of the batch:
  1. policy and reference log-probs;
  2. GRPO update 1 (policy == reference, so the KL is 0);
  3. policy and reference log-probs again (they now differ);
  4. GRPO update 2 (KL > 0: the reference model's log-probs enter the loss and gradient);
  5. policy log-probs, and the full weights gathered with `parallel.full_tensors`.
The optimizer is plain SGD with a constant learning rate, so the weights are w - lr * grad and
compare gradients directly (Adam's first step, ~lr * sign(grad), would blow float noise in
near-zero gradients up to the size of the learning rate).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch

from learners.group import shard_for_data_parallel
from learners.packing import pack_microbatches

# 4 prompts x 3 completions of mixed lengths (prompts 3-9 tokens, responses 1-12 tokens).
PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23], [31, 32, 33, 34, 35],
           [41, 42, 43, 44, 45, 46, 47]]
RESPONSES = [
    [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112],  # prompt 0: 12 tokens
    [120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130],  # 11
    [140],  # 1
    [201, 202],  # prompt 1
    [210],
    [220, 221, 222],
    [301, 302, 303, 304],  # prompt 2
    [310, 311, 312, 313, 314, 315],
    [320, 321],
    [401, 402, 403, 404, 405],  # prompt 3
    [410],
    [420, 421, 422, 423, 424, 425, 426, 427],
]
BATCH_PROMPTS = [PROMPTS[i // 3] for i in range(len(RESPONSES))]
ADVANTAGES = [1.0, -0.7, 0.3, 0.9, -1.2, 0.4, -0.5, 0.8, -0.3, 1.1, -0.6, -0.4]
LOSS_MASK = [i != 4 for i in range(len(RESPONSES))]  # one completion out of the loss
# Small enough for several micro-batches per rank, and for the two dp=2 shards to need different
# numbers of them (the learner pads the lighter rank with idle passes; checked below).
MAX_TOKENS = 24
# SGD step; the gradient norm (~2.9, then ~1.7) is above grad_clip (1.0), so clipping is
# exercised and each step moves the weights by lr in norm: enough for a KL of ~0.1 at update 2.
LR = 0.3
KL_COEF = 0.05
CHILD_TIMEOUT_S = 120  # per configuration; a test starts at most two (timeout 300 s)
LOGPROB_KEYS = ("lp0", "ref0", "lp1", "ref1", "lp2")
# "kl" is checked separately: see test_kl_metric_is_the_batch_kl.
SCALAR_METRICS = ("loss", "pg_loss", "grad_norm", "entropy", "logprob_gap", "logprob_gap_max")

# Tolerances, all fp32 (compute and master weights). The parallel runs differ from (1, 1) only
# in the order of float sums (row-parallel partial sums, vocabulary-parallel log-softmax, the
# dp gradient reduction, the grouped grad-norm), i.e. by a few float32 ulps. Measured max
# |diff| over the three configurations: log-probs 2.4e-6,
# grad_norm 8.6e-6 (of 2.86: 3e-6 relative), loss 2.2e-8, entropy 2.6e-7, weights 1.2e-7.
SCALAR_TOL = {"rtol": 1e-5, "atol": 1e-6}  # loss, pg_loss, grad_norm, entropy, gaps
LOGPROB_TOL = {"rtol": 0.0, "atol": 1e-5}  # log-probs are O(1-10)
WEIGHT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # updated weights (init std 0.02)

# (tp, dp), each compared with (1, 1).
CONFIGS = [pytest.param(2, 1, id="tp2-dp1"),
           pytest.param(1, 2, id="tp1-dp2"),
           pytest.param(2, 2, id="tp2-dp2")]


def rollout_logprobs(logprobs: list[list[float]], index: list[int]) -> list[list[float]]:
    """Slightly off the learner's own log-probs (as an engine's would be): a nonzero gap."""
    return [[x + 0.01 * ((i + k) % 3 - 1) for k, x in enumerate(lp)]
            for i, lp in zip(index, logprobs, strict=True)]


def _worker(rank: int, tp: int, dp: int, port: int, model_path: str, out_dir: str) -> None:
    """One rank: the scenario of the module docstring; results and errors go to files."""
    out = Path(out_dir)
    try:
        import torch.distributed as dist

        from learners import parallel
        from learners.learner import Learner
        from rlsys.config import AlgorithmConfig, LearnerConfig

        lc = LearnerConfig(lr=LR, compute_dtype="float32", num_threads=1, tp=tp, dp=dp,
                           max_tokens_per_microbatch=MAX_TOKENS)
        learner = Learner(model_path, lc, AlgorithmConfig(kl_coef=KL_COEF), max_response_len=12,
                          seed=0, rank=rank, master_port=port)
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=LR)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)

        index = shard_for_data_parallel(BATCH_PROMPTS, RESPONSES, dp)[rank // tp]
        shard = {"prompt_ids": [BATCH_PROMPTS[i] for i in index],
                 "response_ids": [RESPONSES[i] for i in index],
                 "advantages": [ADVANTAGES[i] for i in index],
                 "loss_mask": [LOSS_MASK[i] for i in index]}
        ids = (shard["prompt_ids"], shard["response_ids"])
        result: dict = {"index": index}
        result["lp0"] = learner.compute_logprobs(*ids)
        result["ref0"] = learner.compute_logprobs(*ids, reference=True)
        result["m1"] = learner.train_step(
            shard | {"rollout_logprobs": rollout_logprobs(result["lp0"], index)})
        result["lp1"] = learner.compute_logprobs(*ids)
        result["ref1"] = learner.compute_logprobs(*ids, reference=True)
        result["m2"] = learner.train_step(
            shard | {"rollout_logprobs": rollout_logprobs(result["lp1"], index)})
        result["lp2"] = learner.compute_logprobs(*ids)
        weights = {name: t.detach().clone() for name, t in parallel.full_tensors(learner.model)}
        if rank == 0:
            result["weights"] = weights
        dist.barrier()
        dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_config(tp: int, dp: int, model_path: str, out_dir: Path) -> dict:
    """Run one configuration in tp * dp spawned processes; gather its results in batch order.

    A rank that fails makes the others wait in a collective, so the first failure (or the
    deadline) kills the whole world; the children's tracebacks go into the assertion message.
    """
    from learners.learner import combine_rank_metrics
    from rlsys.weight_sync import find_free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    world = tp * dp
    ctx = multiprocessing.get_context("spawn")
    port = find_free_port()
    with pytest.MonkeyPatch.context() as env:  # inherited by the spawned children
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        procs = [ctx.Process(target=_worker, args=(r, tp, dp, port, model_path, str(out_dir)),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    failed = False
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                failed = True
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    failed = failed or any(p.exitcode != 0 for p in procs)
    if failed:
        errors = "\n".join(f"--- rank {r} ---\n{(out_dir / f'rank{r}.err').read_text()}"
                           for r in range(world) if (out_dir / f"rank{r}.err").exists())
        codes = [p.exitcode for p in procs]
        pytest.fail(f"(tp={tp}, dp={dp}) failed or timed out after {CHILD_TIMEOUT_S} s; "
                    f"exit codes {codes}\n{errors or '(no traceback written)'}")

    per_dp = [torch.load(out_dir / f"rank{d * tp}.pt", weights_only=False) for d in range(dp)]
    merged: dict = {"weights": per_dp[0]["weights"]}
    for key in ("lp0", "ref0", "lp1", "ref1", "lp2"):
        merged[key] = [None] * len(RESPONSES)
        for part in per_dp:
            for i, lp in zip(part["index"], part[key], strict=True):
                merged[key][i] = lp
        assert all(lp is not None for lp in merged[key])
    for key in ("m1", "m2"):
        merged[key] = combine_rank_metrics([part[key] for part in per_dp])
    # Tensor-parallel ranks of one dp index report the same (global) metrics as their tp rank 0.
    for d in range(dp):
        for t in range(1, tp):
            other = torch.load(out_dir / f"rank{d * tp + t}.pt", weights_only=False)
            for key in ("m1", "m2"):
                for name in ("loss", "grad_norm", "kl", "tokens"):
                    assert other[key][name] == pytest.approx(per_dp[d][key][name], rel=1e-6,
                                                             abs=1e-7), (d, t, key, name)
    return merged


@pytest.fixture(scope="module")
def tiny_path(cache_dir):
    from rlsys.models import resolve_model

    return str(resolve_model("tiny-random", cache_dir))


@pytest.fixture(scope="module")
def run(tiny_path, tmp_path_factory):
    """`run(tp, dp)`: the configuration's merged results, computed once per module."""
    cache: dict[tuple[int, int], dict] = {}

    def get(tp: int, dp: int) -> dict:
        if (tp, dp) not in cache:
            cache[tp, dp] = run_config(tp, dp, tiny_path,
                                       tmp_path_factory.mktemp(f"tp{tp}dp{dp}"))
        return cache[tp, dp]

    return get


def test_shard_for_data_parallel_keeps_groups_and_balances_tokens():
    def cost(shard: list[int], prompts: list[list[int]], responses: list[list[int]]) -> int:
        # The learner packs each distinct prompt once per shard.
        return (sum(len(p) for p in {tuple(prompts[i]) for i in shard})
                + sum(len(responses[i]) for i in shard))

    for dp in (1, 2, 3, 4):
        shards = shard_for_data_parallel(BATCH_PROMPTS, RESPONSES, dp)
        assert len(shards) == dp
        assert sorted(i for s in shards for i in s) == list(range(len(RESPONSES)))
        assert all(s == sorted(s) for s in shards)
        if dp <= len(PROMPTS):  # enough groups: none is split
            for s in shards:
                for i in s:
                    assert {j for j in range(len(RESPONSES))
                            if BATCH_PROMPTS[j] == BATCH_PROMPTS[i]} <= set(s)
        # Greedy longest-first: every shard within one (largest) group of the mean.
        group_costs = [len(p) + sum(len(RESPONSES[i]) for i in range(3 * g, 3 * g + 3))
                       for g, p in enumerate(PROMPTS)]
        loads = [cost(s, BATCH_PROMPTS, RESPONSES) for s in shards]
        assert max(loads) - min(loads) <= max(group_costs)
    # The dp=2 split of this batch is balanced to within a few tokens.
    loads = [cost(s, BATCH_PROMPTS, RESPONSES)
             for s in shard_for_data_parallel(BATCH_PROMPTS, RESPONSES, 2)]
    assert max(loads) - min(loads) <= 5, loads

    # Fewer groups than ranks: groups are halved, every rank gets work, nothing is lost.
    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 2
    responses = [[6] * n for n in (5, 3, 4, 2, 7, 1)]
    shards = shard_for_data_parallel(prompts, responses, 4)
    assert sorted(i for s in shards for i in s) == list(range(6))
    assert all(shards)
    # One completion and several ranks: the extra ranks get empty shards.
    shards = shard_for_data_parallel([[1]], [[2]], 3)
    assert sorted(shards, key=len) == [[], [], [0]]


def test_the_batch_exercises_microbatches_and_idle_passes():
    """The parity runs below cover several micro-batches and uneven per-rank counts."""
    def count(shard: list[int]) -> int:
        return len(pack_microbatches([BATCH_PROMPTS[i] for i in shard],
                                     [RESPONSES[i] for i in shard], MAX_TOKENS))

    assert count(list(range(len(RESPONSES)))) > 2
    counts = [count(s) for s in shard_for_data_parallel(BATCH_PROMPTS, RESPONSES, 2)]
    assert len(set(counts)) > 1 and min(counts) > 1, counts


def _max_diff(a, b) -> float:
    return max(float((torch.as_tensor(x) - torch.as_tensor(y)).abs().max())
               for x, y in zip(a, b, strict=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("tp", "dp"), CONFIGS)
def test_parallel_update_matches_single_rank(run, tp, dp):
    base, par = run(1, 1), run(tp, dp)
    # Measured differences first (printed with -s), then the checks.
    diffs = {key: _max_diff(base[key], par[key]) for key in LOGPROB_KEYS}
    for step in ("m1", "m2"):
        for name in SCALAR_METRICS:
            diffs[f"{step}.{name}"] = abs(par[step][name] - base[step][name])
    assert par["weights"].keys() == base["weights"].keys()
    diffs["weights"] = max(float((par["weights"][n] - w).abs().max())
                           for n, w in base["weights"].items())
    print(f"\n(tp={tp}, dp={dp}) max |diff| vs (1, 1): "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))

    for key in LOGPROB_KEYS:
        for i, (want, got) in enumerate(zip(base[key], par[key], strict=True)):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **LOGPROB_TOL,
                                       msg=lambda m, k=key, i=i: f"{k}[{i}]: {m}")
    # Update 1 moved the policy away from the reference, so update 2 has a KL term.
    assert _max_diff(base["lp1"], base["ref1"]) > 1e-3

    # On-policy (ratio 1), pg_loss depends only on advantages and token counts, and so does
    # update 1's loss (KL 0); update 2's loss carries the KL term, grad_norm the gradients.
    for step in ("m1", "m2"):
        want, got = base[step], par[step]
        assert want["grad_norm"] > 0 and want["logprob_gap"] > 0
        assert got["tokens"] == want["tokens"] == sum(map(len, RESPONSES))
        for name in SCALAR_METRICS:
            assert got[name] == pytest.approx(want[name], rel=SCALAR_TOL["rtol"],
                                              abs=SCALAR_TOL["atol"]), (step, name)

    for name, want in base["weights"].items():
        got = par["weights"][name]
        torch.testing.assert_close(got, want, **WEIGHT_TOL,
                                   msg=lambda m, n=name: f"weight {n}: {m}")


def _batch_kl(policy: list[list[float]], ref: list[list[float]]) -> float:
    """k3 KL, token mean over the loss-masked response tokens (the loss's own aggregation)."""
    total, tokens = 0.0, 0
    for i, (lp, rl) in enumerate(zip(policy, ref, strict=True)):
        if LOSS_MASK[i]:
            log_ratio = torch.tensor(rl, dtype=torch.float64) - torch.tensor(lp,
                                                                             dtype=torch.float64)
            total += float((log_ratio.exp() - log_ratio - 1).sum())
            tokens += len(lp)
    return total / tokens


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("tp", "dp"), [(1, 1), (2, 1), (1, 2), (2, 2)],
                         ids=["tp1-dp1", "tp2-dp1", "tp1-dp2", "tp2-dp2"])
def test_kl_metric_is_the_batch_kl(run, tp, dp):
    """The "kl" metric of update 2 is the batch's KL(policy || reference) before the update.

    (Log-prob parity then makes it equal across configurations.)
    """
    res = run(tp, dp)
    want = _batch_kl(res["lp1"], res["ref1"])
    assert want > 1e-2
    assert res["m2"]["kl"] == pytest.approx(want, rel=1e-4)
