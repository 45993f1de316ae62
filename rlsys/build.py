"""Building a run's parts from its config: the task, the actor pools, the Ray session and the
output directory, each checked before anything starts (so bad input fails with a message that
names the config key, not deep inside an actor). Shared by training, evaluation and the R1
pipeline's stages.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from actors.reward import RewardPool
from actors.rollout import RolloutPool, rollout_env_vars
from learners.group import LearnerGroup
from learners.parallel import check_tensor_parallel
from rlsys import checkpoint
from rlsys.config import (
    AlgorithmConfig,
    Config,
    ConfigError,
    to_dict,
    to_yaml,
    worker_threads,
)
from rlsys.data import TASKS, DataError, Problem, Task, render_prompt
from rlsys.memory_plan import model_shape, resolve_checkpointing
from rlsys.metrics import MetricsLogger
from rlsys.models import resolve_model
from rlsys.precision import engine_dtype
from rlsys.rewards import make_language_reward


def prepare_model_and_task(cfg: Config) -> tuple[str, Task, PreTrainedTokenizerBase]:
    """The model's local folder, the task and the tokenizer, each checked before anything is
    written or started: the model fits the engines' context and the learner's tensor-parallel
    split, and a prompt renders."""
    model_path = str(resolve_model(cfg.model.path, cfg.model.cache_dir))
    check_model_fits(cfg, model_path)
    task = build_task(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    check_prompt_renders(cfg, tokenizer, task)
    return model_path, task, tokenizer


def build_task(cfg: Config) -> Task:
    """The run's task (data.task, a mix included), built by its registered family."""
    return TASKS[cfg.data.task].from_config(cfg)


def make_learner_group(cfg: Config, model_path: str, algorithm: AlgorithmConfig, *,
                       temperature: float, max_response_len: int,
                       teacher_path: str | None = None, total_steps: int = 0) -> LearnerGroup:
    """`learner.tp` x `learner.dp` learner actors holding `model_path` (and a frozen teacher
    for logit-level distillation), as configured. `total_steps` is the stage's number of
    optimizer steps, over which `learner.lr_schedule` decays.

    `learner.activation_checkpointing=auto` is resolved here by the memory plan (full when the
    plan without it exceeds learner.device_memory_gb): the learners only see none or full.
    """
    lc = cfg.learner
    if lc.activation_checkpointing == "auto":
        shape = model_shape(model_path)
        mode = "none" if shape is None else resolve_checkpointing(cfg, shape)
        lc = dataclasses.replace(lc, activation_checkpointing=mode)
    world = lc.tp * lc.dp
    return LearnerGroup(
        model_path, lc, algorithm, temperature=temperature, max_response_len=max_response_len,
        seed=cfg.trainer.seed, teacher_path=teacher_path, total_steps=total_steps,
        runtime_env=learner_env(worker_threads(lc.num_threads, lc.cpu_cores, world),
                                lc.allocator))


def make_rollout_pool(cfg: Config, model_path: str, scratch_dir: Path) -> RolloutPool:
    """`rollout.num_workers` vLLM engines serving `model_path`, as configured."""
    r = cfg.rollout
    threads = worker_threads(r.num_threads, r.cpu_cores, r.num_workers)
    return RolloutPool(
        model_path, r.num_workers,
        worker_kwargs=dict(dtype=engine_dtype(r), seed=cfg.trainer.seed,
                           max_model_len=r.max_model_len, enforce_eager=r.enforce_eager,
                           tensor_parallel_size=r.tensor_parallel_size,
                           max_num_batched_tokens=r.max_num_batched_tokens,
                           gpu_memory_utilization=r.gpu_memory_utilization,
                           num_threads=threads,
                           cpu_cores=list(r.cpu_cores)),
        num_cpus_per_worker=r.num_cpus, num_gpus_per_worker=r.num_gpus,
        resources=dict(r.resources),
        env_vars=rollout_env_vars(str(scratch_dir), r.kv_cache_gb, threads))


@contextmanager
def sampling_pools(cfg: Config, model_path: str, scratch_dir: Path
                   ) -> Iterator[tuple[RolloutPool, RewardPool]]:
    """Engines serving `model_path` and reward workers for a job that only samples and scores
    (evaluation, rejection sampling); both are stopped when it ends, however it ends."""
    rollout = make_rollout_pool(cfg, model_path, scratch_dir)
    try:
        rewards = make_reward_pool(cfg)
        try:
            yield rollout, rewards
        finally:
            rewards.shutdown()
    finally:
        rollout.shutdown()


def make_metrics_logger(cfg: Config, out: Path) -> MetricsLogger:
    """metrics.jsonl plus the configured sinks: TensorBoard, W&B, Ray dashboard gauges."""
    t = cfg.trainer
    wandb = None if t.wandb_project is None else {
        "project": t.wandb_project, "entity": t.wandb_entity, "mode": t.wandb_mode,
        "config": to_dict(cfg)}
    return MetricsLogger(out, tensorboard=t.tensorboard, wandb=wandb,
                         dashboard=t.dashboard_metrics and ray.is_initialized())


def make_reward_pool(cfg: Config) -> RewardPool:
    """`reward.num_workers` reward actors with the configured weights (per task, too)."""
    rw = cfg.reward
    return RewardPool(rw.num_workers, dict(rw.weights), num_cpus=rw.num_cpus,
                      timeout_s=rw.timeout_s,
                      per_task={k: dict(v) for k, v in rw.per_task.items()},
                      parts={"language": make_language_reward(rw.language_target)},
                      model=reward_model_options(cfg), resources=dict(rw.resources))


def reward_model_options(cfg: Config) -> dict | None:
    """ModelScorer's keyword arguments from `reward.model`; None when it is off."""
    m = cfg.reward.model
    if m.path is None:
        return None
    return dict(path=m.path, kind=m.kind, label=m.label, normalize=m.normalize,
                judge_template=m.judge_template, max_length=m.max_length,
                batch_size=m.batch_size, dtype=m.dtype, device=m.device,
                cache_dir=cfg.model.cache_dir)


def check_model_fits(cfg: Config, model_path: str) -> None:
    """The engines' context length and the learner's tensor-parallel split must fit the model
    (vLLM and the learner would refuse deep inside an actor)."""
    model_config = AutoConfig.from_pretrained(model_path)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and cfg.rollout.max_model_len > limit:
        raise ConfigError(f"rollout.max_model_len={cfg.rollout.max_model_len} exceeds the "
                          f"model's max_position_embeddings={limit} ({model_path})")
    if cfg.learner.tp > 1:
        try:
            check_tensor_parallel(model_config, cfg.learner.tp)
        except ValueError as exc:
            raise ConfigError(f"{exc} ({model_path})") from None


def render_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                   problems: list[Problem]) -> list[str]:
    """The prompt text of each problem, as configured in `cfg.data`."""
    d = cfg.data
    return [render_prompt(p.question, d.template, tokenizer=tokenizer,
                          system_prompt=d.system_prompt, response_prefix=d.response_prefix,
                          few_shot=d.few_shot and d.template == "chat")
            for p in problems]


def fitting_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                    problems: list[Problem]) -> tuple[list[Problem], list[str], int]:
    """The problems whose prompt leaves room for a full response in the engine's context,
    their prompts, and how many were dropped (like verl's filter_overlong_prompts: an engine
    refuses such a prompt, which would fail the whole batch)."""
    r = cfg.rollout
    budget = r.max_model_len - r.max_new_tokens
    prompts = render_prompts(cfg, tokenizer, problems)
    fits = [len(tokenizer.encode(p, verbose=False)) <= budget for p in prompts]
    if problems and not any(fits):
        raise DataError(
            f"all {len(problems)} prompts drawn from data.task={cfg.data.task} are longer than "
            f"rollout.max_model_len - rollout.max_new_tokens = {budget} tokens; raise "
            "rollout.max_model_len")
    kept = [(p, text) for p, text, ok in zip(problems, prompts, fits, strict=True) if ok]
    return [p for p, _ in kept], [text for _, text in kept], len(problems) - len(kept)


def check_prompt_renders(cfg: Config, tokenizer: PreTrainedTokenizerBase, task: Task) -> None:
    """Render one prompt now, so that e.g. a tokenizer without a chat template is reported
    before any actor starts."""
    try:
        render_prompts(cfg, tokenizer, task.eval_problems()[:1])
    except ValueError as exc:
        raise ConfigError(f"data.template={cfg.data.template}: {exc}") from None


def prepare_output_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint to resume from (trainer.resume=auto) if any.

    A directory that already holds a run is refused unless it is resumed; when resuming, the
    metrics the interrupted run logged after its last checkpoint are dropped (they are redone).
    """
    out = Path(cfg.trainer.output_dir or "outputs/run")
    resume_from, step = checkpoint.resume_point(out, cfg.trainer.resume)
    if resume_from is not None:
        # A run stopped between its last checkpoint and its export still has the export to do.
        exported = not cfg.trainer.save_final or (out / "final").is_dir()
        if step >= cfg.trainer.steps and exported:
            raise ConfigError(f"trainer.output_dir={out}: its latest checkpoint is step {step}; "
                              f"trainer.steps={cfg.trainer.steps} leaves nothing to resume")
    elif (out / "metrics.jsonl").exists():
        hint = ("it has no complete checkpoint to resume from" if cfg.trainer.resume == "auto"
                else "resume it with trainer.resume=auto")
        raise ConfigError(f"trainer.output_dir={out} already holds a run (metrics.jsonl); "
                          f"{hint}, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out, resume_from


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Join $RAY_ADDRESS / ray.address if given, else start (and later stop) a local cluster.

    Inside it SIGTERM (`ray job stop`, a preemption) raises KeyboardInterrupt, so it takes the
    same clean-up path as Ctrl-C. The handler is installed after `ray.init`, which installs
    its own (one that aborts the process).
    """
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        with stop_on_sigterm():
            yield
        return
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace)
    else:
        # Rollout, reward and learner phases take turns on the cores, so the local cluster
        # offers at least as many logical CPUs as the actors reserve together.
        wanted = (cfg.rollout.num_workers * cfg.rollout.num_cpus
                  + cfg.learner.num_cpus * cfg.learner.tp * cfg.learner.dp
                  + cfg.reward.num_workers * cfg.reward.num_cpus)
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(wanted + 0.999))
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=cfg.ray.temp_dir,
                 include_dashboard=cfg.ray.include_dashboard, namespace=cfg.ray.namespace)
    try:
        with stop_on_sigterm():
            yield
    finally:
        ray.shutdown()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (only the main thread can install a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def learner_env(num_threads: int, allocator: str) -> dict:
    """The learner actors' runtime_env: their torch threads (`num_threads`, already resolved
    by config.worker_threads) and, for `learner.allocator=jemalloc`, jemalloc preloaded (the
    dynamic loader reads LD_PRELOAD when Ray starts the process, before Python runs)."""
    threads = str(num_threads)
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if allocator == "jemalloc":
        library = jemalloc_library()
        if library is None:
            raise ConfigError("learner.allocator=jemalloc: no libjemalloc found (Ray ships "
                              "ray/core/libjemalloc.so on Linux); set learner.allocator=glibc")
        env["LD_PRELOAD"] = ":".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
        # Never hand freed pages back: by default jemalloc purges them over 10 s, and a
        # learner's update reuses them sooner, as faults. The resident set stays at its peak.
        env["MALLOC_CONF"] = os.environ.get("MALLOC_CONF",
                                            "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return {"env_vars": env}


def jemalloc_library() -> str | None:
    """A jemalloc shared library to preload: the one Ray ships, else the system's."""
    candidates = [Path(ray.__file__).parent / "core" / "libjemalloc.so",
                  Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                  Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")]
    return next((str(c) for c in candidates if c.exists()), None)
