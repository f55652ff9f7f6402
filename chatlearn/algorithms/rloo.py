"""RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out baseline, no value model.

For each prompt, ``n >= 2`` responses are sampled and scored. A response's reward is
its score minus ``kl_coef`` times its KL to the reference summed over its tokens (the
k1 estimate, as in the RLHF objective; ``kl_in_reward``), and its baseline is the mean
reward of the *other* ``n - 1`` responses to the same prompt, which does not depend on
the response itself and so leaves the gradient estimate unbiased:

    r_i   = score_i - kl_coef * sum_t (old_logprobs[t] - ref_logprobs[t])
    A_i   = r_i - mean_{j != i} r_j  =  n / (n - 1) * (r_i - mean(group))
    loss  = agg(max(-A * ratio, -A * clip(ratio)))        (A_i on every token of response i)

With ``kl_in_reward: false`` the reward is the score alone and the KL enters the loss
as GRPO's: ``kl_coef`` times the k3 estimate, aggregated like the surrogate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatlearn.algorithms.core import StatelessRollouts, require_rollout_keys
from chatlearn.algorithms.grpo import check_group_size, group_metrics, has_advantage
from chatlearn.algorithms.ppo import SurrogateConfig, kl_shaped_rewards


@dataclass
class RLOOConfig(SurrogateConfig):
    """RLOO settings, read from the policy trainer's model args (the surrogate's: ``SurrogateConfig``)."""

    # TRL's RLOO default: the same weight PPO's init_kl_coef has here, so that switching
    # between the two keeps the same pull towards the reference.
    kl_coef: float = 0.05
    # True: the sequence's summed k1 KL is subtracted from its score before the baseline (TRL,
    # the paper); False: a k3 KL loss term, as GRPO's.
    kl_in_reward: bool = True

    def reads_old_logprobs(self) -> bool:
        """Whether the driver's step reads ``old_logprobs`` (the KL in the reward) before training."""
        return self.kl_in_reward and self.kl_coef != 0


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward minus the mean of the other rewards of its group (rewards laid out group after
    group, ``[g * group_size]``)."""
    check_group_size(group_size, "RLOO")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


class RLOORollouts(StatelessRollouts):
    """The driver's RLOO step on each rollout batch (an ``Engine`` rollout processor).

    The batch holds ``group_size`` consecutive responses per prompt (vLLM's ``n``);
    needs ``scores`` [b] and ``loss_mask`` (and, with the KL in the reward,
    ``old_logprobs`` and ``ref_logprobs``); adds ``advantages`` [b, s] (the response's
    leave-one-out advantage on each of its tokens).
    """

    def __init__(self, cfg: RLOOConfig, group_size: int):
        check_group_size(group_size, "RLOO")
        self.cfg, self.group_size = cfg, group_size
        self.needs = ("scores", "loss_mask") + (("old_logprobs", "ref_logprobs") if cfg.kl_in_reward else ())

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        require_rollout_keys(batch, self.needs, "RLOO")
        scores = batch["scores"].float()
        mask = batch["loss_mask"].float()
        metrics = group_metrics(scores, self.group_size, mask)
        rewards = scores
        if self.cfg.kl_in_reward:
            # PPO's token rewards (-kl_coef * k1 on each token, the score on the last) sum to the
            # sequence's reward r_i.
            token_rewards, kl = kl_shaped_rewards(scores, batch["old_logprobs"].float(),
                                                  batch["ref_logprobs"].float(), mask, self.cfg.kl_coef)
            rewards = token_rewards.sum(-1)
            metrics["kl"] = float(kl.sum(-1).mean())
        advantages = leave_one_out_advantages(rewards, self.group_size)
        metrics["advantages/abs_mean"] = float(advantages.abs().mean())
        batch["advantages"] = advantages[:, None] * mask  # in place: the rollout dump records them
        return batch, metrics

    def is_trainable(self, sample: dict) -> bool:
        return has_advantage(sample)
