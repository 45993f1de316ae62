"""Per-step metrics: one JSON line per step in `<output_dir>/metrics.jsonl`, and TensorBoard."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends `{"step": s, "time": t, **metrics}` lines; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than failing
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_parts(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every reward part over the scores that have it.

    In a mixed-task run tasks weigh different parts, so a part is averaged over the problems
    whose reward includes it, not counted as 0 for the others.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for score in scores:
        for key, value in score.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def reflection_count(text: str, phrases: Sequence[str]) -> int:
    """How often `text` uses any of the reflection phrases ("wait", "let me check", ...), as
    whole words, ignoring case: the "aha moment" signal R1-Zero reports rising during RL."""
    if not phrases:
        return 0
    pattern = r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))
