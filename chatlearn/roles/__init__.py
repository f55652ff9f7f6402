"""The library's model roles: Megatron training and vLLM sampling for PPO, GRPO, RLOO, REINFORCE++
and online DPO.

    PolicyInference   vLLM sampling: responses, old_logprobs
    PolicyReference   Megatron forward: ref_logprobs
    RewardInference   Megatron score head and/or a Python reward function: scores
    MathReward        a rule-based math reward merged with the reward model's (1.x's GRPO math)
    ValueInference    Megatron score head: old_values
    PolicyTrainer     Megatron PPO policy loss        (GRPOTrainer, RLOOTrainer, ReinforcePPTrainer,
                                                       DPOTrainer: the other algorithms)
    ValueTrainer      Megatron clipped value loss

Also importable from the top-level package (``from chatlearn import PolicyTrainer``), which
imports this package only when one of them is asked for.
"""
from chatlearn.roles.policy_inference import PolicyInference
from chatlearn.roles.policy_trainer import DPOTrainer, GRPOTrainer, PolicyTrainer, ReinforcePPTrainer, RLOOTrainer
from chatlearn.roles.reference import PolicyReference
from chatlearn.roles.reward import MathReward, RewardInference
from chatlearn.roles.value import ValueInference, ValueTrainer

__all__ = ["PolicyInference", "PolicyReference", "RewardInference", "MathReward", "ValueInference", "PolicyTrainer",
           "GRPOTrainer", "RLOOTrainer", "ReinforcePPTrainer", "DPOTrainer", "ValueTrainer"]
