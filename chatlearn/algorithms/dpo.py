"""Online DPO (Rafailov et al. 2023, sampled on-policy): pairs ranked by a reward, DPO loss.

Each prompt gets two responses; the one with the higher score is *chosen*.
With sequence log-likelihoods ``pi`` (policy) and ``ref`` (reference):

    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    loss   = -log sigmoid(margin)  [+ nll_coef * (-pi_chosen / chosen tokens)]

The optional second term (``nll_coef`` > 0) is the chosen response's negative
log-likelihood per token, as in iterative reasoning preference optimisation (Pang et
al. 2024): DPO alone can lower the chosen response's likelihood along with the
rejected one's, which on tasks with one right answer moves probability to neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from chatlearn.algorithms.core import SAMPLING_KEYS, LossAggregator, StatelessRollouts


@dataclass
class DPOConfig:
    beta: float = 0.1
    # Pairs whose scores differ by no more than this carry no preference and are dropped.
    min_score_gap: float = 0.0
    # > 0: add this times the chosen response's per-token negative log-likelihood (IRPO).
    nll_coef: float = 0.0


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, agg: LossAggregator, nll_coef: float = 0.0,
             chosen_tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss averaged over the global batch's pairs, with ``dpo/accuracy`` (margin > 0) and
    ``dpo/margin`` (shares, see ``LossAggregator``; the pair's rows are stacked chosen first).
    With ``nll_coef`` > 0 each pair also adds ``nll_coef * -policy_chosen / chosen_tokens``
    (``dpo/chosen_nll`` reports that per-token NLL)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    per_pair = -F.logsigmoid(margin)
    chosen_nll = None
    if nll_coef:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: nll_coef needs chosen_tokens (the chosen responses' lengths)")
        chosen_nll = -policy_chosen / chosen_tokens.clamp(min=1)
        per_pair = per_pair + nll_coef * chosen_nll
    loss = agg.sequence_mean(per_pair, rows_per_sample=2)
    with torch.no_grad():
        metrics = {"dpo/accuracy": agg.sequence_mean((margin > 0).float(), rows_per_sample=2),
                   "dpo/margin": agg.sequence_mean(margin, rows_per_sample=2)}
        if chosen_nll is not None:
            metrics["dpo/chosen_nll"] = agg.sequence_mean(chosen_nll, rows_per_sample=2)
    return loss, metrics


def rank_pair(scores: tuple[float, float], min_gap: float = 0.0) -> tuple[int, int] | None:
    """``(chosen, rejected)`` indices of a pair of scores, or None when they are too close."""
    a, b = scores
    if abs(a - b) <= min_gap:
        return None
    return (0, 1) if a > b else (1, 0)


# Per-response keys that a DPO training sample carries twice, as chosen_<key> and rejected_<key>.
PAIRED_KEYS = ("input_ids", "loss_mask", "ref_logprobs")


class DPOPairs(StatelessRollouts):
    """The driver's online-DPO step (an ``Engine`` rollout processor): pair and rank responses.

    The batch holds two consecutive responses per prompt (the policy's
    ``n: 2``) with ``scores``; each pair with a clear winner becomes one
    training sample with ``chosen_*`` and ``rejected_*`` versions of
    ``input_ids``, ``loss_mask`` and ``ref_logprobs`` (and the prompt's sampling
    settings, ``SAMPLING_KEYS``). A tied pair carries no preference and is dropped;
    an episode of ties trains on nothing (the engine skips it).
    """

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        for key in ("scores", *PAIRED_KEYS):
            if key not in batch:
                raise KeyError(f"online DPO needs rollout key {key!r} from the environment flow "
                               f"(it has {sorted(batch)})")
        scores = batch["scores"].float()
        if scores.numel() % 2:
            raise ValueError(f"online DPO needs 2 responses per prompt (n: 2); got a batch of {scores.numel()}")
        chosen, rejected = [], []
        for first in range(0, scores.numel(), 2):
            ranked = rank_pair((float(scores[first]), float(scores[first + 1])), self.cfg.min_score_gap)
            if ranked is not None:
                chosen.append(first + ranked[0])
                rejected.append(first + ranked[1])
        out = {f"chosen_{k}": batch[k][chosen] for k in PAIRED_KEYS}
        out.update({f"rejected_{k}": batch[k][rejected] for k in PAIRED_KEYS})
        # Both responses of a pair were sampled with the prompt's settings: score them alike.
        out.update({k: batch[k][chosen] for k in SAMPLING_KEYS if k in batch})
        pairs = scores.numel() // 2
        metrics = {
            "reward/mean": float(scores.mean()),
            "pairs/kept_fraction": len(chosen) / pairs,
            "pairs/score_gap": float((scores[chosen] - scores[rejected]).mean()) if chosen else 0.0,
        }
        return out, metrics
