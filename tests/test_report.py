"""`python -m rlsys.report`: the page and plots of a synthetic run and pipeline, and bad input.

Files only (no Ray, no model): the metrics are written the way MetricsLogger writes them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rlsys.report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def grpo_record(step: int, eval_every: int = 10) -> dict:
    """One step's metrics with the names rlsys.trainer logs."""
    r = {"step": step, "time": 1000.0 + 20 * step}
    if step > 0:
        r |= {"reward/total": 0.5 + step / 100, "reward/accuracy": step / 100,
              "reward/format": 0.9, "reward/error": 0.0,
              "train/kl": 1e-3 * step, "train/entropy": 1.0 - step / 200,
              "train/clip_frac": 0.01, "train/loss": 0.1,
              "response/length_mean": 60 + step, "response/length_max": 96,
              "response/reflections": 0.1 * (step % 3),
              "time/gen": 10.0, "time/reward": 1.0, "time/update": 8.0, "time/sync": 0.5,
              "time/step": 19.5, "throughput/gen_tokens_per_s": 300.0}
    if step % eval_every == 0:
        r |= {"eval/accuracy": 0.4 + step / 100, "eval/pass@1": 0.35 + step / 100,
              "eval/accuracy/arithmetic": 0.5, "eval/accuracy/basic_arithmetic": 0.1,
              "time/eval": 5.0}
    return r


def write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def image_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def check_images(out: Path, text: str) -> list[str]:
    links = image_links(text)
    assert links
    for link in links:
        assert "/" not in link  # relative, next to report.md
        assert (out / link).read_bytes()[:8] == PNG_MAGIC
    return links


def test_grpo_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    records = [grpo_record(s) for s in range(41)]
    records[5]["train/kl"] = "nan"  # MetricsLogger writes non-finite values as strings
    records[6]["train/entropy"] = "inf"
    write_metrics(run, records)
    (run / "config.yaml").write_text(
        "model:\n  path: smollm2-135m-instruct\ndata:\n  task: arithmetic\n"
        "rollout:\n  prompts_per_step: 8\n  group_size: 8\ntrainer:\n  steps: 40\n")

    assert main([str(run)]) == 0
    out = run / "report"
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    text = (out / "report.md").read_text()
    assert "- model: `smollm2-135m-instruct`" in text
    assert "- task: `arithmetic`" in text and "- G: `8`" in text
    assert "- prompts per step: `8`" in text and "- steps: `40`" in text
    assert "41 logged steps, step 0 to 40" in text
    # first / last / best: eval at steps 0..40, best the last
    assert "| `eval/accuracy` | 0.400 | 0.800 | 0.800 (step 40) |" in text
    assert "| `reward/total` | 0.510 | 0.900 | 0.900 (step 40) |" in text
    assert "| `train/kl` | 0.001 | 0.040 | – |" in text
    assert "`reward/error`" not in text
    links = check_images(out, text)
    assert links == ["reward.png", "accuracy.png", "response.png", "update.png", "time.png"]


def test_missing_metrics_are_left_out(tmp_path: Path) -> None:
    """A short run with no evaluation and no learner stats: only the plots it has data for."""
    run = tmp_path / "run"
    write_metrics(run, [{"step": s, "time": float(s), "reward/total": 0.1 * s,
                         "time/step": 2.0} for s in range(1, 4)])
    out = tmp_path / "elsewhere"
    assert main([str(run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert check_images(out, text) == ["reward.png", "time.png"]
    assert not (run / "report").exists()
    assert "config" not in text.lower().split("run folder")[0]


def test_incomplete_last_line_is_skipped(tmp_path: Path) -> None:
    """A run in progress may be mid-write: an unterminated last line is noted, not an error."""
    run = tmp_path / "run"
    path = write_metrics(run, [grpo_record(s) for s in range(3)])
    with path.open("a") as f:
        f.write('{"step": 3, "time": 10')
    assert main([str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    assert "metrics.jsonl line 4 is incomplete" in text
    assert "3 logged steps" in text


def stage(root: Path, name: str, kind: str, seconds: float, eval_: dict | None = None,
          complete: bool = True, **extra: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    record = {"name": name.split("-", 1)[1], "kind": kind, "model": "base", "seconds": seconds,
              **extra}
    if eval_ is not None:
        record["eval"] = eval_
    (folder / ("stage.json" if complete else "trained.json")).write_text(json.dumps(record))
    return folder


def test_pipeline(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    sft = stage(root, "01-cold_start", "sft", 153.6,
                {"k": 4, "greedy_accuracy": 0.74, "pass@1": 0.7575, "pass@4": 0.9,
                 "cons@4": 0.76}, parameters=134_515_008,
                eval_before={"greedy_accuracy": 0.46})
    write_metrics(sft, [{"step": s, "time": float(s), "epoch": 0, "sft/nll": 2.0 / s,
                         "time/step": 1.5} for s in range(1, 9)])
    rl = stage(root, "02-reasoning_rl", "grpo", 932.4,
               {"k": 4, "greedy_accuracy": 0.8, "pass@1": 0.79, "cons@4": None})
    write_metrics(rl, [grpo_record(s, eval_every=5) for s in range(11)])
    (rl / "config.yaml").write_text("model:\n  path: /runs/x/01-cold_start/final\n")
    rs = stage(root, "03-rejection_sampling", "rejection_sampling", 214.8)
    (rs / "stats.json").write_text(json.dumps(
        {"samples": 512, "kept": 110, "reasons": {"kept": 130, "wrong": 382}}))
    (root / "04-sft").mkdir()  # created, nothing written yet: not a stage to report
    (root / "notes").mkdir()

    assert main([str(root)]) == 0
    out = root / "report"
    text = (out / "report.md").read_text()
    assert "3 stages, 3 complete, 21.7 minutes of stage time." in text
    assert ("| 01 | cold_start | sft | 2.56 | 135M | 0.460 | 0.740 | 0.757 | 0.760 (cons@4) | – |"
            in text)
    assert "| 02 | reasoning_rl | grpo | 15.54 | – | – | 0.800 | 0.790 | – | – |" in text
    assert ("| 03 | rejection_sampling | rejection_sampling | 3.58 | – | – | – | – | – | 110/512 |"
            in text)
    assert "samples by rejection reason: wrong 382, kept 130." in text
    assert "## Stage 01-cold_start (sft)" in text
    assert "## Stage 02-reasoning_rl (grpo)" in text
    assert "## Stage 03" not in text  # makes no model: no plots
    assert "- model: `/runs/x/01-cold_start/final`" in text
    assert "| `sft/nll` | 2.000 | 0.250 | 0.250 (step 8) |" in text
    links = check_images(out, text)
    assert links[:2] == ["stages_accuracy.png", "stages_time.png"]
    assert "01-cold_start_sft.png" in links and "01-cold_start_time.png" in links
    assert "02-reasoning_rl_reward.png" in links and "02-reasoning_rl_accuracy.png" in links
    assert not any(link.startswith("03-") for link in links)


def test_pipeline_in_progress(tmp_path: Path) -> None:
    """A stage still training has metrics but no stage.json: listed as incomplete, plotted."""
    root = tmp_path / "pipe"
    stage(root, "01-cold_start", "sft", 60.0, complete=False)  # trained.json only
    write_metrics(root / "02-reasoning_rl", [grpo_record(s) for s in range(1, 4)])
    assert main([str(root)]) == 0
    text = (root / "report" / "report.md").read_text()
    assert "2 stages, 0 complete" in text
    assert "| 01 | cold_start (trained, not yet evaluated) | sft | 1.00 | – |" in text
    assert "| 02 | reasoning_rl (in progress) | ? | – |" in text
    assert "## Stage 02-reasoning_rl (in progress)" in text
    assert "No metrics.jsonl in this stage's folder." in text  # 01 has none
    check_images(root / "report", text)


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "no_step", "stage_json"])
def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    run = tmp_path / "run"
    if case == "missing":
        expected = f"error: {run}: no such directory"
    elif case == "empty":
        run.mkdir()
        expected = f"error: {run}: neither a run (no metrics.jsonl) nor a pipeline run"
    elif case in ("malformed", "no_step"):
        path = write_metrics(run, [grpo_record(s) for s in range(3)])
        lines = path.read_text().splitlines(keepends=True)
        lines.insert(2, "{oops\n" if case == "malformed" else '{"time": 1.0}\n')
        path.write_text("".join(lines))
        expected = f"error: {path}:3: malformed metrics line"
    else:
        folder = run / "01-cold_start"
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text('{"kind": "sft",\n  oops}')
        expected = f"error: {folder / 'stage.json'}:2: malformed JSON"
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert err.count("\n") == 1  # one line
    assert not (run / "report").exists()


def test_stage_malformed_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pipe"
    folder = stage(root, "01-rl", "grpo", 10.0)
    path = write_metrics(folder, [grpo_record(1)])
    path.write_text(path.read_text() + "not json\n" + json.dumps(grpo_record(2)) + "\n")
    assert main([str(root)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:2: malformed metrics line")


def test_nan_only_metric_is_not_plotted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_metrics(run, [{"step": s, "time": float(s), "train/kl": "nan", "reward/total": math.pi}
                        for s in range(1, 3)])
    assert main([str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    assert check_images(run / "report", text) == ["reward.png"]
    assert "`train/kl`" not in text


def test_runs_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Several run folders (seeds of one config): one page, one line per run in each panel,
    each run's first/last/best/lowest-after-step-30 accuracy and the spread of the last."""
    folders = []
    for seed in range(3):
        folder = tmp_path / f"seed{seed}"
        records = [grpo_record(s) | ({"eval/accuracy": 0.5 + 0.1 * seed + s / 1000}
                                     if s % 10 == 0 else {})
                   | ({"groups/no_signal_frac": 0.5} if s else {}) for s in range(41)]
        write_metrics(folder, records)
        (folder / "config.yaml").write_text(f"trainer:\n  seed: {seed}\n")
        folders.append(folder)
    out = tmp_path / "compared"
    assert main([*map(str, folders), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert check_images(out, text) == ["compare.png"]
    assert "| seed1 (seed 1) | 0.600 | 0.640 (step 40) | 0.640 | 0.630 |" in text
    assert "over 3 runs: mean 0.640, min 0.540, max 0.740" in text
    assert capsys.readouterr().out.strip() == str(out / "report.md")

    assert main([*map(str, folders)]) == 2  # comparing needs --out
    assert "needs --out" in capsys.readouterr().err
    assert main([str(folders[0]), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
