"""Rescale the rollout engines of a live run, independently of its learners.

    python -m rlsys.scale --rollout-workers 4                      # the run on this cluster
    python -m rlsys.scale --rollout-workers 1 --address 10.0.0.5:6379 --namespace rlsys-exp

The command only records the wish with the run's controller actor (actors/controller.py) and
returns; the trainer applies it at the start of its next step. New engines start in the
background (under a Ray autoscaler they wait for their node while training goes on) and
receive the current weights before their first prompt; removed engines finish what they were
given first. `--namespace` must match the run's `ray.namespace` (default: rlsys).
"""

from __future__ import annotations

import argparse
import os
import sys

from actors.controller import request_rollout_workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlsys.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollout-workers", type=int, required=True, metavar="N",
                        help="number of vLLM rollout engines wanted (>= 1)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster of the run; default: $RAY_ADDRESS, else 'auto'")
    parser.add_argument("--namespace", default="rlsys", help="the run's ray.namespace")
    args = parser.parse_args(argv)
    if args.rollout_workers < 1:  # checked before connecting: a typo should not wait on Ray
        parser.error(f"--rollout-workers must be >= 1, got {args.rollout_workers}")

    import ray

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, namespace=args.namespace, logging_level="ERROR",
                     log_to_driver=False)
        except ConnectionError as exc:
            print(f"error: no Ray cluster at {address}: {exc}", file=sys.stderr)
            return 1
    try:
        state = request_rollout_workers(args.rollout_workers, namespace=args.namespace)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    step = state.get("step")
    print(f"rollout engines: {state['rollout_workers']} serving, "
          f"{state['pending_rollout_workers']} starting, "
          f"{state['desired_rollout_workers']} requested (applied at the start of the next "
          f"step{'' if step is None else f'; run at step {step}'}, weights "
          f"v{state.get('weight_version', 0)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
