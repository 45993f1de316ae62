"""What each GPU will hold: a per-GPU memory plan of the learner and of a rollout engine.

Computed from the config and the model's shape alone (no torch, no Ray), so `--print-config`
shows it and `python -m rlsys.run` refuses a run that cannot fit before any actor starts:

    shape = model_shape(cfg.model.path)            # config.json, or the table of known models
    plan = memory_plan(cfg, shape)
    print("\\n".join(plan.lines()))
    if (why := plan.refusal()) is not None: ...     # one line: the biggest term, what to change

Learner, per GPU (tp x dp ranks; TP splits every decoder layer's linear weights, the embedding
and the output projection over tp; FSDP2 shards everything over dp):
    parameters, gradients            P / (tp dp) x bytes(learner.param_dtype) each
    optimizer (AdamW)                two moments, 2 x P / (tp dp) x bytes(param_dtype)
    reference model                  parameters only, sharded the same way (algorithm.kl_coef > 0)
    teacher model                    the same for distill.loss=kd, at the teacher's shape
    engines' weights (delta sync)    learner.sync_mode=delta: rank 0 keeps the whole model in
                                     rollout.dtype, what the engines hold, to send only changes
    staged weights                   learner.stage_weights: rank 0 keeps the whole model in
                                     rollout.dtype, cast ahead of the next sync
    gathered FSDP units (dp > 1)     the root unit (embedding, output projection) gathered for the
                                     whole pass, the running layer and the prefetched next one in
                                     the compute dtype, and one layer's unsharded gradients
                                     (compute dtype, then fp32 for the reduce-scatter), all / tp
    compute-dtype weight copy        dp = 1 with bf16 autocast over fp32 masters: autocast's
                                     casts of the linear weights, saved for the backward (all of
                                     them; checkpointed: the output projection's and one layer's)
    activations                      max_tokens_per_microbatch x the bytes each token saves for the
                                     backward, derived below; checkpointed: one hidden state per
                                     layer boundary
    logits / log-probs               tokens x vocab / tp: the logits and their gradient (tp = 1:
                                     the learner's chunked log-softmax, two <= 256 MiB fp32
                                     buffers and a temporary), or the fp32 log-softmax and its
                                     temporaries (tp > 1, or an entropy bonus)
    one layer recomputed             checkpointed: the layer the backward rebuilds, and the
                                     gradients live while it is differentiated
The peak is the sum of the counted terms (gradient accumulation over micro-batches keeps the
gradients allocated while the next micro-batch's activations are saved). Checkpointed, the
log-softmax (with the final norm's activations) and the recomputed layer are not live at the
same time: only the larger of the two counts.

Saved activations per token and decoder layer of a Llama/Qwen2 layer as transformers runs it
(h hidden, I MLP width, qd = heads x head_dim, kvd = kv_heads x head_dim, c = compute bytes,
r = bytes of the residual stream: the compute dtype under FSDP, which gathers bf16 weights, the
master dtype otherwise, since the embedding and the norms then run on fp32 weights):
    each RMSNorm      4h (its input in fp32) + r h (the normalised input) + the linears' input:
                      c h, or c h per consuming linear when autocast casts it (r != c)
    attention         3c qd (query block, output, o_proj input) + 2c kvd (key, value blocks)
                      + 4 x heads (the log-sum-exp), all / tp; with SDPA (CPU, or fp32 on
                      CUDA) also its mask, c x the row's keys (<= rollout.max_model_len)
    MLP               4c I (gate, SiLU(gate), up, their product), / tp
Outside the layers: the final norm's 4h + r h, the output projection's input c h, the rotary
cos/sin 2 r head_dim. Rotary embeddings save nothing else per token (cos/sin need no gradient).
The packed-attention blocks are counted without padding (the varlen kernel has none; SDPA's
blocks pad each micro-batch's responses to the longest), and every token as a predicted one.
benchmarks/memory_plan.py checks these figures against allocator measurements of the learner on
CPU (within a few percent at tp = dp = 1, ~10% under tensor parallelism; benchmarks/README.md).

Engine, per GPU: weights (rollout.dtype, / rollout.tensor_parallel_size), the runtime (CUDA
context and graphs) and the activation peak vLLM profiles, and the KV cache it leaves of
rollout.device_memory_gb x rollout.gpu_memory_utilization: in tokens, and in sequences of
rollout.max_model_len (vLLM refuses to start when not even one fits).

Refusals are enforced for learner.device=cuda (learner) and rollout.num_gpus > 0 (engines); a
CPU run has no device memory limit, so its plan is printed but never refused.

`cfg` is a `rlsys.config.Config`, or anything with the same `learner`, `algorithm` and `rollout`
attributes: this module imports neither torch nor omegaconf, so benchmarks/gpu_check.py can plan
on a machine that has only torch and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlsys.models import ModelError, parse_dropped_layers
from rlsys.precision import engine_dtype, learner_compute_dtype

if TYPE_CHECKING:  # imported lazily: benchmarks/gpu_check.py plans on machines without omegaconf
    from rlsys.config import Config

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: The learner's chunked log-softmax works through two fp32 buffers of at most this many
#: elements (learners/parallel.py: _TargetLogprobs, ~256 MB each).
LOGSOFTMAX_CHUNK_ELEMENTS = 64 << 20
#: CUDA context, NCCL and cuda graphs of a vLLM engine (GiB), beside its profiled activations.
ENGINE_RUNTIME_GIB = 1.0
#: vLLM's defaults where the config leaves them open.
ENGINE_DEFAULT_BATCHED_TOKENS = 8192
ENGINE_MAX_NUM_SEQS = 256


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs to know of a decoder-only (Llama/Qwen2-style) model."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads
    tied: bool = False  # output projection shares the embedding
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    source: str = ""  # where the shape was read: a config.json, or the built-in table

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim

    def layer_linear_params(self) -> int:
        """Weights (and q/k/v biases) of one decoder layer's seven linear layers."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        bias = (q + 2 * kv) if self.attention_bias else 0
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + bias

    def layer_params(self) -> int:
        return self.layer_linear_params() + 2 * self.hidden  # + two RMSNorm weights

    def embedding_params(self) -> int:
        """The token embedding and (untied) the output projection."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden

    def describe(self) -> str:
        return (f"{self.name}: hidden {self.hidden}, {self.layers} layers, MLP "
                f"{self.intermediate}, {self.heads}/{self.kv_heads} heads, vocab {self.vocab}, "
                f"{_count(self.params())} params")


def _count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _shape(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
           vocab: int, tied: bool, bias: bool = True) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied=tied,
                      attention_bias=bias, source="built-in table")


#: Architectures known by name, for a `model.path` that is not a folder here (a cluster path such
#: as /models/Qwen2.5-7B when printing the plan on a laptop): looked up by the folder's name,
#: case-insensitively, with an "-Instruct" suffix ignored. From the models' config.json files.
KNOWN_SHAPES: dict[str, ModelShape] = {s.name.lower(): s for s in (
    _shape("tiny-random", 128, 2, 4, 2, 256, 512, tied=True, bias=False),
    _shape("smollm2-135m-instruct", 576, 30, 9, 3, 1536, 49152, tied=True, bias=False),
    _shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, tied=True),
    _shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, tied=True),
    _shape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, tied=True),
    _shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, tied=False),
    _shape("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, tied=False),
    _shape("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, tied=False),
)}


def shape_from_config(config: dict, name: str, source: str = "") -> ModelShape:
    """The shape of an HF `config.json` (a multimodal one's text_config)."""
    c = config.get("text_config") or config
    heads = int(c["num_attention_heads"])
    bias = c.get("attention_bias")
    return ModelShape(
        name=name, hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]),
        heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
        intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
        head_dim=int(c.get("head_dim") or 0),
        tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        attention_bias=bool(bias) if bias is not None else c.get("model_type") == "qwen2",
        source=source)


def model_shape(path: str) -> ModelShape | None:
    """The shape of `model.path`: its config.json if it is a folder here, else the built-in
    table by name (built-in model names, `smollm2-135m-instruct:drop=A-B`, or the folder's last
    component, e.g. /models/Qwen2.5-7B); None when neither knows it."""
    folder = Path(path).expanduser()
    config = folder / "config.json"
    if config.is_file():
        try:
            return shape_from_config(json.loads(config.read_text()), folder.name, str(config))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not a decoder-only config this plan knows; resolve_model reports it
    text = str(path)
    if ":drop=" in text:
        base = text.partition(":drop=")[0]
        shape = KNOWN_SHAPES.get(base.lower())
        try:
            dropped = parse_dropped_layers(text)
        except ModelError:
            return None  # resolve_model reports the malformed range
        if shape is not None and dropped is not None:
            layers = shape.layers - (dropped[1] - dropped[0] + 1)
            return dataclasses.replace(shape, name=text, layers=layers) if layers > 0 else None
        return None
    key = folder.name.lower()
    shape = KNOWN_SHAPES.get(key) or KNOWN_SHAPES.get(key.removesuffix("-instruct"))
    if shape is None:
        return None
    where = ("built-in table" if text.lower() == key
             else f"built-in table by name: {text} is not a folder here")
    return dataclasses.replace(shape, source=where)


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One thing a GPU holds: its name, GiB, whether it counts toward the peak, how to shrink it."""

    name: str
    gib: float
    counted: bool = True
    fix: str = ""
    note: str = ""


@dataclass
class DevicePlan:
    """The terms of one kind of device (a learner rank or an engine) and their limit."""

    title: str
    terms: list[Term]
    limit_gib: float
    limit_key: str
    enforced: bool
    extra: list[str] = field(default_factory=list)  # more lines (the KV cache in sequences)
    failure: str | None = None  # a refusal that is not a sum over the limit

    @property
    def peak(self) -> float:
        return sum(t.gib for t in self.terms if t.counted)

    def biggest(self) -> Term:
        return max((t for t in self.terms if t.counted), key=lambda t: t.gib)

    def refusal(self, what: str) -> str | None:
        if not self.enforced:
            return None
        if self.failure is not None:
            return self.failure
        if self.peak <= self.limit_gib:
            return None
        big = self.biggest()
        return (f"memory plan: the {what} needs {self.peak:.1f} GiB per GPU, over "
                f"{self.limit_key}={self.limit_gib:g}; its biggest term is {big.name} at "
                f"{big.gib:.1f} GiB: {big.fix}")


@dataclass
class MemoryPlan:
    shape: ModelShape
    learner: DevicePlan
    engine: DevicePlan
    checkpointing: str  # what the learner runs with: none | full
    requested: str  # learner.activation_checkpointing as configured

    def refusal(self) -> str | None:
        """One line naming the biggest term and what to change, or None when the plan fits."""
        return self.learner.refusal("learner") or self.engine.refusal("rollout engine")

    def lines(self) -> list[str]:
        out = [f"model {self.shape.describe()} (shape from {self.shape.source})"]
        for plan in (self.learner, self.engine):
            out.append(f"{plan.title}:")
            width = max(len(t.name) for t in plan.terms)
            for t in plan.terms:
                mark = "" if t.counted else "  (not counted)"
                note = f"  {t.note}" if t.note else ""
                out.append(f"  {t.name:<{width}}  {t.gib:8.2f}{mark}{note}")
            out += [f"  {line}" for line in plan.extra]
            if plan.enforced:
                verdict = "fits" if plan.refusal("") is None else "DOES NOT FIT"
                limit = f"of {plan.limit_gib:g} ({plan.limit_key}): {verdict}"
            else:
                limit = "(CPU: no device memory limit, not enforced)"
            out.append(f"  {'peak':<{width}}  {plan.peak:8.2f}  {limit}")
        return out


def _gib(nbytes: float) -> float:
    return nbytes / GiB


def activation_bytes_per_token(shape: ModelShape, tp: int, compute_bytes: int,
                               residual_bytes: int, mask_width: int = 0) -> dict[str, float]:
    """Bytes one token saves for the backward: per decoder layer (`layer`), at a layer boundary
    under checkpointing (`boundary`), and outside the layers (`head`: the final norm, the output
    projection's input, the rotary cos/sin), and the gradients live while one layer is
    differentiated (`backward`). `mask_width`: keys per query row of SDPA's
    attention mask, which SDPA saves per layer in the compute dtype (0: a varlen kernel, no
    mask). See the module docstring for the derivation."""
    h, c, r = shape.hidden, compute_bytes, residual_bytes

    def norm(consumers: int) -> float:  # input in fp32, normalised input, the linears' input(s)
        return 4 * h + r * h + (c * h if r == c else consumers * c * h) + 4

    attention = 3 * c * shape.q_dim + 2 * c * shape.kv_dim + 4 * shape.heads
    mlp = 4 * c * shape.intermediate
    return {"layer": norm(3) + norm(2) + (attention + mlp) / tp + c * mask_width,
            "boundary": r * h,
            "head": 4 * h + r * h + c * h + 2 * r * shape.dim,
            # Gradients live while one layer is differentiated: three of the MLP's width
            # (down_proj's input's, then SiLU's and up's) and the residual stream's.
            "backward": 3 * c * shape.intermediate / tp + r * h}


def logits_bytes(tokens: int, vocab: float, compute_bytes: int, chunked: bool,
                 temperature: float = 1.0) -> float:
    """Peak bytes of the log-prob computation over `tokens` rows of `vocab` logits.

    chunked (tp = 1, no entropy bonus: learners/parallel.py's _TargetLogprobs): forward holds
    the logits, two fp32 chunk buffers and logsumexp's temporary; backward the logits, their
    gradient and the two buffers. Otherwise (vocabulary-parallel log-softmax, or an entropy
    bonus): the logits, the saved fp32 log-softmax and three fp32 temporaries of the entropy.
    """
    n, c = tokens * vocab, compute_bytes
    if chunked:
        chunk = min(n, LOGSOFTMAX_CHUNK_ELEMENTS) * 4
        peak = max(c * n + 3 * chunk, 2 * c * n + 2 * chunk)
    else:
        peak = n * (c + 16)
    return peak + (c * n if temperature != 1.0 else 0.0)


def learner_plan(cfg: Config, shape: ModelShape, checkpointing: str) -> DevicePlan:
    """The learner rank's terms with activation checkpointing `checkpointing` (none | full)."""
    lc, algo = cfg.learner, cfg.algorithm
    tp, dp, layers = lc.tp, lc.dp, shape.layers
    tokens = lc.max_tokens_per_microbatch
    full = checkpointing == "full"
    pb = DTYPE_BYTES[lc.param_dtype]
    fsdp = dp > 1
    compute = learner_compute_dtype(lc)
    autocast = compute != "float32"
    # Without autocast everything runs in the master dtype; FSDP gathers in the compute dtype.
    cb = DTYPE_BYTES[compute] if autocast else pb
    rb = cb if (fsdp or not autocast) else pb
    norms = layers * 2 * shape.hidden + shape.hidden  # replicated over tp
    shard = ((shape.params() - norms) / tp + norms) / dp  # parameters on one rank
    more_dp = f"raise learner.dp (now {dp}: FSDP shards it) or learner.tp (now {tp})"
    terms = [Term("parameters", _gib(shard * pb), fix=more_dp,
                  note=f"{lc.param_dtype} masters"),
             Term("gradients", _gib(shard * pb), fix=more_dp),
             Term("optimizer (AdamW)", _gib(2 * shard * pb), fix=more_dp)]
    if algo.kl_coef > 0:
        terms.append(Term("reference model", _gib(shard * pb), fix=f"{more_dp}, or set "
                          "algorithm.kl_coef=0 (no reference model)"))
    if cfg.distill.loss == "kd":
        # A frozen teacher sharded like the policy; a stage's model has its base model's shape,
        # which the stage's own config does not name, so it is planned as the student's.
        teacher = model_shape(str(cfg.distill.teacher)) or shape
        teacher_shard = ((teacher.params() - norms) / tp + norms) / dp
        terms.append(Term("teacher model (distill.loss=kd)", _gib(teacher_shard * pb),
                          fix=f"{more_dp}, or distill.loss=sft"))
    if lc.sync_mode == "delta":
        # Rank 0 keeps what the engines hold, the whole model in the wire dtype, to diff against.
        terms.append(Term("engines' weights for delta sync (rank 0)",
                          _gib(shape.params() * DTYPE_BYTES[engine_dtype(cfg.rollout)]),
                          fix="learner.sync_mode=full"))
    if lc.stage_weights:
        # Rank 0 casts the whole model into the sync's buckets after each step.
        terms.append(Term("staged weights for the sync (rank 0)",
                          _gib(shape.params() * DTYPE_BYTES[engine_dtype(cfg.rollout)]),
                          fix="learner.stage_weights=false"))
    layer = shape.layer_params() / tp
    if fsdp:
        root = shape.embedding_params() / tp
        gathered = root * cb + 2 * layer * cb + layer * (cb + 4)
        terms.append(Term("gathered FSDP units", _gib(gathered), fix="raise learner.tp",
                          note="root unit + 2 layers + 1 layer's gradients"))
    elif cb < pb:
        # Saved for the backward: every layer's casts, or (checkpointed) the output
        # projection's and the recomputed layer's only.
        lm_head = shape.vocab * shape.hidden / tp
        cast = lm_head + (1 if full else layers) * shape.layer_linear_params() / tp
        terms.append(Term("compute-dtype weight copy", _gib(cast * cb),
                          fix="raise learner.dp (FSDP gathers one layer at a time)",
                          note="autocast's casts of the linear weights (no FSDP)"))
    # The varlen kernel (CUDA, half precision) needs no mask; SDPA's rows are at most
    # rollout.max_model_len keys wide.
    varlen = lc.device == "cuda" and cb == 2
    mask_width = 0 if varlen else min(cfg.rollout.max_model_len, tokens)
    per = activation_bytes_per_token(shape, tp, cb, rb, mask_width)
    saved_none = tokens * (layers * per["layer"] + per["head"])
    saved_full = tokens * layers * per["boundary"]
    recompute = tokens * (per["layer"] + per["backward"])
    fewer = f"lower learner.max_tokens_per_microbatch (now {tokens}) or raise learner.tp (now {tp})"
    terms.append(Term("activations, no checkpointing", _gib(saved_none), counted=not full,
                      fix="set learner.activation_checkpointing=full (or auto), or " + fewer,
                      note=f"{saved_none / tokens / 2**20:.2f} MiB/token"))
    terms.append(Term("activations, full checkpointing", _gib(saved_full), counted=full,
                      fix=fewer, note=f"{saved_full / tokens / 2**20:.3f} MiB/token: the "
                      "layer boundaries"))
    kd = cfg.distill.loss == "kd"
    chunked = tp == 1 and algo.entropy_coef == 0 and algo.entropy_target == 0 and not kd
    logits = logits_bytes(tokens, shape.vocab / tp, cb, chunked, cfg.rollout.temperature)
    how = ("logits + gradient, chunked fp32 log-softmax" if chunked
           else "fp32 log-softmax over vocab / tp")
    if kd:  # the teacher's logits, and the fp32 teacher probabilities the KL saves
        logits += tokens * shape.vocab / tp * (cb + 4)
        how += " + the teacher's"
    # Checkpointed, one layer is rebuilt at a time in the backward, after the log-softmax's
    # buffers and the final norm's activations are gone: the larger of the two counts.
    if full:
        logits += tokens * per["head"]
        how += ", final norm"
        terms.append(Term("one layer recomputed", _gib(recompute), counted=recompute > logits,
                          fix=fewer, note="its activations and gradients in the backward; not "
                          "live with the logits: the larger counts"))
    terms.append(Term("logits / log-probs", _gib(logits), counted=not full or logits >= recompute,
                      fix=fewer, note=how))
    ckpt = f"activation checkpointing {checkpointing}"
    if lc.activation_checkpointing == "auto":
        ckpt += " (auto)"
    title = (f"learner rank (tp {tp} x dp {dp}, {lc.param_dtype} masters, "
             f"{compute if autocast else lc.param_dtype} compute, {tokens:,} tokens per "
             f"micro-batch, {ckpt})")
    return DevicePlan(title, terms, float(lc.device_memory_gb), "learner.device_memory_gb",
                      enforced=lc.device == "cuda")


def engine_plan(cfg: Config, shape: ModelShape) -> DevicePlan:
    """One rollout engine's GPU: weights, runtime, and the KV cache left."""
    r = cfg.rollout
    tp = r.tensor_parallel_size
    dtype = engine_dtype(r)
    eb = DTYPE_BYTES[dtype]
    weights = shape.params() * eb / tp
    kv_heads = math.ceil(shape.kv_heads / tp)  # vLLM replicates kv heads when tp > kv_heads
    kv_per_token = 2 * shape.layers * kv_heads * shape.dim * eb
    gpu = r.num_gpus > 0
    if gpu:
        budget = r.device_memory_gb * r.gpu_memory_utilization
        batched = r.max_num_batched_tokens or ENGINE_DEFAULT_BATCHED_TOKENS
        h = shape.hidden
        act = (batched * (4 * h + (shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate) / tp)
               * eb + 2 * ENGINE_MAX_NUM_SEQS * shape.vocab * 4)
        runtime = ENGINE_RUNTIME_GIB * (0.5 if r.enforce_eager else 1.0) + _gib(act)
        kv = budget - _gib(weights) - runtime
        where = (f"rollout.device_memory_gb x rollout.gpu_memory_utilization = "
                 f"{r.device_memory_gb:g} x {r.gpu_memory_utilization:g}")
    else:
        runtime = 0.0
        kv = r.kv_cache_gb
        budget = _gib(weights) + kv
        where = "rollout.kv_cache_gb (CPU engines)"
    kv_tokens = max(0, int(kv * GiB / kv_per_token))
    seqs = kv_tokens / r.max_model_len
    more = ("raise rollout.tensor_parallel_size or rollout.gpu_memory_utilization, or lower "
            "rollout.max_model_len")
    terms = [Term("weights", _gib(weights), fix=more, note=f"{dtype}, / tensor_parallel {tp}")]
    if gpu:
        terms.append(Term("runtime + activations", runtime, fix=more,
                          note="CUDA context, graphs, vLLM's profiled peak"))
    terms.append(Term("KV cache", max(kv, 0.0), fix=more,
                      note=f"{kv_per_token / 1024:.0f} KiB/token"))
    extra = [f"KV cache holds {kv_tokens:,} tokens = {seqs:.1f} sequences of "
             f"rollout.max_model_len={r.max_model_len:,}"]
    failure = None
    if gpu and kv_tokens < r.max_model_len:
        failure = (f"memory plan: a rollout engine's KV cache would hold {kv_tokens:,} tokens, "
                   f"fewer than one sequence of rollout.max_model_len={r.max_model_len}, after "
                   f"{_gib(weights):.1f} GiB of weights in {where} GiB: {more}")
    title = (f"rollout engine ({'GPU' if gpu else 'CPU'}, tensor_parallel_size {tp}, "
             f"{dtype}; budget {budget:.1f} GiB = {where})")
    return DevicePlan(title, terms, float(r.device_memory_gb if gpu else budget),
                      "rollout.device_memory_gb", enforced=gpu, extra=extra, failure=failure)


def resolve_checkpointing(cfg: Config, shape: ModelShape) -> str:
    """learner.activation_checkpointing as the learner runs it: none | full. `auto` is full when
    the plan without checkpointing exceeds learner.device_memory_gb (on CPU as well: there the
    limit stands for the memory the run may take), none otherwise."""
    requested = cfg.learner.activation_checkpointing
    if requested != "auto":
        return requested
    fits = learner_plan(cfg, shape, "none").peak <= cfg.learner.device_memory_gb
    return "none" if fits else "full"


def memory_plan(cfg: Config, shape: ModelShape) -> MemoryPlan:
    mode = resolve_checkpointing(cfg, shape)
    return MemoryPlan(shape, learner_plan(cfg, shape, mode), engine_plan(cfg, shape), mode,
                      cfg.learner.activation_checkpointing)


def plan_for(cfg: Config) -> MemoryPlan | None:
    """The plan of `cfg`'s model (None when its shape is unknown here)."""
    shape = model_shape(cfg.model.path)
    return None if shape is None else memory_plan(cfg, shape)


def unknown_shape_line(cfg: Config) -> str:
    return (f"model.path={cfg.model.path} is not a model folder here nor a known architecture "
            f"({', '.join(s.name for s in KNOWN_SHAPES.values())}): no memory plan")


def check_memory(cfg: Config) -> None:
    """Raise ConfigError (one line: the biggest term and what to change) when `cfg`'s plan does
    not fit its devices; a model whose shape is unknown here is not checked."""
    from rlsys.config import ConfigError

    plan = plan_for(cfg)
    if plan is not None and (why := plan.refusal()) is not None:
        raise ConfigError(why)


def resource_plan(cfg: Config) -> list[str]:
    """What the run reserves from Ray, one line per actor kind and the total."""
    r, rw, lr = cfg.rollout, cfg.reward, cfg.learner

    def bundle(cpus: float, gpus: float, custom: dict[str, float]) -> str:
        parts = [f"CPU: {cpus:g}"] + ([f"GPU: {gpus:g}"] if gpus else [])
        parts += [f"{name}: {amount:g}" for name, amount in custom.items()]
        return "{" + ", ".join(parts) + "}"

    world = lr.tp * lr.dp
    lines = [
        f"rollout: {r.num_workers} engine(s) x {bundle(r.num_cpus, r.num_gpus, r.resources)}"
        f" (vLLM tensor_parallel_size {r.tensor_parallel_size})",
        f"reward:  {rw.num_workers} worker(s) x {bundle(rw.num_cpus, 0, rw.resources)}",
        f"learner: {world} worker(s) (dp {lr.dp} x tp {lr.tp}) x "
        f"{bundle(lr.num_cpus, lr.num_gpus, lr.resources)}, one placement group, "
        f"device {lr.device}",
    ]
    cpus = r.num_workers * r.num_cpus + rw.num_workers * rw.num_cpus + world * lr.num_cpus
    gpus = r.num_workers * r.num_gpus + world * lr.num_gpus
    lines.append(f"total:   CPU {cpus:g}" + (f", GPU {gpus:g}" if gpus else ""))
    return lines
