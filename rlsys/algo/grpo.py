"""GRPO math as pure tensor functions.

Everything here is stateless and device-agnostic: the same functions run on CPU in the unit tests
and on GPU inside the learners. Shapes follow one convention: ``[B, T]`` for per-token tensors
(B sequences, T padded response positions) with a 0/1 ``mask`` marking real response tokens, and
``[B]`` for per-sequence tensors.

References: DeepSeekMath (Shao et al., 2024) for GRPO, DeepSeek-R1 (2025) for the objective as
used there, DAPO (Yu et al., 2025) for clip-higher and token-level aggregation, Dr. GRPO
(Liu et al., 2025) for the unnormalised advantage and the constant length normaliser, Yao et
al. (2025, "Your efficient RL framework secretly brings you off-policy RL training") for
truncated importance sampling against the rollout engine's mismatch, and Ouyang et al. (2022,
InstructGPT) / Ziegler et al. (2019) for the KL penalty folded into the reward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
ROLLOUT_IS_MODES: tuple[str, ...] = ("none", "token", "sequence")

# exp(20) ~ 4.9e8 is finite in fp32 and bf16 and far beyond any KL value a healthy run
# produces; without a clamp a single garbage position (e.g. padding, or a token the reference
# model finds impossible) turns exp() into inf, and inf * 0 (masking) into NaN in forward or
# backward.
_LOG_RATIO_CLAMP = 20.0

Normaliser = int | float | Tensor


def group_advantages(
    rewards: Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages for GRPO.

    ``rewards`` is ``[num_prompts * group_size]`` and prompt-major: the G completions of prompt
    i occupy positions ``i*G .. i*G + G - 1``. For completion j of group g::

        A_gj = (r_gj - mean_g(r)) / (std_g(r) + eps)     if normalize_std   (GRPO)
        A_gj =  r_gj - mean_g(r)                         otherwise          (Dr. GRPO)

    where ``std_g`` is the unbiased (Bessel-corrected) standard deviation, as ``torch.std``.
    A group whose rewards are all equal carries no learning signal and gets exactly 0.

    Returns a floating tensor with the shape of ``rewards``.
    """
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 for group-relative advantages, got {group_size}"
        )
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}"
        )
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not divisible by "
            f"group_size ({group_size})"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())

    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    # The float mean of equal values can differ from them by an ulp, and that ulp divided by
    # eps would be a spurious large advantage, so equal groups are zeroed explicitly.
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    centered = centered.masked_fill(all_equal, 0.0)
    return centered.reshape(rewards.shape)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate from log-probs; ``ref_logprobs`` is detached.

    With ``log_ratio = ref_logprobs - logprobs`` (= log pi_ref/pi_theta)::

        k1 = -log_ratio                           (unbiased, can be negative)
        k2 = 0.5 * log_ratio ** 2                 (biased, low variance)
        k3 = exp(log_ratio) - log_ratio - 1       (unbiased, always >= 0)

    k3 is the estimator of DeepSeekMath / DeepSeek-R1:
    ``pi_ref/pi_theta - log(pi_ref/pi_theta) - 1``. ``log_ratio`` is clamped to [-20, 20] first
    so that padding garbage or a near-impossible reference token cannot overflow ``exp`` into
    inf (and then NaN once masked); the clamp also zeroes the gradient of such outliers.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; allowed values: {', '.join(KL_ESTIMATORS)}"
        )
    log_ratio = (ref_logprobs.detach() - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_shaped_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """KL penalty folded into the reward (as in PPO-RLHF / InstructGPT) instead of the loss.

    For completion i with response tokens t (``mask``) and ``kl_it = kl_penalty(logprobs,
    ref_logprobs, estimator)_it``::

        penalty_i = kl_coef * sum_t mask_it * kl_it
        r'_i      = r_i - penalty_i

    The shaped rewards then go through ``group_advantages`` like any reward, so within a group
    the completions that drifted further from the reference get lower advantages, and the loss
    carries no KL term. With the default ``k1`` the sum is ``log pi(o_i | q) - log pi_ref(o_i |
    q)``, the sampled completion's log-ratio: an unbiased estimate of the sequence-level
    KL(pi || pi_ref), the per-token ``kl`` penalty of PPO-RLHF. It is a sum, not a mean, over
    tokens, so it is the KL of the whole completion. ``logprobs`` are those of the sampling
    policy. ``rewards`` is ``[B]``, the rest ``[B, T]``; returns ``(r', penalty)``, both ``[B]``
    and without gradient.
    """
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [B, T], got shape {tuple(logprobs.shape)}")
    _check_token_shapes(logprobs, ref_logprobs, "ref_logprobs")
    if rewards.shape != logprobs.shape[:1]:
        raise ValueError(
            f"rewards must be [B] = [{logprobs.shape[0]}], got shape {tuple(rewards.shape)}"
        )
    with torch.no_grad():
        kl, _ = _masked_values(kl_penalty(logprobs, ref_logprobs, estimator), mask)
        dtype = torch.promote_types(rewards.dtype, kl.dtype)
        penalty = kl_coef * kl.sum(dim=1).to(dtype)
        return rewards.to(dtype) - penalty, penalty


def _masked_values(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return (values with masked-out entries zeroed and weighted by mask, mask as float)."""
    if values.shape != mask.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} and mask shape {tuple(mask.shape)} differ"
        )
    # Sums over many tokens (and token counts above 256) are inexact in bf16/fp16, so reduce
    # in at least fp32; [B, T] tensors are small enough that the copy is cheap.
    dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(dtype)
    fmask = mask.to(dtype)
    # where() rather than a bare multiply: padding may hold inf, and inf * 0 is NaN.
    safe = torch.where(fmask != 0, values, torch.zeros_like(values))
    return safe * fmask, fmask


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1.

    ``sum(values * mask, dim) / max(sum(mask, dim), 1)``: an all-zero mask (or an empty row
    along ``dim``) gives 0 instead of NaN, and masked-out entries never leak in, even if inf.
    """
    weighted, fmask = _masked_values(values, mask)
    if dim is None:
        return weighted.sum() / fmask.sum().clamp(min=1.0)
    return weighted.sum(dim=dim) / fmask.sum(dim=dim).clamp(min=1.0)


def _check_normaliser(name: str, value: Normaliser | None) -> None:
    # Tensors are not inspected: reading them would force a device sync in the training loop.
    if value is not None and not isinstance(value, Tensor) and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: Normaliser | None = None,
    num_seqs: Normaliser | None = None,
    norm_len: Normaliser | None = None,
) -> Tensor:
    """Reduce per-token ``values`` ``[B, T]`` under a 0/1 ``mask`` ``[B, T]`` to a scalar.

    With ``s_i = sum_t values[i, t] * mask[i, t]`` and ``n_i = sum_t mask[i, t]``::

        "token-mean"               sum_i s_i / num_tokens            num_tokens default sum_i n_i
        "seq-mean-token-mean"      sum_i (s_i / n_i) / num_seqs      num_seqs default B; n_i=0 -> 0
        "seq-mean-token-sum"       sum_i s_i / num_seqs
        "seq-mean-token-sum-norm"  sum_i s_i / (num_seqs * norm_len) norm_len default T (Dr. GRPO)

    Every mode is a sum over sequences divided by normalisers that may be passed in, so a
    batch split into micro-batches (or across data-parallel ranks) reproduces the full-batch
    loss exactly when each part is called with the *global* ``num_tokens`` / ``num_seqs`` /
    ``norm_len`` and the part results are summed. The defaults are only correct for a whole
    batch; in particular the default ``norm_len`` is the part's own padded width, so pass the
    configured maximum response length when splitting.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"unknown loss aggregation mode {mode!r}; allowed modes: {', '.join(LOSS_AGG_MODES)}"
        )
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [B, T], got shape {tuple(values.shape)}")
    _check_normaliser("num_tokens", num_tokens)
    _check_normaliser("num_seqs", num_seqs)
    _check_normaliser("norm_len", norm_len)

    weighted, fmask = _masked_values(values, mask)
    batch, width = values.shape
    if mode == "token-mean":
        denom = fmask.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return weighted.sum() / denom

    seqs = batch if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        per_seq = weighted.sum(dim=1) / fmask.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum":
        return weighted.sum() / seqs
    length = width if norm_len is None else norm_len
    return weighted.sum() / (seqs * length)


def _per_sequence_or_token(values: Tensor, logprobs: Tensor, name: str) -> Tensor:
    """`values` given per sequence [B] (as a [B, 1] column that broadcasts over tokens) or per
    token [B, T] like `logprobs`; any other shape is an error naming `name`."""
    if values.dim() == 1 and values.shape[0] == logprobs.shape[0]:
        return values.unsqueeze(1)
    if values.shape != logprobs.shape:
        raise ValueError(
            f"{name} must be [B] or [B, T] matching logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(values.shape)}"
        )
    return values


def _check_token_shapes(logprobs: Tensor, other: Tensor, name: str) -> None:
    if other.shape != logprobs.shape:
        raise ValueError(
            f"{name} shape {tuple(other.shape)} does not match logprobs shape "
            f"{tuple(logprobs.shape)}"
        )


def rollout_is_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    mode: str = "token",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance-sampling (TIS) weights for the rollout engine's policy mismatch.

    The engine (vLLM) samples from pi_rollout, which differs from the learner's pre-update
    policy pi_old by numerics (kernels, precision) and, when rollouts are stale, by weights.
    With ``log_rho_t = old_logprobs_t - rollout_logprobs_t`` (= log pi_old / pi_rollout of the
    sampled token) and the cap ``C``::

        "token"     w_t = min(exp(log_rho_t), C)
        "sequence"  w_t = min(exp(sum_s mask_s * log_rho_s), C)   every token of the sequence
        "none"      w_t = 1

    ``w_t`` multiplies the per-token policy-gradient loss (``policy_loss(is_weights=...)``), so
    that the gradient estimated from pi_rollout's samples is that of pi_old; truncating from
    above only bounds its variance (bias for bounded variance, as in the paper and verl). The
    weights are detached, ``[B, T]`` like the inputs, and 1 at padding; they are computed as
    ``exp(min(log_rho, log C))``, so a long sequence's sum cannot overflow.

    Metrics (python floats over masked tokens): ``rollout_is/mean`` (mean weight) and
    ``rollout_is/clipped_frac`` (share of tokens whose weight is at the cap).
    """
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(
            f"unknown rollout_is mode {mode!r}; allowed values: {', '.join(ROLLOUT_IS_MODES)}"
        )
    if not cap > 1.0:
        raise ValueError(f"cap must be > 1, got {cap}")
    if old_logprobs.dim() != 2:
        raise ValueError(
            f"old_logprobs must be 2-D [B, T], got shape {tuple(old_logprobs.shape)}"
        )
    _check_token_shapes(old_logprobs, rollout_logprobs, "rollout_logprobs")
    _check_token_shapes(old_logprobs, mask, "mask")
    with torch.no_grad():
        valid = mask != 0
        dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
        log_rho = torch.where(valid, old_logprobs.to(dtype) - rollout_logprobs.to(dtype),
                              torch.zeros((), dtype=dtype, device=old_logprobs.device))
        if mode == "sequence":
            log_rho = log_rho.sum(dim=1, keepdim=True).expand_as(log_rho)
        elif mode == "none":
            log_rho = torch.zeros_like(log_rho)
        log_cap = math.log(cap)
        at_cap = valid & (log_rho >= log_cap)
        weights = torch.where(at_cap, cap, torch.exp(log_rho.clamp(max=log_cap)))
        weights = torch.where(valid, weights, 1.0)
        metrics = {
            "rollout_is/mean": masked_mean(weights, mask).item(),
            "rollout_is/clipped_frac": masked_mean(at_cap.to(dtype), mask).item(),
        }
    return weights, metrics


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: str = "token-mean",
    is_weights: Tensor | None = None,
    **agg_kwargs: Normaliser | None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate policy-gradient loss (PPO/GRPO), aggregated by ``aggregate_loss``.

    Per token, with ``r = exp(logprobs - old_logprobs)`` and advantage ``A``::

        loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
        loss = min(loss, -dual_clip * A)          for A < 0, when dual_clip = c > 1
        loss = w * loss                           with is_weights w (detached), when given

    ``clip_high > clip_low`` is DAPO's clip-higher. ``advantages`` is per sequence ``[B]``
    (broadcast over T) or per token ``[B, T]``, and so is ``is_weights`` (e.g. the truncated
    importance weights of ``rollout_is_weights``). All inputs but ``logprobs`` are detached.

    Metrics (python floats over masked tokens, no grad): ``clip_frac`` (share of tokens where the
    clipped term is the active minimum), ``ratio_mean``, ``ratio_max``, and ``dual_clip_frac``
    when dual clipping is on.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [B, T], got shape {tuple(logprobs.shape)}")
    _check_token_shapes(logprobs, old_logprobs, "old_logprobs")
    _check_token_shapes(logprobs, mask, "mask")
    advantages = _per_sequence_or_token(advantages, logprobs, "advantages").detach()
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")

    valid = mask != 0
    # Zeroing the log-ratio at padding keeps exp() finite there; otherwise a huge padded value
    # gives inf in forward and 0 * inf = NaN in the backward pass even though it is masked.
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_active, cap.expand_as(per_token), per_token)
    if is_weights is not None:
        is_weights = _per_sequence_or_token(is_weights, logprobs, "is_weights")
        # Padding is replaced by 1 so that garbage there cannot reach the loss as NaN.
        per_token = per_token * torch.where(valid, is_weights.detach().to(per_token.dtype), 1.0)

    loss = aggregate_loss(per_token, mask, loss_agg, **agg_kwargs)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).to(ratio.dtype), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": (
                ratio.masked_fill(~valid, float("-inf")).max().item() if valid.any() else 0.0
            ),
        }
        if dual_clip is not None:
            metrics["dual_clip_frac"] = masked_mean(dual_active.to(ratio.dtype), mask).item()
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim: ``H = -sum_v p_v log p_v``, p = softmax(logits).

    Computed from ``log_softmax`` (logsumexp-shifted), so large logits do not overflow and
    ``-inf`` logits (banned tokens) contribute 0 rather than 0 * -inf = NaN. Returns shape
    ``logits.shape[:-1]``. Runs in the input dtype; upcast bf16 logits first if precision matters.
    """
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    # masked_fill rather than where(p > 0, p * logp, 0): the latter still computes 0 * -inf and
    # its backward would propagate NaN.
    finite_logp = logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -(probs * finite_logp).sum(dim=-1)


def adapt_entropy_coef(coef: float, entropy: float, target: float, step: float,
                       ceiling: float) -> float:
    """Adaptive entropy control (Skywork-OR1): the entropy bonus weight for the next step,

        c_{k+1} = clip(c_k + step * sign(target - H_k), 0, ceiling)

    where H_k is the mean token entropy of step k's batch under the policy being trained. The
    bonus grows while entropy is below the target and shrinks (to 0, no bonus) above it, so
    the policy keeps exploring without a fixed weight that would either be too weak to stop a
    collapse or strong enough to blow the entropy up.
    """
    if entropy < target:
        return min(ceiling, coef + step)
    if entropy > target:
        return max(0.0, coef - step)
    return coef


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropies: Tensor | None = None,
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg: str = "token-mean",
    is_weights: Tensor | None = None,
    **agg_kwargs: Normaliser | None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective of DeepSeekMath / DeepSeek-R1, negated into a loss.

    For a question q with G sampled outputs o_1..o_G from pi_old::

        J_GRPO(theta) = E[ 1/G sum_i 1/|o_i| sum_t (
                min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it)
                - beta * D_KL(pi_theta || pi_ref)_it ) ]
        r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
        D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (the k3 estimator)

    Here::

        loss = policy_loss + kl_coef * agg(kl_penalty) - entropy_coef * agg(entropies)

    where every term uses the same ``loss_agg`` mode and normalisers (``agg_kwargs``), so
    micro-batch sums stay exact. The paper's 1/G 1/|o_i| is ``"seq-mean-token-mean"``.
    ``entropies`` is a per-token ``[B, T]`` entropy (e.g. from ``entropy_from_logits``).
    ``is_weights`` (``[B]`` or ``[B, T]``, detached; e.g. ``rollout_is_weights``) multiplies the
    per-token policy-gradient term only, not the KL or entropy terms::

        policy_loss = agg(w_t * pg_loss_t)

    Metrics: those of ``policy_loss`` plus ``pg_loss``, ``loss``, ``kl`` (when
    ``ref_logprobs`` is given) and ``entropy`` (when ``entropies`` is given).
    """
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 requires ref_logprobs (log-probs of the reference model)")

    pg_loss, metrics = policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        loss_agg=loss_agg,
        is_weights=is_weights,
        **agg_kwargs,
    )
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.item()

    if ref_logprobs is not None:
        _check_token_shapes(logprobs, ref_logprobs, "ref_logprobs")
        # With kl_coef == 0 the KL is only reported, so keep it off the autograd graph.
        with torch.set_grad_enabled(kl_coef > 0.0 and torch.is_grad_enabled()):
            kl = aggregate_loss(
                kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, loss_agg, **agg_kwargs
            )
        metrics["kl"] = kl.item()
        if kl_coef > 0.0:
            loss = loss + kl_coef * kl

    if entropies is not None:
        _check_token_shapes(logprobs, entropies, "entropies")
        with torch.set_grad_enabled(entropy_coef != 0.0 and torch.is_grad_enabled()):
            entropy = aggregate_loss(entropies, mask, loss_agg, **agg_kwargs)
        metrics["entropy"] = entropy.item()
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * entropy

    metrics["loss"] = loss.item()
    return loss, metrics
