"""One rank of the learner group: its shard of the policy and reference (and, for logit-level
distillation, a frozen teacher), the optimizer, the update.

`LearnerGroup` (learners/group.py) starts tp x dp of these as Ray actors that form one
torch.distributed world; a single `Learner` in a plain process is the world of one. Its public
methods are collective: every rank calls them together, each with its data-parallel shard of
the batch (tensor-parallel ranks of the same dp index get the same shard).

Zero wasted passes: micro-batches are packed (learners/packing.py: each prompt once, no
padding through the linear layers); with one update per batch (on-policy) the old log-probs
equal the current ones, so the ratio is taken against a detached copy of the same forward pass
instead of a second pass; the reference model is only built and run when
`algorithm.kl_coef > 0` (and run once per batch, before the advantages, when
`algorithm.kl_in_reward`); and the (vocabulary-sized) output projection runs only on the
positions that predict response tokens, never on the rest of the prompt.

Memory: with `learner.activation_checkpointing=full` every decoder layer of the policy keeps
only its input for backward and runs again there (learners/parallel.py); the reference model
never builds a graph and is not checkpointed. The config's "auto" is decided before the learner
starts; a learner given "auto" does not checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup, TCPStore

from learners import parallel
from learners.packing import (
    ATTENTION_NAME,
    PackedMicroBatch,
    pack_microbatches,
    register_packed_attention,
)
from rlsys import weight_sync
from rlsys.algo import grpo_loss, rollout_is_weights
from rlsys.config import AlgorithmConfig, LearnerConfig, worker_threads
from rlsys.precision import learner_compute_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How metrics combine over micro-batches and dp ranks: maxima stay maxima; a micro-batch's loss
# is its share of the globally normalised loss, so shares add up; every other metric is a
# token-weighted mean.
_MAX_METRICS = frozenset({"ratio_max", "logprob_gap_max", "host_rss_gb", "stage_weights_s"})
_SHARE_METRICS = frozenset({"loss", "pg_loss", "kl"})
# Same on every rank (computed with collectives or from shared state): taken from rank 0.
_GLOBAL_METRICS = frozenset({"grad_norm", "lr", "learner_step"})


def node_memory_available() -> float | None:
    """The share of the node's memory the kernel can give out now (MemAvailable / MemTotal);
    None without /proc/meminfo."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) / int(fields["MemTotal"].split()[0])


def host_rss_gb() -> float:
    """This process's resident set in GiB (0.0 without /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def return_freed_pages() -> str | None:
    """Hand the pages this process's allocator holds free back to the kernel; returns which
    allocator did ("jemalloc", "glibc"), None for neither.

    `learner.allocator=jemalloc` keeps every freed page (no decay), so that each update reuses
    the last one's instead of faulting them in again. Freed blocks of varying sizes fragment
    what it keeps, and the resident set creeps up: a CPU demo learner with 32 prompts a step
    went from 7.8 GiB after its first update to 17.6 GiB at step 17, when Ray's memory monitor
    killed the engine beside it. glibc's heaps creep as well (6.9 to 9.1 GiB over 8 such updates).
    """
    process = ctypes.CDLL(None)
    mallctl = getattr(process, "mallctl", None)  # present when jemalloc is preloaded
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_size_t]
        mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
        return "jemalloc"
    malloc_trim = getattr(process, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
        return "glibc"
    return None


def _to_padded(flat: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Split a flat per-token vector (response-major) into a zero-padded [n, max(lens)] tensor."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lens)), batch_first=True)


def _lens_mask(lens: list[int], device: torch.device) -> torch.Tensor:
    width = max(lens)
    return torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of learner.lr.

    Warm-up: (step + 1) / warmup for step < warmup. Then, with progress
    p = (step - warmup) / (total - warmup) in [0, 1] and the floor m = min_ratio:

        constant: 1
        linear:   m + (1 - m) (1 - p)
        cosine:   m + (1 - m) (1 + cos(pi p)) / 2

    so the last step (step = total - 1, p just under 1) trains at about m x lr. `total` is
    the stage's number of optimizer steps; without one (0) the rate stays constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / (total - warmup))
    decay = 1 - p if schedule == "linear" else (1 + math.cos(math.pi * p)) / 2
    return min_ratio + (1 - min_ratio) * decay


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Metrics of the whole batch from each dp rank's metrics of its shard.

    Each rank reports "tokens" (its response tokens), the weight of its token means.
    """
    total = sum(m.get("tokens", 0.0) for m in per_rank)
    out: dict[str, float] = {}
    for key in per_rank[0]:
        values = [m[key] for m in per_rank if key in m]
        if key in _MAX_METRICS or key.startswith("time/"):
            out[key] = max(values)
        elif key in _SHARE_METRICS or key == "tokens":
            out[key] = sum(values)
        elif key in _GLOBAL_METRICS:
            out[key] = values[0]
        else:
            out[key] = (sum(m[key] * m.get("tokens", 0.0) for m in per_rank if key in m) / total
                        if total else values[0])
    return out


class Learner:
    """Policy shard + AdamW + GRPO loss; optional frozen reference model for the KL term."""

    def __init__(self, model_path: str, learner: LearnerConfig, algorithm: AlgorithmConfig,
                 *, temperature: float = 1.0, max_response_len: int = 128, seed: int = 0,
                 rank: int = 0, master_addr: str = "127.0.0.1",
                 master_port: int | None = None, teacher_path: str | None = None,
                 total_steps: int = 0) -> None:
        from transformers import AutoTokenizer

        self.cfg, self.algo = learner, algorithm
        self.device = torch.device(learner.device)
        world = learner.tp * learner.dp
        if learner.cpu_cores:
            # Before torch's thread pool exists: its threads inherit this affinity.
            os.sched_setaffinity(0, learner.cpu_cores)
        if learner.device == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's CPU reservation; the learner and the
            # engines take turns on the cores, so use them all while updating.
            torch.set_num_threads(worker_threads(learner.num_threads, learner.cpu_cores, world))
        elif learner.device == "cuda":
            torch.cuda.set_device(0)  # Ray shows each learner actor its own GPU only
        parallel.init_learner_world(
            rank, world, master_addr,
            master_port if master_port is not None else weight_sync.find_free_port(master_addr),
            "nccl" if learner.device == "cuda" else "gloo")
        self.rank = rank
        self.mesh = parallel.make_mesh(self.device.type, learner.dp, learner.tp)
        self.dp_group = self.mesh["dp"].get_group()
        self.seed = seed
        torch.manual_seed(seed)

        self.temperature = temperature
        self.max_response_len = max_response_len
        self.compute_dtype = DTYPES[learner_compute_dtype(learner)]
        self.model_path = model_path
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        register_packed_attention()
        # "auto" is resolved to none/full by the memory plan before the learner starts
        # (rlsys.build); a learner built directly with "auto" does not checkpoint.
        self.model = self._build_model(
            model_path, checkpoint_activations=learner.activation_checkpointing == "full")
        self.model.train()
        self.ref_model: nn.Module | None = None
        if algorithm.kl_coef > 0:
            # Runs only without gradients: nothing to checkpoint.
            self.ref_model = self._build_model(model_path).eval().requires_grad_(False)
        # Logit-level distillation (distill.loss=kd): a frozen teacher sharded like the policy,
        # so its vocabulary shards line up with the student's.
        self.teacher_model: nn.Module | None = None
        if teacher_path is not None:
            self.teacher_model = self._build_model(teacher_path).eval().requires_grad_(False)

        # Fused: one kernel over all parameters; the per-tensor loop costs seconds on CPU.
        self.optimizer = torch.optim.AdamW(parallel.param_groups(list(self.model.parameters())),
                                           lr=learner.lr,
                                           betas=tuple(learner.betas),
                                           weight_decay=learner.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, warmup=learner.warmup_steps,
                                              total=total_steps, schedule=learner.lr_schedule,
                                              min_ratio=learner.min_lr_ratio))
        self.step = 0
        self.sync_group: ProcessGroup | None = None
        self.sync_store: TCPStore | None = None  # the group's rendezvous, hosted by rank 0
        self.weight_sender: weight_sync.WeightSender | None = None
        # The same on every rank, so that all ranks agree on whether a sync gathers: what the
        # last sync sent (manifest, bucket bytes), how often the weights changed, and which of
        # those versions the sender has staged (learner.stage_weights).
        self._sync_spec: tuple[weight_sync.WeightManifest, int] | None = None
        self._weights_version = 0
        self._staged_version: int | None = None

    def _build_model(self, path: str, checkpoint_activations: bool = False) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[self.cfg.param_dtype], attn_implementation=ATTENTION_NAME)
        model.to(self.device)
        if checkpoint_activations:
            parallel.apply_activation_checkpointing(model)
        parallel.apply_tensor_parallel(model, self.mesh["tp"])
        parallel.apply_fsdp(model, self.mesh["dp"], self.compute_dtype)
        return model

    # --- log-probs ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _logits(self, model: nn.Module, mb: PackedMicroBatch) -> torch.Tensor:
        """Logits [N, V] at the positions predicting the micro-batch's response tokens
        (response-major), divided by the sampling temperature."""
        dev = self.device
        with self._autocast():
            out = model(input_ids=mb.input_ids[None].to(dev),
                        position_ids=mb.position_ids[None].to(dev),
                        packed_layout=mb.layout.to(dev),
                        logits_to_keep=mb.predict_index.to(dev), use_cache=False)
        logits = out.logits[0]
        return logits / self.temperature if self.temperature != 1.0 else logits

    def _logprobs(self, model: nn.Module, mb: PackedMicroBatch, entropy_grad: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies [N] of the micro-batch's response tokens (response-major).

        The entropy carries gradients only if `entropy_grad` (the entropy bonus is on);
        otherwise it is a metric computed without building a graph.
        """
        return parallel.token_logprobs(self._logits(model, mb), mb.targets.to(self.device),
                                       entropy_grad)

    def _microbatches(self, prompt_ids: list[list[int]], response_ids: list[list[int]]
                      ) -> list[PackedMicroBatch | None]:
        """This rank's packed micro-batches, padded with None to the count of the busiest rank.

        FSDP gathers each layer collectively, so every rank must run the same number of
        forward/backward passes; a None stands for a two-token pass whose loss is multiplied by 0.
        """
        mbs: list[PackedMicroBatch | None] = []
        if prompt_ids:
            mbs += pack_microbatches(prompt_ids, response_ids,
                                     self.cfg.max_tokens_per_microbatch)
        count = torch.tensor([len(mbs)])
        if dist.get_world_size() > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return mbs + [None] * (int(count) - len(mbs))

    def _idle_pass(self, model: nn.Module, backward: bool) -> None:
        mb = pack_microbatches([[self.pad_id]], [[self.pad_id]], 2)[0]
        logprobs, _ = self._logprobs(model, mb)
        if backward:
            parallel.backward(logprobs.sum() * 0.0, self.cfg.tp > 1)

    @torch.no_grad()
    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                         reference: bool = False, temperature: float | None = None
                         ) -> list[list[float]]:
        """Per-token log-probs of each response under the policy (or the reference model),
        at `temperature` when given (see `_at_temperature`)."""
        self._at_temperature(temperature)
        model = self.ref_model if reference else self.model
        if model is None:
            raise ValueError("no reference model: algorithm.kl_coef is 0")
        result: list[list[float]] = [[] for _ in prompt_ids]
        for mb in self._microbatches(prompt_ids, response_ids):
            if mb is None:
                self._idle_pass(model, backward=False)
                continue
            logprobs, _ = self._logprobs(model, mb)
            for i, lp in zip(mb.index, logprobs.cpu().split(mb.response_lens), strict=True):
                result[i] = lp.tolist()
        return result

    # --- the update ---------------------------------------------------------------------------

    def _mind_host_memory(self) -> dict[str, float]:
        """After an update: give the allocator's free pages back when the node is short of
        memory (less than `learner.min_available_memory` of it available), before Ray's
        memory monitor, which kills processes at 95% used, is reached; the learner's resident
        set and whether it gave pages back go into the metrics."""
        available = node_memory_available()
        returned = available is not None and available < self.cfg.min_available_memory
        if returned:
            return_freed_pages()
        return {"host_rss_gb": host_rss_gb(), "host_pages_returned": float(returned)}

    def _global_sum(self, values: list[float]) -> list[float]:
        """Sums over the dp ranks (tp ranks of one dp index hold the same shard)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.mesh["dp"].size() > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def _at_temperature(self, temperature: float | None) -> None:
        """Score from now on at `temperature`, the one the engines sampled the batch at
        (rollout.temperature_at: it changes during rollout.temperature_warmup_steps); None
        keeps the current one."""
        if temperature is not None:
            self.temperature = temperature

    def train_step(self, batch: dict, entropy_coef: float | None = None,
                   temperature: float | None = None) -> dict[str, float]:
        """One GRPO update on this rank's shard of a rollout batch, sampled at `temperature`
        (None: the temperature the learner scores at already).

        `batch` holds, per completion: "prompt_ids", "response_ids", "rollout_logprobs" (lists)
        and "advantages" (floats), optionally "loss_mask" (bools) and "ref_logprobs" (lists:
        the reference model's, when the caller already has them). Returns this rank's metrics
        (see `combine_rank_metrics`), including the train-vs-rollout log-prob gap measured on
        the very forward pass that computes the loss.

        With `algorithm.kl_in_reward` the KL is already in the advantages, so the loss has no
        KL term (the "kl" metric is still reported when "ref_logprobs" come with the batch).
        With `algorithm.rollout_is` the policy-gradient term of each token is weighted by the
        truncated importance ratio pi_old / pi_rollout (`rlsys.algo.rollout_is_weights`), where
        pi_old is the learner's pre-update policy: the detached log-probs of the same forward
        pass for the first mini-batch, log-probs recomputed before the first update for the
        later ones (`algorithm.updates_per_batch` > 1).
        """
        t0 = time.perf_counter()
        self._at_temperature(temperature)
        prompts, responses = batch["prompt_ids"], batch["response_ids"]
        n = len(responses)
        advantages = torch.tensor(batch["advantages"], dtype=torch.float32).reshape(n)
        # Completions excluded from the loss (e.g. truncated ones under reward.truncated=mask):
        # they still count for their group's advantages, but contribute no gradient.
        in_loss = torch.tensor(batch.get("loss_mask", [True] * n), dtype=torch.bool).reshape(n)
        rollout_lp = batch["rollout_logprobs"]
        updates = self.algo.updates_per_batch
        # The trainer's weight when it adapts one (algorithm.entropy_target), else the fixed one.
        entropy_coef = self.algo.entropy_coef if entropy_coef is None else entropy_coef

        ref_lp: list[list[float]] | None = batch.get("ref_logprobs")
        if ref_lp is None and self.ref_model is not None and not self.algo.kl_in_reward:
            ref_lp = self.compute_logprobs(prompts, responses, reference=True)
        kl_coef = 0.0 if self.algo.kl_in_reward else self.algo.kl_coef

        # Mini-batches of whole groups are not needed: advantages are already computed. The
        # shuffle is seeded by the step so that tensor-parallel ranks agree on it.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        order = torch.randperm(n, generator=gen).tolist() if updates > 1 else list(range(n))
        chunks = [order[k::updates] for k in range(updates)]
        # Every optimizer step after the first needs the pre-update policy's log-probs of its
        # mini-batch. The first step's are the detached ones of its own forward pass, taken
        # before any update, so only the later mini-batches pay an extra forward pass.
        old_lp: list[list[float]] = [[] for _ in range(n)]
        later = [i for chunk in chunks[1:] for i in chunk]
        if updates > 1:  # on every rank, even one with nothing here: the passes are collective
            recomputed = self.compute_logprobs([prompts[i] for i in later],
                                               [responses[i] for i in later])
            for i, lp in zip(later, recomputed, strict=True):
                old_lp[i] = lp
        t_ref = time.perf_counter()
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        grad_norms = []
        dev = self.device
        for k, chunk in enumerate(chunks):
            num_tokens, num_seqs = self._global_sum([
                sum(len(responses[i]) for i in chunk if in_loss[i]),
                sum(1 for i in chunk if in_loss[i])])
            agg = {"num_tokens": max(num_tokens, 1.0), "num_seqs": max(num_seqs, 1.0),
                   "norm_len": self.max_response_len}
            self.optimizer.zero_grad(set_to_none=True)
            for mb in self._microbatches([prompts[i] for i in chunk],
                                         [responses[i] for i in chunk]):
                if mb is None:
                    self._idle_pass(self.model, backward=True)
                    continue
                idx = [chunk[i] for i in mb.index]
                lens = mb.response_lens
                mask = _lens_mask(lens, dev)
                lp_flat, ent_flat = self._logprobs(self.model, mb,
                                                   entropy_grad=entropy_coef > 0)
                logprobs = _to_padded(lp_flat, lens)
                old = (_to_padded(self._flat(old_lp, idx).to(dev), lens) if k > 0
                       else logprobs.detach())
                ref = (_to_padded(self._flat(ref_lp, idx).to(dev), lens)
                       if ref_lp is not None else None)
                entropies = _to_padded(ent_flat, lens) if entropy_coef > 0 else None
                loss_mask = mask & in_loss[idx].to(dev)[:, None]
                rollout_flat = self._flat(rollout_lp, idx)
                is_weights, is_metrics = None, {}
                if self.algo.rollout_is != "none":
                    is_weights, is_metrics = rollout_is_weights(
                        old.detach(), _to_padded(rollout_flat.to(dev), lens), loss_mask,
                        self.algo.rollout_is, self.algo.rollout_is_cap)
                loss, m = grpo_loss(
                    logprobs, old, advantages[idx].to(dev), loss_mask,
                    ref_logprobs=ref, kl_coef=kl_coef,
                    kl_estimator=self.algo.kl_estimator, entropies=entropies,
                    entropy_coef=entropy_coef, clip_low=self.algo.clip_low,
                    clip_high=self.algo.clip_high, dual_clip=self.algo.dual_clip,
                    loss_agg=self.algo.loss_agg, is_weights=is_weights, **agg)
                parallel.backward(loss, self.cfg.tp > 1)
                m.update(is_metrics)

                with torch.no_grad():
                    tokens = float(len(lp_flat))
                    gap = (lp_flat.detach().cpu() - rollout_flat).abs()
                    m["logprob_gap"] = float(gap.mean()) if gap.numel() else 0.0
                    m["logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
                    m["entropy"] = float(ent_flat.detach().mean())
                for key, value in m.items():
                    if key in _MAX_METRICS:
                        sums[key] = max(sums.get(key, -math.inf), value)
                        weights[key] = 1.0
                    elif key in _SHARE_METRICS:
                        sums[key] = sums.get(key, 0.0) + value
                        weights[key] = float(len(chunks))  # mean over optimizer steps
                    else:
                        sums[key] = sums.get(key, 0.0) + value * tokens
                        weights[key] = weights.get(key, 0.0) + tokens
            grad_norms.append(self._optimizer_step())
        metrics = {k: sums[k] / weights[k] if weights[k] else 0.0 for k in sums}
        self.step += 1
        t1 = time.perf_counter()
        if self.cfg.stage_weights:
            metrics["stage_weights_s"] = self.stage_weights()
        # Tokens of all prompt+response sequences, as a learner without prompt sharing sees them.
        seq_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        metrics.update(self._mind_host_memory())
        metrics.update({
            "tokens": float(sum(len(r) for r in responses)),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.scheduler.get_last_lr()[0],
            "learner_step": self.step,
            "time/ref_and_old_logprobs": t_ref - t0,
            "time/update_passes": t1 - t_ref,
            "seq_tokens": float(seq_tokens),
        })
        return metrics

    def sft_step(self, batch: dict) -> dict[str, float]:
        """One supervised update on this rank's shard: the response tokens given the prompt
        (the prompt itself carries no loss). Without a teacher, maximise their likelihood:

            L = -(1 / N) * sum over every response token t of log pi(y_t | x, y_<t)

        With a teacher (distill.loss=kd), match its whole next-token distribution at each of
        them (word-level knowledge distillation, `parallel.token_kl`):

            L = (1 / N) * sum over t of KL(pi_T(. | x, y_<t) || pi(. | x, y_<t))

        On the teacher's own samples the first is a one-sample estimate of the second (up to
        the teacher's entropy, a constant): the KL gives the student the same target with the
        teacher's uncertainty over every token instead of the one it happened to sample.
        N counts the response tokens of the whole batch, over all dp ranks, so the update does
        not depend on the micro-batch size or the parallel shape. Uses the same packed passes
        as the GRPO update; the learner must be built with temperature 1.
        """
        t0 = time.perf_counter()
        prompts, responses = batch["prompt_ids"], batch["response_ids"]
        (num_tokens,) = self._global_sum([sum(len(r) for r in responses)])
        sums = {"loss": 0.0, "nll": 0.0, "entropy": 0.0, "kd": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        for mb in self._microbatches(prompts, responses):
            if mb is None:
                self._idle_pass(self.model, backward=True)
                if self.teacher_model is not None:
                    self._idle_pass(self.teacher_model, backward=False)
                continue
            logits = self._logits(self.model, mb)
            if self.teacher_model is None:
                logprobs, entropies = parallel.token_logprobs(logits, mb.targets.to(self.device))
                loss = -logprobs.sum() / max(num_tokens, 1.0)
            else:
                with torch.no_grad():
                    teacher_logits = self._logits(self.teacher_model, mb)
                    logprobs, entropies = parallel.token_logprobs(logits.detach(),
                                                                  mb.targets.to(self.device))
                kl = parallel.token_kl(logits, teacher_logits)
                loss = kl.sum() / max(num_tokens, 1.0)
                sums["kd"] += float(kl.detach().sum())
            parallel.backward(loss, self.cfg.tp > 1)
            sums["loss"] += float(loss.detach())
            sums["nll"] -= float(logprobs.detach().sum())
            sums["entropy"] += float(entropies.detach().sum())
        grad_norm = self._optimizer_step()
        self.step += 1
        tokens = float(sum(len(r) for r in responses))
        per_token = [k for k in ("nll", "entropy", "kd") if k != "kd" or self.teacher_model]
        return {
            **self._mind_host_memory(),
            "loss": sums["loss"],
            **{k: sums[k] / tokens if tokens else 0.0 for k in per_token},
            "tokens": tokens,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "learner_step": self.step,
            "time/update_passes": time.perf_counter() - t0,
            "seq_tokens": float(sum(len(p) + len(r) for p, r in zip(prompts, responses,
                                                                     strict=True))),
        }

    @staticmethod
    def _flat(per_seq: list[list[float]] | None, idx: list[int]) -> torch.Tensor:
        assert per_seq is not None
        return torch.tensor([x for i in idx for x in per_seq[i]], dtype=torch.float32)

    def _optimizer_step(self) -> float:
        norm = parallel.clip_grad_norm(list(self.model.parameters()), self.cfg.grad_clip)
        self.optimizer.step()
        self._weights_version += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def update_reference(self) -> None:
        """Copy the policy into the reference model (the paper refreshes it every 400 steps).

        Both are sharded the same way, so each rank copies its own shards.
        """
        if self.ref_model is not None:
            for ref, param in zip(self.ref_model.parameters(), self.model.parameters(),
                                  strict=True):
                ref.copy_(param)

    # --- weights out --------------------------------------------------------------------------

    def weight_manifest(self, dtype: str) -> weight_sync.WeightManifest:
        """What the engines will receive: names, full shapes and the wire (engine) dtype.

        Tied weights appear once; the engines re-tie them.
        """
        return weight_sync.build_manifest(self.model.named_parameters(), DTYPES[dtype])

    def host_weight_sync(self) -> tuple[str, int]:
        """Start hosting the next weight-sync group's rendezvous; returns where (this node's
        address, the port its server listens on)."""
        import ray

        addr = ray.util.get_node_ip_address()
        self.sync_store = weight_sync.host_weight_sync_store(addr)
        return addr, self.sync_store.port

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int,
                         backend: str) -> int:
        """Rank 0 joins the engines' weight-sync group as its rank 0; other ranks do nothing."""
        if self.rank == 0:
            self.sync_group = weight_sync.init_weight_sync_group(
                backend, master_addr, master_port, rank=0, world_size=world_size,
                store=self.sync_store)
        return self.rank

    def close_weight_sync(self) -> None:
        """Leave the weight-sync group, before joining one of another size (engines added or
        removed); see `weight_sync.close_weight_sync_group`."""
        weight_sync.close_weight_sync_group(self.sync_group)
        self.sync_group = self.sync_store = None
        if self.weight_sender is not None:
            # A new group may hold new engines: the next send is full. What is staged stays.
            self.weight_sender.holds = False

    @torch.no_grad()
    def broadcast_weights(self, manifest: weight_sync.WeightManifest, bucket_bytes: int,
                          mode: str = "full") -> dict[str, float]:
        """Gather each full tensor from its shards (all ranks) and send it on (rank 0): all of
        it (`mode="full"`), or only the values that changed since the last send ("delta").

        Rank 0 keeps a `WeightSender` for the group: reused bucket buffers and, with
        `learner.sync_mode=delta`, what the engines hold (the model's size in the wire dtype).
        It holds at most one gathered tensor at a time, never the gathered model. A full sync
        of weights staged since they last changed (`stage_weights`) gathers nothing and only
        sends; its figures then have "staged" 1.
        """
        staged = (mode == "full" and self._staged_version == self._weights_version
                  and self._sync_spec == (manifest, bucket_bytes))
        self._sync_spec = (manifest, bucket_bytes)
        tensors = iter(()) if staged else parallel.full_tensors(self.model)
        if self.rank != 0:
            for _ in tensors:
                pass
            return {}
        if self.sync_group is None:
            raise RuntimeError("init_weight_sync must be called before broadcast_weights")
        sender = self._sender(manifest, bucket_bytes, weight_sync.wire_device(self.sync_group))
        try:
            if staged:
                return sender.send_full(self.sync_group, None) | {"staged": 1.0}
            # (A full send overwrites what is staged; `_staged_version`, older than the
            # weights, can no longer match.)
            send = sender.send_delta if mode == "delta" else sender.send_full
            return send(self.sync_group, tensors) | {"staged": 0.0}
        finally:
            # A send that failed (an engine died) must still take part in the other ranks'
            # gathers of the remaining tensors, or they would wait for rank 0 forever.
            for _ in tensors:
                pass

    def _sender(self, manifest: weight_sync.WeightManifest, bucket_bytes: int,
                device: torch.device) -> weight_sync.WeightSender:
        """Rank 0's sender for this manifest and bucket size (kept: its buffers are reused)."""
        sender = self.weight_sender
        if sender is None or sender.manifest != manifest or sender.bucket_bytes != bucket_bytes:
            sender = self.weight_sender = weight_sync.WeightSender(
                manifest, bucket_bytes, device, keep_held=self.cfg.sync_mode == "delta")
        return sender

    @torch.no_grad()
    def stage_weights(self) -> float:
        """Cast the weights into the sync's buckets now (`WeightSender.stage`), so that the next
        full sync, if they have not changed by then, only sends; returns the seconds it took
        (0 before the first sync, whose manifest and bucket size it needs). All ranks take part
        (the gathers are collective); rank 0 keeps the buckets on its wire device."""
        if self._sync_spec is None:
            return 0.0
        t0 = time.perf_counter()
        tensors = parallel.full_tensors(self.model)
        if self.rank == 0:
            # The sync's backend follows this device (NCCL for CUDA, gloo for host memory), so
            # the buckets live where the wire reads them; the sender exists after a first sync.
            self._sender(*self._sync_spec, self.device).stage(tensors)
        for _ in tensors:  # the other ranks' share of the gathers (rank 0: nothing left)
            pass
        self._staged_version = self._weights_version
        return time.perf_counter() - t0

    @torch.no_grad()
    def weight_digests(self, manifest: weight_sync.WeightManifest) -> list[str]:
        """What the engines should hold after a sync: hashes of the full tensors in their wire
        dtype (all ranks gather; rank 0's answer counts). Compare with the engines' digests."""
        tensors = (tensor for _, tensor in parallel.full_tensors(self.model))
        if self.rank != 0:
            for _ in tensors:  # the gathers are collective
                pass
            return []
        return weight_sync.digests(tensors, manifest)

    # --- checkpoints --------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd,
                 "scheduler": self.scheduler.state_dict(), "step": self.step}
        if self.ref_model is not None:
            state["ref_model"] = get_model_state_dict(self.ref_model)
        return state

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's shards of model, optimizer, scheduler and step (DCP, all ranks)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=path)

    def load_checkpoint(self, path: str) -> int:
        """Restore what `save_checkpoint` wrote, resharding if needed; returns the step."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if self.ref_model is not None:
            set_model_state_dict(self.ref_model, state["ref_model"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._weights_version += 1
        return self.step

    def save_pretrained(self, path: str) -> str:
        """Export the policy as a Hugging Face folder (for serving and evaluation).

        Every rank takes part in gathering the full state dict; rank 0 writes it.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )
        from transformers import AutoTokenizer

        full = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=full)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(path)
        return path
