"""The configuration schema: every option of rlsys, its default and a one-line doc.

Config is data. The dataclasses below are the single source of truth; YAML files in `conf/`
only override them, and command-line `key.sub=value` overrides are applied last (reading them is
rlsys.config_loading's job). Every section checks its own values (`validate`), so a typo or a
bad value stops the run with one line naming the key, before any actor starts.

    cfg = load_config(["conf=smol", "trainer.steps=10"])

`conf=NAME` loads `conf/NAME.yaml`; a YAML file may name a parent with `defaults: [other]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from rlsys.config_loading import CONF_DIR, ConfigError, load_structured
from rlsys.config_loading import available_configs as available_configs  # re-exported
from rlsys.precision import engine_dtype, learner_compute_dtype


def doc(text: str, default: Any = MISSING, factory: Any = None, replace: bool = False) -> Any:
    """A dataclass field with its one-line documentation kept in the field's metadata.

    `replace=True` marks a mapping that a config layer sets as a whole instead of merging into
    (reward weights: naming `{code_accuracy: 1}` must not keep the default `accuracy` part).
    """
    metadata = {"doc": text, "replace": replace}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"bad value for '{key}': {value!r} ({why})")


def _at_least(section: Any, prefix: str, minimum: int, *names: str) -> None:
    """Each named field of `section` (config key `prefix.name`) must be >= `minimum`."""
    for name in names:
        value = getattr(section, name)
        _require(value >= minimum, f"{prefix}.{name}", value, f"must be >= {minimum}")


def _one_of(section: Any, prefix: str, name: str, choices: Any, why: str = "") -> None:
    """Field `name` of `section` (config key `prefix.name`) must be one of `choices`."""
    value = getattr(section, name)
    _require(value in choices, f"{prefix}.{name}", value, why or f"one of {', '.join(choices)}")


def _resources(section: Any, prefix: str) -> None:
    """`section.resources` (config key `prefix.resources`): Ray custom resources, each >= 0;
    CPUs, GPUs and memory have their own keys (num_cpus, num_gpus)."""
    for name, amount in section.resources.items():
        key = f"{prefix}.resources.{name}"
        _require(name not in _RAY_BUILTIN_RESOURCES, key, amount,
                 f"set {prefix}.num_cpus / num_gpus instead: {name} is one of Ray's own")
        _require(isinstance(amount, int | float) and not isinstance(amount, bool)
                 and amount >= 0, key, amount, "an amount >= 0")


def _cpu_cores(section: Any, prefix: str) -> None:
    for core in section.cpu_cores:
        _require(core >= 0, f"{prefix}.cpu_cores", list(section.cpu_cores),
                 "core numbers are >= 0")


def usable_cores(cpu_cores: list[int]) -> int:
    """Cores an actor pinned to `cpu_cores` (rollout/learner.cpu_cores) runs on: their count,
    or, unpinned, every core of the node this is called on."""
    return len(cpu_cores) or os.cpu_count() or 1


def worker_threads(num_threads: int, cpu_cores: list[int], workers: int) -> int:
    """Torch/OpenMP threads of each of `workers` processes that share a node's cores (the
    engines; a learner group's tp x dp ranks): `num_threads` if set, else the cores they may
    use (`cpu_cores`, or all of the node's) divided among them, at least one. More threads than
    cores in all makes OpenMP teams wait on each other: two engines on 2 cores with two threads
    each synced weights 2.3x and generated 1.6x slower than with one."""
    return num_threads or max(1, usable_cores(cpu_cores) // workers)


CPU_CORES_DOC = ("CPU cores {who} is pinned to (os.sched_setaffinity), e.g. [0]; [] = any. On a "
                 "CPU node that hosts engines and learners, give each its own cores (and "
                 "{other}.cpu_cores the rest) so that overlapping them (rollout.inflight, "
                 "rollout.max_staleness) runs in parallel: vLLM's CPU engine otherwise keeps "
                 "every core busy whatever its thread count")
_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
RESOURCES_DOC = ("Ray custom resources {{name: amount}} {what} asks for, on top of CPUs and GPUs: "
                 "a cluster whose nodes advertise them (ray start --resources='{{\"{node}\": "
                 "1}}') places {who} on those nodes only, e.g. {{{node}: 1}}")
_DTYPES = ("bfloat16", "float16", "float32")
# rollout.dtype and learner.compute_dtype may also be "auto", which load_config resolves.
_AUTO_DTYPES = (*_DTYPES, "auto")
AUTO_DTYPE_DOC = ("auto = bfloat16 on GPUs and on CPUs with native bfloat16 arithmetic "
                  "(AVX-512 BF16 or AMX on x86, BF16 on Arm), float32 on other CPUs, where "
                  "bfloat16 is emulated: on a 2-core AVX2 EPYC, vLLM sampled 3.8x and the demo's "
                  "learner updated 19.7x slower in bfloat16 than in float32 "
                  "(benchmarks/results/cpu_precision.json)")
# learner.activation_checkpointing; the learner itself only ever sees "none" or "full".
ACTIVATION_CHECKPOINTING = ("none", "full", "auto")


@dataclass
class ModelConfig:
    path: str = doc("local HF folder, or a built-in name: smollm2-135m-instruct, tiny-random",
                    "smollm2-135m-instruct")
    cache_dir: str | None = doc("where built-in models are built once and reused; "
                                "None = $RLSYS_CACHE_DIR or ~/.cache/rlsys", None)


def _default_phrasings() -> list[str]:
    from rlsys.data.arithmetic import DEFAULT_PHRASINGS  # the task's own default

    return list(DEFAULT_PHRASINGS)


@dataclass
class ArithmeticConfig:
    ops: list[str] = doc("operators drawn from, any of + - *", factory=lambda: ["+"])
    min_value: int = doc("smallest operand", 1)
    max_value: int = doc("largest operand", 50)
    num_terms: int = doc("operands per problem", 2)
    phrasings: list[str] = doc("question templates over {expr} (23 + 17), {words} (23 plus 17), "
                               "{a} and {b} (two operands, one op); a training draw takes one at "
                               "random, held-out problem i the (i mod n)-th",
                               factory=_default_phrasings)

    def validate(self) -> None:
        from rlsys.data import DataError
        from rlsys.data.arithmetic import check_phrasings

        _require(self.num_terms >= 2, "data.arithmetic.num_terms", self.num_terms,
                 "a problem needs >= 2 operands")
        _require(set(self.ops) <= {"+", "-", "*"} and bool(self.ops), "data.arithmetic.ops",
                 self.ops, "a non-empty list of + - *")
        _require(self.min_value <= self.max_value, "data.arithmetic.max_value", self.max_value,
                 "must be >= data.arithmetic.min_value")
        try:
            check_phrasings(self.phrasings, self.ops, self.num_terms)
        except DataError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class ReasoningGymConfig:
    dataset: str = doc("reasoning-gym generator, e.g. chain_sum, basic_arithmetic", "chain_sum")
    options: dict[str, Any] = doc("keyword options of that generator's config", factory=dict,
                                  replace=True)


@dataclass
class DataConfig:
    task: str = doc("task name: arithmetic | reasoning_gym | humaneval | champ | asdiv | file | "
                    "prompts (general prompts, answer optional) | mix", "arithmetic")
    mix: dict[str, float] = doc("task=mix: the tasks mixed and their sampling shares, e.g. "
                                "{arithmetic: 3, humaneval: 1}; each uses its settings here",
                                factory=dict, replace=True)
    arithmetic: ArithmeticConfig = doc("settings of the arithmetic task", factory=ArithmeticConfig)
    reasoning_gym: ReasoningGymConfig = doc("settings of the reasoning_gym task",
                                            factory=ReasoningGymConfig)
    path: str | None = doc("training file (.jsonl or .parquet) for task=file", None)
    prompts_path: str | None = doc(
        "task=prompts: .jsonl/.parquet of general prompts (prompt_key; answer_key optional, "
        "missing = no gold, rule-based parts score 0) for R1's all-scenario RL, rewarded by "
        "the reward model, e.g. data.mix={file: 1, prompts: 1} with reward.per_task={prompts: "
        "{preference: 1.0}}; None = data.path (and data.eval_path)", None)
    eval_path: str | None = doc("held-out file for task=file; default: hold out eval_size rows",
                                None)
    prompt_key: str = doc("field holding the question in data files", "prompt")
    answer_key: str = doc("field holding the gold answer in data files", "answer")
    skip_malformed: bool = doc("skip and count malformed rows instead of failing", False)
    eval_size: int = doc("number of held-out problems", 100)
    template: str = doc("prompt template: chat (instruct models) | r1_zero (base models)", "chat")
    system_prompt: str | None = doc("system prompt for template=chat; default asks for tags",
                                    None)
    few_shot: bool = doc("show worked examples as earlier chat turns (template=chat)", True)
    response_prefix: str = doc("text the assistant turn starts with, e.g. '<think>\\n'", "")

    def validate(self, cfg: Config) -> None:
        from rlsys.data import TASKS  # the task registry: the one list of task names

        single = ", ".join(name for name in TASKS if name != "mix")
        _at_least(self, "data", 1, "eval_size")
        _one_of(self, "data", "template", ("chat", "r1_zero"), "chat or r1_zero")
        _require(self.task in TASKS, "data.task", self.task, f"one of {single} or mix")
        _require(self.task != "mix" or bool(self.mix), "data.mix", self.mix,
                 "data.task=mix needs the tasks to mix and their shares")
        for name, share in self.mix.items():
            _require(name in TASKS and name != "mix", f"data.mix.{name}", share,
                     f"a task to mix must be one of {single}")
            _require(share > 0, f"data.mix.{name}", share, "a sampling share must be > 0")
        tasks = run_tasks(cfg)
        _require("file" not in tasks or bool(self.path), "data.path", self.path,
                 "the file task needs a data file")
        _require("prompts" not in tasks or bool(self.prompts_path or self.path),
                 "data.prompts_path", self.prompts_path, "the prompts task needs a data file "
                 "(data.prompts_path, or data.path)")
        self.arithmetic.validate()


@dataclass
class RolloutConfig:
    num_workers: int = doc("number of vLLM rollout engines (RolloutWorker actors)", 1)
    prompts_per_step: int = doc("prompts per GRPO step (B)", 8)
    group_size: int = doc("completions per prompt (G); GRPO needs G >= 2", 8)
    temperature: float = doc("sampling temperature", 1.0)
    temperature_start: float = doc("with rollout.temperature_warmup_steps > 0: the temperature "
                                   "of step 1, raised linearly to rollout.temperature", 1.0)
    temperature_warmup_steps: int = doc("steps over which the sampling temperature rises from "
                                        "rollout.temperature_start to rollout.temperature "
                                        "(POLARIS-style); 0 = rollout.temperature throughout",
                                        0)
    top_p: float = doc("nucleus sampling threshold", 1.0)
    max_new_tokens: int = doc("maximum response length in tokens", 128)
    max_model_len: int = doc("engine context length (prompt + response)", 1024)
    dtype: str = doc("engine weight dtype: bfloat16 | float16 | float32 | " + AUTO_DTYPE_DOC,
                     "auto")
    tensor_parallel_size: int = doc("tensor parallel size of each engine", 1)
    enforce_eager: bool = doc("skip graph capture/compile (fast start on CPU)", True)
    kv_cache_gb: float = doc("CPU KV cache per engine in GiB (VLLM_CPU_KVCACHE_SPACE)", 1.0)
    gpu_memory_utilization: float = doc("fraction of GPU memory an engine may use", 0.5)
    device_memory_gb: float = doc("GiB of memory of each engine GPU (rollout.num_gpus > 0): "
                                  "the memory plan sizes the KV cache as device_memory_gb x "
                                  "gpu_memory_utilization less weights and runtime", 80.0)
    max_num_batched_tokens: int | None = doc("engine token budget per step; None = vLLM's", None)
    max_sampling_rounds: int = doc("with algorithm.dynamic_sampling: most generation rounds "
                                   "per step", 4)
    max_staleness: int = doc("0 = on-policy (each step samples with the current weights); "
                             "k > 0 = engines sample the next k steps' prompts while the "
                             "learner trains, with weights at most k versions old (pair with "
                             "algorithm.rollout_is)", 0)
    inflight: bool = doc("continuous generation: engines never drain, the trainer draws "
                         "finished groups from them, and new weights land between decode "
                         "steps while responses run (a response may span versions); "
                         "rollout.max_staleness bounds the age of a group's oldest token "
                         "(older groups are dropped)", False)
    on_policy_steps: int = doc("with rollout.max_staleness > 0: the first N steps still "
                               "sample on-policy; the policy moves fastest then (the demo's "
                               "entropy falls from 6.6 to ~1 in 5 steps), when samples one "
                               "version old cost the most. In flight with dynamic sampling, "
                               "groups drawn beyond B in those steps still wait for the next "
                               "one (one version old)", 0)
    num_cpus: float = doc("Ray CPUs reserved per engine", 1.0)
    num_gpus: float = doc("Ray GPUs reserved per engine", 0.0)
    resources: dict[str, float] = doc(RESOURCES_DOC.format(what="each engine",
                                                           node="rollout_node",
                                                           who="the engines"), factory=dict)
    num_threads: int = doc("torch/OMP threads inside each engine; 0 = the node's cores (or "
                           "rollout.cpu_cores) / rollout.num_workers, for engines sharing a "
                           "node; set it where they do not", 0)
    cpu_cores: list[int] = doc(CPU_CORES_DOC.format(who="each engine's process",
                                                    other="learner"), factory=list)

    def validate(self, cfg: Config) -> None:
        _require(self.group_size >= 2, "rollout.group_size", self.group_size,
                 "GRPO compares completions within a group: needs >= 2")
        _at_least(self, "rollout", 1, "num_workers", "prompts_per_step", "max_new_tokens",
                  "tensor_parallel_size", "max_sampling_rounds")
        _at_least(self, "rollout", 0, "max_staleness", "on_policy_steps",
                  "temperature_warmup_steps")
        _resources(self, "rollout")
        _cpu_cores(self, "rollout")
        _require(not self.inflight or self.max_staleness >= 1, "rollout.max_staleness",
                 self.max_staleness, "rollout.inflight needs >= 1: a group that an update "
                 "overtakes is one version old when it is trained on")
        _require(self.temperature > 0, "rollout.temperature", self.temperature,
                 "sampling needs temperature > 0")
        _require(self.temperature_start > 0, "rollout.temperature_start",
                 self.temperature_start, "sampling needs temperature > 0")
        _require(not (self.inflight and self.temperature_warmup_steps),
                 "rollout.temperature_warmup_steps", self.temperature_warmup_steps,
                 "rollout.inflight samples groups before it knows the step that trains on them, "
                 "so their temperature cannot follow a per-step schedule: needs 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _require(self.max_model_len > self.max_new_tokens, "rollout.max_model_len",
                 self.max_model_len, "must exceed rollout.max_new_tokens to leave room for the "
                 "prompt")
        _one_of(self, "rollout", "dtype", _AUTO_DTYPES)
        _require(self.device_memory_gb > 0, "rollout.device_memory_gb", self.device_memory_gb,
                 "must be > 0")

    def temperature_at(self, step: int) -> float:
        """The sampling temperature of training step `step` (1-based):

            T(s) = T_start + (T - T_start) * min(1, (s - 1) / warmup_steps)

        so step 1 samples at `temperature_start` and step warmup_steps + 1 on at `temperature`;
        `temperature` throughout when warmup_steps = 0. The learner scores a batch's tokens
        at the temperature they were sampled at, so the ratio compares like with like.
        """
        if not self.temperature_warmup_steps:
            return self.temperature
        frac = min(1.0, max(step - 1, 0) / self.temperature_warmup_steps)
        return self.temperature_start + (self.temperature - self.temperature_start) * frac


@dataclass
class RewardModelConfig:
    path: str | None = doc("reward model of the 'preference' part: an HF folder or a built-in "
                           "causal LM name (smollm2-135m-instruct, tiny-random; kind=judge); "
                           "None = off. Each reward worker loads it on first use", None)
    kind: str = doc("classifier (AutoModelForSequenceClassification: sigmoid of the label's "
                    "logit) | judge (AutoModelForCausalLM: P(Yes) after a judge question)",
                    "classifier")
    label: int = doc("kind=classifier: the output scored (0 for 1-output reward models)", 0)
    normalize: str = doc("kind=classifier: sigmoid (in (0, 1)) | softmax (over the outputs) | "
                         "none (the raw logit)", "sigmoid")
    judge_template: str | None = doc("kind=judge: the question, with {prompt} and {response}; "
                                     "None = 'Is the response helpful and correct? Answer Yes "
                                     "or No.' after both", None)
    max_length: int = doc("most tokens per scored pair; the response's end is cut first", 1024)
    batch_size: int = doc("pairs per forward pass", 8)
    dtype: str = doc("float32 | bfloat16", "float32")
    device: str = doc("cpu | cuda[:N] (reward workers reserve no Ray GPU: it is shared)", "cpu")

    def validate(self, cfg: Config) -> None:
        from rlsys.models import BUILTIN_MODELS
        from rlsys.rewards.model_scorer import KINDS, NORMALIZE
        from rlsys.rewards.registry import PREFERENCE

        for key, weights in cfg.reward.all_weights():
            _require(PREFERENCE not in weights or self.path is not None, "reward.model.path",
                     self.path, f"{key} uses the {PREFERENCE!r} part, which needs a reward "
                     "model: set reward.model.path")
        _one_of(self, "reward.model", "kind", KINDS, " or ".join(KINDS))
        _one_of(self, "reward.model", "normalize", NORMALIZE, ", ".join(NORMALIZE))
        _one_of(self, "reward.model", "dtype", ("float32", "bfloat16"), "float32 or bfloat16")
        _require(self.device == "cpu" or self.device.startswith("cuda"), "reward.model.device",
                 self.device, "cpu or cuda[:N]")
        _at_least(self, "reward.model", 0, "label")
        _at_least(self, "reward.model", 8, "max_length")
        _at_least(self, "reward.model", 1, "batch_size")
        _require(self.judge_template is None or "{response}" in self.judge_template,
                 "reward.model.judge_template", self.judge_template, "must contain {response}")
        builtin = (self.path in BUILTIN_MODELS
                   or str(self.path).startswith(f"{BUILTIN_MODELS[0]}:"))
        _require(not (builtin and self.kind == "classifier"), "reward.model.kind", self.kind,
                 f"reward.model.path={self.path} is a causal LM: use kind=judge")


@dataclass
class RewardConfig:
    num_workers: int = doc("number of RewardWorker actors", 1)
    weights: dict[str, float] = doc("reward parts and their weights in the total (replaced "
                                    "as a whole when set); 'preference' is the reward "
                                    "model's score (reward.model)",
                                    factory=lambda: {"accuracy": 1.0, "format": 1.0},
                                    replace=True)
    per_task: dict[str, dict[str, float]] = doc(
        "reward weights of one task, replacing `weights` for its problems, e.g. {humaneval: "
        "{accuracy: 1.0}}", factory=dict, replace=True)
    language_target: str = doc("target language of the 'language' part: en, zh, ja, ko, ru or "
                               "a script name", "en")
    overlong_buffer: int = doc("DAPO soft overlong punishment: tokens before "
                               "rollout.max_new_tokens where a linear penalty starts; 0 = off", 0)
    overlong_factor: float = doc("the overlong penalty at rollout.max_new_tokens", 1.0)
    truncated: str = doc("completions cut at max_new_tokens: keep | zero (total reward 0) | "
                         "mask (no loss, DAPO's overlong filtering)", "keep")
    timeout_s: float = doc("seconds a reward call may take before it is retried", 60.0)
    num_cpus: float = doc("Ray CPUs reserved per reward worker", 0.5)
    resources: dict[str, float] = doc(RESOURCES_DOC.format(what="each reward worker",
                                                           node="reward_node",
                                                           who="the reward workers"),
                                      factory=dict)
    model: RewardModelConfig = doc("the reward model of the 'preference' part (R1's "
                                   "all-scenario RL); it runs on reward.num_cpus threads (1 "
                                   "below 1): raise that for a reward model",
                                   factory=RewardModelConfig)

    def all_weights(self) -> list[tuple[str, dict[str, float]]]:
        """(config key, reward weights) of `weights` and of each task in `per_task`."""
        return [("reward.weights", self.weights),
                *((f"reward.per_task.{k}", v) for k, v in self.per_task.items())]

    def validate(self, cfg: Config) -> None:
        from rlsys.rewards import TARGETS, check_weights

        max_new_tokens = cfg.rollout.max_new_tokens
        _at_least(self, "reward", 1, "num_workers")
        _resources(self, "reward")
        _require(0 <= self.overlong_buffer <= max_new_tokens, "reward.overlong_buffer",
                 self.overlong_buffer, f"must be in [0, rollout.max_new_tokens={max_new_tokens}]")
        _at_least(self, "reward", 0, "overlong_factor")
        _require(self.language_target.lower() in TARGETS, "reward.language_target",
                 self.language_target, f"one of {', '.join(sorted(TARGETS))}")
        _one_of(self, "reward", "truncated", ("keep", "zero", "mask"), "keep, zero or mask")
        for key, weights in self.all_weights():
            try:
                check_weights(weights)
            except ValueError as exc:
                raise ConfigError(f"bad value for '{key}': {exc}") from None
        tasks = run_tasks(cfg)
        for name in self.per_task:
            _require(name in tasks, f"reward.per_task.{name}", dict(self.per_task[name]),
                     f"this run has no task {name!r} (its tasks: {', '.join(tasks)})")
        self.model.validate(cfg)


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class LearnerConfig:
    device: str = doc("cpu | cuda; the collective backend follows (gloo | nccl)", "cpu")
    tp: int = doc("tensor-parallel size: each layer split over this many learner workers", 1)
    dp: int = doc("data-parallel size (FSDP): the batch is split over this many tp groups", 1)
    lr: float = doc("AdamW learning rate", 1e-5)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.99])
    warmup_steps: int = doc("linear learning-rate warm-up steps", 0)
    lr_schedule: str = doc("the learning rate after warm-up: constant | cosine | linear (both "
                           "decay to lr x min_lr_ratio at the stage's last step)", "constant")
    min_lr_ratio: float = doc("where cosine / linear decay ends, as a fraction of lr", 0.0)
    grad_clip: float = doc("max global gradient norm; 0 disables clipping", 1.0)
    param_dtype: str = doc("master weight dtype", "float32")
    compute_dtype: str = doc("forward/backward dtype (FSDP casts the masters): bfloat16 | "
                             "float32 | " + AUTO_DTYPE_DOC, "auto")
    max_tokens_per_microbatch: int = doc("token budget of one forward/backward", 4096)
    activation_checkpointing: str = doc(
        "recompute activations in backward instead of keeping them: none | full (every "
        "decoder layer keeps only its input) | auto (full when the memory plan needs it)",
        "auto")
    num_cpus: float = doc("Ray CPUs reserved per learner worker (tp x dp of them)", 1.0)
    num_gpus: float = doc("Ray GPUs reserved per learner worker (tp x dp of them)", 0.0)
    resources: dict[str, float] = doc(RESOURCES_DOC.format(what="each learner worker's "
                                                           "placement-group bundle",
                                                           node="learner_node",
                                                           who="the learner group"),
                                      factory=dict)
    cpu_cores: list[int] = doc(CPU_CORES_DOC.format(who="each learner worker's process",
                                                    other="rollout"), factory=list)
    num_threads: int = doc("torch threads per learner worker; 0 = the node's cores / (tp x dp)",
                           0)
    allocator: str = doc(
        "host memory allocator of each learner process: glibc | jemalloc (the library Ray "
        "ships, preloaded, keeping freed pages for reuse; $MALLOC_CONF overrides that). glibc "
        "returns every freed block over 32 MiB to the kernel, so each micro-batch's [tokens x "
        "vocabulary] log-softmax is mapped afresh and faulted in page by page: on a 2-core VM "
        "the demo's update spent up to 95% of a 5-s window in the kernel and ran 1.3-1.7x slower",
        "jemalloc")
    min_available_memory: float = doc(
        "after each update, a learner whose node has less than this share of its memory "
        "available hands the pages its allocator keeps free back to the kernel (the next "
        "update faults them in again). Both allocators' kept pages creep up as blocks of "
        "varying size fragment them (a 32-prompt demo learner: 7.8 GiB after step 1, 17.6 GiB "
        "at step 17); Ray's memory monitor kills processes at 95% used. 0 never, 1 every update",
        0.25)
    sync_bucket_mb: float = doc("weight-broadcast bucket size in MiB; 0 = tensor by tensor", 64.0)
    sync_mode: str = doc("weight sync to the engines: full (every value, every step) | delta "
                         "(after a full sync, only the wire-dtype values that changed; new, "
                         "replaced or resumed engines get a full sync; learner rank 0 keeps a "
                         "copy of the model in the wire dtype)", "full")
    stage_weights: bool = doc("cast the weights to the wire dtype into the sync's buckets at "
                              "the end of each GRPO step, so the next full sync only sends them: "
                              "the cast leaves the window in which engines wait for weights "
                              "(they generate meanwhile with rollout.max_staleness >= 1). Costs "
                              "rank 0 a copy of the model in rollout.dtype on its wire device "
                              "(the GPU with NCCL); needs sync_mode=full", False)
    device_memory_gb: float = doc("GiB of memory of each learner GPU: the memory plan "
                                  "(--print-config) refuses a learner.device=cuda run whose "
                                  "per-GPU peak exceeds it, and sizes activation "
                                  "checkpointing=auto against it", 80.0)

    def validate(self, cfg: Config) -> None:
        _at_least(self, "learner", 1, "max_tokens_per_microbatch", "tp", "dp")
        _resources(self, "learner")
        _cpu_cores(self, "learner")
        _one_of(self, "learner", "param_dtype", _DTYPES)
        _one_of(self, "learner", "compute_dtype", _AUTO_DTYPES)
        _one_of(self, "learner", "device", ("cpu", "cuda"), "cpu or cuda")
        _one_of(self, "learner", "activation_checkpointing", ACTIVATION_CHECKPOINTING)
        _one_of(self, "learner", "sync_mode", ("full", "delta"))
        _require(not (self.stage_weights and self.sync_mode == "delta"), "learner.stage_weights",
                 self.stage_weights, "needs learner.sync_mode=full (a delta sync diffs each "
                 "tensor against what the engines hold as it casts it)")
        _one_of(self, "learner", "allocator", ("glibc", "jemalloc"))
        _one_of(self, "learner", "lr_schedule", LR_SCHEDULES)
        _require(0 <= self.min_lr_ratio <= 1, "learner.min_lr_ratio", self.min_lr_ratio,
                 "must be in [0, 1]")
        _require(self.lr > 0, "learner.lr", self.lr, "must be > 0")
        _require(0 <= self.min_available_memory <= 1, "learner.min_available_memory",
                 self.min_available_memory, "must be in [0, 1]")
        _at_least(self, "learner", 0, "grad_clip")
        _require(self.device_memory_gb > 0, "learner.device_memory_gb", self.device_memory_gb,
                 "must be > 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "learner.betas",
                 self.betas, "two values in [0, 1)")
        max_model_len = cfg.rollout.max_model_len
        _require(self.max_tokens_per_microbatch >= max_model_len,
                 "learner.max_tokens_per_microbatch", self.max_tokens_per_microbatch,
                 f"must hold at least one full sequence (rollout.max_model_len={max_model_len})")


@dataclass
class AlgorithmConfig:
    clip_low: float = doc("PPO clip epsilon below 1 (ratio >= 1 - clip_low)", 0.2)
    clip_high: float = doc("PPO clip epsilon above 1; > clip_low is DAPO's clip-higher", 0.2)
    dual_clip: float | None = doc("dual-clip bound c > 1 for negative advantages; None = off",
                                  None)
    kl_coef: float = doc("beta: weight of KL(pi || pi_ref) in the loss; 0 = no reference model",
                         0.001)
    kl_estimator: str = doc("KL estimator of the loss term: k1 | k2 | k3 (the paper's)", "k3")
    kl_in_reward: bool = doc("put the KL in the reward instead of the loss (PPO-RLHF): each "
                             "reward becomes r - kl_coef * sum_t k1_t, with k1_t = log pi/pi_ref "
                             "of the sampled token, before the group advantages", False)
    rollout_is: str = doc("truncated importance sampling for the learner/engine mismatch: "
                          "none | token | sequence; the policy-gradient loss is weighted by "
                          "min(pi_old/pi_rollout, rollout_is_cap) per token, or by the "
                          "truncated product over each sequence", "none")
    rollout_is_cap: float = doc("C, the truncation of the rollout importance weight (> 1)", 2.0)
    entropy_coef: float = doc("weight of an entropy bonus; 0 = off (with entropy_target: the "
                              "starting weight)", 0.0)
    entropy_target: float = doc("adaptive entropy control (Skywork-OR1): after each step the "
                                "bonus weight moves by entropy_coef_step towards keeping the "
                                "policy's mean token entropy at this value (up below it, down "
                                "above it, within [0, entropy_coef_max]); 0 = off", 0.0)
    entropy_coef_step: float = doc("how far the adaptive entropy weight moves per step", 0.005)
    entropy_coef_max: float = doc("the adaptive entropy weight's ceiling", 0.05)
    loss_agg: str = doc("token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                        "seq-mean-token-sum-norm", "token-mean")
    normalize_std: bool = doc("divide advantages by the group std (False = Dr. GRPO)", True)
    dynamic_sampling: bool = doc("DAPO: drop groups whose rewards are all equal and draw more "
                                 "prompts until the batch is full", False)
    updates_per_batch: int = doc("optimizer steps per rollout batch (mini-batches x epochs)", 1)
    ref_update_every: int = doc("refresh the reference model from the policy every N steps; "
                                "0 = never", 0)

    def validate(self, cfg: Config) -> None:
        from rlsys.algo import LOSS_AGG_MODES, ROLLOUT_IS_MODES

        _at_least(self, "algorithm", 1, "updates_per_batch")
        _require(0 <= self.clip_low < 1, "algorithm.clip_low", self.clip_low, "must be in [0, 1)")
        _at_least(self, "algorithm", 0, "clip_high")
        _require(self.dual_clip is None or self.dual_clip > 1, "algorithm.dual_clip",
                 self.dual_clip, "must be > 1 or null")
        _at_least(self, "algorithm", 0, "kl_coef", "entropy_coef", "entropy_target",
                  "entropy_coef_step", "entropy_coef_max")
        _one_of(self, "algorithm", "kl_estimator", ("k1", "k2", "k3"))
        _one_of(self, "algorithm", "loss_agg", LOSS_AGG_MODES)
        _one_of(self, "algorithm", "rollout_is", ROLLOUT_IS_MODES)
        _require(self.rollout_is_cap > 1, "algorithm.rollout_is_cap", self.rollout_is_cap,
                 "must be > 1")
        _require(not self.kl_in_reward or self.kl_coef > 0, "algorithm.kl_in_reward",
                 self.kl_in_reward,
                 "needs algorithm.kl_coef > 0, the weight of the KL penalty in the reward")


@dataclass
class TrainerConfig:
    steps: int = doc("GRPO steps to run", 40)
    output_dir: str | None = doc("run directory (metrics.jsonl, TensorBoard, final model); "
                                 "None = outputs/<conf>-<time>", None)
    seed: int = doc("seed for data sampling, engines and the learner", 0)
    eval_every: int = doc("evaluate on the held-out split every N steps; 0 = only at the end",
                          10)
    eval_size: int = doc("held-out problems per evaluation (<= data.eval_size), evaluated as "
                         "eval.* says; 0 = no evaluation during training (e.g. a pipeline "
                         "stage, which rlsys.eval evaluates afterwards)", 100)
    save_final: bool = doc("save the trained policy as an HF folder in output_dir/final", True)
    checkpoint_every: int = doc("save a resumable checkpoint every N steps and at the end; "
                                "0 = never", 0)
    keep_checkpoints: int = doc("complete checkpoints kept; older ones are deleted", 1)
    max_learner_restarts: int = doc("a learner rank that dies (its process killed, its node "
                                    "lost) restarts the learner group from the last complete "
                                    "checkpoint, at most this many times per run; 0 = stop "
                                    "the run instead", 2)
    resume: str = doc("never | auto: continue from output_dir's latest complete checkpoint",
                      "never")
    tensorboard: bool = doc("also write TensorBoard events", True)
    dashboard_metrics: bool = doc("export step metrics as Ray gauges (rlsys_<key>, tagged "
                                  "run=<output dir name>) for the Ray dashboard / Prometheus",
                                  True)
    wandb_project: str | None = doc("also log to this Weights & Biases project (needs the "
                                    "wandb extra); None = off", None)
    wandb_entity: str | None = doc("W&B entity (team or user); None = your default", None)
    wandb_mode: str = doc("online | offline (write locally, `wandb sync` later) | disabled",
                          "online")
    progress: bool = doc("show a progress bar", True)
    reflection_words: list[str] = doc(
        "phrases counted per completion as R1's 'aha' signal (response/reflections)",
        factory=lambda: ["wait", "let me check", "verify", "double-check", "re-check",
                         "hmm", "let me recheck"])

    def validate(self, cfg: Config) -> None:
        import importlib.util

        _at_least(self, "trainer", 1, "steps")
        data_eval_size = cfg.data.eval_size
        _require(0 <= self.eval_size <= data_eval_size, "trainer.eval_size", self.eval_size,
                 f"must be in [0, data.eval_size={data_eval_size}]")
        _at_least(self, "trainer", 0, "eval_every", "checkpoint_every")
        _at_least(self, "trainer", 1, "keep_checkpoints")
        _at_least(self, "trainer", 0, "max_learner_restarts")
        _one_of(self, "trainer", "resume", ("never", "auto"), "never or auto")
        _one_of(self, "trainer", "wandb_mode", ("online", "offline", "disabled"),
                "online, offline or disabled")
        _require(self.wandb_project is None or importlib.util.find_spec("wandb") is not None,
                 "trainer.wandb_project", self.wandb_project,
                 "the wandb package is not installed: pip install 'rlsys[wandb]'")


@dataclass
class RayConfig:
    address: str | None = doc("cluster to join; None = $RAY_ADDRESS or a new local cluster",
                              None)
    num_cpus: int | None = doc("logical CPUs of a new local cluster; None = Ray's count", None)
    temp_dir: str | None = doc("temp dir of a new local cluster (avoids stale sessions)", None)
    include_dashboard: bool = doc("start the dashboard with a new local cluster", False)
    namespace: str = doc("Ray namespace of the run's named actors, among them the "
                         "'controller' that python -m rlsys.scale --namespace talks to; one "
                         "live run per namespace", "rlsys")


@dataclass
class SFTConfig:
    data: str = doc("examples: arithmetic_cot (worked solutions written by code), a .jsonl "
                    "file of {prompt, response} rows, or stage:NAME (a stage's dataset)",
                    "arithmetic_cot")
    num_examples: int = doc("data=arithmetic_cot: how many examples to generate", 300)
    epochs: int = doc("passes over the examples", 1)
    batch_size: int = doc("examples per optimizer step", 16)

    def validate(self, cfg: Config) -> None:
        _at_least(self, "sft", 1, "num_examples", "epochs", "batch_size")


@dataclass
class RejectionConfig:
    num_prompts: int = doc("distinct training prompts to sample from", 64)
    samples: int = doc("completions per prompt (k)", 4)
    temperature: float = doc("sampling temperature", 1.0)
    keep_per_prompt: int = doc("most accepted completions kept per prompt", 1)
    min_language: float = doc("least share of reasoning words in reward.language_target", 0.95)
    min_tokens: int = doc("shortest completion kept, in tokens", 1)
    chunk_prompts: int = doc("prompts sampled and scored at a time; each finished chunk is "
                             "saved, so an interrupted stage continues after it", 32)
    merge: str | None = doc("a .jsonl of {prompt, response} rows (e.g. non-reasoning SFT "
                            "data) appended to the dataset", None)

    def validate(self, cfg: Config) -> None:
        _at_least(self, "rejection", 1, "num_prompts", "samples", "chunk_prompts",
                  "keep_per_prompt")
        _require(0 <= self.min_language <= 1, "rejection.min_language", self.min_language,
                 "must be in [0, 1]")


@dataclass
class DistillConfig:
    loss: str = doc("sft stages' loss: sft = the examples' tokens (R1's distillation); kd = KL "
                    "to the teacher's next-token distribution at each of them", "sft")
    teacher: str | None = doc("kd's teacher (same vocabulary as the student): a model folder, "
                              "a built-in name, stage:NAME (a stage's model), or None = the "
                              "model that sampled sft.data=stage:NAME", None)

    def validate(self, cfg: Config) -> None:
        _one_of(self, "distill", "loss", ("sft", "kd"))
        _require(self.loss != "kd" or bool(self.teacher) or cfg.sft.data.startswith("stage:"),
                 "distill.teacher", self.teacher, "distill.loss=kd needs a teacher model (or "
                 "sft.data=stage:NAME, whose sampling model is then the teacher)")


@dataclass
class StageConfig:
    name: str = doc("the stage's name and folder; later stages refer to it", MISSING)
    kind: str = doc("sft | grpo | rejection_sampling", MISSING)
    model: str = doc("the model it starts from: base (model.path), an earlier stage's name, "
                     "or a folder", "base")
    overrides: list[str] = doc("key=value settings for this stage only", factory=list)


@dataclass
class PipelineConfig:
    stages: list[StageConfig] = doc("stages run in order; empty = one GRPO run", factory=list)
    only: str | None = doc("run just this stage (its inputs must be complete)", None)
    eval: bool = doc("evaluate each model a stage makes (eval.* settings) into its stage.json",
                     False)

    def validate(self, cfg: Config) -> None:
        names: list[str] = []
        for i, stage in enumerate(self.stages):
            key = f"pipeline.stages[{i}]"
            _require(stage.kind in ("sft", "grpo", "rejection_sampling"), f"{key}.kind",
                     stage.kind, "sft, grpo or rejection_sampling")
            _require(bool(stage.name) and "/" not in stage.name and stage.name not in names,
                     f"{key}.name", stage.name, "a unique name without '/'")
            _require(stage.model == "base" or stage.model in names or "/" in stage.model,
                     f"{key}.model", stage.model,
                     f"base, an earlier stage ({', '.join(names) or 'none'}) or a folder path")
            names.append(stage.name)
        _require(self.only is None or self.only in names, "pipeline.only", self.only,
                 f"one of the stages: {', '.join(names) or 'none'}")


@dataclass
class EvalConfig:
    """How a model is evaluated, in a training run (trainer.eval_every) and by rlsys.eval."""

    k: int = doc("samples per problem for pass@1 (their mean accuracy), pass@k and cons@k; "
                 "0 = greedy decoding only", 8)
    temperature: float = doc("sampling temperature of the k samples (DeepSeek-R1: 0.6)", 0.6)
    top_p: float = doc("top-p of the k samples (DeepSeek-R1: 0.95)", 0.95)
    greedy: bool = doc("also decode each problem greedily and report its accuracy", True)
    size: int | None = doc("held-out problems evaluated (the split's first N); None = all "
                           "data.eval_size of them", None)
    output_dir: str | None = doc("where problems.jsonl and summary.json go; None = "
                                 "outputs/eval-<model>-<task>-<time>", None)
    overwrite: bool = doc("replace the results in an output_dir that already has a "
                          "summary.json", False)
    save_texts: bool = doc("also write the k sampled completions' texts to problems.jsonl",
                           False)

    def validate(self, cfg: Config) -> None:
        _at_least(self, "eval", 0, "k")
        _require(self.k > 0 or self.greedy, "eval.k", self.k,
                 "eval.k=0 with eval.greedy=false evaluates nothing")
        _require(self.temperature > 0, "eval.temperature", self.temperature,
                 "sampling needs temperature > 0 (eval.greedy covers greedy decoding)")
        _require(0 < self.top_p <= 1, "eval.top_p", self.top_p, "must be in (0, 1]")
        data_eval_size = cfg.data.eval_size
        _require(self.size is None or 1 <= self.size <= data_eval_size, "eval.size", self.size,
                 f"must be in [1, data.eval_size={data_eval_size}] or null")


@dataclass
class Config:
    model: ModelConfig = doc("policy model", factory=ModelConfig)
    data: DataConfig = doc("task, dataset and prompt template", factory=DataConfig)
    rollout: RolloutConfig = doc("vLLM rollout engines and sampling", factory=RolloutConfig)
    reward: RewardConfig = doc("reward workers and reward weights", factory=RewardConfig)
    learner: LearnerConfig = doc("learner: optimizer, precision, micro-batching",
                                 factory=LearnerConfig)
    algorithm: AlgorithmConfig = doc("GRPO objective options", factory=AlgorithmConfig)
    trainer: TrainerConfig = doc("the training loop", factory=TrainerConfig)
    ray: RayConfig = doc("Ray cluster", factory=RayConfig)
    sft: SFTConfig = doc("supervised fine-tuning stages", factory=SFTConfig)
    rejection: RejectionConfig = doc("rejection-sampling stages", factory=RejectionConfig)
    distill: DistillConfig = doc("what sft stages learn from a teacher", factory=DistillConfig)
    pipeline: PipelineConfig = doc("multi-stage recipes (R1, distillation)",
                                   factory=PipelineConfig)
    eval: EvalConfig = doc("evaluation: in-run and python -m rlsys.eval", factory=EvalConfig)

    def validate(self) -> None:
        """Range and consistency checks that types alone cannot express, section by section
        (a section's checks may read the others: learner.max_tokens_per_microbatch must hold
        rollout.max_model_len tokens)."""
        for section in (self.rollout, self.learner, self.algorithm, self.data, self.reward,
                        self.trainer, self.eval, self.pipeline, self.sft, self.rejection,
                        self.distill):
            section.validate(self)


def load_config(args: list[str], conf_dir: Path = CONF_DIR) -> Config:
    """Build the validated config from `conf=NAME` and `key.sub=value` arguments, with
    rollout.dtype and learner.compute_dtype "auto" resolved for this machine
    (`rlsys.precision.resolve_dtype`).

    Raises ConfigError (one line) for an unknown config name, unknown key, wrong type or an
    out-of-range value.
    """
    config = load_structured(Config, args, conf_dir)
    config.validate()
    config.rollout.dtype = engine_dtype(config.rollout)
    config.learner.compute_dtype = learner_compute_dtype(config.learner)
    return config


def run_tasks(cfg: Config) -> list[str]:
    """The names of the tasks a run draws problems from (its reward.per_task keys)."""
    return list(cfg.data.mix) if cfg.data.task == "mix" else [cfg.data.task]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
