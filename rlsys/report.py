"""`python -m rlsys.report RUN_DIR [--out DIR]`: a Markdown page with PNG plots of a run;
`python -m rlsys.report RUN_DIR RUN_DIR ... --out DIR` compares runs (e.g. seeds).

metrics.jsonl holds everything, but a few hundred lines of forty numbers each is not something
a person reads to see whether a run learned. This page answers that at a glance: reward parts,
held-out accuracy, response length and reflections, KL / entropy / clip fraction and the time
per step by phase, plus a first / last / best table. For a pipeline run (`NN-<name>/` stage
folders) it adds a table of the stages with their held-out figures, bar plots of accuracy and
time per stage, and each model-making stage's own plots.

Only what the files hold is drawn: a plot whose metrics are absent is left out, a step missing
a metric (evaluation runs every N steps) or holding NaN/inf is skipped for that line. It reads
files only (no Ray, no torch), so it runs on a laptop on a copied run folder, or beside a run
still in progress. Comparing runs draws held-out accuracy, entropy, response length and the
fraction of groups without signal, a line per run, and tabulates each run's accuracy.

Output: `RUN_DIR/report/` (report.md and the PNGs it links relatively), or `--out DIR`. Bad
input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlsys.metrics import read_metrics

# Mirrors rlsys.pipeline.runner (MARKER, MODEL_STAGES); not imported because the runner pulls in
# Ray and torch, which a report on a laptop must not need.
STAGE_MARKER = "stage.json"
STAGE_TRAINED = "trained.json"
MODEL_STAGES = ("sft", "grpo")
_STAGE_DIR = re.compile(r"^(\d{2,})-(.+)$")

#: Phases of a GRPO step in the order they run; time/step is their sum.
TIME_PHASES = ("gen", "reward", "update", "sync")
#: Metrics of the first/last/best table, in this order, and which way is better (None: neither).
KEY_METRICS: dict[str, bool | None] = {
    "reward/total": True, "reward/accuracy": True, "reward/format": True,
    "eval/accuracy": True, "eval/pass@1": True,
    "response/length_mean": None, "response/reflections": None,
    "train/kl": None, "train/entropy": None, "sft/nll": False, "time/step": None,
}


class ReportError(Exception):
    """Bad input (missing folder, malformed file): reported as one line and exit code 2."""


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Run:
    """The metrics of one run folder (a GRPO run, or one stage of a pipeline)."""

    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r if k not in ("step", "time")}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key` at the steps where it is a finite number.

        A resumed run may log a step twice; the later record wins, as it is the one the
        resumed run continued from.
        """
        points: dict[float, float] = {}
        for record in self.records:
            value = _number(record.get(key))
            step = _number(record.get("step"))
            if value is not None and step is not None:
                points[step] = value
        steps = sorted(points)
        return steps, [points[s] for s in steps]


def _number(value: Any) -> float | None:
    """A finite float, or None. MetricsLogger writes NaN/inf as the strings "nan"/"inf"."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_run(folder: Path) -> Run:
    """A run folder's metrics.jsonl (required) and config.yaml (optional)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{folder}: no metrics.jsonl")
    notes: list[str] = []
    try:
        records = read_metrics(path, notes)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # a malformed line, named by file and line number
        raise ReportError(str(exc)) from None
    return Run(folder, records, _read_config(folder / "config.yaml", notes), notes)


def _read_config(path: Path, notes: list[str]) -> dict[str, Any] | None:
    # The config only decorates the header, so an unreadable one is a note, not an error.
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); config omitted")
        return None
    return config if isinstance(config, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: malformed (not a JSON object)")
    return data


@dataclass
class Stage:
    """One `NN-<name>/` folder of a pipeline run."""

    folder: Path
    index: int
    name: str
    record: dict[str, Any] | None  # stage.json, or trained.json of a not yet evaluated stage
    complete: bool
    stats: dict[str, Any] | None  # rejection sampling's stats.json

    @property
    def kind(self) -> str:
        return str((self.record or {}).get("kind", "?"))

    @property
    def evaluation(self) -> dict[str, Any]:
        return (self.record or {}).get("eval") or {}

    def cons(self) -> tuple[str, float | None]:
        """("cons@k", value) of the stage's evaluation; k is the evaluation's own."""
        key = next((k for k in self.evaluation if k.startswith("cons@")), "cons@k")
        return key, _number(self.evaluation.get(key))


def find_stages(root: Path) -> list[Stage]:
    """The stage folders of a pipeline run, in order; complete or not (a run in progress)."""
    stages = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _STAGE_DIR.match(folder.name)
        if match is None:
            continue
        marker = _read_json(folder / STAGE_MARKER)
        record = marker if marker is not None else _read_json(folder / STAGE_TRAINED)
        if record is None and not (folder / "metrics.jsonl").is_file():
            continue
        stages.append(Stage(folder, int(match.group(1)), match.group(2), record,
                            marker is not None, _read_json(folder / "stats.json")))
    return stages


# --- plotting ---------------------------------------------------------------------------------


def _figure(rows: int = 1, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure on the Agg canvas: no pyplot, no global backend, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    return fig, list(axes)


def _line(ax: Any, xs: Sequence[float], ys: Sequence[float], label: str, **kw: Any) -> None:
    """One metric over steps. Per-step RL metrics are noisy: past 30 points the raw line is
    drawn faint under a moving average, which is what the eye wants to follow."""
    if len(xs) <= 30:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 12 else None, markersize=4, **kw)
        return
    import numpy as np

    window = max(3, len(ys) // 20)
    smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
    (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8, **kw)
    ax.plot(xs[window - 1:], smooth, color=raw.get_color(), label=f"{label} (mean of {window})",
            **kw)


def _save(fig: Any, out: Path, name: str, made: list[tuple[str, str]], title: str) -> None:
    fig.savefig(out / name, dpi=100)
    made.append((title, name))


def _lines_plot(run: Run, keys: Sequence[str], title: str, ylabel: str, out: Path, name: str,
                made: list[tuple[str, str]], label: Callable[[str], str] | None = None) -> None:
    """One axis with a line per present key; nothing is written if none has a point."""
    present = [(k, *series) for k in keys if (series := run.series(k))[0]]
    if not present:
        return
    fig, (ax,) = _figure()
    for key, xs, ys in present:
        _line(ax, xs, ys, label(key) if label else key)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(fontsize="small")
    _save(fig, out, name, made, title)


def _panels_plot(run: Run, keys: Sequence[str], title: str, out: Path, name: str,
                 made: list[tuple[str, str]]) -> None:
    """One panel per present key (their scales differ: KL ~1e-3, entropy ~1, tokens ~100)."""
    present = [(k, *series) for k in keys if (series := run.series(k))[0]]
    if not present:
        return
    fig, axes = _figure(len(present), height=2.4)
    for ax, (key, xs, ys) in zip(axes, present, strict=True):
        _line(ax, xs, ys, key)
        ax.set_ylabel(key.split("/", 1)[1])
        ax.legend(fontsize="small", loc="best")
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    _save(fig, out, name, made, title)


def _time_plot(run: Run, out: Path, name: str, made: list[tuple[str, str]]) -> None:
    """Seconds per step stacked by phase, so a slow phase shows as a thick band; an SFT stage
    logs only time/step, drawn as one band."""
    phases = [p for p in TIME_PHASES if run.series(f"time/{p}")[0]] or (
        ["step"] if run.series("time/step")[0] else [])
    if not phases:
        return
    steps = sorted({s for p in phases for s in run.series(f"time/{p}")[0]})
    columns = []
    for phase in phases:
        values = dict(zip(*run.series(f"time/{phase}"), strict=True))
        columns.append([max(values.get(s, 0.0), 0.0) for s in steps])
    fig, (ax,) = _figure()
    if len(steps) <= 60:  # bars read better than areas for a handful of steps
        bottom = [0.0] * len(steps)
        for phase, column in zip(phases, columns, strict=True):
            ax.bar(steps, column, bottom=bottom, label=phase, width=0.8)
            bottom = [b + c for b, c in zip(bottom, column, strict=True)]
    else:
        ax.stackplot(steps, columns, labels=phases, alpha=0.85)
    ax.set(title="time per step", xlabel="step", ylabel="seconds")
    ax.legend(fontsize="small")
    _save(fig, out, name, made, "time per step")


def run_plots(run: Run, out: Path, prefix: str = "") -> list[tuple[str, str]]:
    """Write the plots of one run folder's metrics; returns (title, file name) of each."""
    keys = run.keys()
    made: list[tuple[str, str]] = []
    rewards = sorted(k for k in keys if k.startswith("reward/") and k != "reward/error")
    _lines_plot(run, rewards, "reward parts (training samples)", "mean reward", out,
                f"{prefix}reward.png", made, label=lambda k: k.removeprefix("reward/"))
    tasks = sorted(k for k in keys if k.startswith("eval/accuracy/"))
    _lines_plot(run, ["eval/accuracy", "eval/pass@1", *tasks], "held-out accuracy",
                "accuracy", out, f"{prefix}accuracy.png", made,
                label=lambda k: {"eval/accuracy": "greedy"}.get(k, k.removeprefix("eval/")))
    _panels_plot(run, ["response/length_mean", "response/length_max", "response/reflections"],
                 "responses", out, f"{prefix}response.png", made)
    _panels_plot(run, ["train/kl", "train/entropy", "train/clip_frac", "groups/no_signal_frac"],
                 "policy update", out, f"{prefix}update.png", made)
    _panels_plot(run, ["sft/nll", "sft/kd"], "SFT loss", out, f"{prefix}sft.png", made)
    _time_plot(run, out, f"{prefix}time.png", made)
    return made


def _bar_plot(labels: Sequence[str], groups: dict[str, list[float | None]], title: str,
              ylabel: str, path: Path, top: float | None = None) -> None:
    """Grouped bars, one group per label; a None value leaves its bar out."""
    fig, (ax,) = _figure(height=4.0)
    width = 0.8 / max(len(groups), 1)
    for i, (name, values) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j, v in enumerate(values)
              if v is not None]
        bars = ax.bar(xs, [v for v in values if v is not None], width=width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set(title=title, ylabel=ylabel)
    if top is not None:
        ax.set_ylim(0, top)
    if len(groups) > 1:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


# --- the page ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    if number is None:
        return "–"
    if isinstance(value, int) or (number.is_integer() and 10 <= abs(number) < 1e6):
        return str(int(number))  # counts, token lengths: 96, not 96.000
    return f"{number:.{digits}g}" if abs(number) < 1e-2 else f"{number:.{digits}f}"


def _step(step: float) -> str:
    return str(int(step)) if step.is_integer() else f"{step:g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _config_summary(config: dict[str, Any] | None) -> list[str]:
    """A few header lines (model, task, steps, G, prompts per step) and a blank line."""
    if not config:
        return []

    def get(dotted: str) -> Any:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    items = [("model", "model.path"), ("task", "data.task"), ("steps", "trainer.steps"),
             ("G", "rollout.group_size"), ("prompts per step", "rollout.prompts_per_step")]
    lines = [f"- {label}: `{get(key)}`" for label, key in items if get(key) is not None]
    return [*lines, ""] if lines else []


def _summary_rows(run: Run) -> list[list[str]]:
    rows = []
    for key, higher in KEY_METRICS.items():
        steps, values = run.series(key)
        if not steps:
            continue
        best = "–"
        if higher is not None:
            i = max(range(len(values)), key=lambda j: values[j] if higher else -values[j])
            best = f"{_fmt(values[i])} (step {_step(steps[i])})"
        rows.append([f"`{key}`", _fmt(values[0]), _fmt(values[-1]), best])
    return rows


def _run_body(run: Run, out: Path, prefix: str, heading: str) -> list[str]:
    """The table and plots of one run folder, under markdown headings of level `heading`."""
    lines: list[str] = []
    steps = [s for s in (_number(r.get("step")) for r in run.records) if s is not None]
    times = [t for t in (_number(r.get("time")) for r in run.records) if t is not None]
    if steps:
        span = f", {(times[-1] - times[0]) / 60:.1f} minutes" if len(times) > 1 else ""
        lines.append(f"{len(run.records)} logged steps, step {_step(min(steps))} to "
                     f"{_step(max(steps))}{span}.")
    else:
        lines.append("metrics.jsonl holds no steps yet.")
    lines += [f"> note: {note}" for note in run.notes]
    rows = _summary_rows(run)
    if rows:
        lines += ["", *_table(["metric", "first", "last", "best (step)"], rows)]
    for title, name in run_plots(run, out, prefix):
        lines += ["", f"{heading} {title}", "", f"![{title}]({name})"]
    return lines


def single_report(run: Run, out: Path) -> str:
    """report.md of a GRPO (or SFT) run folder; writes its plots into `out`."""
    run_dir = run.path
    lines = [f"# Run report: {run_dir.name}", "", f"Run folder: `{run_dir.resolve()}`", ""]
    lines += _config_summary(run.config) + _run_body(run, out, "", "##")
    return "\n".join(lines) + "\n"


def _stage_row(stage: Stage) -> list[str]:
    seconds = _number((stage.record or {}).get("seconds"))
    kept = "–"
    if stage.stats is not None:
        kept = f"{_fmt(stage.stats.get('kept'))}/{_fmt(stage.stats.get('samples'))}"
    cons_key, cons = stage.cons()
    state = "" if stage.complete else (
        " (in progress)" if stage.record is None else " (trained, not yet evaluated)")
    before = ((stage.record or {}).get("eval_before") or {}).get("greedy_accuracy")
    params = _number((stage.record or {}).get("parameters"))
    return [f"{stage.index:02d}", stage.name + state, stage.kind,
            _fmt(seconds / 60 if seconds is not None else None, 2),
            f"{params / 1e6:.0f}M" if params else "–", _fmt(before),
            _fmt(stage.evaluation.get("greedy_accuracy")), _fmt(stage.evaluation.get("pass@1")),
            f"{_fmt(cons)}" + (f" ({cons_key})" if cons is not None else ""), kept]


def _plotted(stage: Stage) -> bool:
    """Whether a stage gets its own section: it makes a model, or is still running (no record
    yet says what it makes)."""
    return stage.kind in MODEL_STAGES or stage.record is None


def pipeline_report(root: Path, stages: list[Stage], runs: dict[Path, Run], out: Path) -> str:
    """report.md of a pipeline run: the stage table, bar plots, and each model stage's plots
    (`runs`: the metrics of the stage folders that have them)."""
    lines = [f"# Pipeline report: {root.name}", "", f"Run folder: `{root.resolve()}`", ""]
    notes: list[str] = []
    lines += _config_summary(_read_config(root / "config.yaml", notes))
    total = sum(_number((s.record or {}).get("seconds")) or 0.0 for s in stages)
    lines.append(f"{len(stages)} stages, {sum(s.complete for s in stages)} complete, "
                 f"{total / 60:.1f} minutes of stage time.")
    lines += [f"> note: {note}" for note in notes]
    lines += ["", *_table(["#", "stage", "kind", "minutes", "parameters", "greedy before",
                           "greedy", "pass@1", "cons@k", "kept/samples"],
                          [_stage_row(s) for s in stages])]
    for stage in stages:
        reasons = (stage.stats or {}).get("reasons")
        if isinstance(reasons, dict) and reasons:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(),
                                                              key=lambda kv: -kv[1]))
            lines += ["", f"{stage.name}: samples by rejection reason: {counts}."]

    evaluated = [s for s in stages if s.evaluation]
    groups = {"greedy": [_number(s.evaluation.get("greedy_accuracy")) for s in evaluated],
              "pass@1": [_number(s.evaluation.get("pass@1")) for s in evaluated],
              "cons@k": [s.cons()[1] for s in evaluated]}
    groups = {k: v for k, v in groups.items() if any(x is not None for x in v)}
    if groups:  # some stage was evaluated
        _bar_plot([s.name for s in evaluated], groups, "held-out accuracy per stage",
                  "accuracy", out / "stages_accuracy.png", top=1.05)
        lines += ["", "## Held-out accuracy per stage", "",
                  "![held-out accuracy per stage](stages_accuracy.png)"]
    minutes = {s.name: _number((s.record or {}).get("seconds")) for s in stages}
    timed = {name: m / 60 for name, m in minutes.items() if m is not None}
    if timed:
        _bar_plot(list(timed), {"minutes": list(timed.values())}, "time per stage", "minutes",
                  out / "stages_time.png")
        lines += ["", "## Time per stage", "", "![time per stage](stages_time.png)"]

    for stage in filter(_plotted, stages):
        kind = stage.kind if stage.record is not None else "in progress"
        lines += ["", f"## Stage {stage.index:02d}-{stage.name} ({kind})", ""]
        run = runs.get(stage.folder)
        if run is None:
            lines.append("No metrics.jsonl in this stage's folder.")
            continue
        lines += _config_summary(run.config) + _run_body(run, out, f"{stage.folder.name}_", "###")
    return "\n".join(lines) + "\n"


#: What a comparison of runs (e.g. one config over seeds) draws, one panel each, a line per run:
#: whether it learned, and the usual causes when it did not (entropy collapse, groups without
#: signal, responses growing or shrinking).
COMPARED = ("eval/accuracy", "train/entropy", "response/length_mean", "groups/no_signal_frac")


def _run_label(run: Run) -> str:
    seed = ((run.config or {}).get("trainer") or {}).get("seed")
    return run.path.name + (f" (seed {seed})" if seed is not None else "")


def compare_report(runs: list[Run], out: Path) -> str:
    """report.md comparing runs on the same axes (COMPARED), with each run's first, last and
    best held-out accuracy and the spread of the last over the runs."""
    lines = ["# Runs compared", "", *(f"- `{r.path.resolve()}`: {_run_label(r)}" for r in runs),
             ""]
    rows, finals = [], []
    for run in runs:
        steps, acc = run.series("eval/accuracy")
        if not steps:
            rows.append([_run_label(run), "–", "–", "–", "–"])
            continue
        after = [a for s, a in zip(steps, acc, strict=True) if s >= 30] or acc
        finals.append(acc[-1])
        rows.append([_run_label(run), _fmt(acc[0]), f"{_fmt(acc[-1])} (step {_step(steps[-1])})",
                     _fmt(max(acc)), _fmt(min(after))])
    lines += _table(["run", "first", "last", "best", "lowest from step 30"], rows)
    if len(finals) > 1:
        mean = sum(finals) / len(finals)
        lines += ["", f"Last held-out greedy accuracy over {len(finals)} runs: mean "
                  f"{mean:.3f}, min {min(finals):.3f}, max {max(finals):.3f}."]
    present = [k for k in COMPARED if any(r.series(k)[0] for r in runs)]
    if present:
        fig, axes = _figure(len(present), height=2.6)
        for ax, key in zip(axes, present, strict=True):
            for run in runs:
                xs, ys = run.series(key)
                if xs:
                    _line(ax, xs, ys, _run_label(run))
            ax.set_ylabel(key.split("/", 1)[1])
            ax.legend(fontsize="x-small", loc="best")
        axes[0].set_title("runs compared")
        axes[-1].set_xlabel("step")
        fig.savefig(out / "compare.png", dpi=100)
        lines += ["", "![runs compared](compare.png)"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write `report.md` and its PNGs for a GRPO run or pipeline run folder; returns its path."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    stages = find_stages(run_dir)
    if not stages and not (run_dir / "metrics.jsonl").is_file():
        raise ReportError(f"{run_dir}: neither a run (no metrics.jsonl) nor a pipeline run "
                          "(no NN-<name>/stage.json folders)")
    # Everything is read before anything is written: bad input leaves no half-made report.
    if stages:
        runs = {s.folder: read_run(s.folder) for s in stages
                if _plotted(s) and (s.folder / "metrics.jsonl").is_file()}
    else:
        run = read_run(run_dir)
    out = out or run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {out}: {exc.strerror}") from None
    text = pipeline_report(run_dir, stages, runs, out) if stages else single_report(run, out)
    path = out / "report.md"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlsys.report",
        description="Write a Markdown report with PNG plots of a run or pipeline run folder, "
                    "or compare several runs (e.g. seeds) on the same axes.")
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                        help="a run's trainer.output_dir (metrics.jsonl) or a pipeline's; "
                             "several runs' folders to compare them")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/report; required to compare)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # usage errors (2) and --help (0), as a return value
        return int(exc.code or 0)
    try:
        if len(args.run_dirs) == 1:
            path = write_report(args.run_dirs[0], args.out)
        else:
            path = write_comparison(args.run_dirs, args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def write_comparison(run_dirs: Sequence[Path], out: Path | None) -> Path:
    """Write `out/report.md` and `out/compare.png` comparing GRPO run folders."""
    if out is None:
        raise ReportError("comparing runs needs --out DIR")
    runs = [read_run(d) for d in run_dirs]  # all read before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {out}: {exc.strerror}") from None
    path = out / "report.md"
    path.write_text(compare_report(runs, out))
    return path


if __name__ == "__main__":
    sys.exit(main())
