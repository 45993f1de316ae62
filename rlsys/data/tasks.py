"""Tasks: where training and evaluation problems come from.

A task hands out training problems from a seeded, stateful sampler and keeps a fixed held-out
split that never overlaps the training problems. The sampler position is a few plain integers so
a checkpoint can store it as JSON and a resumed run draws exactly the problems it would have
drawn without the interruption.

This module is a pure leaf: no Ray, no model, no tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import itertools
import json
import logging
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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

    @abstractmethod
    def sample(self, n: int) -> list[Problem]:
        """Draw the next `n` training problems; deterministic given the seed and the state."""

    @abstractmethod
    def eval_problems(self) -> list[Problem]:
        """The fixed held-out split; it never contains a training problem."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The sampler position as plain JSON-able values."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` so the next samples repeat exactly."""

    def _check_state(self, state: Any, keys: tuple[str, ...]) -> None:
        """Reject a state dict from another task type or with missing/non-integer fields."""
        if not isinstance(state, dict):
            raise DataError(f"{self.name} task: state must be a dict, got {type(state).__name__}")
        if state.get("task") != self.name:
            raise DataError(
                f"{self.name} task: state dict belongs to task {state.get('task')!r}, "
                f"not {self.name!r}"
            )
        for key in keys:
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(
                    f"{self.name} task: state dict field {key!r} must be a non-negative int, "
                    f"got {value!r}"
                )


def _check_n(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample(n): n must be a non-negative int, got {n!r}")
    return n


def _stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is salted per run)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


# ---------------------------------------------------------------------------------------------
# Arithmetic


_OPS = ("+", "-", "*")
# Up to this many distinct expressions the held-out split is chosen exactly by enumeration;
# above it, membership is a hash threshold and no enumeration is needed.
_ENUMERATE_LIMIT = 100_000
# In the hashed regime, at least this fraction of the space is held out so that finding
# eval_size held-out expressions by random draws takes a bounded number of draws (~1/fraction
# each); the training stream loses the same small fraction of its space.
_MIN_HELD_OUT_FRACTION = 0.02


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
        for _ in range(_check_n(n)):
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

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

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
                f"{state['position']}) does not match the {len(self._train)} training problems")


class BenchmarkTask(ProblemListTask):
    """A published benchmark's fixed problems (CHAMP, ASDiv), for evaluation and, with what is
    left, training. Subclasses name the task and `load` its problems.

    Held-out split: `eval_size` problems chosen by a shuffle seeded with `split_seed` (so runs
    with different seeds share it), in the data's order; the rest are the training problems. An
    `eval_size` of at least the number of problems holds out all of them, which is how the
    benchmark is usually run, and then there is nothing to train on.
    """

    def __init__(self, seed: int = 0, eval_size: int = 100, split_seed: int = 0,
                 path: str | None = None) -> None:
        for key, value in (("eval_size", eval_size), ("seed", seed), ("split_seed", split_seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"data.{key}: must be an int, got {value!r}")
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

    def _state_mismatch(self, state: dict[str, Any]) -> str:
        return (f"{self.name} task: state dict (num_train={state['num_train']}, position="
                f"{state['position']}) does not match this split's {len(self._train)} training "
                "problems; eval_size or the data changed")


class ArithmeticTask(Task):
    """Procedurally generated integer arithmetic, e.g. "What is 23 + 17?" -> "40".

    Terms are drawn uniformly from [min_value, max_value] and operators from `ops`; the answer
    follows the usual precedence (* before + and -). Division is not offered because it would
    need non-integer answers or rejection of non-divisible pairs.

    The held-out split depends only on the problem space (ops, range, num_terms, eval_size),
    not on `seed`, so runs with different seeds are evaluated on the same problems. Membership
    is decided by a stable hash of the canonical expression: for small spaces the eval set is
    exactly the `eval_size` expressions with the lowest hash; for large ones every expression
    below a hash threshold is held out and the eval set is the first `eval_size` of them in a
    fixed pseudo-random order. Training sampling rejects every held-out expression.

    Training problems are drawn with replacement; the i-th draw is a pure function of
    (seed, i), so the sampler state is the single integer i.
    """

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        ops: tuple[str, ...] | list[str] = ("+",),
        min_value: int = 1,
        max_value: int = 50,
        num_terms: int = 2,
        eval_size: int = 100,
        config_prefix: str = "data",
    ) -> None:
        self._prefix = config_prefix
        for key, value in (("seed", seed), ("min_value", min_value), ("max_value", max_value),
                           ("num_terms", num_terms), ("eval_size", eval_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{self._key(key)}: must be an int, got {value!r}")
        if isinstance(ops, str):
            # "+-" or "+" from a command line override: accept it as a sequence of symbols.
            ops = tuple(ops)
        ops = tuple(ops)
        if not ops:
            raise DataError(f"{self._key('ops')}: is empty; choose from '+', '-', '*'")
        bad = [op for op in ops if op not in _OPS]
        if bad:
            raise DataError(
                f"{self._key('ops')}: unsupported op(s) {bad}; choose from '+', '-', '*' "
                "(division is not offered: answers must be integers)"
            )
        if len(set(ops)) != len(ops):
            raise DataError(f"{self._key('ops')}: has duplicates: {list(ops)}")
        if min_value > max_value:
            raise DataError(
                f"{self._key('min_value')}: {min_value} is greater than "
                f"{self._key('max_value')}={max_value}"
            )
        if num_terms < 2:
            raise DataError(f"{self._key('num_terms')}: must be >= 2, got {num_terms}")
        if eval_size < 0:
            raise DataError(f"{self._key('eval_size')}: must be >= 0, got {eval_size}")

        self.seed = seed
        self.ops = ops
        self.min_value = min_value
        self.max_value = max_value
        self.num_terms = num_terms
        self.eval_size = eval_size
        self.num_expressions = (max_value - min_value + 1) ** num_terms * len(ops) ** (
            num_terms - 1
        )
        # Keep at least three quarters of the space for training so held-out rejection stays
        # cheap and the training set is not a thin remainder.
        if eval_size > self.num_expressions // 4:
            raise DataError(
                f"{self._key('eval_size')}: only {self.num_expressions} distinct problems for "
                f"ops={list(ops)}, values {min_value}..{max_value}, num_terms={num_terms}; "
                f"eval_size={eval_size} may be at most a quarter of them "
                f"({self.num_expressions // 4}). Lower eval_size or widen the range."
            )
        # The eval split's identity: everything that defines the problem space, but not `seed`.
        self._space_tag = (
            f"arith-v1|ops={''.join(ops)}|{min_value}..{max_value}|terms={num_terms}"
        )
        self._next_index = 0
        self._held_out_exact: set[str] | None = None
        self._hash_threshold = 0
        self._eval: list[Problem] = self._build_eval()

    def _key(self, key: str) -> str:
        """The config key behind a constructor argument, for error messages."""
        if key in ("ops", "min_value", "max_value", "num_terms"):
            key = f"arithmetic.{key}"
        return f"{self._prefix}.{key}" if self._prefix and key != "seed" else key

    # -- expressions

    def _render(self, terms: list[int], ops: list[str]) -> str:
        parts = [str(terms[0])]
        for op, term in zip(ops, terms[1:], strict=True):
            # Parenthesise negative operands so "3 - -2" never appears.
            parts.append(f"{op} ({term})" if term < 0 else f"{op} {term}")
        return " ".join(parts)

    @staticmethod
    def _evaluate(terms: list[int], ops: list[str]) -> int:
        # Precedence by hand (no eval()): fold '*' into the current product, then sum.
        total = 0
        product = terms[0]
        sign = 1
        for op, term in zip(ops, terms[1:], strict=True):
            if op == "*":
                product *= term
            else:
                total += sign * product
                sign = 1 if op == "+" else -1
                product = term
        return total + sign * product

    def _draw(self, rng: random.Random) -> tuple[list[int], list[str]]:
        terms = [rng.randint(self.min_value, self.max_value) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        return terms, ops

    def _problem(self, terms: list[int], ops: list[str]) -> Problem:
        expr = self._render(terms, ops)
        return Problem(
            id=f"arith:{expr}",
            question=f"What is {expr}?",
            answer=str(self._evaluate(terms, ops)),
            meta={"expression": expr},
            task=self.name,
        )

    def _hash(self, expr: str) -> int:
        return _stable_hash(f"{self._space_tag}|{expr}")

    def _is_held_out(self, expr: str) -> bool:
        if self._held_out_exact is not None:
            return expr in self._held_out_exact
        return self._hash(expr) < self._hash_threshold

    def _enumerate(self) -> Iterator[tuple[list[int], list[str]]]:
        values = range(self.min_value, self.max_value + 1)

        def rec(terms: list[int], ops: list[str]) -> Iterator[tuple[list[int], list[str]]]:
            if len(terms) == self.num_terms:
                yield terms, ops
                return
            for op in self.ops:
                for v in values:
                    yield from rec([*terms, v], [*ops, op])

        for v in values:
            yield from rec([v], [])

    def _build_eval(self) -> list[Problem]:
        if self.eval_size == 0:
            self._held_out_exact = set()
            return []
        if self.num_expressions <= _ENUMERATE_LIMIT:
            ranked = sorted(
                (self._hash(self._render(t, o)), t, o) for t, o in self._enumerate()
            )[: self.eval_size]
            problems = [self._problem(t, o) for _, t, o in ranked]
            self._held_out_exact = {p.meta["expression"] for p in problems}
            return problems
        fraction = min(0.5, max(_MIN_HELD_OUT_FRACTION, 2 * self.eval_size / self.num_expressions))
        self._hash_threshold = int(fraction * 2**64)
        rng = random.Random(f"{self._space_tag}|eval")
        found: dict[str, Problem] = {}
        # ~1/fraction draws per held-out hit; the cap only guards against a logic error.
        max_draws = 1000 * self.eval_size + 10_000
        for _ in range(max_draws):
            terms, ops = self._draw(rng)
            expr = self._render(terms, ops)
            if expr not in found and self._is_held_out(expr):
                found[expr] = self._problem(terms, ops)
                if len(found) == self.eval_size:
                    return list(found.values())
        raise RuntimeError(  # pragma: no cover - statistically unreachable
            f"arithmetic task: found only {len(found)} held-out problems in {max_draws} draws"
        )

    # -- Task API

    def sample(self, n: int) -> list[Problem]:
        """Draw the next `n` training problems (with replacement, never a held-out one)."""
        out = []
        for _ in range(_check_n(n)):
            index = self._next_index
            self._next_index += 1
            rng = random.Random(f"arith-train|{self.seed}|{index}")
            while True:
                terms, ops = self._draw(rng)
                if not self._is_held_out(self._render(terms, ops)):
                    break
            out.append(self._problem(terms, ops))
        return out

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out problems (a new list each call; problems are shared)."""
        return list(self._eval)

    def state_dict(self) -> dict[str, Any]:
        """Sampler position: the index of the next training draw."""
        return {"task": self.name, "next_index": self._next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` output."""
        self._check_state(state, ("next_index",))
        self._next_index = state["next_index"]


# ---------------------------------------------------------------------------------------------
# Files


_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


class FileTask(ProblemListTask):
    """Problems read from a local `.jsonl` (optionally gzipped) or `.parquet` file.

    Each row needs a non-empty string question (`prompt_key`) and a non-empty string or number
    answer (`answer_key`); other fields go to `Problem.meta`, and an `id` field, if present,
    becomes the problem id (otherwise "<file name>:<line or row>").

    Held-out split: rows of `eval_path` if given, else the last `eval_size` rows of a shuffle
    seeded by `split_seed` (separate from `seed` so runs with different sampling seeds share an
    eval set). Training rows whose question also occurs in the eval split are dropped, so
    duplicated rows cannot leak eval problems into training (`num_overlap_dropped`).

    Sampling walks a seeded permutation of the training rows and reshuffles at each epoch; the
    state is (epoch, position), so a restore repeats the exact sequence.
    """

    name = "file"
    #: Whether every row needs a gold answer (PromptsTask: no).
    answer_required = True

    def __init__(
        self,
        path: str | Path,
        eval_path: str | Path | None = None,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        eval_size: int = 100,
        seed: int = 0,
        skip_malformed: bool = False,
        split_seed: int = 0,
        config_prefix: str = "data",
    ) -> None:
        self._prefix = config_prefix
        for key, value in (("eval_size", eval_size), ("seed", seed), ("split_seed", split_seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{self._key(key)}: must be an int, got {value!r}")
        if eval_size < 0:
            raise DataError(f"{self._key('eval_size')}: must be >= 0, got {eval_size}")
        for key, value in (("prompt_key", prompt_key), ("answer_key", answer_key)):
            if not isinstance(value, str) or not value:
                raise DataError(f"{self._key(key)}: must be a non-empty string, got {value!r}")
        if path is None or (isinstance(path, str) and not path):
            raise DataError(f"{self._key('path')}: no data file given (set {self._key('path')})")

        self.path = Path(path)
        self.eval_path = Path(eval_path) if eval_path else None
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.seed = seed
        self.split_seed = split_seed
        self.skip_malformed = skip_malformed
        self.num_skipped = 0

        rows = self._load(self.path, "path")
        if self.eval_path is not None:
            train, held_out = rows, self._load(self.eval_path, "eval_path")
            if not held_out:
                raise DataError(f"{self._key('eval_path')}: {self.eval_path}: no valid rows")
        else:
            order = list(range(len(rows)))
            random.Random(f"file-split|{split_seed}").shuffle(order)
            if eval_size >= len(rows):
                raise DataError(
                    f"{self._key('eval_size')}: {eval_size} held-out rows requested but "
                    f"{self.path} has only {len(rows)} valid rows; at least one must remain "
                    f"for training (lower {self._key('eval_size')} or set "
                    f"{self._key('eval_path')})"
                )
            cut = len(rows) - eval_size
            train = [rows[i] for i in order[:cut]]
            held_out = [rows[i] for i in order[cut:]]

        eval_questions = {_normalize_question(p.question) for p in held_out}
        kept = [p for p in train if _normalize_question(p.question) not in eval_questions]
        self.num_overlap_dropped = len(train) - len(kept)
        if self.num_overlap_dropped:
            logger.warning(
                "%s: dropped %d training rows whose question is also in the eval split",
                self._key("path"), self.num_overlap_dropped,
            )
        if not kept:
            raise DataError(
                f"{self._key('path')}: {self.path}: no training rows left after holding out "
                "the eval split"
            )
        self._train = kept
        self._eval = held_out
        self._start_sampler(seed)

    def _key(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    # -- loading

    def _load(self, path: Path, key: str) -> list[Problem]:
        where = self._key(key)
        if not path.exists():
            raise DataError(f"{where}: file not found: {path}")
        if path.is_dir():
            raise DataError(f"{where}: {path} is a directory, expected a .jsonl or .parquet file")
        kind = _file_kind(path)
        if not kind:
            raise DataError(
                f"{where}: {path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}"
            )
        reader = self._read_parquet if kind == ".parquet" else self._read_jsonl
        problems: list[Problem] = []
        skipped: list[str] = []
        for loc, row in reader(path, where):
            try:
                problems.append(self._to_problem(path, loc, row))
            except _BadRow as err:
                if not self.skip_malformed:
                    raise DataError(f"{where}: {path}:{loc}: {err}") from None
                skipped.append(f"{loc}: {err}")
        if skipped:
            self.num_skipped += len(skipped)
            logger.warning(
                "%s: %s: skipped %d malformed rows (first: %s)", where, path, len(skipped),
                skipped[0],
            )
        if not problems:
            raise DataError(f"{where}: {path}: no valid rows")
        return problems

    def _read_jsonl(self, path: Path, where: str) -> Iterator[tuple[str, Any]]:
        opener: Callable[..., Any] = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue  # blank lines (e.g. a trailing newline) are not rows
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as err:
                        yield str(lineno), _BadRow(f"not valid UTF-8 ({err.reason})")
                        continue
                    except json.JSONDecodeError as err:
                        bad = _BadRow(f"invalid JSON ({err.msg} at column {err.colno})")
                        yield str(lineno), bad
                        continue
                    yield str(lineno), row
        except (OSError, EOFError) as err:
            raise DataError(f"{where}: cannot read {path}: {err}") from None

    def _read_parquet(self, path: Path, where: str) -> Iterator[tuple[str, Any]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{where}: {path}: reading .parquet files needs pyarrow; "
                "install it (pip install pyarrow) or convert the file to .jsonl"
            ) from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for corrupt or non-parquet files
            raise DataError(f"{where}: cannot read parquet file {path}: {err}") from None
        for column in (self.prompt_key, self.answer_key):
            if column not in table.column_names and (column == self.prompt_key
                                                     or self.answer_required):
                key = "prompt_key" if column == self.prompt_key else "answer_key"
                raise DataError(
                    f"{where}: {path}: no column {column!r} (columns: {table.column_names}); "
                    f"set {self._key(key)}"
                )
        for index, row in enumerate(table.to_pylist(), start=1):
            yield f"row {index}", row

    def _to_problem(self, path: Path, loc: str, row: Any) -> Problem:
        if isinstance(row, _BadRow):
            raise row
        if not isinstance(row, dict):
            raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
        question = self._field(row, self.prompt_key, "prompt_key")
        if not isinstance(question, str):
            raise _BadRow(
                f"field {self.prompt_key!r} must be a string, got {type(question).__name__}"
            )
        if not self.answer_required and (
                row.get(self.answer_key) is None or row.get(self.answer_key) == ""):
            answer: Any = ""  # no gold answer: rule-based parts score 0, a reward model scores
        else:
            answer = self._field(row, self.answer_key, "answer_key")
        if isinstance(answer, list) and answer and all(isinstance(t, str) for t in answer):
            # A code problem: its answer is a list of assert statements, which the
            # code_accuracy reward runs after the model's code in the sandbox.
            answer = json.dumps({"verifier": "code", "tests": answer})
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise _BadRow(
                f"field {self.answer_key!r} must be a string, a number or a list of test "
                f"strings, "
                f"got {type(answer).__name__}"
            )
        if isinstance(answer, float) and not math.isfinite(answer):
            raise _BadRow(f"field {self.answer_key!r} is not a finite number: {answer!r}")
        meta = {k: v for k, v in row.items() if k not in (self.prompt_key, self.answer_key)}
        raw_id = row.get("id")
        problem_id = str(raw_id) if raw_id not in (None, "") else f"{path.name}:{loc}"
        return Problem(id=problem_id, question=question, answer=str(answer).strip(), meta=meta,
                       task=self.name)

    def _field(self, row: dict[str, Any], name: str, key: str) -> Any:
        if name not in row or row[name] is None:
            keys = ", ".join(repr(k) for k in list(row)[:10])
            raise _BadRow(
                f"missing field {name!r} (row has: {keys or 'no fields'}); "
                f"set {self._key(key)} to the right field"
            )
        value = row[name]
        if isinstance(value, str) and not value.strip():
            raise _BadRow(f"empty field {name!r}")
        return value

    def _state_mismatch(self, state: dict[str, Any]) -> str:
        if state["num_train"] != len(self._train):
            return (f"{self._key('path')}: state dict was saved with {state['num_train']} "
                    f"training rows but {self.path} now gives {len(self._train)}; the data file "
                    "changed")
        return (f"file task: state dict position {state['position']} is past the "
                f"{len(self._train)} training rows")


class PromptsTask(FileTask):
    """General prompts from a `.jsonl` or `.parquet` file, the gold answer optional.

    For R1's all-scenario RL: prompts without a checkable answer (writing, open questions) are
    rewarded by a reward model (the `preference` part, `reward.model`), e.g. in a mix with
    `reward.per_task: {prompts: {preference: 1.0}}`. Rows are read as by FileTask, except that
    a missing, null or empty `answer_key` field gives the gold answer "" (the rule-based parts
    then score 0); a row that has one keeps it.
    """

    name = "prompts"
    answer_required = False


class _BadRow(Exception):
    """A malformed row; FileTask._load adds the file, line and config key to the message."""


def _normalize_question(question: str) -> str:
    return " ".join(question.split())


# ---------------------------------------------------------------------------------------------
# reasoning-gym


class ReasoningGymTask(Task):
    """Problems from one of reasoning-gym's procedural generators (chain_sum, basic_arithmetic,
    gsm_symbolic, ...), each with a gold answer string.

    Generators are indexable: problem i of a seed is a pure function of (seed, i), so the
    sampler state is one counter. The held-out split comes from a seed of its own (the same for
    every run seed, so runs are compared on the same problems), and training draws skip any
    question that is also held out.
    """

    name = "reasoning_gym"
    _EVAL_SEED = 1_000_003
    _INDEX_SPACE = 2**40  # reasoning-gym datasets index lazily; size only bounds the index

    def __init__(self, dataset: str, seed: int = 0, eval_size: int = 100,
                 options: dict[str, Any] | None = None, config_prefix: str = "data") -> None:
        import reasoning_gym

        self.dataset = dataset
        self.seed = seed
        where = f"{config_prefix}.reasoning_gym"
        try:
            self._train = reasoning_gym.create_dataset(dataset, seed=seed,
                                                       size=self._INDEX_SPACE, **(options or {}))
            held_out = reasoning_gym.create_dataset(dataset, seed=self._EVAL_SEED,
                                                    size=eval_size, **(options or {}))
        except ValueError as exc:
            from reasoning_gym.factory import DATASETS

            raise DataError(f"{where}.dataset={dataset!r}: {exc}; {len(DATASETS)} available, "
                            f"e.g. {', '.join(sorted(DATASETS)[:6])}") from None
        except TypeError as exc:
            raise DataError(f"{where}.options: {exc}") from None
        self._eval = [self._problem(f"eval-{i}", item) for i, item in enumerate(held_out)]
        self._held_out = {_normalize_question(p.question) for p in self._eval}
        self._next = 0

    def _problem(self, pid: str, item: dict[str, Any]) -> Problem:
        answer = str(item["answer"])
        if item["metadata"].get("source_dataset") == "codeio":
            answer = _codeio_gold(item)
        return Problem(id=f"{self.dataset}-{pid}", question=item["question"], answer=answer,
                       meta={"dataset": self.dataset}, task=self.name)

    def sample(self, n: int) -> list[Problem]:
        out: list[Problem] = []
        while len(out) < _check_n(n):
            item = self._train[self._next]
            self._next += 1
            if _normalize_question(item["question"]) not in self._held_out:
                out.append(self._problem(f"train-{self.seed}-{self._next - 1}", item))
        return out

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.name, "next_index": self._next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ("next_index",))
        self._next = state["next_index"]


# The line of reasoning-gym's codeio prompts after which the reference code follows.
_CODEIO_TIP = "Tip: Here is a reference code snippet for this question."


def _codeio_gold(item: dict[str, Any]) -> str:
    """A codeio item's gold for the executing verifier: reasoning-gym's own answer is the one
    input its generator drew, while any input giving the same output is right."""
    from rlsys.rewards.codeio import codeio_gold

    question, meta = item["question"], item["metadata"]
    _, found, tail = question.partition(_CODEIO_TIP)
    if not found:
        raise DataError("reasoning_gym codeio: the prompt no longer carries the reference code "
                        f"after {_CODEIO_TIP!r}; this reasoning-gym version is not supported")
    code = tail.split("\n", 1)[1].strip()
    mode = "output" if "Given the following input:" in question else "input"
    return codeio_gold(mode, code, meta["input_data"], meta["output_data"])


# ---------------------------------------------------------------------------------------------
# Mixture


class MixtureTask(Task):
    """Several tasks in one run (R1's all-scenario RL): each drawn problem comes from a task
    chosen at random with the given shares, and keeps that task's name in `Problem.task`, so the
    reward pool applies that task's reward weights.

    Draw i's task is a pure function of (seed, i), so the state is a draw counter plus each
    component's own state. The held-out split is every component's split, in order.
    """

    name = "mix"

    def __init__(self, tasks: dict[str, Task], shares: dict[str, float], seed: int = 0) -> None:
        if not tasks or set(tasks) != set(shares):
            raise DataError(f"mix task: tasks {sorted(tasks)} and shares {sorted(shares)} must "
                            "name the same, non-empty set of tasks")
        bad = {k: v for k, v in shares.items() if not (isinstance(v, int | float) and v > 0)}
        if bad:
            raise DataError(f"data.mix: shares must be positive numbers, got {bad}")
        self.tasks, self.seed = dict(tasks), seed
        self._names = list(tasks)
        self._shares = [float(shares[n]) for n in self._names]
        self._draws = 0

    def _choose(self, i: int) -> str:
        return random.Random(f"mix|{self.seed}|{i}").choices(self._names, self._shares)[0]

    def sample(self, n: int) -> list[Problem]:
        names = [self._choose(self._draws + i) for i in range(_check_n(n))]
        self._draws += n
        drawn = {name: iter(self.tasks[name].sample(names.count(name))) for name in self._names}
        return [next(drawn[name]) for name in names]

    def eval_problems(self) -> list[Problem]:
        """Every component's held-out split, interleaved, so that a prefix (trainer.eval_size)
        still covers every task."""
        splits = [self.tasks[name].eval_problems() for name in self._names]
        return [p for row in itertools.zip_longest(*splits) for p in row if p is not None]

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.name, "draws": self._draws,
                "components": {name: t.state_dict() for name, t in self.tasks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state, ("draws",))
        saved = state.get("components")
        if not isinstance(saved, dict) or set(saved) != set(self.tasks):
            raise DataError(f"mix task: state dict holds tasks {sorted(saved or {})}, this run "
                            f"mixes {sorted(self.tasks)}")
        for name, task in self.tasks.items():
            task.load_state_dict(saved[name])
        self._draws = state["draws"]


# ---------------------------------------------------------------------------------------------
# Registry


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to `make_task`'s registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name]}")
    TASKS[cls.name] = cls
    return cls


register_task(ArithmeticTask)
register_task(FileTask)
register_task(PromptsTask)
register_task(ReasoningGymTask)
register_task(MixtureTask)


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name, e.g. `make_task("arithmetic", seed=1)`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"task {name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(accepted)}"
        )
    required = [
        p.name for p in params.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in kwargs
    ]
    if required:
        raise ValueError(f"task {name!r} needs argument(s) {required}")
    return cls(**kwargs)
