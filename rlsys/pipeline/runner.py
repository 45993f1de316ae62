"""Multi-stage recipes from one config: R1 (cold-start SFT -> reasoning RL -> rejection
sampling -> SFT -> all-scenario RL) and distillation (a teacher's samples -> a student's SFT).

`pipeline.stages` lists the stages. Each runs with the run's config plus its own `overrides`,
starts from `model` (the base model, an earlier stage's result, or a folder), and writes into
`<output_dir>/NN-<name>/`, which gets a `stage.json` marker when the stage is complete.
Rerunning the same command skips complete stages and resumes the interrupted one: a GRPO or
SFT stage from its latest complete checkpoint (`trainer.checkpoint_every`), rejection sampling
after its last saved chunk of prompts, a stage whose model was made but not yet evaluated at
its evaluation. An interrupted stage with nothing to resume from starts over in a clean folder.
`pipeline.only=NAME` runs one stage, whose inputs must already be complete. With
`pipeline.eval`, each model a stage makes is evaluated on the held-out split (rlsys.eval) and
the figures are kept in its `stage.json` (`eval`), with the parameter count; a stage that starts
from a model no stage made (the base model, a student) also evaluates that model (`eval_before`),
once per run: a later stage from the same model takes the earlier figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from rlsys import checkpoint, models
from rlsys.build import ray_session
from rlsys.config import Config, ConfigError, StageConfig, load_config
from rlsys.eval.evaluator import evaluate
from rlsys.memory_plan import model_shape
from rlsys.pipeline.stages import run_rejection_sampling, run_sft, sft_examples
from rlsys.trainer import train

log = logging.getLogger(__name__)

MARKER = "stage.json"
#: Written when a stage's own work is done, before its evaluation: a rerun only evaluates.
TRAINED = "trained.json"
#: Stage kinds whose result is a model (a `final/` HF folder) that later stages can start from.
MODEL_STAGES = ("sft", "grpo")


def stage_dir(root: Path, index: int, stage: StageConfig) -> Path:
    return root / f"{index + 1:02d}-{stage.name}"


def read_marker(folder: Path) -> dict | None:
    """The completion record of a stage folder, or None if the stage is not complete."""
    return _read_json(folder / MARKER)


def _read_json(path: Path) -> dict | None:
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
        return _stage_model(stage.model, done, f"pipeline stage {stage.name}: model")
    return stage.model


def resolve_teacher(stage: StageConfig, scfg: Config, done: dict[str, tuple[str, Path]]
                    ) -> str | None:
    """The teacher of an sft stage with distill.loss=kd (None otherwise): `stage:NAME` is an
    earlier stage's model, None the model that sampled the stage's data (sft.data=stage:NAME,
    a rejection-sampling stage), anything else a folder or built-in name."""
    if stage.kind != "sft" or scfg.distill.loss != "kd":
        return None
    if scfg.distill.teacher is None:
        name = scfg.sft.data.removeprefix("stage:")
        record = read_marker(done[name][1]) if name in done else None
        if record is None or done[name][0] != "rejection_sampling":
            raise ConfigError(f"pipeline stage {stage.name}: distill.teacher is unset and "
                              f"sft.data={scfg.sft.data} is not a complete rejection-sampling "
                              "stage whose sampling model could teach")
        return str(record["model"])
    teacher = str(scfg.distill.teacher)
    if teacher.startswith("stage:"):
        name = teacher.removeprefix("stage:")
        if name not in done:
            raise ConfigError(f"pipeline stage {stage.name}: distill.teacher={teacher}: no "
                              f"earlier complete stage {name!r}")
        return _stage_model(name, done, f"pipeline stage {stage.name}: distill.teacher")
    return str(models.resolve_model(teacher, scfg.model.cache_dir))


def _stage_model(name: str, done: dict[str, tuple[str, Path]], where: str) -> str:
    kind, folder = done[name]
    if kind not in MODEL_STAGES:
        raise ConfigError(f"{where}={name} is a {kind} stage, which makes no model")
    return str(folder / "final")


def run_pipeline(cfg: Config, args: list[str]) -> Path:
    """Run (or continue) the stages of `cfg.pipeline`; returns the run's output folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = Path(cfg.trainer.output_dir or "outputs/pipeline")
    configs = stage_configs(cfg, args)
    # One Ray cluster for all stages (each still starts its own actors): starting a cluster
    # costs ~10 s, twice a stage with its evaluation.
    with ray_session(cfg):
        _run_stages(cfg, configs, root)
    return root


def _run_stages(cfg: Config, configs: list[Config], root: Path) -> None:
    stages, only = cfg.pipeline.stages, cfg.pipeline.only
    only_index = [s.name for s in stages].index(only) if only is not None else None
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
        teacher = resolve_teacher(stage, scfg, done)
        record = _read_json(folder / TRAINED)
        if record is None:
            t0 = time.time()
            log.info("stage %s (%s) from %s -> %s", stage.name, stage.kind, model, folder)
            _run_stage(stage, scfg, model, folder, {n: f for n, (_, f) in done.items()},
                       teacher)
            record = {"name": stage.name, "kind": stage.kind, "model": model,
                      "seconds": round(time.time() - t0, 1), "finished": time.time()}
            (folder / TRAINED).write_text(json.dumps(record, indent=2))
        if stage.kind in MODEL_STAGES:
            record["parameters"] = parameter_count(folder / "final")
        if cfg.pipeline.eval and stage.kind in MODEL_STAGES:
            record["eval"] = evaluate_stage(cfg, scfg, folder)
            if stage.model not in done:
                # A stage that starts from a model no stage made (the base model, a student's
                # fresh copy): its starting point is the baseline the stage is judged against.
                record["eval_before"] = _baseline(cfg, scfg, folder, model, done)
        (folder / MARKER).write_text(json.dumps(record, indent=2))
        done[stage.name] = (stage.kind, folder)
        if only is not None:
            break


def parameter_count(model: Path) -> int | None:
    """The model's parameter count from its config (None for a shape rlsys.memory_plan does
    not know)."""
    shape = model_shape(str(model))
    return None if shape is None else shape.params()


def evaluation_config(cfg: Config, scfg: Config, folder: Path, model: str | None = None
                      ) -> Config:
    """How a stage's model (or, with `model`, the model it started from) is evaluated; the
    files go to `<stage>/eval/` (or `<stage>/eval_before/`).

    Every stage is evaluated on the run's own task, response cap and seed (`data.*`,
    `rollout.max_new_tokens`, `trainer.seed`), not on what its overrides train with (a task
    mix, shorter samples, another model's settings), so that the figures of all stages are one
    comparable column.
    """
    return dataclasses.replace(
        scfg, data=cfg.data,
        rollout=dataclasses.replace(scfg.rollout, max_new_tokens=cfg.rollout.max_new_tokens),
        model=dataclasses.replace(scfg.model, path=model or str(folder / "final")),
        trainer=dataclasses.replace(scfg.trainer, seed=cfg.trainer.seed),
        eval=dataclasses.replace(scfg.eval, output_dir=str(
            folder / ("eval_before" if model else "eval")), overwrite=True))


def evaluate_stage(cfg: Config, scfg: Config, folder: Path, model: str | None = None) -> dict:
    """The held-out figures (greedy accuracy, pass@1, pass@k, cons@k) of a stage's model, or
    with `model` of the model it started from (see `evaluation_config`)."""
    summary = evaluate(evaluation_config(cfg, scfg, folder, model))
    return {k: v for k, v in summary.items() if k not in ("versions", "command", "config")}


def evaluation_key(ecfg: Config) -> str:
    """What an evaluation's figures depend on: the model, the problems, how answers are
    generated and judged, the seed; not where its files go or the stage's training settings."""
    parts = {"model": ecfg.model, "data": ecfg.data, "rollout": ecfg.rollout,
             "reward": ecfg.reward, "seed": ecfg.trainer.seed,
             "eval": dataclasses.replace(ecfg.eval, output_dir=None, overwrite=False)}
    text = json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                       for k, v in parts.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _baseline(cfg: Config, scfg: Config, folder: Path, model: str,
              done: dict[str, tuple[str, Path]]) -> dict:
    """`eval_before` of a stage: the figures of the model it started from, evaluated once per
    run. A later stage from the same model under the same evaluation (R1's second SFT starts
    from the base model again) takes the earlier stage's figures, naming it in `reused_from`."""
    key = evaluation_key(evaluation_config(cfg, scfg, folder, model))
    for name, (_, earlier) in done.items():
        before = (read_marker(earlier) or {}).get("eval_before") or {}
        if before.get("key") == key:
            name = before.get("reused_from", name)
            log.info("stage %s: its starting model %s was evaluated with stage %s; reusing "
                     "those figures", folder.name, model, name)
            return {**before, "reused_from": name}
    return {**evaluate_stage(cfg, scfg, folder, model), "key": key}


def _run_stage(stage: StageConfig, scfg: Config, model: str, folder: Path,
               outputs: dict[str, Path], teacher: str | None = None) -> None:
    resume = folder.exists() and (checkpoint.latest_checkpoint(folder) is not None
                                  or any(folder.glob("samples/chunk_*.json")))
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
        run_sft(scfg, model, folder, sft_examples(scfg, outputs), teacher=teacher)
    else:
        run_rejection_sampling(scfg, model, folder)
