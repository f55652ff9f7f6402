"""The RL presets: PPO (``RLHFEngine``), GRPO and online DPO on the generic ``Engine``.

Each preset is the algorithm's dataflow in a few lines: which models an
episode's prompts go through (environment flow), what the driver computes from
the rollouts (a rollout processor from ``chatlearn.algorithms``), which models
train on the result (trainer flow), and which trainer's weights go to which
inference model after training. The algorithm's settings are read from the
policy trainer's model args (its ``model_config_file``).
"""
from __future__ import annotations

from typing import Optional

from chatlearn.algorithms.core import config_from_args
from chatlearn.algorithms.dpo import DPOConfig, DPOPairs
from chatlearn.algorithms.grpo import GRPOConfig, GRPORollouts
from chatlearn.algorithms.ppo import PPOConfig, PPORollouts
from chatlearn.config.globals import get_args
from chatlearn.models.base import BaseModule
from chatlearn.runtime.engine import Engine
from chatlearn.runtime.flow import Environment, Evaluator, Trainer


def _trainer_args(trainer: BaseModule) -> dict:
    models = get_args().models
    return models[trainer.name].args_dict if trainer.name in models else {}


def _require_dynamic(engine_name: str, reason: str) -> None:
    """Engines whose environment emits a varying or multiplied number of samples."""
    config = get_args()
    if config.runtime.stream_data_loader_type != "dynamic":
        raise ValueError(f"{config.config_path or 'config'}: runtime.stream_data_loader_type: {engine_name} "
                         f"needs 'dynamic' ({reason}), got {config.runtime.stream_data_loader_type!r}")


def _recomputes_old_logprobs(trainer: BaseModule) -> bool:
    """The trainer's ``recompute_old_logprobs`` (auto: on a GPU run, where the sampler's bf16
    kernels make its log-probs drift from the trainer's; on CPU both are fp32 and agree to
    ~1e-6, docs/algorithms.md). ``tis_cap`` needs the recompute: it weighs trainer vs sampler."""
    from chatlearn.config.placement import GPU, detect_device

    config = get_args()
    args = _trainer_args(trainer)
    setting = args.get("recompute_old_logprobs", "auto")
    if setting not in ("auto", True, False):
        raise ValueError(f"{_model_file(trainer)}: recompute_old_logprobs: expected auto, true or false, got {setting!r}")
    recompute = detect_device(config) == GPU if setting == "auto" else setting
    if float(args.get("tis_cap", 0.0) or 0.0) > 0 and not recompute:
        raise ValueError(f"{_model_file(trainer)}: tis_cap needs recompute_old_logprobs: true (the truncated "
                         f"importance weights compare the trainer's log-probs with the sampler's)")
    return recompute


def _model_file(model: BaseModule) -> str:
    config = get_args()
    entry = config.models.get(model.name)
    return (entry.model_config_file if entry is not None and entry.model_config_file else
            config.config_path or "config") + f" (models.{model.name})"


def _samples_per_prompt(policy: BaseModule) -> int:
    models = get_args().models
    return int(models[policy.name].args_dict.get("n", 1)) if policy.name in models else 1


class RLHFEngine(Engine):
    """PPO-style RLHF, as in ChatLearn 1.x:

        environment: policy [-> ppo_policy: old_logprobs] -> reference and value -> reward
        driver:      KL-shaped rewards and GAE advantages (PPORollouts)
        trainer:     ppo_policy.train_step, ppo_value.train_step
        sync:        ppo_policy -> policy, ppo_value -> value

    ``compute_advantages=False`` leaves the rollouts as the environment made
    them, for trainers that compute their own targets (the toy example).
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, value: BaseModule,
                 ppo_policy: BaseModule, ppo_value: BaseModule, evaluator: Optional[Evaluator] = None,
                 compute_advantages: bool = True):
        recompute = compute_advantages and _recomputes_old_logprobs(ppo_policy)

        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
                policy_out = ppo_policy.forward_step(policy_out)
            ref_out = reference.forward_step(policy_out)
            value_out = value.forward_step(policy_out)
            return reward.forward_step(policy_out, ref_out, value_out)

        def trainer_flow(batch):
            ppo_policy.train_step(batch)
            ppo_value.train_step(batch)

        processor = PPORollouts(config_from_args(PPOConfig, _trainer_args(ppo_policy))) if compute_advantages else None
        super().__init__(Environment(env_flow), Trainer(trainer_flow), evaluator, rollout_processor=processor)
        self.set_parameter_sync(ppo_policy, policy)
        self.set_parameter_sync(ppo_value, value)


class _CriticFreeEngine(Engine):
    """The dataflow GRPO and online DPO share: policy -> reference -> reward, the
    algorithm's rollout processor in the driver, ppo_policy trains, sync to policy."""

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, ppo_policy: BaseModule,
                 evaluator: Optional[Evaluator], processor, recompute: bool = False):
        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
                policy_out = ppo_policy.forward_step(policy_out)
            ref_out = reference.forward_step(policy_out)
            return reward.forward_step(policy_out, ref_out)

        def trainer_flow(batch):
            ppo_policy.train_step(batch)

        super().__init__(Environment(env_flow), Trainer(trainer_flow), evaluator, rollout_processor=processor)
        self.set_parameter_sync(ppo_policy, policy)


class GRPOEngine(_CriticFreeEngine):
    """GRPO: no value model; ``n`` responses per prompt scored and normalised within their group.

        environment: policy (n samples per prompt) [-> ppo_policy: old_logprobs] -> reference -> reward
        driver:      group-normalised advantages, optional top-k (GRPORollouts)
        trainer:     ppo_policy.train_step (clipped loss + KL loss to the reference)
        sync:        ppo_policy -> policy
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, ppo_policy: BaseModule,
                 evaluator: Optional[Evaluator] = None):
        _require_dynamic("GRPOEngine", "each prompt yields n responses")
        processor = GRPORollouts(config_from_args(GRPOConfig, _trainer_args(ppo_policy)), _samples_per_prompt(policy))
        super().__init__(policy, reference, reward, ppo_policy, evaluator, processor,
                         recompute=_recomputes_old_logprobs(ppo_policy))


class OnlineDPOEngine(_CriticFreeEngine):
    """Online DPO: two on-policy responses per prompt, ranked by the reward, DPO loss.

        environment: policy (n: 2) -> reference -> reward
        driver:      (chosen, rejected) pairs (DPOPairs)
        trainer:     ppo_policy.train_step (DPO loss against the reference log-probs)
        sync:        ppo_policy -> policy
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, ppo_policy: BaseModule,
                 evaluator: Optional[Evaluator] = None):
        _require_dynamic("OnlineDPOEngine", "pairs without a clear winner are dropped")
        n = _samples_per_prompt(policy)
        if n != 2:
            raise ValueError(f"{get_args().config_path or 'config'}: models.{policy.name} `n`: online DPO "
                             f"samples 2 responses per prompt, got n={n}")
        processor = DPOPairs(config_from_args(DPOConfig, _trainer_args(ppo_policy)))
        super().__init__(policy, reference, reward, ppo_policy, evaluator, processor)
