"""`python -m rlsys.eval model=PATH task=NAME [k=N] [key.sub=value ...]`: evaluate a model.

On the task's held-out split, with the training stack's own parts: vLLM engines
(RolloutPool), reward actors (RewardPool) with the configured reward weights, the same prompt
rendering and overlong-prompt filter as training, on a local Ray cluster or $RAY_ADDRESS. The
figures are the evaluator's (rlsys.eval.evaluator), the same a training run logs for the same
model, seed and problems. Writes summary.json and a printed table, and one line per problem
in problems.jsonl.
"""

from __future__ import annotations

import sys

from rlsys.config import ConfigError, load_config

DEFAULT_CONF = "smol"

#: Short names on the command line and the config keys they set.
SHORTHANDS = {"model": "model.path", "task": "data.task", "k": "eval.k",
              "out": "eval.output_dir"}

USAGE = f"""usage: python -m rlsys.eval [conf=NAME] model=PATH task=NAME [k=N] [key.sub=value ...]

  model=PATH      a local Hugging Face folder or a built-in name (model.path)
  task=NAME       the task whose held-out split is evaluated (data.task)
  k=N             samples per problem for pass@1, pass@k and cons@k (eval.k)
  out=DIR         where problems.jsonl and summary.json go (eval.output_dir)
  conf=NAME       load conf/NAME.yaml first (default: {DEFAULT_CONF}); its prompt and length
                  settings apply, so evaluate with the config the model was trained with
  key.sub=value   any other option, e.g. eval.size=50 eval.temperature=1.0 data.eval_size=200
"""


def expand_shorthands(args: list[str]) -> list[str]:
    """`model=X` -> `model.path=X` etc.; every other argument is passed on as it is.

    A `data.eval_size=N` without a `trainer.eval_size` also sets that to N: the training
    loop's evaluation size means nothing here, but must stay <= data.eval_size to validate.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{SHORTHANDS[key]}={value}" if sep and key in SHORTHANDS else arg)
    keys = {a.partition("=")[0].strip(): a.partition("=")[2] for a in out}
    if "data.eval_size" in keys and "trainer.eval_size" not in keys:
        out.append(f"trainer.eval_size={keys['data.eval_size']}")
    return out


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit code (0, 2 for bad input, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        print(f"error: unknown option {flags[0]}\n{USAGE}", file=sys.stderr)
        return 2
    args = expand_shorthands(argv)
    if not any(a.startswith("conf=") for a in args):
        args.insert(0, f"conf={DEFAULT_CONF}")

    from rlsys.data import DataError
    from rlsys.eval.evaluator import evaluate
    from rlsys.models import ModelError

    try:
        cfg = load_config(args)
        evaluate(cfg, command=argv)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: actors stopped; no results were written", file=sys.stderr)
        return 130
    return 0
