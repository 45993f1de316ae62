"""The run's control point: a tiny named Ray actor through which a live run is rescaled.

The trainer owns the rollout engines and may change them only between steps (a change re-forms
the weight-sync group, which must not happen during a broadcast), while the user's command
(`python -m rlsys.scale`) runs in another process, possibly on another machine. A named actor
in the run's Ray namespace joins the two: any driver of the cluster can find it by name, it
costs no CPU (`num_cpus=0`), and it is owned by the trainer's driver, so it dies with the run
and frees its name for the next one. The trainer reads the wish once per step and reports what
it has, so the command can show both.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlsys.config import ConfigError

CONTROLLER_NAME = "controller"


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of rollout workers must be an integer >= 1, got {n!r}")


class RunController:
    """Holds the wanted number of rollout engines and the trainer's last report."""

    def __init__(self, rollout_workers: int) -> None:
        _check_count(rollout_workers)
        self._desired = rollout_workers
        self._state: dict[str, Any] = {"rollout_workers": rollout_workers,
                                       "pending_rollout_workers": 0}

    def request_rollout_workers(self, n: int) -> dict[str, Any]:
        """Ask for `n` engines from the next step on; returns the state with the new wish."""
        _check_count(n)
        self._desired = n
        return self.state()

    def desired_rollout_workers(self) -> int:
        return self._desired

    def report(self, state: dict[str, Any]) -> None:
        """The trainer's view: engines serving, engines starting, weight version, step."""
        self._state = dict(state)

    def state(self) -> dict[str, Any]:
        return {**self._state, "desired_rollout_workers": self._desired}


def start_controller(rollout_workers: int) -> Any:
    """Create this run's controller in the current Ray namespace; refuses a second live run.

    Two runs in one namespace would share the name, and `rlsys.scale` could not tell which run
    it talks to, so the second run stops here, before it starts any actor.
    """
    namespace = ray.get_runtime_context().namespace
    clash = ConfigError(
        f"ray.namespace={namespace}: another run is live in this Ray namespace (it holds the "
        f"actor {CONTROLLER_NAME!r} that python -m rlsys.scale talks to); give this run a "
        f"namespace of its own, e.g. ray.namespace={namespace}-2, or stop the other run")
    try:
        ray.get_actor(CONTROLLER_NAME)
    except ValueError:
        pass
    else:
        raise clash
    # On the driver's node: the run ends with that node anyway, and an actor placed on a
    # rollout node would take the run down when that node is lost.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    try:
        handle = ray.remote(RunController).options(
            name=CONTROLLER_NAME, num_cpus=0, scheduling_strategy=here).remote(rollout_workers)
    except ValueError:  # the other run took the name between the check and now
        raise clash from None
    ray.get(handle.__ray_ready__.remote())
    return handle


def stop_controller(handle: Any, timeout_s: float = 10.0) -> None:
    """Kill the controller and wait until its name is free (Ray frees it asynchronously), so
    that a next run in the same driver (pipeline stages, tests) can take it at once."""
    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(CONTROLLER_NAME)
        except ValueError:
            return
        time.sleep(0.05)


def find_controller(namespace: str | None = None) -> Any:
    """The live run's controller in `namespace` (None: the caller's own namespace)."""
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        where = (f"Ray namespace {namespace!r}" if namespace is not None
                 else "this driver's Ray namespace")
        raise LookupError(f"no live rlsys run in {where} (no actor {CONTROLLER_NAME!r}); is "
                          "the run started, and with this ray.namespace?") from None


def request_rollout_workers(n: int, namespace: str | None = None) -> dict[str, Any]:
    """Ask the live run in `namespace` for `n` rollout engines; returns its state.

    The trainer applies it at the start of its next step. Raises ValueError for n < 1 and
    LookupError when no run is live there.
    """
    _check_count(n)
    return ray.get(find_controller(namespace).request_rollout_workers.remote(n))
