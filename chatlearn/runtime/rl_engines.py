"""The RL presets: PPO (``RLHFEngine``), GRPO, RLOO, REINFORCE++ and online DPO on the generic
``Engine``, and ChatLearn 1.x's other presets (``DPOEngine``, ``GRPOMathEngine``).

Each preset is the algorithm's dataflow in a few lines: which models an
episode's prompts go through (environment flow), what the driver computes from
the rollouts (a rollout processor from ``chatlearn.algorithms``), which models
train on the result (trainer flow), and which trainer's weights go to which
inference model after training. The algorithm's settings are read from the
policy trainer's model args (its ``model_config_file``).

The driver-side step is optional, as the whole algorithm was the models' own
business in ChatLearn 1.x: its switch (``compute_advantages``, ``make_pairs``
for online DPO) is ``"auto"`` by default, and then the step runs when a trainer
role declares that it trains on what the step adds (``needs_rollout_keys``,
e.g. ``("advantages",)``); user models that compute their own rewards,
advantages and targets run through the preset unchanged. An explicit
``True``/``False`` (the preset's argument, else the same key in the policy
trainer's model_config_file) wins. With the step on, an environment batch
without the keys it needs is an error naming them and the switch.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from chatlearn.algorithms.core import config_from_args
from chatlearn.algorithms.dpo import PAIRED_KEYS, DPOConfig, DPOPairs
from chatlearn.algorithms.grpo import GRPOConfig, GRPORollouts
from chatlearn.algorithms.ppo import PPOConfig, PPORollouts
from chatlearn.algorithms.reinforce_pp import ReinforcePPConfig, ReinforcePPRollouts
from chatlearn.algorithms.rloo import RLOOConfig, RLOORollouts
from chatlearn.config.globals import get_args
from chatlearn.models.base import BaseModule
from chatlearn.runtime.engine import Engine
from chatlearn.runtime.flow import Environment, Evaluator, Trainer

AUTO = "auto"
Switch = Union[bool, str, None]

# What each driver-side step needs from the environment, and what it adds for the trainers.
PPO_NEEDS = PPORollouts.REQUIRED
PPO_ADDS = ("advantages", "returns")
GRPO_NEEDS = ("scores", "loss_mask")
ADVANTAGES = ("advantages",)  # what the GRPO, RLOO and REINFORCE++ steps add
DPO_NEEDS = ("scores", *PAIRED_KEYS)
DPO_ADDS = tuple(f"{side}_{key}" for side in ("chosen", "rejected") for key in PAIRED_KEYS)


class RolloutKeysError(ValueError):
    """A preset's driver-side step is on, but the environment's batches lack keys it needs."""


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
    """The trainer's ``recompute_old_logprobs`` (auto: on a synchronous GPU run, where the
    sampler's bf16 kernels make its log-probs drift from the trainer's; on CPU both are fp32
    and agree to ~1e-6, docs/algorithms.md; off with ``policy_lag`` > 0, where the trainer no
    longer holds the sampling weights). ``tis_cap`` needs the recompute: it weighs trainer vs sampler."""
    from chatlearn.config.placement import GPU, detect_device

    config = get_args()
    args = _trainer_args(trainer)
    setting = args.get("recompute_old_logprobs", AUTO)
    if setting not in (AUTO, True, False):
        raise ValueError(f"{_model_file(trainer)}: recompute_old_logprobs: expected auto, true or false, got {setting!r}")
    lagged = config.runtime.policy_lag > 0
    recompute = detect_device(config) == GPU and not lagged if setting == AUTO else setting
    if recompute and lagged:
        raise ValueError(f"{_model_file(trainer)}: recompute_old_logprobs: true with runtime.policy_lag="
                         f"{config.runtime.policy_lag}: not supported (the trainer's weights have moved since the "
                         f"rollouts were sampled, so its log-probs are not the sampling policy's); set it to auto "
                         f"or false (the ratio then divides by the sampler's log-probs)")
    if float(args.get("tis_cap", 0.0) or 0.0) > 0 and not recompute:
        raise ValueError(f"{_model_file(trainer)}: tis_cap needs recompute_old_logprobs: true (the truncated "
                         f"importance weights compare the trainer's log-probs with the sampler's)")
    return recompute


def _model_file(model: BaseModule) -> str:
    config = get_args()
    entry = config.models.get(model.name)
    return (entry.model_config_file if entry is not None and entry.model_config_file else
            config.config_path or "config") + f" (models.{model.name})"


def old_logprobs_stage(trainer: BaseModule, policy: BaseModule) -> bool:
    """Whether the environment runs the trainer's old-log-prob pass (``recompute_old_logprobs``).

    Not when every episode makes exactly one optimizer step, right after the sync: its old
    log-probs are then the training forward pass's own, detached (the weights have not moved
    yet), so the trainer takes them there (``PolicyTrainer``, "on-policy step") and one whole
    forward pass over the rollouts is saved. The trainer checks that the step was the only
    one since the sync."""
    if not _recomputes_old_logprobs(trainer):
        return False
    config = get_args()
    runtime = config.runtime
    if runtime.num_training_epoch != 1 or runtime.max_relay_episode != 0 \
            or (trainer.name in config.models and config.models[trainer.name].sync_frequency != 1):
        return True
    dynamic = runtime.stream_data_loader_type == "dynamic"
    samples = runtime.sample_per_episode * (_samples_per_prompt(policy) if dynamic else 1)
    return samples > runtime.train_global_batch_size


def _samples_per_prompt(policy: BaseModule) -> int:
    models = get_args().models
    return int(models[policy.name].args_dict.get("n", 1)) if policy.name in models else 1


class DriverStep:
    """Whether a preset runs its driver-side step, and why (for messages).

    ``explicit`` (the preset's argument) wins, then ``switch`` in the policy trainer's
    model args, then auto: on when a trainer's ``needs_rollout_keys`` meets ``adds``.
    Turning the step off for a trainer that declares it needs it is an error.
    """

    def __init__(self, engine: str, switch: str, explicit: Switch, trainers: Sequence[BaseModule],
                 adds: Sequence[str]):
        self.engine, self.switch, self.policy_trainer = engine, switch, trainers[0]
        explicit = AUTO if explicit is None else explicit
        configured = _trainer_args(trainers[0]).get(switch, AUTO)
        for value, where in ((explicit, f"{engine}({switch}=...)"), (configured, _model_file(trainers[0]))):
            if value not in (AUTO, True, False):
                raise ValueError(f"{where}: {switch}: expected auto, true or false, got {value!r}")
        needing = {t.name: [k for k in t.needs_rollout_keys if k in adds] for t in trainers}
        needing = {name: keys for name, keys in needing.items() if keys}
        if explicit != AUTO:
            self.on, self.why = bool(explicit), f"{switch}={explicit} given to {engine}"
        elif configured != AUTO:
            self.on, self.why = bool(configured), f"`{switch}: {str(configured).lower()}` in {_model_file(trainers[0])}"
        elif needing:
            self.on = True
            self.why = f"{switch}=auto: " + ", ".join(f"{name} declares needs_rollout_keys {keys}"
                                                      for name, keys in needing.items())
        else:
            self.on, self.why = False, f"{switch}=auto: no trainer declares needs_rollout_keys from it"
        if not self.on and needing:
            name, keys = next(iter(needing.items()))
            raise ValueError(f"{engine}: {self.why}, but {name} trains on {keys}, which only the driver's step "
                             f"adds; leave {switch} on auto (or true), or use a trainer that computes its own")

    def checked(self, processor: Any, needs: Sequence[str], step: str) -> Optional["CheckedStep"]:
        """``processor`` behind the key check, or None when the step is off."""
        return CheckedStep(processor, needs, self, step) if self.on else None


class CheckedStep:
    """A preset's rollout processor that first checks each batch for the keys it needs: a
    partial fit (some of the step's keys missing) is an error naming them and the switch."""

    def __init__(self, processor: Any, needs: Sequence[str], decision: DriverStep, step: str):
        self.processor, self.needs, self.decision, self.step = processor, tuple(needs), decision, step

    def process(self, batch: dict, episode: int) -> tuple[dict, dict[str, float]]:
        missing = [k for k in self.needs if k not in batch]
        if missing:
            d = self.decision
            raise RolloutKeysError(
                f"{d.engine}: the driver's {self.step} step is on ({d.why}) and needs rollout keys {missing} "
                f"that the environment flow does not produce (its batches have {sorted(batch)}). If your models "
                f"compute their own rewards, advantages and targets (as in ChatLearn 1.x), turn the step off: "
                f"{d.engine}(..., {d.switch}=False), or `{d.switch}: false` in {_model_file(d.policy_trainer)}; "
                f"otherwise make the environment's stages return {missing}")
        return self.processor.process(batch, episode)

    def is_trainable(self, sample: dict) -> bool:
        return self.processor.is_trainable(sample)

    def end_episode(self, metrics: dict[str, float]) -> dict[str, float]:
        return self.processor.end_episode(metrics)

    def state_dict(self) -> dict:
        return self.processor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.processor.load_state_dict(state)


class RLHFEngine(Engine):
    """PPO-style RLHF, as in ChatLearn 1.x:

        environment: policy [-> policy_trainer: old_logprobs] -> reference and value -> reward
        driver:      KL-shaped rewards and GAE advantages (PPORollouts), when compute_advantages is on
        trainer:     policy_trainer.train_step, value_trainer.train_step
        sync:        policy_trainer -> policy, value_trainer -> value

    ``compute_advantages``: ``"auto"`` (default) runs the PPO step when a trainer declares
    ``needs_rollout_keys`` from it (``advantages``, ``returns``: the library's PolicyTrainer and
    ValueTrainer); otherwise the environment's batches go to the trainers as they are, for
    models that compute their own targets (ChatLearn 1.x's, the toy example). ``True``/``False``
    (or the same key in the policy trainer's model_config_file) decides it explicitly.
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, value: BaseModule,
                 policy_trainer: BaseModule, value_trainer: BaseModule, evaluator: Optional[Evaluator] = None,
                 compute_advantages: Switch = AUTO):
        self.driver_step = DriverStep("RLHFEngine", "compute_advantages", compute_advantages,
                                      [policy_trainer, value_trainer], PPO_ADDS)
        # Always the separate pass: the driver's KL-in-reward reads old_logprobs before training.
        recompute = self.driver_step.on and _recomputes_old_logprobs(policy_trainer)

        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
                policy_out = policy_trainer.forward_step(policy_out)
            ref_out = reference.forward_step(policy_out)
            value_out = value.forward_step(policy_out)
            return reward.forward_step(policy_out, ref_out, value_out)

        def trainer_flow(batch):
            policy_trainer.train_step(batch)
            value_trainer.train_step(batch)

        processor = self.driver_step.checked(
            PPORollouts(config_from_args(PPOConfig, _trainer_args(policy_trainer))), PPO_NEEDS, "PPO") \
            if self.driver_step.on else None
        super().__init__(Environment(env_flow), Trainer(trainer_flow), evaluator, rollout_processor=processor,
                         name="RLHFEngine")
        self.set_parameter_sync(policy_trainer, policy)
        self.set_parameter_sync(value_trainer, value)


class _CriticFreeEngine(Engine):
    """The dataflow GRPO, RLOO, REINFORCE++ and online DPO share: policy -> reference -> reward,
    the algorithm's rollout processor in the driver, policy_trainer trains, sync to policy."""

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, policy_trainer: BaseModule,
                 evaluator: Optional[Evaluator], processor, recompute: bool = False, name: Optional[str] = None):
        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
                policy_out = policy_trainer.forward_step(policy_out)
            ref_out = reference.forward_step(policy_out)
            return reward.forward_step(policy_out, ref_out)

        def trainer_flow(batch):
            policy_trainer.train_step(batch)

        super().__init__(Environment(env_flow), Trainer(trainer_flow), evaluator, rollout_processor=processor,
                         name=name)
        self.set_parameter_sync(policy_trainer, policy)


def _grpo_processor(engine: str, step: DriverStep, policy: BaseModule, policy_trainer: BaseModule):
    if not step.on:
        return None
    _require_dynamic(engine, "each prompt yields n responses")
    return step.checked(GRPORollouts(config_from_args(GRPOConfig, _trainer_args(policy_trainer)),
                                     _samples_per_prompt(policy)), GRPO_NEEDS, "GRPO")


class _AdvantageEngine(_CriticFreeEngine):
    """A critic-free preset whose driver step adds ``advantages`` (GRPO, RLOO, REINFORCE++), switched by
    ``compute_advantages`` as in ``RLHFEngine``.

    The old-log-prob stage runs with ``recompute_old_logprobs``, skipped on an on-policy step
    (``old_logprobs_stage``) unless the driver's step reads ``old_logprobs`` itself (a KL in the
    reward): the driver runs before training, so it would see the sampler's, not the trainer's.
    """

    preset = "engine"  # the class's name, for messages

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, policy_trainer: BaseModule,
                 evaluator: Optional[Evaluator] = None, compute_advantages: Switch = AUTO):
        self.driver_step = DriverStep(self.preset, "compute_advantages", compute_advantages, [policy_trainer],
                                      ADVANTAGES)
        processor, recompute = None, False
        if self.driver_step.on:
            processor, reads_old = self._processor(policy, policy_trainer)
            recompute = _recomputes_old_logprobs(policy_trainer) if reads_old \
                else old_logprobs_stage(policy_trainer, policy)
        super().__init__(policy, reference, reward, policy_trainer, evaluator, processor, recompute=recompute,
                         name=self.preset)

    def _processor(self, policy: BaseModule, policy_trainer: BaseModule) -> tuple[CheckedStep, bool]:
        """The driver's step behind its key check, and whether it reads ``old_logprobs`` before training."""
        raise NotImplementedError


class GRPOEngine(_AdvantageEngine):
    """GRPO: no value model; ``n`` responses per prompt scored and normalised within their group.

        environment: policy (n samples per prompt) [-> policy_trainer: old_logprobs] -> reference -> reward
        driver:      group-normalised advantages, optional top-k (GRPORollouts), when compute_advantages is on
        trainer:     policy_trainer.train_step (clipped loss + KL loss to the reference)
        sync:        policy_trainer -> policy

    ``compute_advantages`` as in ``RLHFEngine`` (auto: on when the trainer declares
    ``needs_rollout_keys`` with ``advantages``); the step needs ``stream_data_loader_type: dynamic``.
    """

    preset = "GRPOEngine"

    def _processor(self, policy: BaseModule, policy_trainer: BaseModule) -> tuple[CheckedStep, bool]:
        return _grpo_processor(self.preset, self.driver_step, policy, policy_trainer), False


class RLOOEngine(_AdvantageEngine):
    """RLOO: no value model; ``n`` >= 2 responses per prompt, each one's baseline the mean reward of
    the others.

        environment: policy (n samples per prompt) [-> policy_trainer: old_logprobs] -> reference -> reward
        driver:      KL-penalised rewards, leave-one-out advantages (RLOORollouts), when compute_advantages is on
        trainer:     policy_trainer.train_step (clipped loss; a KL loss only with kl_in_reward: false)
        sync:        policy_trainer -> policy

    The step needs ``n >= 2`` and ``stream_data_loader_type: dynamic``, checked here, before any
    worker starts.
    """

    preset = "RLOOEngine"

    def _processor(self, policy: BaseModule, policy_trainer: BaseModule) -> tuple[CheckedStep, bool]:
        n = _samples_per_prompt(policy)
        if n < 2:
            raise ValueError(f"{_model_file(policy)}: n: RLOO compares each response with the other responses "
                             f"to its prompt, so it needs n >= 2 responses per prompt, got n={n}")
        _require_dynamic(self.preset, "each prompt yields n responses")
        cfg = config_from_args(RLOOConfig, _trainer_args(policy_trainer))
        processor = RLOORollouts(cfg, n)
        return self.driver_step.checked(processor, processor.needs, "RLOO"), cfg.reads_old_logprobs()


class ReinforcePPEngine(_AdvantageEngine):
    """REINFORCE++: no value model; the KL to the reference in the token rewards, reward-to-go returns
    whitened over the training batch as advantages.

        environment: policy (n samples per prompt, n >= 1) [-> policy_trainer: old_logprobs] -> reference
                     -> reward
        driver:      KL-shaped token rewards and their reward-to-go (ReinforcePPRollouts), when
                     compute_advantages is on
        trainer:     policy_trainer.train_step (whitens the returns over the global batch, clipped loss)
        sync:        policy_trainer -> policy

    With ``n`` > 1 the step needs ``stream_data_loader_type: dynamic``.
    """

    preset = "ReinforcePPEngine"

    def _processor(self, policy: BaseModule, policy_trainer: BaseModule) -> tuple[CheckedStep, bool]:
        if _samples_per_prompt(policy) > 1:
            _require_dynamic(self.preset, "each prompt yields n responses")
        cfg = config_from_args(ReinforcePPConfig, _trainer_args(policy_trainer))
        processor = ReinforcePPRollouts(cfg)
        return self.driver_step.checked(processor, processor.needs, "REINFORCE++"), cfg.reads_old_logprobs()


class OnlineDPOEngine(_CriticFreeEngine):
    """Online DPO: two on-policy responses per prompt, ranked by the reward, DPO loss.

        environment: policy (n: 2) -> reference -> reward
        driver:      (chosen, rejected) pairs (DPOPairs), when make_pairs is on
        trainer:     policy_trainer.train_step (DPO loss against the reference log-probs)
        sync:        policy_trainer -> policy

    ``make_pairs``: auto (on when the trainer declares ``needs_rollout_keys`` with the
    ``chosen_*``/``rejected_*`` keys), or True/False; the step needs ``n: 2`` and
    ``stream_data_loader_type: dynamic``. Off, the trainer pairs the responses itself (1.x).
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, policy_trainer: BaseModule,
                 evaluator: Optional[Evaluator] = None, make_pairs: Switch = AUTO):
        self.driver_step = DriverStep("OnlineDPOEngine", "make_pairs", make_pairs, [policy_trainer], DPO_ADDS)
        processor = None
        if self.driver_step.on:
            _require_dynamic("OnlineDPOEngine", "pairs without a clear winner are dropped")
            n = _samples_per_prompt(policy)
            if n != 2:
                raise ValueError(f"{get_args().config_path or 'config'}: models.{policy.name} `n`: online DPO "
                                 f"samples 2 responses per prompt, got n={n}")
            processor = self.driver_step.checked(
                DPOPairs(config_from_args(DPOConfig, _trainer_args(policy_trainer))), DPO_NEEDS, "online-DPO")
        super().__init__(policy, reference, reward, policy_trainer, evaluator, processor, name="OnlineDPOEngine")


class DPOEngine(Engine):
    """Offline DPO (ChatLearn 1.x): the reference scores each (chosen, rejected) sample of the
    dataset, the policy trainer trains on them; no sampling, no parameter sync.

        environment: reference
        trainer:     policy_trainer.train_step
    """

    def __init__(self, reference: BaseModule, policy_trainer: BaseModule, evaluator: Optional[Evaluator] = None):
        def env_flow(batch):
            return reference.forward_step(batch)

        def trainer_flow(batch):
            policy_trainer.train_step(batch)

        super().__init__(Environment(env_flow), Trainer(trainer_flow), evaluator, name="DPOEngine")


class GRPOMathEngine(Engine):
    """ChatLearn 1.x's GRPO with a second (rule) reward and a built-in evaluator:

        environment: policy [-> ppo_policy: old_logprobs] -> reference -> reward, and reward1 (from
                     the prompts and the policy)
        driver:      GRPORollouts when compute_advantages is on (auto: the trainer declares it)
        trainer:     ppo_policy.train_step
        evaluator:   policy.eval_forward -> reward.eval_forward and reward1.eval_forward
                     (give it prompts with engine.evaluator.set_dataset(...))
        sync:        ppo_policy -> policy
    """

    def __init__(self, policy: BaseModule, reference: BaseModule, reward: BaseModule, reward1: BaseModule,
                 ppo_policy: BaseModule, compute_advantages: Switch = AUTO):
        self.driver_step = DriverStep("GRPOMathEngine", "compute_advantages", compute_advantages, [ppo_policy],
                                      ADVANTAGES)
        processor = _grpo_processor("GRPOMathEngine", self.driver_step, policy, ppo_policy)
        recompute = self.driver_step.on and old_logprobs_stage(ppo_policy, policy)

        def env_flow(batch):
            policy_out = policy.forward_step(batch)
            if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
                policy_out = ppo_policy.forward_step(policy_out)
            ref_out = reference.forward_step(policy_out)
            reward_out = reward.forward_step(policy_out, ref_out)
            reward_out1 = reward1.forward_step(batch, policy_out)
            return reward_out, reward_out1

        def trainer_flow(batch):
            ppo_policy.train_step(batch)

        def evaluator_flow(batch):
            policy_out = policy.eval_forward(batch)
            return reward.eval_forward(policy_out), reward1.eval_forward(policy_out)

        super().__init__(Environment(env_flow), Trainer(trainer_flow), Evaluator(evaluator_flow),
                         rollout_processor=processor, name="GRPOMathEngine")
        self.set_parameter_sync(ppo_policy, policy)
