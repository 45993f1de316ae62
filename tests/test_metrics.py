"""The step-metrics sinks: metrics.jsonl, TensorBoard and Weights & Biases (offline, no
network); the Ray dashboard gauges are read back from Ray's export in tests/test_e2e.py."""

from __future__ import annotations

import hashlib
import time

import pytest

from rlsys.metrics import MetricsLogger, gauge_name, read_metrics


@pytest.mark.parametrize(("key", "name"), [
    ("reward/total", "rlsys_reward_total"),
    ("eval/pass@1", "rlsys_eval_pass_1"),
    ("eval/accuracy/reasoning_gym", "rlsys_eval_accuracy_reasoning_gym"),
    ("time/ref_and_old_logprobs", "rlsys_time_ref_and_old_logprobs"),
    ("train/rollout_is/mean", "rlsys_train_rollout_is_mean"),
])
def test_gauge_names_are_prometheus_safe(key, name):
    assert gauge_name(key) == name


def test_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward/total": 0.5, "train/kl": float("nan"), "note": "text"})
    logger.log(2, {"reward/total": 0.75})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/total"]) for r in records] == [(1, 0.5), (2, 0.75)]
    assert records[0]["train/kl"] == "nan" and records[0]["note"] == "text"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_offline_run_gets_every_scalar(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `dev` extra installs it; the sink is optional
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = {"project": "rlsys-test", "mode": "offline", "config": {"seed": 0}}
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=options, run_name="unit")
    logger.log(1, {"reward/total": 0.25, "stage_label": "zebra-17"})
    logger.log(2, {"reward/total": 0.5, "eval/accuracy": 0.125})
    logger.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    # The offline transaction log (what `wandb sync` uploads) holds protobuf records whose
    # keys and JSON values are stored verbatim; wandb 0.31 ships no Python reader for it.
    # wandb-core, a separate process, writes the log and may still be at it after finish().
    deadline = time.monotonic() + 30
    while (b"eval/accuracy" not in (record := next(run.glob("*.wandb")).read_bytes())
           and time.monotonic() < deadline):
        time.sleep(0.2)
    for text in (b"rlsys-test", b"reward/total", b"eval/accuracy", b"0.125", b"seed"):
        assert text in record, text
    assert b"stage_label" not in record and b"zebra-17" not in record  # numbers only
    # One W&B run per output directory, so a resumed run continues it.
    assert run.name.endswith(hashlib.sha1(str(tmp_path.resolve()).encode()).hexdigest()[:16])
