"""The rollout engines as a group: their weight-sync group with the learner, the weight version
they serve, scaling (`python -m rlsys.scale`) and the replacement of engines that die.

The weight-sync group is learner rank 0 plus every engine worker, over NCCL on GPUs and gloo
on CPU. It has a fixed world size, so any change of the engines re-forms it: every member
leaves, all join a new group on a fresh port, and the current weights go to every engine
before it gets a prompt.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from actors.rollout import EnginesLost
from learners.group import LearnerFailed
from rlsys import weight_sync
from rlsys.build import make_rollout_pool
from rlsys.precision import engine_dtype
from rlsys.ray_errors import ACTOR_LOST

if TYPE_CHECKING:
    from pathlib import Path

    from learners.group import LearnerGroup
    from rlsys.config import Config

log = logging.getLogger("rlsys")

#: New engines that may fail to start in a row before the fleet stops replacing them.
MAX_START_FAILURES = 3
#: Weight syncs in a row that may lose an engine before the run gives up on its engines.
MAX_SYNC_ATTEMPTS = 4


class EngineFleet:
    """The rollout pool, the version of the weights it serves, and its membership.

    `controller` is the run's named actor through which `python -m rlsys.scale` asks for a
    number of engines (actors/controller.py); the trainer starts it before any other actor.
    """

    def __init__(self, cfg: Config, model_path: str, scratch_dir: Path, learner: LearnerGroup,
                 controller: Any) -> None:
        self.cfg, self.learner, self.controller = cfg, learner, controller
        self.rollout = make_rollout_pool(cfg, model_path, scratch_dir)
        self.version = 0
        self.engine_restarts = 0  # engines lost (and replaced) so far
        self.start_failures = 0  # engines that died while starting, in a row (then retried)
        self.failed_starts = 0  # ... and in all
        try:
            self.connect()
        except BaseException:
            self.rollout.shutdown()
            raise

    def connect(self) -> None:
        """Every engine worker and learner rank 0 join a new weight-sync group. An engine that
        dies while joining is dropped and the others join again without it (the run still wants
        as many engines: `apply_scaling` starts a replacement)."""
        while dead := self.join():
            self.rollout.forget(dead)
        if self.rollout.lost:
            self.count_lost_engines()
        self.manifest = self.learner.weight_manifest(engine_dtype(self.cfg.rollout))
        # What the engines of a new group hold is unknown to the learner's new sender (new or
        # replaced engines, scaling, resume): the next sync is full, deltas follow it.
        self.engines_hold_last_send = False

    def join(self) -> list[Any]:
        """One attempt at forming the group: the engines that died while joining (then the
        others were told to give up, see weight_sync.abort_weight_sync_join), or none.

        Waiting on every member at once would not do: the live ones wait in the rendezvous
        for a dead one until its timeout, minutes later (a node lost while its new engine
        joined). A learner rank 0 that died is a LearnerFailed, as in any learner call.
        """
        backend = "nccl" if self.cfg.learner.device == "cuda" else "gloo"
        addr, port = self.learner.host_weight_sync()
        engines = list(self.rollout.workers)
        names = [info["name"] for info in self.rollout.info]
        engine_refs = self.rollout.init_weight_sync(addr, port, backend)
        world = self.rollout.weight_sync_world_size  # learner rank 0 + every engine worker
        (learner_ref,) = self.learner.init_weight_sync(addr, port, world, backend)
        pending, dead = [learner_ref, *engine_refs], []
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready)
            except ACTOR_LOST as exc:
                if ready == learner_ref:  # its store is gone: the engines fail on their own
                    raise LearnerFailed(0, self.learner.names[0], exc) from None
                index = engine_refs.index(ready)
                if not dead:
                    reason = f"rollout engine {names[index]} died while joining"
                    weight_sync.abort_weight_sync_join(addr, port, reason)
                dead.append(engines[index])
            except Exception:
                # Once the join is called off every other member fails it: expected then
                # (WeightSyncJoinAborted; a tensor-parallel engine's executor may wrap it).
                if not dead:
                    raise
        return dead

    def count_lost_engines(self) -> None:
        """Account for the engines the pool found dead (`rollout.lost`) and clear the list."""
        lost, self.rollout.lost = self.rollout.lost, []
        self.engine_restarts += len(lost)
        log.warning("rollout engine(s) %s died; %d left, replacement(s) starting", lost,
                    len(self.rollout.workers))

    def reconnect(self, learner: LearnerGroup) -> None:
        """A new learner group (a learner restart): the engines leave the group whose rank 0
        is gone and join one with the new rank 0. An engine that was receiving from the dead
        rank has given up by then on gloo (its sockets close); on NCCL only when the group's
        timeout (weight_sync.init_weight_sync_group) aborts the receive."""
        ray.get(self.rollout.close_weight_sync())
        self.learner = learner
        self.connect()

    def close(self) -> None:
        """Every member leaves the weight-sync group at once (NCCL may tear down collectively).

        Engines run their calls in order, so this also waits for whatever they were given. An
        engine found dead here is forgotten (`rollout.lost`; `connect` counts it).
        """
        engines = list(self.rollout.workers)
        learner_refs = self.learner.close_weight_sync()
        engine_refs = self.rollout.close_weight_sync()
        self.learner.gather(learner_refs)
        dead = []
        for engine, ref in zip(engines, engine_refs, strict=True):
            try:
                ray.get(ref)
            except ACTOR_LOST:
                dead.append(engine)
        self.rollout.forget(dead)

    def publish(self, in_flight: list) -> dict[str, float]:
        """The learner's new weights, as the next version, to every engine; they confirm it.

        Batches sampled ahead (`in_flight`) finish first: the engines would take the update
        only after them anyway, and a broadcast left waiting that long could time out its
        process group.
        """
        t0 = time.perf_counter()
        ray.wait(in_flight, num_returns=len(in_flight), fetch_local=False)
        if self.rollout.reap():  # engines that died this step must leave the group first
            self.drop_lost_engines()
        self.version += 1
        return self.send_weights() | {"wait_s": time.perf_counter() - t0}

    def send_weights(self) -> dict[str, float]:
        """The learner's weights, as `version`, to every engine (after a resume too): only what
        changed with `learner.sync_mode=delta`, once every engine holds the last send.

        An engine that dies during the sync (killed, its node lost) is dropped: the others may
        hold part of this send, so the group is re-formed without it and they get all of it
        again, in full. If none is left, a new one is started first. (On gloo a send to a dead
        member fails at once; on NCCL only at the group's timeout, weight_sync's `timeout_s`.)

        Returns the learner's figures (bytes, changed_frac, convert_s, transfer_s, seconds)
        and the slowest engine's: load_s, and gen_blocked_s (the time it could not generate).
        """
        for _attempt in range(MAX_SYNC_ATTEMPTS):
            figures = self.try_send_weights()
            if figures is not None:
                return figures
            if not self.rollout.workers:
                self.start_an_engine()
            self.drop_lost_engines()
        raise EnginesLost(f"rollout engines died during {MAX_SYNC_ATTEMPTS} weight syncs "
                          "in a row")

    def try_send_weights(self) -> dict[str, float] | None:
        """One broadcast to the engines of the group: its figures (see `send_weights`), or
        None if an engine died during it (it is then forgotten, its name in `rollout.lost`)."""
        bucket = int(self.cfg.learner.sync_bucket_mb * 2**20)
        mode = "delta" if self.engines_hold_last_send else "full"
        engines = list(self.rollout.workers)
        if not engines:  # the last one died as the group was re-formed
            return None
        engine_refs = self.rollout.update_weights(self.manifest, bucket, self.version, mode)
        learner_refs = self.learner.broadcast_weights(self.manifest, bucket, mode)
        results: dict[ray.ObjectRef, Any] = {}
        dead, errors = [], []
        pending = [*learner_refs, *engine_refs]
        while pending:
            # Once the learner is done and failed or an engine died, the others may wait for
            # buckets that will never come: re-forming the group (or the run's end) frees them.
            if (dead or errors) and not set(learner_refs) & set(pending):
                break
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                results[ready] = ray.get(ready)
            except ACTOR_LOST as exc:
                if ready in learner_refs:  # then the engines' broken connections follow from it
                    rank = learner_refs.index(ready)
                    raise LearnerFailed(rank, self.learner.names[rank], exc) from None
                dead.append(engines[engine_refs.index(ready)])
            except Exception as exc:  # a connection broken by a dead member, or a real error
                errors.append(exc)
        if dead:
            lines = str(errors[0]).strip().splitlines() if errors else []
            log.warning("rollout engine(s) died during the weight sync of v%d (%s); sending it "
                        "again without them", self.version,
                        lines[-1][:300] if lines else "their calls failed")
            self.rollout.forget(dead)
            return None
        if errors:
            raise errors[0]
        stats = results[learner_refs[0]]
        engine_stats = [results[ref] for ref in engine_refs]
        self.check_versions([engine["version"] for engine in engine_stats])
        if self.cfg.learner.sync_mode == "delta" and not self.engines_hold_last_send:
            generic = [i for i, engine in enumerate(engine_stats) if not engine["direct"]]
            if generic:
                log.warning("learner.sync_mode=delta: engine(s) %s load through vLLM's generic "
                            "reload (see their log), so every sync stays full", generic)
            self.engines_hold_last_send = not generic
        return stats | {"load_s": max(e["load_s"] for e in engine_stats),
                        "gen_blocked_s": max(e["blocked_s"] for e in engine_stats),
                        "delta": float(mode == "delta")}

    def check_versions(self, versions: list[int]) -> None:
        if any(v != self.version for v in versions):
            raise RuntimeError(f"engines report weight versions {versions}, "
                               f"expected {self.version}")

    def drop_lost_engines(self) -> None:
        """Re-form the weight-sync group without the engines the pool found dead (their
        unfinished prompts already ran elsewhere, see RolloutPool.collect). The run still
        wants as many engines, so `apply_scaling` starts replacements, which receive the
        current weights before they take work."""
        self.close()
        self.connect()  # counts the lost engines

    def replace_all_engines(self) -> None:
        """RolloutPool.collect's `recover`: every engine died mid-step. Start one, wait for
        it, and give it the current weights, so the step's prompts can be sampled again."""
        self.start_an_engine()
        self.drop_lost_engines()
        self.send_weights()

    def start_an_engine(self) -> None:
        """Start an engine and wait for it to be up (it joins the group at the next connect)."""
        self.rollout.add_workers(1)
        ready, errors = self.rollout.take_ready(timeout=None)
        if not ready:
            raise EnginesLost(f"every rollout engine died and a new one failed to start: "
                              f"{errors[0] if errors else 'no engine'}")

    def apply_scaling(self, step: int = 0) -> None:
        """Bring the engines to the number asked for with `python -m rlsys.scale`.

        Runs between steps, when no weights are in flight. New engines start in the
        background: until one answers, training goes on with the engines there are (a Ray
        autoscaler may take minutes to add a node). Engines finish the calls they were given
        (rounds sampled ahead with rollout.max_staleness too) before leaving the group or being
        removed.
        """
        pool = self.rollout
        desired = ray.get(self.controller.desired_rollout_workers.remote())
        planned = len(pool.workers) + len(pool.starting)
        if desired > planned:
            log.info("scaling: starting %d rollout engine(s) for %d requested",
                     desired - planned, desired)
            pool.add_workers(desired - planned)
        elif desired < planned and pool.cancel_starting(planned - desired):
            log.info("scaling: stopped rollout engine(s) still starting, %d requested", desired)
        ready, errors = pool.take_ready()
        self.failed_starts += len(errors)
        self.start_failures = 0 if ready else self.start_failures + len(errors)
        if errors and self.start_failures <= MAX_START_FAILURES:
            # Killed while starting, or its node lost: the run still wants it.
            log.warning("scaling: %d new rollout engine(s) failed to start (%s); starting "
                        "again (%d of %d failures in a row)", len(errors), errors[0],
                        self.start_failures, MAX_START_FAILURES)
        elif errors:  # failing every time: a setting or the image, not bad luck
            log.error("scaling: %d new rollout engine(s) failed to start (not retried after %d "
                      "failures in a row; ask again with python -m rlsys.scale): %s",
                      len(errors), MAX_START_FAILURES, errors[0])
            self.controller.request_rollout_workers.remote(len(pool.workers)
                                                           + len(pool.starting))
        if ready or len(pool.workers) > desired:
            t0 = time.perf_counter()
            self.close()
            excess = len(pool.workers) - desired  # after close: an engine may have died in it
            removed = pool.remove_workers(excess) if excess > 0 else []
            self.connect()
            self.send_weights()  # each engine confirms the version it now serves
            log.info("scaling: %d rollout engine(s) from step %d (added %s, removed %s); "
                     "weights v%d sent in %.1fs", len(pool.workers), step,
                     [info["name"] for info in ready], removed, self.version,
                     time.perf_counter() - t0)
        self.controller.report.remote({"rollout_workers": len(pool.workers),
                                       "pending_rollout_workers": len(pool.starting),
                                       "weight_version": self.version, "step": step})

    def stats(self) -> dict[str, float]:
        return {"rollout/engines": len(self.rollout.workers),
                "rollout/engine_restarts": self.engine_restarts,
                "rollout/engine_start_failures": self.failed_starts,
                # Waiting for their actors to start (for capacity, under an autoscaler: a node).
                "rollout/engines_starting": len(self.rollout.starting),
                "weight_version": self.version}

    def shutdown(self) -> None:
        self.rollout.shutdown()
