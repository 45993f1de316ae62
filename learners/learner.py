"""The learner: policy (and reference) model, optimizer, and the GRPO update.

One `Learner` runs in one Ray actor (see `learners.group`). Its public methods are the
interface a tensor x data parallel group will keep: `train_step(batch)` takes the rollout batch
with advantages and applies `algorithm.updates_per_batch` optimizer steps; `broadcast_weights`
sends the new weights to the rollout engines.

Zero wasted passes: with one update per batch (on-policy) the old log-probs equal the current
ones, so the ratio is taken against a detached copy of the same forward pass instead of a
second pass; the reference model is only loaded and run when `algorithm.kl_coef > 0`; and the
(vocabulary-sized) output projection runs only on response positions, never on prompt tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from learners import weight_sync
from rlsys.algo import entropy_from_logits, grpo_loss
from rlsys.config import AlgorithmConfig, LearnerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How per-micro-batch metrics combine: maxima stay maxima; a micro-batch's loss is its share of
# the globally normalised loss, so shares add up; every other metric is a token-weighted mean.
_MAX_METRICS = frozenset({"ratio_max", "logprob_gap_max"})
_SHARE_METRICS = frozenset({"loss", "pg_loss"})


@dataclass
class MicroBatch:
    """Completions that share prompts: each distinct prompt appears once.

    Prompts are left-padded (so every prompt ends in the last column and its keys/values can
    be continued by its responses); responses are right-padded.
    """

    prompt_ids: torch.Tensor  # [k, P]
    prompt_mask: torch.Tensor  # [k, P]
    response_ids: torch.Tensor  # [n, R]
    response_mask: torch.Tensor  # [n, R] bool
    owner: torch.Tensor  # [n] the prompt row each response continues
    index: list[int]  # positions of the n responses in the full batch


def make_microbatches(prompt_ids: list[list[int]], response_ids: list[list[int]],
                      max_tokens: int, pad_id: int) -> list[MicroBatch]:
    """Split a batch into micro-batches of at most `max_tokens` padded tokens.

    GRPO samples G completions of every prompt, so a prompt is run through the model once and
    its keys/values are shared by all of its completions in the micro-batch: with prompts
    several times longer than the answers (few-shot chat prompts), this removes most of the
    learner's work. Units are sorted by length so that padding stays small. (Packing several
    sequences into one row would need a variable-length attention kernel; on CPU a dense
    block-diagonal mask costs the square of the packed length.)
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    # A unit is one prompt with some of its responses, cut so that one unit fits the budget.
    units: list[tuple[tuple[int, ...], list[int]]] = []
    for prompt, members in by_prompt.items():
        members = sorted(members, key=lambda i: len(response_ids[i]))
        piece: list[int] = []
        for i in members:
            width = len(response_ids[i])  # ascending: the newest member is the widest
            if len(prompt) + width > max_tokens:
                raise ValueError(f"a sequence of {len(prompt) + width} tokens exceeds "
                                 f"learner.max_tokens_per_microbatch={max_tokens}")
            if piece and len(prompt) + (len(piece) + 1) * width > max_tokens:
                units.append((prompt, piece))
                piece = []
            piece.append(i)
        units.append((prompt, piece))
    units.sort(key=lambda u: (len(u[0]), max(len(response_ids[i]) for i in u[1])))

    def cost(group: list[tuple[tuple[int, ...], list[int]]]) -> int:
        width_p = max(len(u[0]) for u in group)
        width_r = max(len(response_ids[i]) for u in group for i in u[1])
        return len(group) * width_p + sum(len(u[1]) for u in group) * width_r

    groups: list[list[tuple[tuple[int, ...], list[int]]]] = []
    for unit in units:
        if groups and cost([*groups[-1], unit]) <= max_tokens:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return [_collate(group, response_ids, pad_id) for group in groups]


def _collate(group: list[tuple[tuple[int, ...], list[int]]], response_ids: list[list[int]],
             pad_id: int) -> MicroBatch:
    width_p = max(len(prompt) for prompt, _ in group)
    index = [i for _, members in group for i in members]
    width_r = max(len(response_ids[i]) for i in index)
    prompt_ids = torch.full((len(group), width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(group), width_p), dtype=torch.long)
    responses = torch.full((len(index), width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(index), width_r), dtype=torch.bool)
    owner = []
    for row, (prompt, members) in enumerate(group):
        prompt_ids[row, width_p - len(prompt):] = torch.tensor(prompt)
        prompt_mask[row, width_p - len(prompt):] = 1
        owner += [row] * len(members)
    for row, i in enumerate(index):
        responses[row, : len(response_ids[i])] = torch.tensor(response_ids[i])
        response_mask[row, : len(response_ids[i])] = True
    return MicroBatch(prompt_ids, prompt_mask, responses, response_mask,
                      torch.tensor(owner, dtype=torch.long), index)


def _to_padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter a flat per-token vector (row-major) into a zero-padded [b, R] tensor."""
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out


class Learner:
    """Policy model + AdamW + GRPO loss; optional frozen reference model for the KL term."""

    def __init__(self, model_path: str, learner: LearnerConfig, algorithm: AlgorithmConfig,
                 *, temperature: float = 1.0, max_response_len: int = 128, seed: int = 0,
                 total_steps: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        threads = learner.num_threads or os.cpu_count() or 1
        if learner.device == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's CPU reservation; the learner and the
            # engines take turns on the cores, so use them all while updating.
            torch.set_num_threads(threads)
        self.cfg, self.algo = learner, algorithm
        self.device = torch.device(learner.device)
        self.temperature = temperature
        self.max_response_len = max_response_len
        self.compute_dtype = DTYPES[learner.compute_dtype]
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=DTYPES[learner.param_dtype]).to(self.device)
        self.model.train()
        self.ref_model: nn.Module | None = None
        if algorithm.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learner.lr,
                                           betas=tuple(learner.betas),
                                           weight_decay=learner.weight_decay)
        warmup = learner.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.step = 0
        self.sync_group = None

    # --- log-probs ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _response_logits(self, model: nn.Module, mb: MicroBatch) -> torch.Tensor:
        """Logits [n, V] of every response token (row-major), scaled by the temperature.

        Two passes over the decoder: the k prompts, keeping their keys/values, then the n
        responses on top of the cache entry of their own prompt. Gradients flow through the
        shared keys/values back into the prompt pass, so this equals one pass over each
        prompt+response sequence, at the cost of one prompt per group.
        """
        dev = self.device
        decoder = model.get_decoder()
        prompt_mask = mb.prompt_mask.to(dev)
        owner = mb.owner.to(dev)
        cache = DynamicCache(config=model.config)
        prompt_out = decoder(input_ids=mb.prompt_ids.to(dev), attention_mask=prompt_mask,
                             position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
                             past_key_values=cache, use_cache=True)
        cache.batch_select_indices(owner)  # each response gets its prompt's keys/values
        response_mask = mb.response_mask.to(dev)
        width = response_mask.shape[1]
        start = prompt_mask.sum(-1)[owner]
        response_out = decoder(
            input_ids=mb.response_ids.to(dev),
            attention_mask=torch.cat([prompt_mask[owner], response_mask.long()], dim=1),
            position_ids=start[:, None] + torch.arange(width, device=dev),
            past_key_values=cache, use_cache=True)
        # Token j of a response is predicted from the state before it: the prompt's last
        # state for j = 0, the response's own state j - 1 after that.
        first = prompt_out.last_hidden_state[:, -1][owner]
        hidden = torch.cat([first[:, None], response_out.last_hidden_state[:, :-1]], dim=1)
        logits = model.get_output_embeddings()(hidden[response_mask]).float()
        return logits / self.temperature if self.temperature != 1.0 else logits

    def _token_logprobs(self, logits: torch.Tensor, mb: MicroBatch
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [n] of the response tokens, and the full log-softmax [n, V] they came from."""
        targets = mb.response_ids[mb.response_mask].to(self.device)
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, targets[:, None]).squeeze(-1), logp

    @torch.no_grad()
    def compute_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                         reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each response under the policy (or the reference model)."""
        model = self.ref_model if reference else self.model
        if model is None:
            raise ValueError("no reference model: algorithm.kl_coef is 0")
        result: list[list[float]] = [[] for _ in prompt_ids]
        for mb in make_microbatches(prompt_ids, response_ids, self.cfg.max_tokens_per_microbatch,
                                    self.pad_id):
            with self._autocast():
                lp, _ = self._token_logprobs(self._response_logits(model, mb), mb)
            padded = _to_padded(lp.cpu(), mb.response_mask)
            for row, i in enumerate(mb.index):
                result[i] = padded[row, : int(mb.response_mask[row].sum())].tolist()
        return result

    # --- the update ---------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict[str, float]:
        """One GRPO update on a rollout batch.

        `batch` holds, per completion: "prompt_ids", "response_ids", "rollout_logprobs" (lists)
        and "advantages" (floats). Returns averaged metrics, including the train-vs-rollout
        log-prob gap measured on the very forward pass that computes the loss.
        """
        t0 = time.perf_counter()
        prompts, responses = batch["prompt_ids"], batch["response_ids"]
        advantages = torch.tensor(batch["advantages"], dtype=torch.float32)
        # Completions excluded from the loss (e.g. truncated ones under reward.truncated=mask):
        # they still count for their group's advantages, but contribute no gradient.
        in_loss = torch.tensor(batch.get("loss_mask", [True] * len(responses)), dtype=torch.bool)
        rollout_lp = batch["rollout_logprobs"]
        n = len(responses)
        metrics: dict[str, float] = {}

        ref_lp: list[list[float]] | None = None
        if self.ref_model is not None:
            ref_lp = self.compute_logprobs(prompts, responses, reference=True)
        old_lp: list[list[float]] | None = None
        if self.algo.updates_per_batch > 1:
            # Several optimizer steps per batch: later steps need the pre-update policy.
            old_lp = self.compute_logprobs(prompts, responses)
        t_ref = time.perf_counter()

        # Mini-batches of whole groups are not needed: advantages are already computed.
        order = torch.randperm(n).tolist() if self.algo.updates_per_batch > 1 else list(range(n))
        chunks = [order[k::self.algo.updates_per_batch] for k in range(self.algo.updates_per_batch)]
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        grad_norms = []
        for chunk in chunks:
            sub_prompts = [prompts[i] for i in chunk]
            sub_responses = [responses[i] for i in chunk]
            num_tokens = sum(len(responses[i]) for i in chunk if in_loss[i])
            agg = {"num_tokens": max(num_tokens, 1),
                   "num_seqs": max(int(in_loss[chunk].sum()), 1),
                   "norm_len": self.max_response_len}
            self.optimizer.zero_grad(set_to_none=True)
            for mb in make_microbatches(sub_prompts, sub_responses,
                                        self.cfg.max_tokens_per_microbatch, self.pad_id):
                idx = [chunk[i] for i in mb.index]
                mask = mb.response_mask.to(self.device)
                with self._autocast():
                    logits = self._response_logits(self.model, mb)
                    lp_flat, logp_all = self._token_logprobs(logits, mb)
                logprobs = _to_padded(lp_flat, mask)
                old = (_to_padded(self._flat(old_lp, idx), mask) if old_lp is not None
                       else logprobs.detach())
                ref = _to_padded(self._flat(ref_lp, idx), mask) if ref_lp is not None else None
                entropies = None
                if self.algo.entropy_coef > 0:
                    entropies = _to_padded(entropy_from_logits(logits), mask)
                loss_mask = mask & in_loss[idx].to(self.device)[:, None]
                loss, m = grpo_loss(
                    logprobs, old, advantages[idx].to(self.device), loss_mask,
                    ref_logprobs=ref, kl_coef=self.algo.kl_coef,
                    kl_estimator=self.algo.kl_estimator, entropies=entropies,
                    entropy_coef=self.algo.entropy_coef, clip_low=self.algo.clip_low,
                    clip_high=self.algo.clip_high, dual_clip=self.algo.dual_clip,
                    loss_agg=self.algo.loss_agg, **agg)
                loss.backward()

                with torch.no_grad():
                    tokens = float(mask.sum())
                    gap = (lp_flat.detach().cpu() - self._flat(rollout_lp, idx)).abs()
                    m["logprob_gap"] = float(gap.mean()) if gap.numel() else 0.0
                    m["logprob_gap_max"] = float(gap.max()) if gap.numel() else 0.0
                    if entropies is None:
                        # A metric only: reuse the loss's log-softmax (the logits are finite)
                        # instead of a second pass over the [n, vocabulary] logits.
                        logp = logp_all.detach()
                        m["entropy"] = float(-(logp.exp() * logp).sum(-1).mean())
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
        metrics.update({k: sums[k] / weights[k] if weights[k] else 0.0 for k in sums})
        self.step += 1
        t1 = time.perf_counter()
        # Tokens of all prompt+response sequences, as a learner without prompt sharing sees them.
        num_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        metrics.update({
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.scheduler.get_last_lr()[0],
            "learner_step": self.step,
            "time/ref_and_old_logprobs": t_ref - t0,
            "time/update_passes": t1 - t_ref,
            "tokens_per_s": num_tokens / (t1 - t0),
        })
        return metrics

    @staticmethod
    def _flat(per_seq: list[list[float]] | None, idx: list[int]) -> torch.Tensor:
        assert per_seq is not None
        return torch.tensor([x for i in idx for x in per_seq[i]], dtype=torch.float32)

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def update_reference(self) -> None:
        """Copy the policy into the reference model (the paper refreshes it every 400 steps)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())

    # --- weights out --------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights under their HF names; tied weights once (the engines re-tie them)."""
        yield from self.model.named_parameters()

    def weight_manifest(self, dtype: str) -> weight_sync.WeightManifest:
        """What the engines will receive: names, shapes and the wire (engine) dtype."""
        return weight_sync.build_manifest(self.named_weights(), DTYPES[dtype])

    def sync_address(self) -> tuple[str, int]:
        """Where this learner will host the weight-sync rendezvous (its node, a free port)."""
        import ray

        addr = ray.util.get_node_ip_address()
        return addr, weight_sync.find_free_port(addr)

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int,
                         backend: str) -> int:
        self.sync_group = weight_sync.init_weight_sync_group(
            backend, master_addr, master_port, rank=0, world_size=world_size)
        return 0

    @torch.no_grad()
    def broadcast_weights(self, manifest: weight_sync.WeightManifest,
                          bucket_bytes: int) -> dict[str, float]:
        if self.sync_group is None:
            raise RuntimeError("init_weight_sync must be called before broadcast_weights")
        return weight_sync.broadcast_weights(self.sync_group, self.named_weights(), manifest,
                                             bucket_bytes)

    def save_pretrained(self, path: str) -> str:
        self.model.save_pretrained(path)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(self.model.name_or_path).save_pretrained(path)
        return path
