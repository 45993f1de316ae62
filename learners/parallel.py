"""Tensor x data parallelism for the learner, with PyTorch's DTensor tools.

The learner's world is a 2-D device mesh ("dp", "tp"), rank = dp_index * tp + tp_index:

* tensor parallel over "tp", Megatron-style (`parallelize_module`): attention q/k/v and MLP
  gate/up are split by output features (column-parallel), attention output and MLP down by input
  features (row-parallel), so each block needs one all-reduce in forward and one in backward.
  The token embedding and the output projection are split by vocabulary; the logits stay split
  (a DTensor sharded on the vocabulary), and log-probs and entropies are computed from the
  shards under `loss_parallel`, so no rank ever holds a [tokens, vocabulary] tensor.
* fully sharded data parallel over "dp" (FSDP2 `fully_shard`): parameters, gradients and
  optimizer state are sharded; each decoder layer is all-gathered (in the compute dtype) just
  before it runs. At dp = 1 there is nothing to shard and FSDP is not applied: on CPU its
  gathers and copies cost a fifth of the step.

Activation checkpointing (`learner.activation_checkpointing=full`) is applied to every decoder
layer before either: each layer's forward keeps only its inputs, and backward runs it again
(non-reentrant `torch.utils.checkpoint`, as torchtitan does). It replaces the layer's `forward`
rather than wrapping the layer in a `CheckpointWrapper` module, so parameter names, the tensor
parallel plan (which addresses `self_attn.q_proj`... inside each layer) and the FSDP units are
exactly those of the plain model: the weight sync, the checkpoints and the engines never see a
`_checkpoint_wrapped_module.` prefix. FSDP's hooks stay outside the recomputed region (the
layer is gathered once for its backward, recomputation included); tensor parallel's
collectives are inside it and run again, in the same order on every rank.

Mixed precision is autocast in every shape (fp32 master weights, bf16 matmuls); under FSDP the
gathered parameters are already bf16, so its casts are free. Everything downstream (gradient
norm, gathering full tensors, checkpoints) takes plain tensors and DTensors alike.

The same functions run on GPUs (NCCL) and on CPU (gloo); only the mesh's device type differs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

# DTensor warns each time a 2-D (dp x tp) reduction, such as the gradient norm, runs as two
# collectives instead of one over a flattened mesh: correct, and at our sizes not worth a
# second mesh; the warning would repeat every step.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

# Module names (relative to a decoder layer) of the Llama/Qwen2/Mistral family.
_COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "mlp.gate_proj", "mlp.up_proj")
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def init_learner_world(rank: int, world_size: int, master_addr: str, master_port: int,
                       backend: str, timeout_s: float = 600) -> None:
    """Join the learner group's default process group (once per process)."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"this process is already rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {rank} of {world_size}")
        return
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def make_mesh(device_type: str, dp: int, tp: int) -> DeviceMesh:
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def check_tensor_parallel(config: object, tp: int) -> None:
    """Refuse shapes that Megatron-style splitting cannot serve, naming the config key."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        raise ValueError(f"learner.tp={tp}: the model config has no num_attention_heads")
    for what, n in (("attention heads", heads), ("key/value heads", kv_heads),
                    ("intermediate_size", getattr(config, "intermediate_size", tp))):
        if n % tp:
            raise ValueError(f"learner.tp={tp} must divide the model's {what} ({n})")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer in place (see the module docstring); idempotent.

    Without gradients (log-prob passes, the reference model) a layer runs as usual: there is
    nothing to save, so nothing to recompute.
    """
    for layer in model.get_decoder().layers:
        if not is_activation_checkpointed(layer):
            layer.forward = _checkpointed(layer.forward)


def is_activation_checkpointed(layer: nn.Module) -> bool:
    return getattr(layer.forward, "activation_checkpointed", False)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # Non-reentrant: keyword tensors (rotary embeddings, the packed layout) need no special
        # handling, and the RNG and autocast states are replayed in the recomputation.
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.activation_checkpointed = True  # type: ignore[attr-defined]
    return run


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split a Llama-family causal LM over `tp_mesh` in place (see the module docstring)."""
    tp = tp_mesh.size()
    if tp == 1:
        return
    check_tensor_parallel(model.config, tp)
    decoder = model.get_decoder()
    missing = []
    for name in (*_COLUMN_PARALLEL, *_ROW_PARALLEL):
        try:
            decoder.layers[0].get_submodule(name)
        except AttributeError:
            missing.append(name)
    if missing:
        raise ValueError(f"learner.tp={tp} needs Llama/Qwen2-style decoder layers; "
                         f"{type(model).__name__} has no {', '.join(missing)}")
    for layer in decoder.layers:
        plan = {name: ColwiseParallel() for name in _COLUMN_PARALLEL}
        plan |= {name: RowwiseParallel() for name in _ROW_PARALLEL}
        parallelize_module(layer, tp_mesh, plan)
    tied = model.config.tie_word_embeddings
    # Vocabulary-parallel embedding: each rank looks up its rows, the partial sums are reduced.
    parallelize_module(decoder.embed_tokens, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    # Vocabulary-parallel output projection; the logits stay sharded on the vocabulary.
    parallelize_module(model.get_output_embeddings(), tp_mesh,
                       ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    if tied:
        # Both are split on the vocabulary dimension, so one DTensor serves both again.
        model.get_output_embeddings().weight = decoder.embed_tokens.weight


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Shard parameters, gradients and optimizer state over `dp_mesh`, one unit per layer.

    Nothing to do when `dp_mesh` has one rank.

    Parameters stay in their (fp32 master) dtype and are cast to `compute_dtype` when gathered;
    gradients are reduced in fp32. Gradients are summed, not averaged, over the dp ranks: the
    GRPO loss on each rank is already normalised by the global batch's token/sequence count.
    """
    if dp_mesh.size() == 1:
        return
    mp = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
        reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    # Each FSDP unit (every layer and the root) keeps its own reduction settings. A plain SUM:
    # gloo has no pre-multiplied sum, and with factor 1 there is nothing to scale.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of each row of `logits` [N, V], both in fp32.

    The entropy is differentiable only if `entropy_grad` (an entropy bonus); as a metric it
    carries no graph. `logits` may be a DTensor sharded on the vocabulary (tensor parallel):
    then both are computed from the shards (a max, a sum of exponentials and the target's logit
    reduced across ranks), never gathering the vocabulary.
    """
    if isinstance(logits, DTensor):
        with loss_parallel():
            logprobs = -F.cross_entropy(logits.float(), targets, reduction="none")
        # Summing a DTensor over its sharded vocabulary and reducing it with full_tensor()
        # differentiates wrongly (measured: gradients off by ~0.25 at tp=2), so the entropy is
        # computed on the local shards with explicit reductions.
        shard = logits.to_local() if entropy_grad else logits.to_local().detach()
        entropy = _VocabParallelEntropy.apply(shard, logits.device_mesh.get_group())
        return logprobs.full_tensor(), entropy
    if entropy_grad:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
    return _TargetLogprobs.apply(logits, targets)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row's next-token distribution, in fp32, [N]:

        KL_t = sum over the vocabulary v of p_T(v) * (log p_T(v) - log p_S(v))

    the forward KL of word-level knowledge distillation. Gradients flow into the student's
    logits only, d KL_t / d z_S(v) = p_S(v) - p_T(v); the teacher is never differentiated, so a
    caller cannot train it by mistake. Both may be DTensors sharded on the vocabulary in the
    same way (tensor parallel): then each rank works on its shard and only the softmax
    normalisers and the per-row sums cross ranks (`_VocabParallelKL`), never the vocabulary.
    """
    group = None
    if isinstance(student_logits, DTensor):
        if not isinstance(teacher_logits, DTensor) or (
                teacher_logits.placements != student_logits.placements):
            raise ValueError("token_kl: teacher and student logits must be sharded alike")
        group = student_logits.device_mesh.get_group()
        student_logits, teacher_logits = student_logits.to_local(), teacher_logits.to_local()
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), group)


class _VocabParallelKL(torch.autograd.Function):
    """`token_kl` on vocabulary shards (or the whole vocabulary when `group` is None), as
    Megatron's vocabulary-parallel cross-entropy: the forward reduces row maxima, sums of
    exponentials and the partial KLs over the group; the backward is local, since every rank
    computes the same loss and owns the gradient of its own shard only."""

    @staticmethod
    def _log_softmax(z: torch.Tensor, group: Any) -> torch.Tensor:
        z = z.float()
        row_max = z.max(-1, keepdim=True).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (z - row_max).exp().sum(-1, keepdim=True)
        if group is not None:
            dist.all_reduce(sum_exp, group=group)
        return z - row_max - sum_exp.log()

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, group: Any
                ) -> torch.Tensor:
        logp_s = _VocabParallelKL._log_softmax(student, group)
        logp_t = _VocabParallelKL._log_softmax(teacher, group)
        p_t = logp_t.exp()
        kl = (p_t * (logp_t - logp_s)).sum(-1)
        if group is not None:
            dist.all_reduce(kl, group=group)
        ctx.save_for_backward(logp_s, p_t)
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logp_s, p_t = ctx.saved_tensors
        grad = (logp_s.exp() - p_t) * grad_kl.float()[:, None]
        return grad.to(ctx.student_dtype), None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """The entropy H = -sum_v p(v) log p(v) of each row of vocabulary-sharded logits: row
    maxima and sums reduced over `group`, the backward local, as in `_VocabParallelKL`:
        d H / d z_j = -p_j (log p_j + H)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, group: Any) -> torch.Tensor:
        logp = _VocabParallelKL._log_softmax(logits, group)
        entropy = -(logp.exp() * logp).sum(-1)
        dist.all_reduce(entropy, group=group)
        ctx.save_for_backward(logp, entropy)
        ctx.logits_dtype = logits.dtype
        return entropy

    @staticmethod
    def backward(ctx: Any, grad_entropy: torch.Tensor) -> tuple[torch.Tensor, None]:
        logp, entropy = ctx.saved_tensors
        grad = -logp.exp() * (logp + entropy[:, None]) * grad_entropy.float()[:, None]
        return grad.to(ctx.logits_dtype), None


class _TargetLogprobs(torch.autograd.Function):
    """log softmax(logits)[target] without materialising the [N, V] log-softmax.

    The autograd way keeps an fp32 copy of the logits, their log-softmax (saved for backward),
    its gradient and a zero-filled gather gradient: four vocabulary-sized fp32 tensors per
    micro-batch, each fresh memory the kernel must fault in. Here only the log-sum-exp per row
    is saved; forward and backward work through two reused fp32 buffers of a few thousand rows,
    and backward writes the gradient once, in the logits' dtype:
        d logp_t / d z_j = 1[j = t] - softmax(z)_j.
    The entropy (a metric) comes out of the same pass.
    """

    @staticmethod
    def _chunks(logits: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        step = max(1, min(rows, (64 << 20) // max(vocab, 1)))  # ~256 MB fp32 per buffer
        spans = [(s, min(s + step, rows)) for s in range(0, rows, step)]
        empty = functools.partial(torch.empty, (step, vocab), dtype=torch.float32,
                                  device=logits.device)
        return spans, empty(), empty()

    @staticmethod
    def forward(ctx: object, logits: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        spans, z, p = _TargetLogprobs._chunks(logits)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(lse)
        for s, e in spans:
            zc, pc = z[: e - s], p[: e - s]
            zc.copy_(logits[s:e])
            lse[s:e] = torch.logsumexp(zc, dim=-1)
            zc.sub_(lse[s:e, None])  # log-probs
            torch.exp(zc, out=pc)
            entropy[s:e] = -(pc.mul_(zc)).sum(-1)
        logprobs = logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: object, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor
                 ) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        spans, z, _ = _TargetLogprobs._chunks(logits)
        grad = torch.empty_like(logits)
        g = grad_logprobs.float()
        for s, e in spans:
            zc = z[: e - s]
            zc.copy_(logits[s:e]).sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
            zc.scatter_add_(-1, targets[s:e, None], g[s:e, None])
            grad[s:e] = zc
        return grad, None


def backward(loss: torch.Tensor, tensor_parallel: bool) -> None:
    """`loss.backward()`; vocabulary-parallel log-softmax must also be differentiated under
    `loss_parallel`."""
    with loss_parallel() if tensor_parallel else contextlib.nullcontext():
        loss.backward()


def param_groups(params: list[nn.Parameter]) -> list[dict[str, list[nn.Parameter]]]:
    """Optimizer parameter groups of like tensors: plain tensors, and DTensors per mesh and
    placements. A fused optimizer step is one kernel per group and cannot mix them (under
    tp > 1 without FSDP the norms stay plain tensors while the split layers are DTensors)."""
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for p in params:
        groups[_tensor_kind(p)].append(p)
    return [{"params": group} for group in groups.values()]


def _tensor_kind(t: torch.Tensor) -> object:
    """None for a plain tensor; (mesh, placements) for a DTensor."""
    return (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else None


def _grad_groups(params: list[nn.Parameter]) -> list[list[torch.Tensor]]:
    """Gradients grouped by mesh and placements (norms of mixed DTensors cannot be stacked)."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        groups[_tensor_kind(g)].append(g)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the (sharded) gradients; scales them to `max_norm` if it is > 0."""
    norms = []
    for grads in _grad_groups(params):
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for grads in _grad_groups(params):
            for g in grads:
                g.mul_(scale)
    return total


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) per parameter, gathered one at a time from its shards.

    Every rank of the learner world must consume this iterator in lockstep: each gather is a
    collective. Tied weights appear once, under their first name.
    """
    for name, param in model.named_parameters():
        data = param.data
        yield name, data.full_tensor() if isinstance(data, DTensor) else data


def local_shard_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
