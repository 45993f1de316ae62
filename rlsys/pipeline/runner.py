"""Multi-stage recipes from one config: R1 (cold-start SFT -> reasoning RL -> rejection
sampling -> SFT -> all-scenario RL) and distillation (a teacher's samples -> a student's SFT).

`pipeline.stages` lists the stages. Each runs with the run's config plus its own `overrides`,
starts from `model` (the base model, an earlier stage's result, or a folder), and writes into
`<output_dir>/NN-<name>/`, which gets a `stage.json` marker when the stage is complete.
Rerunning the same command skips complete stages; an interrupted GRPO stage with a complete
checkpoint resumes from it, any other interrupted stage starts over in a clean folder.
`pipeline.only=NAME` runs one stage, whose inputs must already be complete. With
`pipeline.eval`, each model a stage makes is evaluated on the held-out split (rlsys.eval) and
the figures are kept in its `stage.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from rlsys import checkpoint, models
from rlsys.config import Config, ConfigError, StageConfig, load_config
from rlsys.eval.cli import evaluate
from rlsys.pipeline.stages import run_rejection_sampling, run_sft, sft_examples
from rlsys.trainer import train

log = logging.getLogger(__name__)

MARKER = "stage.json"
#: Stage kinds whose result is a model (a `final/` HF folder) that later stages can start from.
MODEL_STAGES = ("sft", "grpo")


def stage_dir(root: Path, index: int, stage: StageConfig) -> Path:
    return root / f"{index + 1:02d}-{stage.name}"


def read_marker(folder: Path) -> dict | None:
    """The completion record of a stage folder, or None if the stage is not complete."""
    path = folder / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def stage_configs(cfg: Config, args: list[str]) -> list[Config]:
    """Each stage's own config (the run's arguments plus its overrides), all validated before
    any stage runs, so a typo in the last stage's overrides costs nothing."""
    out = []
    base = [a for a in args if not a.startswith("pipeline.")]
    for i, stage in enumerate(cfg.pipeline.stages):
        try:
            scfg = load_config([*base, *stage.overrides])
        except ConfigError as exc:
            raise ConfigError(f"pipeline.stages[{i}] ({stage.name}) overrides: {exc}") from None
        # Each stage draws its own problems: R1's later stages see new prompts.
        scfg.trainer.seed = cfg.trainer.seed + i
        out.append(scfg)
    return out


def resolve_model(stage: StageConfig, scfg: Config, done: dict[str, tuple[str, Path]]) -> str:
    """The folder a stage starts from."""
    if stage.model == "base":
        return str(models.resolve_model(scfg.model.path, scfg.model.cache_dir))
    if stage.model in done:
        kind, folder = done[stage.model]
        if kind not in MODEL_STAGES:
            raise ConfigError(f"pipeline stage {stage.name}: model={stage.model} is a {kind} "
                              "stage, which makes no model")
        return str(folder / "final")
    return stage.model


def run_pipeline(cfg: Config, args: list[str]) -> Path:
    """Run (or continue) the stages of `cfg.pipeline`; returns the run's output folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = Path(cfg.trainer.output_dir or "outputs/pipeline")
    stages, only = cfg.pipeline.stages, cfg.pipeline.only
    only_index = [s.name for s in stages].index(only) if only is not None else None
    configs = stage_configs(cfg, args)
    done: dict[str, tuple[str, Path]] = {}  # stage name -> (kind, folder) of complete stages
    for i, (stage, scfg) in enumerate(zip(stages, configs, strict=True)):
        folder = stage_dir(root, i, stage)
        marker = read_marker(folder)
        if marker is not None:
            log.info("stage %s: complete (%s), skipped", stage.name, folder)
            done[stage.name] = (stage.kind, folder)
            continue
        if only_index is not None and i != only_index:
            if only_index > i:
                raise ConfigError(f"pipeline.only={only}: it needs stage {stage.name}, which is "
                                  f"not complete in {root}")
            break
        model = resolve_model(stage, scfg, done)
        t0 = time.time()
        log.info("stage %s (%s) from %s -> %s", stage.name, stage.kind, model, folder)
        _run_stage(stage, scfg, model, folder, {n: f for n, (_, f) in done.items()})
        record = {"name": stage.name, "kind": stage.kind, "model": model,
                  "seconds": round(time.time() - t0, 1), "finished": time.time()}
        if cfg.pipeline.eval and stage.kind in MODEL_STAGES:
            record["eval"] = evaluate_stage(scfg, folder)
        (folder / MARKER).write_text(json.dumps(record, indent=2))
        done[stage.name] = (stage.kind, folder)
        if only is not None:
            break
    return root


def evaluate_stage(scfg: Config, folder: Path) -> dict:
    """The held-out figures (greedy accuracy, pass@1, pass@k, cons@k) of a stage's model, with
    the stage's own task and prompt settings; the files go to `<stage>/eval/`."""
    ecfg = dataclasses.replace(
        scfg, model=dataclasses.replace(scfg.model, path=str(folder / "final")),
        eval=dataclasses.replace(scfg.eval, output_dir=str(folder / "eval"), overwrite=True))
    summary = evaluate(ecfg)
    return {k: v for k, v in summary.items() if k not in ("versions", "command", "config")}


def _run_stage(stage: StageConfig, scfg: Config, model: str, folder: Path,
               outputs: dict[str, Path]) -> None:
    resume = (stage.kind == "grpo" and folder.exists()
              and checkpoint.latest_checkpoint(folder) is not None)
    if folder.exists() and not resume:
        log.info("stage %s: an earlier attempt stopped before it finished; starting over",
                 stage.name)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scfg = dataclasses.replace(
        scfg, model=dataclasses.replace(scfg.model, path=model),
        trainer=dataclasses.replace(scfg.trainer, output_dir=str(folder), save_final=True,
                                    resume="auto" if resume else "never"))
    if stage.kind == "grpo":
        train(scfg)
    elif stage.kind == "sft":
        run_sft(scfg, model, folder, sft_examples(scfg, outputs))
    else:
        run_rejection_sampling(scfg, model, folder)
