"""PPO for RLHF, written out: KL-shaped token rewards, GAE, clipped policy and value losses.

All tensors are ``[batch, seq]`` and aligned with ``input_ids`` (see
``chatlearn.algorithms.core``); ``mask`` is the response-token mask.

    rewards[t]    = -kl_coef * (logprob[t] - ref_logprob[t])   (+ score on the last response token)
    delta[t]      = rewards[t] + gamma * V[t+1] - V[t]          (V after the response = 0)
    advantage[t]  = delta[t] + gamma * lam * advantage[t+1]
    returns[t]    = advantage[t] + V[t]
    loss/policy   = agg(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
    loss/value    = 0.5 * agg(max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2))

``agg`` is the global batch's mean by ``loss_agg_mode`` (``LossAggregator``:
token-mean by default) and ``ratio = exp(logprob - old_logprob)``, all log-probs
of the sampling distribution (see docs/algorithms.md, "Which log-probs").

Metric names are stable: ``loss/policy``, ``loss/value``, ``clipfrac``,
``approx_kl``, ``entropy``, ``kl``, ``value/explained_variance``, ``reward/mean``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from chatlearn.algorithms.core import LossAggregator, masked_mean, masked_var, require_rollout_keys


@dataclass
class SurrogateConfig:
    """The clipped surrogate's settings, in every algorithm that trains with it (PPO, GRPO, RLOO,
    REINFORCE++); read, with the algorithm's own, from the policy trainer's model args."""

    clip_eps: float = 0.2
    loss_agg_mode: str = "token-mean"   # how the policy loss averages (LOSS_AGG_MODES)
    # Recompute old_logprobs with the trainer before the update (verl): "auto" (on GPU, where
    # bf16 kernels make the sampler's log-probs differ from the trainer's), True or False.
    recompute_old_logprobs: Any = "auto"
    # > 0: weight each token's surrogate by min(pi_old / behaviour, tis_cap) (needs the recompute).
    tis_cap: float = 0.0


@dataclass
class PPOConfig(SurrogateConfig):
    """PPO settings, read from the policy trainer's model args (its ``model_config_file``);
    ``loss_agg_mode`` averages the value loss too."""

    init_kl_coef: float = 0.05
    adaptive_kl: bool = False       # Ziegler et al. 2019: steer the coefficient towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    value_clip_eps: float = 0.2
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    score_clip: float = 0.0         # > 0: clip the sequence score to [-score_clip, score_clip]


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


class AdaptiveKLController:
    """Multiplies the coefficient by ``1 + clip(kl / target - 1, +-0.2) * n / horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def make_kl_controller(cfg: PPOConfig):
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.init_kl_coef)


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last response token (rows without one give 0)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).max(dim=1).values


def kl_shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards ``-kl_coef * kl`` plus the sequence score on the last response token.

    Returns ``(rewards, kl)``, both ``[b, s]`` and zero outside the mask;
    ``kl`` is the per-token estimate ``logprob - ref_logprob``.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_response_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns ``(advantages, returns)``."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                agg: LossAggregator, clip_eps: float, loss_agg_mode: str = "token-mean",
                is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss and its diagnostics ``clipfrac``, ``approx_kl`` (shares of the
    global batch, see ``LossAggregator``).

    ``is_weights`` ([b, s], no gradient): per-token importance weights that multiply the
    surrogate, e.g. the truncated ``pi_old / behaviour`` ratios of ``truncated_is_weights``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = agg.loss(per_token, loss_agg_mode)
    with torch.no_grad():
        metrics = {
            "clipfrac": agg.token_mean((clipped > unclipped).float()),
            # Schulman's k3 estimator of KL(old || new): low variance, always >= 0.
            "approx_kl": agg.token_mean(ratio - 1.0 - log_ratio),
        }
    return loss, metrics


def truncated_is_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """``min(pi_old / behaviour, cap)`` per token: corrects the mismatch between the
    distribution the sampler drew from and the trainer's (truncated importance sampling,
    Yao et al. 2025; TRL's ``vllm_importance_sampling_correction``)."""
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, agg: LossAggregator,
               clip_eps: float, loss_agg_mode: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss and ``value/clipfrac`` (shares of the global batch)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * agg.loss(torch.maximum(unclipped_err, clipped_err), loss_agg_mode)
    with torch.no_grad():
        metrics = {"value/clipfrac": agg.token_mean((clipped_err > unclipped_err).float())}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (1 is perfect)."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


class PPORollouts:
    """The driver's PPO step on each rollout batch (an ``Engine`` rollout processor).

    Needs ``scores`` [b] (the reward stage), ``old_logprobs`` (the policy's
    sampling), ``ref_logprobs`` (the reference), ``old_values`` (the value
    model) and ``loss_mask``; adds ``advantages`` and ``returns`` (to the batch itself). Advantage
    whitening is left to the policy trainer, which sees a whole training batch.
    """

    REQUIRED = ("scores", "old_logprobs", "ref_logprobs", "old_values", "loss_mask")

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.kl_ctl = make_kl_controller(cfg)

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        require_rollout_keys(batch, self.REQUIRED, "PPO")
        mask = batch["loss_mask"].float()
        scores = batch["scores"].float()
        if self.cfg.score_clip > 0:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        rewards, kl = kl_shaped_rewards(scores, batch["old_logprobs"].float(), batch["ref_logprobs"].float(),
                                        mask, self.kl_ctl.value)
        advantages, returns = gae_advantages(rewards, batch["old_values"].float(), mask, self.cfg.gamma, self.cfg.lam)
        metrics = {
            "reward/mean": float(batch["scores"].float().mean()),
            "kl": float(kl.sum(-1).mean()),
            "response_length/mean": float(mask.sum(-1).mean()),
            "value/mean": float(masked_mean(batch["old_values"].float(), mask)),
            "returns/mean": float(masked_mean(returns, mask)),
        }
        batch.update(advantages=advantages, returns=returns)  # in place: the rollout dump records them
        return batch, metrics

    def is_trainable(self, sample: dict) -> bool:
        return True

    def end_episode(self, metrics: dict[str, float]) -> dict[str, float]:
        coef = self.kl_ctl.value  # the coefficient this episode's rewards were shaped with
        self.kl_ctl.update(metrics.get("kl", float("nan")), int(metrics.get("samples/environment", 0) or 1))
        return {"kl_coef": coef}

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.value = float(state["kl_coef"])
