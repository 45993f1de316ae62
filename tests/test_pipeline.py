"""The R1 pipeline end to end on the tiny model (conf/r1_tiny.yaml): cold-start SFT, GRPO,
rejection sampling, SFT on its dataset, all-scenario GRPO over a task mix; stage markers,
skipping complete stages, restarting an interrupted one, and `pipeline.only`."""

from __future__ import annotations

import json

import pytest

from rlsys.config import ConfigError, load_config
from rlsys.metrics import read_metrics
from rlsys.pipeline import run_pipeline
from rlsys.pipeline.runner import MARKER

STAGES = ["01-cold_start", "02-reasoning_rl", "03-rejection_sampling", "04-sft",
          "05-all_scenario_rl"]


@pytest.mark.timeout(900)
def test_r1_pipeline_on_the_tiny_model(ray_cluster, tmp_path):
    merge = tmp_path / "general.jsonl"
    merge.write_text("".join(json.dumps({"prompt": f"Say hi {i}.", "response":
                                         f"<think>\nA greeting.\n</think>\n<answer>hi {i}"
                                         "</answer>", "source": "general"}) + "\n"
                             for i in range(4)))
    out = tmp_path / "run"
    args = ["conf=r1_tiny", f"trainer.output_dir={out}", f"rejection.merge={merge}"]

    # One stage alone first: pipeline.only.
    run_pipeline(load_config([*args, "pipeline.only=cold_start"]), [*args,
                                                                     "pipeline.only=cold_start"])
    assert sorted(p.name for p in out.iterdir()) == STAGES[:1]
    first = json.loads((out / STAGES[0] / MARKER).read_text())
    # A stage needing an incomplete one is refused.
    with pytest.raises(ConfigError, match="needs stage reasoning_rl"):
        run_pipeline(load_config([*args, "pipeline.only=sft"]), [*args, "pipeline.only=sft"])

    # An attempt at stage 2 that died early leaves a folder without a marker: it starts over.
    (out / STAGES[1]).mkdir()
    (out / STAGES[1] / "metrics.jsonl").write_text('{"step": 1, "junk": true}\n')
    run_pipeline(load_config(args), args)
    assert sorted(p.name for p in out.iterdir()) == STAGES
    for stage in STAGES:
        marker = json.loads((out / stage / MARKER).read_text())
        # Each model a stage makes is evaluated (pipeline.eval) on the held-out problems.
        if marker["kind"] != "rejection_sampling":
            assert marker["eval"]["problems"] == 4 and 0 <= marker["eval"]["pass@1"] <= 1
            assert (out / stage / "eval" / "problems.jsonl").is_file()
    assert json.loads((out / STAGES[0] / MARKER).read_text()) == first  # skipped, not redone

    # Cold start: SFT on worked solutions lowers the loss; its model seeds the RL stage.
    sft = [r for r in read_metrics(out / STAGES[0] / "metrics.jsonl")]
    assert len(sft) == 2 and sft[-1]["sft/nll"] < sft[0]["sft/nll"]
    rl = json.loads((out / STAGES[1] / MARKER).read_text())
    assert rl["model"] == str(out / STAGES[0] / "final")
    records = read_metrics(out / STAGES[1] / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]  # the junk line is gone

    # Rejection sampling: every sample judged, the reasons counted, the merge appended.
    stats = json.loads((out / STAGES[2] / "stats.json").read_text())
    assert stats["samples"] == 8 * 2
    assert sum(stats["reasons"].values()) == stats["samples"]
    rows = [json.loads(line) for line in (out / STAGES[2] / "dataset.jsonl").open()]
    assert len(rows) == stats["kept"] + 4
    assert all(r["source"] == "rejection_sampling" and r["rewards"]["accuracy"] == 1.0
               for r in rows[:stats["kept"]])

    # SFT again from the base model, on that dataset; then RL over a mix of tasks.
    assert json.loads((out / STAGES[3] / MARKER).read_text())["model"].endswith("tiny-random")
    assert len(read_metrics(out / STAGES[3] / "metrics.jsonl")) == 1  # 4+ rows, batch 16
    last = read_metrics(out / STAGES[4] / "metrics.jsonl")[-1]
    assert {"eval/accuracy/arithmetic", "eval/accuracy/reasoning_gym"} <= set(last)


def test_pipeline_config_errors_name_the_stage():
    with pytest.raises(ConfigError, match=r"pipeline.stages\[1\].model.*cold_strat"):
        load_config(["conf=tiny", "pipeline.stages=[{name: cold_start, kind: sft}, "
                     "{name: rl, kind: grpo, model: cold_strat}]"])
    with pytest.raises(ConfigError, match=r"pipeline.stages\[1\].name"):
        load_config(["conf=tiny", "pipeline.stages=[{name: a, kind: sft}, {name: a, kind: sft}]"])
    with pytest.raises(ConfigError, match=r"pipeline.stages\[0\].kind"):
        load_config(["conf=tiny", "pipeline.stages=[{name: a, kind: dpo}]"])
    with pytest.raises(ConfigError, match=r"pipeline\.only"):
        load_config(["conf=r1_tiny", "pipeline.only=nope"])
    from rlsys.pipeline.runner import stage_configs

    cfg = load_config(["conf=tiny", "pipeline.stages=[{name: a, kind: sft, overrides: "
                       "[trainer.stepz=1]}]"])
    with pytest.raises(ConfigError, match=r"pipeline.stages\[0\] \(a\) overrides: unknown"):
        stage_configs(cfg, ["conf=tiny"])
