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
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rlsys.metrics import truncate_metrics

log = logging.getLogger("rlsys")

_NAME = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer.json"
LEARNER_DIR = "learner"


def save(output_dir: str | Path, step: int, learner: Any,
         trainer_state: dict[str, Any], keep: int) -> Path:
    """The checkpoint of `step`: the learner group's shards, then the trainer state, made
    complete by one rename (`begin` / `commit`). Used by the GRPO and the SFT loops alike."""
    t0 = time.perf_counter()
    tmp = begin(output_dir, step)
    learner.save_checkpoint(str(tmp / LEARNER_DIR))
    path = commit(tmp, step, trainer_state, keep=keep)
    log.info("checkpoint %s written in %.1fs", path, time.perf_counter() - t0)
    return path


def restore(path: Path, learner: Any) -> dict[str, Any]:
    """Load the learner's shards from a checkpoint; returns its trainer state (with "step")."""
    state = read_trainer_state(path)
    learner.load_checkpoint(str(path / LEARNER_DIR))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def resume_point(output_dir: str | Path, resume: str) -> tuple[Path | None, int]:
    """With `trainer.resume=auto`, the latest complete checkpoint and its step, after dropping
    the metrics the interrupted run logged past it (they are redone); else (None, 0)."""
    path = latest_checkpoint(output_dir) if resume == "auto" else None
    if path is None:
        return None, 0
    step = int(read_trainer_state(path)["step"])
    truncate_metrics(Path(output_dir) / "metrics.jsonl", step)
    return path, step


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in root.iterdir()
                  if (match := _NAME.match(path.name)) and (path / TRAINER_STATE).is_file())


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
