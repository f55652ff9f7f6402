"""The critic: a scalar head on the policy's backbone, for inference and for training."""
from __future__ import annotations

import torch

from chatlearn.algorithms.core import LossAggregator, config_from_args, shift_to_token_positions
from chatlearn.algorithms.ppo import PPOConfig, explained_variance, value_loss
from chatlearn.models.megatron import MegatronModule


class ValueInference(MegatronModule):
    """``old_values`` [b, s]: at response token t, the value of the state before t
    (the head's output at position t - 1); zero outside the response."""

    def forward_step(self, data: dict, iteration: int) -> dict:
        out = super().forward_step({"input_ids": data["input_ids"]}, iteration)
        if not out:
            return {}
        return {"old_values": shift_to_token_positions(out["values"]) * data["loss_mask"]}


class ValueTrainer(MegatronModule):
    """Clipped value regression on the PPO ``returns`` (chatlearn.algorithms.ppo.value_loss).

    ``clipped_value_only`` (ChatLearn 1.x's key): the loss is the clipped error alone, not the
    larger of the clipped and unclipped errors.
    """

    needs_rollout_keys = ("returns",)  # from the PPO preset's driver step
    group_rows_by_length = True  # the value loss treats rows independently

    def setup(self) -> None:
        super().setup()
        self.ppo = config_from_args(PPOConfig, self.model_args)
        self.clipped_only = str(self.model_args.get("clipped_value_only", False)).lower() in ("1", "true")

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        device = logits.device
        mask = micro_batch["loss_mask"].to(device).float()
        agg = LossAggregator(micro_batch, mask)
        values = shift_to_token_positions(logits[..., 0].float())
        returns = micro_batch["returns"].to(device)
        old_values = micro_batch["old_values"].to(device)
        if self.clipped_only:
            clipped = old_values + torch.clamp(values - old_values, -self.ppo.value_clip_eps, self.ppo.value_clip_eps)
            loss = 0.5 * agg.loss((clipped - returns) ** 2, self.ppo.loss_agg_mode)
            metrics = {"value/clipfrac": agg.token_mean((clipped != values).float().detach())}
        else:
            loss, metrics = value_loss(values, old_values, returns, agg, self.ppo.value_clip_eps,
                                       self.ppo.loss_agg_mode)
        # A share, like every metric here: the micro-batch's statistic weighted by its part of the
        # global batch's tokens (explained variance is not a mean, so this is an approximation).
        weight = agg.token_mean(torch.ones_like(mask))
        metrics.update({"loss/value": loss.detach(),
                        "value/explained_variance": weight * explained_variance(values.detach(), returns, agg.mask)})
        return loss, metrics
