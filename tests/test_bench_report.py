"""benchmarks.report and the `python -m benchmarks` runner, on small JSON fixtures: no Ray, no
models, no benchmark is run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import __main__ as runner
from benchmarks import report

MACHINE = {"cores": 2, "cpu_model": "Test CPU"}


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / f"{name}.json").write_text(json.dumps(data))


def _rows(text: str, name: str) -> list[list[str]]:
    """The headline table's rows of benchmark `name`, as cells."""
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {name} |")]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    _write(tmp_path, "learner_packing", {
        "machine": MACHINE, "versions": {"torch": "2.13.0+cpu"},
        "figures": {"packed": {"tokens_per_s": 450.0}, "padded": {"tokens_per_s": 300.0}},
        "ratio_vs_padded": {"packed": 1.5}, "target_ratio": 1.5, "meets_target": True})
    _write(tmp_path, "trl_grpo", {  # no target_met: computed from the ratio
        "machine": MACHINE, "versions": {"trl": "1.16.0"},
        "median_step_s": {"rlsys": 8.0, "trl": 10.0}, "target_ratio": 0.5,
        "steps": {"rlsys": [{"step": 1, "seconds": 8.0}, {"step": 2, "seconds": 8.5}],
                  "trl": [{"step": 1, "seconds": 10.0}]},
        "eval_accuracy": {"base": 0.4, "rlsys": 0.7, "trl": 0.6}})
    _write(tmp_path, "weight_sync", {"machine": MACHINE, "target_ratio": 0.8, "rows": [
        {"model": "m", "engines": 1, "gb_per_s": 0.9, "raw_gloo_gb_per_s": 1.0, "ratio": 0.9},
        {"model": "m", "engines": 2, "gb_per_s": 0.5, "raw_gloo_gb_per_s": 1.0}]})
    _write(tmp_path, "smol_learning", {
        "machine": MACHINE, "targets": {"final_eval_accuracy": 0.85, "max_drop_after_step_30":
                                        0.06, "final_eval_format": 0.95, "total_minutes": 30,
                                        "stable_after_step": 30},
        "runs": [{"seed": 0, "summary": {"initial_eval_accuracy": 0.5,
                                         "final_eval_accuracy": 0.86,
                                         "max_drop_after_step_30": 0.03, "final_eval_format": 0.97,
                                         "total_minutes": 31.5},
                  "curve": [{"step": 0, "eval_accuracy": 0.5}, {"step": 40, "eval_accuracy": 0.86}],
                  "per_step": [{"step": 1, "entropy": 0.4, "response_length": 30.0,
                                "no_signal_frac": 0.2}]},
                 {"seed": 1, "summary": {}}]})  # a run without figures: dashes, not a crash
    _write(tmp_path, "sandbox_throughput", {"figures": {}})  # keys missing: dashes
    return tmp_path


def test_report_table_sections_and_plots(results: Path) -> None:
    readme = results / "README.md"
    text = report.build(results, readme)
    assert readme.read_text() == text
    assert "python -m benchmarks.report" in text and "make bench" in text

    for name in ("rollout_throughput",):  # no JSON: a "not run" row, not an error
        assert _rows(text, name) == [[name, "not run", *["–"] * 6]]
    # benchmark, figure, rlsys, baseline, baseline value, ratio, target, met
    packing = _rows(text, "learner_packing")
    assert packing == [["learner_packing", "learner tokens/s, packed", "450", "padded", "300",
                        "1.50x", ">= 1.5x", "yes"]]
    step, accuracy = _rows(text, "trl_grpo")
    assert step[2:] == ["8.00", "TRL GRPOTrainer", "10.0", "0.80x", "<= 0.5x", "no"]
    assert accuracy[2] == "0.7" and accuracy[4] == "0.6" and accuracy[-1] == "–"
    sync = _rows(text, "weight_sync")
    assert [r[5:] for r in sync] == [["0.90x", ">= 0.8x", "yes"], ["0.50x", ">= 0.8x", "no"]]
    smol = _rows(text, "smol_learning")
    assert [(r[1], r[2], r[-1]) for r in smol[:4]] == [
        ("seed 0: final held-out accuracy", "0.86", "yes"),
        ("seed 0: largest drop below its best after step 30", "0.03", "yes"),
        ("seed 0: final format reward", "0.97", "yes"), ("seed 0: minutes", "31.5", "no")]
    assert [r[-1] for r in smol[4:]] == ["–"] * 4  # no summary key: unknown, not "no"
    assert _rows(text, "sandbox_throughput")[0][2] == "–"
    assert not _rows(text, "r1_smol")  # optional and not run: left out

    assert "2 cores, Test CPU" in text and "torch 2.13.0+cpu" in text
    assert "`python -m benchmarks.learner_packing`" in text
    for name in ("learner_packing", "trl_grpo", "weight_sync", "smol_learning"):
        assert (results / "plots" / f"{name}.png").stat().st_size > 0
        assert f"](plots/{name}.png)" in text


def test_core_contention_rows_are_slowdowns_against_the_update_alone(tmp_path: Path) -> None:
    _write(tmp_path, "core_contention", {"machine": MACHINE, "median_s": {
        "none": 4.0, "compute": 4.2, "memory": 5.0}, "slowdown": {"compute": 1.02}})
    rows = _rows(report.build(tmp_path, tmp_path / "README.md"), "core_contention")
    # The script's median of per-round ratios where it has one, else the medians' ratio.
    assert [(r[1], r[2], r[4], r[5]) for r in rows] == [
        ("learner s/update beside compute on the other core (Test CPU)", "4.20", "4.00", "1.02x"),
        ("learner s/update beside memory on the other core (Test CPU)", "5.00", "4.00", "1.25x"),
        ("learner s/update beside engine on the other core (Test CPU)", "–", "4.00", "–")]


def test_report_quick_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "r1_smol.json").write_text("{not json")
    text = report.build(tmp_path, tmp_path / "README.md", quick=True)
    assert "--quick smoke runs" in text
    assert "`python -m benchmarks.smol_learning --quick`" in text
    assert _rows(text, "r1_smol")[0][1].startswith("unreadable")
    assert len([line for line in text.splitlines() if "| not run |" in line]) == 6


def test_runner_selection() -> None:
    assert runner.select([])[0] == list(runner.DEFAULT)
    assert runner.select(["--only", "r1_smol", "trl_grpo"])[0] == ["trl_grpo", "r1_smol"]
    assert "trl_grpo" not in runner.select(["--skip", "trl_grpo"])[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--only", "nope"], "--only: unknown benchmark(s) nope; valid: rollout_throughput"),
    (["--skip", "trl"], "--skip: unknown benchmark(s) trl; valid: rollout_throughput"),
    (["--quick", "--only", "r1_smol"], "no quick mode for r1_smol")])
def test_runner_rejects_bad_names(argv: list[str], message: str,
                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:  # before any benchmark starts
        runner.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_weight_sync_profile_summary_and_note(tmp_path: Path) -> None:
    from benchmarks.weight_sync import top_frames

    stacks = tmp_path / "engine.txt"  # py-spy's raw (collapsed) format: frames;... count
    stacks.write_text("main;loop;rpc;reload;copy 60\nmain;loop;rpc;reload;pack 30\n"
                      "main;idle 10\n")
    frames = top_frames(stacks)
    assert frames["self"] == [("copy", 0.6), ("pack", 0.3), ("idle", 0.1)]
    # "main" is on every sample (the trunk), so it says nothing; the rest is kept.
    assert [f for f, _ in frames["inclusive"]] == ["rpc", "reload", "loop", "copy", "pack",
                                                   "idle"]
    assert top_frames(tmp_path / "missing.txt") == {}

    _write(tmp_path, "weight_sync", {"machine": MACHINE, "rows": [
        {"model": "m", "engines": 1, "gb_per_s": 0.3, "raw_gloo_gb_per_s": 1.0,
         "profile": {"broadcasts": 4, "stacks": "profiles/*.txt", "engine": frames,
                     "learner": {"self": [("wait", 0.7)]}}}]})
    text = report.build(tmp_path, tmp_path / "README.md")
    assert "- engine: 60% copy; 30% pack; 10% idle" in text
    assert "- learner: 70% wait" in text


def test_r1_rows_hold_each_stage_to_its_target() -> None:
    stages = [{"stage": "cold_start", "greedy_accuracy": 0.79, "before_greedy_accuracy": 0.0},
              {"stage": "reasoning_rl", "greedy_accuracy": 0.82},
              {"stage": "rejection_sampling", "kept": 10},
              {"stage": "sft", "greedy_accuracy": 0.77},  # cold start - 0.02: kept, exactly
              {"stage": "all_scenario_rl", "greedy_accuracy": 0.79},  # best (0.82) - 0.03
              {"stage": "distill_student", "greedy_accuracy": 0.31,
               "before_greedy_accuracy": 0.05, "parameters": 99e6}]
    rows = {r.figure: r for r in report.r1_rows({"stages": stages, "total_minutes": 46.0})}
    assert [(r.value, r.target, r.met) for r in rows.values()] == [
        (0.79, "–", None), (0.82, ">= 0.82", True), (0.77, ">= 0.77", True),
        (0.79, ">= 0.8", False), (0.31, "gain >= 0.25, to >= 0.3", True),
        (46.0, "<= 45 min", False)]
    assert "distill_student greedy accuracy (99.0M)" in rows


def test_async_rows_hold_in_flight_to_on_policy_time_to_accuracy() -> None:
    from benchmarks.async_rollouts import learning_curve

    def records(step_s: float, accuracies: dict[int, float]) -> list[dict]:
        return [{"step": 0, "eval/accuracy": 0.4}] + [
            {"step": s, "time/step": step_s,
             **({"eval/accuracy": accuracies[s]} if s in accuracies else {})}
            for s in range(1, 7)]

    on_policy = learning_curve(records(50.0, {3: 0.7, 6: 0.8}), target=0.75)
    assert on_policy["curve"] == [[0, 0.0, 0.4], [3, 150.0, 0.7], [6, 300.0, 0.8]]
    assert (on_policy["seconds_to_target"], on_policy["steps_to_target"]) == (300.0, 6)
    inflight = learning_curve(records(40.0, {3: 0.76, 6: 0.8}), target=0.75)
    never = learning_curve(records(40.0, {3: 0.6, 6: 0.7}), target=0.75)
    assert never["seconds_to_target"] is None

    def rows(inflight_run: dict) -> dict[str, report.Row]:
        runs = [{"mode": "on_policy", "median_step_s": 50.0, **on_policy},
                {"mode": "inflight", "median_step_s": 40.0, **inflight_run}]
        return {r.figure: r for r in report.async_rows({"layouts": {"split": {"runs": runs}}})}

    faster = rows(inflight)["training s to 0.75 held-out accuracy, inflight, split cores"]
    assert (faster.value, faster.baseline_value, faster.met) == (120.0, 300.0, True)
    assert rows(never)["training s to 0.75 held-out accuracy, inflight, split cores"].met is False
    assert rows(inflight)["training s to 0.75 held-out accuracy, on_policy, split cores"].value \
        == 300.0


def test_async_seeds_compare_medians_and_a_missed_target_counts_as_slowest() -> None:
    from benchmarks.async_rollouts import against_on_policy, by_mode

    def one(mode: str, seed: int, step_s: float, to_target: float | None) -> dict:
        return {"mode": mode, "seed": seed, "median_step_s": step_s, "median_gen_s": 10.0,
                "median_update_s": 15.0, "target_accuracy": 0.75,
                "seconds_to_target": to_target, "steps_to_target": None}

    runs = []
    for seed, (on, inflight) in enumerate([(600.0, None), (500.0, 400.0), (900.0, 700.0)]):
        pair = [one("on_policy", seed, 22.0, on), one("inflight", seed, 20.0, inflight)]
        against_on_policy(pair)
        runs += pair
    assert runs[1]["step_over_max_gen_update"] == round(20.0 / 15.0, 3)
    modes = by_mode(runs)
    assert modes["on_policy"]["seconds_to_target"] == 600.0
    assert modes["inflight"]["seconds_to_target_by_seed"] == [None, 400.0, 700.0]
    assert modes["inflight"]["seconds_to_target"] == 700.0  # ranks 400, 700, never
    assert modes["inflight"]["seeds"] == [0, 1, 2]
    # two of three seeds never reaching the target: no median time
    runs[3]["seconds_to_target"] = None
    assert by_mode(runs)["inflight"]["seconds_to_target"] is None

    rows = {r.figure: r for r in report.async_rows(
        {"layouts": {"split": {"runs": runs, "modes": modes}}})}
    label = "training s to 0.75 held-out accuracy, inflight, split cores, median of 3 seeds"
    assert (rows[label].value, rows[label].baseline_value, rows[label].met) == (
        700.0, 600.0, False)
    assert rows["step s, inflight, split cores, median of 3 seeds"].value == 20.0


def test_async_notes_name_the_command_line_settings_and_the_seeds() -> None:
    runs = [{"mode": m, "seed": s} for s in (1, 0) for m in ("on_policy", "inflight")]
    notes = report.async_notes({"steps": 40, "eval_every": 5,
                                "overrides": ["rollout.on_policy_steps=5"],
                                "layouts": {"split": {"runs": runs},
                                            "shared": {"runs": runs[:1], "note": "older"}}})
    assert notes[0] == ("- runs: 40 steps, held-out evaluation every 5; settings given on its "
                        "command line: `rollout.on_policy_steps=5`")
    assert notes[1:3] == ["- split cores: seeds 0, 1", "- shared cores: seeds 1 (older)"]


def test_async_keep_adds_other_seeds_and_refuses_other_overrides(tmp_path: Path) -> None:
    import argparse

    from benchmarks.async_rollouts import demo_settings, recorded_runs
    from benchmarks.common import merge_seeds

    path = tmp_path / "async_rollouts.json"
    args = argparse.Namespace(steps=40, eval_every=5)
    assert recorded_runs(path, args, []) == {}  # nothing recorded yet
    recorded = [{"mode": m, "seed": s} for s in (0, 1) for m in ("on_policy", "inflight")]
    path.write_text(json.dumps({"steps": 40, "eval_every": 5, "overrides": [],
                                "layouts": {"split": {"runs": recorded}}}))
    with pytest.raises(SystemExit, match=r"differ in demo "):  # recorded before demo settings
        recorded_runs(path, args, [])
    demo = demo_settings()
    assert "trainer.steps" not in demo and "rollout.max_staleness" not in demo  # set per run
    for key, other in (("rollout.prompts_per_step", 8), ("algorithm.clip_high", 0.2)):
        path.write_text(json.dumps({"steps": 40, "eval_every": 5, "overrides": [],
                                    "demo": {**demo, key: other},
                                    "layouts": {"split": {"runs": recorded}}}))
        with pytest.raises(SystemExit, match=rf"differ in demo\.{key} .*={other}\)"):
            recorded_runs(path, args, [])
    path.write_text(json.dumps({"steps": 40, "eval_every": 5, "overrides": [], "demo": demo,
                                "layouts": {"split": {"runs": recorded}}}))
    new = [{"mode": m, "seed": 1, "new": True} for m in ("on_policy", "inflight")]
    merged = merge_seeds(recorded_runs(path, args, [])["split"], new)
    assert [(r["seed"], r["mode"], "new" in r) for r in merged] == [
        (0, "on_policy", False), (0, "inflight", False),
        (1, "on_policy", True), (1, "inflight", True)]
    with pytest.raises(SystemExit, match=r"differ in overrides"):
        recorded_runs(path, args, ["learner.lr=1e-5"])


def test_cpu_precision_rows_compare_float32_with_bfloat16() -> None:
    rows = report.cpu_precision_rows({
        "machine": {"cpu_model": "AMD EPYC"}, "native_bf16": False, "auto_picks": "float32",
        "results": {"engine": {"float32": {"tokens_per_s": 106.5},
                               "bfloat16": {"tokens_per_s": 28.2}},
                    "learner": {"float32": {"median_s": 5.0}, "bfloat16": {"median_s": 100.0}}}})
    engine, learner, auto = rows
    assert "bf16 emulated" in engine.figure and "AMD EPYC" in engine.figure
    assert (engine.value, engine.baseline_value) == (106.5, 28.2)
    assert engine.ratio == pytest.approx(106.5 / 28.2)
    assert (learner.value, learner.baseline_value, learner.ratio) == (5.0, 100.0, 0.05)
    assert auto.value == "float32"
    assert report.cpu_precision_rows({})[0].value is None  # not run: dashes, not a crash
