"""The per-GPU memory plan (rlsys/memory_plan.py): its terms on a shape small enough to compute
by hand, `activation_checkpointing=auto`, the shipped R1 configs, the refusal of a plan that does
not fit (before any actor starts), and the estimate against measured allocator peaks on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys import memory_plan as mp
from rlsys.config import Config, load_config
from rlsys.run import main

REPO = Path(__file__).resolve().parent.parent

# hidden 8, 2 layers, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), MLP 16, vocab 32, tied.
TOY = mp.ModelShape("toy", hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=32,
                    tied=True, source="test")
# Per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + MLP 3 x 8x16 = 576 linear weights, 2 norms of 8.
# The model: 2 layers x 592 + the (tied) embedding 32x8 + the final norm 8 = 1448.
PARAMS = 1448


def _toy_config(tokens: int = 10, mode: str = "none", device: str = "cuda") -> Config:
    cfg = Config()
    cfg.learner.device = device
    cfg.learner.compute_dtype = "bfloat16"  # on CPU too ("auto" follows the machine's CPU)
    cfg.learner.max_tokens_per_microbatch = tokens
    cfg.learner.activation_checkpointing = mode
    cfg.algorithm.kl_coef = 0.0
    return cfg


def _bytes(plan: mp.DevicePlan) -> dict[str, float]:
    return {t.name: round(t.gib * mp.GiB, 6) for t in plan.terms}


def test_toy_shape_params() -> None:
    assert TOY.dim == 4 and TOY.q_dim == 8 and TOY.kv_dim == 4
    assert TOY.layer_linear_params() == 576
    assert TOY.params() == PARAMS


def test_learner_terms_by_hand() -> None:
    """fp32 masters, bf16 compute, tp = dp = 1, 10 tokens, on a GPU (varlen: no mask)."""
    # Per token and layer (c = 2 compute bytes, r = 4: the residual stream is fp32 without
    # FSDP): input norm 4*8 + 4*8 + 3 casts of 2*8 + 4 = 116; post-attention norm
    # 32 + 32 + 2*16 + 4 = 100; attention 3*2*8 + 2*2*4 + 4*2 = 72; MLP 4*2*16 = 128: 416.
    # Outside the layers: final norm 32 + 32, output projection input 16, cos/sin 2*4*4: 112.
    none = _bytes(mp.learner_plan(_toy_config(), TOY, "none"))
    assert none == {
        "parameters": PARAMS * 4, "gradients": PARAMS * 4, "optimizer (AdamW)": PARAMS * 8,
        # autocast's bf16 casts: the output projection (32x8) and both layers' linears
        "compute-dtype weight copy": (256 + 2 * 576) * 2,
        "activations, no checkpointing": 10 * (2 * 416 + 112),
        "activations, full checkpointing": 10 * 2 * 4 * 8,  # an fp32 hidden state per layer
        # 320 logits: forward max(2*320 + 3 chunks of 4*320, backward 4*320 + 2 chunks)
        "logits / log-probs": 2 * 320 + 3 * 1280}
    plan = mp.learner_plan(_toy_config(), TOY, "none")
    assert plan.peak * mp.GiB == pytest.approx(
        PARAMS * 16 + 2816 + 9440 + 4480)

    full = mp.learner_plan(_toy_config(mode="full"), TOY, "full")
    terms = {t.name: t for t in full.terms}
    assert round(terms["compute-dtype weight copy"].gib * mp.GiB) == (256 + 576) * 2
    # One layer rebuilt in the backward: 416, and its gradients 3*2*16 + 4*8 = 128, per token.
    assert round(terms["one layer recomputed"].gib * mp.GiB) == 10 * (416 + 128)
    # The log-softmax phase also holds the final norm's activations: 4480 + 10*112 > 5440.
    assert round(terms["logits / log-probs"].gib * mp.GiB) == 4480 + 1120
    assert terms["logits / log-probs"].counted and not terms["one layer recomputed"].counted
    assert not terms["activations, no checkpointing"].counted
    assert full.peak * mp.GiB == pytest.approx(PARAMS * 16 + 1664 + 640 + 5600)


def test_learner_terms_sharded() -> None:
    """tp 2 x dp 2: parameters split over both; FSDP's gathered units in bf16; the residual
    stream in bf16; the vocabulary-parallel log-softmax; a reference model."""
    cfg = _toy_config()
    cfg.learner.tp = cfg.learner.dp = 2
    cfg.algorithm.kl_coef = 0.001
    terms = _bytes(mp.learner_plan(cfg, TOY, "none"))
    norms = 2 * 2 * 8 + 8  # replicated over tp, sharded over dp
    shard = ((PARAMS - norms) / 2 + norms) / 2
    assert terms["parameters"] == terms["reference model"] == shard * 4
    assert terms["optimizer (AdamW)"] == shard * 8
    # root unit (embedding 256 / tp) + 2 layers (592 / tp) in bf16 + one layer's grads (2 + 4)
    assert terms["gathered FSDP units"] == 128 * 2 + 2 * 296 * 2 + 296 * 6
    assert "compute-dtype weight copy" not in terms
    # r = c = 2: each norm 4*8 + 2*8 + 2*8 + 4 = 68; attention and MLP halved: (72 + 128) / 2
    assert terms["activations, no checkpointing"] == 10 * (2 * (68 + 68 + 100) + 4 * 8 + 16 + 16
                                                           + 2 * 2 * 4)
    assert terms["logits / log-probs"] == 10 * 16 * (2 + 16)


def test_cpu_attention_mask_and_temperature() -> None:
    """On CPU SDPA saves its mask per layer: c x the row width (<= rollout.max_model_len)."""
    gpu = mp.learner_plan(_toy_config(), TOY, "none")
    cfg = _toy_config(device="cpu")
    cfg.rollout.max_model_len = 6
    cfg.rollout.temperature = 0.7
    cpu = {t.name: t.gib * mp.GiB for t in mp.learner_plan(cfg, TOY, "none").terms}
    by = {t.name: t.gib * mp.GiB for t in gpu.terms}
    assert cpu["activations, no checkpointing"] - by["activations, no checkpointing"] == \
        pytest.approx(10 * 2 * 2 * 6)
    assert cpu["logits / log-probs"] - by["logits / log-probs"] == pytest.approx(320 * 2)
    assert not mp.learner_plan(cfg, TOY, "none").enforced


def test_engine_plan_kv_cache() -> None:
    cfg = _toy_config()
    r = cfg.rollout
    r.num_gpus, r.device_memory_gb, r.gpu_memory_utilization = 1, 2.0, 0.5
    r.enforce_eager, r.max_num_batched_tokens, r.max_model_len = True, 16, 64
    plan = mp.engine_plan(cfg, TOY)
    weights = PARAMS * 2
    # 16 batched tokens x (4*8 + q 8 + kv 2*4 + 3 x MLP 16) x 2 bytes, and the sampler's logits
    act = 16 * (32 + 8 + 8 + 48) * 2 + 2 * 256 * 32 * 4
    kv = mp.GiB - weights - mp.GiB / 2 - act  # budget 1 GiB, runtime 0.5 GiB (eager)
    assert {t.name: round(t.gib * mp.GiB) for t in plan.terms} == {
        "weights": weights, "runtime + activations": round(mp.GiB / 2 + act), "KV cache": kv}
    per_token = 2 * 2 * 1 * 4 * 2  # K and V, 2 layers, 1 kv head of 4, bf16
    assert f"holds {int(kv // per_token):,} tokens" in plan.extra[0]
    assert plan.peak == pytest.approx(1.0) and plan.refusal("engine") is None
    r.max_model_len = 10**8  # not one sequence fits: vLLM would refuse to start
    assert "fewer than one sequence of rollout.max_model_len" in mp.engine_plan(
        cfg, TOY).refusal("engine")


def test_auto_checkpointing() -> None:
    cfg = load_config(["conf=r1_zero", "learner.activation_checkpointing=auto"])
    shape = mp.model_shape(cfg.model.path)
    assert shape is not None and shape.name == "Qwen2.5-7B"
    assert mp.learner_plan(cfg, shape, "none").peak > cfg.learner.device_memory_gb
    assert mp.resolve_checkpointing(cfg, shape) == "full"
    cfg.learner.device_memory_gb = 10_000
    assert mp.resolve_checkpointing(cfg, shape) == "none"
    cfg.learner.activation_checkpointing = "full"
    assert mp.resolve_checkpointing(cfg, shape) == "full"  # explicit wins


def test_make_learner_group_resolves_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """The learner actors only ever see none or full."""
    from rlsys import build

    seen = []
    monkeypatch.setattr(build, "LearnerGroup", lambda path, lc, *a, **k: seen.append(lc))
    model = tmp_path / "Qwen2.5-7B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
        "vocab_size": 152064, "tie_word_embeddings": False}))
    cfg = load_config(["conf=tiny", "learner.max_tokens_per_microbatch=65536"])
    for memory, expected in ((80.0, "full"), (100_000.0, "none")):
        cfg.learner.device_memory_gb = memory
        build.make_learner_group(cfg, str(model), cfg.algorithm, temperature=1.0,
                                 max_response_len=8)
        assert seen[-1].activation_checkpointing == expected
    assert cfg.learner.activation_checkpointing == "auto"  # the run's config is left as is


def test_model_shape_sources(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 2, "intermediate_size": 128, "vocab_size": 100,
        "head_dim": 48}))
    shape = mp.model_shape(str(tmp_path))
    assert (shape.kv_heads, shape.dim, shape.tied, shape.attention_bias) == (2, 48, False, False)
    assert shape.source.endswith("config.json")
    assert mp.model_shape("/models/Qwen2.5-1.5B-Instruct").hidden == 1536
    assert mp.model_shape("smollm2-135m-instruct:drop=10-19").layers == 20
    assert mp.model_shape("/models/unknown-model") is None


def test_print_config_r1_plans_pass(capsys: pytest.CaptureFixture) -> None:
    for conf in ("r1_zero", "r1"):
        assert main([f"conf={conf}", "trainer.output_dir=/tmp/x", "--print-config"]) == 0
        out = capsys.readouterr().out
        plan = out.split("# memory plan per GPU (GiB):\n")[1]
        assert "Qwen2.5-7B" in plan and "activation checkpointing full" in plan
        assert "activations, full checkpointing" in plan and "logits / log-probs" in plan
        assert "KV cache holds" in plan and "sequences of rollout.max_model_len=34,816" in plan
        assert plan.count(": fits") == 2


def test_print_config_refuses_with_one_line(capsys: pytest.CaptureFixture) -> None:
    args = ["conf=r1_zero", "learner.activation_checkpointing=none", "learner.tp=1",
            "learner.dp=1", "learner.max_tokens_per_microbatch=65536"]
    assert main([*args, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: memory plan: the learner needs ")
    assert "over learner.device_memory_gb=80; its biggest term is activations, no " \
           "checkpointing" in line
    assert "set learner.activation_checkpointing=full" in line


def test_real_run_refused_before_any_actor(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture, tmp_path: Path
                                           ) -> None:
    import rlsys.pipeline
    import rlsys.trainer

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(rlsys.trainer, "train", started)
    monkeypatch.setattr(rlsys.pipeline, "run_pipeline", started)
    for conf in ("r1_zero", "r1"):
        args = [f"conf={conf}", f"trainer.output_dir={tmp_path}", "learner.tp=1", "learner.dp=1",
                "learner.activation_checkpointing=none"]
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: memory plan: the learner needs ")


def test_cpu_plans_are_printed_not_enforced(capsys: pytest.CaptureFixture) -> None:
    args = ["conf=tiny", "learner.device_memory_gb=0.001", "--print-config"]
    assert main(args) == 0
    assert "(CPU: no device memory limit, not enforced)" in capsys.readouterr().out
    assert main(["conf=tiny", "model.path=/models/unknown", "--print-config"]) == 0
    assert "is not a model folder here nor a known architecture" in capsys.readouterr().out


def test_estimate_matches_measured_peaks(tmp_path: Path) -> None:
    """benchmarks/memory_plan.py on the tiny model: the real learner's update measured with
    the CPU allocator's events, with and without checkpointing, at (tp, dp) = (1, 1) and
    (2, 2) (vocabulary-parallel log-softmax, FSDP's units); the plan within +-25%."""
    out = tmp_path / "memory_plan.json"
    cmd = [sys.executable, "-m", "benchmarks.memory_plan", "--quick", "--budgets", "2048",
           "--parallel", "2x2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tp"], r["dp"], r["checkpointing"]) for r in rows] == [
        (1, 1, "none"), (1, 1, "full"), (2, 2, "none"), (2, 2, "full")]
    for r in rows:
        assert r["micro_batches"] == 2
        assert abs(r["ratio_transient"] - 1) <= 0.25, r
        assert abs(r["ratio_peak"] - 1) <= 0.25, r
    # Checkpointing saves memory, and the plan says how much.
    assert rows[1]["measured_transient_gib"] < 0.7 * rows[0]["measured_transient_gib"]


@pytest.mark.parametrize("option", ["learner.sync_mode=delta", "learner.stage_weights=true"])
def test_delta_sync_and_staging_plan_a_wire_copy_of_the_model_on_rank_0(option: str) -> None:
    full = load_config(["conf=r1_zero"])
    kept = load_config(["conf=r1_zero", option])
    shape = mp.model_shape(full.model.path)
    extra = mp.memory_plan(kept, shape).learner.peak - mp.memory_plan(full, shape).learner.peak
    assert extra == pytest.approx(shape.params() * 2 / 2**30, rel=0.01)  # bf16 on the wire
