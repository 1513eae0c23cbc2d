"""The PPO math of RL-CAI (`constitutional.rl.ppo`) against numbers worked out by hand.

Expected values are written out below (or come from a tiny explicit loop over Python floats that does
not use the implementation); tensors are float64 so that a tolerance of 1e-6 is meaningful.
"""

import math

import pytest
import torch

from constitutional.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)

TOL = 1e-6
HUGE = 1e9


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=TOL, rtol=0)


# Two rows of different lengths: the masked-in entries are 1, 2, 3 (row 0) and 4 (row 1).
MASK = t([[1, 1, 1], [1, 0, 0]])
VALUES = t([[1, 2, 3], [4, 0, 0]])
VALUES_HUGE_PADDING = t([[1, 2, 3], [4, HUGE, -HUGE]])


# --- masked statistics -------------------------------------------------------------------------------


def test_masked_mean_ignores_padding():
    for values in (VALUES, VALUES_HUGE_PADDING):
        close(masked_mean(values, MASK), 2.5)  # (1 + 2 + 3 + 4) / 4
        close(masked_mean(values, MASK, dim=1), [2.0, 4.0])  # (1 + 2 + 3) / 3, 4 / 1


def test_masked_mean_ignores_inf_and_nan_in_padding():
    values = t([[1, 2, 3], [4, math.inf, math.nan]])
    close(masked_mean(values, MASK), 2.5)


def test_masked_var_ignores_padding():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    for values in (VALUES, VALUES_HUGE_PADDING):
        close(masked_var(values, MASK, unbiased=False), 5 / 4)
        close(masked_var(values, MASK, unbiased=True), 5 / 3)


def test_masked_var_needs_entries():
    with pytest.raises(ValueError):
        masked_var(VALUES, torch.zeros_like(MASK))
    with pytest.raises(ValueError):
        masked_var(VALUES, t([[1, 0, 0], [0, 0, 0]]), unbiased=True)


def test_masked_whiten_by_hand():
    scale = math.sqrt(5 / 3 + 1e-8)  # unbiased std of 1, 2, 3, 4 (with the 1e-8 guard)
    expected = [[(1 - 2.5) / scale, (2 - 2.5) / scale, (3 - 2.5) / scale], [(4 - 2.5) / scale, 0, 0]]
    for values in (VALUES, VALUES_HUGE_PADDING):
        whitened = masked_whiten(values, MASK)
        close(whitened, expected)  # padding stays exactly 0
        close(masked_mean(whitened, MASK), 0.0)
        close(masked_var(whitened, MASK), 1.0)
    kept = masked_whiten(VALUES_HUGE_PADDING, MASK, shift_mean=False)
    close(
        kept, [[(1 - 2.5) / scale + 2.5, (2 - 2.5) / scale + 2.5, (3 - 2.5) / scale + 2.5], [1.5 / scale + 2.5, 0, 0]]
    )
    close(masked_mean(kept, MASK), 2.5)
    close(masked_var(kept, MASK), 1.0)


# --- KL estimators -----------------------------------------------------------------------------------

LOGP = t([[-1.0, -2.0, -0.5]])
LOGQ = t([[-2.0, -1.0, -0.5]])  # log p - log q = [1, -1, 0]


def test_kl_k1_is_log_ratio_and_can_be_negative():
    k1 = kl_estimate(LOGP, LOGQ, "k1")
    close(k1, [[1.0, -1.0, 0.0]])
    assert k1[0, 1] < 0
    close(kl_estimate(LOGP, LOGQ), [[1.0, -1.0, 0.0]])  # k1 is the default


def test_kl_k2_is_half_squared_log_ratio():
    k2 = kl_estimate(LOGP, LOGQ, "k2")
    close(k2, [[0.5, 0.5, 0.0]])
    assert (k2 >= 0).all()


def test_kl_k3():
    # k3 = (exp(logq - logp) - 1) - (logq - logp)
    # d = logp - logq = 1:  (e^-1 - 1) + 1 = e^-1 = 0.36787944117144233
    # d = -1:               (e^1 - 1) - 1  = e - 2 = 0.7182818284590451
    # d = 0:                0
    k3 = kl_estimate(LOGP, LOGQ, "k3")
    close(k3, [[0.36787944117144233, 0.7182818284590451, 0.0]])
    assert (k3 >= 0).all()
    close(kl_estimate(LOGQ, LOGQ, "k3"), [[0.0, 0.0, 0.0]])


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(LOGP, LOGQ, "k4")


# --- per-token rewards -------------------------------------------------------------------------------


def test_token_rewards_score_on_last_real_token():
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    logprobs = t([[-1.0, -1.0, -1.0, 5.0], [-2.0, -2.0, 7.0, 7.0]])
    ref_logprobs = t([[-1.5, -0.5, -1.2, 0.0], [-1.0, -2.5, 0.0, 0.0]])
    # k1 on response tokens: row 0: 0.5, -0.5, 0.2; row 1: -1.0, 0.5; padding 0
    scores = t([2.0, -3.0])
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    close(kl, [[0.5, -0.5, 0.2, 0.0], [-1.0, 0.5, 0.0, 0.0]])
    # -0.1 * kl everywhere, the score added at position 2 (row 0) and 1 (row 1):
    # row 0: -0.05, 0.05, -0.02 + 2 = 1.98, 0;  row 1: 0.1, -0.05 - 3 = -3.05, 0, 0
    close(rewards, [[-0.05, 0.05, 1.98, 0.0], [0.1, -3.05, 0.0, 0.0]])


def test_token_rewards_other_estimator_and_leading_padding():
    mask = t([[0, 1, 1, 0]])  # e.g. a prompt token before the response
    logprobs = t([[9.0, -1.0, -1.0, 9.0]])
    ref_logprobs = t([[0.0, -2.0, 0.0, 0.0]])  # log p - log q = 1, -1 on the response
    rewards, kl = token_rewards(t([1.0]), logprobs, ref_logprobs, mask, kl_coef=0.5, kind="k2")
    close(kl, [[0.0, 0.5, 0.5, 0.0]])
    close(rewards, [[0.0, -0.25, -0.25 + 1.0, 0.0]])


def test_token_rewards_needs_a_response_token():
    with pytest.raises(ValueError):
        token_rewards(t([1.0]), t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[0, 0]]), kl_coef=0.1)


# --- GAE ---------------------------------------------------------------------------------------------


def test_gae_one_row_worked_by_hand():
    # gamma = 1, lam = 0.5, rewards [0, 0, 1], values [0.4, 0.2, 0.6], nothing after the last token:
    # t=2: delta = 1 + 1*0   - 0.6 = 0.4;   A2 = 0.4
    # t=1: delta = 0 + 1*0.6 - 0.2 = 0.4;   A1 = 0.4 + 1*0.5*0.4 = 0.6
    # t=0: delta = 0 + 1*0.2 - 0.4 = -0.2;  A0 = -0.2 + 1*0.5*0.6 = 0.1
    # returns = A + V = [0.5, 0.8, 1.0]
    advantages, returns = gae_advantages(t([[0, 0, 1]]), t([[0.4, 0.2, 0.6]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    close(advantages, [[0.1, 0.6, 0.4]])
    close(returns, [[0.5, 0.8, 1.0]])


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE over one unpadded episode, with plain floats."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for step in reversed(range(len(rewards))):
        next_value = values[step + 1] if step + 1 < len(rewards) else 0.0
        delta = rewards[step] + gamma * next_value - values[step]
        running = delta + gamma * lam * running
        advantages[step] = running
    return advantages


def test_gae_two_rows_of_different_lengths():
    gamma, lam = 0.9, 0.8
    row0_r, row0_v = [0.1, -0.2, 0.3, 1.5], [0.5, 0.4, -0.3, 0.8]
    row1_r, row1_v = [0.2, 2.0], [0.1, 0.7]
    adv0, adv1 = reference_gae(row0_r, row0_v, gamma, lam), reference_gae(row1_r, row1_v, gamma, lam)
    # The loop's numbers for row 1, by hand: t=1: 2.0 - 0.7 = 1.3; t=0: 0.2 + 0.9*0.7 - 0.1 + 0.72*1.3 = 1.666
    assert adv1 == pytest.approx([1.666, 1.3], abs=TOL)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    for pad in (0.0, HUGE):
        rewards = t([row0_r, row1_r + [pad, pad]])
        values = t([row0_v, row1_v + [pad, -pad]])
        advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
        close(advantages, [adv0, adv1 + [0.0, 0.0]])
        close(returns, [[a + v for a, v in zip(adv0, row0_v)], [a + v for a, v in zip(adv1, row1_v)] + [0.0, 0.0]])


def test_gae_leading_padding_stays_zero():
    # The 1x3 example above behind two masked-out (prompt) positions holding large numbers.
    mask = t([[0, 0, 1, 1, 1]])
    rewards = t([[HUGE, 5.0, 0, 0, 1]])
    values = t([[-HUGE, 3.0, 0.4, 0.2, 0.6]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[0.0, 0.0, 0.1, 0.6, 0.4]])
    close(returns, [[0.0, 0.0, 0.5, 0.8, 1.0]])


def test_gae_is_detached():
    values = t([[0.4, 0.2]]).requires_grad_()
    advantages, returns = gae_advantages(t([[0.0, 1.0]]), values, t([[1, 1]]))
    assert not advantages.requires_grad and not returns.requires_grad


# --- clipped policy loss -----------------------------------------------------------------------------


def test_policy_loss_inside_clip_range():
    # ratio 1.1 on both tokens, advantages 2 and -1: loss = mean(-2*1.1, 1*1.1) = (-2.2 + 1.1) / 2 = -0.55
    old = t([[-1.0, -2.0, 0.0]])
    new = old + math.log(1.1)
    new[0, 2] = HUGE  # padding
    loss, clip_fraction = clipped_policy_loss(new, old, t([[2.0, -1.0, HUGE]]), t([[1, 1, 0]]), clip_range=0.2)
    close(loss, -0.55)
    close(clip_fraction, 0.0)


def test_policy_loss_outside_clip_range():
    # c = 0.2, so the ratio is clipped to [0.8, 1.2]; per token max(-A*r, -A*clip(r)):
    # r=1.5, A=+1: max(-1.5, -1.2) = -1.2  (clipped)
    # r=0.5, A=+1: max(-0.5, -0.8) = -0.5  (not clipped: the pessimistic term is the unclipped one)
    # r=1.5, A=-1: max( 1.5,  1.2) =  1.5  (not clipped)
    # r=0.5, A=-1: max( 0.5,  0.8) =  0.8  (clipped)
    # mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clip fraction 2/4
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 3.0]]).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, clip_fraction = clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    close(loss, 0.15)
    close(clip_fraction, 0.5)
    # Clipped tokens pass no gradient; the others pass d(-A*r)/dlogp / 4 = -A*r / 4.
    loss.backward()
    close(new.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]])


# --- clipped value loss ------------------------------------------------------------------------------


def test_value_loss_by_hand():
    # c = 0.2, old values 0, so V_clip = clip(V, -0.2, 0.2); per token max((V-R)^2, (V_clip-R)^2):
    # V=0.1,  R=0.3:  V_clip=0.1;  0.04 vs 0.04 -> 0.04 (not clipped)
    # V=0.5,  R=1.0:  V_clip=0.2;  0.25 vs 0.64 -> 0.64 (clipped)
    # V=0.5,  R=0.0:  V_clip=0.2;  0.25 vs 0.04 -> 0.25 (not clipped)
    # V=-0.5, R=-1.0: V_clip=-0.2; 0.25 vs 0.64 -> 0.64 (clipped)
    # loss = 0.5 * (0.04 + 0.64 + 0.25 + 0.64) / 4 = 0.19625; clip fraction 2/4
    values = t([[0.1, 0.5, 0.5, -0.5, HUGE]])
    old_values = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[0.3, 1.0, 0.0, -1.0, -HUGE]])
    loss, clip_fraction = clipped_value_loss(values, old_values, returns, t([[1, 1, 1, 1, 0]]), clip_range=0.2)
    close(loss, 0.19625)
    close(clip_fraction, 0.5)


def test_value_loss_inside_clip_range_is_plain_mse():
    # old 1.0, V within 0.2 of it: 0.5 * mean((1.1 - 2)^2, (0.9 - 0)^2) = 0.5 * (0.81 + 0.81) / 2 = 0.405
    loss, clip_fraction = clipped_value_loss(t([[1.1, 0.9]]), t([[1.0, 1.0]]), t([[2.0, 0.0]]), t([[1, 1]]))
    close(loss, 0.405)
    close(clip_fraction, 0.0)


# --- entropy -----------------------------------------------------------------------------------------


def test_entropy_of_uniform_logits_is_log_vocab():
    for vocab in (2, 5, 50):
        logits = torch.full((2, 3, vocab), 0.7, dtype=torch.float64)
        close(entropy_from_logits(logits, t([[1, 1, 1], [1, 0, 0]])), math.log(vocab))


def test_entropy_by_hand_with_padding_and_excluded_tokens():
    # position 0: uniform over 4 -> ln 4 = 2 ln 2
    # position 1: probabilities 0.5, 0.25, 0.25, 0 -> 0.5 ln 2 + 0.25 ln 4 + 0.25 ln 4 = 1.5 ln 2
    # position 2: padding (garbage logits)
    # mean over the two response tokens: 1.75 ln 2
    logits = t(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf],
                [1e4, -1e4, 3.0, 0.0],
            ]
        ]
    )
    close(entropy_from_logits(logits, t([[1, 1, 0]])), 1.75 * math.log(2))


# --- KL controllers ----------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_towards_target():
    # error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    controller.update(current_kl=6.6, n_steps=1000)  # error 0.1 -> 0.1 * (1 + 0.1 * 0.1) = 0.101
    assert controller.value == pytest.approx(0.101, abs=TOL)
    controller.update(current_kl=5.4, n_steps=1000)  # error -0.1 -> 0.101 * 0.99 = 0.09999
    assert controller.value == pytest.approx(0.09999, abs=TOL)
    controller.update(current_kl=6.0, n_steps=1000)  # error 0 -> unchanged
    assert controller.value == pytest.approx(0.09999, abs=TOL)


def test_adaptive_kl_controller_clips_the_error():
    above = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    above.update(current_kl=60.0, n_steps=1000)  # error 9 -> 0.2: 0.1 * 1.02
    assert above.value == pytest.approx(0.102, abs=TOL)
    below = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    below.update(current_kl=0.0, n_steps=1000)  # error -1 -> -0.2: 0.1 * 0.98
    assert below.value == pytest.approx(0.098, abs=TOL)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    for kl in (0.0, 3.0, 1e6):
        controller.update(current_kl=kl, n_steps=1000)
        assert controller.value == 0.05
