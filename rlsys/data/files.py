"""The file and prompts tasks: problems read from local .jsonl(.gz) or .parquet files."""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlsys.data.tasks import (
    DataError,
    Problem,
    ProblemListTask,
    RunConfig,
    normalize_question,
    register_task,
)

logger = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@register_task
class FileTask(ProblemListTask):
    """Problems read from a local `.jsonl` (optionally gzipped) or `.parquet` file.

    Each row needs a non-empty string question (`prompt_key`) and a non-empty string or number
    answer (`answer_key`); other fields go to `Problem.meta`, and an `id` field, if present,
    becomes the problem id (otherwise "<file name>:<line or row>").

    Held-out split: rows of `eval_path` if given, else the last `eval_size` rows of a shuffle
    seeded by `split_seed` (separate from `seed` so runs with different sampling seeds share an
    eval set). Training rows whose question also occurs in the eval split are dropped, so
    duplicated rows cannot leak eval problems into training (`num_overlap_dropped`).
    Sampling is ProblemListTask's.
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
    ) -> None:
        self._check_ints(eval_size=eval_size, seed=seed, split_seed=split_seed)
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

        eval_questions = {normalize_question(p.question) for p in held_out}
        kept = [p for p in train if normalize_question(p.question) not in eval_questions]
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

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FileTask:
        d = cfg.data
        # The prompts task reads data.prompts_path if set, else data.path and data.eval_path.
        own = d.prompts_path if issubclass(cls, PromptsTask) else None
        return cls(path=own or d.path, eval_path=None if own else d.eval_path,
                   prompt_key=d.prompt_key, answer_key=d.answer_key, eval_size=d.eval_size,
                   seed=cfg.trainer.seed, skip_malformed=d.skip_malformed)

    # -- loading

    def _load(self, path: Path, key: str) -> list[Problem]:
        where = self._key(key)
        if not path.exists():
            raise DataError(f"{where}: file not found: {path}")
        if path.is_dir():
            raise DataError(f"{where}: {path} is a directory, expected a .jsonl or .parquet file")
        kind = next((s for s in _SUFFIXES if path.name.lower().endswith(s)), "")
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
                        row = _BadRow(f"not valid UTF-8 ({err.reason})")
                    except json.JSONDecodeError as err:
                        row = _BadRow(f"invalid JSON ({err.msg} at column {err.colno})")
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
        if not self.answer_required and row.get(self.answer_key) in (None, ""):
            answer: Any = ""  # no gold answer: rule-based parts score 0, a reward model scores
        else:
            answer = self._field(row, self.answer_key, "answer_key")
        if isinstance(answer, list) and answer and all(isinstance(t, str) for t in answer):
            # A code problem: its answer is a list of assert statements, which the
            # code_accuracy reward runs after the model's code in the sandbox.
            answer = json.dumps({"verifier": "code", "tests": answer})
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise _BadRow(f"field {self.answer_key!r} must be a string, a number or a list of "
                          f"test strings, got {type(answer).__name__}")
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


@register_task
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
