"""Tasks: where training and evaluation problems come from.

A task hands out training problems from a seeded, stateful sampler and keeps a fixed held-out
split that never overlaps the training problems. The sampler position is a few plain integers so
a checkpoint can store it as JSON and a resumed run draws exactly the problems it would have
drawn without the interruption.

This module holds what every task shares: `Problem`, the `Task` base classes and the registry
(`TASKS`, `register_task`, `make_task`), the single list of task names. Each family
lives in a module of its own (arithmetic, files, reasoning_gym, mix, humaneval, champ, asdiv)
and registers itself there; importing `rlsys.data` registers them all.

Pure leaves: no Ray, no model, no tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A run's rlsys.config.Config, as the tasks' `from_config` builders read it. Typed loosely on
#: purpose: config validates task names against this package's registry (TASKS), so data does
#: not import config, not even for types (that would make the two leaves a circle).
RunConfig = Any


@dataclass(frozen=True)
class Problem:
    """One problem: the untemplated question and its gold answer.

    `answer` is a math answer, or a JSON object naming the verifier that checks it (see
    rlsys.rewards.verifiers). `task` names the task the problem came from: a mixed-task run
    looks up its reward weights and reports its accuracy by it. `meta` carries task-specific
    extras (e.g. other columns of a dataset row). The dataclass is frozen so problems can be
    shared freely, but `meta` is a dict, so problems are not hashable.
    """

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    task: str = ""


class DataError(ValueError):
    """Bad task configuration or data; the message names the config key, file and line/row."""


class Task(ABC):
    """A source of training problems (sampled, stateful) and a fixed held-out eval split."""

    name: str = ""
    _eval: list[Problem]

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Task:
        """This task as the run config sets it up: by default seeded by trainer.seed and
        holding out data.eval_size problems; families with settings of their own override it."""
        return cls(seed=cfg.trainer.seed, eval_size=cfg.data.eval_size)  # type: ignore[call-arg]

    @abstractmethod
    def sample(self, n: int) -> list[Problem]:
        """Draw the next `n` training problems; deterministic given the seed and the state."""

    def sample_distinct(self, n: int) -> list[Problem]:
        """The next `n` training problems with no question twice, for a pass over a set of
        prompts (rejection sampling) rather than a stream of them: `sample` draws with
        replacement where the task is a space of problems (1,536 arithmetic draws repeat
        ~400 questions). Fewer than `n` when the draws stop finding new questions (after
        10 x n + 100 draws): the task has fewer than `n` distinct training problems."""
        n = self._check_n(n)
        seen: set[str] = set()
        out: list[Problem] = []
        draws = 0
        while len(out) < n and draws < 10 * n + 100:
            batch = self.sample(n - len(out))
            draws += len(batch)
            for problem in batch:
                key = normalize_question(problem.question)
                if key not in seen:
                    seen.add(key)
                    out.append(problem)
        return out

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out split (a new list each call; problems are shared); it never
        contains a training problem."""
        return list(self._eval)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The sampler position as plain JSON-able values."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` so the next samples repeat exactly."""

    @staticmethod
    def _check_n(n: Any) -> int:
        """`sample`'s argument, checked."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"sample(n): n must be a non-negative int, got {n!r}")
        return n

    def _key(self, key: str) -> str:
        """The config key behind a constructor argument, for error messages."""
        return f"data.{key}"

    def _check_ints(self, **values: Any) -> None:
        """Reject the first of `values` that is not an int, naming its config key."""
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{self._key(key)}: must be an int, got {value!r}")

    def _check_state(self, state: Any, keys: tuple[str, ...]) -> None:
        """Reject a state dict from another task type or with missing/non-integer fields."""
        if not isinstance(state, dict):
            raise DataError(f"{self.name} task: state must be a dict, got {type(state).__name__}")
        if state.get("task") != self.name:
            raise DataError(f"{self.name} task: state dict belongs to task "
                            f"{state.get('task')!r}, not {self.name!r}")
        for key in keys:
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"{self.name} task: state dict field {key!r} must be a "
                                f"non-negative int, got {value!r}")


class IndexedTask(Task):
    """A task whose i-th training draw is a pure function of (seed, i): its state is i."""

    _next_index = 0

    def state_dict(self) -> dict[str, Any]:
        """Sampler position: the index of the next training draw."""
        return {"task": self.name, "next_index": self._next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output."""
        self._check_state(state, ("next_index",))
        self._next_index = state["next_index"]


def normalize_question(question: str) -> str:
    return " ".join(question.split())


def read_jsonl(path: Path, where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of each non-blank line of a .jsonl or .jsonl.gz file; an
    unreadable file or a line that is not JSON raises DataError naming `where`, file and line."""
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: {path}:{lineno}: invalid JSON ({err.msg})") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: cannot read {path}: {err}") from None


def package_data_path(task: str, package: str, relative: str, pin: str, reinstall: str) -> Path:
    """A data file inside an installed package (`package`, pip's `pin`), located without
    importing it; DataError saying how to install it (or `reinstall` it) when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{task} task: the `{pin.split('==')[0]}` package is not installed; "
                        f"install it with `pip install {pin}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{task} task: {path} not found; {reinstall}")
    return path


class ProblemListTask(Task):
    """Training problems from a fixed list, drawn in a seeded order reshuffled every epoch.

    Subclasses fill `self._train` and `self._eval` and call `_start_sampler(seed)`; the state
    is (epoch, position in that epoch's permutation), so a restored sampler repeats exactly.
    """

    def _hold_out(self, problems: list[Problem], eval_size: int, split_seed: int) -> None:
        """Hold out `eval_size` problems chosen by a shuffle seeded with `split_seed` (not the
        sampling seed, so runs with different seeds share an eval set); train on the rest.
        Both splits keep the file's order, so listings read in sequence."""
        order = list(range(len(problems)))
        random.Random(f"{self.name}-split|{split_seed}").shuffle(order)
        held_out = set(order[:eval_size])
        self._eval = [p for i, p in enumerate(problems) if i in held_out]
        self._train = [p for i, p in enumerate(problems) if i not in held_out]

    def _start_sampler(self, seed: int) -> None:
        self.seed = seed
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._train)))
        random.Random(f"{self.name}-train|{self.seed}|{epoch}").shuffle(order)
        return order

    def sample(self, n: int) -> list[Problem]:
        """Draw the next `n` training problems, reshuffling at each epoch boundary."""
        out = []
        for _ in range(self._check_n(n)):
            if self._position >= len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            out.append(self._train[self._order[self._position]])
            self._position += 1
        return out

    @property
    def num_train(self) -> int:
        """Number of training problems (after holding out the eval split)."""
        return len(self._train)

    def state_dict(self) -> dict[str, Any]:
        """Sampler position: epoch and offset into that epoch's permutation."""
        return {"task": self.name, "epoch": self._epoch, "position": self._position,
                "num_train": len(self._train)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output; the training problems must be the same."""
        self._check_state(state, ("epoch", "position", "num_train"))
        if state["num_train"] != len(self._train) or state["position"] > len(self._train):
            raise DataError(self._state_mismatch(state))
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._order = self._epoch_order(self._epoch)

    def _state_mismatch(self, state: dict[str, Any]) -> str:
        return (f"{self.name} task: state dict (num_train={state['num_train']}, position="
                f"{state['position']}) does not match this split's {len(self._train)} training "
                "problems; eval_size or the data changed")


class BenchmarkTask(ProblemListTask):
    """A published benchmark's fixed problems (CHAMP, ASDiv), for evaluation and, with what is
    left, training. Subclasses name the task and `load` its problems.

    Held-out split: `_hold_out`'s. An `eval_size` of at least the number of problems holds out
    all of them, which is how the benchmark is usually run, and then there is nothing to train
    on.
    """

    def __init__(self, seed: int = 0, eval_size: int = 100, split_seed: int = 0,
                 path: str | None = None) -> None:
        self._check_ints(eval_size=eval_size, seed=seed, split_seed=split_seed)
        if eval_size < 0:
            raise DataError(f"data.eval_size: must be >= 0, got {eval_size}")
        self._hold_out(self.load(path), eval_size, split_seed)
        self._start_sampler(seed)

    def load(self, path: str | None) -> list[Problem]:
        """The benchmark's problems, from `path` or the installed package's data file."""
        raise NotImplementedError

    def sample(self, n: int) -> list[Problem]:
        if n and not self._train:
            raise DataError(f"{self.name} task: data.eval_size={len(self._eval)} holds out every "
                            "problem, so none is left to train on; lower data.eval_size")
        return super().sample(n)


# ---------------------------------------------------------------------------------------------
# Registry: the one list of tasks. A family registers its class (`@register_task`); the class
# is built by name (`make_task`) or from the run config (`TASKS[name].from_config(cfg)`), and
# the config checks data.task and data.mix against the registry's names.


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to `make_task`'s registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name]}")
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name, e.g. `make_task("arithmetic", seed=1)`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ValueError(
            f"task {name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(params)}")
    required = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if required:
        raise ValueError(f"task {name!r} needs argument(s) {required}")
    return cls(**kwargs)
