"""Actor failures on real parts: processes really killed (ray.kill) mid-batch and mid-run."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from actors.rollout import RolloutPool, rollout_env_vars
from rlsys import checkpoint
from rlsys.config import load_config
from rlsys.models import resolve_model
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


def kill_for_sure(actor, timeout_s: float = 60) -> None:
    """ray.kill, then wait until the actor is dead: a call queued right after a kill may
    still be served, so one failing ping is the proof, not one sent once."""
    import ray

    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{actor} still answers {timeout_s} s after ray.kill")


def two_engine_run(out: Path, steps: int, *overrides: str):
    """The config of the fault runs: conf=tiny on two engines, every step the same work
    (dynamic sampling off), no evaluation or final save; `overrides` on top."""
    return load_config(["conf=tiny", f"trainer.output_dir={out}", "rollout.num_workers=2",
                        "algorithm.dynamic_sampling=false", f"trainer.steps={steps}",
                        "trainer.eval_size=0", "trainer.save_final=false", *overrides])


def whole_steps(out: Path, cfg) -> list[dict]:
    """The run's step records (step 0 left out), checked to hold every step of
    trainer.steps once, each trained on B groups of G samples: nothing lost, nothing twice."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, cfg.trainer.steps + 1))
    b, g = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    for r in steps:
        assert r["rollout/samples"] == b * g and r["groups/trained"] == b, r["step"]
    return steps


def run_actors() -> list[str]:
    import ray

    prefixes = ("learner-", "rollout-", "reward-")
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefixes)]


@pytest.mark.timeout(300)
def test_learner_rank_killed_without_restarts_stops_with_its_name_and_checkpoint(ray_cluster,
                                                                             tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["conf=tiny", f"trainer.output_dir={out}", "learner.dp=2",
                       "trainer.steps=8", "trainer.checkpoint_every=1", "trainer.eval_size=0",
                       "trainer.save_final=false", "trainer.max_learner_restarts=0"])
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


def tiny_pool(cache_dir: Path, engines: int) -> RolloutPool:
    cache_root = tempfile.mkdtemp(prefix="rlsys-faults-")
    return RolloutPool(str(resolve_model("tiny-random", cache_dir)), engines,
                       worker_kwargs={"dtype": "float32", "max_model_len": 256, "num_threads": 1},
                       num_cpus_per_worker=1, num_gpus_per_worker=0,
                       env_vars=rollout_env_vars(cache_root, kv_cache_gb=0.25, num_threads=1),
                       name_prefix=f"faults-{os.getpid()}-{engines}")


PROMPTS = [f"count {i} then {i + 1} and" for i in range(6)]
# Long enough (~seconds per chunk) that the kill lands before the chunk is done.
SAMPLING = {"temperature": 1.0, "max_tokens": 160}


@pytest.mark.timeout(300)
def test_chunk_of_an_engine_killed_mid_batch_runs_again_on_another(ray_cluster, cache_dir):
    """Per-request seeds make the re-run chunk's samples the ones the dead engine owed."""
    import ray

    pool = tiny_pool(cache_dir, 2)
    try:
        expected = pool.generate(PROMPTS, n=3, seed=11, **SAMPLING)
        chunks = pool.submit(PROMPTS, n=3, seed=11, **SAMPLING)
        victim = pool.info[1]["name"]
        ray.kill(chunks[1].worker, no_restart=True)
        samples, _ = pool.collect(chunks)
        assert [s["token_ids"] for s in samples] == [s["token_ids"] for s in expected]
        assert pool.lost == [victim] and len(pool.workers) == 1
        assert pool.reap() == [victim]  # the live engine answers; nothing else is lost
    finally:
        pool.shutdown()


@pytest.mark.timeout(300)
def test_last_engine_killed_mid_batch_is_replaced_through_recover(ray_cluster, cache_dir):
    import ray

    pool = tiny_pool(cache_dir, 1)
    try:
        expected = pool.generate(PROMPTS, n=2, seed=5, **SAMPLING)
        chunks = pool.submit(PROMPTS, n=2, seed=5, **SAMPLING)
        ray.kill(chunks[0].worker, no_restart=True)
        recovered = []

        def recover() -> None:  # what the trainer does, minus sending the current weights
            pool.add_workers(1)
            recovered.append(pool.take_ready(timeout=None))

        samples, _ = pool.collect(chunks, recover=recover)
        assert [s["token_ids"] for s in samples] == [s["token_ids"] for s in expected]
        assert len(recovered) == 1 and len(pool.workers) == 1
        assert pool.info[0]["name"].endswith("-1")  # a new engine, not the dead one
    finally:
        pool.shutdown()


@pytest.mark.timeout(400)
def test_engine_killed_mid_run_is_replaced_and_no_sample_is_lost(ray_cluster, tmp_path,
                                                                  monkeypatch):
    """rollout-1 is killed right after step 1: step 2 finishes on rollout-0 (its prompts run
    again there, or the engine is found dead before the broadcast), the weight-sync group is
    re-formed without it, and a replacement starts at step 3. The test holds step 5 until the
    replacement is up (a tiny step is shorter than an engine start), so it joins there."""
    import ray

    from rlsys.fleet import EngineFleet

    apply_scaling = EngineFleet.apply_scaling
    versions_after: dict[int, tuple[list[int], int]] = {}

    def apply_scaling_waiting_at_step_5(self: EngineFleet, step: int = 0) -> None:
        if step == 5:
            pings = [ping for _, ping in self.rollout.starting]
            ray.wait(pings, num_returns=len(pings), timeout=240)
        apply_scaling(self, step)
        if step == 5:  # asked only here: at steps 2-3 the pool may still list the killed engine
            versions_after[step] = (self.rollout.weight_versions(), self.version)

    monkeypatch.setattr(EngineFleet, "apply_scaling", apply_scaling_waiting_at_step_5)
    out = tmp_path / "run"
    cfg = two_engine_run(out, 8)
    killer = kill_after_step(out, 1, "rollout-1")
    train(cfg)
    killer.join()
    steps = whole_steps(out, cfg)
    # The kill lands in step 2 (or, on a loaded machine, step 3); the replacement joins at 5.
    engines = [r["rollout/engines"] for r in steps]
    assert engines in ([2, 1, 1, 1, 2, 2, 2, 2], [2, 2, 1, 1, 2, 2, 2, 2]), engines
    assert steps[-1]["rollout/engine_restarts"] == 1
    # The replacement serves the current weights from the step it joins.
    engine_versions, trainer_version = versions_after[5]
    assert engine_versions == [trainer_version] * 2 and trainer_version == 4
    assert steps[-1]["weight_version"] == 8  # every later broadcast reached both engines


@pytest.mark.timeout(300)
def test_engine_killed_while_joining_the_weight_sync_group_is_dropped_at_once(
        ray_cluster, tmp_path, monkeypatch):
    """rollout-1 dies as the first weight-sync group forms (as when a node is lost while its
    new engine joins). The others would wait for it in the rendezvous for 300 s; the fleet
    calls the join off instead, forms the group without it at once and trains on, and a
    replacement starts for the engine the run still wants. (A member that dies after checking
    in holds the others for weight_sync.MESH_TIMEOUT_S: see test_weight_sync.)"""

    from rlsys.fleet import EngineFleet

    init_weight_sync = RolloutPool.init_weight_sync
    joins: list[float] = []

    def init_weight_sync_losing_rollout_1(self: RolloutPool, *args, **kwargs) -> list:
        if not joins:  # the first group: rollout-1 dies as it is told to join
            kill_for_sure(self.workers[1])
        joins.append(time.monotonic())
        return init_weight_sync(self, *args, **kwargs)

    connect = EngineFleet.connect
    connect_seconds: list[float] = []

    def timed_connect(self: EngineFleet) -> None:
        t0 = time.monotonic()
        connect(self)
        connect_seconds.append(time.monotonic() - t0)

    monkeypatch.setattr(RolloutPool, "init_weight_sync", init_weight_sync_losing_rollout_1)
    monkeypatch.setattr(EngineFleet, "connect", timed_connect)
    out = tmp_path / "run"
    cfg = two_engine_run(out, 3)
    train(cfg)
    steps = whole_steps(out, cfg)
    assert connect_seconds[0] < 60, connect_seconds  # not the rendezvous' 300 s timeout
    assert len(joins) >= 2  # the first attempt was called off, the second formed the group
    assert steps[0]["rollout/engines"] == 1 and steps[-1]["rollout/engine_restarts"] == 1
    assert steps[-1]["weight_version"] == 3


@pytest.mark.timeout(400)
def test_engine_killed_during_a_weight_sync_is_dropped_and_the_others_get_it_whole(
        ray_cluster, tmp_path, monkeypatch):
    """rollout-1 dies as step 2's weights go out (a delta): the learner's send to it fails
    and rollout-0 may hold part of it. The group is re-formed without rollout-1 and rollout-0
    gets the whole of v2 again, in full; after every step each engine holds exactly the
    learner's weights, and the run trains on, back to deltas from step 3."""
    import ray

    from rlsys.fleet import EngineFleet

    update_weights = RolloutPool.update_weights
    calls: list[int] = []

    def update_weights_losing_rollout_1(self: RolloutPool, *args, **kwargs) -> list:
        calls.append(len(self.workers))
        if len(calls) == 2:  # step 2's sync: rollout-1 dies as it is told to receive
            kill_for_sure(self.workers[1])
        return update_weights(self, *args, **kwargs)

    publish = EngineFleet.publish
    mismatches: list[tuple[int, str, int]] = []

    def checked_publish(self: EngineFleet, in_flight: list) -> dict[str, float]:
        stats = publish(self, in_flight)
        want = self.learner.weight_digests(self.manifest)
        for engine, info in zip(self.rollout.workers, self.rollout.info, strict=True):
            got = ray.get(engine.weight_digests.remote())
            mismatches.extend((self.version, info["name"], i)
                              for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
        return stats

    monkeypatch.setattr(RolloutPool, "update_weights", update_weights_losing_rollout_1)
    monkeypatch.setattr(EngineFleet, "publish", checked_publish)
    out = tmp_path / "run"
    cfg = two_engine_run(out, 4, "learner.sync_mode=delta", "rollout.dtype=bfloat16")
    train(cfg)
    assert mismatches == []
    steps = whole_steps(out, cfg)
    assert calls[:3] == [2, 2, 1]  # step 2's sync was sent again to the one engine left
    assert [r["sync/delta"] for r in steps] == [0.0, 0.0, 1.0, 1.0]
    assert [r["rollout/engines"] for r in steps][:3] == [2, 1, 1]
    assert steps[-1]["rollout/engine_restarts"] == 1
    assert steps[-1]["weight_version"] == 4


@pytest.mark.timeout(400)
def test_engine_killed_as_the_group_is_re_formed_is_dropped(ray_cluster, tmp_path,
                                                             monkeypatch):
    """Two engines; at step 3 the run is asked for one (as `python -m rlsys.scale` would) and
    rollout-0 dies as the members leave the group. The fleet forgets it and keeps rollout-1,
    which is all the run asked for: nothing more is removed, and the run trains on."""
    from actors.controller import request_rollout_workers
    from rlsys.fleet import EngineFleet

    apply_scaling, close_weight_sync = EngineFleet.apply_scaling, RolloutPool.close_weight_sync
    closes: list[list[str]] = []

    def apply_scaling_asking_for_one_at_step_3(self: EngineFleet, step: int = 0) -> None:
        if step == 3:
            request_rollout_workers(1)
        apply_scaling(self, step)

    def close_weight_sync_losing_rollout_0(self: RolloutPool) -> list:
        closes.append([info["name"] for info in self.info])
        if len(closes) == 1:
            kill_for_sure(self.workers[0])
        return close_weight_sync(self)

    monkeypatch.setattr(EngineFleet, "apply_scaling", apply_scaling_asking_for_one_at_step_3)
    monkeypatch.setattr(RolloutPool, "close_weight_sync", close_weight_sync_losing_rollout_0)
    out = tmp_path / "run"
    cfg = two_engine_run(out, 4)
    train(cfg)
    steps = whole_steps(out, cfg)
    assert closes[0] == ["rollout-0", "rollout-1"]
    assert [r["rollout/engines"] for r in steps] == [2, 2, 1, 1]
    assert steps[-1]["rollout/engine_restarts"] == 1
    assert steps[-1]["weight_version"] == 4


@pytest.mark.timeout(400)
def test_engine_killed_mid_stream_loses_no_group(ray_cluster, tmp_path):
    """rollout.inflight with two engines: rollout-1 is killed after step 1 while the engines
    generate continuously. Whatever it held starts again on rollout-0, every step still trains
    B whole groups, the weight-sync group is re-formed without it and the run ends normally."""
    out = tmp_path / "run"
    cfg = two_engine_run(out, 5, "rollout.inflight=true", "rollout.max_staleness=2")
    killer = kill_after_step(out, 1, "rollout-1")
    train(cfg)
    killer.join()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 6))
    b, g = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    for r in steps:
        assert r["groups/trained"] == b and r["rollout/samples"] >= b * g, r["step"]
    assert steps[-1]["rollout/engine_restarts"] == 1
    assert min(r["rollout/engines"] for r in steps) == 1
    assert steps[-1]["weight_version"] == 5


@pytest.mark.timeout(600)
def test_chaos_run_kills_an_engine_or_reward_worker_every_three_steps(ray_cluster, tmp_path,
                                                                      caplog):
    """A 12-step run with two engines and two reward workers; after steps 2, 5 and 8 one of
    them, picked at random among those alive, is killed (and logged). Every step still trains
    on B groups of G samples each, logged once, and the run ends normally."""
    import random

    import ray

    chaos = logging.getLogger("rlsys.chaos")
    out = tmp_path / "run"
    cfg = two_engine_run(out, 12, "reward.num_workers=2")
    killed: list[tuple[int, str]] = []

    def kill_every_three_steps() -> None:
        rng = random.Random(0)
        for step in (2, 5, 8):
            deadline = time.monotonic() + 240
            while step not in logged_steps(out) and time.monotonic() < deadline:
                time.sleep(0.2)
            alive = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["name"].startswith(("rollout-", "reward-")))
            victim = rng.choice(alive)
            ray.kill(ray.get_actor(victim), no_restart=True)
            killed.append((step, victim))
            chaos.warning("chaos: killed %s after step %d (alive were %s)", victim, step, alive)

    killer = threading.Thread(target=kill_every_three_steps, daemon=True)
    killer.start()
    train(cfg)
    killer.join()
    assert [step for step, _ in killed] == [2, 5, 8]
    assert sum("chaos: killed" in m for m in caplog.messages) == 3
    steps = whole_steps(out, cfg)
    # A killed engine was either serving (dropped from the group and replaced) or starting as
    # a replacement (started again).
    engines_killed = sum(name.startswith("rollout-") for _, name in killed)
    last = steps[-1]
    assert last["rollout/engine_restarts"] + last["rollout/engine_start_failures"] \
        == engines_killed
    assert last["reward_pool/restarts"] == len(killed) - engines_killed
    assert last["weight_version"] == 12
