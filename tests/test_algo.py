"""Unit tests for the GRPO math in rlsys.algo.

Expected numbers are worked out by hand (shown in comments) rather than by re-deriving them with
the code under test. Everything runs in float64 on CPU in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlsys.algo import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    ROLLOUT_IS_MODES,
    adapt_entropy_coef,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    policy_loss,
    rollout_is_weights,
)

F64 = torch.float64


def t(data) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


def close(actual, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
        atol=atol, rtol=0.0,
    )


# --------------------------------------------------------------------------- advantages


def test_group_advantages_normalized_by_hand():
    # Group 1 [1,0,0,1]: mean .5, unbiased var = 4*.25/3 = 1/3, std = .5773503 -> ±.8660254.
    # Group 2 is constant -> 0.
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    close(adv, [0.8660254037844386, -0.8660254037844386, -0.8660254037844386,
                0.8660254037844386, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_group_of_two_and_eps():
    # [0,3]: mean 1.5, unbiased std = sqrt(2*2.25/1) = 2.1213203; ±1.5/2.1213203 = ±.7071068.
    # [5,1]: mean 3, std = sqrt(8) = 2.8284271; ±2/2.8284271 = ±.7071068.
    adv = group_advantages(t([0.0, 3.0, 5.0, 1.0]), group_size=2, eps=0.0)
    close(adv, [-0.7071067811865476, 0.7071067811865476,
                0.7071067811865476, -0.7071067811865476])
    # eps=1: [0,3] -> ±1.5/3.1213203 = ±.4805659.
    adv = group_advantages(t([0.0, 3.0]), group_size=2, eps=1.0)
    close(adv, [-0.48056586152556113, 0.48056586152556113])


def test_group_advantages_dr_grpo_no_std():
    # [1,0,0,1] - .5 and [3,1,2] - 2.
    close(group_advantages(t([1.0, 0.0, 0.0, 1.0]), 4, normalize_std=False),
          [0.5, -0.5, -0.5, 0.5])
    close(group_advantages(t([3.0, 1.0, 2.0]), 3, normalize_std=False), [1.0, -1.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_all_equal_groups_are_exactly_zero(dtype, normalize_std):
    # 0.1 and 0.7 are not exact in binary, so a float mean may be off by an ulp; with eps=1e-6
    # that ulp would become a large advantage if not zeroed explicitly.
    rewards = torch.tensor([0.1] * 7 + [0.7] * 7 + [1.0, 0.0] * 3 + [1.0], dtype=dtype)
    adv = group_advantages(rewards, group_size=7, normalize_std=normalize_std)
    assert torch.isfinite(adv).all()
    assert (adv[:14] == 0).all()
    assert (adv[14:] != 0).all()


def test_group_advantages_integer_rewards_become_float():
    adv = group_advantages(torch.tensor([1, 0, 1, 1]), 2, normalize_std=False)
    assert adv.is_floating_point()
    close(adv, [0.5, -0.5, 0.0, 0.0])


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="not divisible by group_size"):
        group_advantages(t([1.0, 2.0, 3.0]), group_size=2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(t([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(t([[1.0, 2.0]]), group_size=2)


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logprobs = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -1.0, -0.5])
    # log_ratio = ref - logprobs = [-0.5, 1.0, 0.0]
    close(kl_penalty(logprobs, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_penalty(logprobs, ref, "k2"), [0.125, 0.5, 0.0])
    # k3: e^-0.5 + 0.5 - 1 = 0.10653066; e - 2 = 0.71828183; 0.
    close(kl_penalty(logprobs, ref, "k3"), [0.10653065971263342, 0.7182818284590451, 0.0])
    close(kl_penalty(logprobs, ref), kl_penalty(logprobs, ref, "k3"))


def test_k3_nonnegative_and_clamped():
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(1000, generator=gen, dtype=F64) * 5
    ref = torch.randn(1000, generator=gen, dtype=F64) * 5
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    # log_ratio 100 is clamped to 20: e^20 - 20 - 1 = 485165195.4097903 - 21.
    out = kl_penalty(t([0.0, 0.0]), t([100.0, -100.0]), "k3")
    assert torch.isfinite(out).all()
    close(out, [485165174.4097903, 19.0 + math.exp(-20.0)], atol=1e-6)


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(t([0.0]), t([0.0]), "k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


# --------------------------------------------------------------------------- aggregation

VALUES = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_masked_mean():
    close(masked_mean(VALUES, MASK), 17.0 / 5.0)  # (1+2+3+5+6)/5
    close(masked_mean(VALUES, MASK, dim=1), [2.0, 5.5])
    empty = torch.zeros_like(MASK)
    close(masked_mean(VALUES, empty), 0.0)
    close(masked_mean(VALUES, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), dim=1), [1.0, 0.0])


# Row sums: 1+2+3 = 6 over 3 tokens, 5+6 = 11 over 2 tokens; 17 over 5 tokens, B=2, T=4.
AGG_BY_HAND = {
    "token-mean": 17.0 / 5.0,  # 3.4
    "seq-mean-token-mean": (6.0 / 3.0 + 11.0 / 2.0) / 2.0,  # 3.75
    "seq-mean-token-sum": 17.0 / 2.0,  # 8.5
    "seq-mean-token-sum-norm": 17.0 / (2.0 * 4.0),  # 2.125
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_modes_by_hand(mode):
    close(aggregate_loss(VALUES, MASK, mode), AGG_BY_HAND[mode])
    close(aggregate_loss(VALUES, MASK.float(), mode), AGG_BY_HAND[mode])


def test_aggregate_explicit_normalisers():
    close(aggregate_loss(VALUES, MASK, "token-mean", num_tokens=10), 1.7)
    close(aggregate_loss(VALUES, MASK, "token-mean", num_tokens=torch.tensor(10.0)), 1.7)
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-mean", num_seqs=4), 7.5 / 4.0)
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-sum", num_seqs=4), 17.0 / 4.0)
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", norm_len=10), 0.85)
    close(aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", num_seqs=4, norm_len=10),
          0.425)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("garbage", [1e6, -1e30, float("inf"), float("nan")])
def test_aggregate_ignores_padding(mode, garbage):
    dirty = VALUES.masked_fill(~MASK, garbage)
    close(aggregate_loss(dirty, MASK, mode), AGG_BY_HAND[mode])


def test_aggregate_empty_rows_and_empty_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    # Row 0 mean (1+2)/2 = 1.5, row 1 empty contributes 0; / B=2.
    close(aggregate_loss(VALUES, mask, "seq-mean-token-mean"), 0.75)
    for mode in LOSS_AGG_MODES:
        out = aggregate_loss(VALUES, torch.zeros_like(mask), mode)
        close(out, 0.0)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate_loss(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        aggregate_loss(VALUES, MASK, num_tokens=0)
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(VALUES, MASK[:, :3])


def _random_batch(seed: int = 0, batch: int = 6, width: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5, 0, 4])[:batch]
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = -torch.rand(batch, width, generator=gen, dtype=F64) * 3
    logprobs = old + torch.randn(batch, width, generator=gen, dtype=F64) * 0.3
    ref = old + torch.randn(batch, width, generator=gen, dtype=F64) * 0.3
    adv = torch.randn(batch, generator=gen, dtype=F64)
    ent = torch.rand(batch, width, generator=gen, dtype=F64)
    return logprobs, old, ref, adv, ent, mask


def _split(tensors, rows: slice):
    """Rows of a micro-batch, trimmed to that micro-batch's own longest response."""
    mask = tensors[-1][rows]
    width = max(int(mask.sum(1).max()), 1)
    return [x[rows] if x.dim() == 1 else x[rows, :width] for x in tensors]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batch_sum_is_exact(mode):
    logprobs, old, ref, adv, ent, mask = _random_batch()
    glob = {"num_tokens": int(mask.sum()), "num_seqs": mask.shape[0], "norm_len": 7}
    kwargs = {"kl_coef": 0.05, "entropy_coef": 0.01, "clip_low": 0.2, "clip_high": 0.28,
              "dual_clip": 3.0, "loss_agg": mode, **glob}

    lp_full = logprobs.clone().requires_grad_(True)
    full, _ = grpo_loss(lp_full, old, adv, mask, ref_logprobs=ref, entropies=ent, **kwargs)
    full.backward()

    lp_parts = logprobs.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for rows in (slice(0, 2), slice(2, 6)):
        lp, o, r, a, e, m = _split([lp_parts, old, ref, adv, ent, mask], rows)
        part, _ = grpo_loss(lp, o, a, m, ref_logprobs=r, entropies=e, **kwargs)
        part.backward()
        total = total + part.detach()

    close(total, full.detach(), atol=1e-12)
    close(lp_parts.grad, lp_full.grad, atol=1e-12)
    close(aggregate_loss(ent[:2], mask[:2], mode, **glob)
          + aggregate_loss(ent[2:], mask[2:], mode, **glob),
          aggregate_loss(ent, mask, mode, **glob), atol=1e-12)


# --------------------------------------------------------------------------- policy loss

# Ratios r per token; row 0 has A=+1, row 1 has A=-1; clip range [0.8, 1.2].
RATIOS = [1.0, 1.5, 0.5, 1.1]
OLD = t([[-1.0, -2.0, -3.0, -0.5], [-1.0, -2.0, -3.0, -0.5]])


def _logprobs(ratios, old=OLD):
    return (old + torch.log(t(ratios))).requires_grad_(True)


def test_policy_loss_by_hand_and_gradients():
    logprobs = _logprobs([RATIOS, RATIOS])
    adv = t([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, metrics = policy_loss(logprobs, OLD, adv, mask)
    # A=+1: -min(r, clip r) = [-1, -1.2 (clipped), -0.5, -1.1]
    # A=-1:  max(r, clip r) = [ 1,  1.5, 0.8 (clipped), 1.1]
    # token-mean = (-3.8 + 4.4) / 8 = 0.075
    close(loss, 0.075)
    close(metrics["clip_frac"], 0.25)
    close(metrics["ratio_mean"], 1.025)  # 2 * 4.1 / 8
    close(metrics["ratio_max"], 1.5)
    assert "dual_clip_frac" not in metrics
    assert all(isinstance(v, float) for v in metrics.values())

    loss.backward()
    # d/dlogp of -A*r/8 is -A*r/8; clipped tokens have zero gradient.
    close(logprobs.grad, [[-0.125, 0.0, -0.0625, -0.1375], [0.125, 0.1875, 0.0, 0.1375]])


def test_policy_loss_gradient_only_through_logprobs():
    logprobs, old, ref, adv, ent, mask = _random_batch()
    logprobs = logprobs.masked_fill(~mask, 1e4).requires_grad_(True)  # garbage padding
    for x in (old, ref, adv, ent):
        assert not x.requires_grad
    loss, _ = grpo_loss(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                        entropies=ent, entropy_coef=0.01)
    loss.backward()
    assert logprobs.grad is not None
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~mask] == 0).all()
    assert (logprobs.grad[mask] != 0).any()


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_undetached_inputs_get_no_gradient(dual_clip):
    """A caller that forgets to detach pi_old, A or pi_ref leaks no gradient into them."""
    logprobs, old, ref, adv, _, mask = _random_batch()
    lp_detached = logprobs.clone().requires_grad_(True)
    expected, _ = grpo_loss(lp_detached, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                            dual_clip=dual_clip)
    expected.backward()

    lp = logprobs.clone().requires_grad_(True)
    old_g, ref_g, adv_g = (x.clone().requires_grad_(True) for x in (old, ref, adv))
    loss, _ = grpo_loss(lp, old_g, adv_g, mask, ref_logprobs=ref_g, kl_coef=0.1,
                        dual_clip=dual_clip)
    loss.backward()
    close(loss, expected, atol=0.0)
    close(lp.grad, lp_detached.grad, atol=0.0)
    for x in (old_g, ref_g, adv_g):
        assert x.grad is None


def test_policy_loss_padding_does_not_change_results():
    adv = t([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    clean_lp = _logprobs([RATIOS, RATIOS])
    dirty_lp = clean_lp.detach().masked_fill(~mask, 5e3).requires_grad_(True)
    dirty_old = OLD.masked_fill(~mask, -7e3)
    clean, m_clean = policy_loss(clean_lp, OLD, adv, mask)
    dirty, m_dirty = policy_loss(dirty_lp, dirty_old, adv, mask)
    # Valid tokens: [-1, -1.2, -0.5] and [1, 1.5] -> -0.2 / 5 = -0.04
    close(clean, -0.04)
    close(dirty, -0.04)
    assert m_clean == m_dirty
    close(m_dirty["ratio_max"], 1.5)
    close(m_dirty["clip_frac"], 0.2)
    clean.backward()
    dirty.backward()
    close(dirty_lp.grad, clean_lp.grad)


def test_per_token_advantages_equal_broadcast():
    logprobs = _logprobs([RATIOS, RATIOS])
    mask = torch.ones(2, 4)
    per_seq, _ = policy_loss(logprobs, OLD, t([1.0, -1.0]), mask)
    per_tok, _ = policy_loss(logprobs, OLD, t([[1.0] * 4, [-1.0] * 4]), mask)
    close(per_tok, per_seq)


def test_clip_higher_asymmetry():
    one = torch.ones(1, 1, dtype=torch.bool)
    old = t([[0.0]])
    # A=+1, r=1.25: symmetric 0.2 clips to 1.2 -> -1.2; clip_high 0.28 leaves it -1.25.
    sym, m_sym = policy_loss(_logprobs([[1.25]], old), old, t([1.0]), one)
    high, m_high = policy_loss(_logprobs([[1.25]], old), old, t([1.0]), one, clip_high=0.28)
    close(sym, -1.2)
    close(high, -1.25)
    assert (m_sym["clip_frac"], m_high["clip_frac"]) == (1.0, 0.0)
    # A=-1, r=0.75: lower bound 1 - clip_low = 0.8 applies whatever clip_high is -> 0.8.
    low, _ = policy_loss(_logprobs([[0.75]], old), old, t([-1.0]), one, clip_high=0.28)
    close(low, 0.8)
    low, _ = policy_loss(_logprobs([[0.75]], old), old, t([-1.0]), one, clip_low=0.3)
    close(low, 0.75)


def test_dual_clip():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    adv = t([[-1.0, -1.0, 1.0, -2.0]])
    mask = torch.ones(1, 4)
    ratios = [[5.0, 2.0, 5.0, 4.0]]
    # Standard: max(5, 1.2)=5, max(2, 1.2)=2, -min(5, 1.2)=-1.2, max(8, 2.4)=8.
    plain, _ = policy_loss(_logprobs(ratios, old), old, adv, mask)
    close(plain, (5.0 + 2.0 - 1.2 + 8.0) / 4.0)
    # Dual clip c=3 caps A<0 tokens at -c*A: 5 -> 3, 2 stays, -1.2 stays, 8 -> 6.
    logprobs = _logprobs(ratios, old)
    dual, metrics = policy_loss(logprobs, old, adv, mask, dual_clip=3.0)
    close(dual, (3.0 + 2.0 - 1.2 + 6.0) / 4.0)
    close(metrics["dual_clip_frac"], 0.5)
    dual.backward()
    # Gradient -A*r/4 only at the unclipped token 1 (r=2, A=-1): 0.5.
    close(logprobs.grad, [[0.0, 0.5, 0.0, 0.0]])


def test_policy_loss_errors():
    lp, old, mask = t([[0.0, 0.0]]), t([[0.0, 0.0]]), torch.ones(1, 2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(lp, old, t([1.0]), mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, old, t([1.0, 2.0, 3.0]), mask)
    with pytest.raises(ValueError, match="old_logprobs shape"):
        policy_loss(lp, t([[0.0]]), t([1.0]), mask)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(lp, old, t([1.0]), mask, clip_low=1.0)
    with pytest.raises(ValueError, match="allowed modes"):
        policy_loss(lp, old, t([1.0]), mask, loss_agg="mean")


# --------------------------------------------------------------------------- entropy


def test_entropy_from_logits():
    # Uniform over 4: ln 4. p = [.5,.25,.25]: 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln2.
    logits = t([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    close(entropy_from_logits(logits), [1.3862943611198906, 1.0397207708399179])
    # Shift-invariant and overflow-free at large magnitudes.
    close(entropy_from_logits(logits + 1e4), [1.3862943611198906, 1.0397207708399179])
    # A one-hot distribution given by -inf logits: H=0, and the gradient stays finite.
    peaked = t([[3.0, -math.inf, -math.inf]]).requires_grad_(True)
    h = entropy_from_logits(peaked)
    close(h, [0.0])
    h.sum().backward()
    assert torch.isfinite(peaked.grad).all()
    assert entropy_from_logits(torch.zeros(2, 3, 5)).shape == (2, 3)


# --------------------------------------------------------------------------- full GRPO loss


def test_grpo_loss_by_hand():
    logprobs = t([[-1.0, -2.0]]).requires_grad_(True)
    old = t([[-1.0, -2.0]])
    ref = t([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    # r = 1 everywhere, A = 1 -> pg = -1. k3 = [0.10653066, 0.71828183], mean 0.41240624.
    # loss = -1 + 0.1 * 0.41240624 - 0.01 * mean([0.5, 1.5]) = -0.96875938.
    loss, m = grpo_loss(logprobs, old, t([1.0]), mask, ref_logprobs=ref, kl_coef=0.1,
                        entropies=t([[0.5, 1.5]]), entropy_coef=0.01)
    close(loss, -0.9687593755914161)
    close(m["loss"], -0.9687593755914161)
    close(m["pg_loss"], -1.0)
    close(m["kl"], 0.41240624408583926)
    close(m["entropy"], 1.0)
    assert {"clip_frac", "ratio_mean", "ratio_max"} <= m.keys()
    loss.backward()
    # d/dlogp: pg -r*A/2 = -0.5; k3 grad is (1 - e^{log_ratio}) / 2 * 0.1:
    # token 0: 0.1 * (1 - e^-0.5)/2 = 0.01967347; token 1: 0.1 * (1 - e)/2 = -0.08591409.
    close(logprobs.grad, [[-0.5 + 0.019673467014368326, -0.5 - 0.08591409142295227]])


def test_grpo_loss_kl_reported_without_grad_when_coef_zero():
    logprobs = t([[-1.0, -2.0]]).requires_grad_(True)
    old = t([[-1.0, -2.0]])
    loss, m = grpo_loss(logprobs, old, t([1.0]), torch.ones(1, 2), ref_logprobs=t([[-1.5, -1.0]]))
    close(m["kl"], 0.41240624408583926)
    close(loss, -1.0)
    assert "entropy" not in m


def test_grpo_loss_errors():
    lp = t([[0.0]])
    with pytest.raises(ValueError, match="requires ref_logprobs"):
        grpo_loss(lp, lp, t([1.0]), torch.ones(1, 1), kl_coef=0.1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo_loss(lp, lp, t([1.0]), torch.ones(1, 1), ref_logprobs=lp, kl_estimator="kl")
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        grpo_loss(lp, lp, t([1.0]), torch.ones(1, 1), ref_logprobs=t([[0.0, 0.0]]))


def test_aggregate_low_precision_values_reduce_in_fp32():
    # bf16 cannot represent 1001 (it rounds to 1000), so a bf16 sum of 1001 ones would be wrong.
    values = torch.ones(1, 1001, dtype=torch.bfloat16)
    mask = torch.ones(1, 1001, dtype=torch.bool)
    out = aggregate_loss(values, mask, "seq-mean-token-sum")
    assert out.dtype == torch.float32
    assert out.item() == 1001.0


# --------------------------------------------------------------------------- rollout IS (TIS)

# log(pi_old / pi_rollout) per token: row 0 [ln 3, 0, ln .5], row 1 [ln 1.5, ln 1.2, padding].
IS_OLD = t([[-1.0, -2.0, -3.0], [-0.5, -1.0, 9e9]])
IS_ROLLOUT = IS_OLD - t([[math.log(3.0), 0.0, math.log(0.5)],
                         [math.log(1.5), math.log(1.2), float("nan")]])
IS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)


def test_rollout_is_token_weights_by_hand():
    w, m = rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "token", cap=2.0)
    # min(3, 2)=2, 1, .5 | 1.5, 1.2, padding -> 1 (whatever garbage it holds).
    close(w, [[2.0, 1.0, 0.5], [1.5, 1.2, 1.0]])
    close(m["rollout_is/mean"], (2.0 + 1.0 + 0.5 + 1.5 + 1.2) / 5)
    close(m["rollout_is/clipped_frac"], 1 / 5)
    assert not w.requires_grad
    # A larger cap leaves the 3 alone.
    w, m = rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "token", cap=5.0)
    close(w[0, 0], 3.0)
    assert m["rollout_is/clipped_frac"] == 0.0


def test_rollout_is_sequence_weights_by_hand():
    w, m = rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "sequence", cap=2.0)
    # Row 0: 3 * 1 * .5 = 1.5 on every token; row 1: 1.5 * 1.2 = 1.8 (padding excluded).
    close(w, [[1.5, 1.5, 1.5], [1.8, 1.8, 1.0]])
    close(m["rollout_is/mean"], (3 * 1.5 + 2 * 1.8) / 5)
    assert m["rollout_is/clipped_frac"] == 0.0
    # Cap 1.6: row 1's product 1.8 is truncated, on both of its tokens.
    w, m = rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "sequence", cap=1.6)
    close(w, [[1.5, 1.5, 1.5], [1.6, 1.6, 1.0]])
    close(m["rollout_is/clipped_frac"], 2 / 5)


def test_rollout_is_long_sequence_does_not_overflow():
    # 4000 tokens of log-ratio 0.5: exp(2000) is inf in float64; the weight is the cap.
    old = torch.zeros(1, 4000, dtype=F64)
    w, m = rollout_is_weights(old, old - 0.5, torch.ones(1, 4000), "sequence", cap=2.0)
    assert torch.isfinite(w).all()
    close(w, torch.full((1, 4000), 2.0, dtype=F64))
    assert m["rollout_is/clipped_frac"] == 1.0
    # And a hugely negative sum gives ~0, not NaN.
    w, _ = rollout_is_weights(old, old + 0.5, torch.ones(1, 4000), "sequence", cap=2.0)
    assert torch.isfinite(w).all() and (w >= 0).all() and w.max() < 1e-300


def test_rollout_is_none_is_all_ones():
    w, m = rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "none", cap=2.0)
    close(w, torch.ones(2, 3, dtype=F64))
    assert m == {"rollout_is/mean": 1.0, "rollout_is/clipped_frac": 0.0}
    assert set(ROLLOUT_IS_MODES) == {"none", "token", "sequence"}


def test_rollout_is_errors():
    with pytest.raises(ValueError, match="allowed values: none, token, sequence"):
        rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "seq")
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_is_weights(IS_OLD, IS_ROLLOUT, IS_MASK, "token", cap=1.0)
    with pytest.raises(ValueError, match="rollout_logprobs shape"):
        rollout_is_weights(IS_OLD, IS_ROLLOUT[:, :2], IS_MASK)
    lp, mask = _logprobs([RATIOS, RATIOS]), torch.ones(2, 4)
    with pytest.raises(ValueError, match="is_weights must be"):
        policy_loss(lp, OLD, t([1.0, -1.0]), mask, is_weights=t([1.0, 1.0, 1.0]))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_unit_is_weights_leave_the_loss_unchanged(mode):
    logprobs, old, ref, adv, ent, mask = _random_batch(seed=3)
    results = []
    for weights in (None, torch.ones_like(old)):
        lp = logprobs.clone().requires_grad_(True)
        loss, m = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropies=ent,
                            entropy_coef=0.01, loss_agg=mode, dual_clip=3.0, is_weights=weights)
        loss.backward()
        results.append((loss.detach(), lp.grad, m))
    close(results[0][0], results[1][0], atol=0.0)
    close(results[0][1], results[1][1], atol=0.0)
    assert results[0][2] == results[1][2]


def test_is_weights_scale_the_policy_gradient_term_only():
    adv = t([1.0, -1.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    # Per token: pg = [-1, -1.2, -0.5, -1.1 | 1, 1.5, 0.8, 1.1] (test_policy_loss_by_hand...).
    weights = t([[2.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 3.0]])
    lp = _logprobs([RATIOS, RATIOS])
    loss, m = policy_loss(lp, OLD, adv, mask, is_weights=weights.requires_grad_(True))
    # (-2 - 1.2 - 0.25 - 0 + 1 + 1.5 + 0.8 + 3.3) / 8 = 3.15 / 8
    close(loss, 3.15 / 8)
    close(m["ratio_mean"], 1.025)  # metrics are those of the unweighted ratios
    loss.backward()
    assert weights.grad is None  # detached
    # The unweighted gradient [[-.125, 0, -.0625, -.1375], [.125, .1875, 0, .1375]] times w.
    close(lp.grad, [[-0.25, 0.0, -0.03125, 0.0], [0.125, 0.1875, 0.0, 0.4125]])

    # A constant weight c scales the whole policy-gradient loss and its gradient by c, and
    # per-sequence [B] weights broadcast over the tokens; the KL term is not weighted.
    ref = OLD - 0.3
    base = _logprobs([RATIOS, RATIOS])
    _, m_plain = grpo_loss(base, OLD, adv, mask, ref_logprobs=ref, kl_coef=0.5)
    scaled_lp = _logprobs([RATIOS, RATIOS])
    scaled, m_scaled = grpo_loss(scaled_lp, OLD, adv, mask, ref_logprobs=ref, kl_coef=0.5,
                                 is_weights=t([1.7, 1.7]))
    close(m_scaled["pg_loss"], 1.7 * m_plain["pg_loss"])
    close(m_scaled["kl"], m_plain["kl"])
    close(scaled, 1.7 * m_plain["pg_loss"] + 0.5 * m_plain["kl"])
    pg_only_lp = _logprobs([RATIOS, RATIOS])
    pg, _ = policy_loss(pg_only_lp, OLD, adv, mask)
    pg.backward()
    kl_only_lp = _logprobs([RATIOS, RATIOS])
    (0.5 * aggregate_loss(kl_penalty(kl_only_lp, ref), mask)).backward()
    scaled.backward()
    close(scaled_lp.grad, 1.7 * pg_only_lp.grad + kl_only_lp.grad)


def test_is_weights_padding_garbage_is_ignored():
    adv = t([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weights = t([[2.0, 1.0, 0.5, float("nan")], [1.0, 3.0, float("inf"), 1e30]])
    lp = _logprobs([RATIOS, RATIOS])
    loss, _ = policy_loss(lp, OLD, adv, mask, is_weights=weights)
    # Valid tokens: 2*-1, -1.2, .5*-.5 | 1, 3*1.5 -> 2.05 / 5
    close(loss, 2.05 / 5)
    loss.backward()
    assert torch.isfinite(lp.grad).all()


# --------------------------------------------------------------------------- KL in the reward


def test_kl_shaped_rewards_by_hand():
    rewards = t([1.0, 0.0, 0.5])
    logprobs = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 7e7], [-0.2, -0.2, -0.2]])
    ref = t([[-1.5, -1.0, -0.5], [-2.0, -1.0, float("nan")], [-0.2, -0.2, -0.2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # k1 = logp - ref: row 0 [0.5, -1, 0] -> -0.5; row 1 [1, 0] (padding out) -> 1; row 2 -> 0.
    shaped, penalty = kl_shaped_rewards(rewards, logprobs, ref, mask, kl_coef=0.1)
    close(penalty, [-0.05, 0.1, 0.0])
    close(shaped, [1.05, -0.1, 0.5])
    # k3 = e^x - x - 1 with x = ref - logp: row 0 [e^-.5 - .5, e - 2, 0]; row 1 [e^-1, 0].
    _, penalty = kl_shaped_rewards(rewards, logprobs, ref, mask, kl_coef=0.1, estimator="k3")
    close(penalty, [0.1 * (math.exp(-0.5) - 0.5 + math.e - 2.0), 0.1 * math.exp(-1.0), 0.0])
    # kl_coef 0 leaves the rewards as they are.
    shaped, penalty = kl_shaped_rewards(rewards, logprobs, ref, mask, kl_coef=0.0)
    close(shaped, rewards)
    close(penalty, [0.0, 0.0, 0.0])


def test_kl_shaped_rewards_feed_the_group_advantages():
    # Equal task rewards carry no signal; the KL penalty breaks the tie in favour of the
    # completion closer to the reference (its sequence log-ratio is 0 vs 2).
    rewards = t([1.0, 1.0])
    logprobs = t([[-1.0, -1.0], [-0.0, -0.0]])
    ref = t([[-1.0, -1.0], [-1.0, -1.0]])
    shaped, penalty = kl_shaped_rewards(rewards, logprobs, ref, torch.ones(2, 2), kl_coef=0.5)
    close(penalty, [0.0, 1.0])
    close(shaped, [1.0, 0.0])
    adv = group_advantages(shaped, group_size=2, eps=0.0)
    close(adv, [0.7071067811865476, -0.7071067811865476])


def test_kl_shaped_rewards_errors():
    lp = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        kl_shaped_rewards(t([1.0]), lp, lp, torch.ones(1, 2), kl_coef=-0.1)
    with pytest.raises(ValueError, match="rewards must be"):
        kl_shaped_rewards(t([1.0, 2.0]), lp, lp, torch.ones(1, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        kl_shaped_rewards(t([1.0]), lp, t([[0.0]]), torch.ones(1, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_shaped_rewards(t([1.0]), lp, lp, torch.ones(1, 2), kl_coef=0.1, estimator="kl")


def test_adaptive_entropy_coef_moves_towards_the_target_within_bounds():
    step = dict(target=0.2, step=0.005, ceiling=0.012)
    assert adapt_entropy_coef(0.0, 0.05, **step) == pytest.approx(0.005)  # below: more bonus
    assert adapt_entropy_coef(0.01, 0.05, **step) == pytest.approx(0.012)  # capped
    assert adapt_entropy_coef(0.01, 0.5, **step) == pytest.approx(0.005)  # above: less
    assert adapt_entropy_coef(0.002, 0.5, **step) == 0.0  # never negative
    assert adapt_entropy_coef(0.004, 0.2, **step) == 0.004  # on target: unchanged
