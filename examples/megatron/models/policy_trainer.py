"""The policy's training side on Megatron: PPO, GRPO and online-DPO losses.

Every loss here is a few lines over ``chatlearn.algorithms``; what the three
share lives in ``_PolicyTrainer``: token log-probs from the logits, the
entropy, and the training/inference consistency check.

Consistency: the first training step of an episode runs on weights that were
just synced into vLLM, so the trainer's log-probs of the sampled tokens should
equal vLLM's ``old_logprobs``. Their gap (``consistency/logprob_diff_mean``,
``_max`` and the k3 ``consistency/kl``) exposes a wrong sync or numerics that
differ between the two engines (bf16 kernels, say); it is reported on that
first step only (with ``sync_frequency`` > 1 the policy may be ahead of vLLM).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from chatlearn.algorithms.core import config_from_args, entropy_from_logits, logprobs_from_logits, masked_mean, \
    masked_whiten, sequence_logprob
from chatlearn.algorithms.dpo import PAIRED_KEYS, DPOConfig, dpo_loss
from chatlearn.algorithms.grpo import GRPOConfig, kl_loss
from chatlearn.algorithms.ppo import PPOConfig, policy_loss
from chatlearn.data.batching import concat_padded
from chatlearn.models.megatron import MegatronModule


class _PolicyTrainer(MegatronModule):
    def setup(self) -> None:
        super().setup()
        self._check_consistency = True
        self._consistency: list[torch.Tensor] = []  # |trainer - vLLM| logprob diffs of this step

    def before_episode(self, episode: int) -> None:
        self._check_consistency = True

    def after_episode(self, episode: int) -> None:
        """After the last episode, export the trained policy as a Hugging Face checkpoint."""
        runtime = self.runtime_args
        if episode + 1 == runtime.num_episode:
            self.save_hf_checkpoint(os.path.join(runtime.output_dir, runtime.exp_name, f"hf_{self.name}"))

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        self._consistency = []
        metrics = super().train_step(data_list, iteration)
        if metrics is not None and self._consistency:
            diffs = torch.cat(self._consistency)
            metrics["consistency/logprob_diff_mean"] = float(diffs.abs().mean())
            metrics["consistency/logprob_diff_max"] = float(diffs.abs().max())
            diffs = diffs.double()  # float32 rounding would make this tiny KL estimate negative
            metrics["consistency/kl"] = float((torch.exp(-diffs) + diffs - 1).mean())
        self._check_consistency = False
        return metrics

    def _logprobs(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token log-probs and the response mask; records the vLLM gap on a checked step."""
        logp = logprobs_from_logits(logits, micro_batch["input_ids"].to(logits.device))
        mask = micro_batch["loss_mask"].to(logits.device).float()
        if self._check_consistency and "old_logprobs" in micro_batch:
            diff = (logp.detach() - micro_batch["old_logprobs"].to(logits.device))[mask > 0]
            self._consistency.append(diff.cpu())
        return logp, mask

    def _entropy(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return masked_mean(entropy_from_logits(logits), mask)


class PolicyTrainer(_PolicyTrainer):
    """PPO: clipped surrogate on the driver's GAE advantages (whitened per training batch)
    minus an entropy bonus. Settings: ``PPOConfig`` keys in the model's YAML."""

    def setup(self) -> None:
        super().setup()
        self.ppo = config_from_args(PPOConfig, self.model_args)

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        if self.ppo.whiten_advantages:
            data_list = _whiten_advantages(data_list)
        return super().train_step(data_list, iteration)

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        logp, mask = self._logprobs(logits, micro_batch)
        advantages = micro_batch["advantages"].to(logits.device)
        loss, metrics = policy_loss(logp, micro_batch["old_logprobs"].to(logits.device), advantages, mask,
                                    self.ppo.clip_eps)
        metrics["loss/policy"] = loss.detach()
        if self.ppo.entropy_coef:
            entropy = masked_mean(entropy_from_logits(logits), mask)
            loss = loss - self.ppo.entropy_coef * entropy
            metrics["entropy"] = entropy.detach()
        else:
            metrics["entropy"] = self._entropy(logits, mask)
        return loss, metrics


class GRPOTrainer(_PolicyTrainer):
    """GRPO: clipped surrogate on group-normalised advantages + ``kl_coef`` x KL to the reference."""

    def setup(self) -> None:
        super().setup()
        self.grpo = config_from_args(GRPOConfig, self.model_args)

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        logp, mask = self._logprobs(logits, micro_batch)
        device = logits.device
        surrogate, metrics = policy_loss(logp, micro_batch["old_logprobs"].to(device),
                                         micro_batch["advantages"].to(device), mask, self.grpo.clip_eps)
        kl = kl_loss(logp, micro_batch["ref_logprobs"].to(device), mask)
        loss = surrogate + self.grpo.kl_coef * kl
        metrics.update({"loss/policy": surrogate.detach(), "kl": kl.detach(), "entropy": self._entropy(logits, mask)})
        return loss, metrics


class DPOTrainer(_PolicyTrainer):
    """Online DPO: each training sample is a (chosen, rejected) pair from ``DPOPairs``.
    The pair's two sequences run through the model as one batch of 2b rows."""

    def setup(self) -> None:
        super().setup()
        self.dpo = config_from_args(DPOConfig, self.model_args)
        self._check_consistency = False  # pairs carry no old_logprobs

    def before_episode(self, episode: int) -> None:
        pass

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        return super().train_step([_stack_pair(mb) for mb in data_list], iteration)

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        logp, mask = self._logprobs(logits, micro_batch)
        policy = sequence_logprob(logp, mask)
        ref = sequence_logprob(micro_batch["ref_logprobs"].to(logits.device), mask)
        pairs = policy.shape[0] // 2
        loss, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], self.dpo.beta)
        metrics.update({"loss/policy": loss.detach(), "entropy": self._entropy(logits, mask)})
        return loss, metrics


def _whiten_advantages(data_list: list[dict]) -> list[dict]:
    """Whiten advantages over all response tokens of this rank's training batch."""
    flat_adv = torch.cat([mb["advantages"].float().flatten() for mb in data_list])
    flat_mask = torch.cat([mb["loss_mask"].float().flatten() for mb in data_list])
    whitened = masked_whiten(flat_adv, flat_mask).split([mb["advantages"].numel() for mb in data_list])
    return [{**mb, "advantages": w.view_as(mb["advantages"])} for mb, w in zip(data_list, whitened)]


def _stack_pair(micro_batch: dict) -> dict:
    """``chosen_*`` and ``rejected_*`` [b, s1], [b, s2] -> ``*`` [2b, max(s1, s2)], chosen rows first."""
    return {key: concat_padded([micro_batch[f"chosen_{key}"], micro_batch[f"rejected_{key}"]])
            for key in PAIRED_KEYS}

