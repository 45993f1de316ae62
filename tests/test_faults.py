"""Actor failures during a real tiny run: processes really killed (ray.kill) mid-run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from rlsys import checkpoint
from rlsys.config import load_config
from rlsys.trainer import RunStopped, train


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def kill_after_step(out: Path, step: int, actor: str, timeout_s: float = 240) -> threading.Thread:
    """A thread that kills the named actor once `step` is in the run's metrics."""
    import ray

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while step not in logged_steps(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        ray.kill(ray.get_actor(actor), no_restart=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_actors() -> list[str]:
    import ray

    prefixes = ("learner-", "rollout-", "reward-")
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefixes)]


@pytest.mark.timeout(300)
def test_learner_rank_killed_mid_run_stops_with_its_name_and_the_checkpoint(ray_cluster,
                                                                             tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", "learner.dp=2",
                       "trainer.steps=8", "trainer.checkpoint_every=1", "trainer.eval_size=0",
                       "trainer.save_final=false"])
    killer = kill_after_step(out, 2, "learner-dp1-tp0")
    with pytest.raises(RunStopped) as info:
        train(cfg)
    killer.join()
    message = str(info.value)
    assert message.startswith("learner rank 1 (learner-dp1-tp0) died"), message
    # Killed after step 2 was logged: during step 3, or while step 2's checkpoint was being
    # written (then that one is incomplete and step 1's is the last).
    last = checkpoint.latest_checkpoint(out)
    assert last is not None and last.name in ("step_000001", "step_000002")
    assert f"the last complete checkpoint is {last};" in message
    assert "trainer.resume=auto" in message
    assert max(logged_steps(out)) < cfg.trainer.steps
    # Every actor of the run is gone (the live learner rank was blocked in a collective).
    deadline = time.monotonic() + 30
    while run_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_actors() == []
