"""The policy's training side on Megatron: PPO, GRPO, RLOO, REINFORCE++ and online-DPO losses.

Every loss here is a few lines over ``chatlearn.algorithms``; what they
share lives in ``_PolicyTrainer``: token log-probs of the sampling
distribution, the entropy, the optional recompute of ``old_logprobs``, and
the training/inference consistency check.

Log-probs (docs/algorithms.md, "Which log-probs"): every token is scored
under the distribution it was sampled from, with the rollout's temperature,
top-k and top-p, which the rollout batch carries per row. ``old_logprobs``
is what the ratio divides by: the sampler's log-probs (vLLM), or, with
``recompute_old_logprobs``, the trainer's own before the update (its
``forward_step`` runs in the environment flow, verl's "old log-prob" stage),
and then the sampler's are kept as ``behaviour_logprobs``. ``tis_cap`` > 0
weights every token by ``min(exp(old - behaviour), tis_cap)``.

On-policy step: when an episode makes a single optimizer step right after the
sync (``rl_engines.old_logprobs_stage``), the engine skips that stage and the
trainer's own log-probs of the step, detached, are the old ones: the weights
have not moved yet, so they are what the stage would have computed, without
a second forward pass (verl does the same). The batch then has no
``behaviour_logprobs``; a second step in the same episode is an error.

Consistency: the first training step of an episode runs on weights that were
just synced into vLLM, so the trainer's log-probs of the sampled tokens
should equal the sampler's. Their gap (``consistency/logprob_diff_mean``,
``_max`` and the k3 ``consistency/kl``) compares the same quantities the loss
uses and exposes a wrong sync or numerics that differ between the two engines
(bf16 kernels, say); it is reported on that first step only (with
``sync_frequency`` > 1 the policy may be ahead of vLLM).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from chatlearn.algorithms.core import (LOSS_AGG_MODES, LossAggregator, config_from_args, sequence_logprob,
                                       whiten_advantages)
from chatlearn.algorithms.dpo import PAIRED_KEYS, DPOConfig, dpo_loss
from chatlearn.algorithms.grpo import GRPOConfig, kl_loss
from chatlearn.algorithms.ppo import PPOConfig, policy_loss, truncated_is_weights
from chatlearn.algorithms.reinforce_pp import ReinforcePPConfig
from chatlearn.algorithms.rloo import RLOOConfig
from chatlearn.data.batching import concat_padded
from chatlearn.models.megatron import MegatronModule
from chatlearn.models.megatron.schedule import micro_batch_logprobs_and_entropy
from chatlearn.utils import platform


def behaviour_logprobs(batch: dict) -> torch.Tensor:
    """The sampler's log-probs: ``behaviour_logprobs`` once ``old_logprobs`` was recomputed."""
    return batch["behaviour_logprobs"] if "behaviour_logprobs" in batch else batch["old_logprobs"]


class _PolicyTrainer(MegatronModule):
    # The algorithm's settings dataclass (its keys are read from the model's YAML).
    config_class: type = PPOConfig
    group_rows_by_length = True  # the PPO/GRPO losses treat rows independently (DPO's pairs: below)

    def setup(self) -> None:
        super().setup()
        self.cfg = config_from_args(self.config_class, self.model_args)
        mode = getattr(self.cfg, "loss_agg_mode", None)
        if mode is not None and mode not in LOSS_AGG_MODES:
            raise ValueError(f"model {self.name!r}: loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
        self._check_consistency = True
        self._consistency: list[torch.Tensor] = []  # trainer - sampler logprob diffs of this step
        setting = getattr(self.cfg, "recompute_old_logprobs", False)
        # auto resolves as rl_engines._recomputes_old_logprobs does: on GPU, unless the run is lagged.
        self._recompute = (platform.has_gpu() and self.runtime_args.policy_lag == 0) if setting == "auto" \
            else setting is True
        self._old_in_loss = False  # this step's old log-probs are its own forward pass's (on-policy step)
        self._steps_this_episode = 0

    def before_episode(self, episode: int) -> None:
        self._check_consistency = True
        self._steps_this_episode = 0

    def after_episode(self, episode: int) -> None:
        """After the last episode, export the trained policy as a Hugging Face checkpoint."""
        runtime = self.runtime_args
        if episode + 1 == runtime.num_episode:
            self.save_hf_checkpoint(os.path.join(runtime.run_dir, f"hf_{self.name}"))

    def forward_step(self, data: dict, iteration: int) -> dict:
        """The recompute stage: ``old_logprobs`` from this trainer's weights (those just synced
        to the sampler), the sampler's moved to ``behaviour_logprobs``."""
        out = super().forward_step(data, iteration)
        if not out:  # not the last pipeline stage
            return {}
        return {"old_logprobs": out["logprobs"] * data["loss_mask"], "behaviour_logprobs": behaviour_logprobs(data)}

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        self._consistency = []
        self._old_in_loss = self._recompute and bool(data_list) and "behaviour_logprobs" not in data_list[0]
        if self._old_in_loss and self._steps_this_episode:
            raise RuntimeError(
                f"model {self.name!r}: recompute_old_logprobs without the old-log-prob stage (the engine left it "
                f"out because it expected one optimizer step per episode), but this is step "
                f"{self._steps_this_episode + 1} of the episode: its weights moved since sampling. Run "
                f"{self.name}.forward_step in the environment flow (rl_engines.old_logprobs_stage) or set "
                f"recompute_old_logprobs: false")
        self._steps_this_episode += 1
        metrics = super().train_step(data_list, iteration)
        if metrics is not None and self._consistency:
            diffs = torch.cat(self._consistency)
            metrics["consistency/logprob_diff_mean"] = float(diffs.abs().mean())
            metrics["consistency/logprob_diff_max"] = float(diffs.abs().max())
            diffs = diffs.double()  # float32 rounding would make this tiny KL estimate negative
            metrics["consistency/kl"] = float((torch.exp(-diffs) + diffs - 1).mean())
        self._check_consistency = False
        return metrics

    def _logprobs(self, logits: torch.Tensor, micro_batch: dict
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token log-probs of the sampling distribution (top-k/top-p on the response tokens), the
        per-token entropy of the tempered distribution and the response mask, from the
        vocab-parallel ``logits`` in one pass; records the gap to the sampler's log-probs on a
        checked step."""
        mask = micro_batch["loss_mask"].to(logits.device).float()
        logp, entropy = micro_batch_logprobs_and_entropy(logits, micro_batch)
        if self._check_consistency and "old_logprobs" in micro_batch:
            valid = mask * micro_batch.get("sample_valid", torch.ones(mask.shape[0])).to(logits.device)[:, None]
            diff = (logp.detach() - behaviour_logprobs(micro_batch).to(logits.device))[valid > 0]
            self._consistency.append(diff.cpu())
        return logp, entropy, mask

    def _old_logprobs(self, logp: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        """What the ratio divides by: this pass's own log-probs on an on-policy step, else the batch's."""
        return logp.detach() if self._old_in_loss else micro_batch["old_logprobs"].to(logp.device)

    def _is_weights(self, old: torch.Tensor, micro_batch: dict) -> Optional[torch.Tensor]:
        if not self.cfg.tis_cap:
            return None
        if not self._old_in_loss and "behaviour_logprobs" not in micro_batch:
            raise ValueError(f"model {self.name!r}: tis_cap needs recompute_old_logprobs (the sampler's "
                             f"log-probs are then kept as behaviour_logprobs)")
        return truncated_is_weights(old, behaviour_logprobs(micro_batch).to(old.device), self.cfg.tis_cap)

    def _surrogate(self, logits: torch.Tensor, micro_batch: dict, clip_eps: float
                   ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, LossAggregator]:
        """The clipped surrogate (PPO and GRPO): loss share, metrics, log-probs, entropy, aggregator."""
        device = logits.device
        logp, entropy, mask = self._logprobs(logits, micro_batch)
        agg = LossAggregator(micro_batch, mask)
        old = self._old_logprobs(logp, micro_batch)
        weights = self._is_weights(old, micro_batch)
        loss, metrics = policy_loss(logp, old, micro_batch["advantages"].to(device),
                                    agg, clip_eps, self.cfg.loss_agg_mode, weights)
        if weights is not None:
            metrics["tis/weight_mean"] = agg.token_mean(weights)
            metrics["tis/capped_fraction"] = agg.token_mean((weights >= self.cfg.tis_cap).float())
        return loss, metrics, logp, entropy, agg


class PolicyTrainer(_PolicyTrainer):
    """PPO: clipped surrogate on the driver's GAE advantages (whitened over the training batch)
    minus an entropy bonus. Settings: ``PPOConfig`` keys in the model's YAML."""

    config_class = PPOConfig
    needs_rollout_keys = ("advantages",)  # from the PPO preset's driver step

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        if self.cfg.whiten_advantages:
            from megatron.core import parallel_state as ps

            data_list = whiten_advantages(data_list, ps.get_data_parallel_group())
        return super().train_step(data_list, iteration)

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics, _, entropy, agg = self._surrogate(logits, micro_batch, self.cfg.clip_eps)
        metrics["loss/policy"] = loss.detach()
        if self.cfg.entropy_coef:
            loss = loss - self.cfg.entropy_coef * agg.loss(entropy, self.cfg.loss_agg_mode)
        metrics["entropy"] = agg.token_mean(entropy.detach())
        return loss, metrics


class ReinforcePPTrainer(PolicyTrainer):
    """REINFORCE++: PPO's loss on the driver's reward-to-go returns, whitened over the global
    training batch; no value model. Settings: ``ReinforcePPConfig`` keys."""

    config_class = ReinforcePPConfig


class GRPOTrainer(_PolicyTrainer):
    """GRPO: clipped surrogate on group-normalised advantages + ``kl_coef`` x KL to the reference."""

    config_class = GRPOConfig
    needs_rollout_keys = ("advantages",)  # from the GRPO preset's driver step

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        surrogate, metrics, logp, entropy, agg = self._surrogate(logits, micro_batch, self.cfg.clip_eps)
        metrics.update({"loss/policy": surrogate.detach(), "entropy": agg.token_mean(entropy.detach())})
        if not self._kl_in_loss():
            return surrogate, metrics
        kl = kl_loss(logp, micro_batch["ref_logprobs"].to(logits.device), agg, self.cfg.loss_agg_mode)
        metrics["kl"] = kl.detach()
        return surrogate + self.cfg.kl_coef * kl, metrics

    def _kl_in_loss(self) -> bool:
        """GRPO's KL to the reference is a loss term; RLOO's is in the reward unless told otherwise."""
        return True


class RLOOTrainer(GRPOTrainer):
    """RLOO: clipped surrogate on leave-one-out advantages; the KL to the reference is in the
    driver's rewards (``kl_in_reward``, default) or, as GRPO's, a loss term."""

    config_class = RLOOConfig

    def _kl_in_loss(self) -> bool:
        return not self.cfg.kl_in_reward


class DPOTrainer(_PolicyTrainer):
    """Online DPO: each training sample is a (chosen, rejected) pair from ``DPOPairs``.
    The pair's two sequences run through the model as one batch of 2b rows, chosen first."""

    config_class = DPOConfig
    group_rows_by_length = False  # a micro-batch's rows are pairs: chosen first half, rejected second
    # The (chosen, rejected) pairs the online-DPO preset's driver step makes.
    needs_rollout_keys = tuple(f"{side}_{key}" for side in ("chosen", "rejected") for key in PAIRED_KEYS)

    def setup(self) -> None:
        super().setup()
        self._check_consistency = False  # pairs carry no sampler log-probs

    def before_episode(self, episode: int) -> None:
        pass

    def train_step(self, data_list: list[dict], iteration: int) -> Optional[dict]:
        return super().train_step([_stack_pair(mb) for mb in data_list], iteration)

    def loss_fn(self, logits: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict]:
        logp, entropy, mask = self._logprobs(logits, micro_batch)
        agg = LossAggregator(micro_batch, mask)
        policy = sequence_logprob(logp, mask)
        ref = sequence_logprob(micro_batch["ref_logprobs"].to(logits.device), mask)
        pairs = policy.shape[0] // 2
        loss, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], self.cfg.beta, agg,
                                 nll_coef=self.cfg.nll_coef, chosen_tokens=mask[:pairs].sum(-1))
        metrics.update({"loss/policy": loss.detach(),
                        "entropy": agg.token_mean(entropy.detach())})
        return loss, metrics


def _stack_pair(micro_batch: dict) -> dict:
    """``chosen_*`` and ``rejected_*`` [b, s1], [b, s2] -> ``*`` [2b, max(s1, s2)], chosen rows first;
    the pair's per-row keys (validity, sampling settings) are repeated for both halves."""
    stacked = {key: concat_padded([micro_batch[f"chosen_{key}"], micro_batch[f"rejected_{key}"]])
               for key in PAIRED_KEYS}
    for key, value in micro_batch.items():
        if key not in stacked and not key.startswith(("chosen_", "rejected_")) and isinstance(value, torch.Tensor):
            stacked[key] = torch.cat([value, value]) if value.dim() > 0 else value
    return stacked
