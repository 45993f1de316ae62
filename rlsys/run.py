"""Entry point: `python -m rlsys.run conf=NAME [key.sub=value ...] [--print-config]`.

Loads and validates the config (one-line errors, exit code 2), checks the per-GPU memory plan
(rlsys.memory_plan: a learner or engine that cannot fit its GPU is refused with one line naming
the biggest term, exit code 2, before any actor starts), then hands it to the trainer.
Works the same under `ray job submit -- python -m rlsys.run conf=r1` (joins $RAY_ADDRESS) and
on one machine (starts a local Ray).
"""

from __future__ import annotations

import sys
import time

from rlsys.config import Config, ConfigError, load_config, to_yaml
from rlsys.memory_plan import check_memory, plan_for, resource_plan, unknown_shape_line

# What `python -m rlsys.run` runs without conf=: the CPU demo.
DEFAULT_CONF = "smol"

USAGE = f"""usage: python -m rlsys.run [conf=NAME] [key.sub=value ...] [--print-config]

  conf=NAME        load conf/NAME.yaml (see conf/ for the list; default: {DEFAULT_CONF})
  key.sub=value    override any option, e.g. trainer.steps=10 rollout.group_size=8
  --print-config   print the resolved config, its resource plan and per-GPU memory plan,
                   and exit (status 2 when the memory plan does not fit)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    print_only = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    unknown_flags = [a for a in args if a.startswith("-")]
    if unknown_flags:
        print(f"error: unknown option {unknown_flags[0]}\n{USAGE}", file=sys.stderr)
        return 2
    if not any(a.startswith("conf=") for a in args):
        args.insert(0, f"conf={DEFAULT_CONF}")
    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.trainer.output_dir is None:
        name = next(a.split("=", 1)[1] for a in args if a.startswith("conf="))
        cfg.trainer.output_dir = f"outputs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if print_only:
        print(to_yaml(cfg), end="")
        print("# resource plan (Ray reservations):")
        print("\n".join(f"#   {line}" for line in resource_plan(cfg)))
        plan = plan_for(cfg)
        print("# memory plan per GPU (GiB):")
        print("\n".join(f"#   {line}" for line in (
            plan.lines() if plan is not None else [unknown_shape_line(cfg)])))
        refusal = plan.refusal() if plan is not None else None
        if refusal is not None:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        return 0
    try:
        check_memory_plans(cfg, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from rlsys.data import DataError
    from rlsys.models import ModelError
    from rlsys.pipeline import run_pipeline
    from rlsys.trainer import RunStopped, train

    try:
        if cfg.pipeline.stages:
            run_pipeline(cfg, args)
        else:
            train(cfg)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # train() has already stopped every actor (and the local Ray cluster it started).
        where = (f"rerun it with trainer.output_dir={cfg.trainer.output_dir} to resume"
                 if cfg.pipeline.stages else
                 f"metrics so far are in {cfg.trainer.output_dir}/metrics.jsonl")
        print(f"interrupted: actors stopped; {where}", file=sys.stderr)
        return 130
    return 0


def check_memory_plans(cfg: Config, args: list[str]) -> None:
    """The memory plan of the run, and of each pipeline stage (its overrides may change the
    learner or the model); raises ConfigError for the first that does not fit."""
    check_memory(cfg)
    if cfg.pipeline.stages:
        from rlsys.pipeline.runner import stage_configs

        for stage, scfg in zip(cfg.pipeline.stages, stage_configs(cfg, args), strict=True):
            try:
                check_memory(scfg)
            except ConfigError as exc:
                raise ConfigError(f"pipeline stage {stage.name}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
