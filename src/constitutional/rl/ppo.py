"""The math of PPO for RL-CAI (Bai et al. 2022, step 9), as small pure torch functions.

Everything works on padded batches. Shapes use B for the batch, T for time (token positions) and V for
the vocabulary. `mask` is always [B, T]: 1.0 on the response tokens that are scored and trained on,
0.0 on padding (and on prompt tokens, if the caller keeps them in the batch). Values at masked-out
positions are never read: they may hold anything, even inf or nan, without changing a result.

References:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347): the clipped
  surrogate objective.
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
  (ICLR 2016, arXiv:1506.02438): GAE.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593) and
  Stiennon et al. 2020, "Learning to summarize from human feedback" (arXiv:2009.01325): the reward
  model's score given at the end of the response, a KL penalty to the reference policy on every token,
  and the adaptive KL coefficient.
- Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html): the k1, k2 and
  k3 estimators of KL from samples.
"""

from __future__ import annotations

import torch

KL_KINDS = ("k1", "k2", "k3")


def _where_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` weighted by `mask`, with exact zeros where the mask is 0 (even if the value there is inf or nan)."""
    return torch.where(mask != 0, values * mask, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the entries where `mask` is non-zero (weighted by the mask).

    Args:
        values: any shape, e.g. [B, T].
        mask: same shape as `values`; 1.0 for entries that count, 0.0 for padding.
        dim: the dimension to average over; None averages over all entries.

    Returns:
        A scalar when `dim` is None, else `values` reduced over `dim` (e.g. [B] for dim=1). A slice with
        no masked-in entry has mean 0.
    """
    total = _where_mask(values, mask)
    weight = mask.to(values.dtype)
    if dim is None:
        return total.sum() / weight.sum().clamp(min=1e-12)
    return total.sum(dim) / weight.sum(dim).clamp(min=1e-12)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the entries where `mask` is non-zero.

    Args:
        values: any shape, e.g. [B, T].
        mask: same shape as `values`.
        unbiased: apply Bessel's correction n / (n - 1), n being the mask's sum.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: the mask selects no entry, or only one when `unbiased`.
    """
    count = float(mask.sum())
    if count == 0:
        raise ValueError("masked_var: the mask selects no entry")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if count <= 1:
            raise ValueError("masked_var: the unbiased variance needs at least two masked-in entries")
        var = var * (count / (count - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `values` to variance 1 (and mean 0) over the masked-in entries.

    Whitening advantages (and, optionally, rewards) per batch is standard practice in PPO for language
    models (Ziegler et al. 2019); statistics come from the response tokens only.

    Args:
        values: [B, T].
        mask: [B, T].
        shift_mean: if False, the mean is kept (only the scale changes), e.g. so that rewards keep
            their sign.

    Returns:
        [B, T]: (values - mean) / sqrt(var + 1e-8) on masked-in entries (mean added back unless
        `shift_mean`), 0 on padding. The variance is the unbiased one of `masked_var`.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(policy || reference) from the log-probs of tokens sampled from the policy.

    With log r = log q(x) - log p(x) (p the policy, q the reference, x ~ p), Schulman's note gives:
    - k1 = -log r = log p - log q: unbiased, but a single sample can be negative;
    - k2 = 0.5 (log r)^2: biased, always >= 0, low variance;
    - k3 = (r - 1) - log r: unbiased and always >= 0.

    Args:
        logprobs: [B, T] log p of the sampled tokens under the policy.
        ref_logprobs: [B, T] log q of the same tokens under the frozen reference.
        kind: "k1", "k2" or "k3".

    Returns:
        [B, T] the per-token estimate (no masking: apply the mask where it is used).

    Raises:
        ValueError: unknown `kind`.
    """
    log_ratio = logprobs - ref_logprobs  # [B, T] log p - log q = -log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # (exp(log q - log p) - 1) - (log q - log p), with expm1 for accuracy when p and q are close.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: expected one of {', '.join(KL_KINDS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] the position of each row's last masked-in token.

    Raises:
        ValueError: a row of `mask` [B, T] has no masked-in token.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    last = torch.where(mask != 0, positions, -1).max(dim=1).values  # [B]
    if bool((last < 0).any()):
        raise ValueError("every row needs at least one response token in its mask")
    return last


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty on every response token plus the preference score at the end.

    r_t = -kl_coef * KL_t for every response token t, and the preference model's score for the whole
    response is added at the row's last response token (Ziegler et al. 2019; Stiennon et al. 2020).

    Args:
        scores: [B] the preference model's scalar score of each response.
        logprobs: [B, T] policy log-probs of the sampled tokens.
        ref_logprobs: [B, T] reference (SL-CAI) log-probs of the same tokens.
        mask: [B, T] 1.0 on response tokens; each row must have at least one.
        kl_coef: the KL coefficient (beta).
        kind: the KL estimator, see `kl_estimate`.

    Returns:
        (rewards, kl), both [B, T] and 0 on padding: the rewards, and the per-token KL estimate (for
        logging).
    """
    kl = _where_mask(kl_estimate(logprobs, ref_logprobs, kind), mask)  # [B, T]
    rewards = -kl_coef * kl  # [B, T]
    last = last_token_index(mask)  # [B]
    rows = torch.arange(mask.shape[0], device=mask.device)  # [B]
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over each row.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the value and
    advantage after a response token are those of the next position if it is a response token, else 0:
    the episode ends at the row's last response token (no bootstrap past it).

    Args:
        rewards: [B, T] per-token rewards (e.g. from `token_rewards`).
        values: [B, T] the value head's estimates V_t at the time of sampling.
        mask: [B, T] 1.0 on response tokens.
        gamma: discount factor.
        lam: GAE's lambda.

    Returns:
        (advantages, returns), both [B, T], detached, 0 on padding; returns = advantages + values (the
        value head's regression targets).
    """
    rewards = _where_mask(rewards.detach(), mask)  # [B, T]
    values = _where_mask(values.detach(), mask)  # [B, T]
    keep = (mask != 0).to(values.dtype)  # [B, T]
    batch, time = values.shape
    next_advantage = values.new_zeros(batch)  # [B] A_{t+1}
    next_value = values.new_zeros(batch)  # [B] V_{t+1}
    columns = []
    for t in reversed(range(time)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B]
        next_advantage = (delta + gamma * lam * next_advantage) * keep[:, t]
        next_value = values[:, t]  # already 0 on padding
        columns.append(next_advantage)
    advantages = torch.stack(columns[::-1], dim=1)  # [B, T]
    returns = (advantages + values) * keep  # [B, T]
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss (Schulman et al. 2017, eq. 7), as a loss to minimise.

    With ratio_t = exp(log pi(a_t) - log pi_old(a_t)), the per-token loss is
    max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - c, 1 + c)): the pessimistic bound of the objective.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs: [B, T] the same under the policy that sampled them.
        advantages: [B, T] advantage estimates (e.g. whitened GAE).
        mask: [B, T] 1.0 on response tokens.
        clip_range: c.

    Returns:
        (loss, clip_fraction), both scalars: the masked mean of the per-token loss, and the fraction of
        response tokens where the clipped term is the one in force (detached).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [B, T]
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()
    return loss, clip_fraction


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss of PPO implementations (OpenAI Baselines' PPO2; not in the 2017 paper).

    Per token: 0.5 * max((V - R)^2, (V_clip - R)^2) with V_clip = V_old + clip(V - V_old, -c, c), so a
    value estimate gains nothing from moving more than c away from the one at sampling time.

    Args:
        values: [B, T] current value estimates (with gradient).
        old_values: [B, T] value estimates at sampling time.
        returns: [B, T] the targets (from `gae_advantages`).
        mask: [B, T] 1.0 on response tokens.
        clip_range: c, in the units of the value.

    Returns:
        (loss, clip_fraction), both scalars: the masked mean of the per-token loss, and the fraction of
        response tokens where the clipped term is the larger (detached).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # [B, T]
    unclipped_loss = (values - returns) ** 2  # [B, T]
    clipped_loss = (clipped_values - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).detach()
    return loss, clip_fraction


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the policy's next-token distributions over the response tokens.

    Args:
        logits: [B, T, V] unnormalised logits (-inf allowed for excluded tokens).
        mask: [B, T] 1.0 on response tokens.

    Returns:
        A scalar: the masked mean of H_t = -sum_v p_v log p_v, in nats.
    """
    logp = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    p = logp.exp()  # [B, T, V]
    # 0 * log 0 = 0: tokens with probability 0 (logit -inf) contribute nothing.
    entropy = -(p * torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))).sum(-1)
    return masked_mean(entropy, mask)  # scalar


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    After each batch, with e = clip(KL / target - 1, -0.2, 0.2), the coefficient becomes
    value * (1 + e * n_steps / horizon): it rises while the policy drifts further from the reference
    than `target` nats and falls while it stays closer.

    Args:
        init_kl_coef: the starting coefficient (beta).
        target: the KL (in nats, per response) to aim for.
        horizon: how many steps the proportional controller takes to act (larger is slower).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move `value` after `n_steps` steps (e.g. samples in the batch) that measured `current_kl`."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with the interface of `AdaptiveKLController`.

    Args:
        kl_coef: the coefficient (beta).
    """

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient never moves."""
