"""REINFORCE++ (Hu 2025, OpenRLHF): PPO's token-level machinery without the value model.

The KL to the reference is a per-token reward (the k1 estimate), the sequence score is
added on the last response token, each token's return is the discounted reward-to-go,
and the returns, whitened over the whole global training batch (every data-parallel
rank's response tokens), are the advantages of PPO's clipped surrogate:

    rewards[t]  = -kl_coef * (old_logprobs[t] - ref_logprobs[t])   (+ score on the last response token)
    G[t]        = sum_{k >= t} gamma^(k - t) * rewards[k]
    A           = (G - mean(G)) / std(G)        over the global batch's response tokens
    loss        = agg(max(-A * ratio, -A * clip(ratio)))

The batch-wide whitening is the baseline: it needs no group of responses per prompt,
so ``n`` may be 1. It runs in the policy trainer (``ReinforcePPTrainer``), which sees
a whole training batch; this module's driver step adds the returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatlearn.algorithms.core import StatelessRollouts, masked_mean, require_rollout_keys
from chatlearn.algorithms.ppo import SurrogateConfig, gae_advantages, kl_shaped_rewards


@dataclass
class ReinforcePPConfig(SurrogateConfig):
    """REINFORCE++ settings, read from the policy trainer's model args (the surrogate's:
    ``SurrogateConfig``)."""

    kl_coef: float = 0.01   # OpenRLHF's REINFORCE++ examples (its init_kl_coef)
    gamma: float = 1.0
    # The whitening is the algorithm's baseline; off, the advantages are the raw returns.
    whiten_advantages: bool = True
    entropy_coef: float = 0.0

    def reads_old_logprobs(self) -> bool:
        """Whether the driver's step reads ``old_logprobs`` (the KL in the reward) before training."""
        return self.kl_coef != 0


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G[t] = sum_{k >= t} gamma^(k - t) rewards[k]`` over each row's response tokens (0 elsewhere):
    GAE with no value model and ``lam = 1``."""
    return gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


class ReinforcePPRollouts(StatelessRollouts):
    """The driver's REINFORCE++ step on each rollout batch (an ``Engine`` rollout processor).

    Needs ``scores`` [b], ``old_logprobs``, ``ref_logprobs`` and ``loss_mask``; adds
    ``advantages`` [b, s]: the returns, before the trainer whitens them.
    """

    needs = ("scores", "old_logprobs", "ref_logprobs", "loss_mask")

    def __init__(self, cfg: ReinforcePPConfig):
        self.cfg = cfg

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        require_rollout_keys(batch, self.needs, "REINFORCE++")
        mask = batch["loss_mask"].float()
        rewards, kl = kl_shaped_rewards(batch["scores"].float(), batch["old_logprobs"].float(),
                                        batch["ref_logprobs"].float(), mask, self.cfg.kl_coef)
        returns = reward_to_go(rewards, mask, self.cfg.gamma)
        batch["advantages"] = returns  # in place: the rollout dump records them (unwhitened)
        return batch, {
            "reward/mean": float(batch["scores"].float().mean()),
            "kl": float(kl.sum(-1).mean()),
            "response_length/mean": float(mask.sum(-1).mean()),
            "returns/mean": float(masked_mean(returns, mask)),
        }
