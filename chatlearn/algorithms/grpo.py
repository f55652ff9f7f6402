"""GRPO (Shao et al. 2024): group-normalised advantages, no value model, KL loss to the reference.

For each prompt, ``n`` responses are sampled and scored; a response's
advantage is its score's z-score inside its group, given to every one of its
tokens. The policy loss is PPO's clipped surrogate plus ``kl_coef`` times the
k3 estimate of KL(policy || reference):

    A_i        = (score_i - mean(group)) / (std(group) + eps)
    kl[t]      = exp(ref[t] - logp[t]) - (ref[t] - logp[t]) - 1
    loss       = agg(max(-A * ratio, -A * clip(ratio))) + kl_coef * agg(kl)

with ``agg`` the global batch's mean by ``loss_agg_mode`` (default: the paper's
mean over responses of each response's token mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatlearn.algorithms.core import LossAggregator, StatelessRollouts, require_rollout_keys
from chatlearn.algorithms.ppo import SurrogateConfig


@dataclass
class GRPOConfig(SurrogateConfig):
    """GRPO settings, read from the policy trainer's model args."""

    kl_coef: float = 0.04
    std_normalize: bool = True
    # > 0: train only on the top_k highest-scoring responses of each group
    # (advantages still come from the whole group).
    select_top_k: int = 0
    # The GRPO paper's objective: each response's token mean, averaged over responses.
    loss_agg_mode: str = "seq-mean-token-mean"


def group_advantages(scores: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantages from scores laid out group after group (``[g * group_size]``)."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def check_group_size(group_size: int, algorithm: str) -> None:
    """A group baseline needs at least two responses per prompt."""
    if group_size < 2:
        raise ValueError(f"{algorithm} needs n >= 2 responses per prompt (the policy's `n`), got {group_size}")


def group_metrics(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> dict[str, float]:
    """The episode's scores seen group by group (``scores`` [g * group_size], ``mask`` the loss mask)."""
    spread = scores.float().view(-1, group_size).std(dim=1)
    return {
        "reward/mean": float(scores.float().mean()),
        "reward/group_std": float(spread.mean()),
        # Groups whose responses all scored the same teach nothing (zero advantage).
        "groups/solved_none_or_all": float((spread == 0).float().mean()),
        "response_length/mean": float(mask.float().sum(-1).mean()),
    }


def has_advantage(sample: dict) -> bool:
    """A response with zero advantage on every token teaches nothing alone (its group scored all alike)."""
    return bool(sample["advantages"].abs().sum() > 0)


def top_k_in_groups(scores: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Indices of the ``k`` best responses of each group (ties: the earlier one), group order kept."""
    grouped = scores.view(-1, group_size)
    best = torch.topk(grouped, k=min(k, group_size), dim=1, sorted=False).indices.sort(dim=1).values
    offsets = torch.arange(grouped.shape[0], device=scores.device).unsqueeze(1) * group_size
    return (best + offsets).reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative estimate of KL(policy || reference)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, agg: LossAggregator,
            loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """The k3 KL to the reference, aggregated like the policy loss (its global-batch share)."""
    return agg.loss(k3_kl(logprobs, ref_logprobs), loss_agg_mode)


class GRPORollouts(StatelessRollouts):
    """The driver's GRPO step on each rollout batch (an ``Engine`` rollout processor).

    The batch holds ``group_size`` consecutive responses per prompt (vLLM's
    ``n``); needs ``scores`` [b] and ``loss_mask``; adds ``advantages`` [b, s]
    (the response's group z-score on each of its tokens). With ``select_top_k`` only
    the best ``select_top_k`` responses of each group are kept for training.
    """

    def __init__(self, cfg: GRPOConfig, group_size: int):
        check_group_size(group_size, "GRPO")
        self.cfg, self.group_size = cfg, group_size

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        require_rollout_keys(batch, ("scores", "loss_mask"), "GRPO")
        scores = batch["scores"].float()
        advantages = group_advantages(scores, self.group_size, self.cfg.std_normalize)
        mask = batch["loss_mask"].float()
        metrics = group_metrics(scores, self.group_size, mask)
        batch["advantages"] = advantages[:, None] * mask  # in place: the rollout dump records every response
        out = batch
        if self.cfg.select_top_k:
            keep = top_k_in_groups(scores, self.group_size, self.cfg.select_top_k).tolist()
            out = {k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep]) for k, v in out.items()}
        return out, metrics

    def is_trainable(self, sample: dict) -> bool:
        return has_advantage(sample)
