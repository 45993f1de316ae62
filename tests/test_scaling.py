"""Rescaling the rollout engines of a live run (`python -m rlsys.scale`), on real parts: the
run's controller actor, vLLM engines, the learner and the re-formed gloo weight-sync group."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actors.controller import (
    request_rollout_workers,
    start_controller,
    stop_controller,
)
from rlsys import scale
from rlsys.config import ConfigError, load_config
from rlsys.fleet import EngineFleet
from rlsys.scheduler import RolloutScheduler
from rlsys.trainer import train


def test_scale_refuses_fewer_than_one_engine_before_connecting(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        scale.main(["--rollout-workers", "0"])
    assert exc.value.code == 2
    assert "--rollout-workers must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=">= 1"):
        request_rollout_workers(0)


def test_scale_without_a_live_run_says_so(ray_cluster, capsys) -> None:
    assert scale.main(["--rollout-workers", "2", "--namespace", "no-such-run"]) == 1
    err = capsys.readouterr().err
    assert "no live rlsys run in Ray namespace 'no-such-run'" in err


def test_a_second_run_in_the_same_namespace_is_refused(ray_cluster) -> None:
    controller = start_controller(1)
    try:
        with pytest.raises(ConfigError, match=r"ray\.namespace=.*another run is live"):
            start_controller(1)
    finally:
        stop_controller(controller)
    stop_controller(start_controller(1))  # the name is free again once the run is gone


@pytest.mark.timeout(120)
def test_scale_command_reaches_the_run_from_another_process(ray_cluster) -> None:
    """The real command line: a new process joins the cluster and the run's namespace."""
    import ray

    controller = start_controller(1)
    try:
        context = ray.get_runtime_context()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(
            [sys.executable, "-m", "rlsys.scale", "--rollout-workers", "3",
             "--address", context.gcs_address, "--namespace", context.namespace],
            capture_output=True, text=True, timeout=100, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "1 serving, 0 starting, 3 requested" in done.stdout
        assert ray.get(controller.desired_rollout_workers.remote()) == 3
    finally:
        stop_controller(controller)


def _records(path: Path) -> list[dict]:
    """Complete lines only: the trainer may be writing the next one."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.timeout(420)
def test_rollout_engines_grow_and_shrink_mid_run(ray_cluster, tmp_path, monkeypatch,
                                                 capsys) -> None:
    """1 -> 2 -> 1 engines between steps of a 6-step run: every step is trained once, on every
    sample it drew, and the added engine samples with the current weights."""
    import ray

    out = tmp_path / "run"
    steps = 6
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", f"trainer.steps={steps}",
                       "trainer.eval_size=0"])
    g = cfg.rollout.group_size

    # The run is paused at the start of steps 2 and 4 until the test has asked for its change,
    # so the changes land at known steps however fast the steps are.
    gates = {2: threading.Event(), 4: threading.Event()}
    starting_after_request: dict[int, int] = {}
    versions_after: dict[int, tuple[list[int], int]] = {}
    sample_counts: list[tuple[int, int]] = []
    apply_scaling, score = EngineFleet.apply_scaling, RolloutScheduler.score

    def gated_apply_scaling(self: EngineFleet, step: int = 0) -> None:
        if step in gates:
            assert gates[step].wait(timeout=180)
        apply_scaling(self, step)
        if self.rollout.starting:
            # apply_scaling returned with the engine still starting (training would go on);
            # wait for it here so that the test knows at which step it joins.
            starting_after_request[step] = len(self.rollout.starting)
            pings = [ping for _, ping in self.rollout.starting]
            ray.wait(pings, num_returns=len(pings), timeout=240)
            apply_scaling(self, step)
        versions_after[step] = (self.rollout.weight_versions(), self.version)

    def counting_score(self: RolloutScheduler, problems: list, samples: list[dict],
                       n: int) -> list:
        sample_counts.append((len(problems) * n, len(samples)))
        return score(self, problems, samples, n)

    monkeypatch.setattr(EngineFleet, "apply_scaling", gated_apply_scaling)
    monkeypatch.setattr(RolloutScheduler, "score", counting_score)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            train(cfg)
        except BaseException as exc:  # surfaced by the test thread
            errors.append(exc)
            for gate in gates.values():
                gate.set()

    thread = threading.Thread(target=run, name="trainer", daemon=True)
    t0 = time.monotonic()
    thread.start()

    def wait_for(condition, what: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if errors:
                raise errors[0]
            if any(condition(r) for r in _records(out / "metrics.jsonl")):
                return
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}")

    wait_for(lambda r: r["step"] == 1, "step 1")
    # What `python -m rlsys.scale --rollout-workers 2` does, in the run's namespace (the test
    # driver's own: the run joined the session's Ray).
    namespace = ray.get_runtime_context().namespace
    assert scale.main(["--rollout-workers", "2", "--namespace", namespace]) == 0
    assert "2 requested" in capsys.readouterr().out
    gates[2].set()
    wait_for(lambda r: r.get("rollout/engines") == 2, "a step on 2 engines")
    assert request_rollout_workers(1)["desired_rollout_workers"] == 1
    gates[4].set()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish"
    if errors:
        raise errors[0]
    print(f"scaling run: {time.monotonic() - t0:.0f} s")

    records = _records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(steps + 1))  # each step logged once
    trained = records[1:]
    engines = [r["rollout/engines"] for r in trained]
    # Step 3 may start before the shrink request arrives; from step 4 on it is applied.
    assert engines in ([1, 2, 2, 1, 1, 1], [1, 2, 1, 1, 1, 1]), engines
    assert starting_after_request == {2: 1}  # the request did not block the step
    # The added engine was sent the current weights before it took any prompt.
    current, version = versions_after[2]
    assert current == [version, version] and version >= 1
    for r in trained:
        # Nothing lost or duplicated: G completions of every prompt drawn in the step.
        assert r["rollout/samples"] == r["rollout/prompts"] * g, r
        assert 1 <= r["groups/trained"] <= cfg.rollout.prompts_per_step
        # fp32 on both sides: whichever engine sampled, it held the learner's weights.
        assert math.isfinite(r["train/loss"]) and r["train/logprob_gap"] < 1e-3, r
    assert all(expected == got for expected, got in sample_counts), sample_counts
    assert (out / "final" / "config.json").is_file()
    with pytest.raises(LookupError):  # the run's controller went with it
        request_rollout_workers(1)
