"""Per-step metrics and where they go.

Always: one JSON line per step in `<output_dir>/metrics.jsonl` (the record `rlsys.report` and
the resume logic read). Optionally: TensorBoard events, Weights & Biases (`trainer.wandb_project`,
needs the `wandb` extra) and the Ray dashboard: every numeric step metric becomes a
`ray.util.metrics` gauge `rlsys_<key>` tagged with the run's name, which Ray exports to
Prometheus (the dashboard's Metrics view, `ray_rlsys_*` series) from the node's metrics port.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlsys.rewards import is_correct


class MetricsLogger:
    """Appends `{"step": s, "time": t, **metrics}` lines and mirrors scalars to the sinks."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, *,
                 wandb: dict[str, Any] | None = None, dashboard: bool = False,
                 run_name: str | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_name = run_name or Path(output_dir).resolve().name
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        self._wandb = _start_wandb(wandb, self.run_name, Path(output_dir)) if wandb else None
        self._dashboard = DashboardGauges(self.run_name) if dashboard else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        scalars = {k: float(v) for k, v in clean.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._dashboard is not None:
            self._dashboard.set(scalars | {"step": float(step)})

    def drop_after(self, step: int) -> None:
        """Forget the records after `step`: a run rolled back to that step's checkpoint (a
        learner restart) logs them again."""
        self._file.close()
        truncate_metrics(self.path, step)
        self._file = self.path.open("a", buffering=1)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(metrics_path: str | Path, last_step: int) -> int:
    """Drop records after `last_step` (logged after the checkpoint a run resumes or is rolled
    back to).

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


class DashboardGauges:
    """Step metrics as Ray gauges, `rlsys_<key>` with "/" and other non-[a-z0-9_] characters
    turned into "_", tagged `run=<run name>` so that runs sharing a cluster stay apart.

    Gauges are created on first use: the set of keys depends on the configuration (per-task
    accuracies, reward parts). Must be used inside a connected Ray driver or actor.
    """

    def __init__(self, run_name: str) -> None:
        self.tags = {"run": run_name}
        self._gauges: dict[str, Any] = {}

    def set(self, values: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in values.items():
            if not math.isfinite(value):
                continue
            name = gauge_name(key)
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=f"rlsys step metric {key}",
                                           tag_keys=("run",))
            self._gauges[name].set(value, tags=self.tags)


def gauge_name(key: str) -> str:
    """The Prometheus-safe gauge name of a metric key: "eval/pass@1" -> "rlsys_eval_pass_1"."""
    return "rlsys_" + re.sub(r"[^a-z0-9_]+", "_", key.lower()).strip("_")


def _start_wandb(options: dict[str, Any], run_name: str, output_dir: Path) -> Any:
    """A W&B run (`options`: project, and optionally entity, mode, config)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("trainer.wandb_project is set but the wandb package is missing: "
                          "pip install 'rlsys[wandb]' (or unset trainer.wandb_project)") from None
    # One W&B run per output directory: a resumed run continues its W&B run.
    run_id = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=options["project"], entity=options.get("entity"),
                      mode=options.get("mode"), name=run_name, config=options.get("config"),
                      dir=str(output_dir), id=run_id, resume="allow")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than failing
    return value


def read_metrics(path: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file; an unreadable file raises OSError.

    A malformed line (not a JSON object with a numeric "step") is a ValueError naming the file
    and line, except an unterminated last line: MetricsLogger writes whole lines, so that is one
    a live run is still writing, skipped with a note appended to `notes` (if given).
    """
    path = Path(path)
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: still being written
                if notes is not None:
                    notes.append(f"{path.name} line {number} is incomplete (a live run?): skipped")
                continue
            raise ValueError(f"{path}:{number}: malformed metrics line ({exc.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            raise ValueError(f'{path}:{number}: malformed metrics line (no numeric "step")')
        records.append(record)
    return records


def mean_parts(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every reward part over the scores that have it.

    In a mixed-task run tasks weigh different parts, so a part is averaged over the problems
    whose reward includes it, not counted as 0 for the others.
    """
    parts = dict.fromkeys(key for score in scores for key in score)  # in first-seen order
    values = {part: [score[part] for score in scores if part in score] for part in parts}
    return {part: sum(v) / len(v) for part, v in values.items()}


def solved_fractions(groups: Sequence[Any]) -> dict[str, float]:
    """The fractions of `groups` with every completion correct ("groups/all_correct_frac")
    and with none correct ("groups/none_correct_frac"), by the one rule for correct
    (rlsys.rewards.is_correct).

    Once the other reward parts (format) agree within a group, both kinds carry no signal, for
    opposite reasons: the first are problems the policy has learned (dynamic sampling only pays
    to find the others), the second problems it cannot yet solve once in G samples, which only
    more exploration (a hotter temperature, larger groups) brings into reach."""
    correct = [[is_correct(s) for s in g.scores] for g in groups if g.scores]
    if not correct:
        return {}
    return {"groups/all_correct_frac": statistics.fmean(all(c) for c in correct),
            "groups/none_correct_frac": statistics.fmean(not any(c) for c in correct)}


def reflection_count(text: str, phrases: Sequence[str]) -> int:
    """How often `text` uses any of the reflection phrases ("wait", "let me check", ...), as
    whole words, ignoring case: the "aha moment" signal R1-Zero reports rising during RL."""
    if not phrases:
        return 0
    pattern = r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


class PhaseTimer:
    """Wall-clock seconds of a step's phases: `with timer.phase("update"): ...` adds the time
    spent inside to `timer.seconds["update"]`; `timer.total()` is the time since it was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def step_metrics(batch: Any, learner: dict[str, float], sync: dict[str, float],
                 timer: PhaseTimer, *, trained_version: int, reflection_words: Sequence[str],
                 advantages: Any = None) -> dict[str, float]:
    """The metrics a GRPO step logs, from what the step produced.

    `batch` is the step's rlsys.scheduler.Batch: reward and response statistics describe every
    group drawn (the current policy), staleness the groups trained on. `learner` is the
    learner group's train_step figures (empty when nothing was trained), `sync` the weight
    broadcast's, `timer` the step's phases ("sample", "update", "sync").
    """
    drawn_samples = [s for g in batch.drawn for s in g.samples]
    trained_samples = [s for g in batch.groups for s in g.samples]
    lengths = [len(s["token_ids"]) for s in drawn_samples]
    stats = {f"reward/{k}": v for k, v in mean_parts([sc for g in batch.drawn
                                                       for sc in g.scores]).items()}
    stats |= {f"train/{k}": v for k, v in learner.items() if not k.startswith("time/")}
    stats |= {
        "groups/no_signal_frac": statistics.fmean(not g.has_signal for g in batch.drawn),
        **solved_fractions(batch.drawn),
        "groups/trained": len(batch.groups),
        "rollout/rounds": batch.rounds, "data/skipped_overlong": batch.skipped,
        "rollout/prompts": len(batch.drawn), "rollout/samples": len(drawn_samples),
        "response/length_mean": statistics.fmean(lengths),
        "response/length_max": max(lengths),
        "response/reflections": statistics.fmean(reflection_count(s["text"], reflection_words)
                                                 for s in drawn_samples),
        "response/truncated_frac": statistics.fmean(s["finish_reason"] == "length"
                                                    for s in drawn_samples),
        "time/gen": batch.gen_s, "time/gen_wait": batch.gen_wait_s,
        "time/reward": batch.reward_s,
        "time/update": timer.seconds.get("update", 0.0),
        "time/sync": timer.seconds.get("sync", 0.0), "time/step": timer.total(),
        "throughput/gen_tokens_per_s": sum(lengths) / max(batch.gen_s, 1e-9),
        "time/sync_wait": sync.get("wait_s", 0.0),
    }
    # The weight sync's own figures (EngineFleet.send_weights): bytes on the wire, the changed
    # fraction, and its time split into the learner's cast/encode, its wait on the wire, the
    # engines' loading and the window in which they could not generate; "staged" when the cast
    # was done in the update (learner.stage_weights, its seconds in train/stage_weights_s).
    stats |= {f"sync/{key}": sync.get(key, 0.0)
              for key in ("bytes", "seconds", "changed_frac", "convert_s", "transfer_s",
                          "load_s", "gen_blocked_s", "delta", "staged")}
    if trained_samples:
        # Versions behind the policy that trained on them (0 = on-policy).
        staleness = [trained_version - s["weight_version"] for s in trained_samples]
        stats |= {"rollout/staleness_mean": statistics.fmean(staleness),
                  "rollout/staleness_max": max(staleness)}
        if all("token_versions" in s for s in trained_samples):
            # Continuous generation: a response may span versions; each token has its own age.
            token_ages = [trained_version - v for s in trained_samples for v in s["token_versions"]]
            stats |= {"rollout/token_staleness_mean": statistics.fmean(token_ages or [0]),
                      "rollout/token_staleness_max": max(token_ages, default=0),
                      "rollout/cross_version_frac": statistics.fmean(
                          len(set(s["token_versions"])) > 1 for s in trained_samples)}
    if learner:
        stats |= {"advantage/abs_mean": float(advantages.abs().mean()),
                  "time/ref_and_old_logprobs": learner["time/ref_and_old_logprobs"],
                  "throughput/train_tokens_per_s": learner["tokens_per_s"]}
    return stats
