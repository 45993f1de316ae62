"""The demo benchmark's --keep: a seed run later joins the recorded seeds of the same settings."""

from __future__ import annotations

import json

import pytest

from benchmarks.smol_learning import with_recorded_runs


def _run(seed: int, lr: float = 2e-5, **trainer: object) -> dict:
    return {"seed": seed, "summary": {"final_eval_accuracy": 0.8 + seed / 100},
            "config": {"learner": {"lr": lr},
                       "trainer": {"seed": seed, "output_dir": f"/tmp/run{seed}", **trainer}}}


def test_keep_adds_a_seed_to_the_recorded_ones_and_refuses_other_settings(tmp_path) -> None:
    path = tmp_path / "smol_learning.json"
    assert with_recorded_runs(path, [_run(2)]) == [_run(2)]  # nothing recorded yet
    # Seed 1 recorded before an option existed: a key only one side has is no difference.
    path.write_text(json.dumps({"runs": [_run(1), _run(0, max_learner_restarts=2)]}))
    merged = with_recorded_runs(path, [_run(2), _run(1)])
    assert [r["seed"] for r in merged] == [0, 1, 2]
    assert merged[1] == _run(1)  # the new seed-1 run replaces the recorded one
    with pytest.raises(SystemExit, match=r"seed 1 ran other settings \(learner.lr\)"):
        with_recorded_runs(path, [_run(2, lr=1e-5)])
