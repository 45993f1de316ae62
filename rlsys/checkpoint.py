"""Where resumable checkpoints live in a run directory, and how one becomes complete.

    <output_dir>/checkpoints/step_000040/learner/        sharded model, optimizer, scheduler
                                                         (torch.distributed.checkpoint, written
                                                         by every learner rank)
    <output_dir>/checkpoints/step_000040/trainer.json   step, weight version, data sampler

A checkpoint is written under a hidden temporary name and renamed into place only after every
part is on disk; the rename is atomic, so a crash mid-write leaves a `.step_*.tmp` folder that
is never taken for a checkpoint (and is removed by the next save).

No global RNG state needs saving: every random draw of a run is derived from the seed and the
step (the data sampler's position, the engines' per-request seeds, the learner's shuffle).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer.json"
LEARNER_DIR = "learner"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (stale ones are removed)."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step_{step:06d}.tmp"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write the trainer state, rename `tmp` into place, and keep the newest `keep`."""
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    final = tmp.parent / f"step_{step:06d}"
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in complete_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def truncate_metrics(metrics_path: str | Path, last_step: int) -> int:
    """Drop records after `last_step` (logged by the interrupted run after its checkpoint).

    Returns how many were dropped. The file is replaced atomically.
    """
    path = Path(metrics_path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(lines) - len(kept)
