"""Logit-level distillation (`distill.loss=kd`): the student matches a frozen teacher's
next-token distribution at every response token.

* Parallel parity: one KD update at (tp, dp) = (2, 2) equals the (1, 1) update (loss, KL,
  gradient norm, updated weights; fp32), with the teacher sharded like the student: its
  vocabulary shards line up with the student's and the KL is reduced across them.
* Bad input: a teacher with another tokenizer, or `stage:NAME` of a stage that makes no model
  or has not run, is one line naming it.
(tests/test_learner.py checks the update against a plain forward pass; tests/test_pipeline.py
runs a KD stage end to end.)
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch

from learners.group import shard_for_data_parallel
from rlsys.config import ConfigError, load_config

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34], [41, 42]]
RESPONSES = [[101, 102, 103, 104, 105, 106], [110, 111], [201, 202, 203], [210],
             [301, 302, 303, 304, 305], [310, 311, 312], [401, 402], [410, 411, 412, 413]]
BATCH_PROMPTS = [PROMPTS[i // 2] for i in range(len(RESPONSES))]
TIMEOUT_S = 120


def _worker(rank: int, tp: int, dp: int, port: int, student: str, teacher: str,
            out_dir: str) -> None:
    out = Path(out_dir)
    try:
        import torch.distributed as dist

        from learners import parallel
        from learners.learner import Learner
        from rlsys.config import AlgorithmConfig, LearnerConfig

        lc = LearnerConfig(compute_dtype="float32", num_threads=1, tp=tp, dp=dp,
                           max_tokens_per_microbatch=16)
        learner = Learner(student, lc, AlgorithmConfig(kl_coef=0.0), max_response_len=8,
                          seed=0, rank=rank, master_port=port, teacher_path=teacher)
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=0.5)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
        index = shard_for_data_parallel(BATCH_PROMPTS, RESPONSES, dp)[rank // tp]
        metrics = learner.sft_step({"prompt_ids": [BATCH_PROMPTS[i] for i in index],
                                    "response_ids": [RESPONSES[i] for i in index]})
        weights = {n: t.detach().clone() for n, t in parallel.full_tensors(learner.model)}
        dist.barrier()
        dist.destroy_process_group()
        torch.save({"metrics": metrics, "weights": weights if rank == 0 else None},
                   out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_kd(tp: int, dp: int, student: str, teacher: str, out_dir: Path) -> tuple[dict, dict]:
    """One KD update in tp * dp spawned ranks: (the batch's metrics, the updated weights)."""
    from learners.learner import combine_rank_metrics
    from rlsys.weight_sync import find_free_port

    out_dir.mkdir(parents=True)
    ctx, port = multiprocessing.get_context("spawn"), find_free_port()
    with pytest.MonkeyPatch.context() as env:  # inherited by the spawned children
        env.setenv("OMP_NUM_THREADS", "1")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, tp, dp, port, student, teacher, str(out_dir)))
                 for r in range(tp * dp)]
        for p in procs:
            p.start()
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline \
            and not any(p.exitcode not in (None, 0) for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)
    errors = [f.read_text() for f in sorted(out_dir.glob("rank*.err"))]
    assert all(p.exitcode == 0 for p in procs), f"(tp={tp}, dp={dp}) failed:\n{errors}"
    parts = [torch.load(out_dir / f"rank{d * tp}.pt", weights_only=False) for d in range(dp)]
    return combine_rank_metrics([p["metrics"] for p in parts]), parts[0]["weights"]


@pytest.mark.timeout(300)
def test_kd_update_is_the_same_at_tp2_dp2(cache_dir, tmp_path):
    from rlsys.models import build_tiny_model, resolve_model

    student = str(resolve_model("tiny-random", cache_dir))
    teacher = str(build_tiny_model(tmp_path / "teacher", seed=1))
    ref_metrics, ref_weights = run_kd(1, 1, student, teacher, tmp_path / "tp1dp1")
    metrics, weights = run_kd(2, 2, student, teacher, tmp_path / "tp2dp2")
    assert ref_metrics["kd"] > 0.01  # two random models: the KL is far from 0
    for key in ("loss", "kd", "nll", "grad_norm", "tokens"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)


def test_kd_needs_a_teacher():
    with pytest.raises(ConfigError, match=r"distill\.teacher.*needs a teacher"):
        load_config(["conf=tiny", "distill.loss=kd"])
    with pytest.raises(ConfigError, match=r"distill\.loss"):
        load_config(["conf=tiny", "distill.loss=logits"])


def test_a_teacher_with_another_tokenizer_is_refused(cache_dir, tmp_path):
    from rlsys.models import build_tiny_model, resolve_model
    from rlsys.pipeline.stages import check_same_vocabulary

    student = str(resolve_model("tiny-random", cache_dir))
    check_same_vocabulary(student, str(build_tiny_model(tmp_path / "same", seed=3)))
    other = str(build_tiny_model(tmp_path / "other", vocab_size=384))
    with pytest.raises(ConfigError, match=r"different tokenizers.*distill\.loss=sft"):
        check_same_vocabulary(student, other)


def test_a_teacher_stage_must_have_made_a_model(tmp_path):
    from rlsys.config import StageConfig
    from rlsys.pipeline.runner import resolve_teacher

    cfg = load_config(["conf=tiny", "distill.loss=kd", "distill.teacher=stage:samples"])
    stage = StageConfig(name="student", kind="sft")
    with pytest.raises(ConfigError, match="no earlier complete stage 'samples'"):
        resolve_teacher(stage, cfg, {})
    with pytest.raises(ConfigError, match="samples is a rejection_sampling stage"):
        resolve_teacher(stage, cfg, {"samples": ("rejection_sampling", Path("x"))})
    assert resolve_teacher(stage, cfg, {"samples": ("grpo", Path("x"))}) == "x/final"
    assert resolve_teacher(StageConfig(name="rl", kind="grpo"), cfg, {}) is None

    # No teacher named: the model that sampled the stage's data teaches.
    cfg = load_config(["conf=tiny", "distill.loss=kd", "sft.data=stage:samples"])
    samples = tmp_path / "03-samples"
    samples.mkdir()
    with pytest.raises(ConfigError, match="not a complete rejection-sampling stage"):
        resolve_teacher(stage, cfg, {"samples": ("rejection_sampling", samples)})
    (samples / "stage.json").write_text('{"model": "/models/teacher"}')
    assert resolve_teacher(stage, cfg, {"samples": ("rejection_sampling", samples)}
                           ) == "/models/teacher"
    with pytest.raises(ConfigError, match="not a complete rejection-sampling stage"):
        resolve_teacher(stage, cfg, {"samples": ("sft", samples)})
